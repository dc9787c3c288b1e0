"""Round robin over a cluster's endpoints: the default, as in gRPC and Envoy."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Generic, TypeVar

T = TypeVar("T")


class RoundRobin(Generic[T]):
    """Cycles through a fixed list; a new endpoint list gets a new picker.

    The starting offset is injectable so that many sidecars started together do not all send
    their first call to the same instance.
    """

    __slots__ = ("_counter", "_items", "_n")

    def __init__(self, items: Sequence[T], start: int = 0) -> None:
        self._items = tuple(items)
        self._n = len(self._items)
        self._counter = itertools.count(start)

    def pick(self) -> T | None:
        if not self._n:
            return None
        return self._items[next(self._counter) % self._n]
