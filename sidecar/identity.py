"""Workload identity: the sidecar's key, its certificate from the mesh CA, and renewal.

The key is made here, in memory, and never leaves the process: the CA only ever sees a CSR,
whose signature proves we hold the key. The certificate carries the SPIFFE ID
`spiffe://<trust domain>/service/<service>` as its only URI SAN and the DNS SAN
`<service>.svc.<trust domain>` (docs/identity.md): the DNS SAN is what grpcio's TLS client can
check, so upstream channels name it with `grpc.ssl_target_name_override`.

A renewal makes a new key too (a key lives no longer than its certificate). Renewal happens at
about half of the validity remaining when the certificate arrived, with jitter so instances
started together do not all call the CA at once; a failed renewal is retried with capped
exponential backoff, always before the current certificate expires while there is time left.

Two sources publish an `Identity` to subscribers: `CertificateSource` (from the CA) and
`StaticCertificateSource` (from files or PEM, for tests and operator-managed certificates).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

log = logging.getLogger(__name__)

DEFAULT_TRUST_DOMAIN = "pymesh.local"  # MeshConfig spec.trustDomain default
SPIFFE_SCHEME = "spiffe://"


class IdentityError(Exception):
    """No usable certificate: the message says why (for logs and /ready)."""


# --- names ------------------------------------------------------------------------------------


def spiffe_id(trust_domain: str, service: str) -> str:
    return f"{SPIFFE_SCHEME}{trust_domain}/service/{service}"


def dns_name(trust_domain: str, service: str) -> str:
    """The DNS SAN of a service's certificates: what an upstream channel's name override names."""
    return f"{service}.svc.{trust_domain}"


def parse_spiffe_id(uri: str) -> tuple[str, str] | None:
    """`spiffe://TD/service/NAME` -> (TD, NAME); None for anything else (other paths, other
    schemes, empty parts), so a caller that is not a mesh service never maps to a service."""
    if not uri.startswith(SPIFFE_SCHEME):
        return None
    trust_domain, _, path = uri[len(SPIFFE_SCHEME):].partition("/")
    kind, _, name = path.partition("/")
    if not trust_domain or kind != "service" or not name or "/" in name:
        return None
    return trust_domain, name


# --- key, CSR, certificate --------------------------------------------------------------------


def generate_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def build_csr(key: ec.EllipticCurvePrivateKey, service: str, trust_domain: str) -> str:
    """A PEM CSR naming the service's SPIFFE ID (the only URI SAN) and its DNS SAN. The CA writes
    the certificate's names itself; the subject CN is only a hint for people reading it."""
    sans = [x509.UniformResourceIdentifier(spiffe_id(trust_domain, service)),
            x509.DNSName(dns_name(trust_domain, service))]
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service[:64])]))
           .add_extension(x509.SubjectAlternativeName(sans), critical=False)
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM).decode()


@dataclass(frozen=True, slots=True)
class Identity:
    """One certificate with its key and the roots to trust; replaced whole, never changed."""

    spiffe_id: str
    private_key_pem: bytes = dataclasses.field(repr=False)
    certificate_chain_pem: bytes  # the leaf first, then any intermediates
    trust_bundle_pem: tuple[bytes, ...]  # one PEM per root
    not_before: float  # unix seconds
    not_after: float
    serial: int

    @property
    def bundle_pem(self) -> bytes:
        return b"".join(p if p.endswith(b"\n") else p + b"\n" for p in self.trust_bundle_pem)

    def valid_at(self, now: float) -> bool:
        return self.not_before <= now < self.not_after


def _leaf_spiffe_id(cert: x509.Certificate) -> str:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise IdentityError("certificate has no subject alternative names") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1 or not uris[0].startswith(SPIFFE_SCHEME):
        raise IdentityError(f"certificate must carry exactly one spiffe:// URI SAN, has {uris}")
    return uris[0]


def identity_from_pem(key_pem: bytes, chain_pem: bytes, bundle_pem: Sequence[bytes] | bytes
                      ) -> Identity:
    """Checks what TLS would otherwise fail on later and less clearly: the key belongs to the
    leaf, the leaf names one SPIFFE ID, and there is at least one root."""
    try:
        chain = x509.load_pem_x509_certificates(chain_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
        parts = [bundle_pem] if isinstance(bundle_pem, bytes) else list(bundle_pem)
        roots = tuple(root for part in parts for root in _split_pems(part))
    except ValueError as err:
        raise IdentityError(f"unreadable PEM: {err}") from None
    if not roots:
        raise IdentityError("empty trust bundle")
    leaf = chain[0]
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if (key.public_key().public_bytes(serialization.Encoding.DER, spki)
            != leaf.public_key().public_bytes(serialization.Encoding.DER, spki)):
        raise IdentityError("the private key does not belong to the certificate")
    return Identity(spiffe_id=_leaf_spiffe_id(leaf), private_key_pem=key_pem,
                    certificate_chain_pem=chain_pem, trust_bundle_pem=roots,
                    not_before=leaf.not_valid_before_utc.timestamp(),
                    not_after=leaf.not_valid_after_utc.timestamp(), serial=leaf.serial_number)


def _split_pems(text: bytes) -> tuple[bytes, ...]:
    return tuple(c.public_bytes(serialization.Encoding.PEM)
                 for c in x509.load_pem_x509_certificates(text)) if text.strip() else ()


# --- publishing -------------------------------------------------------------------------------


Listener = Callable[[Identity], None]


class IdentityProvider(Protocol):
    """What the TLS helpers need: the current identity, a number that moves on with every new
    identity (set before listeners are called), and a call on every change."""

    @property
    def version(self) -> int: ...

    def current(self) -> Identity | None: ...

    def subscribe(self, listener: Listener) -> Callable[[], None]: ...


class _Publisher:
    def __init__(self) -> None:
        self._current: Identity | None = None
        self._listeners: list[Listener] = []
        self._version = 0

    @property
    def version(self) -> int:
        return self._version

    def current(self) -> Identity | None:
        return self._current

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """`listener` is called (synchronously, on the publishing thread) with each new
        identity; returns the function that unsubscribes it."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def replace_trust_bundle(self, roots: tuple[bytes, ...]) -> bool:
        """The roots delivered with the config (a root rotation reaches every sidecar with the
        next push, before any peer shows a certificate of the new root): publish the current
        certificate with them when they differ. True when something changed."""
        current = self._current
        if current is None or not roots or _same(roots, current.trust_bundle_pem):
            return False
        self._publish(dataclasses.replace(current, trust_bundle_pem=roots))
        return True

    def _publish(self, identity: Identity) -> None:
        self._current = identity
        self._version += 1
        for listener in list(self._listeners):
            try:
                listener(identity)
            except Exception:  # one broken subscriber must not stop the others
                log.exception("identity subscriber %r failed", listener)


class StaticCertificateSource(_Publisher):
    """An identity given as PEM or files (tests; certificates managed by the operator)."""

    def __init__(self, identity: Identity, files: tuple[str, str, str] | None = None) -> None:
        super().__init__()
        self._files = files
        self._publish(identity)

    @classmethod
    def from_files(cls, cert_file: str, key_file: str, bundle_file: str
                   ) -> StaticCertificateSource:
        return cls(_read_files(cert_file, key_file, bundle_file),
                   (cert_file, key_file, bundle_file))

    def set(self, identity: Identity) -> None:
        self._publish(identity)

    def reload(self) -> bool:
        """Re-read the files; publish and return True when the certificate or roots changed."""
        if self._files is None:
            return False
        identity = _read_files(*self._files)
        old = self._current
        if old is not None and (old.certificate_chain_pem, old.trust_bundle_pem) == (
                identity.certificate_chain_pem, identity.trust_bundle_pem):
            return False
        self._publish(identity)
        return True


def _same(a: Sequence[bytes], b: Sequence[bytes]) -> bool:
    return [x.strip() for x in a] == [y.strip() for y in b]


def _read_files(cert_file: str, key_file: str, bundle_file: str) -> Identity:
    try:
        with open(cert_file, "rb") as c, open(key_file, "rb") as k, open(bundle_file, "rb") as b:
            return identity_from_pem(k.read(), c.read(), b.read())
    except OSError as err:
        raise IdentityError(f"cannot read certificate files: {err}") from None


# --- renewal schedule (pure) ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RenewalPolicy:
    fraction: float = 0.5  # of the validity left when the certificate arrived
    jitter: float = 0.1  # +- added to fraction, uniformly
    initial_backoff: float = 1.0  # seconds, after the first failure
    max_backoff: float = 30.0
    multiplier: float = 2.0
    min_delay: float = 0.5  # never hammer the CA, even with a nearly expired certificate


class RenewalSchedule:
    """When to call the CA next: a pure core with an injected random source."""

    def __init__(self, policy: RenewalPolicy, rng: random.Random) -> None:
        self.policy = policy
        self._rng = rng
        self.failures = 0

    def after_success(self, now: float, not_after: float) -> float:
        self.failures = 0
        p = self.policy
        fraction = p.fraction + self._rng.uniform(-p.jitter, p.jitter)
        return now + max(p.min_delay, (not_after - now) * fraction)

    def after_failure(self, now: float, not_after: float | None) -> float:
        """Backoff with jitter (half fixed, half random), and while the current certificate is
        still valid, no later than half way to its expiry, so several retries happen in time."""
        p = self.policy
        ceiling = min(p.max_backoff, p.initial_backoff * p.multiplier ** self.failures)
        self.failures += 1
        delay = ceiling / 2 + self._rng.uniform(0, ceiling / 2)
        if not_after is not None and not_after > now:
            delay = min(delay, (not_after - now) / 2)
        return now + max(p.min_delay, delay)


# --- the CA client ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SignResult:
    certificate_pem: str
    trust_bundle_pem: tuple[str, ...]


class Signer(Protocol):
    async def sign(self, csr_pem: str) -> SignResult: ...

    async def trust_bundle(self) -> tuple[str, ...]: ...

    async def trust_domain(self) -> str: ...


class GrpcSigner:
    """mesh.v1.CertificateService over a channel to the control plane."""

    def __init__(self, channel: grpc.aio.Channel, token: str, timeout: float = 10.0) -> None:
        from mesh.v1 import ca_pb2, ca_pb2_grpc  # generated (make protos)

        self._pb = ca_pb2
        self._stub = ca_pb2_grpc.CertificateServiceStub(channel)
        self._metadata = (("authorization", f"Bearer {token}"),)
        self._timeout = timeout

    async def sign(self, csr_pem: str) -> SignResult:
        response = await self._stub.Sign(self._pb.SignRequest(csr_pem=csr_pem),
                                         metadata=self._metadata, timeout=self._timeout)
        return SignResult(response.certificate_pem, tuple(response.trust_bundle_pem))

    async def trust_bundle(self) -> tuple[str, ...]:
        response = await self._stub.TrustBundle(self._pb.TrustBundleRequest(),
                                                timeout=self._timeout)
        return tuple(response.trust_bundle_pem)

    async def trust_domain(self) -> str:
        response = await self._stub.TrustBundle(self._pb.TrustBundleRequest(),
                                                timeout=self._timeout)
        if not response.trust_domain:
            raise IdentityError("the CA did not say its trust domain")
        return str(response.trust_domain)


def read_token(token: str | None, token_file: str | None) -> str:
    """The bootstrap token from `--token` (or MESH_TOKEN), else from `--token-file`."""
    if token and token.strip():
        return token.strip()
    if token_file:
        try:
            with open(token_file) as f:
                text = f.read().strip()
        except OSError as err:
            raise IdentityError(f"cannot read --token-file: {err}") from None
        if text:
            return text
        raise IdentityError(f"--token-file {token_file} is empty")
    raise IdentityError("mTLS needs a bootstrap token: --token, MESH_TOKEN or --token-file "
                        "(create one with `meshctl token create --service NAME`)")


def describe_error(err: BaseException) -> str:
    if isinstance(err, grpc.aio.AioRpcError):
        return f"{err.code().name}: {err.details()}"
    return f"{type(err).__name__}: {err}"


class CertificateSource(_Publisher):
    """Keeps a valid certificate for `service`, from the mesh CA, for as long as it runs.

    trust_domain "" means: ask the CA (MeshConfig's trust domain) before the first CSR."""

    def __init__(self, service: str, trust_domain: str, signer: Signer, *,
                 policy: RenewalPolicy | None = None, bundle_interval: float | None = 300.0,
                 clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 rng: random.Random | None = None,
                 new_key: Callable[[], ec.EllipticCurvePrivateKey] = generate_key) -> None:
        super().__init__()
        self.service = service
        self.trust_domain = trust_domain
        self.spiffe_id = spiffe_id(trust_domain, service) if trust_domain else ""
        self._ask_trust_domain = not trust_domain
        self._signer = signer
        self._schedule = RenewalSchedule(policy or RenewalPolicy(), rng or random.Random())
        self._bundle_interval = bundle_interval
        self._clock = clock
        self._sleep = sleep
        self._new_key = new_key
        self._tasks: list[asyncio.Task[None]] = []
        self._changed = asyncio.Event()
        self.next_refresh_at: float | None = None
        self.last_error: str | None = None

    # --- one step each, for tests and for run() ----------------------------------------------
    async def refresh(self) -> bool:
        """Ask the CA for a certificate now; publish it on success. Schedules the next try."""
        now = self._clock()
        current = self._current
        try:
            if not self.trust_domain:
                self.trust_domain = await self._signer.trust_domain()
                self.spiffe_id = spiffe_id(self.trust_domain, self.service)
            key = self._new_key()
            result = await self._signer.sign(build_csr(key, self.service, self.trust_domain))
            identity = identity_from_pem(private_key_pem(key), result.certificate_pem.encode(),
                                         tuple(p.encode() for p in result.trust_bundle_pem))
            if identity.spiffe_id != self.spiffe_id:
                raise IdentityError(f"the CA issued {identity.spiffe_id}, "
                                    f"asked for {self.spiffe_id}")
        except asyncio.CancelledError:
            raise
        except Exception as err:
            self.last_error = describe_error(err)
            if (self._ask_trust_domain and isinstance(err, grpc.aio.AioRpcError)
                    and err.code() is grpc.StatusCode.INVALID_ARGUMENT):
                self.trust_domain = ""  # MeshConfig's trust domain may have changed: ask again
            not_after = current.not_after if current is not None else None
            self.next_refresh_at = self._schedule.after_failure(now, not_after)
            left = ("no certificate yet" if current is None else
                    f"current certificate expires in {current.not_after - now:.0f}s")
            log.warning("certificate for %s not renewed (%s); %s; retrying in %.1fs",
                        self.spiffe_id, self.last_error, left, self.next_refresh_at - now)
            return False
        self.last_error = None
        now = self._clock()
        self.next_refresh_at = self._schedule.after_success(now, identity.not_after)
        log.info("certificate for %s issued (serial %x, valid %.0fs); renewing in %.0fs",
                 self.spiffe_id, identity.serial, identity.not_after - now,
                 self.next_refresh_at - now)
        self._publish(identity)
        self._changed.set()
        return True

    async def refresh_bundle(self) -> bool:
        """Pick up a root rotation between renewals: publish the same certificate with the new
        roots when they differ. True when something changed."""
        current = self._current
        if current is None:
            return False
        try:
            roots = tuple(p.encode() for p in await self._signer.trust_bundle())
        except asyncio.CancelledError:
            raise
        except Exception as err:
            log.warning("trust bundle not refreshed: %s", describe_error(err))
            return False
        if not roots or roots == current.trust_bundle_pem or self._current is not current:
            return False
        self._publish(dataclasses.replace(current, trust_bundle_pem=roots))
        return True

    # --- the loop -------------------------------------------------------------------------
    async def run(self) -> None:
        """Renew forever (cancel to stop)."""
        while True:
            due = self.next_refresh_at
            if due is not None:
                await self._sleep(max(0.0, due - self._clock()))
            await self.refresh()

    async def _run_bundle(self, interval: float) -> None:
        rng = random.Random()
        while True:
            await self._sleep(interval * rng.uniform(0.9, 1.1))
            await self.refresh_bundle()

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self.run()))
        if self._bundle_interval:
            self._tasks.append(loop.create_task(self._run_bundle(self._bundle_interval)))

    async def wait_ready(self, timeout: float) -> Identity:
        """The first certificate, or IdentityError with the CA's last answer."""
        deadline = time.monotonic() + timeout
        while self._current is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise IdentityError(f"no certificate for {self.spiffe_id} after {timeout:g}s: "
                                    f"{self.last_error or 'the CA did not answer'}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)
        return self._current

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
