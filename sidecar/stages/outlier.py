"""Outlier detection: which instances of a cluster are ejected, as Envoy and gRFC A50 do it.

Two detectors feed one ejection state:

- consecutive errors (Envoy's consecutive_5xx; gRPC does not implement it): an instance whose
  last `consecutive_errors` calls all failed is ejected at once (record()).
- failure percentage (A50): every `interval`, if at least `minimum_hosts` instances had
  `request_volume` calls or more since the last sweep, each such instance whose failure
  percentage is above `threshold` is ejected (with probability enforcement_percentage%).

An ejection lasts base_ejection_time x (times ejected), at most max(base, max_ejection_time);
an ejected instance returns at the first sweep after that. At every sweep an instance that is
not ejected gets one "time ejected" forgiven, so a host that recovered is not punished
forever (A50). The ejected instances are never more than max_ejection_percent of the cluster:
an ejection that would pass it does not happen (strictly; with eject_at_least_one, one
instance may always be ejected, as Envoy and gRPC allow, even if that passes the percentage).
max_ejection_percent 0 turns ejection off.

Ejection only steers the pickers (their set_excluded): if every instance ends up ejected, the
pickers use them all (panic routing). Time comes from `clock`, chance from `rng`; the shell
calls poll() periodically (e.g. every second) and passes the ejected set to the pickers when
on_change reports a change.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import grpc

T = TypeVar("T")

# Statuses that say something about the instance rather than about the request (Envoy counts
# the HTTP 5xx family; these are the gRPC codes that map onto it, UNIMPLEMENTED excepted, which
# is an answer about the method).
FAILURE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL,
                           grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED,
                           grpc.StatusCode.DATA_LOSS})


def is_failure(code: grpc.StatusCode) -> bool:
    return code in FAILURE_CODES


@dataclass(frozen=True, slots=True)
class FailurePercentage:
    threshold: int = 85  # 0-100: eject above this failure percentage
    minimum_hosts: int = 5
    request_volume: int = 50
    enforcement_percentage: int = 100

    def __post_init__(self) -> None:
        for name in ("threshold", "enforcement_percentage"):
            if not 0 <= getattr(self, name) <= 100:
                raise ValueError(f"failure_percentage.{name} must be 0-100")
        if self.minimum_hosts < 0 or self.request_volume < 0:
            raise ValueError("failure_percentage minimum_hosts and request_volume must be >= 0")


@dataclass(frozen=True, slots=True)
class OutlierConfig:
    consecutive_errors: int | None = 5  # None: off
    interval: float = 10.0
    base_ejection_time: float = 30.0
    max_ejection_time: float = 300.0
    max_ejection_percent: int = 10
    failure_percentage: FailurePercentage | None = None
    enforcing_consecutive_errors: int = 100
    eject_at_least_one: bool = False

    def __post_init__(self) -> None:
        if self.consecutive_errors is not None and self.consecutive_errors < 1:
            raise ValueError("consecutive_errors must be >= 1")
        if self.interval <= 0 or self.base_ejection_time <= 0 or self.max_ejection_time <= 0:
            raise ValueError("interval, base_ejection_time and max_ejection_time must be > 0")
        if not 0 <= self.max_ejection_percent <= 100:
            raise ValueError("max_ejection_percent must be 0-100")
        if not 0 <= self.enforcing_consecutive_errors <= 100:
            raise ValueError("enforcing_consecutive_errors must be 0-100")


class _Host:
    __slots__ = ("consecutive", "ejected_at", "ejections", "failures", "multiplier", "successes")

    def __init__(self) -> None:
        self.successes = 0
        self.failures = 0
        self.consecutive = 0
        self.ejected_at: float | None = None
        self.multiplier = 0
        self.ejections = 0  # in all, for stats


class OutlierDetector(Generic[T]):
    def __init__(self, hosts: Sequence[T], config: OutlierConfig, *,
                 clock: Callable[[], float], rng: random.Random,
                 on_change: Callable[[frozenset[T]], None] | None = None) -> None:
        self._config = config
        self._clock = clock
        self._random = rng
        self._on_change = on_change
        self._hosts: dict[T, _Host] = {h: _Host() for h in hosts}
        self._ejected: frozenset[T] = frozenset()
        self._next_sweep = clock() + config.interval
        self.generation = 0  # +1 on every change of the ejected set
        self.ejections_total = 0
        self.ejections_refused = 0  # outliers left in because of max_ejection_percent

    @property
    def ejected(self) -> frozenset[T]:
        return self._ejected

    @property
    def config(self) -> OutlierConfig:
        return self._config

    def times_ejected(self, host: T) -> int:
        return self._hosts[host].ejections

    def multiplier(self, host: T) -> int:
        return self._hosts[host].multiplier

    def record(self, host: T, success: bool) -> None:
        """The result of one call to `host` (success=False: is_failure(code) or no
        connection). Unknown hosts (removed by a config change) are ignored."""
        state = self._hosts.get(host)
        if state is None:
            return
        if success:
            state.successes += 1
            state.consecutive = 0
            return
        state.failures += 1
        state.consecutive += 1
        limit = self._config.consecutive_errors
        if limit is not None and state.consecutive >= limit and state.ejected_at is None:
            state.consecutive = 0
            if self._enforced(self._config.enforcing_consecutive_errors) and self._may_eject():
                self._eject(host, state, self._clock())
                self._changed()

    def poll(self) -> bool:
        """Run the interval sweep if it is due; True if the ejected set changed."""
        now = self._clock()
        if now < self._next_sweep:
            return False
        self._next_sweep = now + self._config.interval
        return self._sweep(now)

    def sweep(self) -> bool:
        """Run the interval sweep now (A50's timer body); True if the ejected set changed."""
        now = self._clock()
        self._next_sweep = now + self._config.interval
        return self._sweep(now)

    def update_hosts(self, hosts: Iterable[T]) -> None:
        """A new endpoint list: survivors keep their counts and ejection, new hosts start
        clean, removed hosts are forgotten."""
        old = self._hosts
        self._hosts = {h: old.get(h) or _Host() for h in hosts}
        self._changed()

    def update_config(self, config: OutlierConfig) -> None:
        """A new config: ejections and counts carry over; the next sweep is due one new
        interval after the last one."""
        self._next_sweep += config.interval - self._config.interval
        self._config = config

    # --- internals -----------------------------------------------------------------------

    def _enforced(self, percent: int) -> bool:
        return percent >= 100 or self._random.randrange(100) < percent

    def _may_eject(self) -> bool:
        config = self._config
        pct = config.max_ejection_percent
        if pct <= 0:
            return False
        ejected = sum(1 for s in self._hosts.values() if s.ejected_at is not None)
        if (ejected + 1) * 100 <= pct * len(self._hosts):
            return True
        if config.eject_at_least_one and ejected == 0:
            return True
        self.ejections_refused += 1
        return False

    def _eject(self, host: T, state: _Host, now: float) -> None:
        state.ejected_at = now
        state.multiplier += 1
        state.ejections += 1
        self.ejections_total += 1

    def _sweep(self, now: float) -> bool:
        config = self._config
        counts = []
        for host, state in self._hosts.items():
            counts.append((host, state, state.successes, state.failures))
            state.successes = 0
            state.failures = 0
        before = self._ejected
        fp = config.failure_percentage
        if fp is not None:
            volume = fp.request_volume
            judged = sum(1 for _, _, s, f in counts if s + f >= volume and s + f > 0)
            if judged >= fp.minimum_hosts:
                for host, state, s, f in counts:
                    total = s + f
                    if state.ejected_at is not None or total < volume or total == 0:
                        continue
                    if f * 100 > fp.threshold * total and self._enforced(
                            fp.enforcement_percentage):
                        if not self._may_eject():
                            break
                        self._eject(host, state, now)
        base = config.base_ejection_time
        longest = max(base, config.max_ejection_time)
        for state in self._hosts.values():
            if state.ejected_at is None:
                if state.multiplier > 0:
                    state.multiplier -= 1
            elif now >= state.ejected_at + min(base * state.multiplier, longest):
                state.ejected_at = None
        self._changed()
        return self._ejected != before

    def _changed(self) -> None:
        ejected = frozenset(h for h, s in self._hosts.items() if s.ejected_at is not None)
        if ejected != self._ejected:
            self._ejected = ejected
            self.generation += 1
            if self._on_change is not None:
                self._on_change(ejected)
