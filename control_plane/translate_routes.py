"""RDS: route configurations for sidecars (`outbound|S`) and proxyless clients (`D`).

TrafficPolicy route -> xDS Route mapping:
- match.method `/pkg.Svc/*` -> prefix `/pkg.Svc/`; `/pkg.Svc/M` -> path; no method -> in a
  sidecar's flattened table one route per gRPC service of D (prefix `/pkg.Svc/`), for a proxyless
  client (its virtual host is D's alone) prefix "".
- headers exact/prefix/suffix/regex -> HeaderMatcher.string_match (gRFC A63); present ->
  present_match.
- split -> weighted_clusters over `D|SUBSET` clusters (weights of one subset named twice are
  added, zero weights dropped); no split -> cluster D.
- timeout (the route's, else the policy's) -> RouteAction.timeout (sidecar, Envoy) and
  max_stream_duration.max_stream_duration (what gRPC reads, gRFC A31; left out for grpcio
  clients, whose service-config timeouts fire 1-2 s early: grpc/grpc#34547). No timeout ->
  timeout 0s: Envoy's implicit 15 s route timeout would cut long streams.
- retry (the route's, else the policy's) -> retry_policy: retry_on = the codes lower-case with
  dashes ("unavailable,resource-exhausted"), num_retries = maxAttempts - 1, per_try_timeout,
  retry_back_off base/max (gRFC A44; gRPC ignores per_try_timeout). maxAttempts 1 -> no policy
  (gRPC NACKs num_retries 0).
- fault -> typed_per_filter_config["envoy.filters.http.fault"] = HTTPFault (delay: fixed_delay and
  percentage; abort: grpc_status and percentage; gRFC A33). The listeners always carry the fault
  filter, so a route may use it whenever.
- loadBalancer RING_HASH with hashHeader -> hash_policy [header] on every route to D.
"""

from __future__ import annotations

from decimal import Decimal

from envoy.config.route.v3 import route_components_pb2 as rc_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.type.v3 import percent_pb2

from control_plane.policy.schema import (
    STATUS_CODES,
    Fault,
    HeaderMatch,
    PolicySet,
    RetryPolicy,
    Route,
    TrafficPolicy,
    method_prefix,
)
from control_plane.registry.model import RegistryView
from control_plane.translate_common import (
    FAULT_FILTER,
    destinations,
    duration,
    grpc_services_of,
    outbound_name,
    pack,
    subset_cluster,
)


def sidecar_route_config(service: str, view: RegistryView, policies: PolicySet
                         ) -> route_pb2.RouteConfiguration:
    """`outbound|S`: a virtual host per destination; the sidecar flattens them in order."""
    traffic = policies.traffic_policies()
    config = route_pb2.RouteConfiguration(name=outbound_name(service))
    for dest in destinations(view, traffic):
        policy = traffic.get(dest)
        services = grpc_services_of(view, dest)
        vhost = config.virtual_hosts.add(name=dest, domains=[dest])
        for route in policy.routes if policy is not None else ():
            for kind, value, suffix in _sidecar_matches(route.match.method, services):
                _add_route(vhost, dest, policy, route, kind, value, suffix)
        for grpc_service in services:
            _add_route(vhost, dest, policy, None, "prefix", f"/{grpc_service}/",
                       f"/{grpc_service}")
    return config


def proxyless_route_config(name: str, service: str, view: RegistryView, policies: PolicySet,
                           stream_timeouts: bool = True) -> route_pb2.RouteConfiguration:
    """Route config `name` for a client dialing xds:///name (name is D or D:PORT).

    stream_timeouts=False leaves max_stream_duration out (for grpcio, see translate.NodeInfo).
    """
    policy = policies.traffic_policy_for(service)
    config = route_pb2.RouteConfiguration(name=name)
    domains = [name] if name == service else [name, service]
    vhost = config.virtual_hosts.add(name=service, domains=domains)
    for route in policy.routes if policy is not None else ():
        if route.match.method:
            target, is_prefix = method_prefix(route.match.method)
            _add_route(vhost, service, policy, route, "prefix" if is_prefix else "path",
                       target, "", stream_timeouts)
        else:
            _add_route(vhost, service, policy, route, "prefix", "", "", stream_timeouts)
    _add_route(vhost, service, policy, None, "prefix", "", "", stream_timeouts)
    return config


def _sidecar_matches(method: str, services: tuple[str, ...]) -> list[tuple[str, str, str]]:
    """(path specifier, value, name suffix) restricting a route to D's own gRPC services, so a
    flattened table never sends another service's calls to D."""
    if not method:
        return [("prefix", f"/{s}/", f"/{s}") for s in services]
    target, is_prefix = method_prefix(method)
    grpc_service = target.strip("/").split("/", 1)[0]
    if grpc_service not in services:
        return []
    return [("prefix" if is_prefix else "path", target, "")]


def _add_route(vhost: rc_pb2.VirtualHost, service: str, policy: TrafficPolicy | None,
               route: Route | None, kind: str, value: str, suffix: str,
               stream_timeouts: bool = True) -> None:
    label = route.name if route is not None else "(default)"
    out = vhost.routes.add(name=f"{service}/{label}{suffix}")
    setattr(out.match, kind, value)
    if route is not None:
        out.match.headers.extend(_header(h) for h in route.match.headers)
    _action(out.route, service, policy, route, stream_timeouts)
    if route is not None and route.fault is not None and _has_fault(route.fault):
        out.typed_per_filter_config[FAULT_FILTER].CopyFrom(pack(_fault(route.fault)))


def _header(h: HeaderMatch) -> rc_pb2.HeaderMatcher:
    out = rc_pb2.HeaderMatcher(name=h.name)
    if h.present is not None:
        out.present_match = h.present
    elif h.exact is not None:
        out.string_match.exact = h.exact
    elif h.prefix is not None:
        out.string_match.prefix = h.prefix
    elif h.suffix is not None:
        out.string_match.suffix = h.suffix
    elif h.regex is not None:
        out.string_match.safe_regex.regex = h.regex
    else:  # validation never lets this through; "present" is the harmless reading
        out.present_match = True
    return out


def _action(action: rc_pb2.RouteAction, service: str, policy: TrafficPolicy | None,
            route: Route | None, stream_timeouts: bool) -> None:
    weights = _weights(service, policy, route)
    if len(weights) == 1:
        action.cluster = next(iter(weights))
    else:
        for name, weight in weights.items():
            action.weighted_clusters.clusters.add(name=name).weight.value = weight

    timeout = route.timeout if route is not None and route.timeout is not None else (
        policy.timeout if policy is not None else None)
    if timeout is not None and timeout > 0:
        action.timeout.CopyFrom(duration(timeout))
        if stream_timeouts:
            action.max_stream_duration.max_stream_duration.CopyFrom(duration(timeout))
    else:
        action.timeout.CopyFrom(duration(0))

    retry = route.retry if route is not None and route.retry is not None else (
        policy.retry if policy is not None else None)
    if retry is not None and retry.max_attempts > 1:
        _retry(action.retry_policy, retry)

    if (policy is not None and policy.load_balancer.algorithm == "RING_HASH"
            and policy.load_balancer.hash_header):
        action.hash_policy.add().header.header_name = policy.load_balancer.hash_header


def _weights(service: str, policy: TrafficPolicy | None, route: Route | None) -> dict[str, int]:
    """Cluster -> weight, in split order. A subset the policy does not define (validation
    rejects that) stands for the whole service rather than a cluster nobody defines."""
    weights: dict[str, int] = {}
    for entry in route.split if route is not None else ():
        if entry.weight <= 0:
            continue
        defined = policy is not None and policy.subset(entry.subset) is not None
        name = subset_cluster(service, entry.subset) if defined else service
        weights[name] = min(weights.get(name, 0) + entry.weight, 2**32 - 1)
    total = sum(weights.values())
    if not weights or total >= 2**32:
        return {service: 1}
    return weights


def _retry(out: rc_pb2.RetryPolicy, retry: RetryPolicy) -> None:
    out.retry_on = ",".join(code.lower().replace("_", "-") for code in retry.retry_on)
    out.num_retries.value = min(retry.max_attempts - 1, 2**32 - 1)
    if retry.per_try_timeout is not None and retry.per_try_timeout > 0:
        out.per_try_timeout.CopyFrom(duration(retry.per_try_timeout))
    base = retry.backoff.base_interval
    if base > 0:
        out.retry_back_off.base_interval.CopyFrom(duration(base))
        out.retry_back_off.max_interval.CopyFrom(
            duration(max(retry.backoff.max_interval, base)))


def _has_fault(fault: Fault) -> bool:
    return (fault.delay is not None and fault.delay.fixed_delay > 0) or fault.abort is not None


def _fault(fault: Fault) -> fault_pb2.HTTPFault:
    out = fault_pb2.HTTPFault()
    if fault.delay is not None and fault.delay.fixed_delay > 0:  # Envoy: fixed_delay > 0
        out.delay.fixed_delay.CopyFrom(duration(fault.delay.fixed_delay))
        out.delay.percentage.CopyFrom(fractional_percent(fault.delay.percent))
    if fault.abort is not None:
        out.abort.grpc_status = STATUS_CODES.get(fault.abort.code, STATUS_CODES["UNAVAILABLE"])
        out.abort.percentage.CopyFrom(fractional_percent(fault.abort.percent))
    return out


def fractional_percent(percent: float) -> percent_pb2.FractionalPercent:
    """The coarsest exact denominator (10% -> 10/HUNDRED, 0.5% -> 50/TEN_THOUSAND), else
    millionths rounded."""
    value = min(max(Decimal(str(percent)), Decimal(0)), Decimal(100))
    for scale, denominator in ((1, percent_pb2.FractionalPercent.HUNDRED),
                               (100, percent_pb2.FractionalPercent.TEN_THOUSAND)):
        scaled = value * scale
        if scaled == scaled.to_integral_value():
            return percent_pb2.FractionalPercent(numerator=int(scaled),
                                                 denominator=denominator)
    return percent_pb2.FractionalPercent(numerator=round(value * 10000),
                                         denominator=percent_pb2.FractionalPercent.MILLION)
