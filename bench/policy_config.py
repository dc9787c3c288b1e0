"""Static configs for the `pair_policies` path: the sidecar pair with every policy stage on.

Issue 4's target compares the full policy chain with a bare hop, so the two sidecars get the
config a real TrafficPolicy and RateLimitPolicy would give them, written as Envoy
static_resources (`--config FILE`, the shape the control plane sends over xDS):

- sidecar A's outbound listener: a header route (x-bench-canary: yes, which the load never
  sends, so every call evaluates the header matcher and falls through) and the default route,
  both with a retry policy (retry_on unavailable, 2 retries, backoff 25-250 ms); cluster
  `bench-b` (B's inbound) with circuit-breaker thresholds far above the load, a retry budget
  and outlier detection (5 consecutive errors).
- sidecar B's inbound listener: a local rate limit (one token bucket far above the load) on the
  HttpConnectionManager, routing to `inbound|app`, the cluster B defines itself from `--app`.

Nothing is expected to retry, trip, eject or be limited: what is measured is what the stages cost
when they are on and quiet. `check_compiled` proves, with the sidecar's own compiler, that
the files do turn every stage on, so the figure cannot silently measure a bare hop.
"""

from __future__ import annotations

from typing import Any

HCM_TYPE = ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
            "HttpConnectionManager")
LOCAL_RATE_LIMIT_TYPE = ("type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3."
                         "LocalRateLimit")
ROUTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
CANARY_HEADER = "x-bench-canary"
MAIN_CLUSTER = "bench-b"
CANARY_CLUSTER = "bench-b-canary"
INBOUND_APP_CLUSTER = "inbound|app"  # sidecar.static_config.INBOUND_APP_CLUSTER

# Far above anything the benchmark sends (at most a few thousand calls/s).
BREAKER_MAX_REQUESTS = 100_000
BREAKER_MAX_PENDING = 100_000
RATE_LIMIT_PER_SECOND = 100_000
RATE_LIMIT_BURST = 100_000


def _address(host_port: str) -> dict[str, Any]:
    host, _, port = host_port.rpartition(":")
    return {"socket_address": {"address": host.strip("[]"), "port_value": int(port)}}


def _listener(name: str, direction: str, virtual_host_routes: list[dict[str, Any]],
              http_filters: list[dict[str, Any]]) -> dict[str, Any]:
    hcm = {"@type": HCM_TYPE, "stat_prefix": name,
           "route_config": {"name": name, "virtual_hosts": [
               {"name": name, "domains": ["*"], "routes": virtual_host_routes}]},
           "http_filters": [*http_filters,
                            {"name": "envoy.filters.http.router",
                             "typed_config": {"@type": ROUTER_TYPE}}]}
    return {"name": name, "traffic_direction": direction,
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                            "typed_config": hcm}]}]}


def _retry_policy() -> dict[str, Any]:
    return {"retry_on": "unavailable", "num_retries": 2,
            "retry_back_off": {"base_interval": "0.025s", "max_interval": "0.250s"}}


def _cluster(name: str, endpoint: str) -> dict[str, Any]:
    return {
        "name": name, "type": "STATIC", "lb_policy": "ROUND_ROBIN",
        "load_assignment": {"cluster_name": name, "endpoints": [
            {"lb_endpoints": [{"endpoint": {"address": _address(endpoint)}}]}]},
        "circuit_breakers": {"thresholds": [{
            "priority": "DEFAULT", "max_requests": BREAKER_MAX_REQUESTS,
            "max_pending_requests": BREAKER_MAX_PENDING,
            "retry_budget": {"budget_percent": {"value": 20.0}, "min_retry_concurrency": 10}}]},
        "outlier_detection": {"consecutive_5xx": 5, "interval": "1s",
                              "base_ejection_time": "30s", "max_ejection_percent": 50},
    }


def outbound_config(service: str, upstream: str, grpc_service: str) -> dict[str, Any]:
    """Sidecar A: calls for `grpc_service` go to `upstream` (B's inbound) through every
    outbound stage."""
    prefix = f"/{grpc_service}/"
    routes = [
        {"name": "canary-by-header",
         "match": {"prefix": prefix,
                   "headers": [{"name": CANARY_HEADER, "string_match": {"exact": "yes"}}]},
         "route": {"cluster": CANARY_CLUSTER, "retry_policy": _retry_policy()}},
        {"name": "default",
         "match": {"prefix": prefix},
         "route": {"cluster": MAIN_CLUSTER, "retry_policy": _retry_policy()}},
    ]
    name = f"outbound|{service}"
    return {"static_resources": {
        "listeners": [_listener(name, "OUTBOUND", routes, [])],
        "clusters": [_cluster(MAIN_CLUSTER, upstream), _cluster(CANARY_CLUSTER, upstream)]}}


def inbound_config(service: str) -> dict[str, Any]:
    """Sidecar B: its inbound listener with a local rate limit, routing to its own app."""
    name = f"inbound|{service}"
    rate_limit = {
        "name": "envoy.filters.http.local_ratelimit",
        "typed_config": {
            "@type": LOCAL_RATE_LIMIT_TYPE, "stat_prefix": f"{name}.ratelimit",
            "token_bucket": {"max_tokens": RATE_LIMIT_BURST,
                             "tokens_per_fill": RATE_LIMIT_PER_SECOND, "fill_interval": "1s"},
            "filter_enabled": {"default_value": {"numerator": 100, "denominator": "HUNDRED"}},
            "filter_enforced": {"default_value": {"numerator": 100, "denominator": "HUNDRED"}},
            "always_consume_default_token_bucket": False,
            "rate_limited_as_resource_exhausted": True}}
    routes = [{"name": "app", "match": {"prefix": ""},
               "route": {"cluster": INBOUND_APP_CLUSTER, "timeout": "0s"}}]
    return {"static_resources": {"listeners": [_listener(name, "INBOUND", routes,
                                                          [rate_limit])]}}


def check_compiled(outbound_file: str, inbound_file: str, inbound_service: str,
                   app: str) -> None:
    """Compile both files as the sidecars will and fail unless every stage is on."""
    from sidecar import static_config, xds_types
    from sidecar.xds_translate import compile_snapshot

    assert xds_types.LOADED  # registers the types inside the files' Anys, as the sidecar does

    def compiled(path: str, flags: static_config.XdsResources) -> Any:
        res = static_config.merge(static_config.load_file(path), flags)
        return compile_snapshot("check", res.listeners, res.route_configs, res.clusters,
                                res.load_assignments)

    a = compiled(outbound_file, static_config.XdsResources())
    routes = a.outbound.routes
    problems = []
    if len(routes) != 2 or not routes[0].headers:
        problems.append("A: expected a header route then the default route")
    if any(r.retry is None for r in routes):
        problems.append("A: a route has no retry policy")
    main = a.clusters.get(MAIN_CLUSTER)
    if main is None or main.outlier is None or main.retry_budget is None \
            or main.max_requests != BREAKER_MAX_REQUESTS:
        problems.append(f"A: cluster {MAIN_CLUSTER} lacks outlier detection, retry budget or "
                        "breaker thresholds")
    b = compiled(inbound_file, static_config.from_flags(inbound_service, app, {}, {}))
    if b.inbound_rate_limit is None:
        problems.append("B: no inbound rate limit")
    if [c.name for r in b.inbound.routes for c in r.clusters] != [INBOUND_APP_CLUSTER]:
        problems.append(f"B: inbound does not route to {INBOUND_APP_CLUSTER}")
    if problems:
        raise RuntimeError("pair_policies config does not turn every policy on: "
                           + "; ".join(problems))
