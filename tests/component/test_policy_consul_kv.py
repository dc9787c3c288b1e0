"""ConsulKVStore against the Consul HTTP API double, through py-consul over real sockets.

Two stores on one double stand for two control-plane replicas sharing Consul: versions are
ModifyIndexes, stale writes conflict, an apply is one transaction (all or nothing), a change
made by one replica (or by hand with `consul kv put`) reaches the other through its blocking
query within a second, and an outage keeps the last view while saying so.

tests/consul_double.py does not implement /v1/txn yet; until it does, TxnDouble below adds the
KV part of it with Consul's semantics (every operation checked first, then all applied at one
index; 409 with Errors when rolled back). It steps aside as soon as the double answers /v1/txn
itself.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import consul
import pytest

from control_plane.policy import schema as s
from control_plane.policy.store import (
    CONFIGURED,
    CREATED,
    UNCHANGED,
    Conflict,
    ConsulKVStore,
    NotFound,
    StoreUnavailable,
)
from control_plane.policy.validate import ValidationError, validate
from tests.consul_double import ApiError, ConsulDouble, _Entry
from tests.harness import wait_for

CHANGE_DEADLINE = 1.0  # a change made by one replica reaches the others within this
PREFIX = "pymesh/policies/"


class TxnDouble(ConsulDouble):
    """The Consul double plus the KV verbs of PUT /v1/txn (see the module docstring)."""

    def _handle(self, method: str, path: str, query: dict[str, list[str]],
                body: bytes) -> tuple[int, Any, int | None, bool]:
        if path != "/v1/txn":
            return super()._handle(method, path, query, body)
        try:
            return super()._handle(method, path, query, body)
        except ApiError as err:
            if err.code != 404 or "unsupported" not in err.message:
                raise
        if method != "PUT":
            raise ApiError(405, f"method {method} not allowed")
        try:
            ops = json.loads(body or b"null")
        except json.JSONDecodeError as err:
            raise ApiError(400, f"Failed to parse body: {err}") from None
        if not isinstance(ops, list) or not all(isinstance(o, dict) and set(o) == {"KV"}
                                                for o in ops):
            raise ApiError(400, "the txn extension of the double supports KV operations only")
        if len(ops) > 128:
            raise ApiError(413, "Transaction contains too many operations (128 max)")
        state = self.state
        with state.cond:
            errors = []
            for i, op in enumerate(ops):
                kv = op["KV"]
                entry = state.kv.get(kv.get("Key", ""))
                current = entry.modify_index if entry else 0
                verb = kv.get("Verb")
                if verb in ("cas", "delete-cas", "check-index") and current != kv.get("Index", 0):
                    errors.append({"OpIndex": i, "What": f'failed to {verb} key "{kv["Key"]}": '
                                                         f"current modify index {current} != "
                                                         f"{kv.get('Index', 0)}"})
                elif verb == "check-not-exists" and entry is not None:
                    errors.append({"OpIndex": i, "What": f'key "{kv["Key"]}" exists'})
                elif verb not in ("set", "cas", "delete", "delete-cas", "check-index",
                                  "check-not-exists"):
                    errors.append({"OpIndex": i, "What": f"unknown KV verb {verb!r}"})
            if errors:
                return 409, {"Results": None, "Errors": errors}, None, False
            if not any(o["KV"]["Verb"] in ("set", "cas", "delete", "delete-cas") for o in ops):
                return 200, {"Results": [], "Errors": None}, None, False
            idx = state._bump()  # one Raft entry: every write of the transaction at one index
            results = []
            for op in ops:
                kv = op["KV"]
                key, verb = kv["Key"], kv["Verb"]
                if verb in ("delete", "delete-cas"):
                    if state.kv.pop(key, None) is not None:
                        state.tombstones[key] = idx
                    continue
                if verb not in ("set", "cas"):
                    continue
                value = base64.b64decode(kv.get("Value") or "")
                entry = state.kv.get(key)
                if entry is None:
                    entry = state.kv[key] = _Entry(key, value, kv.get("Flags", 0), idx, idx)
                else:
                    entry.value, entry.modify_index = value, idx
                state.tombstones.pop(key, None)
                results.append({"KV": {"LockIndex": 0, "Key": key, "Flags": entry.flags,
                                       "Value": None, "CreateIndex": entry.create_index,
                                       "ModifyIndex": idx}})
            state.kv_table = idx
            return 200, {"Results": results, "Errors": None}, None, False


@pytest.fixture
def double() -> Iterator[TxnDouble]:
    d = TxnDouble(seed=7)
    try:
        yield d
    finally:
        d.close()


def client_for(double: ConsulDouble) -> consul.Consul:
    return consul.Consul(host="127.0.0.1", port=double.port)


@pytest.fixture
def replicas(double: TxnDouble) -> Iterator[tuple[ConsulKVStore, ConsulKVStore]]:
    stores = [ConsulKVStore(client_for(double), PREFIX, wait="2s", backoff_base=0.05,
                            backoff_max=0.2) for _ in range(2)]
    for st in stores:
        st.start()
    yield stores[0], stores[1]
    for st in stores:
        st.close()


def tp(name: str, service: str | None = None, timeout: float | None = None,
       version: str = "") -> s.Resource:
    return s.Resource("TrafficPolicy", name, s.TrafficPolicy(service or name, timeout=timeout),
                      version)


def kv_entry(double: ConsulDouble, key: str) -> tuple[int, dict[str, Any]] | None:
    _, item = client_for(double).kv.get(key)
    return None if item is None else (item["ModifyIndex"], json.loads(item["Value"]))


def test_apply_get_list_delete_with_modify_index_versions(
        double: TxnDouble, replicas: tuple[ConsulKVStore, ConsulKVStore]) -> None:
    a, _ = replicas
    out = a.apply_report([tp("orders", timeout=2.0), tp("cart")])
    assert [x.result for x in out] == [CREATED, CREATED]
    entry = kv_entry(double, PREFIX + "TrafficPolicy/orders")
    assert entry is not None
    modify_index, value = entry
    assert out[0].resource.resource_version == str(modify_index)
    assert value["document"] == {"kind": "TrafficPolicy", "metadata": {"name": "orders"},
                                 "spec": {"service": "orders", "timeout": "2s",
                                          "loadBalancer": {"algorithm": "ROUND_ROBIN"}}}
    got = a.get("TrafficPolicy", "orders")
    assert got is not None and got.spec == s.TrafficPolicy("orders", timeout=2.0)
    assert got.resource_version == str(modify_index)
    assert [r.name for r in a.list()] == ["cart", "orders"]
    assert a.list("MeshConfig") == []
    assert a.get("TrafficPolicy", "nope") is None

    again = a.apply_report([tp("orders", timeout=2.0)])
    assert [(x.result, x.resource.resource_version) for x in again] == [
        (UNCHANGED, str(modify_index))]
    changed = a.apply_report([tp("orders", timeout=3.0)])
    assert changed[0].result == CONFIGURED
    assert int(changed[0].resource.resource_version) > modify_index

    with pytest.raises(NotFound):
        a.delete("TrafficPolicy", "nope")
    with pytest.raises(Conflict):
        a.delete("TrafficPolicy", "orders", resource_version=str(modify_index))
    gone = a.delete("TrafficPolicy", "orders",
                    resource_version=changed[0].resource.resource_version)
    assert gone.spec == s.TrafficPolicy("orders", timeout=3.0)
    assert kv_entry(double, PREFIX + "TrafficPolicy/orders") is None
    assert [r.name for r in a.list()] == ["cart"]


def test_a_change_by_one_replica_reaches_the_other(
        double: TxnDouble, replicas: tuple[ConsulKVStore, ConsulKVStore]) -> None:
    a, b = replicas
    wait_for(lambda: a.ready.is_set() and b.ready.is_set(), what="first reads")
    seen: list[s.PolicySet] = []
    b.on_change(seen.append)
    started = time.monotonic()
    (written,) = a.apply([tp("orders", timeout=1.0)])
    wait_for(lambda: b.policy_set().traffic_policy_for("orders") is not None,
             timeout=CHANGE_DEADLINE, what="replica b to see the apply")
    assert time.monotonic() - started < CHANGE_DEADLINE
    assert b.policy_set().get("TrafficPolicy", "orders") == written
    assert seen[-1].traffic_policy_for("orders") == s.TrafficPolicy("orders", timeout=1.0)
    a.delete("TrafficPolicy", "orders")
    wait_for(lambda: b.policy_set().resources == (), timeout=CHANGE_DEADLINE,
             what="replica b to see the delete")


def test_changes_stream_wakes_for_a_write_by_another_replica(
        replicas: tuple[ConsulKVStore, ConsulKVStore]) -> None:
    a, b = replicas
    wait_for(lambda: b.ready.is_set(), what="first read")

    async def scenario() -> s.PolicySet:
        stream = b.changes(since=b.policy_set().revision)
        await asyncio.to_thread(a.apply, [tp("orders")])
        try:
            return await asyncio.wait_for(stream.__anext__(), CHANGE_DEADLINE)
        finally:
            stream.close()

    ps = asyncio.run(scenario())
    assert ps.traffic_policy_for("orders") == s.TrafficPolicy("orders")


def test_stale_version_from_another_replica_conflicts_and_writes_nothing(
        double: TxnDouble, replicas: tuple[ConsulKVStore, ConsulKVStore]) -> None:
    a, b = replicas
    (v1,) = a.apply([tp("orders")])
    b.apply([tp("orders", timeout=1.0, version=v1.resource_version)])  # b read it first
    keys_before = client_for(double).kv.get(PREFIX, recurse=True)[1]
    with pytest.raises(Conflict, match=f"resourceVersion {v1.resource_version}, stored"):
        a.apply([tp("cart"), tp("orders", timeout=5.0, version=v1.resource_version)])
    assert client_for(double).kv.get(PREFIX, recurse=True)[1] == keys_before  # all or nothing
    assert a.get("TrafficPolicy", "cart") is None


def test_lost_cas_race_inside_the_transaction_is_all_or_nothing(
        double: TxnDouble, replicas: tuple[ConsulKVStore, ConsulKVStore]) -> None:
    """Another writer slips in between a replica's read and its transaction."""
    a, b = replicas
    (v1,) = a.apply([tp("orders")])
    real_txn = a._client.txn.put
    raced: list[bool] = []

    def racing_txn(ops: Any) -> Any:
        if not raced:
            raced.append(True)
            b.apply([tp("orders", timeout=9.0)])  # moves the ModifyIndex under a's feet
        return real_txn(ops)

    a._client.txn.put = racing_txn
    # with a version: the re-plan after the rolled-back transaction finds it stale
    with pytest.raises(Conflict):
        a.apply([tp("cart"), tp("orders", timeout=5.0, version=v1.resource_version)])
    assert a.get("TrafficPolicy", "cart") is None
    got = a.get("TrafficPolicy", "orders")
    assert got is not None and got.spec == s.TrafficPolicy("orders", timeout=9.0)
    # without a version: the apply is re-planned against what is stored and goes through
    raced.clear()
    out = a.apply_report([tp("cart"), tp("orders", timeout=5.0)])
    assert [x.result for x in out] == [CREATED, CONFIGURED]
    got = a.get("TrafficPolicy", "orders")
    assert got is not None and got.spec == s.TrafficPolicy("orders", timeout=5.0)


def test_concurrent_applies_from_two_replicas_all_land(
        replicas: tuple[ConsulKVStore, ConsulKVStore]) -> None:
    a, b = replicas
    errors: list[BaseException] = []

    def writer(st: ConsulKVStore, prefix: str) -> None:
        try:
            for i in range(8):
                st.apply([tp(f"{prefix}-{i}"), tp("shared", timeout=float(i + 1))])
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(st, name))
               for st, name in ((a, "a"), (b, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    names = [r.name for r in a.list()]
    assert names == sorted([f"a-{i}" for i in range(8)] + [f"b-{i}" for i in range(8)]
                           + ["shared"])
    versions = [int(r.resource_version) for r in a.list()]
    assert len(set(versions)) >= 2


def test_one_traffic_policy_per_service_across_replicas(
        replicas: tuple[ConsulKVStore, ConsulKVStore]) -> None:
    a, b = replicas
    a.apply([tp("orders-main", service="orders")])
    with pytest.raises(ValidationError, match='already has TrafficPolicy "orders-main"'):
        b.apply([tp("orders-canary", service="orders")])


def test_dry_run_writes_nothing(double: TxnDouble,
                                replicas: tuple[ConsulKVStore, ConsulKVStore]) -> None:
    a, _ = replicas
    out = a.apply_report([tp("orders")], dry_run=True)
    assert [(x.result, x.resource.resource_version) for x in out] == [(CREATED, "")]
    assert client_for(double).kv.get(PREFIX, recurse=True)[1] is None


def test_entries_written_by_hand(double: TxnDouble,
                                 replicas: tuple[ConsulKVStore, ConsulKVStore]) -> None:
    """`consul kv put` of a bare document works; garbage is ignored and reported, not fatal."""
    a, _ = replicas
    kv = client_for(double).kv
    doc = {"kind": "MeshConfig", "metadata": {"name": "default"},
           "spec": {"mtls": {"mode": "STRICT"}}}
    assert kv.put(PREFIX + "MeshConfig/default", json.dumps(doc))
    assert kv.put(PREFIX + "TrafficPolicy/broken", "{not json")
    assert kv.put(PREFIX + "TrafficPolicy/wrong", json.dumps(
        {"kind": "TrafficPolicy", "metadata": {"name": "other"}, "spec": {"service": "x"}}))
    assert kv.put(PREFIX + "README", "notes")
    wait_for(lambda: a.policy_set().mesh_config().mtls_mode == "STRICT",
             timeout=CHANGE_DEADLINE, what="the hand-written MeshConfig")
    assert [r.key for r in a.list()] == [("MeshConfig", "default")]
    assert set(a.invalid_entries) == {PREFIX + "TrafficPolicy/broken",
                                      PREFIX + "TrafficPolicy/wrong", PREFIX + "README"}
    assert "not JSON" in a.invalid_entries[PREFIX + "TrafficPolicy/broken"]
    assert "not what its key says" in a.invalid_entries[PREFIX + "TrafficPolicy/wrong"]
    # and the store still writes next to them
    assert a.apply([validate({"kind": "TrafficPolicy", "metadata": {"name": "orders"},
                              "spec": {"service": "orders"}})])[0].resource_version


def test_outage_keeps_the_last_view_and_recovers(
        double: TxnDouble, replicas: tuple[ConsulKVStore, ConsulKVStore]) -> None:
    a, b = replicas
    a.apply([tp("orders")])
    wait_for(lambda: b.policy_set().traffic_policy_for("orders") is not None,
             timeout=CHANGE_DEADLINE, what="replica b to see the apply")
    before = b.policy_set()
    seen: list[s.PolicySet] = []
    b.on_change(seen.append)
    for mode in ("error", "refuse"):
        double.set_unavailable(mode)
        wait_for(lambda: not b.healthy, timeout=5, what=f"b to notice the outage ({mode})")
        assert b.last_error.startswith("consul: ")
        assert b.policy_set() == before  # never emptied by a failed query
        with pytest.raises(StoreUnavailable):
            a.apply([tp("cart")])
        with pytest.raises(StoreUnavailable):
            a.get("TrafficPolicy", "orders")
        with pytest.raises(StoreUnavailable):
            a.delete("TrafficPolicy", "orders")
        double.set_available()
        wait_for(lambda: b.healthy, timeout=5, what=f"b to recover ({mode})")
        assert b.last_error == ""
    assert seen == []  # nothing changed, so nothing was pushed
    assert a.get("TrafficPolicy", "cart") is None
    a.apply([tp("cart")])
    wait_for(lambda: b.policy_set().traffic_policy_for("cart") is not None,
             timeout=CHANGE_DEADLINE, what="b to see a write after the outage")


def test_start_while_consul_is_down(double: TxnDouble) -> None:
    double.set_unavailable("refuse")
    st = ConsulKVStore(client_for(double), PREFIX, wait="2s", backoff_base=0.05, backoff_max=0.2)
    st.start()
    try:
        assert not st.ready.is_set() and not st.healthy
        assert st.policy_set() == s.PolicySet()
        double.set_available()
        assert st.ready.wait(5)
        assert st.healthy
    finally:
        st.close()


def test_index_reset_is_survived(double: TxnDouble,
                                 replicas: tuple[ConsulKVStore, ConsulKVStore]) -> None:
    a, b = replicas
    a.apply([tp("orders")])
    wait_for(lambda: b.policy_set().traffic_policy_for("orders") is not None,
             timeout=CHANGE_DEADLINE, what="replica b to see the apply")
    double.reset_index(1)  # e.g. a snapshot restore: every index rewound
    a.apply([tp("cart")])
    wait_for(lambda: b.policy_set().traffic_policy_for("cart") is not None,
             timeout=CHANGE_DEADLINE + 2, what="replica b to see a write after the reset")
    assert b.policy_set().traffic_policy_for("orders") is not None
