"""Retry delays: exponential, capped, jittered within bounds, reproducible with a seed."""

from __future__ import annotations

import random

import pytest

from control_plane.registry.backoff import Backoff, BackoffPolicy


def test_ceiling_doubles_up_to_the_cap():
    policy = BackoffPolicy(initial=0.25, maximum=10.0)
    assert [policy.ceiling(n) for n in range(8)] == [0.25, 0.5, 1, 2, 4, 8, 10, 10]
    assert policy.ceiling(10_000) == 10.0  # no overflow however long Consul is down


def test_every_delay_stays_within_its_jitter_band():
    policy = BackoffPolicy(initial=0.1, maximum=5.0, jitter=0.5)
    rng = random.Random(7)
    for attempt in range(40):
        for _ in range(50):
            delay = policy.delay(attempt, rng)
            ceiling = policy.ceiling(attempt)
            assert ceiling * 0.5 < delay <= ceiling


def test_jitter_spreads_retries():
    policy = BackoffPolicy(initial=1.0, maximum=1.0, jitter=0.5)
    rng = random.Random(1)
    delays = [policy.delay(0, rng) for _ in range(200)]
    assert max(delays) - min(delays) > 0.4  # not lockstep
    assert sum(delays) / len(delays) == pytest.approx(0.75, abs=0.05)


def test_no_jitter_is_exact():
    policy = BackoffPolicy(initial=0.5, maximum=2.0, jitter=0.0)
    backoff = Backoff(policy, random.Random(0))
    assert [backoff.next_delay() for _ in range(4)] == [0.5, 1.0, 2.0, 2.0]


def test_seeded_backoffs_repeat_and_reset_starts_over():
    a = Backoff(BackoffPolicy(), random.Random(3))
    b = Backoff(BackoffPolicy(), random.Random(3))
    first = [a.next_delay() for _ in range(5)]
    assert first == [b.next_delay() for _ in range(5)]
    assert a.failures == 5
    a.reset()
    assert a.failures == 0
    assert a.next_delay() <= BackoffPolicy().initial


@pytest.mark.parametrize("kwargs", [{"initial": 0}, {"initial": 2, "maximum": 1},
                                    {"multiplier": 0.5}, {"jitter": 1.5}])
def test_bad_policies_are_refused(kwargs):
    with pytest.raises(ValueError):
        BackoffPolicy(**kwargs)
