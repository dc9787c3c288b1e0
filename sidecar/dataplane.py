"""The live data plane for one snapshot: routers and per-cluster pickers over shared channels.

Built once when a snapshot is accepted and swapped in by reference. A call reads the current
DataPlane once when it starts and uses it to the end, so a config change never disturbs calls
in flight.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass

import grpc

from sidecar.balancer.round_robin import RoundRobin
from sidecar.model import Direction, Route, Snapshot
from sidecar.router import Router
from sidecar.upstream.pool import ChannelPool, UpstreamChannel


@dataclass(frozen=True, slots=True)
class Target:
    route: Route
    cluster: str
    upstream: UpstreamChannel


@dataclass(frozen=True, slots=True)
class Refusal:
    """A call the mesh itself ends, with a status that says which hop and why."""

    code: grpc.StatusCode
    message: str


class DataPlane:
    def __init__(self, snapshot: Snapshot, pool: ChannelPool, sidecar_name: str,
                 rng: random.Random | None = None) -> None:
        self.snapshot = snapshot
        self._name = sidecar_name
        rng = rng or random.Random()
        self._routers = {Direction.OUTBOUND: Router(snapshot.outbound, rng),
                         Direction.INBOUND: Router(snapshot.inbound, rng)}
        # Every cluster balances round robin for now; least_request and ring_hash are accepted
        # (and shown in /config_dump) and get their own pickers with the traffic-management work.
        self._pickers = {
            name: RoundRobin([pool.get(ep.address) for ep in cluster.endpoints
                              for _ in range(max(1, ep.weight))],
                             start=rng.randrange(1 << 16))
            for name, cluster in snapshot.clusters.items()
        }

    def addresses(self) -> Iterable[str]:
        return {ep.address for c in self.snapshot.clusters.values() for ep in c.endpoints}

    def resolve(self, direction: Direction, method: str,
                metadata: Iterable[tuple[str, str | bytes]] | None) -> Target | Refusal:
        route = self._routers[direction].match(method, metadata)
        if route is None:
            service = method.rsplit("/", 1)[0].lstrip("/") or method
            return Refusal(grpc.StatusCode.UNIMPLEMENTED,
                           f"mesh sidecar {self._name!r} ({direction.value}): no route for gRPC "
                           f"service {service!r} (method {method})")
        cluster = self._routers[direction].pick_cluster(route)
        upstream = self._pickers[cluster].pick()
        if upstream is None:
            return Refusal(grpc.StatusCode.UNAVAILABLE,
                           f"mesh sidecar {self._name!r} ({direction.value}): cluster "
                           f"{cluster!r} has no healthy endpoints")
        return Target(route, cluster, upstream)
