"""mTLS in xDS: which port and metadata an endpoint gets, and the TLS transport sockets.

The mesh mode is MeshConfig `spec.mtls.mode` (schema `mtls_mode`, default PERMISSIVE). A sidecar
with a workload identity registers `mtls` (its inbound port serves mTLS only) and a plaintext port
at the same address (docs/control-plane.md "mTLS"). Each class of node gets its own CDS and EDS
(the share-key variant):

- `sidecar` (our sidecars): EDS gives an mtls instance its mTLS port with
  filter_metadata["envoy.transport_socket_match"] = {"tlsMode": "mtls"} in STRICT and PERMISSIVE
  (PERMISSIVE adds filter_metadata["pymesh"] = {"plaintext_port": N}, a fallback the sidecar may
  use), and its plaintext port in DISABLE. CDS, unless DISABLE, gives every cluster
  transport_socket_matches [mtls -> envoy.transport_sockets.tls (UpstreamTlsContext: sni
  D.svc.TD, our certificate from the "mesh-identity" provider instance, the trust bundle inline,
  URI SAN exactly spiffe://TD/service/D), plaintext (match {}) -> raw_buffer], so endpoints
  without the metadata (instances without identity) stay plaintext.
- `proxyless` (a gRPC client without `mtls: true` in its node metadata): EDS gives mtls instances
  their plaintext port in PERMISSIVE and DISABLE, the mTLS port in STRICT (where plaintext is
  refused, so such clients fail: that is what STRICT means); no metadata. CDS has no TLS.
- `proxyless-mtls` (a gRPC client with `mtls: true`, whose bootstrap names a certificate provider
  instance "mesh-identity"): EDS as for sidecars; CDS, unless DISABLE, gives the clusters of a
  service with any mtls instance a transport_socket with an UpstreamTlsContext taking both the
  certificate and the roots from "mesh-identity" and matching the URI SAN spiffe://TD/service/D
  (match_subject_alt_names, gRFC A29; gRPC has no transport_socket_matches).

Inbound (LDS `inbound|S`, sidecars only): STRICT one chain with transport_protocol "tls" and a
DownstreamTlsContext (client certificate required, "mesh-identity" certificate, bundle inline);
PERMISSIVE that chain then a "raw_buffer" chain without transport socket; DISABLE only the
"raw_buffer" chain. Every chain carries the same HttpConnectionManager.

An empty trust bundle (the CA has no roots yet) leaves trusted_ca out; the control plane does not
serve translation before the CA has roots.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2
from google.protobuf import struct_pb2

from control_plane.registry.model import Instance
from control_plane.translate_common import pack

STRICT = "STRICT"
PERMISSIVE = "PERMISSIVE"
DISABLE = "DISABLE"

SIDECAR_VARIANT = "sidecar"
PROXYLESS_VARIANT = "proxyless"
PROXYLESS_MTLS_VARIANT = "proxyless-mtls"
VARIANTS = (SIDECAR_VARIANT, PROXYLESS_VARIANT, PROXYLESS_MTLS_VARIANT)

TLS_SOCKET = "envoy.transport_sockets.tls"
RAW_SOCKET = "envoy.transport_sockets.raw_buffer"
IDENTITY_PROVIDER = "mesh-identity"  # the certificate provider instance the node defines
SOCKET_MATCH_KEY = "envoy.transport_socket_match"
TLS_MODE = {"tlsMode": "mtls"}
MESH_METADATA_KEY = "pymesh"
TLS_PROTOCOL = "tls"
RAW_PROTOCOL = "raw_buffer"
MTLS_MATCH_NAME = "mtls"
PLAINTEXT_MATCH_NAME = "plaintext"


def spiffe_id(trust_domain: str, service: str) -> str:
    return f"spiffe://{trust_domain}/service/{service}"


def server_name(trust_domain: str, service: str) -> str:
    """The DNS SAN every certificate of `service` carries (the sni callers send)."""
    return f"{service}.svc.{trust_domain}"


def bundle_bytes(trust_bundle: Sequence[str]) -> bytes:
    """All root PEMs concatenated, each ending with a newline."""
    return "".join(pem if pem.endswith("\n") else pem + "\n" for pem in trust_bundle).encode()


# --- EDS -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EndpointPlan:
    """How one instance appears in EDS for one mode and variant."""

    port: int
    tls: bool = False  # tag with the transport socket match {"tlsMode": "mtls"}
    plaintext_port: int = 0  # > 0: also say where its plaintext port is


def in_mesh_mode(inst: Instance, mode: str) -> bool:
    """Whether callers are sent to `inst` at all. In STRICT an instance announced by a sidecar
    without mTLS is left out of EDS: a real one refuses every inbound call in STRICT anyway, and
    anyone can announce an instance over ADS, so dialling it in plaintext would hand requests to
    a server no one verified. Instances reached directly (registered without a sidecar, e.g. in
    Consul) are outside the mesh's mTLS and stay."""
    return not (mode == STRICT and inst.sidecar and not inst.mtls)


def endpoint_plan(inst: Instance, mode: str, variant: str) -> EndpointPlan:
    """An instance without a known plaintext port is left at its mTLS port where plaintext is
    wanted: there is nothing better to dial, and the failure then names the handshake."""
    if not inst.mtls:
        return EndpointPlan(inst.port)
    plaintext = inst.plaintext_port or inst.port
    if mode == DISABLE:
        return EndpointPlan(plaintext)
    if variant == PROXYLESS_VARIANT:
        return EndpointPlan(inst.port if mode == STRICT else plaintext)
    if mode == STRICT:
        return EndpointPlan(inst.port, tls=True)
    return EndpointPlan(inst.port, tls=True, plaintext_port=inst.plaintext_port)


def endpoint_metadata(plan: EndpointPlan) -> base_pb2.Metadata | None:
    if not plan.tls:
        return None
    metadata = base_pb2.Metadata()
    metadata.filter_metadata[SOCKET_MATCH_KEY].update(TLS_MODE)
    if plan.plaintext_port > 0:
        metadata.filter_metadata[MESH_METADATA_KEY].update({"plaintext_port": plan.plaintext_port})
    return metadata


# --- CDS -------------------------------------------------------------------------------------


def sidecar_socket_matches(service: str, trust_domain: str, trust_bundle: Sequence[str]
                           ) -> list[cluster_pb2.Cluster.TransportSocketMatch]:
    context = tls_pb2.UpstreamTlsContext(sni=server_name(trust_domain, service))
    common = context.common_tls_context
    common.tls_certificate_provider_instance.instance_name = IDENTITY_PROVIDER
    validation = common.validation_context
    _trusted_ca(validation, trust_bundle)
    san = validation.match_typed_subject_alt_names.add(
        san_type=common_pb2.SubjectAltNameMatcher.URI)
    san.matcher.exact = spiffe_id(trust_domain, service)
    mtls = cluster_pb2.Cluster.TransportSocketMatch(name=MTLS_MATCH_NAME)
    mtls.match.update(TLS_MODE)
    mtls.transport_socket.name = TLS_SOCKET
    mtls.transport_socket.typed_config.CopyFrom(pack(context))
    plaintext = cluster_pb2.Cluster.TransportSocketMatch(name=PLAINTEXT_MATCH_NAME,
                                                         match=struct_pb2.Struct())
    plaintext.transport_socket.name = RAW_SOCKET
    return [mtls, plaintext]


def proxyless_transport_socket(service: str, trust_domain: str) -> base_pb2.TransportSocket:
    context = tls_pb2.UpstreamTlsContext()
    common = context.common_tls_context
    common.tls_certificate_provider_instance.instance_name = IDENTITY_PROVIDER
    validation = common.validation_context
    validation.ca_certificate_provider_instance.instance_name = IDENTITY_PROVIDER
    validation.match_subject_alt_names.add().exact = spiffe_id(trust_domain, service)
    socket = base_pb2.TransportSocket(name=TLS_SOCKET)
    socket.typed_config.CopyFrom(pack(context))
    return socket


# --- LDS -------------------------------------------------------------------------------------


def inbound_chain_protocols(mode: str) -> tuple[str, ...]:
    """The inbound filter chains' transport_protocol, in order."""
    if mode == STRICT:
        return (TLS_PROTOCOL,)
    if mode == DISABLE:
        return (RAW_PROTOCOL,)
    return (TLS_PROTOCOL, RAW_PROTOCOL)


def downstream_transport_socket(trust_bundle: Sequence[str]) -> base_pb2.TransportSocket:
    context = tls_pb2.DownstreamTlsContext()
    context.require_client_certificate.value = True
    common = context.common_tls_context
    common.tls_certificate_provider_instance.instance_name = IDENTITY_PROVIDER
    _trusted_ca(common.validation_context, trust_bundle)
    socket = base_pb2.TransportSocket(name=TLS_SOCKET)
    socket.typed_config.CopyFrom(pack(context))
    return socket


def _trusted_ca(validation: common_pb2.CertificateValidationContext,
                trust_bundle: Sequence[str]) -> None:
    data = bundle_bytes(trust_bundle)
    if data:
        validation.trusted_ca.inline_bytes = data
