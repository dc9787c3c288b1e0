"""Names, type URLs and small builders shared by the translation modules.

Kept apart from translate.py so the per-resource modules (clusters, routes, listeners) can share
them without importing each other.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from decimal import ROUND_HALF_EVEN, Decimal

from envoy.config.core.v3 import config_source_pb2
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message

from control_plane.registry.model import RegistryView

LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE_TYPE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
TYPE_URLS = (LISTENER_TYPE, ROUTE_TYPE, CLUSTER_TYPE, ENDPOINT_TYPE)

INBOUND_APP_CLUSTER = "inbound|app"  # defined by the sidecar itself from --app, never sent
FAULT_FILTER = "envoy.filters.http.fault"
ROUTER_FILTER = "envoy.filters.http.router"
RBAC_DENY_FILTER = "envoy.filters.http.rbac.deny"
RBAC_ALLOW_FILTER = "envoy.filters.http.rbac.allow"
RATE_LIMIT_FILTER = "envoy.filters.http.local_ratelimit"
HCM_FILTER = "envoy.filters.network.http_connection_manager"
HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def outbound_name(service: str) -> str:
    return f"outbound|{service}"


def inbound_name(service: str) -> str:
    return f"inbound|{service}"


def subset_cluster(service: str, subset: str) -> str:
    return f"{service}|{subset}"


def pack(msg: Message) -> any_pb2.Any:
    """Any with deterministic bytes: map fields (typed_per_filter_config, RBAC policies) would
    otherwise serialize in hash order and change the version of an unchanged resource."""
    out = any_pb2.Any()
    out.Pack(msg, deterministic=True)
    return out


def serialize(msg: Message) -> bytes:
    return msg.SerializeToString(deterministic=True)


def version_of(resources: Mapping[str, Message]) -> str:
    """A version for a set of resources: equal sets give equal versions on every replica."""
    digest = hashlib.sha256()
    for name in sorted(resources):
        data = serialize(resources[name])
        digest.update(len(name).to_bytes(4, "big") + name.encode())
        digest.update(len(data).to_bytes(8, "big") + data)
    return digest.hexdigest()[:16]


def ads_source() -> config_source_pb2.ConfigSource:
    source = config_source_pb2.ConfigSource(resource_api_version=config_source_pb2.V3)
    source.ads.SetInParent()
    return source


def duration(seconds: float) -> duration_pb2.Duration:
    """Exact to the nanosecond and never via binary floating point noise (0.1s stays 0.1s)."""
    nanos_total = int((Decimal(str(seconds)) * 1_000_000_000).to_integral_value(ROUND_HALF_EVEN))
    return duration_pb2.Duration(seconds=nanos_total // 1_000_000_000,
                                 nanos=nanos_total % 1_000_000_000)


def destinations(view: RegistryView, policy_services: Iterable[str]) -> tuple[str, ...]:
    """Every service a caller may be routed to: registered ones and those a policy names
    (a policy may arrive before the service's first instance)."""
    return tuple(sorted(set(view.services()) | set(policy_services)))


def grpc_services_of(view: RegistryView, service: str) -> tuple[str, ...]:
    """The gRPC services D serves, from all its instances (healthy or not: its API does not
    change with health, and routes should not flap when instances do)."""
    found: set[str] = set()
    for inst in view.instances_of(service):
        found.update(s for s in inst.grpc_services if s)
    return tuple(sorted(found))
