"""Each policy feature's mapping to xDS, checked on resources parsed back from their bytes."""

from __future__ import annotations

import dataclasses

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as rbac_filter_pb2
from envoy.extensions.load_balancing_policies.least_request.v3 import least_request_pb2
from envoy.extensions.load_balancing_policies.round_robin.v3 import round_robin_pb2
from envoy.extensions.load_balancing_policies.wrr_locality.v3 import wrr_locality_pb2
from envoy.type.v3 import percent_pb2

from control_plane.policy import schema as s
from control_plane.registry.model import RegistryView
from control_plane.translate import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    LISTENER_TYPE,
    ROUTE_TYPE,
    NodeInfo,
    snapshot,
    translate,
)
from sidecar.router import Router
from sidecar.static_config import static_cluster
from sidecar.xds_translate import compile_snapshot
from tests.unit.test_translate_support import (
    PROXYLESS,
    SIDECAR,
    all_types,
    hcm_of,
    inst,
    parsed_back,
    policies,
    shop_view,
    unpack_any,
)

V1 = s.Subset("v1", (("version", "v1"),))
V2 = s.Subset("v2", (("version", "v2"),))
CANARY = s.Route("canary", s.RouteMatch("/shop.Orders/*",
                                        (s.HeaderMatch("x-canary", exact="true"),)),
                 split=(s.WeightedSubset("v2", 100),))
SPLIT = s.Route("default", split=(s.WeightedSubset("v1", 90), s.WeightedSubset("v2", 10)))


def orders_policy(**changes) -> s.TrafficPolicy:
    base = s.TrafficPolicy(service="orders", subsets=(V1, V2), routes=(CANARY, SPLIT))
    return dataclasses.replace(base, **changes)


def outbound_vhost(pol: s.PolicySet, service: str = "orders", view: RegistryView | None = None):
    routes = parsed_back(translate(view or shop_view(), pol, SIDECAR, ROUTE_TYPE), ROUTE_TYPE)
    [vhost] = [v for v in routes["outbound|cart"].virtual_hosts if v.name == service]
    return vhost


def proxyless_vhost(pol: s.PolicySet, node: NodeInfo = PROXYLESS):
    routes = parsed_back(translate(shop_view(), pol, node, ROUTE_TYPE, ["orders"]), ROUTE_TYPE)
    [vhost] = routes["orders"].virtual_hosts
    return vhost


def cluster(pol: s.PolicySet, name: str = "orders") -> cluster_pb2.Cluster:
    return parsed_back(translate(shop_view(), pol, SIDECAR, CLUSTER_TYPE), CLUSTER_TYPE)[name]


def inbound_filters(pol: s.PolicySet, service: str = "cart"):
    node = NodeInfo(f"{service}~1", sidecar=True, service=service)
    listeners = parsed_back(translate(shop_view(), pol, node, LISTENER_TYPE), LISTENER_TYPE)
    return list(hcm_of(listeners[f"inbound|{service}"]).http_filters)


# --- routes -----------------------------------------------------------------------------------


def test_routes_in_order_then_defaults_restricted_to_the_services_grpc_services():
    vhost = outbound_vhost(policies(orders_policy()))
    got = [(r.name, r.match.WhichOneof("path_specifier"), r.match.prefix,
            r.route.WhichOneof("cluster_specifier")) for r in vhost.routes]
    assert got == [
        ("orders/canary", "prefix", "/shop.Orders/", "cluster"),
        ("orders/default/shop.Orders", "prefix", "/shop.Orders/", "weighted_clusters"),
        ("orders/(default)/shop.Orders", "prefix", "/shop.Orders/", "cluster"),
    ]
    canary, split, default = vhost.routes
    assert canary.route.cluster == "orders|v2"
    assert [(c.name, c.weight.value) for c in split.route.weighted_clusters.clusters] == [
        ("orders|v1", 90), ("orders|v2", 10)]
    assert default.route.cluster == "orders"


def test_exact_method_becomes_a_path_and_foreign_methods_are_dropped_in_the_sidecar():
    routes = (s.Route("get", s.RouteMatch("/shop.Orders/Get"), split=(s.WeightedSubset("v1", 1),)),
              s.Route("steal", s.RouteMatch("/shop.Cart/*"), split=(s.WeightedSubset("v2", 1),)))
    vhost = outbound_vhost(policies(orders_policy(routes=routes)))
    assert [(r.name, r.match.WhichOneof("path_specifier")) for r in vhost.routes] == [
        ("orders/get", "path"), ("orders/(default)/shop.Orders", "prefix")]
    assert vhost.routes[0].match.path == "/shop.Orders/Get"
    # a proxyless client's virtual host is the service's own: no restriction needed
    proxyless = proxyless_vhost(policies(orders_policy(routes=routes)))
    assert [(r.match.WhichOneof("path_specifier"), r.match.path or r.match.prefix)
            for r in proxyless.routes] == [("path", "/shop.Orders/Get"),
                                           ("prefix", "/shop.Cart/"), ("prefix", "")]


def test_a_route_without_method_covers_each_grpc_service_of_the_destination():
    view = RegistryView((inst("orders", "o-1", 7001, "v1", grpc=("shop.Orders", "shop.Admin")),))
    vhost = outbound_vhost(policies(orders_policy(routes=(SPLIT,))), view=view)
    assert [(r.name, r.match.prefix) for r in vhost.routes] == [
        ("orders/default/shop.Admin", "/shop.Admin/"),
        ("orders/default/shop.Orders", "/shop.Orders/"),
        ("orders/(default)/shop.Admin", "/shop.Admin/"),
        ("orders/(default)/shop.Orders", "/shop.Orders/")]


def test_header_matchers():
    headers = (s.HeaderMatch("x-a", exact="1"), s.HeaderMatch("x-b", prefix="pre"),
               s.HeaderMatch("x-c", suffix="suf"), s.HeaderMatch("x-d", regex="v[0-9]+"),
               s.HeaderMatch("x-e", present=True), s.HeaderMatch("x-f", present=False))
    route = s.Route("h", s.RouteMatch("/shop.Orders/*", headers))
    vhost = outbound_vhost(policies(orders_policy(routes=(route,))))
    got = [(h.name, h.WhichOneof("header_match_specifier"),
            h.string_match.WhichOneof("match_pattern") if h.HasField("string_match") else None)
           for h in vhost.routes[0].match.headers]
    assert got == [("x-a", "string_match", "exact"), ("x-b", "string_match", "prefix"),
                   ("x-c", "string_match", "suffix"), ("x-d", "string_match", "safe_regex"),
                   ("x-e", "present_match", None), ("x-f", "present_match", None)]
    m = vhost.routes[0].match.headers
    assert (m[0].string_match.exact, m[1].string_match.prefix, m[2].string_match.suffix,
            m[3].string_match.safe_regex.regex) == ("1", "pre", "suf", "v[0-9]+")
    assert m[4].present_match is True and m[5].present_match is False
    assert not any(h.invert_match for h in m)


def test_split_weights_merge_drop_zero_and_fall_back_to_the_service():
    odd = s.Route("odd", split=(s.WeightedSubset("v1", 3), s.WeightedSubset("v1", 2),
                                s.WeightedSubset("v2", 0)))
    zero = s.Route("zero", s.RouteMatch("/shop.Orders/Z"), split=(s.WeightedSubset("v2", 0),))
    undefined = s.Route("undef", s.RouteMatch("/shop.Orders/U"),
                        split=(s.WeightedSubset("v9", 5), s.WeightedSubset("v2", 5)))
    vhost = outbound_vhost(policies(orders_policy(routes=(zero, undefined, odd))))
    by_name = {r.name: r.route for r in vhost.routes}
    assert by_name["orders/zero"].cluster == "orders"
    assert [(c.name, c.weight.value)
            for c in by_name["orders/undef"].weighted_clusters.clusters] == [
        ("orders", 5), ("orders|v2", 5)]
    assert by_name["orders/odd/shop.Orders"].cluster == "orders|v1"


def test_timeout_from_route_else_policy_on_both_fields():
    routes = (CANARY, dataclasses.replace(SPLIT, timeout=0.25))
    vhost = outbound_vhost(policies(orders_policy(timeout=2.0, routes=routes)))
    timeouts = [(r.route.timeout.ToTimedelta().total_seconds(),
                 r.route.max_stream_duration.max_stream_duration.ToTimedelta().total_seconds())
                for r in vhost.routes]
    assert timeouts == [(2.0, 2.0), (0.25, 0.25), (2.0, 2.0)]


def test_grpcio_clients_get_no_max_stream_duration():
    pol = policies(orders_policy(timeout=1.0))
    for route in proxyless_vhost(pol).routes:
        assert route.route.max_stream_duration.max_stream_duration.seconds == 1
    for route in proxyless_vhost(pol, NodeInfo("py", grpcio=True)).routes:
        assert not route.route.HasField("max_stream_duration")
        assert route.route.timeout.seconds == 1


def test_retry_policy_mapping():
    retry = s.RetryPolicy(max_attempts=3, retry_on=("UNAVAILABLE", "RESOURCE_EXHAUSTED",
                                                    "DEADLINE_EXCEEDED"),
                          per_try_timeout=0.5,
                          backoff=s.RetryBackoff(base_interval=0.025, max_interval=0.25))
    route_retry = s.RetryPolicy(max_attempts=5, retry_on=("CANCELLED",))
    no_retry = s.RetryPolicy(max_attempts=1)
    routes = (dataclasses.replace(CANARY, retry=route_retry),
              dataclasses.replace(SPLIT, retry=no_retry))
    vhost = outbound_vhost(policies(orders_policy(retry=retry, routes=routes)))
    canary, split, default = vhost.routes
    assert canary.route.retry_policy.retry_on == "cancelled"
    assert canary.route.retry_policy.num_retries.value == 4
    assert not split.route.HasField("retry_policy")  # gRPC NACKs num_retries 0
    rp = default.route.retry_policy
    assert rp.retry_on == "unavailable,resource-exhausted,deadline-exceeded"
    assert rp.num_retries.value == 2
    assert rp.per_try_timeout.ToTimedelta().total_seconds() == 0.5
    assert rp.retry_back_off.base_interval.ToTimedelta().total_seconds() == 0.025
    assert rp.retry_back_off.max_interval.ToTimedelta().total_seconds() == 0.25


def test_fault_per_route_and_the_filter_is_always_on_the_listeners():
    fault = s.Fault(delay=s.FaultDelay(fixed_delay=0.1, percent=10),
                    abort=s.FaultAbort(code="UNAVAILABLE", percent=0.5))
    routes = (dataclasses.replace(SPLIT, fault=fault),)
    pol = policies(orders_policy(routes=routes))
    for vhost in (outbound_vhost(pol), proxyless_vhost(pol)):
        faulty, plain = vhost.routes[0], vhost.routes[-1]
        assert list(plain.typed_per_filter_config) == []
        config = unpack_any(faulty.typed_per_filter_config["envoy.filters.http.fault"])
        assert isinstance(config, fault_pb2.HTTPFault)
        assert config.delay.fixed_delay.ToTimedelta().total_seconds() == 0.1
        assert (config.delay.percentage.numerator, config.delay.percentage.denominator) == (
            10, percent_pb2.FractionalPercent.HUNDRED)
        assert config.abort.grpc_status == 14
        assert (config.abort.percentage.numerator, config.abort.percentage.denominator) == (
            50, percent_pb2.FractionalPercent.TEN_THOUSAND)
        assert not config.abort.HasField("http_status") and config.abort.http_status == 0
    only_abort = s.Fault(abort=s.FaultAbort(code="PERMISSION_DENIED"))
    vhost = outbound_vhost(policies(orders_policy(routes=(dataclasses.replace(
        SPLIT, fault=only_abort),))))
    config = unpack_any(vhost.routes[0].typed_per_filter_config["envoy.filters.http.fault"])
    assert not config.HasField("delay") and config.abort.grpc_status == 7
    assert config.abort.percentage.numerator == 100
    # Envoy rejects a zero fixed_delay: no delay at all, and no fault if nothing is left
    zero = s.Fault(delay=s.FaultDelay(fixed_delay=0.0, percent=50))
    vhost = outbound_vhost(policies(orders_policy(routes=(dataclasses.replace(
        SPLIT, fault=zero),))))
    assert not any(r.typed_per_filter_config for r in vhost.routes)


def test_ring_hash_cluster_and_hash_policy_on_every_route_to_the_service():
    lb = s.LoadBalancer(algorithm="RING_HASH", hash_header="x-user-id")
    pol = policies(orders_policy(load_balancer=lb))
    for name in ("orders", "orders|v1", "orders|v2"):
        c = cluster(pol, name)
        assert c.lb_policy == cluster_pb2.Cluster.RING_HASH
        assert c.ring_hash_lb_config.hash_function == cluster_pb2.Cluster.RingHashLbConfig.XX_HASH
        assert not c.HasField("load_balancing_policy")
    for vhost in (outbound_vhost(pol), proxyless_vhost(pol)):
        for route in vhost.routes:
            [hp] = route.route.hash_policy
            assert hp.header.header_name == "x-user-id"
    assert not any(r.route.hash_policy for r in outbound_vhost(pol, "cart").routes)


def test_least_request_keeps_a_round_robin_fallback_for_grpcio():
    c = cluster(policies(orders_policy(load_balancer=s.LoadBalancer("LEAST_REQUEST"))))
    assert c.lb_policy == cluster_pb2.Cluster.LEAST_REQUEST
    first, fallback = c.load_balancing_policy.policies
    assert isinstance(unpack_any(first.typed_extension_config.typed_config),
                      least_request_pb2.LeastRequest)
    wrr = unpack_any(fallback.typed_extension_config.typed_config)
    assert isinstance(wrr, wrr_locality_pb2.WrrLocality)
    [rr] = wrr.endpoint_picking_policy.policies
    assert isinstance(unpack_any(rr.typed_extension_config.typed_config),
                      round_robin_pb2.RoundRobin)


def test_circuit_breaker_and_retry_budget():
    pol = policies(orders_policy(
        circuit_breaker=s.CircuitBreaker(max_requests=100, max_pending_requests=10),
        retry=s.RetryPolicy(budget=s.RetryBudget(retry_ratio=0.2,
                                                 min_retries_per_second=2.5))))
    for name in ("orders", "orders|v2"):
        [threshold] = cluster(pol, name).circuit_breakers.thresholds
        assert threshold.priority == base_pb2.DEFAULT
        assert threshold.max_requests.value == 100
        assert threshold.max_pending_requests.value == 10
        assert threshold.retry_budget.budget_percent.value == pytest.approx(20.0)
        assert threshold.retry_budget.min_retry_concurrency.value == 3
    only_breaker = cluster(policies(orders_policy(circuit_breaker=s.CircuitBreaker())))
    [threshold] = only_breaker.circuit_breakers.thresholds
    assert threshold.max_requests.value == 1024 and not threshold.HasField("retry_budget")
    assert not cluster(policies(orders_policy())).HasField("circuit_breakers")


def test_outlier_detection_mapping():
    od = s.OutlierDetection(consecutive_errors=7, interval=5, base_ejection_time=15,
                            max_ejection_percent=40,
                            failure_percentage=s.FailurePercentage(threshold=80, minimum_hosts=3,
                                                                   request_volume=20))
    out = cluster(policies(orders_policy(outlier_detection=od))).outlier_detection
    assert (out.consecutive_5xx.value, out.enforcing_consecutive_5xx.value) == (7, 100)
    assert out.interval.seconds == 5 and out.base_ejection_time.seconds == 15
    assert out.max_ejection_percent.value == 40
    assert out.HasField("enforcing_success_rate") and out.enforcing_success_rate.value == 0
    assert out.enforcing_failure_percentage.value == 100
    assert (out.failure_percentage_threshold.value, out.failure_percentage_minimum_hosts.value,
            out.failure_percentage_request_volume.value) == (80, 3, 20)
    assert out.enforcing_consecutive_gateway_failure.value == 0
    plain = cluster(policies(orders_policy(
        outlier_detection=s.OutlierDetection(consecutive_errors=0, interval=0,
                                             base_ejection_time=0)))).outlier_detection
    assert not plain.HasField("consecutive_5xx") and plain.enforcing_consecutive_5xx.value == 0
    assert not plain.HasField("interval") and not plain.HasField("base_ejection_time")
    assert not plain.HasField("enforcing_failure_percentage")


# --- subsets and endpoints --------------------------------------------------------------------


def test_subset_clusters_select_instances_by_labels():
    view = RegistryView((
        inst("orders", "o-1", 7001, "v1", "z1", meta=(("track", "stable"),)),
        inst("orders", "o-2", 7002, "v1", "z2", meta=(("track", "canary"),)),
        inst("orders", "o-3", 7003, "v2", "z2"),
        inst("orders", "o-4", 7004, "v2", "z1", healthy=False),
    ))
    subsets = (V1, V2, s.Subset("v1-canary", (("track", "canary"), ("version", "v1"))),
               s.Subset("z1", (("zone", "z1"),)), s.Subset("none", (("version", "v9"),)))
    pol = policies(orders_policy(subsets=subsets, routes=()))
    assignments = parsed_back(translate(view, pol, SIDECAR, ENDPOINT_TYPE), ENDPOINT_TYPE)

    def members(name: str) -> list[str]:
        return [e.endpoint.hostname for loc in assignments[name].endpoints
                for e in loc.lb_endpoints]

    assert list(assignments) == ["orders", "orders|none", "orders|v1", "orders|v1-canary",
                                 "orders|v2", "orders|z1"]
    assert members("orders|v1") == ["o-1", "o-2"]
    assert members("orders|v2") == ["o-3"]
    assert members("orders|v1-canary") == ["o-2"]
    assert members("orders|z1") == ["o-1"]
    assert members("orders|none") == []
    assert members("orders") == ["o-1", "o-2", "o-3"]
    assert list(translate(view, pol, SIDECAR, CLUSTER_TYPE)) == list(assignments)


def test_policy_for_a_service_without_instances_makes_its_clusters_and_listener():
    pol = policies(dataclasses.replace(orders_policy(), service="future"))
    view = shop_view()
    assert {"future", "future|v1", "future|v2"} <= set(translate(view, pol, SIDECAR,
                                                                 CLUSTER_TYPE))
    assert not translate(view, pol, SIDECAR, ENDPOINT_TYPE)["future|v1"].endpoints
    assert list(translate(view, pol, PROXYLESS, LISTENER_TYPE, ["future"])) == ["future"]
    assert not outbound_vhost(pol, "future").routes  # its gRPC services are unknown yet


# --- inbound policy ---------------------------------------------------------------------------


def test_authorization_deny_filter_before_allow_filter():
    authz = s.AuthorizationPolicy("cart", (
        s.AuthorizationRule("ALLOW", (s.Source(service="orders"),
                                      s.Source(spiffe_id="spiffe://other.org/ns/x")),
                            ("/shop.Cart/*", "/shop.Admin/Get")),
        s.AuthorizationRule("DENY", (s.Source(service="evil"),)),
        s.AuthorizationRule("ALLOW", (), ("/grpc.health.v1.Health/Check",)),
    ))
    mesh = s.MeshConfig(trust_domain="corp.example")
    filters = inbound_filters(policies(authz, mesh))
    assert [f.name for f in filters] == ["envoy.filters.http.rbac.deny",
                                         "envoy.filters.http.rbac.allow",
                                         "envoy.filters.http.router"]
    deny, allow = (unpack_any(f.typed_config) for f in filters[:2])
    assert isinstance(deny, rbac_filter_pb2.RBAC)
    assert deny.rules.action == rbac_pb2.RBAC.DENY and allow.rules.action == rbac_pb2.RBAC.ALLOW
    assert list(deny.rules.policies) == ["rules[1]"]
    assert sorted(allow.rules.policies) == ["rules[0]", "rules[2]"]
    evil = deny.rules.policies["rules[1]"]
    assert [p.authenticated.principal_name.exact for p in evil.principals] == [
        "spiffe://corp.example/service/evil"]
    assert [p.any for p in evil.permissions] == [True]
    first = allow.rules.policies["rules[0]"]
    assert [p.authenticated.principal_name.exact for p in first.principals] == [
        "spiffe://corp.example/service/orders", "spiffe://other.org/ns/x"]
    assert [(p.url_path.path.WhichOneof("match_pattern"),
             p.url_path.path.prefix or p.url_path.path.exact) for p in first.permissions] == [
        ("prefix", "/shop.Cart/"), ("exact", "/shop.Admin/Get")]
    health = allow.rules.policies["rules[2]"]
    assert [p.any for p in health.principals] == [True]


def test_deny_only_policy_has_no_allow_filter_and_default_trust_domain():
    authz = s.AuthorizationPolicy("cart", (s.AuthorizationRule("DENY", (s.Source("orders"),),
                                                               ("/shop.Cart/Drop",)),))
    filters = inbound_filters(policies(authz))
    assert [f.name for f in filters] == ["envoy.filters.http.rbac.deny",
                                         "envoy.filters.http.router"]
    deny = unpack_any(filters[0].typed_config)
    [principal] = deny.rules.policies["rules[0]"].principals
    assert principal.authenticated.principal_name.exact == (
        f"spiffe://{s.MeshConfig().trust_domain}/service/orders")


def test_authorization_of_another_service_does_not_reach_this_sidecar():
    authz = s.AuthorizationPolicy("orders", (s.AuthorizationRule("DENY"),))
    assert [f.name for f in inbound_filters(policies(authz))] == ["envoy.filters.http.router"]


def test_rate_limit_mapping():
    limit = s.RateLimitPolicy("cart", tokens_per_second=2.5, burst=10, per_method=True,
                              per_caller=True, overrides=(
                                  s.RateLimitOverride(100, 200, method="/shop.Cart/Get"),
                                  s.RateLimitOverride(1, 1, caller="orders"),
                                  s.RateLimitOverride(5, 5, method="/shop.Cart/*",
                                                      caller="web")))
    authz = s.AuthorizationPolicy("cart", (s.AuthorizationRule("ALLOW"),))
    filters = inbound_filters(policies(limit, authz))
    assert [f.name for f in filters] == ["envoy.filters.http.rbac.allow",
                                         "envoy.filters.http.local_ratelimit",
                                         "envoy.filters.http.router"]
    config = unpack_any(filters[1].typed_config)
    assert isinstance(config, local_rate_limit_pb2.LocalRateLimit)
    assert config.stat_prefix
    bucket = config.token_bucket
    assert (bucket.max_tokens, bucket.tokens_per_fill.value, bucket.fill_interval.seconds) == (
        10, 5, 2)
    for rfp in (config.filter_enabled, config.filter_enforced):
        assert (rfp.default_value.numerator, rfp.default_value.denominator) == (
            100, percent_pb2.FractionalPercent.HUNDRED)
    assert config.rate_limited_as_resource_exhausted
    assert config.HasField("always_consume_default_token_bucket")
    assert not config.always_consume_default_token_bucket.value

    got = [([(e.key, e.value) for e in d.entries], d.token_bucket.max_tokens,
             d.token_bucket.tokens_per_fill.value, d.token_bucket.fill_interval.seconds)
           for d in config.descriptors]
    assert got == [
        ([("method", "/shop.Cart/Get")], 200, 100, 1),
        ([("source_cluster", "orders")], 1, 1, 1),
        ([("method", "/shop.Cart/*"), ("source_cluster", "web")], 5, 5, 1),
        ([("method", ""), ("source_cluster", "")], 10, 5, 2),
    ]
    assert len(config.rate_limits) == len(config.descriptors)
    kinds = [[a.WhichOneof("action_specifier") for a in rl.actions] for rl in config.rate_limits]
    assert kinds == [["header_value_match"], ["source_cluster"],
                     ["header_value_match", "source_cluster"],
                     ["request_headers", "source_cluster"]]
    exact = config.rate_limits[0].actions[0].header_value_match
    assert (exact.descriptor_key, exact.descriptor_value, exact.expect_match.value) == (
        "method", "/shop.Cart/Get", True)
    assert [(h.name, h.string_match.exact) for h in exact.headers] == [(":path",
                                                                         "/shop.Cart/Get")]
    prefix = config.rate_limits[2].actions[0].header_value_match
    assert [(h.name, h.string_match.prefix) for h in prefix.headers] == [(":path", "/shop.Cart/")]
    wildcard = config.rate_limits[3].actions[0].request_headers
    assert (wildcard.header_name, wildcard.descriptor_key) == (":path", "method")


def test_plain_rate_limit_has_only_the_default_bucket():
    limit = s.RateLimitPolicy("cart", tokens_per_second=100, burst=50)
    [rl, router] = inbound_filters(policies(limit))
    assert router.name == "envoy.filters.http.router"
    config = unpack_any(rl.typed_config)
    assert (config.token_bucket.max_tokens, config.token_bucket.tokens_per_fill.value,
            config.token_bucket.fill_interval.seconds) == (50, 100, 1)
    assert not config.descriptors and not config.rate_limits


@pytest.mark.parametrize(("rate", "per_fill", "interval"), [
    (1, 1, 1), (0.5, 1, 2), (0.1, 1, 10), (1000, 1000, 1), (33.3, 333, 10), (0, 1, 3600)])
def test_token_bucket_rates(rate, per_fill, interval):
    limit = s.RateLimitPolicy("cart", tokens_per_second=rate, burst=0)
    [rl, _router] = inbound_filters(policies(limit))
    bucket = unpack_any(rl.typed_config).token_bucket
    assert (bucket.tokens_per_fill.value, bucket.fill_interval.seconds) == (per_fill, interval)
    assert bucket.max_tokens == 1  # Envoy requires at least one


# --- MeshConfig -------------------------------------------------------------------------------


def test_tracing_sampling_on_the_outbound_listener_only():
    pol = policies(s.MeshConfig(sampling_percent=12.5))
    listeners = parsed_back(translate(shop_view(), pol, SIDECAR, LISTENER_TYPE), LISTENER_TYPE)
    assert hcm_of(listeners["outbound|cart"]).tracing.random_sampling.value == 12.5
    assert not hcm_of(listeners["inbound|cart"]).HasField("tracing")
    default = parsed_back(translate(shop_view(), None, SIDECAR, LISTENER_TYPE), LISTENER_TYPE)
    assert hcm_of(default["outbound|cart"]).tracing.random_sampling.value == (
        s.MeshConfig().sampling_percent)


# --- changes and sharing with policies --------------------------------------------------------


def test_a_policy_change_moves_only_the_versions_it_affects():
    base = policies(orders_policy())
    timeout = policies(orders_policy(timeout=3.0))
    breaker = policies(orders_policy(circuit_breaker=s.CircuitBreaker(max_requests=5)))
    before = snapshot(shop_view(), base, SIDECAR).versions
    after_timeout = snapshot(shop_view(), timeout, SIDECAR).versions
    after_breaker = snapshot(shop_view(), breaker, SIDECAR).versions
    assert before[ROUTE_TYPE] != after_timeout[ROUTE_TYPE]
    assert [before[t] == after_timeout[t] for t in (LISTENER_TYPE, CLUSTER_TYPE, ENDPOINT_TYPE)
            ] == [True, True, True]
    assert before[CLUSTER_TYPE] != after_breaker[CLUSTER_TYPE]
    assert before[ROUTE_TYPE] == after_breaker[ROUTE_TYPE]
    authz = policies(orders_policy(), s.AuthorizationPolicy("cart", (s.AuthorizationRule("DENY"),)))
    assert snapshot(shop_view(), authz, SIDECAR).versions[LISTENER_TYPE] != before[LISTENER_TYPE]


# --- what our sidecar's compiler accepts today ------------------------------------------------


def test_sidecar_compiler_follows_a_round_robin_split_policy():
    pol = policies(orders_policy(timeout=2.0))
    res = all_types(shop_view(), pol, SIDECAR)
    snap = compile_snapshot("v1", res[LISTENER_TYPE].values(), res[ROUTE_TYPE],
                            [*res[CLUSTER_TYPE].values(),
                             static_cluster("inbound|app", ["127.0.0.1:9"])],
                            res[ENDPOINT_TYPE])
    router = Router(snap.outbound)
    canary = router.match("/shop.Orders/Get", (("x-canary", "true"),))
    assert [c.name for c in canary.clusters] == ["orders|v2"]
    split = router.match("/shop.Orders/Get", ())
    assert [(c.name, c.weight) for c in split.clusters] == [("orders|v1", 90), ("orders|v2", 10)]
    assert split.timeout == 2.0
    assert [e.address for e in snap.clusters["orders|v2"].endpoints] == ["10.0.0.1:7003"]
