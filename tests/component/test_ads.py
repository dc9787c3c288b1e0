"""The ADS server (control_plane/ads_server.py) over real sockets, checked by two clients:

- our sidecar's ADS client (sidecar/xds_client.py) driving a real Sidecar's apply: pushes,
  ACKs and NACKs in the server's status records, the last good config kept, reconnecting after
  a control-plane restart, starting from the persisted snapshot while the control plane is down;
- grpcio's own proxyless xDS client (`xds:///greeter`, GRPC_XDS_BOOTSTRAP) in a subprocess, the
  independent check that the protocol is right: calls succeed, are balanced across localities
  by their weights, and its ACKs show in the status records.

The resource provider here is a plain dict of resources, standing in for translate.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2, config_source_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf.message import Message

from control_plane.ads_server import ADS_SERVICE, SERVER_OPTIONS, AdsServer
from control_plane.status_api import ProxyInfo, TypeStatus
from control_plane.xds.protocol import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    LISTENER_TYPE,
    PUSH_ORDER,
    ROUTE_TYPE,
)
from sidecar import static_config
from sidecar.config import Settings
from sidecar.runtime import Sidecar
from sidecar.xds_client import SNAPSHOT_FILE, Backoff, NodeIdentity, XdsClient
from tests.harness import ROOT
from tests.servers import IdentityServer

GREETER = "greeter"
METHOD = "/shop.Orders/Get"


# --- resources ------------------------------------------------------------------------------
def ads_source() -> config_source_pb2.ConfigSource:
    source = config_source_pb2.ConfigSource(resource_api_version=config_source_pb2.V3)
    source.ads.SetInParent()
    return source


def hcm_with_rds(route_name: str) -> hcm_pb2.HttpConnectionManager:
    hcm = hcm_pb2.HttpConnectionManager(stat_prefix=route_name)
    hcm.rds.route_config_name = route_name
    hcm.rds.config_source.CopyFrom(ads_source())
    hcm.http_filters.add(name="envoy.filters.http.router").typed_config.Pack(router_pb2.Router())
    return hcm


def sidecar_listener(name: str) -> listener_pb2.Listener:
    listener = listener_pb2.Listener(name=name, traffic_direction=base_pb2.OUTBOUND)
    listener.filter_chains.add().filters.add(
        name="envoy.filters.network.http_connection_manager").typed_config.Pack(
        hcm_with_rds(name))
    return listener


def api_listener(name: str) -> listener_pb2.Listener:
    listener = listener_pb2.Listener(name=name)
    listener.api_listener.api_listener.Pack(hcm_with_rds(name))
    return listener


def route_config(name: str, domain: str, prefix: str, cluster: str
                 ) -> route_pb2.RouteConfiguration:
    rc = route_pb2.RouteConfiguration(name=name)
    route = rc.virtual_hosts.add(name=domain, domains=[domain]).routes.add(name="default")
    route.match.prefix = prefix
    route.route.cluster = cluster
    return rc


def eds_cluster(name: str, lb: int = cluster_pb2.Cluster.ROUND_ROBIN) -> cluster_pb2.Cluster:
    cluster = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.EDS,
                                  lb_policy=lb)  # type: ignore[arg-type]
    cluster.connect_timeout.FromMilliseconds(1000)
    cluster.eds_cluster_config.service_name = name
    cluster.eds_cluster_config.eds_config.CopyFrom(ads_source())
    return cluster


def load_assignment(name: str, localities: Mapping[str, tuple[int, list[str]]]
                    ) -> endpoint_pb2.ClusterLoadAssignment:
    """localities: zone -> (load_balancing_weight, addresses)."""
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    for zone, (weight, addresses) in localities.items():
        locality = cla.endpoints.add()
        locality.locality.zone = zone
        locality.load_balancing_weight.value = weight
        for address in addresses:
            host, port = address.rsplit(":", 1)
            sock = locality.lb_endpoints.add().endpoint.address.socket_address
            sock.address, sock.port_value = host, int(port)
    return cla


class DictProvider:
    """Resources by type and name, the same for every node (one share key)."""

    def __init__(self) -> None:
        self.resources: dict[str, dict[str, Message]] = {t: {} for t in PUSH_ORDER}
        self.revision_number = 1

    def put(self, type_url: str, name: str, message: Message) -> None:
        self.resources[type_url][name] = message

    def resources_for(self, node: base_pb2.Node, type_url: str,
                      names: frozenset[str] | None) -> Mapping[str, Message]:
        everything = self.resources.get(type_url, {})
        if names is None:
            return dict(everything)
        return {n: everything[n] for n in names if n in everything}

    def share_key(self, node: base_pb2.Node, type_url: str) -> str:
        return "everyone"

    def revision(self) -> int:
        return self.revision_number


def orders_provider(addresses: list[str]) -> DictProvider:
    """A sidecar of `web` calling `orders`: LDS outbound|web -> RDS -> CDS orders -> EDS."""
    p = DictProvider()
    p.put(LISTENER_TYPE, "outbound|web", sidecar_listener("outbound|web"))
    p.put(ROUTE_TYPE, "outbound|web", route_config("outbound|web", "orders", "/shop.Orders/",
                                                   "orders"))
    p.put(CLUSTER_TYPE, "orders", eds_cluster("orders"))
    p.put(ENDPOINT_TYPE, "orders", load_assignment("orders", {"z1": (1, addresses)}))
    return p


# --- helpers --------------------------------------------------------------------------------
async def until(predicate: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    """Poll a condition on the event loop (never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


async def start_ads(provider: DictProvider, port: int = 0, **hooks: Any
                    ) -> tuple[grpc.aio.Server, AdsServer, str]:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0), *SERVER_OPTIONS])
    ads = AdsServer(provider, **hooks)
    ads.add_to_server(server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    assert bound, f"cannot listen on 127.0.0.1:{port}"
    await server.start()
    return server, ads, f"127.0.0.1:{bound}"


def proxy(ads: AdsServer, node_id: str) -> ProxyInfo | None:
    return next((p for p in ads.proxy_status() if p.node_id == node_id), None)


def type_status(ads: AdsServer, node_id: str, type_url: str) -> TypeStatus | None:
    info = proxy(ads, node_id)
    return next((t for t in info.types if t.type_url == type_url), None) if info else None


def all_acked(ads: AdsServer, node_id: str, types: tuple[str, ...] = PUSH_ORDER) -> bool:
    info = proxy(ads, node_id)
    if info is None:
        return False
    by_type = {t.type_url: t for t in info.types}
    return all(t in by_type and by_type[t].sent_version
               and by_type[t].acked_version == by_type[t].sent_version for t in types)


class SidecarUnderTest:
    """A real Sidecar (listeners on port 0) whose config comes from an XdsClient."""

    def __init__(self, control_plane: str, state_dir: str, app: str,
                 missing_timeout: float = 15.0) -> None:
        self.sidecar = Sidecar(Settings(service="web", app=app, outbound="127.0.0.1:0",
                                        inbound="127.0.0.1:0", admin="127.0.0.1:0",
                                        learn_method_shapes=False))
        identity = NodeIdentity("web", "web-1", "127.0.0.1:7001", "v1", "z1", ("shop.Web",))
        self.client = XdsClient(
            control_plane, identity.to_node(), self.sidecar.apply,
            local=static_config.from_flags("web", app, {}, {}), state_dir=state_dir,
            backoff=Backoff(base=0.05, maximum=0.2), missing_timeout=missing_timeout)

    async def start(self) -> bool:
        await self.sidecar.start()
        return await self.client.start()

    async def stop(self) -> None:
        await self.client.stop()
        await self.sidecar.drain(0)

    def endpoints(self, cluster: str = "orders") -> list[str]:
        found = self.sidecar.plane().snapshot.clusters.get(cluster)
        return [e.address for e in found.endpoints] if found else []

    async def call(self) -> str:
        async with grpc.aio.insecure_channel(self.sidecar.addresses["outbound"]) as ch:
            reply = await ch.unary_unary(METHOD)(b"", timeout=5)
        return bytes(reply).decode()


@pytest.fixture
def upstreams() -> Iterator[list[IdentityServer]]:
    servers = [IdentityServer(f"orders-{i}") for i in range(3)]
    try:
        yield servers
    finally:
        for s in servers:
            s.stop()


# --- our sidecar's client ----------------------------------------------------------------------
def test_push_ack_nack_and_the_last_good_config(upstreams: list[IdentityServer],
                                                tmp_path: Path) -> None:
    a, b, _ = upstreams
    node_id = "web~web-1"
    connects: list[tuple[str, int]] = []
    disconnects: list[tuple[str, int]] = []

    async def scenario() -> None:
        provider = orders_provider([a.address])
        server, ads, address = await start_ads(
            provider, on_connect=lambda n, o: connects.append((n.id, o)),
            on_disconnect=lambda n, o: disconnects.append((n.id, o)))
        sut = SidecarUnderTest(address, str(tmp_path), app="127.0.0.1:9")
        try:
            assert await sut.start() is False  # nothing persisted yet
            await until(sut.client.synced.is_set, "first config from the control plane")
            await until(lambda: all_acked(ads, node_id), "ACKs of all four types")
            assert await sut.call() == "orders-0"
            info = proxy(ads, node_id)
            assert info is not None
            assert (info.service, info.instance_id, info.sidecar) == ("web", "web-1", True)
            assert info.types[0].acked_policy_revision == 1
            assert connects == [(node_id, connects[0][1])] and disconnects == []
            assert (tmp_path / SNAPSHOT_FILE).exists()

            # a push: the endpoints move to another instance; calls follow
            provider.put(ENDPOINT_TYPE, "orders", load_assignment("orders",
                                                                  {"z1": (1, [b.address])}))
            provider.revision_number = 2
            ads.notify_changed()
            await until(lambda: sut.endpoints() == [b.address], "the new endpoints applied")
            assert await sut.call() == "orders-1"
            await until(lambda: all_acked(ads, node_id), "ACK of the new EDS version")
            eds = type_status(ads, node_id, ENDPOINT_TYPE)
            assert eds is not None and eds.acked_policy_revision == 2
            good_version = sut.client.applied_version
            assert eds.acked_version in good_version.split("/")

            # a bad cluster: NACKed with the sidecar's message; the old config keeps serving
            provider.put(CLUSTER_TYPE, "orders",
                         eds_cluster("orders", cluster_pb2.Cluster.MAGLEV))
            ads.notify_changed()
            cds = await until(lambda: (t := type_status(ads, node_id, CLUSTER_TYPE))
                              and t.nack_error and t, "the NACK of the bad cluster")
            assert cds.nack_error == "cluster 'orders'.lb_policy: MAGLEV is not supported"
            assert cds.nack_nonce == cds.sent_nonce and cds.acked_version != cds.sent_version
            assert sut.client.applied_version == good_version
            assert sut.client.last_nack is not None
            assert await sut.call() == "orders-1"

            # fixed: a new version, ACKed
            provider.put(CLUSTER_TYPE, "orders", eds_cluster("orders"))
            provider.put(ENDPOINT_TYPE, "orders", load_assignment("orders",
                                                                  {"z1": (1, [a.address])}))
            ads.notify_changed()
            await until(lambda: sut.endpoints() == [a.address], "the fixed config applied")
            await until(lambda: all_acked(ads, node_id), "ACKs after the fix")
            assert ads.counters.nacks == 1
        finally:
            await sut.stop()
            await until(lambda: not ads.proxy_status(), "the stream to close")
            await server.stop(0)
        assert disconnects == connects  # the same stream (owner) that connected
        # no reader task is left behind
        assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("ads-reader")]

    asyncio.run(scenario())


def test_reconnects_after_a_control_plane_restart(upstreams: list[IdentityServer],
                                                  tmp_path: Path) -> None:
    a, b, _ = upstreams
    node_id = "web~web-1"

    async def scenario() -> None:
        provider = orders_provider([a.address])
        server, ads, address = await start_ads(provider)
        sut = SidecarUnderTest(address, str(tmp_path), app="127.0.0.1:9")
        try:
            await sut.start()
            await until(lambda: all_acked(ads, node_id), "first sync")
            await server.stop(0)
            await until(lambda: not sut.client.connected, "the client to see the stream end")
            # while the control plane is gone the sidecar keeps serving its last config
            assert await sut.call() == "orders-0"
            provider.put(ENDPOINT_TYPE, "orders", load_assignment("orders",
                                                                  {"z1": (1, [b.address])}))
            port = int(address.rsplit(":", 1)[1])
            server, ads, _ = await start_ads(provider, port=port)
            await until(lambda: all_acked(ads, node_id), "ACKs on the new control plane")
            await until(lambda: sut.endpoints() == [b.address], "config from the new one")
            assert await sut.call() == "orders-1"
            assert sut.client.attempts >= 2
        finally:
            await sut.stop()
            await server.stop(0)

    asyncio.run(scenario())


def test_starts_from_the_persisted_snapshot_when_the_control_plane_is_down(
        upstreams: list[IdentityServer], tmp_path: Path) -> None:
    a = upstreams[0]

    async def scenario() -> None:
        provider = orders_provider([a.address])
        server, _ads, address = await start_ads(provider)
        first = SidecarUnderTest(address, str(tmp_path), app="127.0.0.1:9")
        await first.start()
        await until(first.client.synced.is_set, "first sync")
        version = first.client.applied_version
        snapshot = tmp_path / SNAPSHOT_FILE
        await until(lambda: snapshot.exists() and version in snapshot.read_text(),
                    "the snapshot on disk")
        await first.stop()
        await server.stop(0)

        second = SidecarUnderTest(address, str(tmp_path), app="127.0.0.1:9")
        try:
            assert await second.start() is True
            assert second.client.source == "persisted"
            assert second.client.applied_version == version
            assert second.sidecar.plane().snapshot.version == version
            assert await second.call() == "orders-0"
            await until(lambda: second.client.attempts >= 3, "the client to keep retrying")
            assert not second.client.connected
            assert "UNAVAILABLE" in second.client.last_error
        finally:
            await second.stop()

    asyncio.run(scenario())


def test_a_resource_the_control_plane_never_sends_is_given_up_on(
        upstreams: list[IdentityServer], tmp_path: Path) -> None:
    """A cluster whose endpoints never come: the rest of the update still lands, after the
    does-not-exist timer, and the cluster has no endpoints."""
    a = upstreams[0]

    async def scenario() -> None:
        provider = orders_provider([a.address])
        server, ads, address = await start_ads(provider)
        sut = SidecarUnderTest(address, str(tmp_path), app="127.0.0.1:9", missing_timeout=0.3)
        try:
            await sut.start()
            await until(sut.client.synced.is_set, "first sync")
            provider.put(CLUSTER_TYPE, "payments", eds_cluster("payments"))  # no EDS for it
            ads.notify_changed()
            await until(lambda: sut.client.status()["missing"] == {"EDS": ["payments"]},
                        "the client to wait for payments' endpoints")
            assert "payments" not in sut.sidecar.plane().snapshot.clusters
            await until(lambda: "payments" in sut.sidecar.plane().snapshot.clusters,
                        "the update applied without them")
            assert sut.endpoints("payments") == []
            assert await sut.call() == "orders-0"
        finally:
            await sut.stop()
            await server.stop(0)

    asyncio.run(scenario())


# --- the server on its own: raw streams ----------------------------------------------------------
def _request(type_url: str, node_id: str | None = None, nonce: str = "",
             names: tuple[str, ...] = ()) -> discovery_pb2.DiscoveryRequest:
    r = discovery_pb2.DiscoveryRequest(type_url=type_url, response_nonce=nonce,
                                       resource_names=list(names))
    if node_id is not None:
        r.node.id = node_id
    return r


def test_bad_and_vanishing_streams_do_not_disturb_others() -> None:
    async def scenario() -> None:
        provider = orders_provider(["127.0.0.1:1"])
        disconnected: list[str] = []

        def on_connect(node: base_pb2.Node, _owner: int) -> None:
            if node.id == "rejected":
                raise ValueError("metadata.inbound_address: missing")

        server, ads, address = await start_ads(
            provider, on_connect=on_connect,
            on_disconnect=lambda node, _owner: disconnected.append(node.id))
        channel = grpc.aio.insecure_channel(address)
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)  # type: ignore[no-untyped-call]
        try:
            good = stub.StreamAggregatedResources()
            await good.write(_request(CLUSTER_TYPE, node_id="good"))
            first = await good.read()
            assert first.type_url == CLUSTER_TYPE and len(first.resources) == 1
            await good.write(_request(CLUSTER_TYPE, nonce=first.nonce))

            # no node on the first request: that stream alone ends INVALID_ARGUMENT
            bad = stub.StreamAggregatedResources()
            await bad.write(_request(CLUSTER_TYPE))
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await bad.read()
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "node" in (caught.value.details() or "")

            # bytes that are not a DiscoveryRequest
            raw = channel.stream_stream(f"/{ADS_SERVICE}/StreamAggregatedResources",
                                        request_serializer=bytes,
                                        response_deserializer=bytes)()
            await raw.write(b"\xff\xff\xff")
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await raw.read()
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not a DiscoveryRequest" in (caught.value.details() or "")

            # a node the registry refuses (on_connect raises ValueError): rejected, clearly
            rejected = stub.StreamAggregatedResources()
            await rejected.write(_request(CLUSTER_TYPE, node_id="rejected"))
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await rejected.read()
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert caught.value.details() == "node: metadata.inbound_address: missing"

            # a client that vanishes mid-stream
            gone = stub.StreamAggregatedResources()
            await gone.write(_request(CLUSTER_TYPE, node_id="gone"))
            await gone.read()
            gone.cancel()
            await until(lambda: proxy(ads, "gone") is None, "the vanished stream to close")

            # delta xDS: a clear UNIMPLEMENTED
            delta = stub.DeltaAggregatedResources()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await delta.read()
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED

            # the good stream still gets pushes
            provider.put(CLUSTER_TYPE, "payments", eds_cluster("payments"))
            ads.notify_changed()
            second = await asyncio.wait_for(good.read(), 5)
            assert second.type_url == CLUSTER_TYPE and len(second.resources) == 2
            assert second.nonce != first.nonce and second.version_info != first.version_info
            assert ads.counters.protocol_errors == 2

            # closing the server ends the streams cleanly (OK), so clients reconnect elsewhere
            await ads.close()
            assert await good.read() is grpc.aio.EOF
            assert await good.code() == grpc.StatusCode.OK
            assert ads.connected == 0
            assert sorted(disconnected) == ["gone", "good"]  # not the rejected one
        finally:
            await channel.close()
            await server.stop(0)

    asyncio.run(scenario())


def test_one_translation_per_change_for_many_streams() -> None:
    """Streams sharing a key cost one provider call per change, not one per stream."""
    streams = 40

    async def scenario() -> None:
        provider = orders_provider(["127.0.0.1:1"])
        server, ads, address = await start_ads(provider)
        channel = grpc.aio.insecure_channel(address)
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)  # type: ignore[no-untyped-call]
        calls = []
        try:
            for i in range(streams):
                call = stub.StreamAggregatedResources()
                await call.write(_request(CLUSTER_TYPE, node_id=f"sim-{i}"))
                calls.append(call)
            firsts = await asyncio.gather(*(c.read() for c in calls))
            assert {r.version_info for r in firsts} == {firsts[0].version_info}
            await asyncio.gather(*(c.write(_request(CLUSTER_TYPE, nonce=r.nonce))
                                   for c, r in zip(calls, firsts, strict=True)))
            await until(lambda: ads.counters.acks == streams, "every ACK")
            before = ads.counters.translations
            assert before == 1

            provider.put(CLUSTER_TYPE, "payments", eds_cluster("payments"))
            ads.notify_changed()
            pushed = await asyncio.gather(*(asyncio.wait_for(c.read(), 5) for c in calls))
            assert all(len(r.resources) == 2 for r in pushed)
            assert len({r.nonce for r in pushed}) == streams  # a fresh nonce per response
            assert ads.counters.translations == before + 1
        finally:
            for c in calls:
                c.cancel()
            await channel.close()
            await server.stop(0)

    asyncio.run(scenario())


# --- grpcio's proxyless xDS client: the independent check ----------------------------------------
class AdsThread:
    """The ADS server on its own event loop thread, so a subprocess can use it while the test
    thread waits."""

    def __init__(self, provider: DictProvider) -> None:
        self.provider = provider
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="ads", daemon=True)
        self._thread.start()
        self.server, self.ads, self.address = self._run(start_ads(provider))

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    def status(self) -> list[ProxyInfo]:
        async def read() -> list[ProxyInfo]:
            return self.ads.proxy_status()
        return list(self._run(read()))

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._run(self.server.stop(0))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


PROXYLESS_CLIENT = """
import collections, json, sys
import grpc
target, calls = sys.argv[1], int(sys.argv[2])
counts = collections.Counter()
with grpc.insecure_channel(target) as channel:
    hello = channel.unary_unary("/shop.Greeter/Hello")
    for i in range(calls):
        counts[hello(b"", timeout=10, wait_for_ready=(i == 0)).decode()] += 1
    print(json.dumps(counts), flush=True)
    sys.stdin.readline()  # keep the xDS stream open until the test has read the status
"""


def test_grpcio_proxyless_client_follows_our_xds(upstreams: list[IdentityServer],
                                                 tmp_path: Path) -> None:
    provider = DictProvider()
    provider.put(LISTENER_TYPE, GREETER, api_listener(GREETER))
    provider.put(ROUTE_TYPE, GREETER, route_config(GREETER, GREETER, "", GREETER))
    provider.put(CLUSTER_TYPE, GREETER, eds_cluster(GREETER))
    # zone-a weighs twice zone-b and has twice the instances: a third of the calls each
    provider.put(ENDPOINT_TYPE, GREETER, load_assignment(GREETER, {
        "zone-a": (2, [upstreams[0].address, upstreams[1].address]),
        "zone-b": (1, [upstreams[2].address])}))
    plane = AdsThread(provider)
    try:
        bootstrap = tmp_path / "bootstrap.json"
        bootstrap.write_text(json.dumps({
            "xds_servers": [{"server_uri": plane.address,
                             "channel_creds": [{"type": "insecure"}],
                             "server_features": ["xds_v3"]}],
            "node": {"id": "proxyless-1", "cluster": "test-client",
                     "locality": {"zone": "zone-a"}},
        }))
        env = dict(os.environ, GRPC_XDS_BOOTSTRAP=str(bootstrap),
                   PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "gen")]))
        calls = 300
        client = subprocess.Popen([sys.executable, "-c", PROXYLESS_CLIENT, f"xds:///{GREETER}",
                                   str(calls)], env=env, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert client.stdout is not None and client.stdin is not None
        try:
            line = client.stdout.readline()  # each call has a 10 s deadline: bounded
            assert line, f"proxyless client failed:\n{client.communicate(timeout=10)[1][-3000:]}"
            counts = collections.Counter(json.loads(line))
            info = next(p for p in plane.status() if p.node_id == "proxyless-1")
        finally:
            with contextlib.suppress(Exception):
                client.stdin.close()
            try:
                client.wait(10)
            except subprocess.TimeoutExpired:
                client.kill()
                client.wait(5)
        assert sum(counts.values()) == calls
        assert set(counts) == {"orders-0", "orders-1", "orders-2"}
        for name, n in counts.items():
            assert abs(n - calls / 3) <= calls * 0.1, f"{name} served {n} of {calls}: {counts}"

        # gRPC's ACKs of all four types are in the status records
        assert info.sidecar is False
        by_type = {t.type_url: t for t in info.types}
        assert set(by_type) == set(PUSH_ORDER)
        for t in by_type.values():
            assert t.sent_version and t.acked_version == t.sent_version, t
            assert t.acked_at is not None and not t.nack_error
    finally:
        plane.stop()
