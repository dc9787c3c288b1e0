"""An OTLP trace receiver: a real gRPC server implementing opentelemetry-proto's TraceService.

Tests start it on 127.0.0.1:0, point an exporter at `endpoint`, and read back what arrived
(`spans()`, `wait_for_spans()`), exactly as a collector or Jaeger would have received it.
`fail_with` makes every Export answer with that status, to show what an unhealthy backend does.

Run alone it is a tiny trace sink for looking at a running mesh without Jaeger:
    .venv/bin/python -m tests.otlp_receiver --port 4317
prints one line per span as it arrives.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any, NamedTuple

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from tests.harness import wait_for

SPAN_KIND = {v: k.removeprefix("SPAN_KIND_") for k, v in trace_pb2.Span.SpanKind.items()}
STATUS_CODE = {v: k.removeprefix("STATUS_CODE_") for k, v in trace_pb2.Status.StatusCode.items()}


def any_value(value: common_pb2.AnyValue) -> Any:
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, which)


def attributes(kvs: Any) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in kvs}


class ReceivedSpan(NamedTuple):
    """One span as the backend got it, with ids as hex like a UI shows them."""

    name: str
    kind: str                   # SERVER, CLIENT, ...
    trace_id: str
    span_id: str
    parent_span_id: str         # "" for a root span
    status: str                 # UNSET, OK, ERROR
    status_message: str
    attributes: dict[str, Any]
    events: list[tuple[str, dict[str, Any]]]
    resource: dict[str, Any]
    scope: str
    trace_state: str
    proto: trace_pb2.Span

    @property
    def service(self) -> str:
        return str(self.resource.get("service.name", ""))


def flatten(request: trace_service_pb2.ExportTraceServiceRequest) -> list[ReceivedSpan]:
    out = []
    for rs in request.resource_spans:
        resource = attributes(rs.resource.attributes)
        for ss in rs.scope_spans:
            for span in ss.spans:
                out.append(ReceivedSpan(
                    name=span.name, kind=SPAN_KIND.get(span.kind, str(span.kind)),
                    trace_id=span.trace_id.hex(), span_id=span.span_id.hex(),
                    parent_span_id=span.parent_span_id.hex(),
                    status=STATUS_CODE.get(span.status.code, str(span.status.code)),
                    status_message=span.status.message,
                    attributes=attributes(span.attributes),
                    events=[(e.name, attributes(e.attributes)) for e in span.events],
                    resource=resource, scope=ss.scope.name, trace_state=span.trace_state,
                    proto=span))
    return out


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, owner: OtlpReceiver) -> None:
        self._owner = owner

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest,
               context: grpc.ServicerContext) -> trace_service_pb2.ExportTraceServiceResponse:
        owner = self._owner
        with owner._lock:
            owner.requests += 1
            fail = owner.fail_with
        if fail is not None:
            context.abort(fail, "receiver told to fail")
        spans = flatten(request)
        with owner._lock:
            owner._spans.extend(spans)
        for span in spans:
            owner._on_span(span)
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    def __init__(self, port: int = 0, fail_with: grpc.StatusCode | None = None,
                 on_span: Callable[[ReceivedSpan], None] | None = None) -> None:
        self._lock = threading.Lock()
        self._spans: list[ReceivedSpan] = []
        self.requests = 0
        self.fail_with = fail_with
        self._on_span = on_span or (lambda _span: None)
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self),
                                                                  self._server)
        self.port = self._server.add_insecure_port(f"127.0.0.1:{port}")
        self._server.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def endpoint(self) -> str:
        """For OTEL_EXPORTER_OTLP_ENDPOINT / OTLPSpanExporter(endpoint=...)."""
        return f"http://{self.address}"

    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self._spans)

    def clear(self) -> None:
        with self._lock:
            self._spans.clear()

    def wait_for_spans(self, count: int, timeout: float = 10.0,
                       where: Callable[[ReceivedSpan], bool] | None = None
                       ) -> list[ReceivedSpan]:
        """At least `count` spans (matching `where`), or TimeoutError naming what did arrive."""
        def enough() -> list[ReceivedSpan] | None:
            got = [s for s in self.spans() if where is None or where(s)]
            return got if len(got) >= count else None
        try:
            return wait_for(enough, timeout=timeout, what=f"{count} spans")
        except TimeoutError:
            names = [(s.service, s.kind, s.name) for s in self.spans()]
            raise TimeoutError(f"wanted {count} spans, received {names}") from None

    def stop(self, grace: float | None = None) -> None:
        self._server.stop(grace).wait(5)

    def __enter__(self) -> OtlpReceiver:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def iter_trace(spans: list[ReceivedSpan], trace_id: str) -> Iterator[tuple[int, ReceivedSpan]]:
    """The spans of one trace depth-first from its roots, with their depth (for printing)."""
    mine = [s for s in spans if s.trace_id == trace_id]
    ids = {s.span_id for s in mine}
    children: dict[str, list[ReceivedSpan]] = {}
    for s in mine:
        children.setdefault(s.parent_span_id if s.parent_span_id in ids else "", []).append(s)

    def walk(parent: str, depth: int) -> Iterator[tuple[int, ReceivedSpan]]:
        for s in sorted(children.get(parent, []), key=lambda s: s.proto.start_time_unix_nano):
            yield depth, s
            yield from walk(s.span_id, depth + 1)
    yield from walk("", 0)


def _print_span(span: ReceivedSpan) -> None:
    attrs = " ".join(f"{k}={v}" for k, v in sorted(span.attributes.items()))
    ms = (span.proto.end_time_unix_nano - span.proto.start_time_unix_nano) / 1e6
    print(f"{span.trace_id} {span.span_id} parent={span.parent_span_id or '-'} "
          f"{span.service} {span.kind} {span.name} {span.status} {ms:.2f}ms {attrs}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="print spans received over OTLP/gRPC")
    parser.add_argument("--port", type=int, default=4317)
    args = parser.parse_args(argv)
    receiver = OtlpReceiver(args.port, on_span=_print_span)
    print(f"OTLP/gRPC trace receiver on {receiver.endpoint}", file=sys.stderr, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        receiver.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
