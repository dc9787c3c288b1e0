"""The live data plane for one snapshot: routers and the clusters' live state.

Built once when a snapshot is accepted and swapped in by reference. A call reads the current
DataPlane once when it starts and uses it to the end, so a config change never disturbs calls
in flight. Per-cluster state (breakers, ejections, budgets) lives in ClusterRuntime objects
that are carried from one DataPlane to the next.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import grpc

from sidecar.cluster_runtime import ClusterRuntime
from sidecar.model import Direction, Route, Snapshot
from sidecar.router import Router
from sidecar.stages.rate_limit import RateLimiter
from sidecar.upstream.pool import ChannelPool, Key


@dataclass(frozen=True, slots=True)
class Target:
    route: Route
    cluster: ClusterRuntime


@dataclass(frozen=True, slots=True)
class Refusal:
    """A call the mesh itself ends, with a status that says which hop and why."""

    code: grpc.StatusCode
    message: str


class DataPlane:
    def __init__(self, snapshot: Snapshot, pool: ChannelPool, sidecar_name: str,
                 clusters: dict[str, ClusterRuntime] | None = None, *, local_zone: str = "",
                 rng: random.Random | None = None,
                 previous_limiter: RateLimiter | None = None,
                 on_ejection: Callable[[str, int, int], None] | None = None) -> None:
        """`clusters`: the live cluster state of the previous DataPlane, reused by name."""
        self.snapshot = snapshot
        self._name = sidecar_name
        rng = rng or random.Random()
        self._routers = {Direction.OUTBOUND: Router(snapshot.outbound, rng),
                         Direction.INBOUND: Router(snapshot.inbound, rng)}
        previous = clusters or {}
        self.clusters: dict[str, ClusterRuntime] = {}
        for name, config in snapshot.clusters.items():
            runtime = previous.get(name)
            if runtime is None:
                runtime = ClusterRuntime(config, pool, local_zone=local_zone, rng=rng,
                                         on_ejection=on_ejection)
            elif runtime.config != config:
                runtime.update(config, pool)
            self.clusters[name] = runtime

        limit = snapshot.inbound_rate_limit
        self.rate_limiter: RateLimiter | None = None
        if limit is not None:
            # a limiter whose config did not change keeps its buckets across config versions
            same = previous_limiter is not None and previous_limiter.config == limit
            self.rate_limiter = previous_limiter if same else RateLimiter(limit)

    def channel_keys(self) -> Iterable[Key]:
        """The pool channels this config dials (the pool closes the others)."""
        return {ch.key for runtime in self.clusters.values() for ch in runtime.channels}

    def resolve(self, direction: Direction, method: str,
                metadata: Iterable[tuple[str, str | bytes]] | None) -> Target | Refusal:
        router = self._routers[direction]
        route = router.match(method, metadata)
        if route is None:
            service = method.rsplit("/", 1)[0].lstrip("/") or method
            return Refusal(grpc.StatusCode.UNIMPLEMENTED,
                           f"mesh sidecar {self._name!r} ({direction.value}): no route for gRPC "
                           f"service {service!r} (method {method})")
        name = router.pick_cluster(route)
        cluster = self.clusters.get(name)
        if cluster is None:
            return Refusal(grpc.StatusCode.UNAVAILABLE,
                           f"mesh sidecar {self._name!r} ({direction.value}): route "
                           f"{route.name!r} names cluster {name!r}, which is not (yet) known")
        return Target(route, cluster)

    def no_endpoint(self, direction: Direction, cluster: str) -> Refusal:
        return Refusal(grpc.StatusCode.UNAVAILABLE,
                       f"mesh sidecar {self._name!r} ({direction.value}): cluster {cluster!r} "
                       "has no healthy endpoints")
