"""Local rate limiting (token buckets) and fault injection, with a fake clock and seeded rng."""

from __future__ import annotations

import random

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.stages.fault import NO_FAULT, FaultInjector, FaultPolicy
from sidecar.stages.rate_limit import (
    BucketSpec,
    RateLimitConfig,
    RateLimiter,
    RateLimitOverride,
    TokenBucket,
)


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def limiter(clock, max_keys=10_000, **kw):
    args = dict(service="catalog", default=BucketSpec(tokens_per_second=2, burst=3))
    args.update(kw)
    return RateLimiter(RateLimitConfig(**args), clock=clock, max_keys=max_keys)


def allowed(rl, n, method="/shop.Catalog/List", caller=None):
    return sum(rl.check(method, caller) is None for _ in range(n))


# --- token bucket -----------------------------------------------------------------------------


def test_bucket_allows_a_burst_then_the_rate():
    bucket = TokenBucket(BucketSpec(tokens_per_second=10, burst=5), now=0.0)
    assert sum(bucket.try_take(0.0) for _ in range(8)) == 5
    assert not bucket.try_take(0.05)  # half a token
    assert bucket.try_take(0.1)
    assert sum(bucket.try_take(100.0) for _ in range(8)) == 5  # refill stops at the burst
    assert not bucket.try_take(99.0)  # a clock going back adds nothing
    with pytest.raises(ValueError):
        BucketSpec(0, 1)
    with pytest.raises(ValueError):
        BucketSpec(1, 0)


# --- limiter ----------------------------------------------------------------------------------


def test_single_service_bucket_and_message():
    clock = FakeClock()
    rl = limiter(clock)
    assert allowed(rl, 3, caller="a") + allowed(rl, 3, method="/shop.Catalog/Get") == 3
    msg = rl.check("/shop.Catalog/List", None)
    assert msg == "rate limit of service 'catalog' exceeded: 2 calls/s, burst 3"
    clock.now = 0.5
    assert allowed(rl, 5) == 1
    assert rl.allowed == 4 and rl.limited == 8


def test_per_method_and_per_caller_buckets():
    clock = FakeClock()
    rl = limiter(clock, per_method=True)
    assert allowed(rl, 5, method="/s.S/A") == 3
    assert allowed(rl, 5, method="/s.S/B") == 3
    assert "method '/s.S/A'" in rl.check("/s.S/A", "x")
    rl = limiter(clock, per_caller=True)
    assert allowed(rl, 5, caller="frontend") == 3
    assert allowed(rl, 5, caller="backoffice") == 3
    assert allowed(rl, 5, caller=None) == 3  # callers without identity share one bucket
    assert "caller '(unknown)'" in rl.check("/s.S/A", None)
    rl = limiter(clock, per_method=True, per_caller=True)
    assert allowed(rl, 5, "/s.S/A", "f") == 3
    assert allowed(rl, 5, "/s.S/B", "f") == 3
    assert allowed(rl, 5, "/s.S/A", "g") == 3
    assert rl.key_count == 3


def test_overrides_first_match_wins_with_their_own_bucket():
    clock = FakeClock()
    search = RateLimitOverride(BucketSpec(1, 1), method="/shop.Catalog/Search")
    frontend = RateLimitOverride(BucketSpec(100, 10), caller="frontend")
    admin_all = RateLimitOverride(BucketSpec(100, 2), method="/shop.Admin/*", caller="ops")
    rl = limiter(clock, overrides=(search, frontend, admin_all))
    # Search is limited to 1 even for frontend: the first override wins
    assert allowed(rl, 5, "/shop.Catalog/Search", "frontend") == 1
    msg = rl.check("/shop.Catalog/Search", "frontend")
    assert "method '/shop.Catalog/Search'" in msg and "1 calls/s, burst 1" in msg
    assert allowed(rl, 20, "/shop.Catalog/List", "frontend") == 10
    assert allowed(rl, 5, "/shop.Admin/Drop", "ops") == 2
    assert allowed(rl, 5, "/shop.Admin/Drop", "other") == 3  # no match: the default bucket
    assert allowed(rl, 5, "/shop.AdminX/Drop", "ops") == 0  # prefix is per service; default
    with pytest.raises(ValueError):
        RateLimitOverride(BucketSpec(1, 1))


def test_dynamic_keys_are_bounded_and_full_buckets_are_recycled():
    clock = FakeClock()
    rl = limiter(clock, max_keys=3, per_caller=True)
    for caller in ("a", "b", "c"):
        assert allowed(rl, 1, caller=caller) == 1
    # the table is full: new callers share one overflow bucket (burst 3)
    assert allowed(rl, 2, caller="d") + allowed(rl, 2, caller="e") == 3
    assert rl.key_count == 4
    clock.now = 10.0  # every bucket refilled: they are recycled for new keys
    assert allowed(rl, 3, caller="f") == 3
    assert rl.key_count <= 4


@settings(max_examples=50, deadline=None)
@given(calls=st.lists(st.tuples(st.text(max_size=3), st.floats(0, 0.3)), max_size=200),
       max_keys=st.integers(1, 5))
def test_key_count_stays_bounded(calls, max_keys):
    clock = FakeClock()
    rl = limiter(clock, max_keys=max_keys, per_method=True, per_caller=True)
    for name, dt in calls:
        clock.now += dt
        rl.check("/m/" + name, name)
        assert rl.key_count <= max_keys + 1


@settings(max_examples=50, deadline=None)
@given(gaps=st.lists(st.floats(0, 2.0), max_size=200))
def test_a_bucket_never_allows_more_than_burst_plus_rate_times_time(gaps):
    clock = FakeClock()
    rl = limiter(clock)
    granted = 0
    for gap in gaps:
        clock.now += gap
        granted += rl.check("/m/x", None) is None
        assert granted <= 3 + 2 * clock.now + 1e-9


# --- fault injection --------------------------------------------------------------------------


def test_fault_zero_and_hundred_percent():
    always = FaultInjector(FaultPolicy(delay=0.1, abort_code=grpc.StatusCode.UNAVAILABLE),
                           random.Random(1))
    d = always.decide()
    assert d.delay == 0.1 and d.abort is grpc.StatusCode.UNAVAILABLE and d.active
    never = FaultInjector(FaultPolicy(delay=0.1, delay_percent=0,
                                      abort_code=grpc.StatusCode.UNAVAILABLE, abort_percent=0),
                          random.Random(1))
    assert all(never.decide() is NO_FAULT for _ in range(1000))
    assert not NO_FAULT.active


def test_fault_percentages_are_drawn_independently():
    inj = FaultInjector(FaultPolicy(delay=0.05, delay_percent=30,
                                    abort_code=grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    abort_percent=10), random.Random(1234))
    decisions = [inj.decide() for _ in range(20000)]
    delayed = sum(d.delay > 0 for d in decisions) / len(decisions)
    aborted = sum(d.abort is not None for d in decisions) / len(decisions)
    both = sum(d.delay > 0 and d.abort is not None for d in decisions) / len(decisions)
    assert delayed == pytest.approx(0.30, abs=0.015)
    assert aborted == pytest.approx(0.10, abs=0.01)
    assert both == pytest.approx(0.03, abs=0.006)
    # the same seed gives the same faults
    again = FaultInjector(inj.policy, random.Random(1234))
    assert [again.decide() for _ in range(500)] == decisions[:500]


def test_fault_only_delay_or_only_abort_and_message():
    delay_only = FaultInjector(FaultPolicy(delay=1.5), random.Random(1))
    assert delay_only.decide() == (1.5, None)
    abort_only = FaultInjector(FaultPolicy(abort_code=grpc.StatusCode.INTERNAL,
                                           abort_percent=100))
    assert abort_only.decide() == (0.0, grpc.StatusCode.INTERNAL)
    assert abort_only.abort_message("default") == \
        "fault injected by route 'default': aborted with INTERNAL"


def test_fault_policy_is_validated():
    for bad in (dict(), dict(delay=-1), dict(abort_code=grpc.StatusCode.OK),
                dict(delay=1, delay_percent=101), dict(delay=1, abort_percent=-1)):
        with pytest.raises(ValueError):
            FaultPolicy(**bad)
