"""Circuit breaker and outlier detection, with a fake clock and seeded randomness."""

from __future__ import annotations

import random

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.balancer.weighted import WeightedRoundRobin
from sidecar.stages.breaker import CircuitBreaker
from sidecar.stages.outlier import FailurePercentage, OutlierConfig, OutlierDetector, is_failure


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --- circuit breaker --------------------------------------------------------------------------


def test_breaker_refuses_past_max_requests_and_names_itself():
    cb = CircuitBreaker("outbound|orders", max_requests=2, max_pending=1)
    assert cb.try_acquire() and cb.try_acquire()
    assert not cb.try_acquire()
    assert cb.rejected_requests == 1 and cb.active == 2
    msg = cb.request_message()
    assert "max_requests" in msg and "'outbound|orders'" in msg and "limit 2" in msg
    cb.release()
    assert cb.try_acquire()
    for _ in range(5):
        cb.release()
    assert cb.active == 0  # extra releases never go negative


def test_breaker_pending_limit():
    cb = CircuitBreaker("c", max_requests=10, max_pending=1)
    assert cb.try_enter_pending()
    assert not cb.try_enter_pending()
    assert "max_pending_requests" in cb.pending_message() and "limit 1" in cb.pending_message()
    cb.leave_pending()
    cb.leave_pending()
    assert cb.pending == 0 and cb.try_enter_pending()
    zero = CircuitBreaker("c", max_requests=1, max_pending=0)
    assert not zero.try_enter_pending() and zero.rejected_pending == 1


def test_breaker_limits_change_without_forgetting_calls_in_flight():
    cb = CircuitBreaker("c", max_requests=3)
    for _ in range(3):
        assert cb.try_acquire()
    cb.update_limits(max_requests=2, max_pending=5)
    assert not cb.try_acquire()
    cb.release()
    assert not cb.try_acquire()  # 2 in flight, limit 2
    cb.release()
    assert cb.try_acquire()
    with pytest.raises(ValueError):
        cb.update_limits(0, 1)
    with pytest.raises(ValueError):
        CircuitBreaker("c", max_requests=1, max_pending=-1)


# --- outlier detection ------------------------------------------------------------------------

HOSTS = ["h0", "h1", "h2", "h3"]


def detector(config: OutlierConfig, hosts=HOSTS, seed=1, clock=None, on_change=None):
    clock = clock or FakeClock()
    return clock, OutlierDetector(hosts, config, clock=clock, rng=random.Random(seed),
                                  on_change=on_change)


def fail_n(det, host, n):
    for _ in range(n):
        det.record(host, False)


def test_failure_codes():
    assert is_failure(grpc.StatusCode.UNAVAILABLE)
    assert is_failure(grpc.StatusCode.DEADLINE_EXCEEDED)
    assert not is_failure(grpc.StatusCode.NOT_FOUND)
    assert not is_failure(grpc.StatusCode.UNIMPLEMENTED)


def test_consecutive_errors_eject_at_once_and_a_success_resets_the_streak():
    changes = []
    _, det = detector(OutlierConfig(consecutive_errors=3, max_ejection_percent=50),
                          on_change=changes.append)
    fail_n(det, "h1", 2)
    det.record("h1", True)
    fail_n(det, "h1", 2)
    assert det.ejected == frozenset()
    det.record("h1", False)
    assert det.ejected == {"h1"}
    assert changes == [frozenset({"h1"})] and det.generation == 1
    assert det.times_ejected("h1") == 1
    det.record("unknown-host", False)  # a host of an older list is ignored


def test_ejection_lasts_base_time_times_ejections_and_ends_at_a_sweep():
    config = OutlierConfig(consecutive_errors=1, interval=10, base_ejection_time=30,
                           max_ejection_time=300, max_ejection_percent=50)
    clock, det = detector(config)
    det.record("h0", False)  # ejected at t=0 for 30 s
    clock.now = 29.9
    assert not det.sweep() and det.ejected == {"h0"}
    clock.now = 30.0
    assert det.sweep() and det.ejected == frozenset()
    assert det.multiplier("h0") == 1  # returned this sweep: not forgiven yet
    det.record("h0", False)  # second ejection at t=30: multiplier 2 -> 60 s
    assert det.multiplier("h0") == 2
    clock.now = 89.0
    det.sweep()
    assert det.ejected == {"h0"}
    clock.now = 90.0
    det.sweep()
    assert det.ejected == frozenset()
    for t in (100, 110):  # each sweep while in service forgives one ejection
        clock.now = t
        det.sweep()
    assert det.multiplier("h0") == 0


def test_ejection_time_is_capped_by_max_ejection_time():
    config = OutlierConfig(consecutive_errors=1, base_ejection_time=30, max_ejection_time=45,
                           max_ejection_percent=100)
    clock, det = detector(config, hosts=["a", "b"])
    for _ in range(5):  # eject again as soon as it returns: multiplier keeps growing
        det.record("a", False)
        clock.now += 1000
        det.sweep()
    det.record("a", False)
    assert det.multiplier("a") == 6
    start = clock.now
    clock.now = start + 44
    det.sweep()
    assert det.ejected == {"a"}
    clock.now = start + 45  # min(30 * 6, max(30, 45)) = 45 s
    det.sweep()
    assert det.ejected == frozenset()


def test_base_time_wins_over_a_smaller_max_ejection_time():
    config = OutlierConfig(consecutive_errors=1, base_ejection_time=30, max_ejection_time=5,
                           max_ejection_percent=100)
    clock, det = detector(config, hosts=["a", "b"])
    det.record("a", False)
    clock.now = 29
    det.sweep()
    assert det.ejected == {"a"}
    clock.now = 30
    det.sweep()
    assert det.ejected == frozenset()


def test_max_ejection_percent_is_never_passed():
    _, det = detector(OutlierConfig(consecutive_errors=1, max_ejection_percent=50))
    for h in HOSTS:
        det.record(h, False)
    assert len(det.ejected) == 2  # 50% of 4
    assert det.ejections_refused == 2
    # 10% of 3 instances is less than one: strictly, nothing is ever ejected
    _, det = detector(OutlierConfig(consecutive_errors=1, max_ejection_percent=10),
                          hosts=["a", "b", "c"])
    fail_n(det, "a", 5)
    assert det.ejected == frozenset()
    # ... unless one ejection is always allowed, as Envoy and gRPC do
    _, det = detector(OutlierConfig(consecutive_errors=1, max_ejection_percent=10,
                                        eject_at_least_one=True), hosts=["a", "b", "c"])
    fail_n(det, "a", 1)
    fail_n(det, "b", 1)
    assert det.ejected == {"a"}
    _, det = detector(OutlierConfig(consecutive_errors=1, max_ejection_percent=0,
                                        eject_at_least_one=True))
    fail_n(det, "h0", 3)
    assert det.ejected == frozenset()  # 0% turns ejection off


def test_all_instances_ejected_and_pickers_still_route_everywhere():
    picker = WeightedRoundRobin(["a", "b"])
    clock = FakeClock()
    det = OutlierDetector(["a", "b"], OutlierConfig(consecutive_errors=1,
                                                    max_ejection_percent=100),
                          clock=clock, rng=random.Random(1), on_change=picker.set_excluded)
    det.record("a", False)
    assert {picker.pick() for _ in range(10)} == {"b"}
    det.record("b", False)
    assert det.ejected == {"a", "b"}
    assert {picker.pick() for _ in range(10)} == {"a", "b"}  # panic: all ejected, all used


def _fp_config(**kw):
    fp = dict(threshold=50, minimum_hosts=3, request_volume=10)
    fp.update(kw)
    return OutlierConfig(consecutive_errors=None, interval=10, max_ejection_percent=50,
                         failure_percentage=FailurePercentage(**fp))


def _load(det, failures: dict[str, int], volume=20):
    for host, f in failures.items():
        fail_n(det, host, f)
        for _ in range(volume - f):
            det.record(host, True)


def test_failure_percentage_ejects_hosts_above_the_threshold_at_the_interval():
    clock, det = detector(_fp_config())
    _load(det, {"h0": 11, "h1": 10, "h2": 0, "h3": 2})
    assert det.ejected == frozenset()  # nothing until the interval sweep
    clock.now = 9.9
    assert not det.poll()
    clock.now = 10.0
    assert det.poll()
    assert det.ejected == {"h0"}  # 55% > 50%; exactly 50% stays
    # counts start over each interval: the next interval is judged on its own calls
    clock.now = 20.0
    _load(det, {"h1": 2, "h2": 2, "h3": 2})
    det.poll()
    assert det.ejected == {"h0"}


def test_failure_percentage_needs_minimum_hosts_with_request_volume():
    clock, det = detector(_fp_config(minimum_hosts=3))
    _load(det, {"h0": 20, "h1": 0})
    _load(det, {"h2": 0}, volume=9)  # below request_volume: not judged, not counted
    clock.now = 10
    det.poll()
    assert det.ejected == frozenset()
    clock.now = 20
    _load(det, {"h0": 20, "h1": 0, "h2": 0})
    det.poll()
    assert det.ejected == {"h0"}
    clock.now = 30
    _, low = detector(_fp_config(minimum_hosts=1))
    _load(low, {"h0": 5}, volume=5)  # a host under request_volume is never ejected
    low.sweep()
    assert low.ejected == frozenset()


def test_failure_percentage_enforcement_is_a_seeded_draw():
    ejected = 0
    for seed in range(200):
        _, det = detector(_fp_config(enforcement_percentage=30), seed=seed)
        _load(det, {"h0": 20, "h1": 0, "h2": 0})
        det.sweep()
        ejected += "h0" in det.ejected
    assert 40 <= ejected <= 80


def test_failure_percentage_respects_max_ejection_percent():
    _, det = detector(_fp_config())  # 50% of 4: two at most
    _load(det, {"h0": 20, "h1": 20, "h2": 20, "h3": 20})
    det.sweep()
    assert len(det.ejected) == 2


def test_update_hosts_keeps_survivors_state_and_config_changes_keep_ejections():
    changes = []
    _, det = detector(OutlierConfig(consecutive_errors=2, max_ejection_percent=100),
                          on_change=changes.append)
    fail_n(det, "h0", 2)
    det.record("h1", False)
    det.update_hosts(["h0", "h1", "h9"])
    assert det.ejected == {"h0"}
    det.record("h1", False)  # the streak survived the update
    assert det.ejected == {"h0", "h1"}
    det.update_hosts(["h1", "h9"])  # h0 removed: forgotten
    assert det.ejected == {"h1"} and changes[-1] == {"h1"}
    det.update_config(OutlierConfig(consecutive_errors=1, interval=5, max_ejection_percent=100))
    assert det.config.interval == 5 and det.ejected == {"h1"}


def test_config_is_validated():
    for bad in (dict(consecutive_errors=0), dict(interval=0), dict(base_ejection_time=0),
                dict(max_ejection_percent=101), dict(enforcing_consecutive_errors=-1)):
        with pytest.raises(ValueError):
            OutlierConfig(**bad)
    for bad in (dict(threshold=101), dict(enforcement_percentage=-1), dict(minimum_hosts=-1)):
        with pytest.raises(ValueError):
            FailurePercentage(**bad)


ops = st.lists(st.one_of(
    st.tuples(st.just("record"), st.integers(0, 9), st.sampled_from([False, False, True])),
    st.tuples(st.just("tick"), st.floats(0.0, 40.0), st.just(False)),
), max_size=250)


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 10), pct=st.integers(0, 100), at_least_one=st.booleans(),
       consecutive=st.integers(1, 3), ops=ops, seed=st.integers(0, 1000))
def test_ejection_percent_is_never_exceeded(n, pct, at_least_one, consecutive, ops, seed):
    hosts = [f"h{i}" for i in range(n)]
    config = OutlierConfig(consecutive_errors=consecutive, interval=10, base_ejection_time=15,
                           max_ejection_percent=pct, eject_at_least_one=at_least_one,
                           failure_percentage=FailurePercentage(threshold=30, minimum_hosts=1,
                                                                request_volume=2))
    clock = FakeClock()
    det = OutlierDetector(hosts, config, clock=clock, rng=random.Random(seed))
    allowed = n * pct // 100
    if at_least_one and pct > 0:
        allowed = max(allowed, 1)
    for kind, a, b in ops:
        if kind == "record":
            det.record(hosts[int(a) % n], b)
        else:
            clock.now += a
            det.poll()
        assert len(det.ejected) <= allowed
