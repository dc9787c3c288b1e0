"""What the proxy records about each call: one span, the golden metrics, an access-log line.

The proxy calls `begin` when a call arrives and `end` when it is over; the forwarding code
only fills in the upstream it used and the attempts it made. Everything expensive is skipped
when it is off (unsampled spans never touch the OpenTelemetry SDK; the access log is off by
default), so the per-call cost of an unobserved call stays a few microseconds.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import grpc

from sidecar.model import Direction
from sidecar.telemetry import trace_context as tc
from sidecar.telemetry.access_log import AccessLog
from sidecar.telemetry.metrics import CallMetrics, SidecarMetrics
from sidecar.telemetry.tracing import CallSpan, SidecarTracing

Metadata = tuple[tuple[str, str | bytes], ...]


class CallRecord:
    __slots__ = ("attempts", "client", "metrics", "span", "started", "started_wall", "upstream")

    def __init__(self, span: CallSpan, metrics: CallMetrics, client: bool) -> None:
        self.span = span
        self.client = client
        self.metrics = metrics
        self.upstream: str | None = None
        self.attempts = 1
        self.started = time.perf_counter()
        self.started_wall = time.time()

    def headers(self, metadata: Metadata) -> Metadata:
        """The metadata to send on, with this hop's trace context."""
        return tc.replace_trace_headers(metadata, self.span.headers())

    def attempt(self, upstream: str, cluster: str) -> None:
        self.upstream = upstream
        if self.client:  # a SERVER span's server.* / network.peer.* describe the inbound hop
            self.span.set_upstream(upstream, cluster)

    def retried(self, code: grpc.StatusCode, upstream: str) -> None:
        self.span.record_retry(self.attempts, code, upstream)
        self.metrics.retried()
        self.attempts += 1


class Telemetry:
    def __init__(self, tracing: SidecarTracing, metrics: SidecarMetrics,
                 access_log: AccessLog) -> None:
        self.tracing = tracing
        self.metrics = metrics
        self.access_log = access_log

    def begin(self, direction: Direction, method: str,
              metadata: Iterable[tuple[str, str | bytes]] | None,
              context: grpc.aio.ServicerContext, local_address: str | None) -> CallRecord:
        parent = tc.extract(metadata)
        if direction is Direction.OUTBOUND:
            span = self.tracing.start_client_span(method, parent)
        else:
            span = self.tracing.start_server_span(method, parent, peer=context.peer(),
                                                  local_address=local_address)
        call_metrics = self.metrics.call(direction.value, method)
        call_metrics.start()
        return CallRecord(span, call_metrics, direction is Direction.OUTBOUND)

    def end(self, record: CallRecord, direction: Direction, method: str,
            code: grpc.StatusCode, details: str | None, caller: str | None) -> None:
        seconds = time.perf_counter() - record.started
        record.metrics.finish(code, seconds)
        record.span.end(code, details, record.attempts)
        self.access_log.record(record.started_wall, direction.value, method, code,
                               seconds * 1000.0, record.attempts, record.span.trace_id_hex,
                               caller, record.upstream)
