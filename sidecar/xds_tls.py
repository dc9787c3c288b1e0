"""The mTLS parts of xDS, read into the sidecar's model (docs/identity.md "On the wire").

- Inbound listener: its filter chains say what the inbound port takes. A chain matching
  transport_protocol "tls" with a DownstreamTlsContext means mTLS; a "raw_buffer" chain (or one
  without a transport protocol and without a transport socket: a static file's single chain)
  means plaintext. Both: PERMISSIVE; tls only: STRICT; plaintext only: DISABLE.
- Cluster: `transport_socket_matches` entry with match {tlsMode: mtls} holds the
  UpstreamTlsContext for endpoints labelled so: the server name (sni) the server's certificate
  must carry, its SPIFFE ID, and the roots to trust.
- Endpoint: `filter_metadata["envoy.transport_socket_match"].tlsMode == "mtls"` marks an mTLS
  endpoint; `filter_metadata["pymesh"].plaintext_port` where it also takes plaintext.

The workload's own certificate is never in the config: it comes from the CA (identity.py); the
config names it as certificate provider instance `mesh-identity`.
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography import x509
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2

from sidecar.model import InboundTls, MtlsMode, UpstreamTlsSpec

TLS_SOCKET = "envoy.transport_sockets.tls"
RAW_SOCKET = "envoy.transport_sockets.raw_buffer"
MATCH_KEY = "envoy.transport_socket_match"
TLS_MODE = "tlsMode"
TLS_MODE_MTLS = "mtls"
PYMESH_KEY = "pymesh"
PROVIDER_INSTANCE = "mesh-identity"


class TlsConfigError(ValueError):
    """An mTLS setting the sidecar cannot apply; the message names the field."""


def inbound_tls(listener: listener_pb2.Listener) -> InboundTls:
    where = f"listener {listener.name!r}"
    tls = plaintext = explicit = False
    bundle: tuple[bytes, ...] = ()
    for i, chain in enumerate(listener.filter_chains):
        at = f"{where}.filter_chains[{i}]"
        protocol = chain.filter_chain_match.transport_protocol
        explicit = explicit or bool(protocol)
        socket = chain.transport_socket.name if chain.HasField("transport_socket") else ""
        if protocol == "tls" or socket == TLS_SOCKET:
            if socket != TLS_SOCKET:
                raise TlsConfigError(f"{at}: transport_protocol 'tls' needs a {TLS_SOCKET} "
                                     "transport_socket")
            context = tls_pb2.DownstreamTlsContext()
            if not chain.transport_socket.typed_config.Unpack(context):
                raise TlsConfigError(f"{at}.transport_socket: expected DownstreamTlsContext")
            if not context.require_client_certificate.value:
                raise TlsConfigError(f"{at}.transport_socket: require_client_certificate must "
                                     "be true (the mesh only does mutual TLS)")
            bundle = _roots(context.common_tls_context, f"{at}.transport_socket") or bundle
            tls = True
        elif protocol in ("", "raw_buffer") and socket in ("", RAW_SOCKET):
            plaintext = True
        else:
            raise TlsConfigError(f"{at}: transport_protocol {protocol!r} with transport socket "
                                 f"{socket!r} is not supported")
    if tls and plaintext:
        mode = MtlsMode.PERMISSIVE
    elif tls:
        mode = MtlsMode.STRICT
    else:
        mode = MtlsMode.DISABLE
    return InboundTls(mode, bundle, explicit=explicit)


def cluster_tls(cluster: cluster_pb2.Cluster) -> UpstreamTlsSpec | None:
    where = f"cluster {cluster.name!r}"
    if cluster.HasField("transport_socket") and cluster.transport_socket.name not in (
            "", RAW_SOCKET):
        raise TlsConfigError(f"{where}.transport_socket: only transport_socket_matches "
                             "(tlsMode: mtls) carry mTLS for the sidecar")
    for i, match in enumerate(cluster.transport_socket_matches):
        at = f"{where}.transport_socket_matches[{i}]"
        fields = match.match.fields
        if TLS_MODE not in fields or fields[TLS_MODE].string_value != TLS_MODE_MTLS:
            continue
        if match.transport_socket.name != TLS_SOCKET:
            raise TlsConfigError(f"{at}.transport_socket: expected {TLS_SOCKET}")
        context = tls_pb2.UpstreamTlsContext()
        if not match.transport_socket.typed_config.Unpack(context):
            raise TlsConfigError(f"{at}.transport_socket: expected UpstreamTlsContext")
        if not context.sni:
            raise TlsConfigError(f"{at}: UpstreamTlsContext.sni (the server's DNS SAN) is "
                                 "required")
        validation = context.common_tls_context.validation_context
        uris = [m.matcher.exact for m in validation.match_typed_subject_alt_names
                if m.san_type == common_pb2.SubjectAltNameMatcher.URI and m.matcher.exact]
        uris += [m.exact for m in validation.match_subject_alt_names
                 if m.exact.startswith("spiffe://")]
        if len(uris) != 1:
            raise TlsConfigError(f"{at}: exactly one URI SAN matcher (the server's SPIFFE ID) "
                                 f"is required, found {len(uris)}")
        return UpstreamTlsSpec(server_name=context.sni, spiffe_id=uris[0],
                               trust_bundle=_roots(context.common_tls_context, at))
    return None


def endpoint_transport(lb_endpoint: endpoint_components_pb2.LbEndpoint, host: str
                       ) -> tuple[bool, str]:
    """(mtls, plaintext address) of one endpoint."""
    metadata = lb_endpoint.metadata.filter_metadata
    mtls = (MATCH_KEY in metadata and TLS_MODE in metadata[MATCH_KEY].fields
            and metadata[MATCH_KEY].fields[TLS_MODE].string_value == TLS_MODE_MTLS)
    plaintext = ""
    if PYMESH_KEY in metadata:
        port = metadata[PYMESH_KEY].fields.get("plaintext_port")
        if port is not None and 0 < port.number_value < 65536:
            plaintext = f"{host}:{int(port.number_value)}"
    return mtls, plaintext


def _roots(common: tls_pb2.CommonTlsContext, where: str) -> tuple[bytes, ...]:
    if not common.HasField("validation_context"):
        return ()
    pem = common.validation_context.trusted_ca.inline_bytes or \
        common.validation_context.trusted_ca.inline_string.encode()
    return split_bundle(pem, f"{where}.validation_context.trusted_ca")


def split_bundle(pem: bytes, where: str = "trust bundle") -> tuple[bytes, ...]:
    """One PEM block per root, in order; each must parse as an X.509 certificate (roots that
    are not would make every handshake fail: NACK them instead)."""
    out: list[bytes] = []
    marker = b"-----END CERTIFICATE-----"
    rest = pem
    while marker in rest:
        block, _, rest = rest.partition(marker)
        start = block.find(b"-----BEGIN CERTIFICATE-----")
        if start < 0:
            raise TlsConfigError(f"{where}: malformed PEM")
        root = block[start:] + marker + b"\n"
        try:
            x509.load_pem_x509_certificate(root)
        except ValueError as err:
            raise TlsConfigError(f"{where}[{len(out)}]: not a certificate: {err}") from None
        out.append(root)
    if rest.strip():
        raise TlsConfigError(f"{where}: trailing data after the last certificate")
    return tuple(out)


def same_roots(a: Sequence[bytes], b: Sequence[bytes]) -> bool:
    return [x.strip() for x in a] == [y.strip() for y in b]
