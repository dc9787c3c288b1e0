"""Registry view + policies + a node -> the xDS resources that node should run on.

Pure: no I/O, no clock, no randomness. Equal inputs give byte-identical resources (serialize with
`serialize`/`pack`, which are deterministic), so `version_of` is stable across calls and
control-plane replicas. The policy -> xDS field mapping is documented in translate_clusters,
translate_routes and translate_listeners; docs/control-plane.md gives the resource shapes.

Two kinds of node:
- our sidecars (node metadata `mesh_sidecar: true`): listeners `outbound|S` and `inbound|S`,
  route config `outbound|S`, every destination cluster and its endpoints;
- anything else is a proxyless gRPC client: LDS `D` (or `D:PORT`) -> an API listener, RDS the
  same name, CDS/EDS shared with the sidecars.

The ADS server caches with `share_key`: nodes with the same key get the same answer for the
same type and names (LDS/RDS differ per sidecar service; CDS/EDS differ per variant: `sidecar`,
`proxyless`, and `proxyless-mtls` for a proxyless node with node metadata `mtls: true`).

mTLS (translate_tls has the whole table): the mesh mode (MeshConfig mtls.mode), the variant and
the CA's trust bundle (the third input besides the registry view and the policies) decide the
inbound filter chains, the clusters' transport sockets and which port of an mtls instance EDS
gives.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from envoy.config.core.v3 import base_pb2
from google.protobuf import struct_pb2
from google.protobuf.message import Message

from control_plane.policy.schema import PolicySet
from control_plane.registry.model import RegistryView
from control_plane.translate_clusters import clusters, load_assignments
from control_plane.translate_common import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    LISTENER_TYPE,
    ROUTE_TYPE,
    TYPE_URLS,
    destinations,
    outbound_name,
    pack,
    serialize,
    version_of,
)
from control_plane.translate_listeners import api_listener, sidecar_listeners
from control_plane.translate_routes import proxyless_route_config, sidecar_route_config
from control_plane.translate_tls import (
    PROXYLESS_MTLS_VARIANT,
    PROXYLESS_VARIANT,
    SIDECAR_VARIANT,
)

__all__ = [
    "CLUSTER_TYPE",
    "ENDPOINT_TYPE",
    "LISTENER_TYPE",
    "ROUTE_TYPE",
    "TYPE_URLS",
    "NodeInfo",
    "TranslationProvider",
    "XdsSnapshot",
    "node_info",
    "pack",
    "serialize",
    "share_key",
    "snapshot",
    "translate",
    "variant",
    "version_of",
]


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """Who is asking, from the ADS node (docs/control-plane.md "Node identity")."""

    node_id: str
    sidecar: bool = False  # a mesh sidecar (metadata mesh_sidecar: true); else proxyless
    service: str = ""
    instance_id: str = ""
    inbound_address: str = ""  # HOST:PORT other sidecars dial
    version: str = ""
    zone: str = ""
    grpc_services: tuple[str, ...] = ()
    # grpcio (Python over C-core) shortens service-config timeouts, which is where gRPC puts a
    # route's max_stream_duration, by one to two seconds, so a 1 s policy timeout fails every
    # call at once (grpc/grpc#34547, #40633). Such clients get routes without it.
    grpcio: bool = False
    mtls: bool = False  # metadata mtls: true (a workload identity: dials and serves mTLS)


def node_info(node: base_pb2.Node) -> NodeInfo:
    """Read a node leniently: a missing or mistyped field is empty, never an error, so a
    malformed announcement cannot break the stream (the registry decides what to announce)."""
    fields = node.metadata.fields

    def text(key: str) -> str:
        value = fields.get(key)
        if value is None:
            return ""
        kind = value.WhichOneof("kind")
        if kind == "string_value":
            return value.string_value
        if kind == "number_value" and value.number_value.is_integer():
            return str(int(value.number_value))
        return ""

    def flag(key: str) -> bool:
        value = fields.get(key)
        return value is not None and (
            value.bool_value if value.WhichOneof("kind") == "bool_value"
            else text(key).lower() == "true")

    sidecar = flag("mesh_sidecar")
    id_service, _, id_instance = node.id.partition("~")
    service = text("service") or node.cluster or (id_service if id_instance else "")
    return NodeInfo(
        node_id=node.id,
        sidecar=sidecar,
        service=service,
        instance_id=text("instance_id") or id_instance,
        inbound_address=text("inbound_address"),
        version=text("version"),
        zone=text("zone") or node.locality.zone,
        grpc_services=_string_list(fields.get("grpc_services")),
        grpcio=is_grpcio(node.user_agent_name),
        mtls=flag("mtls"),
    )


def is_grpcio(user_agent_name: str) -> bool:
    """gRPC Python's node says e.g. "gRPC C-core linux Python"."""
    return "C-core" in user_agent_name and "Python" in user_agent_name


def _string_list(value: struct_pb2.Value | None) -> tuple[str, ...]:
    if value is None:
        return ()
    kind = value.WhichOneof("kind")
    if kind == "list_value":
        items = [v.string_value for v in value.list_value.values
                 if v.WhichOneof("kind") == "string_value"]
    elif kind == "string_value":  # tolerate "a,b" as the Consul meta form
        items = value.string_value.split(",")
    else:
        items = []
    return tuple(sorted({s.strip() for s in items if s.strip()}))


def _info(node: NodeInfo | base_pb2.Node) -> NodeInfo:
    return node if isinstance(node, NodeInfo) else node_info(node)


def variant(node: NodeInfo) -> str:
    """Which CDS/EDS a node gets (translate_tls)."""
    if node.sidecar:
        return SIDECAR_VARIANT
    return PROXYLESS_MTLS_VARIANT if node.mtls else PROXYLESS_VARIANT


def share_key(node: NodeInfo | base_pb2.Node, type_url: str) -> str:
    """Nodes with equal keys get equal `translate` results for equal (type_url, names)."""
    node = _info(node)
    if type_url in (CLUSTER_TYPE, ENDPOINT_TYPE):
        return f"{type_url}|{variant(node)}"
    if node.sidecar:
        return f"{type_url}|sidecar|{node.service}"
    if type_url == ROUTE_TYPE and node.grpcio:
        return f"{type_url}|proxyless|grpcio"
    return f"{type_url}|proxyless"


def translate(view: RegistryView, policies: PolicySet | None, node: NodeInfo | base_pb2.Node,
              type_url: str, names: Iterable[str] | None = None,
              trust_bundle: Sequence[str] = ()) -> dict[str, Message]:
    """The resources of one type for one node: the requested names that exist, or with names
    None (a wildcard subscription) all of them. Unknown names are absent, never an error.
    Sorted by name. An unknown type URL gives nothing. `trust_bundle` (root PEMs) goes inline
    into the TLS contexts; empty leaves trusted_ca out."""
    policies = policies if policies is not None else PolicySet()
    node = _info(node)
    if names is None:
        wanted: list[str] | None = None
    else:
        wanted = sorted(set(names))
        if not wanted:
            return {}
    bundle = tuple(trust_bundle)
    if type_url == LISTENER_TYPE:
        found = _listeners(view, policies, node, wanted, bundle)
    elif type_url == ROUTE_TYPE:
        found = _route_configs(view, policies, node, wanted)
    elif type_url == CLUSTER_TYPE:
        found = _pick(clusters(view, policies, variant(node), bundle), wanted)
    elif type_url == ENDPOINT_TYPE:
        found = _pick(load_assignments(view, policies, variant(node)), wanted)
    else:
        found = {}
    return {name: found[name] for name in sorted(found)}


def _no_bundle() -> tuple[str, ...]:
    return ()


class TranslationProvider:
    """ads_server's ResourceProvider over `translate`: reads the current registry view, policy
    set and trust bundle through the callables it is given, so it holds no state of its own.
    They are called on every translation: each must be cheap and must not block (the control
    plane hands over the bundle its CA last announced, not a read of the CA state)."""

    def __init__(self, view: Callable[[], RegistryView], policies: Callable[[], PolicySet],
                 trust_bundle: Callable[[], tuple[str, ...]] = _no_bundle) -> None:
        self._view = view
        self._policies = policies
        self._trust_bundle = trust_bundle

    def resources_for(self, node: base_pb2.Node, type_url: str,
                      names: frozenset[str] | None) -> Mapping[str, Message]:
        return translate(self._view(), self._policies(), node, type_url, names,
                         self._trust_bundle())

    def share_key(self, node: base_pb2.Node, type_url: str) -> str:
        return share_key(node, type_url)

    def revision(self) -> int:
        return self._policies().revision


@dataclass(frozen=True, slots=True)
class XdsSnapshot:
    """Everything one node would get with wildcard subscriptions, per type URL, with versions."""

    resources: Mapping[str, Mapping[str, Message]]
    versions: Mapping[str, str]


def snapshot(view: RegistryView, policies: PolicySet | None, node: NodeInfo,
             trust_bundle: Sequence[str] = ()) -> XdsSnapshot:
    """All four types at once (for /config_dump-like status and tests). For a proxyless node
    the listeners and route configs are those of every known destination."""
    resources = {t: translate(view, policies, node, t, trust_bundle=trust_bundle)
                 for t in TYPE_URLS}
    return XdsSnapshot(resources=resources,
                       versions={t: version_of(r) for t, r in resources.items()})


def _pick(found: Mapping[str, Message], wanted: list[str] | None) -> dict[str, Message]:
    if wanted is None:
        return dict(found)
    return {name: found[name] for name in wanted if name in found}


def _listeners(view: RegistryView, policies: PolicySet, node: NodeInfo,
               wanted: list[str] | None, trust_bundle: tuple[str, ...]) -> dict[str, Message]:
    if node.sidecar:
        return _pick(sidecar_listeners(node.service, policies, trust_bundle), wanted)
    return {name: api_listener(name)
            for name, _service in _proxyless_names(view, policies, wanted)}


def _route_configs(view: RegistryView, policies: PolicySet, node: NodeInfo,
                   wanted: list[str] | None) -> dict[str, Message]:
    if node.sidecar:
        name = outbound_name(node.service)
        if wanted is not None and name not in wanted:
            return {}
        return {name: sidecar_route_config(node.service, view, policies)}
    return {name: proxyless_route_config(name, service, view, policies,
                                         stream_timeouts=not node.grpcio)
            for name, service in _proxyless_names(view, policies, wanted)}


def _proxyless_names(view: RegistryView, policies: PolicySet, wanted: list[str] | None
                     ) -> list[tuple[str, str]]:
    """(resource name, destination service) for the names a proxyless client may ask for: a
    known service `D`, or `D:PORT` (a target with a port; the port is the mesh's business)."""
    known = set(destinations(view, policies.traffic_policies()))
    if wanted is None:
        return [(d, d) for d in sorted(known)]
    out: list[tuple[str, str]] = []
    for name in wanted:
        if name in known:
            out.append((name, name))
            continue
        host, sep, port = name.rpartition(":")
        if sep and port.isdigit() and host in known:
            out.append((name, host))
    return out
