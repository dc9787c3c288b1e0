"""The live state of one upstream cluster: its picker, circuit breaker, outlier detector and
retry budget.

Config is immutable, but this state must outlive a config version: a breaker's in-flight
count, an ejected instance and a retry budget's window would all be reset (and a sick instance
let back in) if every push rebuilt them. So a ClusterRuntime is kept per cluster name across
snapshots and told about new config with `update`, which rebuilds only the picker.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from typing import Any

from sidecar.balancer.least_request import LeastRequest
from sidecar.balancer.ring_hash import RingHash
from sidecar.balancer.weighted import WeightedRoundRobin
from sidecar.balancer.zone_aware import ZoneAware
from sidecar.model import Cluster, Endpoint, LbPolicy, RetryBudgetConfig, UpstreamTlsSpec
from sidecar.stages.breaker import CircuitBreaker
from sidecar.stages.outlier import OutlierDetector
from sidecar.stages.retry_budget import RetryBudget
from sidecar.upstream.pool import ChannelPool, UpstreamChannel


class ClusterRuntime:
    __slots__ = (
        "_budget_config",
        "_clock",
        "_last_ejected",
        "_local_zone",
        "_on_ejection",
        "_random",
        "breaker",
        "budget",
        "channels",
        "config",
        "detector",
        "finished",
        "picker",
        "ring",
        "stats",
        "zone_of",
    )

    def __init__(self, config: Cluster, pool: ChannelPool, *, local_zone: str = "",
                 rng: random.Random | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 on_ejection: Callable[[str, int, int], None] | None = None) -> None:
        """on_ejection(cluster, newly_ejected, ejected_now): for the metrics."""
        self._on_ejection = on_ejection
        self._last_ejected: frozenset[UpstreamChannel] = frozenset()
        # per endpoint address: [calls that succeeded, calls that failed], for /clusters
        self.stats: dict[str, list[int]] = {}
        self._random = rng or random.Random()
        self._clock = clock
        self._local_zone = local_zone
        self.breaker = CircuitBreaker(config.name, config.max_requests, config.max_pending)
        self.detector: OutlierDetector[UpstreamChannel] | None = None
        self.budget: RetryBudget | None = None
        self._budget_config: RetryBudgetConfig | None = None
        self.picker: Any = None
        self.ring: RingHash[UpstreamChannel] | None = None
        self.finished: Callable[[UpstreamChannel], None] | None = None
        self.zone_of: dict[UpstreamChannel, str] = {}
        self.config = config
        self.update(config, pool)

    def update(self, config: Cluster, pool: ChannelPool) -> None:
        """Apply a new version of this cluster's config, keeping counts and ejections."""
        self.config = config
        channels = [dial(pool, ep, config.tls) for ep in config.endpoints]
        self.channels: tuple[UpstreamChannel, ...] = tuple(channels)
        weights = [ep.weight for ep in config.endpoints]
        self.zone_of = {ch: ep.zone for ch, ep in zip(channels, config.endpoints, strict=True)}
        self.breaker.update_limits(config.max_requests, config.max_pending)
        self.picker = self._picker(config, channels, weights)
        self.ring = self.picker if isinstance(self.picker, RingHash) else None
        self.finished = getattr(self.picker, "finished", None)
        if config.outlier is None:
            self.detector = None
        elif self.detector is None:
            self.detector = OutlierDetector(channels, config.outlier, clock=self._clock,
                                            rng=self._random, on_change=self._ejected)
        else:
            self.detector.update_config(config.outlier)
            self.detector.update_hosts(channels)
        if self.detector is not None:
            self.picker.set_excluded(self.detector.ejected)
        budget = config.retry_budget
        if budget is None:
            self.budget = None
        elif self.budget is None or budget != self._budget_config:
            self.budget = RetryBudget(budget.retry_ratio, budget.min_retries_per_second,
                                      clock=self._clock)
        self._budget_config = budget

    def _picker(self, config: Cluster, channels: Sequence[UpstreamChannel],
                weights: Sequence[int]) -> Any:
        policy = config.lb_policy
        rng = self._random
        if policy is LbPolicy.RING_HASH:
            # Consistent hashing must not be split by zone: a key maps to one instance.
            return RingHash(channels, key=lambda ch: ch.address, weights=weights, rng=rng)

        def make(items: Sequence[UpstreamChannel]) -> Any:
            if policy is LbPolicy.LEAST_REQUEST:
                return LeastRequest(items, rng)
            item_weights = [weights[channels.index(i)] for i in items]
            return WeightedRoundRobin(items, item_weights, start=rng.randrange(1 << 16),
                                      rng=rng)

        if self._local_zone and any(self.zone_of.values()):
            return ZoneAware(channels, self.zone_of.__getitem__, self._local_zone, make, rng)
        return make(channels)

    def _ejected(self, ejected: frozenset[UpstreamChannel]) -> None:
        if self.picker is not None:
            self.picker.set_excluded(ejected)
        if self._on_ejection is not None:
            self._on_ejection(self.config.name, len(ejected - self._last_ejected), len(ejected))
        self._last_ejected = ejected

    # --- per call -----------------------------------------------------------------------
    def pick(self, hash_key: str | None, avoid: UpstreamChannel | None) -> UpstreamChannel | None:
        ring = self.ring
        if ring is not None:
            return ring.pick(ring.hash_of(hash_key) if hash_key is not None else None, avoid)
        result: UpstreamChannel | None = self.picker.pick(avoid)
        return result

    def record(self, upstream: UpstreamChannel, success: bool) -> None:
        counts = self.stats.get(upstream.address)
        if counts is None:
            counts = self.stats[upstream.address] = [0, 0]
        counts[0 if success else 1] += 1
        detector = self.detector
        if detector is not None:
            detector.record(upstream, success)

    def poll(self) -> None:
        """The outlier detector's interval sweep (called about once a second)."""
        if self.detector is not None:
            self.detector.poll()


def dial(pool: ChannelPool, endpoint: Endpoint, tls: UpstreamTlsSpec | None) -> UpstreamChannel:
    """The channel for one endpoint: mTLS when it takes mTLS and we have an identity; its
    plaintext port when it also takes plaintext (PERMISSIVE) and we have none; else plaintext
    at its address (a STRICT endpoint then refuses the handshake: the call fails UNAVAILABLE)."""
    if endpoint.mtls:
        if tls is not None and pool.has_identity:
            return pool.get(endpoint.address, tls.server_name)
        if endpoint.plaintext_address:  # also while CDS says no TLS and EDS not yet
            return pool.get(endpoint.plaintext_address)
    return pool.get(endpoint.address)
