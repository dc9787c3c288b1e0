"""FileStore: versions, optimistic concurrency, all-or-nothing applies, atomic file, restart,
and change notification. A real file in a temp dir and a fake clock."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest

from control_plane.policy import schema as s
from control_plane.policy import store as store_mod
from control_plane.policy.store import (
    CONFIGURED,
    CREATED,
    UNCHANGED,
    Conflict,
    FileStore,
    NotFound,
    StoreError,
    plan_apply,
)
from control_plane.policy.validate import ValidationError, validate


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def tp(name: str, service: str | None = None, timeout: float | None = None,
       version: str = "") -> s.Resource:
    return s.Resource("TrafficPolicy", name, s.TrafficPolicy(service or name, timeout=timeout),
                      version)


def rl(name: str, tps: float = 10.0) -> s.Resource:
    return s.Resource("RateLimitPolicy", name, s.RateLimitPolicy(name, tps, 10))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "policies.json"


@pytest.fixture
def store(path: Path, clock: Clock):  # type: ignore[no-untyped-def]
    st = FileStore(path, clock=clock)
    yield st
    st.close()


def test_apply_assigns_growing_versions_and_reports_results(store: FileStore,
                                                            clock: Clock) -> None:
    out = store.apply_report([tp("orders"), rl("cart")])
    assert [(a.result, a.resource.resource_version) for a in out] == [(CREATED, "1"),
                                                                       (CREATED, "1")]
    assert out[0].resource.create_time == out[0].resource.update_time == clock.now
    created_at = clock.now
    clock.now += 5
    out = store.apply_report([tp("orders", timeout=2.0), rl("cart")])
    assert [(a.result, a.resource.resource_version) for a in out] == [(CONFIGURED, "2"),
                                                                       (UNCHANGED, "1")]
    assert out[0].resource.create_time == created_at
    assert out[0].resource.update_time == clock.now
    # re-applying the same thing changes nothing, not even the revision
    out = store.apply_report([tp("orders", timeout=2.0)])
    assert [(a.result, a.resource.resource_version) for a in out] == [(UNCHANGED, "2")]
    assert store.policy_set().revision == 2
    got = store.get("TrafficPolicy", "orders")
    assert got is not None and got.spec == s.TrafficPolicy("orders", timeout=2.0)
    assert store.get("TrafficPolicy", "nope") is None
    assert [r.name for r in store.list()] == ["cart", "orders"]
    assert [r.name for r in store.list("RateLimitPolicy")] == ["cart"]
    assert store.apply([tp("x")])[0].resource_version == "3"


def test_stale_version_is_a_conflict_and_changes_nothing(store: FileStore, path: Path) -> None:
    (v1,) = store.apply([tp("orders")])
    store.apply([tp("orders", timeout=1.0)])  # someone else changed it
    before = path.read_bytes()
    with pytest.raises(Conflict, match=r'TrafficPolicy "orders" was changed since it was read '
                                       r"\(resourceVersion 1, stored 2\)"):
        store.apply([rl("cart"), tp("orders", timeout=3.0, version=v1.resource_version)])
    assert path.read_bytes() == before
    assert store.get("RateLimitPolicy", "cart") is None  # all or nothing
    with pytest.raises(Conflict, match="no longer exists"):
        store.apply([tp("ghost", version="4")])
    # with the current version it goes through
    (v3,) = store.apply([tp("orders", timeout=3.0, version="2")])
    assert v3.resource_version == "3"


def test_invalid_set_is_rejected_whole(store: FileStore, path: Path) -> None:
    store.apply([tp("orders-main", service="orders")])
    before = path.read_bytes()
    with pytest.raises(ValidationError) as info:
        store.apply([rl("cart"), tp("orders-canary", service="orders")])
    assert [v.field for v in info.value.violations] == ["documents[1].spec.service"]
    assert 'already has TrafficPolicy "orders-main"' in info.value.violations[0].description
    assert path.read_bytes() == before
    assert [r.name for r in store.list()] == ["orders-main"]


def test_dry_run_stores_nothing(store: FileStore, path: Path) -> None:
    store.apply([tp("orders")])
    before = path.read_bytes()
    out = store.apply_report([tp("orders", timeout=1.0), rl("cart")], dry_run=True)
    assert [(a.result, a.resource.resource_version) for a in out] == [(CONFIGURED, ""),
                                                                       (CREATED, "")]
    assert path.read_bytes() == before
    assert store.policy_set().revision == 1
    with pytest.raises(Conflict):
        store.apply([tp("orders", version="9")], dry_run=True)


def test_delete(store: FileStore) -> None:
    store.apply([tp("orders"), rl("cart")])
    with pytest.raises(NotFound, match='TrafficPolicy "nope" not found'):
        store.delete("TrafficPolicy", "nope")
    with pytest.raises(Conflict):
        store.delete("TrafficPolicy", "orders", resource_version="7")
    gone = store.delete("TrafficPolicy", "orders", resource_version="1")
    assert gone.name == "orders" and gone.resource_version == "1"
    assert store.get("TrafficPolicy", "orders") is None
    assert store.policy_set().revision == 2
    store.delete("RateLimitPolicy", "cart")
    assert store.list() == [] and store.policy_set().revision == 3


def test_reloaded_at_start_and_versions_keep_growing(path: Path, clock: Clock) -> None:
    st = FileStore(path, clock=clock)
    st.apply([tp("orders", timeout=1.5), rl("cart")])
    st.delete("RateLimitPolicy", "cart")
    before = st.list()
    st.close()
    st = FileStore(path, clock=clock)
    try:
        assert st.list() == before
        assert st.policy_set().revision == 2
        assert st.apply([tp("cart")])[0].resource_version == "3"
    finally:
        st.close()


def test_file_holds_canonical_documents(store: FileStore, path: Path) -> None:
    store.apply([validate({"kind": "TrafficPolicy", "metadata": {"name": "orders"},
                           "spec": {"service": "orders", "timeout": "1500ms"}})])
    data = json.loads(path.read_text())
    assert data["revision"] == 1
    (entry,) = data["resources"]
    assert entry["resourceVersion"] == "1"
    assert entry["document"] == {"kind": "TrafficPolicy", "metadata": {"name": "orders"},
                                 "spec": {"service": "orders", "timeout": "1500ms",
                                          "loadBalancer": {"algorithm": "ROUND_ROBIN"}}}


def test_second_control_plane_on_the_same_file_is_refused(store: FileStore, path: Path) -> None:
    with pytest.raises(StoreError, match="in use by another control plane"):
        FileStore(path)
    store.close()
    FileStore(path).close()


@pytest.mark.parametrize("content", [
    b"{not json", b"[]", b'{"revision": -1}',
    b'{"revision": 1, "resources": [{"document": {"kind": "X"}}]}'])
def test_unreadable_file_stops_the_start(path: Path, content: bytes) -> None:
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with pytest.raises(StoreError, match=str(path)):
        FileStore(path)
    assert path.read_bytes() == content  # left for the operator to look at
    FileStore(path.with_name("other.json")).close()  # and the lock was released on failure


def test_write_is_atomic_and_a_failed_write_changes_nothing(
        store: FileStore, path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store.apply([tp("orders")])
    before = path.read_bytes()
    synced: list[int] = []
    real_fsync = os.fsync

    def spy_fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(store_mod.os, "fsync", spy_fsync)

    def crash(src: Any, dst: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_mod.os, "replace", crash)
    with pytest.raises(StoreError, match="No space left on device"):
        store.apply([tp("orders", timeout=1.0), rl("cart")])
    assert path.read_bytes() == before
    assert store.list() == [store.get("TrafficPolicy", "orders")]
    assert store.policy_set().revision == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["policies.json",
                                                            "policies.json.lock"]
    assert len(synced) == 1  # the temp file was synced before the rename was tried
    monkeypatch.undo()
    synced.clear()
    monkeypatch.setattr(store_mod.os, "fsync", spy_fsync)
    store.apply([tp("orders", timeout=1.0)])
    assert len(synced) == 2  # the new file, then its directory
    assert sorted(p.name for p in path.parent.iterdir()) == ["policies.json",
                                                            "policies.json.lock"]


def test_on_change_callback(store: FileStore) -> None:
    seen: list[s.PolicySet] = []
    unsubscribe = store.on_change(seen.append)
    store.apply([tp("orders")])
    store.apply([tp("orders")])  # unchanged: no notification
    store.apply([tp("orders")], dry_run=True)
    store.delete("TrafficPolicy", "orders")
    assert [ps.revision for ps in seen] == [1, 2]
    assert seen[0].traffic_policy_for("orders") == s.TrafficPolicy("orders")
    assert seen[1].resources == ()
    unsubscribe()
    store.apply([tp("cart")])
    assert len(seen) == 2


def test_a_failing_subscriber_does_not_break_the_store(store: FileStore) -> None:
    def broken(ps: s.PolicySet) -> None:
        raise RuntimeError("boom")

    store.on_change(broken)
    assert store.apply([tp("orders")])[0].resource_version == "1"


def test_changes_stream_yields_after_each_change_and_coalesces(store: FileStore) -> None:
    async def scenario() -> list[int]:
        stream = store.changes()
        got: list[int] = []
        store.apply([tp("a")])  # before the first __anext__: not lost
        got.append((await asyncio.wait_for(stream.__anext__(), 5)).revision)
        store.apply([tp("b")])
        store.apply([tp("c")])  # two changes while nobody reads: one wake-up, the latest set
        ps = await asyncio.wait_for(stream.__anext__(), 5)
        got.append(ps.revision)
        assert [r.name for r in ps.resources] == ["a", "b", "c"]
        # a change made from another thread wakes the consumer too
        await asyncio.to_thread(store.delete, "TrafficPolicy", "a")
        got.append((await asyncio.wait_for(stream.__anext__(), 5)).revision)
        # nothing changed: nothing yielded
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(stream.__anext__(), 0.05)
        await stream.aclose()
        with pytest.raises(StopAsyncIteration):
            await stream.__anext__()
        return got

    assert asyncio.run(scenario()) == [1, 3, 4]


def test_changes_since_a_revision(store: FileStore) -> None:
    async def scenario() -> None:
        seen = store.policy_set()
        store.apply([tp("a")])  # happened between reading the set and subscribing
        stream = store.changes(since=seen.revision)
        ps = await asyncio.wait_for(stream.__anext__(), 5)
        assert ps.revision == 1
        stream.close()
        up_to_date = store.changes(since=store.policy_set().revision)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(up_to_date.__anext__(), 0.05)
        up_to_date.close()

    asyncio.run(scenario())


def test_plan_apply_reports_every_conflict() -> None:
    current = {r.key: r for r in (tp("a", version="3"), tp("b", version="4"))}
    with pytest.raises(Conflict) as info:
        plan_apply(current, [tp("a", version="2"), tp("b", version="1"), tp("c", version="1")])
    message = str(info.value)
    assert message.count("resourceVersion") == 3
    assert [result for _, _, result in plan_apply(current, [tp("a"), tp("c"), tp("b", "x")])] == [
        UNCHANGED, CREATED, CONFIGURED]
