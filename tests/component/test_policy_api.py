"""The policy and status APIs on a real grpc.aio server over the real FileStore.

What a client sees: results and versions, status codes, the BadRequest details, and that a
rejected or dry-run request leaves the store (and its file) exactly as it was.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from mesh.v1 import policy_pb2, policy_pb2_grpc, status_pb2, status_pb2_grpc

from control_plane import policy_api, status_api
from control_plane.policy.store import FileStore
from control_plane.registry.model import Instance
from control_plane.status_api import (
    EndpointsReport,
    ProxyInfo,
    SourcedInstance,
    SourceHealth,
    TypeStatus,
)

TIMEOUT = 5.0
LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"


class ControlPlaneUnderTest:
    """PolicyService over a FileStore in `state_dir` and StatusService over two plain
    callables (what the test sets in `proxies` and `report`), on 127.0.0.1:0, served from an
    event loop thread so that sync clients and meshctl subprocesses can call it."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "policies.json"
        self.store = FileStore(self.path)
        self.proxies: list[ProxyInfo] = []
        self.report = EndpointsReport()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="control-plane-under-test")
        self._thread.start()
        self.address: str = self._call(self._start())

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _start(self) -> str:
        self._server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        policy_api.add_to_server(self._server, self.store)
        status_api.add_to_server(self._server, lambda: list(self.proxies), lambda: self.report)
        port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        return f"127.0.0.1:{port}"

    def stop(self) -> None:
        self._call(self._server.stop(0))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()
        self.store.close()

    def file_bytes(self) -> bytes | None:
        return self.path.read_bytes() if self.path.exists() else None


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[ControlPlaneUnderTest]:
    cp = ControlPlaneUnderTest(tmp_path)
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture
def stubs(plane: ControlPlaneUnderTest) -> Iterator[tuple[Any, Any]]:
    with grpc.insecure_channel(plane.address) as channel:
        yield (policy_pb2_grpc.PolicyServiceStub(channel),  # type: ignore[no-untyped-call]
               status_pb2_grpc.StatusServiceStub(channel))  # type: ignore[no-untyped-call]


def resource(kind: str, name: str, spec: dict[str, Any] | None, version: str = "") -> Any:
    r = policy_pb2.Resource(kind=kind, name=name, resource_version=version)
    if spec is not None:
        r.spec.update(spec)
    return r


def orders_policy(weight_v2: int = 10, version: str = "") -> Any:
    return resource("TrafficPolicy", "orders", {
        "service": "orders", "timeout": "2s", "retry": {"maxAttempts": 3},
        "subsets": [{"name": "v1", "labels": {"version": "v1"}},
                    {"name": "v2", "labels": {"version": "v2"}}],
        "routes": [{"name": "default", "split": [{"subset": "v1", "weight": 100 - weight_v2},
                                                 {"subset": "v2", "weight": weight_v2}]}]},
        version)


def apply(policy: Any, *resources: Any, dry_run: bool = False) -> Any:
    return policy.Apply(policy_pb2.ApplyRequest(resources=list(resources), dry_run=dry_run),
                        timeout=TIMEOUT)


def violations(error: grpc.RpcError) -> list[tuple[str, str]]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "no google.rpc.Status details on the error"
    out = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        assert detail.Unpack(bad)
        out.extend((v.field, v.description) for v in bad.field_violations)
    return out


def spec_of(r: Any) -> dict[str, Any]:
    from control_plane.cli import spec_dict

    return spec_dict(r.spec)


def test_apply_get_list_delete(plane: ControlPlaneUnderTest, stubs: tuple[Any, Any]) -> None:
    policy, _ = stubs
    mesh = resource("MeshConfig", "default", {"mtls": {"mode": "STRICT"}})
    first = apply(policy, orders_policy(), mesh)
    assert list(first.results) == ["created", "created"]
    version = first.resources[0].resource_version
    assert version.isdigit()
    assert first.resources[0].HasField("create_time")

    got = policy.Get(policy_pb2.GetRequest(kind="TrafficPolicy", name="orders"), timeout=TIMEOUT)
    assert got.resource_version == version
    spec = spec_of(got)
    assert spec["timeout"] == "2s" and spec["retry"]["maxAttempts"] == 3
    assert spec["routes"][0]["split"] == [{"subset": "v1", "weight": 90},
                                          {"subset": "v2", "weight": 10}]

    again = apply(policy, orders_policy())
    assert list(again.results) == ["unchanged"]
    assert again.resources[0].resource_version == version

    changed = apply(policy, orders_policy(weight_v2=50))
    assert list(changed.results) == ["configured"]
    assert int(changed.resources[0].resource_version) > int(version)

    listed = policy.List(policy_pb2.ListRequest(), timeout=TIMEOUT).resources
    assert [(r.kind, r.name) for r in listed] == [("MeshConfig", "default"),
                                                   ("TrafficPolicy", "orders")]
    only = policy.List(policy_pb2.ListRequest(kind="MeshConfig"), timeout=TIMEOUT).resources
    assert [r.name for r in only] == ["default"]

    deleted = policy.Delete(policy_pb2.DeleteRequest(kind="TrafficPolicy", name="orders"),
                            timeout=TIMEOUT)
    assert deleted.resource.name == "orders"
    with pytest.raises(grpc.RpcError) as info:
        policy.Get(policy_pb2.GetRequest(kind="TrafficPolicy", name="orders"), timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert 'TrafficPolicy "orders" not found' in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        policy.Delete(policy_pb2.DeleteRequest(kind="TrafficPolicy", name="orders"),
                      timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_dry_run_stores_nothing(plane: ControlPlaneUnderTest, stubs: tuple[Any, Any]) -> None:
    policy, _ = stubs
    apply(policy, resource("MeshConfig", "default", {"mtls": {"mode": "STRICT"}}))
    before = plane.file_bytes()
    response = apply(policy, orders_policy(), resource("MeshConfig", "default",
                                                       {"mtls": {"mode": "DISABLE"}}),
                     dry_run=True)
    assert list(response.results) == ["created", "configured"]
    assert plane.file_bytes() == before
    with pytest.raises(grpc.RpcError) as info:
        policy.Get(policy_pb2.GetRequest(kind="TrafficPolicy", name="orders"), timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    mesh = policy.Get(policy_pb2.GetRequest(kind="MeshConfig", name="default"), timeout=TIMEOUT)
    assert spec_of(mesh)["mtls"] == {"mode": "STRICT"}


def test_stale_version_is_aborted(plane: ControlPlaneUnderTest, stubs: tuple[Any, Any]) -> None:
    policy, _ = stubs
    v1 = apply(policy, orders_policy()).resources[0].resource_version
    v2 = apply(policy, orders_policy(weight_v2=20, version=v1)).resources[0].resource_version
    before = plane.file_bytes()
    with pytest.raises(grpc.RpcError) as info:
        apply(policy, orders_policy(weight_v2=30, version=v1))
    assert info.value.code() == grpc.StatusCode.ABORTED
    assert f"resourceVersion {v1}, stored {v2}" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        policy.Delete(policy_pb2.DeleteRequest(kind="TrafficPolicy", name="orders",
                                               resource_version=v1), timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.ABORTED
    assert plane.file_bytes() == before
    got = policy.Get(policy_pb2.GetRequest(kind="TrafficPolicy", name="orders"), timeout=TIMEOUT)
    assert got.resource_version == v2


def test_invalid_request_lists_every_field_and_stores_nothing(
        plane: ControlPlaneUnderTest, stubs: tuple[Any, Any]) -> None:
    policy, _ = stubs
    apply(policy, orders_policy())
    before = plane.file_bytes()
    bad_policy = resource("TrafficPolicy", "orders", {
        "service": "orders", "timeout": "2 seconds", "retry": {"maxAttempts": 2.5},
        "subsets": [{"name": "v1", "labels": {"version": "v1"}}],
        "routes": [{"name": "r", "split": [{"subset": "v3", "weight": 100}]}],
        "colour": "blue"})
    good_mesh = resource("MeshConfig", "default", {"mtls": {"mode": "STRICT"}})
    bad_rl = resource("RateLimitPolicy", "Bad_Name", {"service": "orders",
                                                      "tokensPerSecond": -1, "burst": 5})
    with pytest.raises(grpc.RpcError) as info:
        apply(policy, bad_policy, good_mesh, bad_rl)
    error = info.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    found = violations(error)
    fields = [f for f, _ in found]
    assert sorted(fields) == sorted([
        "documents[0].spec.timeout", "documents[0].spec.retry.maxAttempts",
        "documents[0].spec.routes[0].split[0].subset", "documents[0].spec.colour",
        "documents[2].metadata.name", "documents[2].spec.tokensPerSecond"])
    assert all(description for _, description in found)
    assert 'unknown subset "v3"' in dict(found)["documents[0].spec.routes[0].split[0].subset"]
    for field in fields:  # the message names every bad field too
        assert field in error.details()
    assert plane.file_bytes() == before
    listed = policy.List(policy_pb2.ListRequest(), timeout=TIMEOUT).resources
    assert [(r.kind, r.name) for r in listed] == [("TrafficPolicy", "orders")]


def test_cross_resource_rules(plane: ControlPlaneUnderTest, stubs: tuple[Any, Any]) -> None:
    policy, _ = stubs
    apply(policy, orders_policy())
    before = plane.file_bytes()
    other = resource("TrafficPolicy", "orders-two", {"service": "orders"})
    with pytest.raises(grpc.RpcError) as info:
        apply(policy, other)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in violations(info.value)] == ["documents[0].spec.service"]
    mesh = resource("MeshConfig", "default", {})
    with pytest.raises(grpc.RpcError) as info:
        apply(policy, mesh, mesh)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in violations(info.value)] == ["documents[1].metadata.name"]
    assert plane.file_bytes() == before


def test_bad_requests_name_the_field(plane: ControlPlaneUnderTest,
                                     stubs: tuple[Any, Any]) -> None:
    policy, _ = stubs
    cases = [
        (policy.Apply, policy_pb2.ApplyRequest(), ["resources"]),
        (policy.Apply, policy_pb2.ApplyRequest(resources=[policy_pb2.Resource()]),
         ["documents[0].kind", "documents[0].metadata"]),
        (policy.Get, policy_pb2.GetRequest(kind="Deployment", name="x"), ["kind"]),
        (policy.Get, policy_pb2.GetRequest(kind="TrafficPolicy"), ["name"]),
        (policy.List, policy_pb2.ListRequest(kind="trafficpolicy"), ["kind"]),
        (policy.Delete, policy_pb2.DeleteRequest(name="x", resource_version="v7"),
         ["kind", "resource_version"]),
    ]
    for method, request, expected in cases:
        with pytest.raises(grpc.RpcError) as info:
            method(request, timeout=TIMEOUT)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request
        assert [f for f, _ in violations(info.value)] == expected, request
        assert info.value.details().endswith(", ".join(expected))
    assert plane.file_bytes() is None


def test_very_many_problems_still_arrive(plane: ControlPlaneUnderTest,
                                         stubs: tuple[Any, Any]) -> None:
    """Trailers are size-limited: the details are capped and say how many were left out."""
    policy, _ = stubs
    bad = [resource("TrafficPolicy", f"p{i}", {"service": f"s{i}", "timeout": "x" * 200,
                                               "unknown": 1}) for i in range(200)]
    with pytest.raises(grpc.RpcError) as info:
        apply(policy, *bad)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    found = violations(info.value)
    assert 5 < len(found) < 400
    assert found[-1][0] == "" and "more problems" in found[-1][1]
    assert plane.file_bytes() is None


def test_status_api(plane: ControlPlaneUnderTest, stubs: tuple[Any, Any]) -> None:
    _, status = stubs
    plane.proxies = [
        ProxyInfo("orders~orders-1", "orders", "orders-1", connected_since=1000.0, types=(
            TypeStatus(LDS, sent_version="a", sent_nonce="1", sent_at=1001.0, acked_version="a",
                       acked_at=1001.5, sent_policy_revision=4, acked_policy_revision=4),
            TypeStatus(CDS, sent_version="b", sent_nonce="2", acked_version="",
                       nack_nonce="2", nack_error="bad cluster", nacked_at=1002.0))),
        ProxyInfo("client-1", sidecar=False),
    ]
    plane.report = EndpointsReport(
        instances=(SourcedInstance(Instance("orders", "orders-1", "127.0.0.1", 4001, "v1", "a",
                                            ("shop.Orders",)), "embedded"),
                   SourcedInstance(Instance("cart", "cart-1", "127.0.0.1", 4002), "embedded")),
        registries=(SourceHealth("embedded", True),
                    SourceHealth("consul", False, "connection refused", 1003.0)))
    proxies = status.ProxyStatus(status_pb2.ProxyStatusRequest(), timeout=TIMEOUT).proxies
    assert [p.node_id for p in proxies] == ["client-1", "orders~orders-1"]
    orders = proxies[1]
    assert (orders.service, orders.instance_id, orders.sidecar) == ("orders", "orders-1", True)
    assert orders.connected_since.seconds == 1000
    lds, cds = orders.types
    assert (lds.acked_version, lds.acked_at.ToNanoseconds(), lds.acked_policy_revision) == (
        "a", 1_001_500_000_000, 4)
    assert (cds.nack_nonce, cds.nack_error, cds.nacked_at.seconds) == ("2", "bad cluster", 1002)
    assert not proxies[0].sidecar and not proxies[0].HasField("connected_since")

    response = status.Endpoints(status_pb2.EndpointsRequest(service="orders"), timeout=TIMEOUT)
    assert [(e.instance_id, e.address, e.port, e.version, e.zone, e.healthy, e.source,
             list(e.grpc_services)) for e in response.endpoints] == [
        ("orders-1", "127.0.0.1", 4001, "v1", "a", True, "embedded", ["shop.Orders"])]
    assert [(r.source, r.healthy, r.last_error) for r in response.registries] == [
        ("embedded", True, ""), ("consul", False, "connection refused")]
    everything = status.Endpoints(status_pb2.EndpointsRequest(), timeout=TIMEOUT).endpoints
    assert [e.service for e in everything] == ["cart", "orders"]
    assert not status.Endpoints(status_pb2.EndpointsRequest(service="nope"),
                                timeout=TIMEOUT).endpoints
