"""An OTLP/gRPC trace receiver for the tracing paths, run as its own process.

The sidecars under test export real spans to it (OTEL_EXPORTER_OTLP_ENDPOINT), so what tracing
costs them includes the batch exporter's work; the receiver's own CPU is in another process and
is not counted as the sidecars'. Unlike tests/otlp_receiver.py it keeps no spans, only counts
them: at 100% sampling a run sends tens of thousands, and the count is all the benchmark needs
(to show that tracing was on: spans received per call).

    python -m bench.otlp_sink --ready-file F --stats-file S
writes {"otlp": "127.0.0.1:P"} to F once listening; on SIGTERM writes
{"spans": N, "requests": M} to S and exits 0.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class CountingTraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.spans = 0
        self.requests = 0

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest,
               context: grpc.ServicerContext) -> trace_service_pb2.ExportTraceServiceResponse:
        n = sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
        with self._lock:
            self.spans += n
            self.requests += 1
        return trace_service_pb2.ExportTraceServiceResponse()

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"spans": self.spans, "requests": self.requests}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.otlp_sink", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ready-file", type=Path, required=True)
    p.add_argument("--stats-file", type=Path, required=True)
    args = p.parse_args(argv)

    service = CountingTraceService()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    stop = threading.Event()

    def on_signal(_signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    tmp = args.ready_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"otlp": f"127.0.0.1:{port}"}))
    tmp.replace(args.ready_file)  # the harness never reads a half-written file
    while not stop.wait(0.5):
        pass
    server.stop(1).wait(5)
    args.stats_file.write_text(json.dumps(service.stats()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
