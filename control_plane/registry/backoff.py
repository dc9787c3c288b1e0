"""Retry delays for talking to Consul: exponential, capped, with bounded jitter.

Jitter keeps several control planes (or many watchers in one) from retrying in lockstep
against a Consul that just came back; the lower bound keeps a retry storm from ever turning
into a busy loop.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    initial: float = 0.25  # seconds before the first retry (before jitter)
    maximum: float = 10.0  # cap on the delay
    multiplier: float = 2.0
    jitter: float = 0.5  # a delay is uniform in [ceiling * (1 - jitter), ceiling]

    def __post_init__(self) -> None:
        if self.initial <= 0 or self.maximum < self.initial:
            raise ValueError("backoff needs 0 < initial <= maximum")
        if self.multiplier < 1:
            raise ValueError("backoff multiplier must be >= 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("backoff jitter must be within [0, 1]")

    def ceiling(self, attempt: int) -> float:
        """The largest delay before retry number `attempt` (0-based)."""
        # (min before the power would overflow for huge attempt counts)
        exponent = min(attempt, 64)
        return min(self.maximum, self.initial * self.multiplier ** exponent)

    def delay(self, attempt: int, rng: random.Random) -> float:
        ceiling = self.ceiling(attempt)
        return ceiling * (1.0 - self.jitter * rng.random())


class Backoff:
    """The consecutive-failure counter one retry loop keeps."""

    def __init__(self, policy: BackoffPolicy | None = None,
                 rng: random.Random | None = None) -> None:
        self.policy = policy or BackoffPolicy()
        self._rng = rng or random.Random()
        self.failures = 0

    def next_delay(self) -> float:
        delay = self.policy.delay(self.failures, self._rng)
        self.failures += 1
        return delay

    def reset(self) -> None:
        self.failures = 0
