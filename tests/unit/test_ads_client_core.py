"""The sidecar's ADS client core (sidecar/xds_client.py ClientCore), without sockets: what it
asks for, when a set is complete, ACK/NACK, subscription changes, the does-not-exist timer,
the persisted snapshot, backoff, node identity."""

from __future__ import annotations

import json
import random

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2, config_source_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

from sidecar import static_config
from sidecar.xds_client import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    LISTENER_TYPE,
    ROUTE_TYPE,
    Backoff,
    ClientCore,
    Decision,
    NodeIdentity,
)
from sidecar.xds_translate import ConfigError, compile_snapshot

# --- resources as the control plane sends them -------------------------------------------------


def ads() -> config_source_pb2.ConfigSource:
    source = config_source_pb2.ConfigSource(resource_api_version=config_source_pb2.V3)
    source.ads.SetInParent()
    return source


def outbound_listener(name: str = "outbound|web", rds: str = "outbound|web"
                      ) -> listener_pb2.Listener:
    hcm = hcm_pb2.HttpConnectionManager(stat_prefix=name)
    hcm.rds.route_config_name = rds
    hcm.rds.config_source.CopyFrom(ads())
    listener = listener_pb2.Listener(name=name, traffic_direction=base_pb2.OUTBOUND)
    listener.filter_chains.add().filters.add(
        name="envoy.filters.network.http_connection_manager").typed_config.Pack(hcm)
    return listener


def route_config(name: str = "outbound|web", clusters: tuple[str, ...] = ("orders",)
                 ) -> route_pb2.RouteConfiguration:
    rc = route_pb2.RouteConfiguration(name=name)
    for cluster in clusters:
        vhost = rc.virtual_hosts.add(name=cluster, domains=[cluster])
        route = vhost.routes.add(name=cluster)
        route.match.prefix = f"/shop.{cluster.title()}/"
        route.route.cluster = cluster
    return rc


def eds_cluster(name: str, lb: int = cluster_pb2.Cluster.ROUND_ROBIN) -> cluster_pb2.Cluster:
    c = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.EDS,
                            lb_policy=lb)  # type: ignore[arg-type]
    c.eds_cluster_config.service_name = name
    c.eds_cluster_config.eds_config.CopyFrom(ads())
    return c


def cla(name: str, *ports: int) -> endpoint_pb2.ClusterLoadAssignment:
    assignment = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    locality = assignment.endpoints.add()
    locality.locality.zone = "z1"
    locality.load_balancing_weight.value = 1
    for port in ports:
        sock = locality.lb_endpoints.add().endpoint.address.socket_address
        sock.address, sock.port_value = "127.0.0.1", port
    return assignment


def response(type_url: str, version: str, nonce: str, *resources: Message
             ) -> discovery_pb2.DiscoveryResponse:
    anys = []
    for r in resources:
        a = any_pb2.Any()
        a.Pack(r)
        anys.append(a)
    return discovery_pb2.DiscoveryResponse(type_url=type_url, version_info=version,
                                           nonce=nonce, resources=anys)


NODE = NodeIdentity("web", "web-1", "127.0.0.1:7001", "v1", "z1", ("shop.Web",)).to_node()
LOCAL = static_config.from_flags("web", "127.0.0.1:9000", {}, {})


def core() -> ClientCore:
    return ClientCore(NODE, LOCAL)


def apply_ok(c: ClientCore, d: Decision, now: float = 0.0
             ) -> list[discovery_pb2.DiscoveryRequest]:
    """What the shell does with Sidecar.apply: compile, ConfigError -> NACK."""
    error = None
    if d.error is None and d.apply is not None:
        try:
            compile_snapshot(d.apply_version, d.apply.listeners, d.apply.route_configs,
                             d.apply.clusters, d.apply.load_assignments)
        except ConfigError as exc:
            error = str(exc)
    return c.finish(d, d.error or error, now)


def names(r: discovery_pb2.DiscoveryRequest) -> list[str]:
    return list(r.resource_names)


def synced_core() -> ClientCore:
    """A core that has applied: outbound|web -> RDS -> cluster orders -> EDS."""
    c = core()
    c.initial_requests()
    for resp in (response(CLUSTER_TYPE, "c1", "n1", eds_cluster("orders")),
                 response(ENDPOINT_TYPE, "e1", "n2", cla("orders", 7101)),
                 response(LISTENER_TYPE, "l1", "n3", outbound_listener()),
                 response(ROUTE_TYPE, "r1", "n4", route_config())):
        apply_ok(c, c.on_response(resp))
    assert c.applied_version == "l1/r1/c1/e1"
    return c


# --- tests --------------------------------------------------------------------------------------


def test_first_requests_subscribe_lds_and_cds_as_wildcards_with_the_node() -> None:
    c = core()
    first = c.initial_requests()
    assert [(r.type_url, names(r), r.response_nonce) for r in first] == [
        (LISTENER_TYPE, [], ""), (CLUSTER_TYPE, [], "")]
    assert first[0].node.id == "web~web-1"
    assert not first[1].HasField("node")  # node only on the stream's first request


def test_a_set_is_applied_only_when_every_referenced_resource_has_arrived() -> None:
    c = core()
    c.initial_requests()
    d = c.on_response(response(CLUSTER_TYPE, "c1", "n1", eds_cluster("orders")))
    assert d.error is None and d.apply is None  # no listeners yet
    out = apply_ok(c, d)
    # ACK CDS, then subscribe EDS for the cluster it references
    assert [(r.type_url, r.version_info, r.response_nonce, names(r), r.HasField("error_detail"))
            for r in out] == [(CLUSTER_TYPE, "c1", "n1", [], False),
                              (ENDPOINT_TYPE, "", "", ["orders"], False)]

    d = c.on_response(response(LISTENER_TYPE, "l1", "n2", outbound_listener()))
    assert d.apply is None
    out = apply_ok(c, d)
    assert [(r.type_url, names(r)) for r in out] == [(LISTENER_TYPE, []),
                                                     (ROUTE_TYPE, ["outbound|web"])]
    assert c.missing() == {ROUTE_TYPE: frozenset({"outbound|web"}),
                           ENDPOINT_TYPE: frozenset({"orders"})}

    d = c.on_response(response(ENDPOINT_TYPE, "e1", "n3", cla("orders", 7101)))
    assert d.apply is None
    assert [r.response_nonce for r in apply_ok(c, d)] == ["n3"]

    d = c.on_response(response(ROUTE_TYPE, "r1", "n4", route_config()))
    assert d.apply is not None
    assert d.apply_version == "l1/r1/c1/e1"
    # the sidecar's own inbound listener and inbound|app cluster are added
    assert {cl.name for cl in d.apply.clusters} == {"orders", "inbound|app"}
    assert {li.name for li in d.apply.listeners} == {"outbound|web", "inbound|web"}
    assert set(d.apply.load_assignments) == {"orders"}
    out = apply_ok(c, d)
    assert [(r.type_url, r.version_info, r.response_nonce, names(r)) for r in out] == [
        (ROUTE_TYPE, "r1", "n4", ["outbound|web"])]
    assert c.applied_version == "l1/r1/c1/e1"
    assert c.missing() == {} and c.incomplete_since is None


def test_a_bad_cluster_is_nacked_and_the_last_good_set_kept() -> None:
    c = synced_core()
    d = c.on_response(response(CLUSTER_TYPE, "c2", "n5",
                               eds_cluster("orders", cluster_pb2.Cluster.MAGLEV)))
    assert d.apply is not None  # complete: the sidecar's apply decides
    out = apply_ok(c, d)
    assert len(out) == 1
    nack = out[0]
    assert (nack.type_url, nack.version_info, nack.response_nonce) == (CLUSTER_TYPE, "c1", "n5")
    assert nack.error_detail.message == "cluster 'orders'.lb_policy: MAGLEV is not supported"
    assert nack.error_detail.code == 3
    assert c.applied_version == "l1/r1/c1/e1"
    # the next good update is applied over the last good one
    d = c.on_response(response(CLUSTER_TYPE, "c3", "n6", eds_cluster("orders")))
    assert d.apply is None  # same content as what runs: nothing to apply, just ACK
    assert apply_ok(c, d)[0].version_info == "c3"


def test_a_bad_update_to_an_incomplete_set_is_nacked_too() -> None:
    c = core()
    c.initial_requests()
    d = c.on_response(response(CLUSTER_TYPE, "c1", "n1",
                               eds_cluster("orders", cluster_pb2.Cluster.MAGLEV)))
    assert d.error == "cluster 'orders'.lb_policy: MAGLEV is not supported"
    out = c.finish(d, d.error, 0.0)
    assert [(r.version_info, r.response_nonce, r.error_detail.message) for r in out] == [
        ("", "n1", d.error)]


@pytest.mark.parametrize("resources, expected", [
    ([route_config("x")], "a 'type.googleapis.com/envoy.config.route.v3.RouteConfiguration' "
                          "in a CDS response"),
    ([eds_cluster("a"), eds_cluster("a")], "duplicate name 'a'"),
    ([cluster_pb2.Cluster()], "has no name"),
])
def test_undecodable_responses_are_nacked(resources: list[Message], expected: str) -> None:
    c = synced_core()
    d = c.on_response(response(CLUSTER_TYPE, "c9", "n9", *resources))
    assert d.error is not None and expected in d.error and "CDS version 'c9'" in d.error
    nack = c.finish(d, d.error, 0.0)[0]
    assert nack.version_info == "c1" and nack.error_detail.message == d.error


def test_an_unknown_type_is_nacked() -> None:
    c = synced_core()
    d = c.on_response(discovery_pb2.DiscoveryResponse(type_url="type.googleapis.com/x.Y",
                                                      nonce="q"))
    out = c.finish(d, d.error, 0.0)
    assert out[0].type_url == "type.googleapis.com/x.Y" and out[0].response_nonce == "q"
    assert "not supported" in out[0].error_detail.message


def test_a_new_cluster_waits_for_its_endpoints_and_unreferenced_ones_are_dropped() -> None:
    c = synced_core()
    d = c.on_response(response(CLUSTER_TYPE, "c2", "n5", eds_cluster("orders"),
                               eds_cluster("payments")))
    assert d.apply is None  # payments has no endpoints yet
    out = apply_ok(c, d, now=10.0)
    assert [(r.type_url, names(r), r.response_nonce) for r in out] == [
        (CLUSTER_TYPE, [], "n5"), (ENDPOINT_TYPE, ["orders", "payments"], "n2")]
    assert c.incomplete_since == 10.0
    d = c.on_response(response(ENDPOINT_TYPE, "e2", "n6", cla("orders", 7101),
                               cla("payments", 7201)))
    assert d.apply is not None and set(d.apply.load_assignments) == {"orders", "payments"}
    apply_ok(c, d)
    assert c.applied_version == "l1/r1/c2/e2"
    # payments goes away: applied at once, EDS unsubscribed, its endpoints forgotten
    d = c.on_response(response(CLUSTER_TYPE, "c3", "n7", eds_cluster("orders")))
    assert d.apply is not None and set(d.apply.load_assignments) == {"orders"}
    out = apply_ok(c, d)
    assert [(r.type_url, names(r)) for r in out] == [(CLUSTER_TYPE, []),
                                                     (ENDPOINT_TYPE, ["orders"])]
    doc = c.snapshot_doc(0.0)
    eds = next(e for e in doc["responses"] if e["type_url"] == ENDPOINT_TYPE)
    assert len(eds["resources"]) == 1


def test_resources_that_never_arrive_are_given_up_on_after_the_timeout() -> None:
    c = synced_core()
    apply_ok(c, c.on_response(response(CLUSTER_TYPE, "c2", "n5", eds_cluster("orders"),
                                       eds_cluster("payments"))), now=100.0)
    assert c.expired(114.0, timeout=15.0) is None
    d = c.expired(115.0, timeout=15.0)
    assert d is not None and d.apply is not None
    assert {cl.name for cl in d.apply.clusters} == {"orders", "payments", "inbound|app"}
    assert set(d.apply.load_assignments) == {"orders"}  # payments: no endpoints
    assert c.expired(200.0, timeout=15.0) is None  # once per incomplete period


def test_a_reconnect_asks_for_what_it_holds_and_reapplies_nothing_unchanged() -> None:
    c = synced_core()
    again = c.initial_requests()
    assert [(r.type_url, r.version_info, r.response_nonce, names(r)) for r in again] == [
        (LISTENER_TYPE, "l1", "", []), (ROUTE_TYPE, "r1", "", ["outbound|web"]),
        (CLUSTER_TYPE, "c1", "", []), (ENDPOINT_TYPE, "e1", "", ["orders"])]
    assert again[0].node.id == "web~web-1"
    d = c.on_response(response(CLUSTER_TYPE, "c1", "m1", eds_cluster("orders")))
    assert d.apply is None and d.error is None
    assert c.finish(d, None, 0.0)[0].response_nonce == "m1"


def test_snapshot_round_trip() -> None:
    c = synced_core()
    doc = json.loads(json.dumps(c.snapshot_doc(123.0)))
    fresh = core()
    version, resources = fresh.seed(doc)
    assert version == "l1/r1/c1/e1"
    assert {cl.name for cl in resources.clusters} == {"orders", "inbound|app"}
    assert resources.load_assignments["orders"] == cla("orders", 7101)
    assert resources.route_configs["outbound|web"] == route_config()
    compile_snapshot(version, resources.listeners, resources.route_configs, resources.clusters,
                     resources.load_assignments)
    # the first stream then asks with the persisted versions and names
    assert [(r.version_info, names(r)) for r in fresh.initial_requests()] == [
        ("l1", []), ("r1", ["outbound|web"]), ("c1", []), ("e1", ["orders"])]


@pytest.mark.parametrize("doc, message", [
    ({"format": "other"}, "format"),
    ({"format": "pymesh-xds-snapshot/1", "responses": []}, "no listeners or clusters"),
    ({"format": "pymesh-xds-snapshot/1",
      "responses": [{"type_url": "type.googleapis.com/x.Y", "resources": []}]}, "x.Y"),
])
def test_unusable_snapshots_are_refused(doc: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        core().seed(doc)


def test_node_identity() -> None:
    node = NodeIdentity("orders", "orders-2", "10.0.0.5:15006", "v2", "zone-b",
                        ("shop.Orders", "shop.Admin")).to_node()
    assert (node.id, node.cluster, node.locality.zone) == ("orders~orders-2", "orders", "zone-b")
    md = node.metadata.fields
    assert md["service"].string_value == "orders"
    assert md["instance_id"].string_value == "orders-2"
    assert md["inbound_address"].string_value == "10.0.0.5:15006"
    assert md["version"].string_value == "v2"
    assert md["zone"].string_value == "zone-b"
    assert [v.string_value for v in md["grpc_services"].list_value.values] == [
        "shop.Orders", "shop.Admin"]
    assert md["mesh_sidecar"].bool_value is True


def test_backoff_grows_caps_jitters_and_resets() -> None:
    b = Backoff(base=1.0, maximum=8.0, multiplier=2.0, jitter=0.2, rng=random.Random(4))
    delays = [b.next() for _ in range(6)]
    for delay, ceiling in zip(delays, [1, 2, 4, 8, 8, 8], strict=True):
        assert 0.8 * ceiling <= delay <= 1.2 * ceiling
    assert len(set(delays)) == 6  # jittered: reconnecting sidecars do not stampede together
    b.reset()
    assert 0.8 <= b.next() <= 1.2
    again = Backoff(base=1.0, maximum=8.0, multiplier=2.0, jitter=0.2, rng=random.Random(4))
    assert [again.next() for _ in range(6)] == delays  # seeded: reproducible
    with pytest.raises(ValueError):
        Backoff(base=0)
