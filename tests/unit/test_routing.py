"""Route matching and weighted splits, from xDS resources to the cluster a call goes to."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from envoy.config.route.v3 import route_components_pb2
from google.protobuf import json_format

from sidecar.model import Direction
from sidecar.router import Router
from sidecar.static_config import from_flags, listener, static_cluster
from sidecar.xds_translate import ConfigError, compile_snapshot


def _route(doc: dict) -> route_components_pb2.Route:
    return json_format.ParseDict(doc, route_components_pb2.Route())


def _snapshot(routes: list[dict], clusters=("a", "b", "c")):
    lst = listener("outbound", 2, [_route(r) for r in routes])  # 2 = OUTBOUND
    return compile_snapshot("v1", [lst], {}, [static_cluster(c, ["127.0.0.1:1"])
                                              for c in clusters], {})


def test_service_prefix_routes_and_unknown_service_has_no_route():
    snap = _snapshot([{"match": {"prefix": "/shop.Catalog/"}, "route": {"cluster": "a"}},
                      {"match": {"prefix": "/shop.Cart/"}, "route": {"cluster": "b"}}])
    router = Router(snap.outbound)
    assert router.match("/shop.Catalog/List", ()).clusters[0].name == "a"
    assert router.match("/shop.Cart/Add", ()).clusters[0].name == "b"
    assert router.match("/shop.CatalogX/List", ()) is None
    assert router.match("/other.Svc/M", ()) is None


def test_exact_path_beats_later_prefix_and_order_matters():
    snap = _snapshot([{"match": {"path": "/shop.Catalog/Get"}, "route": {"cluster": "b"}},
                      {"match": {"prefix": "/shop.Catalog/"}, "route": {"cluster": "a"}}])
    router = Router(snap.outbound)
    assert router.match("/shop.Catalog/Get", ()).clusters[0].name == "b"
    assert router.match("/shop.Catalog/List", ()).clusters[0].name == "a"


def test_header_match_routes_canary_and_falls_through():
    snap = _snapshot([
        {"match": {"prefix": "/s.S/", "headers": [
            {"name": "x-canary", "string_match": {"exact": "true"}}]},
         "route": {"cluster": "b"}},
        {"match": {"prefix": "/s.S/", "headers": [
            {"name": "x-user", "safe_regex_match": {"regex": "u[0-9]+"}}]},
         "route": {"cluster": "c"}},
        {"match": {"prefix": "/s.S/"}, "route": {"cluster": "a"}}])
    router = Router(snap.outbound)
    assert router.match("/s.S/M", [("x-canary", "true")]).clusters[0].name == "b"
    assert router.match("/s.S/M", [("x-canary", "false")]).clusters[0].name == "a"
    assert router.match("/s.S/M", [("x-user", "u42")]).clusters[0].name == "c"
    assert router.match("/s.S/M", [("x-user", "u42x")]).clusters[0].name == "a"
    assert router.match("/s.S/M", [("x-other-bin", b"\x00")]).clusters[0].name == "a"


def test_present_and_inverted_header_matches():
    snap = _snapshot([
        {"match": {"prefix": "", "headers": [{"name": "x-debug", "present_match": True}]},
         "route": {"cluster": "b"}},
        {"match": {"prefix": "", "headers": [
            {"name": "x-env", "string_match": {"prefix": "prod"}, "invert_match": True}]},
         "route": {"cluster": "c"}},
        {"match": {"prefix": ""}, "route": {"cluster": "a"}}])
    router = Router(snap.outbound)
    assert router.match("/s.S/M", [("x-debug", "")]).clusters[0].name == "b"
    assert router.match("/s.S/M", [("x-env", "staging")]).clusters[0].name == "c"
    assert router.match("/s.S/M", [("x-env", "prod-eu")]).clusters[0].name == "a"
    assert router.match("/s.S/M", ()).clusters[0].name == "c"  # absent header: not "prod..."


def test_weighted_split_follows_weights_with_seeded_randomness():
    snap = _snapshot([{"match": {"prefix": ""}, "route": {"weighted_clusters": {"clusters": [
        {"name": "a", "weight": 70}, {"name": "b", "weight": 30}, {"name": "c", "weight": 0}]}}}])
    router = Router(snap.outbound, random.Random(7))
    route = router.match("/s.S/M", ())
    counts = Counter(router.pick_cluster(route) for _ in range(10_000))
    assert counts["c"] == 0
    assert abs(counts["a"] / 10_000 - 0.70) < 0.02
    assert abs(counts["b"] / 10_000 - 0.30) < 0.02


def test_route_timeout_is_compiled_and_zero_means_none():
    snap = _snapshot([{"match": {"prefix": "/a.A/"}, "route": {"cluster": "a", "timeout": "1.5s"}},
                      {"match": {"prefix": ""}, "route": {"cluster": "a", "timeout": "0s"}}])
    router = Router(snap.outbound)
    assert router.match("/a.A/M", ()).timeout == 1.5
    assert router.match("/b.B/M", ()).timeout is None


@pytest.mark.parametrize("route, message", [
    ({"match": {"prefix": ""}, "route": {"cluster": "missing"}}, "unknown cluster 'missing'"),
    ({"match": {"prefix": ""}, "route": {"weighted_clusters": {"clusters": [
        {"name": "a", "weight": 0}]}}}, "total weight must be > 0"),
    ({"match": {"safe_regex": {"regex": "("}}, "route": {"cluster": "a"}}, "invalid regex"),
    ({"match": {"prefix": ""}, "redirect": {"host_redirect": "x"}}, "only 'route' actions"),
])
def test_bad_routes_are_rejected_with_the_field_named(route, message):
    with pytest.raises(ConfigError, match=message) as info:
        _snapshot([route])
    assert "virtual_hosts[0].routes[0]" in str(info.value)


def test_flags_build_inbound_and_outbound_listeners():
    res = from_flags("frontend", "127.0.0.1:8080", {"catalog": ["127.0.0.1:1", "127.0.0.1:2"]},
                     {"shop.Catalog": "catalog", "*": "catalog"})
    snap = compile_snapshot("v", res.listeners, res.route_configs, res.clusters,
                            res.load_assignments)
    assert [e.address for e in snap.clusters["catalog"].endpoints] == ["127.0.0.1:1",
                                                                       "127.0.0.1:2"]
    inbound = Router(snap.inbound).match("/any.Thing/M", ())
    assert inbound.clusters[0].name == "inbound|app"
    outbound = Router(snap.outbound)
    assert outbound.match("/shop.Catalog/Get", ()).name == "shop.Catalog"
    assert outbound.match("/x.Y/Z", ()).name == "default"  # "*" goes last
    assert Direction.OUTBOUND.value == "outbound"


def test_unhealthy_endpoints_are_left_out_and_ipv6_is_bracketed():
    cluster = static_cluster("a", ["127.0.0.1:1", "[::1]:2", "127.0.0.1:3"])
    cluster.load_assignment.endpoints[0].lb_endpoints[2].health_status = 2  # UNHEALTHY
    snap = compile_snapshot("v", [], {}, [cluster], {})
    assert [e.address for e in snap.clusters["a"].endpoints] == ["127.0.0.1:1", "[::1]:2"]
