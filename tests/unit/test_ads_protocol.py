"""The ADS server's per-stream protocol core (control_plane/xds/protocol.py), without sockets:
ACK/NACK/stale detection, subscriptions and wildcards, when a push is due, status records."""

from __future__ import annotations

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2
from google.rpc import status_pb2

from control_plane.xds.protocol import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    LISTENER_TYPE,
    ROUTE_TYPE,
    ProtocolError,
    RequestKind,
    StreamState,
    node_summary,
    version_of,
)


def sidecar_node() -> base_pb2.Node:
    node = base_pb2.Node(id="orders~orders-1", cluster="orders")
    node.metadata.update({"service": "orders", "instance_id": "orders-1", "mesh_sidecar": True,
                          "inbound_address": "127.0.0.1:7000"})
    return node


def req(type_url: str, names: tuple[str, ...] = (), nonce: str = "", version: str = "",
        error: str | None = None, node: base_pb2.Node | None = None
        ) -> discovery_pb2.DiscoveryRequest:
    r = discovery_pb2.DiscoveryRequest(type_url=type_url, resource_names=list(names),
                                       response_nonce=nonce, version_info=version)
    if node is not None:
        r.node.CopyFrom(node)
    if error is not None:
        r.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    return r


def connected(now: float = 100.0) -> StreamState:
    s = StreamState(7, connected_since=now)
    assert s.on_request(req(LISTENER_TYPE, node=sidecar_node()), now) is RequestKind.SUBSCRIBE
    return s


def test_first_request_must_identify_the_node() -> None:
    s = StreamState(1, 0.0)
    with pytest.raises(ProtocolError, match="node"):
        s.on_request(req(LISTENER_TYPE), 1.0)
    with pytest.raises(ProtocolError, match="node"):
        s.on_request(req(LISTENER_TYPE, node=base_pb2.Node(cluster="x")), 1.0)
    assert s.status() is None  # not shown until it says who it is
    # node only on the first request: later requests without it are fine
    s.on_request(req(LISTENER_TYPE, node=sidecar_node()), 1.0)
    assert s.on_request(req(CLUSTER_TYPE), 2.0) is RequestKind.SUBSCRIBE


def test_type_url_is_required() -> None:
    s = connected()
    with pytest.raises(ProtocolError, match="type_url"):
        s.on_request(req(""), 1.0)


def test_push_ack_cycle_and_one_push_in_flight_per_type() -> None:
    s = connected()
    assert s.subscription(LISTENER_TYPE) is None  # empty first LDS request: wildcard
    assert s.needs_push(LISTENER_TYPE, "v1")
    s.record_push(LISTENER_TYPE, "v1", "n1", 101.0)
    # a newer version must wait for the answer to n1
    assert not s.needs_push(LISTENER_TYPE, "v2")
    assert s.awaiting(LISTENER_TYPE)
    kind = s.on_request(req(LISTENER_TYPE, nonce="n1", version="v1"), 102.0)
    assert kind is RequestKind.ACK
    status = s.type_status(LISTENER_TYPE)
    assert status is not None
    assert (status.acked_version, status.acked_at) == ("v1", 102.0)
    assert (status.sent_version, status.sent_nonce, status.sent_at) == ("v1", "n1", 101.0)
    assert not s.needs_push(LISTENER_TYPE, "v1")  # nothing changed
    assert s.needs_push(LISTENER_TYPE, "v2")


def test_ack_is_of_the_version_sent_with_that_nonce() -> None:
    """The request's version_info is what the client says; the nonce says which push."""
    s = connected()
    s.record_push(LISTENER_TYPE, "v1", "n1", 101.0)
    s.on_request(req(LISTENER_TYPE, nonce="n1", version="something-else"), 102.0)
    status = s.type_status(LISTENER_TYPE)
    assert status is not None and status.acked_version == "v1"


def test_nack_is_detected_by_error_detail_and_recorded() -> None:
    s = connected()
    s.record_push(LISTENER_TYPE, "v1", "n1", 101.0)
    s.on_request(req(LISTENER_TYPE, nonce="n1", version="v1"), 102.0)
    s.record_push(LISTENER_TYPE, "v2", "n2", 103.0)
    # NACK carries the last accepted version (v1) and the rejected nonce
    kind = s.on_request(req(LISTENER_TYPE, nonce="n2", version="v1",
                            error="listener 'x': bad"), 104.0)
    assert kind is RequestKind.NACK
    status = s.type_status(LISTENER_TYPE)
    assert status is not None
    assert (status.nack_nonce, status.nack_error, status.nacked_at) == ("n2",
                                                                        "listener 'x': bad", 104.0)
    assert (status.acked_version, status.acked_at) == ("v1", 102.0)  # unchanged
    assert status.sent_version == "v2"
    # the rejected version is not pushed again; a different one is
    assert not s.needs_push(LISTENER_TYPE, "v2")
    assert s.needs_push(LISTENER_TYPE, "v3")


def test_nack_without_message_still_says_something() -> None:
    s = connected()
    s.record_push(LISTENER_TYPE, "v1", "n1", 101.0)
    r = req(LISTENER_TYPE, nonce="n1")
    r.error_detail.code = 13
    assert s.on_request(r, 102.0) is RequestKind.NACK
    status = s.type_status(LISTENER_TYPE)
    assert status is not None and "13" in status.nack_error


def test_stale_nonce_is_ignored_but_its_names_count() -> None:
    s = connected()
    s.on_request(req(ROUTE_TYPE, names=("a",)), 100.0)
    s.record_push(ROUTE_TYPE, "r1", "n1", 101.0)
    s.on_request(req(ROUTE_TYPE, names=("a",), nonce="n1"), 102.0)
    s.record_push(ROUTE_TYPE, "r2", "n2", 103.0)
    # an answer to n1 arriving after n2 went out: stale; does not unblock n2
    kind = s.on_request(req(ROUTE_TYPE, names=("a", "b"), nonce="n1", error="late"), 104.0)
    assert kind is RequestKind.STALE
    status = s.type_status(ROUTE_TYPE)
    assert status is not None and status.nack_error == ""  # a stale NACK is not recorded
    assert s.awaiting(ROUTE_TYPE)
    assert s.subscription(ROUTE_TYPE) == frozenset({"a", "b"})
    # once n2 is ACKed, the new names make a push due even with an unchanged version
    s.on_request(req(ROUTE_TYPE, names=("a", "b"), nonce="n2"), 105.0)
    assert s.needs_push(ROUTE_TYPE, "r2")


def test_rds_and_eds_are_never_wildcard_by_omission() -> None:
    s = connected()
    s.on_request(req(ROUTE_TYPE), 100.0)
    s.on_request(req(ENDPOINT_TYPE), 100.0)
    assert s.subscription(ROUTE_TYPE) == frozenset()
    assert not s.may_push(ROUTE_TYPE)
    assert not s.needs_push(ENDPOINT_TYPE, "e1")
    s.on_request(req(ENDPOINT_TYPE, names=("orders",)), 101.0)
    assert s.needs_push(ENDPOINT_TYPE, "e1")


def test_wildcard_modes() -> None:
    s = connected()
    # legacy wildcard (empty first request) survives empty requests
    s.record_push(LISTENER_TYPE, "v1", "n1", 101.0)
    s.on_request(req(LISTENER_TYPE, nonce="n1"), 102.0)
    assert s.subscription(LISTENER_TYPE) is None
    # explicit "*" on any type
    s.on_request(req(ROUTE_TYPE, names=("*",)), 103.0)
    assert s.subscription(ROUTE_TYPE) is None
    # named first request (a proxyless gRPC client): not wildcard; empty later = nothing
    s.on_request(req(CLUSTER_TYPE, names=("orders",)), 104.0)
    assert s.subscription(CLUSTER_TYPE) == frozenset({"orders"})
    s.record_push(CLUSTER_TYPE, "c1", "n2", 105.0)
    s.on_request(req(CLUSTER_TYPE, nonce="n2"), 106.0)
    assert s.subscription(CLUSTER_TYPE) == frozenset()
    assert not s.may_push(CLUSTER_TYPE)


def test_a_request_without_nonce_is_always_answered() -> None:
    s = connected()
    s.record_push(LISTENER_TYPE, "v1", "n1", 101.0)
    s.on_request(req(LISTENER_TYPE, nonce="n1"), 102.0)
    assert not s.needs_push(LISTENER_TYPE, "v1")
    s.on_request(req(LISTENER_TYPE, version="v1"), 103.0)  # re-subscription
    assert s.needs_push(LISTENER_TYPE, "v1")


def test_types_are_evaluated_make_before_break() -> None:
    s = connected()
    for t in (ROUTE_TYPE, ENDPOINT_TYPE, CLUSTER_TYPE):
        s.on_request(req(t, names=("x",)), 101.0)
    assert s.subscribed_types() == [CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE]


def test_status_record() -> None:
    s = connected(now=50.0)
    s.on_request(req(CLUSTER_TYPE), 51.0)
    s.record_push(CLUSTER_TYPE, "c1", "n1", 52.0, revision=7)
    s.on_request(req(CLUSTER_TYPE, nonce="n1", version="c1"), 53.0)
    s.record_push(CLUSTER_TYPE, "c2", "n2", 54.0, revision=8)
    info = s.status()
    assert info is not None
    assert (info.node_id, info.service, info.instance_id, info.sidecar,
            info.connected_since) == ("orders~orders-1", "orders", "orders-1", True, 50.0)
    assert [t.type_url for t in info.types] == [CLUSTER_TYPE, LISTENER_TYPE]
    cds = info.types[0]
    assert (cds.sent_version, cds.sent_policy_revision) == ("c2", 8)
    assert (cds.acked_version, cds.acked_policy_revision, cds.acked_at) == ("c1", 7, 53.0)
    lds = info.types[1]
    assert lds.sent_version == "" and lds.sent_at is None


def test_node_summary() -> None:
    assert node_summary(sidecar_node()) == ("orders", "orders-1", True)
    proxyless = base_pb2.Node(id="client-1", cluster="frontend")
    assert node_summary(proxyless) == ("frontend", "", False)
    odd = base_pb2.Node(id="svc~i-9")
    odd.metadata.update({"mesh_sidecar": "true", "service": 5})  # wrong types: tolerated
    assert node_summary(odd) == ("", "i-9", True)


def _packed(name: str, connect_ms: int = 250) -> tuple[str, any_pb2.Any]:
    cluster = cluster_pb2.Cluster(name=name)
    cluster.connect_timeout.FromMilliseconds(connect_ms)
    a = any_pb2.Any()
    a.Pack(cluster, deterministic=True)
    return name, a


def test_version_depends_on_content_not_order() -> None:
    one = version_of([_packed("a"), _packed("b")])
    assert one == version_of([_packed("b"), _packed("a")])
    assert one != version_of([_packed("a"), _packed("b", 500)])
    assert one != version_of([_packed("a")])
    assert version_of([]) != one and len(one) == 16
