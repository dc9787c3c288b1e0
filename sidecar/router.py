"""Route selection: which route takes a call, and which cluster of a weighted split serves it.

Routes match on the :path and on request metadata. Most calls only need the path, so the routes
whose path matcher covers a path are computed once per path and cached; headers are looked at
only when a candidate route has header conditions.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Iterable

from sidecar.model import Route, RouteTable

_CACHE_LIMIT = 4096  # paths come from the network: bound the cache


class Router:
    __slots__ = ("_cache", "_cum_weights", "_random", "_table")

    def __init__(self, table: RouteTable, rng: random.Random | None = None) -> None:
        self._table = table
        self._cache: dict[str, tuple[Route, ...]] = {}
        self._random = rng or random.Random()
        self._cum_weights = {id(r): list(itertools.accumulate(c.weight for c in r.clusters))
                             for r in table.routes}

    @property
    def table(self) -> RouteTable:
        return self._table

    def _candidates(self, path: str) -> tuple[Route, ...]:
        found = self._cache.get(path)
        if found is None:
            found = tuple(r for r in self._table.routes if r.path.matches(path))
            if len(self._cache) < _CACHE_LIMIT:
                self._cache[path] = found
        return found

    def match(self, path: str, metadata: Iterable[tuple[str, str | bytes]] | None) -> Route | None:
        candidates = self._candidates(path)
        if not candidates:
            return None
        first = candidates[0]
        if not first.headers:
            return first
        headers: dict[str, list[str]] = {}
        for key, value in metadata or ():
            if isinstance(value, str):
                headers.setdefault(key, []).append(value)
        for route in candidates:
            if all(h.matches(headers.get(h.name)) for h in route.headers):
                return route
        return None

    def pick_cluster(self, route: Route) -> str:
        clusters = route.clusters
        if len(clusters) == 1:
            return clusters[0].name
        cum = self._cum_weights[id(route)]
        point = self._random.random() * cum[-1]
        return clusters[bisect.bisect_right(cum, point)].name
