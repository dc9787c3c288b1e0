"""Build xDS resources from a static file (Envoy's static_resources shape) or from flags.

Flags are sugar for the same resources a file or the control plane would send, so there is only
one compiler (xds_translate) and /config_dump always shows real xDS.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import json_format

from sidecar.xds_translate import ConfigError

INBOUND_APP_CLUSTER = "inbound|app"


@dataclass
class XdsResources:
    """A full state-of-the-world set, as ADS would deliver it."""

    listeners: list[listener_pb2.Listener] = field(default_factory=list)
    route_configs: dict[str, route_pb2.RouteConfiguration] = field(default_factory=dict)
    clusters: list[cluster_pb2.Cluster] = field(default_factory=list)
    load_assignments: dict[str, endpoint_pb2.ClusterLoadAssignment] = field(default_factory=dict)
    # From a control plane: a route may name a cluster that is not there (yet), as xDS allows
    # while updates of different types arrive one after another; such calls fail UNAVAILABLE.
    dynamic: bool = False


def load_file(path: str) -> XdsResources:
    """Read Envoy-style static_resources from JSON or YAML."""
    text = Path(path).read_text()
    try:
        doc: Any = yaml.safe_load(text) if path.endswith((".yaml", ".yml")) else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not valid {'YAML' if path.endswith('ml') else 'JSON'}: "
                          f"{exc}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected an object with static_resources")
    static = doc.get("static_resources", doc)
    bootstrap = bootstrap_pb2.Bootstrap()
    try:
        json_format.ParseDict({"static_resources": static}, bootstrap)
    except json_format.ParseError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    res = bootstrap.static_resources
    return XdsResources(listeners=list(res.listeners), clusters=list(res.clusters))


def from_flags(service: str, app: str | None, upstreams: Mapping[str, Sequence[str]],
               routes: Mapping[str, str]) -> XdsResources:
    """Resources for the simple case: one app, named upstreams, routes by gRPC service."""
    out = XdsResources()
    if app:
        out.clusters.append(static_cluster(INBOUND_APP_CLUSTER, [app]))
        out.listeners.append(listener(f"inbound|{service}", base_pb2.INBOUND,
                                      [route_entry("app", "", INBOUND_APP_CLUSTER)]))
    for name, addresses in upstreams.items():
        out.clusters.append(static_cluster(name, addresses))
    entries = [route_entry(grpc_service, f"/{grpc_service}/", target)
               for grpc_service, target in routes.items() if grpc_service != "*"]
    if "*" in routes:
        entries.append(route_entry("default", "", routes["*"]))
    if entries or upstreams:
        out.listeners.append(listener(f"outbound|{service}", base_pb2.OUTBOUND, entries))
    return out


def merge(base: XdsResources, extra: XdsResources) -> XdsResources:
    """Add `extra`'s resources that `base` (the file) does not define itself."""
    directions = {lst.traffic_direction for lst in base.listeners}
    names = {c.name for c in base.clusters}
    return XdsResources(
        listeners=base.listeners + [lst for lst in extra.listeners
                                    if lst.traffic_direction not in directions],
        route_configs={**extra.route_configs, **base.route_configs},
        clusters=base.clusters + [c for c in extra.clusters if c.name not in names],
        load_assignments={**extra.load_assignments, **base.load_assignments},
        dynamic=base.dynamic or extra.dynamic,
    )


def static_cluster(name: str, addresses: Sequence[str]) -> cluster_pb2.Cluster:
    cluster = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.STATIC,
                                  lb_policy=cluster_pb2.Cluster.ROUND_ROBIN)
    cluster.load_assignment.cluster_name = name
    locality = cluster.load_assignment.endpoints.add()
    for address in addresses:
        host, port = split_host_port(address)
        sock = locality.lb_endpoints.add().endpoint.address.socket_address
        sock.address = host
        sock.port_value = port
    return cluster


def route_entry(name: str, prefix: str, cluster: str) -> route_components_pb2.Route:
    route = route_components_pb2.Route(name=name)
    route.match.prefix = prefix
    route.route.cluster = cluster
    return route


def listener(name: str, direction: int,
             routes: Sequence[route_components_pb2.Route]) -> listener_pb2.Listener:
    hcm = hcm_pb2.HttpConnectionManager(stat_prefix=name)
    hcm.route_config.name = name
    vhost = hcm.route_config.virtual_hosts.add(name=name, domains=["*"])
    vhost.routes.extend(routes)
    lst = listener_pb2.Listener(name=name, traffic_direction=direction)  # type: ignore[arg-type]
    lst.filter_chains.add().filters.add(
        name="envoy.filters.network.http_connection_manager").typed_config.Pack(hcm)
    return lst


def split_host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"{address!r}: expected HOST:PORT")
    if int(port) > 65535:  # grpc-core would bind the port modulo 65536, a random one for 65536
        raise ConfigError(f"{address!r}: port must be within 0..65535")
    return host.strip("[]"), int(port)
