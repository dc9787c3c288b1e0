"""Weighted round robin over a cluster's endpoints, skipping ejected ones.

The schedule is computed once (per endpoint list and per change of the ejected set), so a pick
is one counter step and one tuple index. It is the earliest-deadline-first order: an endpoint of
weight w is due w times per period, so over each period every endpoint gets exactly
its weight's share, and each endpoint's turns are spread evenly over the period (at the middle
of its 1/w slices) instead of sent in a burst. Equal weights give plain round robin.

Weights: 0 means "send nothing" (a drained endpoint). If every weight is 0 there is nothing to
pick and pick() returns None. Ejected endpoints (set_excluded) are skipped; if every endpoint
with a weight is ejected, they are all used anyway (Envoy's "panic" routing: an all-ejected
cluster is more likely a shared cause than N bad instances, and failing every call helps no one).
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from collections.abc import Collection, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")

SCHEDULE_LIMIT = 4096  # entries per period; beyond it picks are weighted-random instead


class WeightedRoundRobin(Generic[T]):
    __slots__ = ("_counter", "_cum", "_excluded", "_items", "_rng", "_schedule", "_weights")

    def __init__(self, items: Sequence[T], weights: Sequence[int] | None = None, *,
                 start: int = 0, rng: random.Random | None = None) -> None:
        self._items = tuple(items)
        if weights is None:
            self._weights = (1,) * len(self._items)
        else:
            if len(weights) != len(self._items):
                raise ValueError(f"{len(weights)} weights for {len(self._items)} endpoints")
            if any(w < 0 for w in weights):
                raise ValueError("endpoint weights must be >= 0")
            self._weights = tuple(int(w) for w in weights)
        self._rng = rng or random.Random()
        self._counter = itertools.count(start)
        self._excluded: frozenset[T] = frozenset()
        self._schedule: tuple[T, ...] = ()
        self._cum: tuple[tuple[int, ...], tuple[T, ...]] | None = None
        self._rebuild()

    @property
    def candidates(self) -> tuple[T, ...]:
        """The endpoints picks currently go to (distinct, in list order)."""
        if self._cum is not None:
            return self._cum[1]
        seen = dict.fromkeys(self._schedule)
        return tuple(i for i in self._items if i in seen)

    def set_excluded(self, excluded: Collection[T]) -> None:
        """Endpoints to skip (ejected by outlier detection); replaces the previous set."""
        new = frozenset(excluded)
        if new != self._excluded:
            self._excluded = new
            self._rebuild()

    def _rebuild(self) -> None:
        live = [(i, w) for i, w in zip(self._items, self._weights, strict=True) if w > 0]
        usable = [(i, w) for i, w in live if i not in self._excluded] or live
        self._schedule = ()
        self._cum = None
        if not usable:
            return
        g = 0
        for _, w in usable:
            g = math.gcd(g, w)
        reduced = [(i, w // g) for i, w in usable]
        total = sum(w for _, w in reduced)
        if total <= SCHEDULE_LIMIT:
            # the k-th turn of a weight-w endpoint is due at (k - 1/2) / w of the period
            due = sorted(((2 * k - 1) / (2 * w), idx) for idx, (_, w) in enumerate(reduced)
                         for k in range(1, w + 1))
            self._schedule = tuple(reduced[idx][0] for _, idx in due)
        else:
            self._cum = (tuple(itertools.accumulate(w for _, w in reduced)),
                         tuple(i for i, _ in reduced))

    def pick(self, avoid: T | None = None) -> T | None:
        """The next endpoint; `avoid` (the endpoint a retry failed on) is skipped when another
        endpoint is available."""
        schedule = self._schedule
        if schedule:
            item = schedule[next(self._counter) % len(schedule)]
        elif self._cum is not None:
            cum, items = self._cum
            item = items[bisect.bisect_right(cum, self._rng.random() * cum[-1])]
        else:
            return None
        if avoid is not None and item == avoid:
            return self._other_than(avoid, item)
        return item

    def _other_than(self, avoid: T, fallback: T) -> T:
        others = [c for c in self.candidates if c != avoid]
        if not others:
            return fallback
        weight = dict(zip(self._items, self._weights, strict=True))
        cum = list(itertools.accumulate(weight[c] for c in others))
        return others[bisect.bisect_right(cum, self._rng.random() * cum[-1])]
