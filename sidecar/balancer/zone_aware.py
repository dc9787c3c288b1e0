"""Zone-aware picking: stay in the caller's zone while enough of its instances are healthy.

The rule is Envoy's locality failover with the default overprovisioning factor 1.4 (what
Istio's locality load balancing and gRPC's priority failover build on):

    local_share = min(1, 1.4 * healthy_local / total_local)

So the caller's zone takes every call while at least 1/1.4 (about 72%) of its instances are
healthy (not ejected); below that it takes a proportional share and the rest spills evenly
onto the healthy instances of the other zones; with none healthy, everything goes to the other
zones. If no instance anywhere is healthy, the local zone is used as if all were (panic
routing). Without a caller zone, or when all instances are in one zone (local or not), there is
no preference and this is just the inner picker over all instances.

Zone-aware picking does not apply to ring hash, which keeps one ring across zones (gRFC A42).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Sequence
from typing import Generic, Protocol, TypeVar

T = TypeVar("T")

OVERPROVISIONING_FACTOR = 1.4


class Picker(Protocol[T]):
    def pick(self, avoid: T | None = None) -> T | None: ...

    def set_excluded(self, excluded: Collection[T]) -> None: ...


class ZoneAware(Generic[T]):
    __slots__ = ("_all", "_factor", "_healthy", "_local", "_local_items", "_local_set",
                 "_local_share", "_random", "_remote", "_remote_items", "_split", "_with_finished")

    def __init__(self, items: Sequence[T], zone_of: Callable[[T], str], local_zone: str,
                 make_picker: Callable[[Sequence[T]], Picker[T]],
                 rng: random.Random | None = None,
                 overprovisioning: float = OVERPROVISIONING_FACTOR) -> None:
        if overprovisioning <= 0:
            raise ValueError("overprovisioning factor must be > 0")
        self._random = (rng or random.Random()).random
        items = tuple(items)
        self._local_items = tuple(i for i in items if local_zone and zone_of(i) == local_zone)
        self._local_set = frozenset(self._local_items)
        self._remote_items = tuple(i for i in items if i not in self._local_set)
        self._split = bool(self._local_items) and bool(self._remote_items)
        self._factor = overprovisioning
        if self._split:
            self._local = make_picker(self._local_items)
            self._remote = make_picker(self._remote_items)
            self._all = self._local
        else:
            self._all = self._local = self._remote = make_picker(items)
        self._with_finished = hasattr(self._all, "finished")
        self._local_share = 1.0
        self._healthy = (len(self._local_items), len(self._remote_items))

    @property
    def local_share(self) -> float:
        """Fraction of calls kept in the caller's zone at the moment."""
        return self._local_share if self._split else (1.0 if self._local_items else 0.0)

    def set_excluded(self, excluded: Collection[T]) -> None:
        """Endpoints to skip (ejected by outlier detection); replaces the previous set."""
        excluded = frozenset(excluded)
        self._local.set_excluded(excluded)
        if not self._split:
            return
        self._remote.set_excluded(excluded)
        healthy_local = sum(1 for i in self._local_items if i not in excluded)
        healthy_remote = sum(1 for i in self._remote_items if i not in excluded)
        self._healthy = (healthy_local, healthy_remote)
        if healthy_local == 0 and healthy_remote == 0:
            self._local_share = 1.0  # panic: as if none were ejected
        elif healthy_remote == 0:
            self._local_share = 1.0
        else:
            self._local_share = min(1.0, self._factor * healthy_local / len(self._local_items))

    def pick(self, avoid: T | None = None) -> T | None:
        """An endpoint from the caller's zone or, by the rule above, from the others; `avoid`
        (the endpoint a retry failed on) is replaced by one from the other group when its own
        group has nothing else."""
        if not self._split:
            return self._all.pick(avoid)
        share = self._local_share
        local = share >= 1.0 or (share > 0.0 and self._random() < share)
        first, second = (self._local, self._remote) if local else (self._remote, self._local)
        item = first.pick(avoid)
        if avoid is not None and item == avoid and self._healthy[1 if local else 0] > 0:
            other = second.pick(avoid)
            if other is not None:
                self._finished(item)
                return other
        return item

    def finished(self, item: T) -> None:
        """Forwarded to the inner picker that served `item` (least request counts calls)."""
        self._finished(item)

    def _finished(self, item: T) -> None:
        if not self._with_finished:
            return
        picker = self._local if item in self._local_set else self._remote
        picker.finished(item)  # type: ignore[attr-defined]
