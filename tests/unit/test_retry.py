"""Retry decisions (gRFC A6), retry budget and retry throttling, with a fake clock."""

from __future__ import annotations

import random

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.stages.retry import (
    BUDGET,
    COMMITTED,
    DEADLINE,
    EXHAUSTED,
    NOT_RETRYABLE,
    PUSHBACK_STOP,
    PUSHED_BACK,
    RetryPolicy,
    RetryState,
    counts_as_throttle_failure,
    is_committed,
    parse_pushback,
    pushback_delay,
    with_previous_attempts,
)
from sidecar.stages.retry_budget import RetryBudget, RetryThrottle

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


def policy(**kw) -> RetryPolicy:
    args = dict(max_attempts=4, retryable_codes=frozenset({UNAVAILABLE}),
                initial_backoff=0.1, max_backoff=0.5, backoff_multiplier=2.0)
    args.update(kw)
    return RetryPolicy(**args)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Allow:
    def __init__(self, answer: bool) -> None:
        self.answer = answer
        self.asked = 0

    def try_retry(self) -> bool:
        self.asked += 1
        return self.answer


def fail(state: RetryState, code=UNAVAILABLE, trailers=None, *, committed=False, now=0.0,
         deadline=None, budget=None):
    return state.on_failure(code, trailers, committed=committed, now=now, deadline=deadline,
                            budget=budget)


# --- policy -----------------------------------------------------------------------------------


def test_max_attempts_is_capped_at_five_and_policy_is_validated():
    assert policy(max_attempts=9).max_attempts == 5
    assert policy(max_attempts=2).max_attempts == 2
    for bad in (dict(max_attempts=0), dict(initial_backoff=0), dict(max_backoff=-1),
                dict(backoff_multiplier=0), dict(per_try_timeout=0),
                dict(max_buffer_bytes=-1), dict(retryable_codes=frozenset({grpc.StatusCode.OK}))):
        with pytest.raises(ValueError):
            policy(**bad)


def test_backoff_caps_grow_exponentially_up_to_the_max():
    p = policy(initial_backoff=0.1, max_backoff=0.5, backoff_multiplier=2.0)
    assert [p.backoff_cap(n) for n in (1, 2, 3, 4)] == [0.1, 0.2, 0.4, 0.5]
    assert policy(backoff_multiplier=1.0).backoff_cap(4) == 0.1


def test_backoff_is_uniform_between_zero_and_the_cap():
    p = policy(max_attempts=5)
    highs = [0.0] * 4
    for seed in range(400):
        state = RetryState(p, random.Random(seed))
        for n in range(1, 5):
            d = fail(state)
            assert d.retry and 0.0 <= d.delay <= p.backoff_cap(n)
            highs[n - 1] = max(highs[n - 1], d.delay)
        assert fail(state) is EXHAUSTED
    # full jitter reaches close to each cap
    assert all(h > 0.9 * p.backoff_cap(n) for n, h in enumerate(highs, 1))
    # the draw is exactly rng.uniform(0, cap): reproducible from the seed
    ref = random.Random(42)
    state = RetryState(p, random.Random(42))
    assert fail(state).delay == ref.uniform(0.0, 0.1)
    assert fail(state).delay == ref.uniform(0.0, 0.2)


def test_attempts_count_and_exhaust():
    state = RetryState(policy(max_attempts=3), random.Random(1))
    assert state.attempts == 1 and state.previous_attempts == 0
    assert fail(state).retry and state.previous_attempts == 1
    assert fail(state).retry and state.attempts == 3
    assert fail(state) is EXHAUSTED
    assert state.attempts == 3


def test_non_retryable_codes_and_committed_calls_are_not_retried():
    state = RetryState(policy(), random.Random(1))
    assert fail(state, grpc.StatusCode.INVALID_ARGUMENT) is NOT_RETRYABLE
    assert fail(state, grpc.StatusCode.INVALID_ARGUMENT, [("grpc-retry-pushback-ms", "5")]) \
        is NOT_RETRYABLE
    assert fail(state, committed=True) is COMMITTED
    assert state.attempts == 1


def test_commit_rules():
    p = policy(max_buffer_bytes=1000)
    assert not is_committed(False, 0, p)
    assert not is_committed(False, 1000, p)  # exactly at the limit still fits
    assert is_committed(False, 1001, p)
    assert is_committed(True, 0, p)  # response headers arrived
    assert is_committed(False, 1, policy(max_buffer_bytes=0))


# --- pushback ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [
    ("250", 0.25), ("0", 0.0), (b"100", 0.1), ("2147483647", 2147483.647),
    ("-1", PUSHBACK_STOP), ("-250", PUSHBACK_STOP), ("abc", PUSHBACK_STOP), ("", PUSHBACK_STOP),
    ("1.5", PUSHBACK_STOP), ("007", PUSHBACK_STOP), ("+5", PUSHBACK_STOP), (" 5", PUSHBACK_STOP),
    ("2147483648", PUSHBACK_STOP), ("99999999999", PUSHBACK_STOP), (b"\xff", PUSHBACK_STOP),
])
def test_pushback_values(value, expected):
    assert pushback_delay(value) == expected


def test_parse_pushback_reads_the_first_value_or_none():
    assert parse_pushback(None) is None
    assert parse_pushback([("x", "1")]) is None
    assert parse_pushback([("grpc-retry-pushback-ms", "20"), ("grpc-retry-pushback-ms", "-1")]) \
        == 0.02


def test_pushback_sets_the_delay_exactly_and_backoff_restarts_after_it():
    p = policy(max_attempts=5, initial_backoff=0.1, max_backoff=10.0)
    state = RetryState(p, random.Random(3))
    assert fail(state).delay <= 0.1  # 1st retry: cap 0.1
    assert fail(state).delay <= 0.2  # 2nd: cap 0.2
    d = fail(state, trailers=[("grpc-retry-pushback-ms", "1234")])
    assert d.retry and d.delay == 1.234
    after = fail(state)
    assert after.retry and after.delay <= 0.1  # restarted from initial_backoff


def test_pushback_stop_ends_the_call_and_spends_no_budget():
    budget = Allow(True)
    state = RetryState(policy(), random.Random(1))
    assert fail(state, trailers=[("grpc-retry-pushback-ms", "-5")], budget=budget) is PUSHED_BACK
    assert fail(state, trailers=[("grpc-retry-pushback-ms", "soon")], budget=budget) \
        is PUSHED_BACK
    assert budget.asked == 0 and state.attempts == 1


def test_pushback_does_not_lift_max_attempts():
    state = RetryState(policy(max_attempts=2), random.Random(1))
    assert fail(state).retry
    assert fail(state, trailers=[("grpc-retry-pushback-ms", "1")]) is EXHAUSTED


# --- deadline and budget ----------------------------------------------------------------------


def test_no_retry_when_the_deadline_is_shorter_than_the_backoff():
    budget = Allow(True)
    state = RetryState(policy(), random.Random(1))
    # pushback 500 ms with 200 ms left: the retry could not start before the deadline
    d = fail(state, trailers=[("grpc-retry-pushback-ms", "500")], now=10.0, deadline=10.2,
             budget=budget)
    assert d is DEADLINE
    assert budget.asked == 0 and state.attempts == 1
    # a backoff draw that lands past the deadline gives up too
    tiny = RetryState(policy(initial_backoff=5.0, max_backoff=5.0), random.Random(2))
    assert fail(tiny, now=0.0, deadline=0.0001) is DEADLINE
    # an expired deadline never retries, even with a zero delay
    assert fail(state, trailers=[("grpc-retry-pushback-ms", "0")], now=11.0, deadline=11.0) \
        is DEADLINE
    # with time to spare it retries
    assert fail(state, now=10.0, deadline=100.0).retry


def test_budget_is_asked_last_and_exhausted_budget_stops_retries():
    state = RetryState(policy(), random.Random(1))
    no = Allow(False)
    assert fail(state, budget=no) is BUDGET
    assert no.asked == 1 and state.attempts == 1
    yes = Allow(True)
    assert fail(state, budget=yes).retry and yes.asked == 1


def test_attempt_deadline_is_the_per_try_timeout_or_the_call_deadline():
    state = RetryState(policy(per_try_timeout=0.5), random.Random(1))
    assert state.attempt_deadline(10.0, None) == 10.5
    assert state.attempt_deadline(10.0, 12.0) == 10.5
    assert state.attempt_deadline(10.0, 10.2) == 10.2
    plain = RetryState(policy(), random.Random(1))
    assert plain.attempt_deadline(10.0, 12.0) == 12.0
    assert plain.attempt_deadline(10.0, None) is None


# --- metadata ---------------------------------------------------------------------------------


def test_previous_attempts_header():
    md = (("x-user", "u1"), ("trace-bin", b"\x00"))
    assert with_previous_attempts(md, 0) is md
    assert with_previous_attempts(md, 2) == (*md, ("grpc-previous-rpc-attempts", "2"))
    theirs = (("grpc-previous-rpc-attempts", "1"), ("x-user", "u1"))
    assert with_previous_attempts(theirs, 1) == (("x-user", "u1"),
                                                 ("grpc-previous-rpc-attempts", "2"))
    junk = (("grpc-previous-rpc-attempts", "many"), ("grpc-previous-rpc-attempts", "3"))
    assert with_previous_attempts(junk, 1) == (("grpc-previous-rpc-attempts", "1"),)


def test_throttle_failures_are_retryable_codes_or_pushback_stop():
    p = policy()
    assert counts_as_throttle_failure(p, UNAVAILABLE, None)
    assert not counts_as_throttle_failure(p, grpc.StatusCode.INVALID_ARGUMENT, None)
    assert counts_as_throttle_failure(p, grpc.StatusCode.INTERNAL,
                                      [("grpc-retry-pushback-ms", "-1")])


# --- retry budget -----------------------------------------------------------------------------


def test_budget_floor_lets_a_quiet_service_retry_then_runs_out():
    clock = FakeClock()
    budget = RetryBudget(0.2, 10, window=10.0, clock=clock)
    assert budget.allowance() == 100
    assert sum(budget.try_retry() for _ in range(150)) == 100
    assert budget.refused == 50 and budget.granted == 100


def test_budget_ratio_of_requests():
    clock = FakeClock()
    budget = RetryBudget(0.2, 0, window=10.0, clock=clock)
    assert not budget.try_retry()  # no requests, no floor: nothing to spend
    for _ in range(1000):
        budget.record_request()
    assert sum(budget.try_retry() for _ in range(500)) == 200
    assert budget.window_counts == (1000, 200)


def test_budget_window_slides():
    clock = FakeClock(0.0)
    budget = RetryBudget(0.5, 0, window=10.0, buckets=10, clock=clock)
    for _ in range(10):
        budget.record_request()
    assert sum(budget.try_retry() for _ in range(10)) == 5
    clock.now = 5.0
    for _ in range(10):
        budget.record_request()
    assert sum(budget.try_retry() for _ in range(10)) == 5
    clock.now = 10.5  # the first slice (t in [0, 1)) expired: 10 requests, 5 retries remain
    assert budget.window_counts == (10, 5)
    assert not budget.try_retry()
    clock.now = 100.0  # everything expired
    assert budget.window_counts == (0, 0)
    with pytest.raises(ValueError):
        RetryBudget(-0.1)
    with pytest.raises(ValueError):
        RetryBudget(0.2, -1)
    with pytest.raises(ValueError):
        RetryBudget(0.2, 1, window=0)


events = st.lists(st.tuples(st.sampled_from(["request", "retry", "tick"]),
                            st.floats(0.0, 3.0)), max_size=300)


@settings(max_examples=80, deadline=None)
@given(ratio=st.sampled_from([0.0, 0.1, 0.2, 0.5, 1.0]), floor=st.sampled_from([0, 0.5, 2]),
       buckets=st.integers(1, 10), events=events)
def test_budget_is_never_exceeded(ratio, floor, buckets, events):
    """Whenever a retry is granted at time t: the retries granted in the last
    window*(buckets-1)/buckets seconds are at most ratio * (requests in the last window) +
    floor * window."""
    window = 10.0
    clock = FakeClock(0.0)
    budget = RetryBudget(ratio, floor, window=window, buckets=buckets, clock=clock)
    requests: list[float] = []
    retries: list[float] = []
    for kind, dt in events:
        if kind == "tick":
            clock.now += dt
        elif kind == "request":
            budget.record_request()
            requests.append(clock.now)
        elif budget.try_retry():
            retries.append(clock.now)
            t = clock.now
            short = window * (buckets - 1) / buckets
            recent_retries = sum(1 for r in retries if r > t - short)
            recent_requests = sum(1 for r in requests if r > t - window)
            assert recent_retries <= ratio * recent_requests + floor * window + 1e-9


# --- retry throttling (A6) --------------------------------------------------------------------


def test_throttle_follows_the_a6_token_rules():
    throttle = RetryThrottle(max_tokens=10, token_ratio=0.1)
    assert throttle.tokens == 10 and throttle.try_retry()
    for _ in range(5):
        throttle.record_failure()
    assert throttle.tokens == 5
    assert not throttle.try_retry()  # at the threshold (max/2): no retries
    throttle.record_success()
    assert throttle.tokens == pytest.approx(5.1) and throttle.try_retry()
    for _ in range(50):
        throttle.record_failure()
    assert throttle.tokens == 0
    for _ in range(200):
        throttle.record_success()
    assert throttle.tokens == 10
    assert throttle.granted == 2 and throttle.refused == 1


def test_throttle_keeps_three_decimals_and_validates():
    throttle = RetryThrottle(max_tokens=3, token_ratio=0.5466)  # treated as 0.546
    throttle.record_failure()
    throttle.record_failure()
    throttle.record_success()
    assert throttle.tokens == 1.546
    assert throttle.try_retry()  # above the threshold 1.5
    throttle.record_failure()
    assert not throttle.try_retry()
    for bad in (dict(max_tokens=0, token_ratio=0.1), dict(max_tokens=1001, token_ratio=0.1),
                dict(max_tokens=10, token_ratio=0), dict(max_tokens=10, token_ratio=0.0004)):
        with pytest.raises(ValueError):
            RetryThrottle(**bad)
