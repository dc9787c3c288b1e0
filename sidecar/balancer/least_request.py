"""Least request: the less busy of two random endpoints ("power of two choices", gRFC A48).

Each endpoint has a count of calls in flight through this picker. A pick samples choice_count
endpoints and takes the one with the fewest; comparing two random endpoints is nearly as good
as scanning them all (Mitzenmacher) and costs O(1). With choice_count 2 the two samples are
distinct, so an endpoint busier than every other is never picked; with more (capped at 10 as in
gRPC) they are drawn with replacement, as in gRPC and Envoy.

pick() counts the call as started on the endpoint it returns: the caller must call finished()
with that endpoint exactly once when the call ends, whatever its status. Endpoints in
set_excluded (ejected) are not picked unless all of them are (then all are used: panic routing).
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")

MAX_CHOICE_COUNT = 10


class LeastRequest(Generic[T]):
    __slots__ = ("_active", "_cands", "_choices", "_excluded", "_index", "_items", "_random")

    def __init__(self, items: Sequence[T], rng: random.Random | None = None,
                 choice_count: int = 2) -> None:
        if choice_count < 2:
            raise ValueError("choice_count must be at least 2")
        self._items = tuple(items)
        self._index = {item: i for i, item in enumerate(self._items)}
        self._active = [0] * len(self._items)
        self._random = (rng or random.Random()).random
        self._choices = min(choice_count, MAX_CHOICE_COUNT)
        self._excluded: frozenset[T] = frozenset()
        self._cands: tuple[int, ...] = tuple(range(len(self._items)))

    def set_excluded(self, excluded: Collection[T]) -> None:
        """Endpoints to skip (ejected by outlier detection); replaces the previous set."""
        self._excluded = frozenset(excluded)
        cands = tuple(i for i, item in enumerate(self._items) if item not in self._excluded)
        self._cands = cands or tuple(range(len(self._items)))

    def in_flight(self, item: T) -> int:
        return self._active[self._index[item]]

    def finished(self, item: T) -> None:
        """A call picked on `item` ended (any status)."""
        i = self._index.get(item)
        if i is not None and self._active[i] > 0:
            self._active[i] -= 1

    def pick(self, avoid: T | None = None) -> T | None:
        """The less busy of the sampled endpoints, counted as started. `avoid` (the endpoint a
        retry failed on) is left out of the sample when another endpoint is available."""
        cands = self._cands
        n = len(cands)
        if n == 0:
            return None
        skip = -1
        if avoid is not None and n > 1:
            ai = self._index.get(avoid, -1)
            if ai >= 0 and ai in cands:
                skip = cands.index(ai)
                n -= 1
        rnd = self._random
        active = self._active
        if n == 1:
            best = cands[1 if skip == 0 else 0]
        elif self._choices == 2:
            a = int(rnd() * n)
            b = int(rnd() * (n - 1))
            if b >= a:
                b += 1
            if skip >= 0:
                a += a >= skip
                b += b >= skip
            ia, ib = cands[a], cands[b]
            best = ib if active[ib] < active[ia] else ia
        else:
            best = -1
            for _ in range(self._choices):
                s = int(rnd() * n)
                if skip >= 0:
                    s += s >= skip
                i = cands[s]
                if best < 0 or active[i] < active[best]:
                    best = i
        active[best] += 1
        return self._items[best]
