"""Compile xDS v3 resources (Listener, RouteConfiguration, Cluster, ClusterLoadAssignment) into
the sidecar's frozen model.

This is the one place that reads xDS. Whatever the source (a static file, command-line flags,
ADS), resources pass through `compile_snapshot`, which either returns a complete Snapshot or
raises ConfigError naming the resource and field at fault, so a bad update can be NACKed whole.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import grpc
from envoy.config.cluster.v3 import cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import base_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.type.v3 import percent_pb2
from google.protobuf import any_pb2

from sidecar import xds_tls
from sidecar.authz import ALLOW_ALL, AuthzConfigError, compile_rbac_filters, rbac_configs
from sidecar.inbound_policy import InboundPolicyError, rate_limit_of
from sidecar.model import (
    DEFAULT_MAX_PENDING,
    DEFAULT_MAX_REQUESTS,
    Cluster,
    Direction,
    Endpoint,
    HeaderMatch,
    HeaderMatchKind,
    InboundTls,
    LbPolicy,
    PathMatch,
    RetryBudgetConfig,
    Route,
    RouteTable,
    Snapshot,
    WeightedCluster,
)
from sidecar.stages.fault import FaultPolicy
from sidecar.stages.outlier import FailurePercentage, OutlierConfig
from sidecar.stages.retry import RetryPolicy

HCM_TYPE_URL = ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager."
                "v3.HttpConnectionManager")
_SUPPORTED_LB = {cluster_pb2.Cluster.ROUND_ROBIN: LbPolicy.ROUND_ROBIN,
                 cluster_pb2.Cluster.LEAST_REQUEST: LbPolicy.LEAST_REQUEST,
                 cluster_pb2.Cluster.RING_HASH: LbPolicy.RING_HASH}


FAULT_FILTER = "envoy.filters.http.fault"
# gRPC status names as Envoy's retry_on spells them (x-envoy-retry-grpc-on).
_GRPC_RETRY_ON = {code.name.lower().replace("_", "-"): code for code in grpc.StatusCode
                  if code is not grpc.StatusCode.OK}
_STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


class ConfigError(ValueError):
    """An xDS resource the sidecar cannot apply; the message names the resource and field."""


def compile_snapshot(version: str,
                     listeners: Iterable[listener_pb2.Listener],
                     route_configs: Mapping[str, route_pb2.RouteConfiguration],
                     clusters: Iterable[cluster_pb2.Cluster],
                     load_assignments: Mapping[str, endpoint_pb2.ClusterLoadAssignment],
                     require_clusters: bool = True) -> Snapshot:
    """require_clusters=False (config from a control plane): a route may name a cluster that
    is not defined, as xDS allows while CDS and RDS updates arrive one after the other; calls
    routed there fail UNAVAILABLE until it arrives. A static file must be complete."""
    tables: dict[Direction, RouteTable] = {}
    rate_limit = None
    sampling = None
    inbound_tls = InboundTls()
    authorizer = ALLOW_ALL
    for listener in listeners:
        direction = _direction(listener)
        if direction in tables:
            raise ConfigError(f"listener {listener.name!r}: a second {direction.value} listener")
        tables[direction] = _route_table(listener, route_configs)
        if direction is Direction.OUTBOUND:
            hcm = _http_connection_manager(listener)
            if hcm.HasField("tracing") and hcm.tracing.HasField("random_sampling"):
                sampling = min(100.0, max(0.0, hcm.tracing.random_sampling.value))
        if direction is Direction.INBOUND:
            service = listener.name.rsplit("|", 1)[-1]
            hcm = _http_connection_manager(listener)
            try:
                rate_limit = rate_limit_of(hcm, service)
                authorizer = compile_rbac_filters(
                    rbac_configs(hcm.http_filters), service,
                    where=f"listener {listener.name!r} rbac")
            except (InboundPolicyError, AuthzConfigError, ValueError) as exc:
                raise ConfigError(f"listener {listener.name!r}: {exc}") from None
            try:
                inbound_tls = xds_tls.inbound_tls(listener)
            except xds_tls.TlsConfigError as exc:
                raise ConfigError(str(exc)) from None

    compiled: dict[str, Cluster] = {}
    for cluster in clusters:
        if cluster.name in compiled:
            raise ConfigError(f"cluster {cluster.name!r}: duplicate name")
        compiled[cluster.name] = _cluster(cluster, load_assignments)

    for table in tables.values() if require_clusters else ():
        for route in table.routes:
            for wc in route.clusters:
                if wc.name not in compiled:
                    raise ConfigError(f"route {route.name!r} in {table.name!r}: "
                                      f"unknown cluster {wc.name!r}")
    empty = RouteTable("none", ())
    return Snapshot(version=version,
                    outbound=tables.get(Direction.OUTBOUND, empty),
                    inbound=tables.get(Direction.INBOUND, empty),
                    clusters=compiled, inbound_rate_limit=rate_limit,
                    trace_sampling_percent=sampling, inbound_tls=inbound_tls,
                    authorizer=authorizer)


def _direction(listener: listener_pb2.Listener) -> Direction:
    if listener.traffic_direction == base_pb2.OUTBOUND:
        return Direction.OUTBOUND
    if listener.traffic_direction == base_pb2.INBOUND:
        return Direction.INBOUND
    for direction in Direction:
        if direction.value in listener.name.lower():
            return direction
    raise ConfigError(f"listener {listener.name!r}: traffic_direction is unset and the name "
                      "says neither 'inbound' nor 'outbound'")


def _route_table(listener: listener_pb2.Listener,
                 route_configs: Mapping[str, route_pb2.RouteConfiguration]) -> RouteTable:
    where = f"listener {listener.name!r}"
    hcm = _http_connection_manager(listener)
    if hcm.HasField("route_config"):
        rc = hcm.route_config
    elif hcm.HasField("rds"):
        name = hcm.rds.route_config_name
        if name not in route_configs:
            raise ConfigError(f"{where}: route configuration {name!r} is not known")
        rc = route_configs[name]
    else:
        raise ConfigError(f"{where}: http_connection_manager has neither route_config nor rds")
    routes: list[Route] = []
    for vh_index, vhost in enumerate(rc.virtual_hosts):
        for r_index, route in enumerate(vhost.routes):
            path = f"{where} route_config {rc.name!r} virtual_hosts[{vh_index}].routes[{r_index}]"
            routes.append(_route(route, path))
    return RouteTable(name=rc.name or listener.name, routes=tuple(routes))


def _http_connection_manager(listener: listener_pb2.Listener) -> hcm_pb2.HttpConnectionManager:
    if listener.HasField("api_listener"):
        candidates = [listener.api_listener.api_listener]
    else:
        candidates = [f.typed_config for chain in listener.filter_chains for f in chain.filters]
        managers = {a.value for a in candidates if a.type_url == HCM_TYPE_URL}
        if len(managers) > 1:
            # One set of routes, RBAC and rate limits per listener: chains that differ would
            # be enforced for one transport and not the other, so refuse rather than guess.
            raise ConfigError(f"listener {listener.name!r}: its filter chains carry different "
                              "http_connection_manager configs; the sidecar needs one")
    for any_msg in candidates:
        if any_msg.type_url == HCM_TYPE_URL:
            hcm = hcm_pb2.HttpConnectionManager()
            any_msg.Unpack(hcm)
            return hcm
    raise ConfigError(f"listener {listener.name!r}: no http_connection_manager filter")


def _route(route: route_components_pb2.Route, where: str) -> Route:
    match = route.match
    spec = match.WhichOneof("path_specifier")
    if spec == "prefix":
        path = PathMatch(prefix=match.prefix)
    elif spec == "path":
        path = PathMatch(exact=match.path)
    elif spec == "safe_regex":
        path = PathMatch(regex=_regex(match.safe_regex.regex, f"{where}.match.safe_regex"))
    elif spec is None:
        path = PathMatch(prefix="")
    else:
        raise ConfigError(f"{where}.match: path specifier {spec!r} is not supported")
    headers = tuple(_header_match(h, f"{where}.match.headers[{i}]")
                    for i, h in enumerate(match.headers))

    if route.WhichOneof("action") != "route":
        raise ConfigError(f"{where}: only 'route' actions are supported")
    action = route.route
    which = action.WhichOneof("cluster_specifier")
    if which == "cluster":
        clusters: tuple[WeightedCluster, ...] = (WeightedCluster(action.cluster, 1),)
    elif which == "weighted_clusters":
        clusters = tuple(WeightedCluster(c.name, c.weight.value)
                         for c in action.weighted_clusters.clusters)
        if not clusters or sum(c.weight for c in clusters) <= 0:
            raise ConfigError(f"{where}.route.weighted_clusters: total weight must be > 0")
    else:
        raise ConfigError(f"{where}.route: needs cluster or weighted_clusters")
    timeout = None
    if action.HasField("timeout"):
        seconds = action.timeout.ToTimedelta().total_seconds()
        timeout = seconds if seconds > 0 else None  # Envoy: 0 disables the route timeout
    retry = _retry(action.retry_policy, f"{where}.route.retry_policy") \
        if action.HasField("retry_policy") else None
    hash_header = None
    for policy in action.hash_policy:
        if policy.HasField("header"):
            hash_header = policy.header.header_name.lower()
            break
    fault = None
    if FAULT_FILTER in route.typed_per_filter_config:
        fault = _fault(route.typed_per_filter_config[FAULT_FILTER],
                       f"{where}.typed_per_filter_config[{FAULT_FILTER}]")
    return Route(name=route.name or where, path=path, headers=headers, clusters=clusters,
                 timeout=timeout, retry=retry, fault=fault, hash_header=hash_header)


def _retry(policy: route_components_pb2.RetryPolicy, where: str) -> RetryPolicy | None:
    codes = set()
    for token in filter(None, (t.strip() for t in policy.retry_on.split(","))):
        code = _GRPC_RETRY_ON.get(token)
        if code is None:
            continue  # HTTP-level conditions (5xx, reset, ...) have no meaning for our hop
        codes.add(code)
    attempts = (policy.num_retries.value if policy.HasField("num_retries") else 1) + 1
    if not codes or attempts < 2:
        return None
    base = _seconds(policy.retry_back_off.base_interval) or 0.025  # Envoy's default
    maximum = _seconds(policy.retry_back_off.max_interval) or base * 10
    per_try = _seconds(policy.per_try_timeout) or None
    try:
        return RetryPolicy(max_attempts=attempts, retryable_codes=frozenset(codes),
                           initial_backoff=base, max_backoff=max(maximum, base),
                           per_try_timeout=per_try)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _fault(config: any_pb2.Any, where: str) -> FaultPolicy | None:
    fault = fault_pb2.HTTPFault()
    if not config.Unpack(fault):
        raise ConfigError(f"{where}: expected envoy.extensions.filters.http.fault.v3.HTTPFault")
    delay = None
    delay_percent = 100.0
    if fault.HasField("delay") and fault.delay.HasField("fixed_delay"):
        delay = _seconds(fault.delay.fixed_delay)
        delay_percent = _percent(fault.delay.percentage)
    abort_code = None
    abort_percent = 100.0
    if fault.HasField("abort"):
        if fault.abort.WhichOneof("error_type") != "grpc_status":
            raise ConfigError(f"{where}.abort: only grpc_status aborts are supported")
        abort_code = _STATUS_BY_NUMBER.get(fault.abort.grpc_status)
        if abort_code is None or abort_code is grpc.StatusCode.OK:
            raise ConfigError(f"{where}.abort.grpc_status: {fault.abort.grpc_status} is not an "
                              "error status")
        abort_percent = _percent(fault.abort.percentage)
    if delay is None and abort_code is None:
        return None
    return FaultPolicy(delay=delay, delay_percent=delay_percent, abort_code=abort_code,
                       abort_percent=abort_percent)


def _seconds(duration: Any) -> float:
    return float(duration.seconds + duration.nanos / 1e9)


def _percent(fraction: percent_pb2.FractionalPercent) -> float:
    denominator = {percent_pb2.FractionalPercent.HUNDRED: 100,
                   percent_pb2.FractionalPercent.TEN_THOUSAND: 10_000,
                   percent_pb2.FractionalPercent.MILLION: 1_000_000}[fraction.denominator]
    return min(100.0, 100.0 * fraction.numerator / denominator)


def _header_match(h: route_components_pb2.HeaderMatcher, where: str) -> HeaderMatch:
    name = h.name.lower()
    which = h.WhichOneof("header_match_specifier")
    if which == "string_match":
        sm = h.string_match
        kind_name = sm.WhichOneof("match_pattern")
        if kind_name == "safe_regex":
            return HeaderMatch(name, HeaderMatchKind.REGEX, sm.safe_regex.regex, h.invert_match,
                               _regex(sm.safe_regex.regex, f"{where}.string_match.safe_regex"))
        kinds = {"exact": HeaderMatchKind.EXACT, "prefix": HeaderMatchKind.PREFIX,
                 "suffix": HeaderMatchKind.SUFFIX, "contains": HeaderMatchKind.CONTAINS}
        if kind_name not in kinds:
            raise ConfigError(f"{where}.string_match: {kind_name!r} is not supported")
        return HeaderMatch(name, kinds[kind_name], getattr(sm, kind_name), h.invert_match)
    if which == "exact_match":
        return HeaderMatch(name, HeaderMatchKind.EXACT, h.exact_match, h.invert_match)
    if which == "prefix_match":
        return HeaderMatch(name, HeaderMatchKind.PREFIX, h.prefix_match, h.invert_match)
    if which == "suffix_match":
        return HeaderMatch(name, HeaderMatchKind.SUFFIX, h.suffix_match, h.invert_match)
    if which == "safe_regex_match":
        return HeaderMatch(name, HeaderMatchKind.REGEX, h.safe_regex_match.regex, h.invert_match,
                           _regex(h.safe_regex_match.regex, f"{where}.safe_regex_match"))
    if which == "present_match":
        # present_match: false means "must be absent"
        return HeaderMatch(name, HeaderMatchKind.PRESENT, "",
                           h.invert_match != (not h.present_match))
    raise ConfigError(f"{where}: header match {which!r} is not supported")


def _regex(pattern: str, where: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"{where}: invalid regex {pattern!r}: {exc}") from None


def _cluster(cluster: cluster_pb2.Cluster,
             load_assignments: Mapping[str, endpoint_pb2.ClusterLoadAssignment]) -> Cluster:
    where = f"cluster {cluster.name!r}"
    if not cluster.name:
        raise ConfigError("cluster: name is required")
    if cluster.lb_policy not in _SUPPORTED_LB:
        policy = cluster_pb2.Cluster.LbPolicy.Name(cluster.lb_policy)
        raise ConfigError(f"{where}.lb_policy: {policy} is not supported")
    if cluster.HasField("load_assignment"):
        cla = cluster.load_assignment
    else:
        service_name = cluster.eds_cluster_config.service_name or cluster.name
        cla = load_assignments.get(service_name, endpoint_pb2.ClusterLoadAssignment())
    endpoints: list[Endpoint] = []
    for li, locality in enumerate(cla.endpoints):
        zone = locality.locality.zone
        for ei, lb_endpoint in enumerate(locality.lb_endpoints):
            if lb_endpoint.health_status in (health_check_pb2.UNHEALTHY,
                                             health_check_pb2.DRAINING):
                continue
            sock = lb_endpoint.endpoint.address.socket_address
            if not sock.address or not sock.port_value:
                raise ConfigError(f"{where}.load_assignment.endpoints[{li}]"
                                  f".lb_endpoints[{ei}]: address and port_value are required")
            host = f"[{sock.address}]" if ":" in sock.address else sock.address
            weight = lb_endpoint.load_balancing_weight.value or 1
            mtls, plaintext = xds_tls.endpoint_transport(lb_endpoint, host)
            endpoints.append(Endpoint(f"{host}:{sock.port_value}", weight, zone, mtls,
                                      plaintext))
    max_requests, max_pending, budget = DEFAULT_MAX_REQUESTS, DEFAULT_MAX_PENDING, None
    for threshold in cluster.circuit_breakers.thresholds:
        if threshold.priority != base_pb2.DEFAULT:
            continue
        if threshold.HasField("max_requests"):
            max_requests = threshold.max_requests.value
        if threshold.HasField("max_pending_requests"):
            max_pending = threshold.max_pending_requests.value
        if threshold.HasField("retry_budget"):
            rb = threshold.retry_budget
            budget = RetryBudgetConfig(
                retry_ratio=(rb.budget_percent.value if rb.HasField("budget_percent")
                             else 20.0) / 100.0,
                min_retries_per_second=float(rb.min_retry_concurrency.value
                                             if rb.HasField("min_retry_concurrency") else 10))
    outlier = _outlier(cluster.outlier_detection, f"{where}.outlier_detection") \
        if cluster.HasField("outlier_detection") else None
    try:
        tls = xds_tls.cluster_tls(cluster)
    except xds_tls.TlsConfigError as exc:
        raise ConfigError(str(exc)) from None
    return Cluster(name=cluster.name, endpoints=tuple(endpoints),
                   lb_policy=_SUPPORTED_LB[cluster.lb_policy], max_requests=max_requests,
                   max_pending=max_pending, outlier=outlier, retry_budget=budget, tls=tls)


def _outlier(od: outlier_detection_pb2.OutlierDetection, where: str) -> OutlierConfig | None:
    def value(field: str, default: int) -> int:
        return int(getattr(od, field).value) if od.HasField(field) else default

    consecutive: int | None = value("consecutive_5xx", 5)
    if value("enforcing_consecutive_5xx", 100) == 0:
        consecutive = None
    failure = None
    if value("enforcing_failure_percentage", 0) > 0:
        failure = FailurePercentage(
            threshold=value("failure_percentage_threshold", 85),
            minimum_hosts=value("failure_percentage_minimum_hosts", 5),
            request_volume=value("failure_percentage_request_volume", 50),
            enforcement_percentage=value("enforcing_failure_percentage", 0))
    if consecutive is None and failure is None:
        return None
    try:
        return OutlierConfig(
            consecutive_errors=consecutive,
            interval=_seconds(od.interval) if od.HasField("interval") else 10.0,
            base_ejection_time=(_seconds(od.base_ejection_time)
                                if od.HasField("base_ejection_time") else 30.0),
            max_ejection_time=(_seconds(od.max_ejection_time)
                               if od.HasField("max_ejection_time") else 300.0),
            max_ejection_percent=value("max_ejection_percent", 10),
            failure_percentage=failure,
            enforcing_consecutive_errors=value("enforcing_consecutive_5xx", 100),
            # as Envoy and gRPC (A50): max_ejection_percent never blocks the first ejection
            eject_at_least_one=True)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
