"""Property tests: for any valid registry view and policy set, translation never raises, every
resource parses back, the output is deterministic, and the invariants consumers rely on hold
(references resolve; what gRPC would NACK never appears)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from control_plane.policy import schema as s
from control_plane.registry.model import Instance, RegistryView
from control_plane.translate import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    LISTENER_TYPE,
    ROUTE_TYPE,
    TYPE_URLS,
    NodeInfo,
    serialize,
    translate,
    version_of,
)
from sidecar.static_config import static_cluster
from sidecar.xds_translate import compile_snapshot
from tests.unit.test_translate_support import hcm_of, parsed_back

SERVICES = ("orders", "cart", "pay")
SUBSETS = ("v1", "v2", "canary")
GRPC = ("shop.Orders", "shop.Cart", "pkg.Svc")
METHODS = ("", "/shop.Orders/*", "/shop.Orders/Get", "/shop.Cart/*", "/pkg.Svc/Do")
CODES = ("UNAVAILABLE", "RESOURCE_EXHAUSTED", "CANCELLED", "INTERNAL", "DEADLINE_EXCEEDED")

seconds = st.one_of(st.none(), st.sampled_from([0.001, 0.025, 0.5, 1.0, 2.5, 30.0]))
percent = st.sampled_from([0.0, 0.5, 1.0, 12.5, 33.333, 100.0])

instances = st.builds(
    Instance,
    service=st.sampled_from(SERVICES),
    instance_id=st.sampled_from([f"i{n}" for n in range(6)]),
    address=st.sampled_from(["10.0.0.1", "10.0.0.2", "::1", ""]),
    port=st.sampled_from([0, 7001, 7002, 65535]),
    version=st.sampled_from(["", "v1", "v2"]),
    zone=st.sampled_from(["", "z1", "z2"]),
    grpc_services=st.lists(st.sampled_from(GRPC), max_size=2, unique=True).map(tuple),
    healthy=st.booleans(),
)
views = st.lists(instances, max_size=8).map(lambda xs: RegistryView(tuple(xs)))

header = st.one_of(
    st.builds(s.HeaderMatch, name=st.just("x-a"), exact=st.sampled_from(["", "1"])),
    st.builds(s.HeaderMatch, name=st.just("x-b"), prefix=st.just("p")),
    st.builds(s.HeaderMatch, name=st.just("x-c"), suffix=st.just("s")),
    st.builds(s.HeaderMatch, name=st.just("x-d"), regex=st.just("v[0-9]+")),
    st.builds(s.HeaderMatch, name=st.just("x-e"), present=st.booleans()),
)
retry = st.builds(s.RetryPolicy, max_attempts=st.integers(1, 5),
                  retry_on=st.lists(st.sampled_from(CODES), min_size=1, max_size=3,
                                    unique=True).map(tuple),
                  per_try_timeout=seconds,
                  backoff=st.builds(s.RetryBackoff, base_interval=st.sampled_from([0.01, 0.1]),
                                    max_interval=st.sampled_from([0.01, 1.0])),
                  budget=st.builds(s.RetryBudget, retry_ratio=st.sampled_from([0.0, 0.2, 1.0]),
                                   min_retries_per_second=st.sampled_from([0.0, 2.5, 10.0])))
fault = st.builds(
    s.Fault,
    delay=st.one_of(st.none(), st.builds(s.FaultDelay, fixed_delay=st.sampled_from([0.0, 0.1]),
                                         percent=percent)),
    abort=st.one_of(st.none(), st.builds(s.FaultAbort,
                                         code=st.sampled_from(sorted(set(s.STATUS_CODES)
                                                                     - {"OK"})),
                                         percent=percent)))


@st.composite
def traffic_policies(draw, service: str) -> s.TrafficPolicy:
    names = draw(st.lists(st.sampled_from(SUBSETS), max_size=3, unique=True))
    subsets = tuple(s.Subset(n, tuple(sorted(draw(st.dictionaries(
        st.sampled_from(["version", "zone", "track"]), st.sampled_from(["v1", "v2", "z1"]),
        max_size=2)).items()))) for n in names)
    routes = []
    for i in range(draw(st.integers(0, 3))):
        split = tuple(s.WeightedSubset(n, draw(st.integers(0, 100)))
                      for n in draw(st.lists(st.sampled_from(names), max_size=3, unique=True))
                      ) if names else ()
        if split and sum(w.weight for w in split) == 0:
            split = (s.WeightedSubset(split[0].subset, 1), *split[1:])
        routes.append(s.Route(
            name=f"r{i}",
            match=s.RouteMatch(draw(st.sampled_from(METHODS)),
                               tuple(draw(st.lists(header, max_size=2)))),
            split=split, timeout=draw(seconds), retry=draw(st.one_of(st.none(), retry)),
            fault=draw(st.one_of(st.none(), fault))))
    algorithm = draw(st.sampled_from(s.LB_ALGORITHMS))
    return s.TrafficPolicy(
        service=service,
        load_balancer=s.LoadBalancer(algorithm, "x-user" if algorithm == "RING_HASH" else ""),
        timeout=draw(seconds), retry=draw(st.one_of(st.none(), retry)),
        circuit_breaker=draw(st.one_of(st.none(), st.builds(
            s.CircuitBreaker, max_requests=st.integers(1, 2**32),
            max_pending_requests=st.integers(1, 10)))),
        outlier_detection=draw(st.one_of(st.none(), st.builds(
            s.OutlierDetection, consecutive_errors=st.integers(0, 10),
            interval=st.sampled_from([0.0, 0.1, 10.0]),
            base_ejection_time=st.sampled_from([0.0, 30.0]),
            max_ejection_percent=st.integers(0, 100),
            failure_percentage=st.one_of(st.none(), st.builds(
                s.FailurePercentage, threshold=st.integers(0, 100),
                minimum_hosts=st.integers(0, 5), request_volume=st.integers(0, 100)))))),
        subsets=subsets, routes=tuple(routes))


@st.composite
def policy_sets(draw) -> s.PolicySet:
    resources: list[s.Resource] = []
    for service in draw(st.lists(st.sampled_from(SERVICES), unique=True)):
        resources.append(s.Resource(s.TRAFFIC_POLICY, service, draw(traffic_policies(service))))
    for service in draw(st.lists(st.sampled_from(SERVICES), unique=True)):
        rules = draw(st.lists(st.builds(
            s.AuthorizationRule, action=st.sampled_from(s.AUTHZ_ACTIONS),
            sources=st.lists(st.one_of(
                st.builds(s.Source, service=st.sampled_from(SERVICES)),
                st.builds(s.Source, spiffe_id=st.just("spiffe://x.org/a"))), max_size=2
            ).map(tuple),
            methods=st.lists(st.sampled_from(METHODS[1:]), max_size=2, unique=True).map(tuple)),
            max_size=3))
        resources.append(s.Resource(s.AUTHORIZATION_POLICY, service,
                                    s.AuthorizationPolicy(service, tuple(rules))))
    for service in draw(st.lists(st.sampled_from(SERVICES), unique=True)):
        overrides = tuple(s.RateLimitOverride(
            tokens_per_second=draw(st.sampled_from([0.5, 1.0, 100.0])),
            burst=draw(st.integers(1, 100)), method=m, caller=c)
            for m, c in draw(st.lists(st.tuples(st.sampled_from(METHODS),
                                                st.sampled_from(("", *SERVICES))),
                                      max_size=3, unique=True))
            if m or c)
        resources.append(s.Resource(s.RATE_LIMIT_POLICY, service, s.RateLimitPolicy(
            service, tokens_per_second=draw(st.sampled_from([0.01, 0.5, 2.5, 1e6])),
            burst=draw(st.integers(1, 10**6)), per_method=draw(st.booleans()),
            per_caller=draw(st.booleans()), overrides=overrides)))
    if draw(st.booleans()):
        resources.append(s.Resource(s.MESH_CONFIG, s.MESH_CONFIG_NAME, s.MeshConfig(
            mtls_mode=draw(st.sampled_from(s.MTLS_MODES)),
            trust_domain=draw(st.sampled_from(["pymesh.local", "corp.example"])),
            sampling_percent=draw(percent))))
    return s.PolicySet(tuple(resources))


nodes = st.one_of(
    st.builds(NodeInfo, node_id=st.just("n"), sidecar=st.just(True),
              service=st.sampled_from((*SERVICES, "ghost", ""))),
    st.builds(NodeInfo, node_id=st.just("p"), grpcio=st.booleans()),
)
requested = st.one_of(st.none(), st.lists(st.sampled_from(
    ["orders", "cart", "orders:80", "ghost", "outbound|cart", "inbound|orders", "orders|v1"]),
    max_size=4))

FUZZ = settings(max_examples=120, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ
@given(views, policy_sets(), nodes, requested)
def test_translation_never_raises_and_everything_parses_back(view, pol, node, names):
    for type_url in TYPE_URLS:
        first = translate(view, pol, node, type_url, names)
        parsed_back(first, type_url)
        again = translate(view, pol, node, type_url, names)
        assert {k: serialize(v) for k, v in first.items()} == {
            k: serialize(v) for k, v in again.items()}
        assert version_of(first) == version_of(again)
        if names is not None:
            assert set(first) <= set(names)


@FUZZ
@given(views, policy_sets(), nodes)
def test_references_resolve_and_grpc_constraints_hold(view, pol, node):
    listeners = translate(view, pol, node, LISTENER_TYPE)
    routes = translate(view, pol, node, ROUTE_TYPE)
    clusters = translate(view, pol, node, CLUSTER_TYPE)
    assignments = translate(view, pol, node, ENDPOINT_TYPE)

    for listener in listeners.values():
        hcm = hcm_of(listener)
        names = [f.name for f in hcm.http_filters]
        assert len(set(names)) == len(names) and names[-1] == "envoy.filters.http.router"
        assert all(f.HasField("typed_config") for f in hcm.http_filters)
        if hcm.HasField("rds"):
            assert hcm.rds.route_config_name in routes
            assert hcm.rds.config_source.HasField("ads")

    for config in routes.values():
        domains = [d for v in config.virtual_hosts for d in v.domains]
        assert len(domains) == len(set(domains))
        for vhost in config.virtual_hosts:
            for route in vhost.routes:
                assert route.match.WhichOneof("path_specifier") in ("prefix", "path")
                action = route.route
                if action.HasField("weighted_clusters"):
                    weights = action.weighted_clusters.clusters
                    assert len(weights) >= 2 and all(w.weight.value > 0 for w in weights)
                    assert sum(w.weight.value for w in weights) < 2**32
                    targets = [w.name for w in weights]
                else:
                    targets = [action.cluster]
                assert set(targets) <= set(clusters), (targets, sorted(clusters))
                if action.HasField("retry_policy"):
                    assert action.retry_policy.num_retries.value > 0
                if node.grpcio:
                    assert not action.HasField("max_stream_duration")

    assert set(clusters) == set(assignments)
    for name, cluster in clusters.items():
        assert cluster.eds_cluster_config.service_name == name
    for cla in assignments.values():
        addresses = [(e.endpoint.address.socket_address.address,
                      e.endpoint.address.socket_address.port_value)
                     for loc in cla.endpoints for e in loc.lb_endpoints]
        assert len(addresses) == len(set(addresses))
        assert all(a and 0 < p < 65536 for a, p in addresses)
        assert all(loc.load_balancing_weight.value == len(loc.lb_endpoints) > 0
                   for loc in cla.endpoints)


@FUZZ
@given(views, policy_sets(), st.sampled_from(SERVICES))
def test_our_sidecar_compiles_every_round_robin_snapshot(view, pol, service):
    """While the sidecar knows only ROUND_ROBIN, everything else it must accept already."""
    def round_robin_only(p: s.PolicySet) -> s.PolicySet:
        import dataclasses
        return s.PolicySet(tuple(
            dataclasses.replace(r, spec=dataclasses.replace(r.spec, load_balancer=s.LoadBalancer()))
            if isinstance(r.spec, s.TrafficPolicy) else r for r in p.resources))

    node = NodeInfo(f"{service}~1", sidecar=True, service=service)
    pol = round_robin_only(pol)
    res = {t: translate(view, pol, node, t) for t in TYPE_URLS}
    snap = compile_snapshot("v", res[LISTENER_TYPE].values(), res[ROUTE_TYPE],
                            [*res[CLUSTER_TYPE].values(),
                             static_cluster("inbound|app", ["127.0.0.1:9"])],
                            res[ENDPOINT_TYPE])
    assert snap.outbound.name == f"outbound|{service}"
