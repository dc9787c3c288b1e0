"""Traffic management end to end (issue 4, "Show"): each policy applied with meshctl against a
running control plane, and what a caller sees over real sockets.

One mesh for the module: `mesh-control-plane`, three orders instances (FlakyApp apps, told by
each test how to misbehave: orders-1 and orders-2 at v1, orders-3 at v2) behind sidecars that
announce themselves, and a client sidecar ("frontend-1") whose outbound port the test calls.
Every call carries an `x-request-id`, so the apps' records show each attempt of a call: which
instance it reached, in which order. A test asserts what the caller saw (status codes, messages,
latency, which instance answered) and what the instances saw (attempts, retries).

The tests run in file order on the shared mesh; each applies the whole orders TrafficPolicy it
needs (an apply replaces the previous one) and starts with every app healthy.
"""

from __future__ import annotations

import collections
import itertools
import json
import re
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.e2e.cp_fixtures import (
    CALL_TIMEOUT,
    ORDERS,
    PLACE,
    XDS_TYPES,
    ControlPlane,
    Load,
    Mesh,
    apply,
    cluster_endpoints,
    http_get,
    meshctl,
    start_instance,
    start_mesh,
    stop_all,
    wait_synced,
)
from tests.e2e.flaky_app import FAIL_AFTER_FIRST, FAIL_BEFORE_FIRST, Call, FlakyApp
from tests.e2e.test_proxyless import ProxylessClient
from tests.harness import wait_for

SLOW = "/shop.Orders/Slow"
CHAT = "/shop.Orders/Chat"
TOLERANCE = 0.05  # +-5 percentage points
BUDGET_WINDOW = 10.0  # seconds: the sidecar's retry budget window (sidecar/stages/retry_budget)


# --- the mesh -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    root = tmp_path_factory.mktemp("traffic-e2e")
    cp = ControlPlane(root / "control-plane")
    seeds = itertools.count(1)
    mesh = start_mesh(root, cp, make_app=lambda name: FlakyApp(name, seed=next(seeds)))
    try:
        yield mesh
    finally:
        mesh.close()


@pytest.fixture(autouse=True)
def healthy(mesh: Mesh) -> None:
    """Every test starts with every app healthy (and fast)."""
    for app in apps(mesh).values():
        app.behave()


def apps(mesh: Mesh) -> dict[str, FlakyApp]:
    return {i.instance_id: i.app for i in mesh.instances}


# Every policy of the module defines the same subsets, so no apply removes a cluster (see
# test_removing_a_subset_route_with_meshctl_is_accepted_by_the_sidecars, last in the file).
SUBSETS = "  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]\n"


def enforce(mesh: Mesh, spec: str, subsets: str = SUBSETS) -> int:
    """Apply the orders TrafficPolicy with `spec` (YAML lines under `spec:`, after `service`
    and `subsets`) through meshctl; return once the client sidecar runs it (every xDS type
    ACKed at the new policy revision, so new subset clusters have their endpoints too)."""
    text = f"kind: TrafficPolicy\nmetadata: {{name: {ORDERS}}}\nspec:\n  service: {ORDERS}\n"
    apply(mesh.cp.address, text + subsets + spec)
    revision = mesh.api.revision("TrafficPolicy", ORDERS)
    try:
        wait_synced(mesh.api, [mesh.client_node], revision, timeout=10, changed=XDS_TYPES)
    except TimeoutError as err:
        status = meshctl(mesh.cp.address, "proxy-status", "-o", "wide")
        raise AssertionError(f"policy revision {revision} not in force on the client sidecar "
                             f"({err}):\n{status.out}{status.err}") from None
    return revision


def admin_clusters(mesh: Mesh) -> dict[str, Any]:
    """The client sidecar's /clusters: live state per cluster (breaker, budget, ejections)."""
    status, body = http_get(mesh.client.addr("admin"), "/clusters")
    assert status == 200, body
    result: dict[str, Any] = json.loads(body)
    return result


def instance_of(mesh: Mesh, address: str) -> str:
    """The instance whose sidecar listens on `address` (an endpoint in /clusters)."""
    for instance in mesh.instances:
        if instance.inbound == address:
            return instance.instance_id
    raise AssertionError(f"no instance at {address}")


# --- calls ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Outcome:
    """What the caller saw of one call."""

    request_id: str
    answer: str | None  # the instance that answered (unary), or None if the call failed
    code: str  # "OK" or the status code's name
    details: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.code == "OK"


def call_many(target: str, count: int, tag: str, *, method: str = PLACE, workers: int = 8,
              metadata: Callable[[int], Sequence[tuple[str, str]]] = lambda _i: (),
              timeout: float = CALL_TIMEOUT) -> list[Outcome]:
    """`count` unary calls from `workers` threads; each has request id "<tag>-<n>" and a
    deadline, so the batch is bounded."""
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(method)

        def one(n: int) -> Outcome:
            request_id = f"{tag}-{n}"
            md = (("x-request-id", request_id), *metadata(n))
            started = time.monotonic()
            try:
                answer = call(b"", metadata=md, timeout=timeout).decode()
            except grpc.RpcError as err:
                return Outcome(request_id, None, err.code().name,  # type: ignore[attr-defined]
                               err.details() or "",  # type: ignore[attr-defined]
                               time.monotonic() - started)
            return Outcome(request_id, answer, "OK", "", time.monotonic() - started)

        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(one, range(count)))


def failures(outcomes: Sequence[Outcome]) -> list[Outcome]:
    return [o for o in outcomes if not o.ok]


def describe(outcomes: Sequence[Outcome], limit: int = 5) -> str:
    kinds = collections.Counter(f"{o.code}: {o.details}" for o in outcomes if not o.ok)
    return "; ".join(f"{n}x {what}" for what, n in kinds.most_common(limit))


@dataclass(frozen=True)
class Attempt:
    instance: str
    call: Call


def attempts(mesh: Mesh, marks: dict[str, int], tag: str) -> dict[str, list[Attempt]]:
    """Every attempt the apps saw since `marks` of the calls tagged `tag`, by request id, in
    the order they arrived."""
    by_request: dict[str, list[Attempt]] = collections.defaultdict(list)
    for name, app in apps(mesh).items():
        for call in app.since(marks[name]):
            if call.request_id is not None and call.request_id.startswith(f"{tag}-"):
                by_request[call.request_id].append(Attempt(name, call))
    for tried in by_request.values():
        tried.sort(key=lambda a: a.call.at)
    return by_request


def marks(mesh: Mesh) -> dict[str, int]:
    return {name: app.mark() for name, app in apps(mesh).items()}


# --- routing --------------------------------------------------------------------------------
def test_a_70_30_split_and_a_header_route(mesh: Mesh) -> None:
    enforce(mesh, """\
  routes:
    - name: canary
      match: {method: /shop.Orders/*, headers: [{name: x-canary, exact: "true"}]}
      split: [{subset: v2, weight: 100}]
    - name: default
      split: [{subset: v1, weight: 70}, {subset: v2, weight: 30}]
""")
    outbound = mesh.client.addr("outbound")
    canary = (("x-canary", "true"),)
    # interleaved: every third call carries the canary header
    outcomes = call_many(outbound, 1500, "split",
                         metadata=lambda n: canary if n % 3 == 0 else ())
    assert not failures(outcomes), describe(outcomes)
    with_header = [o.answer for n, o in enumerate(outcomes) if n % 3 == 0]
    without = [o.answer for n, o in enumerate(outcomes) if n % 3 != 0]

    assert collections.Counter(with_header) == {"orders-3": 500}, collections.Counter(with_header)
    counts = collections.Counter(without)
    v2 = counts["orders-3"] / len(without)
    assert abs(v2 - 0.30) <= TOLERANCE, f"v2 served {v2:.1%} of 1000, expected 30% +-5pp: {counts}"
    assert min(counts["orders-1"], counts["orders-2"]) >= 0.3 * (1000 - counts["orders-3"]), (
        f"the v1 subset is not balanced: {counts}")


# --- retries --------------------------------------------------------------------------------
RETRY_SPEC = """\
  retry:
    maxAttempts: 3
    retryOn: [UNAVAILABLE]
    budget: {retryRatio: 0.2, minRetriesPerSecond: 10}
"""


def test_retries_hide_an_instance_failing_half_its_calls_within_the_budget(mesh: Mesh) -> None:
    enforce(mesh, RETRY_SPEC)
    sick = apps(mesh)["orders-2"]
    sick.behave(fail_share=0.5)
    before = marks(mesh)

    outcomes = call_many(mesh.client.addr("outbound"), 2000, "retry")

    # the caller: below 0.1% errors, where a third of first attempts reach the sick instance
    failed = failures(outcomes)
    assert len(failed) < 2000 * 0.001, f"{len(failed)} of 2000 calls failed: {describe(failed)}"
    tried = attempts(mesh, before, "retry")
    assert len(tried) == 2000, f"the apps saw {len(tried)} distinct calls of 2000"
    first_on_sick = sum(1 for a in tried.values() if a[0].instance == "orders-2")
    assert 2000 / 3 * 0.8 <= first_on_sick <= 2000 / 3 * 1.2, first_on_sick
    failed_attempts = sum(1 for a in tried.values() for t in a if t.call.failed)
    assert failed_attempts >= 0.4 * first_on_sick, "the sick instance did not fail enough"

    # what the instances saw: every failure was retried, once, on another instance
    retries = sum(len(a) - 1 for a in tried.values())
    assert retries == failed_attempts - len(failed), (retries, failed_attempts, len(failed))
    same = [rid for rid, a in tried.items() if any(x.instance == y.instance
                                                   for x, y in itertools.pairwise(a))]
    assert not same, f"{len(same)} retries went back to the instance that just failed: {same[:5]}"
    assert all(t.instance != "orders-2" for a in tried.values() for t in a[1:])
    # and each attempt tells the instance how many came before it (gRFC A6)
    seen = [[t.call.previous_attempts for t in a] for a in tried.values()]
    wrong = [s for s in seen if s != list(range(len(s)))]
    assert not wrong, (f"grpc-previous-rpc-attempts seen by the apps per attempt (expected "
                       f"[0, 1, ...]): {wrong[:5]}")

    # the budget: retries <= 20% of calls + its floor (10/s over its 10 s window)
    assert retries <= 0.2 * 2000 + 10 * BUDGET_WINDOW, retries
    budget = admin_clusters(mesh)[ORDERS]["retry_budget"]
    assert budget is not None and budget["granted"] >= retries, budget


def test_pushback_minus_one_stops_retries_and_a_valid_pushback_delays_them(mesh: Mesh) -> None:
    enforce(mesh, "  retry: {maxAttempts: 3, retryOn: [UNAVAILABLE]}\n")
    for app in apps(mesh).values():
        app.behave(fail_share=1.0, pushback="-1")
    before = marks(mesh)

    stopped = call_many(mesh.client.addr("outbound"), 9, "stop", workers=3)

    assert all(o.code == "UNAVAILABLE" and "failing 100%" in o.details for o in stopped), (
        describe(stopped))
    tried = attempts(mesh, before, "stop")
    assert sorted(len(a) for a in tried.values()) == [1] * 9, (
        f"attempts per call with pushback -1: {[len(a) for a in tried.values()]}")

    # a valid pushback: retried after exactly that long (here every attempt fails)
    for app in apps(mesh).values():
        app.behave(fail_share=1.0, pushback="150")
    before = marks(mesh)
    delayed = call_many(mesh.client.addr("outbound"), 3, "later", workers=3)
    assert all(o.code == "UNAVAILABLE" for o in delayed), describe(delayed)
    for tries in attempts(mesh, before, "later").values():
        assert len(tries) == 3, tries
        gaps = [b.call.at - a.call.at for a, b in itertools.pairwise(tries)]
        assert all(0.15 <= g < 0.6 for g in gaps), f"retried {gaps} s apart, pushback 150 ms"


def test_the_retry_budget_keeps_retries_under_its_ratio(mesh: Mesh) -> None:
    """One instance of two fails every call: retrying all of them would add 50% to the load;
    the budget (20% + 10/s) returns the rest of the failures to the caller instead."""
    # All calls to the v1 subset, whose cluster has had no retried calls yet: an empty budget
    # window. Its budget is the one every policy of this module has (0.2 and 10/s, also the
    # default), so this test does not depend on a budget *change* reaching the sidecar.
    enforce(mesh, """\
  retry:
    maxAttempts: 3
    retryOn: [UNAVAILABLE]
    budget: {retryRatio: 0.2, minRetriesPerSecond: 10}
  routes:
    - {name: default, split: [{subset: v1, weight: 1}]}
""")
    apps(mesh)["orders-1"].behave(fail_share=1.0)
    before = marks(mesh)
    started = time.monotonic()

    outcomes = call_many(mesh.client.addr("outbound"), 500, "budget")

    assert time.monotonic() - started < BUDGET_WINDOW * 0.9, "the batch outlasted the window"
    tried = attempts(mesh, before, "budget")
    retries = sum(len(a) - 1 for a in tried.values())
    allowance = 0.2 * 500 + 10 * BUDGET_WINDOW
    assert retries <= allowance, f"{retries} retries for 500 calls, budget {allowance}"
    assert retries >= 0.8 * allowance, f"only {retries} retries, budget {allowance}"
    failed = failures(outcomes)
    assert {o.code for o in failed} == {"UNAVAILABLE"}, describe(failed)
    assert all("orders-1: failing 100%" in o.details for o in failed), describe(failed)
    first_on_sick = sum(1 for a in tried.values() if a[0].instance == "orders-1")
    assert len(failed) == first_on_sick - retries, (len(failed), first_on_sick, retries)
    budget = admin_clusters(mesh)[f"{ORDERS}|v1"]["retry_budget"]
    assert budget["refused"] >= len(failed), budget


def test_a_budget_changed_with_meshctl_takes_effect(mesh: Mesh) -> None:
    """A policy change reaches the live budget of a cluster that already has one."""
    spec = """\
  retry: {maxAttempts: 2, retryOn: [UNAVAILABLE]BUDGET}
  routes:
    - {name: default, split: [{subset: v1, weight: 1}]}
"""
    enforce(mesh, spec.replace("BUDGET", ", budget: {retryRatio: 1, minRetriesPerSecond: 1000}"))
    assert not failures(call_many(mesh.client.addr("outbound"), 10, "warm"))
    # then at most 1 retry/s: 10 in the window
    enforce(mesh, spec.replace("BUDGET", ", budget: {retryRatio: 0, minRetriesPerSecond: 1}"))
    apps(mesh)["orders-1"].behave(fail_share=1.0)
    before = marks(mesh)

    outcomes = call_many(mesh.client.addr("outbound"), 100, "tight", workers=4)

    retries = sum(len(a) - 1 for a in attempts(mesh, before, "tight").values())
    assert retries <= 1 * BUDGET_WINDOW, (
        f"{retries} retries for 100 calls under a budget of 0 x calls + 1/s (window "
        f"{BUDGET_WINDOW:g} s); {len(failures(outcomes))} calls failed. /clusters: "
        f"{admin_clusters(mesh)[f'{ORDERS}|v1']['retry_budget']}")


# --- streams --------------------------------------------------------------------------------
def chat(target: str, request_id: str, messages: Sequence[bytes]
         ) -> tuple[list[bytes], str, str]:
    """One bidirectional stream: (responses received, final code name, details)."""
    got: list[bytes] = []
    with grpc.insecure_channel(target) as channel:
        responses = channel.stream_stream(CHAT)(iter(messages), timeout=CALL_TIMEOUT,
                                                metadata=(("x-request-id", request_id),))
        try:
            for message in responses:
                got.append(message)
        except grpc.RpcError as err:
            return got, err.code().name, err.details() or ""  # type: ignore[attr-defined]
    return got, "OK", ""


def test_a_stream_that_received_a_response_is_never_retried(mesh: Mesh) -> None:
    enforce(mesh, RETRY_SPEC)
    for app in apps(mesh).values():
        app.behave(stream_mode=FAIL_AFTER_FIRST)
    before = marks(mesh)

    for n in range(3):  # round robin: one stream per instance
        got, code, details = chat(mesh.client.addr("outbound"), f"committed-{n}", [b"a", b"b"])
        assert len(got) == 1 and got[0].endswith(b":a"), got
        assert code == "UNAVAILABLE" and "failed after one response" in details, (code, details)

    tried = attempts(mesh, before, "committed")
    assert sorted(tried) == [f"committed-{n}" for n in range(3)], tried
    assert all(len(a) == 1 for a in tried.values()), (
        f"a stream was retried after a response message: {dict(tried)}")


def test_a_stream_that_fails_before_any_response_is_retried(mesh: Mesh) -> None:
    enforce(mesh, RETRY_SPEC)
    apps(mesh)["orders-1"].behave(stream_mode=FAIL_BEFORE_FIRST)
    before = marks(mesh)

    for n in range(6):
        got, code, details = chat(mesh.client.addr("outbound"), f"fresh-{n}", [b"a", b"b"])
        assert code == "OK", (code, details)
        server = got[0].split(b":")[0].decode() if got else ""
        assert got == [f"{server}:a".encode(), f"{server}:b".encode()], got
        assert server in ("orders-2", "orders-3"), got

    tried = attempts(mesh, before, "fresh")
    retried = {rid: [t.instance for t in a] for rid, a in tried.items() if len(a) > 1}
    assert retried, f"no stream reached the failing instance first: {dict(tried)}"
    assert all(a[0] == "orders-1" and a[1] != "orders-1" and len(a) == 2
               for a in retried.values()), retried


# --- outlier detection ----------------------------------------------------------------------
def ejected(mesh: Mesh) -> set[str]:
    return {instance_of(mesh, e["address"]) for e in admin_clusters(mesh)[ORDERS]["endpoints"]
            if e["ejected"]}


def test_outlier_detection_ejects_a_failing_instance_and_lets_it_back(mesh: Mesh) -> None:
    enforce(mesh, """\
  retry: {maxAttempts: 3, retryOn: [UNAVAILABLE]}
  outlierDetection:
    consecutiveErrors: 3
    interval: 1s
    baseEjectionTime: 2s
    maxEjectionPercent: 50
""")
    sick = apps(mesh)["orders-3"]
    load = Load(mesh.client.addr("outbound"), max_seconds=30)
    try:
        load.wait_calls(0, 100)
        broke = sick.behave(fail_share=1.0)  # as good as dead, but still registered
        wait_for(lambda: ejected(mesh) == {"orders-3"}, timeout=5, interval=0.02,
                 what="/clusters on the caller's sidecar to show orders-3 ejected")
        # one caller, calls one at a time, a retry never to the instance that just failed:
        # orders-3 saw exactly the 3 consecutive failures that ejected it
        first_run = sick.since(broke)
        assert len(first_run) == 3 and all(c.failed for c in first_run), first_run

        # ejected for 2 s: orders-3 gets no call at all (and the caller sees no error)
        ejected_at = first_run[-1].at
        load.wait_calls(load.mark(), 200)
        wait_for(lambda: time.monotonic() > ejected_at + 2.0, timeout=3,
                 what="the base ejection time to pass")
        load.wait_calls(load.mark(), 20)
        early = [round(c.at - ejected_at, 3) for c in sick.since(broke + 3)
                 if c.at < ejected_at + 2.0]
        assert not early, f"orders-3 got calls {early} s after it was ejected for 2 s"

        # healthy again: back once the ejection time is over
        healed = sick.behave()
        wait_for(lambda: any(not c.failed for c in sick.since(healed)), timeout=15,
                 interval=0.02, what="orders-3 to serve calls again after it healed")
        back = min(c.at for c in sick.since(healed) if not c.failed)
        last_failure = max(c.at for c in sick.since(0) if c.failed)
        assert back - last_failure >= 2.0, (
            f"orders-3 was sent a call {back - last_failure:.2f} s after its last ejecting "
            "failure, base ejection time 2 s")
        wait_for(lambda: not ejected(mesh), timeout=5, what="/clusters to show no ejection")
        load.wait_calls(load.mark(), 100)
    finally:
        load.stop()
    assert not load.failures, (f"{len(load.failures)} of {len(load.served)} calls failed: "
                               f"{load.describe_failures()}")


# --- circuit breaking, timeouts, faults -----------------------------------------------------
def test_the_circuit_breaker_refuses_calls_over_max_requests_at_once(mesh: Mesh) -> None:
    enforce(mesh, "  circuitBreaker: {maxRequests: 2}\n")
    for app in apps(mesh).values():
        app.behave(slow_delay=1.5)
    outbound = mesh.client.addr("outbound")
    with grpc.insecure_channel(outbound) as channel:
        slow = channel.unary_unary(SLOW)
        running = [slow.future(b"", timeout=CALL_TIMEOUT) for _ in range(2)]
        wait_for(lambda: sum(a.in_flight for a in apps(mesh).values()) == 2, timeout=5,
                 what="two slow calls to be in flight")

        extra = call_many(outbound, 4, "over", workers=4) + call_many(
            outbound, 2, "over-slow", method=SLOW, workers=2)

        for o in extra:
            assert o.code == "UNAVAILABLE", o
            assert "circuit breaker max_requests of cluster 'orders' is open" in o.details, o
            assert o.seconds < 0.5, f"refused after {o.seconds:.2f} s, not at once"
        assert all(f.result() in (b"orders-1", b"orders-2", b"orders-3") for f in running)
    assert admin_clusters(mesh)[ORDERS]["circuit_breaker"]["active"] == 0
    after = call_many(outbound, 3, "after", workers=1)
    assert not failures(after), f"the breaker did not close again: {describe(after)}"


def test_a_route_timeout_gives_deadline_exceeded_naming_the_hop(mesh: Mesh) -> None:
    enforce(mesh, """\
  routes:
    - {name: slow-calls, match: {method: /shop.Orders/Slow}, timeout: 200ms}
""")
    for app in apps(mesh).values():
        app.behave(slow_delay=1.0)
    outbound = mesh.client.addr("outbound")

    (timed_out,) = call_many(outbound, 1, "timeout", method=SLOW)

    assert timed_out.code == "DEADLINE_EXCEEDED", timed_out
    assert 0.2 <= timed_out.seconds < 0.8, timed_out
    assert re.fullmatch(r"mesh sidecar 'frontend' \(outbound\): route '[^']*slow-calls[^']*' "
                        r"timeout exceeded waiting for upstream 127\.0\.0\.1:\d+ \(attempt 1\)",
                        timed_out.details), timed_out
    assert not failures(call_many(outbound, 3, "other")), "other methods are not limited"


def test_fault_injection_aborts_and_delays(mesh: Mesh) -> None:
    enforce(mesh, """\
  routes:
    - name: chaos
      match: {headers: [{name: x-chaos, exact: abort}]}
      fault: {abort: {percent: 100, code: RESOURCE_EXHAUSTED}}
    - name: lag
      match: {headers: [{name: x-chaos, exact: delay}]}
      fault: {delay: {percent: 100, fixedDelay: 300ms}}
""")
    outbound = mesh.client.addr("outbound")
    before = marks(mesh)

    aborted = call_many(outbound, 6, "abort", metadata=lambda _n: (("x-chaos", "abort"),))
    delayed = call_many(outbound, 6, "delay", metadata=lambda _n: (("x-chaos", "delay"),))
    plain = call_many(outbound, 6, "plain")

    for o in aborted:
        assert o.code == "RESOURCE_EXHAUSTED", o
        assert re.fullmatch(r"mesh sidecar 'frontend' \(outbound\): fault injected by route "
                            r"'[^']*chaos[^']*': aborted with RESOURCE_EXHAUSTED", o.details), o
    assert not attempts(mesh, before, "abort"), "an aborted call reached an instance"
    assert not failures(delayed + plain), describe(delayed + plain)
    assert min(o.seconds for o in delayed) >= 0.3, [round(o.seconds, 3) for o in delayed]
    assert len(attempts(mesh, before, "delay")) == 6
    typical = sorted(o.seconds for o in plain)[len(plain) // 2]
    assert min(o.seconds for o in delayed) - typical >= 0.25, (typical, delayed)


# --- ring hash ------------------------------------------------------------------------------
def test_ring_hash_keeps_keys_on_their_instance_and_a_new_instance_moves_few(
        mesh: Mesh) -> None:
    enforce(mesh, "  loadBalancer: {algorithm: RING_HASH, hashHeader: x-user-id}\n")
    outbound = mesh.client.addr("outbound")
    users = [f"user-{n}" for n in range(200)]

    def placement(rounds: int, tag: str) -> dict[str, str]:
        outcomes = call_many(outbound, rounds * len(users), tag,
                             metadata=lambda n: (("x-user-id", users[n % len(users)]),))
        assert not failures(outcomes), describe(outcomes)
        seen: dict[str, set[str]] = collections.defaultdict(set)
        for n, o in enumerate(outcomes):
            assert o.answer is not None
            seen[users[n % len(users)]].add(o.answer)
        moving = {u: s for u, s in seen.items() if len(s) > 1}
        assert not moving, f"keys served by more than one instance: {dict(moving)}"
        return {u: s.pop() for u, s in seen.items()}

    before = placement(3, "ring")
    spread = collections.Counter(before.values())
    assert set(spread) == {"orders-1", "orders-2", "orders-3"}, spread
    assert min(spread.values()) >= 200 / 3 * 0.5, f"keys badly spread: {spread}"

    fourth = start_instance(mesh.cp.address, mesh.root, "orders-4", "v1",
                            app=FlakyApp("orders-4", seed=4))
    try:
        wait_for(lambda: len(cluster_endpoints(mesh.client).get(ORDERS, [])) == 4, timeout=10,
                 what="the client sidecar to route to the fourth instance")
        after = placement(1, "ring4")
        moved = {u: (before[u], after[u]) for u in users if before[u] != after[u]}
        assert 0 < len(moved) < 0.4 * len(users), (
            f"{len(moved)} of {len(users)} keys moved when a 4th instance joined")
        assert all(new == "orders-4" for _, new in moved.values()), (
            f"keys moved between old instances: "
            f"{ {u: m for u, m in moved.items() if m[1] != 'orders-4'} }")
    finally:
        stop_all([fourth.sidecar, fourth.app])
    wait_for(lambda: len(cluster_endpoints(mesh.client).get(ORDERS, [])) == 3, timeout=15,
             what="the fourth instance to leave the client sidecar's cluster")


# --- a proxyless gRPC client ----------------------------------------------------------------
class Proxyless(ProxylessClient):
    """grpcio's own xDS client (tests/e2e/test_proxyless.py), failures counted, not fatal."""

    def batch(self, count: int) -> tuple[collections.Counter[str], collections.Counter[str]]:
        """(calls served by each instance, failed calls by "CODE: details")."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"calls": count}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()  # bounded: each call has a 5 s deadline
        assert line, f"proxyless client died:\n{self.log()}"
        result = json.loads(line)
        return collections.Counter(result["served"]), collections.Counter(result["failures"])


def test_a_proxyless_grpc_client_obeys_the_same_split_and_retries(mesh: Mesh,
                                                                  tmp_path: Path) -> None:
    enforce(mesh, """\
  retry: {maxAttempts: 3, retryOn: [UNAVAILABLE]}
  routes:
    - name: default
      split: [{subset: v1, weight: 70}, {subset: v2, weight: 30}]
""")
    sick = apps(mesh)["orders-1"]
    sick.behave(fail_share=0.5)
    client = Proxyless(mesh.cp.address, tmp_path)
    try:
        before = marks(mesh)
        served, failed = client.batch(1000)
    finally:
        client.close()

    errors = sum(failed.values())
    assert sum(served.values()) + errors == 1000, (served, failed)
    # without retries a sixth of all calls would fail (half of the 35% orders-1 gets)
    assert errors < 1000 * 0.01, f"{errors} of 1000 proxyless calls failed: {failed}"
    v2 = served["orders-3"] / sum(served.values())
    assert abs(v2 - 0.30) <= TOLERANCE, f"v2 served {v2:.1%}, expected 30% +-5pp: {served}"

    seen = [c for name, app in apps(mesh).items() for c in app.since(before[name])]
    failed_attempts = sum(1 for c in seen if c.failed)
    retried = [c for c in seen if c.retried]
    assert failed_attempts >= 100, f"orders-1 failed only {failed_attempts} attempts"
    assert len(retried) == failed_attempts - errors, (
        f"{len(retried)} attempts carried grpc-previous-rpc-attempts, {failed_attempts} "
        f"attempts failed, {errors} calls failed")
    assert len(seen) == 1000 + len(retried), (len(seen), len(retried))


# --- last: leaves the sidecars with a NACKed CDS when it fails ---------------------------------
def test_removing_a_subset_route_with_meshctl_is_accepted_by_the_sidecars(mesh: Mesh) -> None:
    """A policy change that removes a subset (and the route to it) must reach every sidecar:
    the clusters' and the routes' updates arrive as separate xDS responses, and neither order
    may leave a sidecar stuck on the old config."""
    with_gone = SUBSETS.replace("]\n", ", {name: gone, labels: {version: v2}}]\n")
    enforce(mesh, "  routes:\n    - {name: default, split: [{subset: gone, weight: 1}]}\n",
            subsets=with_gone)
    assert collections.Counter(served_by_outbound(mesh, 10)) == {"orders-3": 10}

    enforce(mesh, "  circuitBreaker: {maxRequests: 500}\n")  # no `gone`, nor a route to it

    assert set(served_by_outbound(mesh, 30)) == mesh.instance_ids()
    assert f"{ORDERS}|gone" not in admin_clusters(mesh)
    assert admin_clusters(mesh)[ORDERS]["circuit_breaker"]["max_requests"] == 500


def served_by_outbound(mesh: Mesh, count: int) -> list[str]:
    outcomes = call_many(mesh.client.addr("outbound"), count, "probe", workers=1)
    assert not failures(outcomes), describe(outcomes)
    return [o.answer for o in outcomes if o.answer is not None]
