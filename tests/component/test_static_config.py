"""A sidecar configured from an Envoy-style static_resources file routes real calls."""

from __future__ import annotations

import json
from collections import Counter

import grpc
import pytest

from tests.harness import start_sidecar
from tests.servers import IdentityServer


def _cluster(name: str, *servers: IdentityServer) -> dict:
    return {"name": name, "type": "STATIC", "lb_policy": "ROUND_ROBIN",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {
                    "address": "127.0.0.1", "port_value": s.port}}}} for s in servers]}]}}


@pytest.fixture(scope="module")
def servers():
    made = {n: IdentityServer(n) for n in ("v1-a", "v1-b", "v2", "canary")}
    yield made
    for s in made.values():
        s.stop()


@pytest.fixture(scope="module")
def sidecar(servers, tmp_path_factory):
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
                 "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "outbound",
        "route_config": {"name": "outbound", "virtual_hosts": [{
            "name": "all", "domains": ["*"], "routes": [
                {"match": {"prefix": "/shop.Orders/", "headers": [
                    {"name": "x-canary", "string_match": {"exact": "yes"}}]},
                 "route": {"cluster": "orders-canary"}},
                {"match": {"prefix": "/shop.Orders/"},
                 "route": {"weighted_clusters": {"clusters": [
                     {"name": "orders-v1", "weight": 80}, {"name": "orders-v2", "weight": 20}]}}},
            ]}]}}
    config = {"static_resources": {
        "listeners": [{"name": "outbound", "traffic_direction": "OUTBOUND",
                       "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                       "filter_chains": [{"filters": [{
                           "name": "envoy.filters.network.http_connection_manager",
                           "typed_config": hcm}]}]}],
        "clusters": [_cluster("orders-v1", servers["v1-a"], servers["v1-b"]),
                     _cluster("orders-v2", servers["v2"]),
                     _cluster("orders-canary", servers["canary"])]}}
    path = tmp_path_factory.mktemp("cfg") / "sidecar.json"
    path.write_text(json.dumps(config))
    proc = start_sidecar(service="frontend", config=str(path))
    yield proc
    assert proc.stop() == 0


def test_weighted_split_and_round_robin_from_static_file(sidecar):
    with grpc.insecure_channel(sidecar.addr("outbound")) as ch:
        place = ch.unary_unary("/shop.Orders/Place")
        counts = Counter(place(b"", timeout=5).decode() for _ in range(400))
    v1 = counts["v1-a"] + counts["v1-b"]
    assert counts["canary"] == 0
    assert abs(v1 / 400 - 0.8) < 0.08, counts
    assert abs(counts["v1-a"] - counts["v1-b"]) <= 0.2 * v1, counts  # round robin within v1


def test_header_route_sends_canary_traffic(sidecar):
    with grpc.insecure_channel(sidecar.addr("outbound")) as ch:
        place = ch.unary_unary("/shop.Orders/Place")
        served = {place(b"", metadata=[("x-canary", "yes")], timeout=5).decode()
                  for _ in range(20)}
    assert served == {"canary"}


def test_unrouted_service_gets_unimplemented_naming_it(sidecar):
    with grpc.insecure_channel(sidecar.addr("outbound")) as ch, \
            pytest.raises(grpc.RpcError) as info:
        ch.unary_unary("/shop.Payments/Charge")(b"", timeout=5)
    assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED
    assert "shop.Payments" in info.value.details()
    assert "frontend" in info.value.details()


def test_invalid_config_file_exits_with_a_clear_message(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"static_resources": {"clusters": [
        {"name": "x", "lb_policy": "MAGLEV"}]}}))
    with pytest.raises(RuntimeError) as info:
        start_sidecar(service="s", config=str(bad))
    message = str(info.value)
    assert "cluster 'x'.lb_policy: MAGLEV is not supported" in message
    assert "Traceback" not in message
