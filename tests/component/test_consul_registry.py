"""The Consul registry against the Consul double, over real HTTP on 127.0.0.1.

First the double itself, through py-consul (blocking queries, TTL checks, KV with CAS, the
failure hooks), so the registry tests below rest on a double that behaves like Consul; then
the registry: changes reach subscribers within a second, failing checks remove instances, an
outage keeps the last view and says so, recovery converges, an index reset is survived, and
announced instances are registered, kept passing and deregistered.
"""

from __future__ import annotations

import asyncio
import base64
import random
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import consul
import pytest
import requests

from control_plane.registry.backoff import BackoffPolicy
from control_plane.registry.consul import ConsulRegistry
from control_plane.registry.model import Instance, RegistryView
from control_plane.registry.source import RegistrySource
from tests.consul_double import ConsulDouble
from tests.harness import wait_for

CHANGE_DEADLINE = 1.0  # a change in Consul reaches subscribers within this


class FakeClock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def double() -> Iterator[ConsulDouble]:
    d = ConsulDouble()
    try:
        yield d
    finally:
        d.close()


def _client(d: ConsulDouble) -> consul.Consul:
    return consul.Consul(host="127.0.0.1", port=d.port, connections_timeout=5)


def _registry(d: ConsulDouble, **kw: Any) -> ConsulRegistry:
    kw.setdefault("wait", 2.0)
    kw.setdefault("backoff", BackoffPolicy(initial=0.05, maximum=0.3))
    kw.setdefault("rng", random.Random(1))
    return ConsulRegistry(d.url, **kw)


def _mesh_meta(version: str = "v1") -> dict[str, str]:
    return {"version": version, "sidecar": "true", "grpc_services": "shop.Orders"}


def _ids(view: RegistryView) -> list[str]:
    return [i.instance_id for i in view.instances]


async def _until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


def _run(scenario: Callable[[], Awaitable[None]], timeout: float = 30.0) -> None:
    asyncio.run(asyncio.wait_for(scenario(), timeout))


# --- the double behaves like Consul ----------------------------------------------------------
def test_double_blocking_query_returns_on_change_and_index_only_grows(double):
    c = _client(double)
    index, services = c.catalog.services()
    assert services == {"consul": []}
    got: dict[str, Any] = {}

    def block() -> None:
        start = time.monotonic()
        got["index"], got["services"] = c.catalog.services(index=index, wait="10s")
        got["took"] = time.monotonic() - start

    waiter = threading.Thread(target=block)
    waiter.start()
    assert c.agent.service.register("orders", service_id="orders-1", address="127.0.0.1",
                                    port=9000, tags=["v1"])
    waiter.join(5)
    assert got["took"] < CHANGE_DEADLINE
    assert int(got["index"]) > int(index)
    assert got["services"] == {"consul": [], "orders": ["v1"]}
    # no change: held for the wait, then the same index
    start = time.monotonic()
    again, _ = c.catalog.services(index=got["index"], wait="300ms")
    assert again == got["index"]
    assert 0.3 <= time.monotonic() - start < 0.3 * (1 + 1 / 16) + 0.5
    indexes = [int(c.catalog.services()[0])]
    for i in range(5):
        c.kv.put(f"k{i}", "v")
        c.agent.service.register("cart", service_id=f"cart-{i}", address="h", port=1)
        indexes.append(int(c.catalog.services()[0]))
    assert indexes == sorted(indexes) and len(set(indexes)) == len(indexes)


def test_double_health_passing_filter_and_ttl_expiry(double):
    c = _client(double)
    c.agent.service.register("orders", service_id="orders-1", address="127.0.0.1", port=9000,
                             check={"TTL": "300ms", "Status": "passing"})
    c.agent.service.register("orders", service_id="orders-2", address="127.0.0.1", port=9001,
                             check=consul.Check.ttl("30s"))  # TTL checks start critical
    index, passing = c.health.service("orders", passing=True)
    assert [e["Service"]["ID"] for e in passing] == ["orders-1"]
    _, every = c.health.service("orders")
    assert [e["Service"]["ID"] for e in every] == ["orders-1", "orders-2"]
    assert [ch["CheckID"] for ch in every[0]["Checks"]] == ["serfHealth", "service:orders-1"]
    assert c.agent.check.ttl_pass("service:orders-2")
    start = time.monotonic()
    index, passing = c.health.service("orders", passing=True, index=index, wait="5s")
    assert [e["Service"]["ID"] for e in passing] == ["orders-1", "orders-2"]
    # orders-1 is never passed again: its TTL lapses and the blocked query sees it go
    while [e["Service"]["ID"] for e in passing] != ["orders-2"]:
        index, passing = c.health.service("orders", passing=True, index=index, wait="5s")
    assert time.monotonic() - start < 2.0
    assert double.check_status("service:orders-1") == "critical"
    assert c.agent.checks()["service:orders-1"]["Output"] == "TTL expired"
    assert c.agent.check.ttl_warn("service:orders-2")  # warning is not passing either
    assert c.health.service("orders", passing=True)[1] == []
    assert c.agent.check.ttl_pass("nope") is False  # 404 Unknown check ID
    with pytest.raises(consul.ConsulException, match="does not have associated TTL"):
        c.agent.check.ttl_pass("serfHealth")


def test_double_ttl_with_a_fake_clock_and_deregister_critical_after():
    clock = FakeClock()
    with ConsulDouble(clock=clock) as d:
        c = _client(d)
        c.agent.service.register("orders", service_id="orders-1", address="h", port=1,
                                 check={"TTL": "10s", "Status": "passing",
                                        "DeregisterCriticalServiceAfter": "1m"})
        clock.now += 9.9
        assert d.expire_checks() == []
        clock.now += 0.1
        assert d.expire_checks() == ["service:orders-1"]
        assert d.check_status("service:orders-1") == "critical"
        clock.now += 59
        d.expire_checks()
        assert d.service_ids() == {"orders-1"}
        clock.now += 1
        d.expire_checks()
        assert d.service_ids() == set()


def test_double_registration_is_validated_like_consul(double):
    c = _client(double)
    with pytest.raises(consul.ConsulException, match="Invalid Service Meta"):
        c.agent.service.register("x", meta={"bad key": "v"})
    with pytest.raises(consul.ConsulException, match="TTL checks only"):
        c.agent.service.register("x", check=consul.Check.tcp("h", 1, "10s"))
    r = requests.put(f"{double.url}/v1/agent/service/register", data=b'{"Port": 1}', timeout=5)
    assert r.status_code == 400 and "Missing service name" in r.text
    assert c.agent.service.deregister("never-registered") is False  # 404
    assert double.service_ids() == set()


def test_double_kv_cas_blocking_and_missing_keys(double):
    c = _client(double)
    index, missing = c.kv.get("pymesh/policies/a")
    assert missing is None and int(index) > 0  # 404, with an index to block on
    r = requests.get(f"{double.url}/v1/kv/pymesh/policies/a", timeout=5)
    assert r.status_code == 404 and "X-Consul-Index" in r.headers
    assert c.kv.put("pymesh/policies/a", b"one", cas=0) is True
    assert c.kv.put("pymesh/policies/a", b"two", cas=0) is False  # exists: create-only fails
    _, entry = c.kv.get("pymesh/policies/a")
    assert entry["Value"] == b"one" and entry["CreateIndex"] == entry["ModifyIndex"]
    assert c.kv.put("pymesh/policies/a", b"two", cas=entry["ModifyIndex"]) is True
    assert c.kv.put("pymesh/policies/a", b"three", cas=entry["ModifyIndex"]) is False  # stale
    _, entry2 = c.kv.get("pymesh/policies/a")
    assert entry2["Value"] == b"two" and entry2["ModifyIndex"] > entry["ModifyIndex"]
    assert entry2["CreateIndex"] == entry["CreateIndex"]
    c.kv.put("pymesh/policies/b", b"")
    c.kv.put("pymesh/other", b"x")
    index, entries = c.kv.get("pymesh/policies/", recurse=True)
    assert [(e["Key"], e["Value"]) for e in entries] == [("pymesh/policies/a", b"two"),
                                                         ("pymesh/policies/b", None)]
    assert c.kv.get("pymesh/", keys=True, separator="/")[1] == ["pymesh/other",
                                                                "pymesh/policies/"]
    got: dict[str, Any] = {}
    waiter = threading.Thread(target=lambda: got.update(
        r=c.kv.get("pymesh/policies/", recurse=True, index=index, wait="10s")))
    waiter.start()
    assert c.kv.delete("pymesh/policies/b", cas=entry2["ModifyIndex"]) is False  # b's index
    assert c.kv.delete("pymesh/policies/a", cas=entry2["ModifyIndex"]) is True
    waiter.join(5)
    new_index, entries = got["r"]
    assert int(new_index) > int(index)
    assert [e["Key"] for e in entries] == ["pymesh/policies/b"]
    assert c.kv.delete("pymesh/policies/", recurse=True) is True
    assert c.kv.get("pymesh/policies/", recurse=True)[1] is None


def test_double_kv_transactions_are_all_or_nothing(double):
    c = _client(double)

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    result = c.txn.put([{"KV": {"Verb": "cas", "Key": "p/a", "Value": b64(b"1"), "Index": 0}},
                        {"KV": {"Verb": "set", "Key": "p/b", "Value": b64(b"2")}}])
    a, b = (r["KV"] for r in result["Results"])
    assert a["ModifyIndex"] == b["ModifyIndex"]  # one commit, one index
    before = c.kv.get("p/", recurse=True)
    with pytest.raises(consul.ConsulException, match=r"^409 .*index is stale"):
        c.txn.put([{"KV": {"Verb": "cas", "Key": "p/b", "Value": b64(b"3"),
                           "Index": b["ModifyIndex"]}},
                   {"KV": {"Verb": "cas", "Key": "p/c", "Value": b64(b"4"),
                           "Index": 99}}])  # the second fails: the first is not applied
    assert c.kv.get("p/", recurse=True) == before
    result = c.txn.put([{"KV": {"Verb": "get", "Key": "p/a"}},
                        {"KV": {"Verb": "delete-cas", "Key": "p/b",
                                "Index": b["ModifyIndex"]}}])
    assert base64.b64decode(result["Results"][0]["KV"]["Value"]) == b"1"
    assert [e["Key"] for e in c.kv.get("p/", recurse=True)[1]] == ["p/a"]
    with pytest.raises(consul.ConsulException, match="413"):
        c.txn.put([{"KV": {"Verb": "get", "Key": "p/a"}}] * 65)


def test_double_failure_hooks_and_index_reset(double):
    c = _client(double)
    c.agent.service.register("orders", service_id="orders-1", address="h", port=1)
    before, _ = c.health.service("orders")
    double.set_unavailable("error")
    with pytest.raises(consul.ConsulException, match="500 rpc error making call: No cluster"):
        c.catalog.services()
    double.set_unavailable("refuse")
    with pytest.raises(requests.ConnectionError):
        c.catalog.services()
    double.set_available()
    assert c.status.leader() == "127.0.0.1:8300"
    double.reset_index(1)
    after, entries = c.health.service("orders")
    assert int(after) < int(before)
    assert [e["Service"]["ID"] for e in entries] == ["orders-1"]  # the data survives
    # a blocked query with the old (now too high) index is held for its wait, then answered
    start = time.monotonic()
    held, _ = c.health.service("orders", index=before, wait="300ms")
    assert int(held) == int(after) and time.monotonic() - start >= 0.3


def test_double_drops_blocked_queries_when_it_goes_down(double):
    c = _client(double)
    index, _ = c.catalog.services()
    errors: list[BaseException] = []

    def block() -> None:
        try:
            c.catalog.services(index=index, wait="30s")
        except Exception as err:
            errors.append(err)

    waiter = threading.Thread(target=block)
    waiter.start()
    wait_for(lambda: any("index" in r.query for r in double.requests_to("/v1/catalog/")),
             what="the blocking query to reach the double")
    double.set_unavailable("refuse")
    waiter.join(5)
    assert not waiter.is_alive()
    assert errors and isinstance(errors[0], requests.ConnectionError)


# --- the registry ----------------------------------------------------------------------------
def test_consul_registry_is_a_registry_source(double):
    assert isinstance(_registry(double), RegistrySource)


def test_a_registration_reaches_subscribers_within_a_second(double):
    async def scenario() -> None:
        reg = _registry(double, wait=30.0)  # a long wait: only the change can wake the query
        await reg.start()
        assert await reg.wait_synced(5)
        assert reg.healthy and reg.view().instances == ()  # the "consul" service is ignored
        sub = reg.changes()
        latencies = []
        for i in range(5):
            start = time.monotonic()
            double.register_service("orders", f"orders-{i}", address="127.0.0.1",
                                    port=9000 + i, tags=["mesh"], meta=_mesh_meta())
            while f"orders-{i}" not in _ids(reg.view()):
                await asyncio.wait_for(anext(sub), 5)
            latencies.append(time.monotonic() - start)
        assert max(latencies) < CHANGE_DEADLINE, latencies
        inst = reg.view().instances_of("orders")[0]
        assert inst == Instance(service="orders", instance_id="orders-0", address="127.0.0.1",
                                port=9000, version="v1", grpc_services=("shop.Orders",),
                                tags=("mesh",), sidecar=True)
        # a second service: the catalog watch starts its own health watch
        start = time.monotonic()
        double.register_service("cart", "cart-1", address="127.0.0.1", port=9100)
        while "cart-1" not in _ids(reg.view()):
            await asyncio.wait_for(anext(sub), 5)
        assert time.monotonic() - start < CHANGE_DEADLINE
        await reg.stop()

    _run(scenario)


def test_a_failing_check_removes_the_instance_and_passing_brings_it_back(double):
    async def scenario() -> None:
        for i in (1, 2):
            double.register_service("orders", f"orders-{i}", address="127.0.0.1",
                                    port=9000 + i, meta=_mesh_meta(), ttl=60)
        reg = _registry(double, wait=30.0)
        await reg.start()
        await _until(lambda: len(reg.view().instances) == 2, 5, "both instances")
        start = time.monotonic()
        double.set_check("service:orders-1", "critical", "connection refused")
        await _until(lambda: _ids(reg.view()) == ["orders-2"], 5, "orders-1 to leave")
        assert time.monotonic() - start < CHANGE_DEADLINE
        double.set_check("service:orders-1", "warning")
        double.set_check("service:orders-1", "passing")
        await _until(lambda: len(reg.view().instances) == 2, CHANGE_DEADLINE, "orders-1 back")
        double.set_check("serfHealth", "critical")  # the node failed: all of its services
        await _until(lambda: reg.view().instances == (), CHANGE_DEADLINE, "node failure")
        double.set_check("serfHealth", "passing")
        await _until(lambda: len(reg.view().instances) == 2, CHANGE_DEADLINE, "node back")
        double.deregister_service("orders-1")
        double.deregister_service("orders-2")  # the service leaves the catalog entirely
        await _until(lambda: reg.view().instances == (), CHANGE_DEADLINE, "service gone")
        assert reg.healthy
        await reg.stop()

    _run(scenario)


@pytest.mark.parametrize("mode", ["refuse", "error"])
def test_consul_down_keeps_the_view_and_says_so_then_converges(double, mode):
    async def scenario() -> None:
        double.register_service("orders", "orders-1", address="127.0.0.1", port=9001)
        double.register_service("orders", "orders-2", address="127.0.0.1", port=9002)
        reg = _registry(double)
        await reg.start()
        await _until(lambda: len(reg.view().instances) == 2, 5, "the first view")
        before = reg.view()
        seen: list[RegistryView] = []
        sub = reg.changes()

        async def record() -> None:
            async for view in sub:
                seen.append(view)

        recorder = asyncio.create_task(record())
        double.set_unavailable(mode)
        await _until(lambda: not reg.healthy, 5, "the registry to notice the outage")
        assert reg.last_error
        assert ("ConnectionError" in reg.last_error if mode == "refuse"
                else "No cluster leader" in reg.last_error)
        # while down, Consul changes (we cannot see it) and retries keep failing
        double.deregister_service("orders-2")
        double.register_service("orders", "orders-3", address="127.0.0.1", port=9003)
        retries = len(double.requests)
        await _until(lambda: len(double.requests) >= retries + 3 or mode == "refuse", 5,
                     "retries")
        assert reg.view() == before and not reg.healthy  # the last good view, never emptied
        assert seen == []
        double.set_available()
        await _until(lambda: reg.healthy, 5, "recovery")
        await _until(lambda: _ids(reg.view()) == ["orders-1", "orders-3"], 5, "convergence")
        assert reg.last_error == ""
        assert all(v.instances for v in seen)  # no emptied view was ever published
        recorder.cancel()
        await reg.stop()

    _run(scenario)


def test_consul_unreachable_at_start_is_unhealthy_not_synced_and_empty(double):
    async def scenario() -> None:
        double.set_unavailable("refuse")
        reg = _registry(double)
        await reg.start()
        await _until(lambda: not reg.healthy, 5, "the registry to notice")
        assert not reg.synced and reg.view().instances == ()
        double.register_service("orders", "orders-1", address="127.0.0.1", port=9001)
        double.set_available()
        assert await reg.wait_synced(5)
        assert _ids(reg.view()) == ["orders-1"] and reg.healthy
        await reg.stop()

    _run(scenario)


def test_index_reset_is_detected_and_the_view_converges(double):
    async def scenario() -> None:
        for i in range(30):  # push the indexes well above what a reset rewinds to
            double.register_service("filler", f"filler-{i}", address="127.0.0.1", port=1)
        double.register_service("orders", "orders-1", address="127.0.0.1", port=9001)
        reg = _registry(double, wait=2.0, ignore_services=("consul", "filler"))
        await reg.start()
        await _until(lambda: _ids(reg.view()) == ["orders-1"], 5, "the first view")
        double.reset_index(1)
        reset_at = len(double.requests)
        # after the reset, new writes carry indexes below what the registry holds: a client
        # that kept blocking on its old index would never see them
        double.register_service("orders", "orders-2", address="127.0.0.1", port=9002)
        double.deregister_service("orders-1")
        await _until(lambda: _ids(reg.view()) == ["orders-2"], 5, "convergence after reset")
        assert reg.healthy

        def fresh_reads() -> list[Any]:
            return [r for r in double.requests[reset_at:]
                    if r.path == "/v1/health/service/orders" and "index" not in r.query]

        # (the answer that revealed the reset is applied first, then the plain read follows)
        await _until(fresh_reads, 5, "a plain read (index reset to 0) after the reset")
        # and from then on changes arrive at once again, not at the end of each wait
        for i in range(3, 6):
            start = time.monotonic()
            double.register_service("orders", f"orders-{i}", address="127.0.0.1", port=9000 + i)
            await _until(lambda i=i: f"orders-{i}" in _ids(reg.view()), 5, f"orders-{i}")
            assert time.monotonic() - start < CHANGE_DEADLINE
        await reg.stop()

    _run(scenario)


def test_announced_instance_is_registered_kept_passing_and_deregistered_after_grace(double):
    async def scenario() -> None:
        clock_grace = 0.3
        reg = _registry(double, ttl=0.4, grace=clock_grace)
        await reg.start()
        inst = Instance(service="orders", instance_id="orders-9", address="127.0.0.1",
                        port=15006, version="v2", zone="z1", grpc_services=("shop.Orders",),
                        meta=(("team", "a"),))
        await reg.announce(inst, owner="stream-1")
        await _until(lambda: _ids(reg.view()) == ["orders-9"], 5, "registration to show")
        assert reg.view().instances[0] == inst  # the full mapping survives the round trip
        assert double.check_status("service:orders-9") == "passing"
        # kept passing over several TTLs (the check would lapse after 0.4 s without passes)
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            assert double.check_status("service:orders-9") == "passing"
            await asyncio.sleep(0.05)
        passes = double.requests_to("/v1/agent/check/pass/service:orders-9")
        assert len(passes) >= 3
        # the stream ends, a new one re-announces within the grace: nothing leaves
        await reg.withdraw("orders-9", owner="stream-1")
        await reg.announce(inst, owner="stream-2")
        await asyncio.sleep(clock_grace * 2)  # (observing that nothing happens over time)
        assert double.service_ids() == {"orders-9"}
        # Consul forgets it (an agent restart): the heartbeat notices and registers again
        double.deregister_service("orders-9")
        await _until(lambda: double.service_ids() == {"orders-9"}, 5, "re-registration")
        # the last stream ends: gone from Consul and the view after the grace
        start = time.monotonic()
        await reg.withdraw("orders-9", owner="stream-2")
        await _until(lambda: double.service_ids() == set(), 5, "deregistration")
        assert time.monotonic() - start >= clock_grace
        await _until(lambda: reg.view().instances == (), CHANGE_DEADLINE, "view to follow")
        assert reg.registered() == {}
        assert reg.healthy
        await reg.stop()

    _run(scenario)


def test_registration_retries_while_consul_is_down(double):
    async def scenario() -> None:
        reg = _registry(double, ttl=5.0)
        await reg.start()
        assert await reg.wait_synced(5)
        double.set_unavailable("refuse")
        inst = Instance(service="cart", instance_id="cart-1", address="127.0.0.1", port=15007)
        await reg.announce(inst)
        await _until(lambda: "registration of cart-1" in reg.last_error, 5, "failure shown")
        double.set_available()
        await _until(lambda: _ids(reg.view()) == ["cart-1"], 5, "registration after outage")
        await _until(lambda: reg.healthy, 5, "healthy again")
        await reg.stop()

    _run(scenario)


def test_stopping_leaves_registrations_to_their_ttl(double):
    async def scenario() -> None:
        reg = _registry(double, ttl=0.3)
        await reg.start()
        await reg.announce(Instance(service="cart", instance_id="cart-1",
                                    address="127.0.0.1", port=15007))
        await _until(lambda: double.check_status("service:cart-1") == "passing", 5, "passing")
        await reg.stop()
        assert double.service_ids() == {"cart-1"}  # not deregistered: a restart must not flap
        await _until(lambda: double.check_status("service:cart-1") == "critical", 5,
                     "the TTL to lapse without heartbeats")

    _run(scenario)
