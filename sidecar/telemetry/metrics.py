"""The sidecar's Prometheus metrics (served on the admin port's /metrics), in their own registry.

Per-call cost is kept low: the label children for one (direction, method) are bound once and
cached in a CallMetrics, so a call does two dict lookups, one histogram observe and one counter
inc (about 2 us in all; docs/observability.md has the measurement) and never formats or hashes
label tuples; in-flight is a plain int on that object, read when scraped. Method names come
from callers, so their number is capped: past `max_methods` distinct methods per direction, new
ones are counted as service/method "other" instead of growing the scrape without bound.

Things that are state rather than events (config version and age, access-log drops) are read
at scrape time by a collector, not updated on the hot path.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

PREFIX = "mesh_sidecar"
DIRECTIONS = ("inbound", "outbound")
OTHER = "other"
# Seconds. A sidecar hop costs a fraction of a millisecond, so the low end is fine-grained.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0, 30.0, math.inf)
CALL_LABELS = ("direction", "service", "method")

_CODE_NAMES: dict[Any, str] = {}
for _code in grpc.StatusCode:
    _CODE_NAMES[_code] = _code.name
    _CODE_NAMES[_code.value[0]] = _code.name


def status_name(code: grpc.StatusCode | int) -> str:
    """'OK', 'UNAVAILABLE', ... (an unknown number is kept as its digits)."""
    name = _CODE_NAMES.get(code)
    return name if name is not None else str(code)


def split_method(method: str) -> tuple[str, str]:
    """'/pkg.Service/Method' -> ('pkg.Service', 'Method')."""
    service, _, name = method.lstrip("/").rpartition("/")
    return service, name


class CallMetrics:
    """The pre-bound series of one (direction, method). Per call: start(), then exactly one
    finish(code, seconds); retried() / rate_limited() as they happen."""

    __slots__ = ("_by_code", "_denied", "_family", "_labels", "_latency", "_rate_limited",
                 "_requests", "_retries", "in_flight")

    def __init__(self, family: SidecarMetrics, labels: tuple[str, str, str]) -> None:
        self._labels = labels
        self._family = family
        self._denied: Any = None
        self._requests = family.requests
        # A plain int read at scrape time: calls start and finish on the event loop's thread,
        # and a locked Gauge would double this object's per-call cost.
        self.in_flight = 0
        self._latency = family.latency.labels(*labels)
        self._retries = family.retries.labels(*labels)
        self._rate_limited = family.rate_limited.labels(*labels)
        self._by_code: dict[Any, Any] = {}

    @property
    def labels(self) -> tuple[str, str, str]:
        return self._labels

    def start(self) -> None:
        self.in_flight += 1

    def finish(self, code: grpc.StatusCode | int, seconds: float) -> None:
        self.in_flight -= 1
        self._latency.observe(seconds)
        counter = self._by_code.get(code)
        if counter is None:
            counter = self._requests.labels(*self._labels, status_name(code))
            self._by_code[code] = counter
        counter.inc()

    def retried(self, count: int = 1) -> None:
        self._retries.inc(count)

    def rate_limited(self) -> None:
        self._rate_limited.inc()

    def denied(self) -> None:
        if self._denied is None:  # bound at first use: most methods are never denied
            self._denied = self._family.authz_denied.labels(*self._labels)
        self._denied.inc()


class _StateCollector(Collector):
    """Config version and age, access-log drops: read when scraped."""

    def __init__(self, owner: SidecarMetrics) -> None:
        self._owner = owner

    def collect(self) -> Iterator[Any]:
        owner = self._owner
        in_flight = GaugeMetricFamily(f"{PREFIX}_requests_in_flight", "calls in progress",
                                      labels=list(CALL_LABELS))
        for table in list(owner._calls.values()):
            for bound in list(table.values()):
                in_flight.add_metric(list(bound.labels), float(bound.in_flight))
        yield in_flight
        version, applied_at = owner._config  # one tuple: never a torn read
        if applied_at is not None:
            info = GaugeMetricFamily(f"{PREFIX}_config_info",
                                     "the active config snapshot (value always 1)",
                                     labels=["version"])
            info.add_metric([version], 1.0)
            yield info
            yield GaugeMetricFamily(f"{PREFIX}_config_last_applied_timestamp_seconds",
                                    "Unix time the active config was applied",
                                    value=applied_at)
            yield GaugeMetricFamily(f"{PREFIX}_config_age_seconds",
                                    "seconds since the last config push was applied",
                                    value=max(0.0, owner._clock() - applied_at))
        if owner._access_log_dropped is not None:
            yield CounterMetricFamily(f"{PREFIX}_access_log_dropped",
                                      "access log lines dropped (queue full or write failed)",
                                      value=owner._access_log_dropped())


class SidecarMetrics:
    """All of one sidecar's metrics, in a registry of their own."""

    def __init__(self, service: str, *, version: str = "", max_methods: int = 1000,
                 clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._max_methods = max_methods
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(f"{PREFIX}_requests", "calls handled, by final gRPC status",
                                [*CALL_LABELS, "grpc_status"], registry=r)
        self.latency = Histogram(f"{PREFIX}_request_duration_seconds",
                                 "call duration through this sidecar, first byte in to status "
                                 "out", CALL_LABELS, buckets=LATENCY_BUCKETS, registry=r)
        self.retries = Counter(f"{PREFIX}_retries", "upstream attempts beyond the first",
                               CALL_LABELS, registry=r)
        self.rate_limited = Counter(f"{PREFIX}_rate_limited",
                                    "calls refused by a rate limit (RESOURCE_EXHAUSTED)",
                                    CALL_LABELS, registry=r)
        self.authz_denied = Counter(f"{PREFIX}_authz_denied",
                                    "inbound calls refused by authorization or the mTLS mode "
                                    "(PERMISSION_DENIED, UNAUTHENTICATED)", CALL_LABELS,
                                    registry=r)
        self.certificate_expiry = Gauge(f"{PREFIX}_certificate_expiry_timestamp_seconds",
                                        "when the workload certificate in use expires (unix "
                                        "time; absent without an identity)", ["spiffe_id"],
                                        registry=r)
        self.ejections = Counter(f"{PREFIX}_outlier_ejections",
                                 "endpoints ejected by outlier detection", ["cluster"],
                                 registry=r)
        self.ejected = Gauge(f"{PREFIX}_endpoints_ejected", "endpoints ejected now",
                             ["cluster"], registry=r)
        self.breaker_trips = Counter(f"{PREFIX}_circuit_breaker_trips",
                                     "calls refused because a circuit breaker limit was reached",
                                     ["cluster", "limit"], registry=r)
        self.config_updates = Counter(f"{PREFIX}_config_updates",
                                      "config snapshots applied (accepted pushes)", registry=r)
        self.config_rejections = Counter(f"{PREFIX}_config_rejections",
                                         "config pushes rejected (NACKed)", registry=r)
        info = Gauge(f"{PREFIX}_info", "this sidecar (value always 1)", ["service", "version"],
                     registry=r)
        info.labels(service, version).set(1)
        self._config: tuple[str, float | None] = ("", None)
        self._access_log_dropped: Callable[[], float] | None = None
        self._calls: dict[str, dict[str, CallMetrics]] = {d: {} for d in DIRECTIONS}
        r.register(_StateCollector(self))

    # --- per call ------------------------------------------------------------------------
    def call(self, direction: str, method: str) -> CallMetrics:
        """The bound series for calls of `method` ('/pkg.Service/Method') in `direction`."""
        table = self._calls.get(direction)
        if table is None:
            table = self._calls.setdefault(direction, {})
        bound = table.get(method)
        if bound is None:
            bound = self._bind(table, direction, method)
        return bound

    def _bind(self, table: dict[str, CallMetrics], direction: str, method: str) -> CallMetrics:
        if len(table) >= self._max_methods:
            other = table.get("\x00other")
            if other is None:
                other = table["\x00other"] = CallMetrics(self, (direction, OTHER, OTHER))
            return other
        service, name = split_method(method)
        bound = table[method] = CallMetrics(self, (direction, service, name))
        return bound

    # --- events off the per-call path ------------------------------------------------------
    def ejection(self, cluster: str, ejected_now: int | None = None) -> None:
        self.ejections.labels(cluster).inc()
        if ejected_now is not None:
            self.ejected.labels(cluster).set(ejected_now)

    def certificate(self, spiffe_id: str, not_after: float) -> None:
        self.certificate_expiry.clear()
        self.certificate_expiry.labels(spiffe_id).set(not_after)

    def set_ejected(self, cluster: str, count: int) -> None:
        self.ejected.labels(cluster).set(count)

    def breaker_trip(self, cluster: str, limit: str = "max_requests") -> None:
        self.breaker_trips.labels(cluster, limit).inc()

    def config_applied(self, version: str, applied_at: float | None = None) -> None:
        self._config = (version, self._clock() if applied_at is None else applied_at)
        self.config_updates.inc()

    def config_rejected(self) -> None:
        self.config_rejections.inc()

    def watch_access_log(self, dropped: Callable[[], float]) -> None:
        """Export an access log's drop count (e.g. `lambda: access_log.dropped`)."""
        self._access_log_dropped = dropped

    # --- scrape ----------------------------------------------------------------------------
    def render(self) -> tuple[bytes, str]:
        """The /metrics body and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
