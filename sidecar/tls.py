"""mTLS between sidecars with grpcio: listener and channel credentials that follow the current
identity, and the caller's identity as the handshake proved it.

- Inbound: `grpc.dynamic_ssl_server_credentials` asks our fetcher for a certificate
  configuration on each new handshake. The fetcher hands grpc-core a new configuration only when
  the identity changed, so a renewal or a new trust bundle applies to new connections without
  restarting the listener, and connections already open (long-lived streams) keep their session.
  Client certificates are required and verified against the trust bundle.
- Upstream: `grpc.ssl_channel_credentials` from the current identity, and the channel option
  `grpc.ssl_target_name_override` = the destination service's DNS SAN, so the handshake itself
  checks that the server holds a certificate for the intended service. Credentials are fixed
  for a channel's life: on a change `UpstreamTls.generation` moves on and the pool makes new
  channels for new calls (closing the old ones after a grace period).
- The caller's identity comes from grpc-core's auth context of the verified connection
  (`peer_spiffe_id`, set when the peer certificate has exactly one spiffe:// URI SAN), never
  from request metadata.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import grpc

from sidecar.identity import Identity, IdentityError, IdentityProvider, dns_name, parse_spiffe_id

log = logging.getLogger(__name__)

Option = tuple[str, int | str]

TARGET_NAME_OVERRIDE = "grpc.ssl_target_name_override"
# grpc-core auth context properties (grpc_security_constants.h / tsi peer properties)
_SECURITY_TYPE = "transport_security_type"
_PEER_SPIFFE_ID = "peer_spiffe_id"


# --- inbound ----------------------------------------------------------------------------------


def server_certificate_configuration(identity: Identity) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(identity.private_key_pem, identity.certificate_chain_pem)],
        root_certificates=identity.bundle_pem)


class CertificateFetcher:
    """grpc-core calls this (on one of its threads, holding the GIL) before each handshake.
    Returning None keeps the configuration it has; a new one is used from this handshake on."""

    def __init__(self, provider: IdentityProvider, served: Identity) -> None:
        self._provider = provider
        self._served = served
        self._lock = threading.Lock()
        self.handed_out = 0  # configurations handed to grpc-core after the initial one

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        try:
            current = self._provider.current()
            with self._lock:
                if current is None or current is self._served:
                    return None
                self._served = current
                self.handed_out += 1
            log.info("inbound TLS: serving certificate serial %x to new connections",
                     current.serial)
            return server_certificate_configuration(current)
        except Exception:  # an exception here would fail the handshake: keep the old config
            log.exception("inbound TLS: certificate configuration fetch failed")
            return None


def server_credentials(provider: IdentityProvider) -> grpc.ServerCredentials:
    """mTLS listener credentials that follow `provider` (it must already have an identity)."""
    identity = provider.current()
    if identity is None:
        raise IdentityError("no certificate yet: cannot open the mTLS inbound listener")
    return grpc.dynamic_ssl_server_credentials(
        server_certificate_configuration(identity), CertificateFetcher(provider, identity),
        require_client_authentication=True)


def peer_identity(context: grpc.aio.ServicerContext | grpc.ServicerContext) -> str | None:
    """The caller's SPIFFE ID as proven by its verified client certificate, or None (plaintext
    listener, or a certificate without exactly one spiffe:// URI SAN)."""
    auth = context.auth_context()
    if auth.get(_SECURITY_TYPE) != [b"ssl"]:
        return None
    values = auth.get(_PEER_SPIFFE_ID)
    if not values or len(values) != 1:
        return None
    return values[0].decode("utf-8", "replace")


def peer_service(context: grpc.aio.ServicerContext | grpc.ServicerContext,
                 trust_domain: str) -> str | None:
    """The caller's mesh service (rate limits by caller), when its ID is one of our domain's."""
    peer = peer_identity(context)
    parsed = parse_spiffe_id(peer) if peer else None
    if parsed is None or parsed[0] != trust_domain:
        return None
    return parsed[1]


# --- upstream ---------------------------------------------------------------------------------


def channel_credentials(identity: Identity) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=identity.bundle_pem,
                                        private_key=identity.private_key_pem,
                                        certificate_chain=identity.certificate_chain_pem)


def channel_options(service: str, trust_domain: str) -> list[Option]:
    """Makes the handshake check the server's DNS SAN `<service>.svc.<trust domain>`."""
    return [(TARGET_NAME_OVERRIDE, dns_name(trust_domain, service))]


class UpstreamTls:
    """Channel credentials for the current identity, with a generation number that changes on
    every new identity (the pool keys channels on it)."""

    def __init__(self, provider: IdentityProvider, trust_domain: str) -> None:
        self.trust_domain = trust_domain
        self._provider = provider
        self._lock = threading.Lock()
        self._cached: tuple[Identity, grpc.ChannelCredentials] | None = None
        self._placeholder: grpc.ChannelCredentials | None = None

    @property
    def generation(self) -> int:
        return self._provider.version

    def credentials(self) -> grpc.ChannelCredentials:
        """Before the first certificate: credentials no server trusts, so a channel can be made
        as soon as the config names an mTLS endpoint (its calls fail UNAVAILABLE until then);
        the pool renews every mTLS channel when the certificate arrives (a new generation)."""
        identity = self._provider.current()
        if identity is None:
            with self._lock:
                if self._placeholder is None:
                    self._placeholder = channel_credentials(placeholder_identity())
                return self._placeholder
        with self._lock:
            if self._cached is None or self._cached[0] is not identity:
                self._cached = (identity, channel_credentials(identity))
            return self._cached[1]

    def options(self, service: str) -> list[Option]:
        return channel_options(service, self.trust_domain)

    def subscribe(self, listener: Callable[[Identity], None]) -> Callable[[], None]:
        return self._provider.subscribe(listener)


# --- before the first certificate -------------------------------------------------------------


def placeholder_identity() -> Identity:
    """A self-signed certificate no one trusts, for the mTLS listener until the CA has issued
    ours: the listener can bind at start (its port is announced at once), every handshake fails
    (the peer does not trust this certificate, and no client certificate chains to it), and the
    first real certificate is served from the next handshake on (CertificateFetcher)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from sidecar.identity import identity_from_pem

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pymesh placeholder")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier("spiffe://invalid/placeholder")]),
                critical=False)
            .sign(key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return identity_from_pem(key_pem, pem, pem)


class _Pending:
    """An IdentityProvider view that shows the placeholder until the real source has one."""

    def __init__(self, provider: IdentityProvider, placeholder: Identity) -> None:
        self._provider = provider
        self._placeholder = placeholder

    @property
    def version(self) -> int:
        return self._provider.version

    def current(self) -> Identity | None:
        return self._provider.current() or self._placeholder

    def subscribe(self, listener: Callable[[Identity], None]) -> Callable[[], None]:
        return self._provider.subscribe(listener)


def server_credentials_from_start(provider: IdentityProvider) -> grpc.ServerCredentials:
    """As `server_credentials`, usable before `provider` has its first identity."""
    return server_credentials(_Pending(provider, placeholder_identity()))
