"""Fault injection on a route: delay and/or abort a share of calls on purpose (gRFC A33).

Applied by the caller's sidecar before the call leaves, so the service never sees an aborted
call. Delay and abort are decided independently, each with its own percentage; a call can be
both delayed and then aborted, as in Envoy's fault filter (delay first, then abort).
Percentages are fractional (0-100); 0 never draws a random number and neither does 100.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import NamedTuple

import grpc


@dataclass(frozen=True, slots=True)
class FaultPolicy:
    delay: float | None = None  # seconds to hold the call
    delay_percent: float = 100.0
    abort_code: grpc.StatusCode | None = None
    abort_percent: float = 100.0

    def __post_init__(self) -> None:
        if self.delay is None and self.abort_code is None:
            raise ValueError("a fault needs a delay, an abort or both")
        if self.delay is not None and self.delay < 0:
            raise ValueError("fault delay must be >= 0")
        if self.abort_code is grpc.StatusCode.OK:
            raise ValueError("fault abort code cannot be OK")
        for name in ("delay_percent", "abort_percent"):
            if not 0.0 <= getattr(self, name) <= 100.0:
                raise ValueError(f"fault {name} must be 0-100")


class FaultDecision(NamedTuple):
    delay: float  # seconds; 0: none
    abort: grpc.StatusCode | None

    @property
    def active(self) -> bool:
        return self.delay > 0 or self.abort is not None


NO_FAULT = FaultDecision(0.0, None)


class FaultInjector:
    """Draws the fault for each call of one route; the four possible outcomes are built once."""

    __slots__ = ("_abort", "_abort_p", "_both", "_delay", "_delay_p", "_random", "policy")

    def __init__(self, policy: FaultPolicy, rng: random.Random | None = None) -> None:
        self.policy = policy
        self._random = (rng or random.Random()).random
        self._delay_p = policy.delay_percent / 100.0 if policy.delay is not None else 0.0
        self._abort_p = policy.abort_percent / 100.0 if policy.abort_code is not None else 0.0
        self._delay = FaultDecision(policy.delay or 0.0, None)
        self._abort = FaultDecision(0.0, policy.abort_code)
        self._both = FaultDecision(policy.delay or 0.0, policy.abort_code)

    def decide(self) -> FaultDecision:
        delayed = self._hit(self._delay_p)
        aborted = self._hit(self._abort_p)
        if delayed:
            return self._both if aborted else self._delay
        return self._abort if aborted else NO_FAULT

    def _hit(self, p: float) -> bool:
        if p <= 0.0:
            return False
        if p >= 1.0:
            return True
        return self._random() < p

    def abort_message(self, route: str) -> str:
        code = self.policy.abort_code
        name = code.name if code is not None else "?"
        return f"fault injected by route '{route}': aborted with {name}"
