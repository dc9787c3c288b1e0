"""What goes over the wire through a sidecar pair, seen with a raw HTTP/2 client.

grpcio hides frames; these checks need them: an upstream error with no response headers must
reach the caller as a trailers-only response (one HEADERS frame with END_STREAM), also when the
upstream takes its time, because a proxy that sends headers early commits the caller's retries.
"""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import pytest

from tests import h2raw
from tests.harness import start_sidecar


class _Upstream:
    """/t.T/FailNow fails at once; /t.T/FailLater after 200 ms; /t.T/Headers answers with
    custom initial and trailing metadata."""

    def __init__(self) -> None:
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=8),
                                   options=[("grpc.so_reuseport", 0)])
        self._server.add_generic_rpc_handlers((self,))
        self.address = f"127.0.0.1:{self._server.add_insecure_port('127.0.0.1:0')}"
        self._server.start()
        self.stopped = threading.Event()

    def service(self, details):
        method = details.method
        if method == "/t.T/FailNow":
            return grpc.unary_unary_rpc_method_handler(self._fail_now)
        if method == "/t.T/FailLater":
            return grpc.stream_stream_rpc_method_handler(self._fail_later)
        if method == "/t.T/Headers":
            return grpc.unary_unary_rpc_method_handler(self._headers)
        return None

    @staticmethod
    def _fail_now(request, context):
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, "not now ☂")

    @staticmethod
    def _fail_later(requests, context):
        for _ in requests:
            pass
        time.sleep(0.2)
        context.abort(grpc.StatusCode.UNAVAILABLE, "try again")
        yield b""

    @staticmethod
    def _headers(request, context):
        context.send_initial_metadata([("x-initial", "i"), ("x-initial-bin", b"\x00\x01")])
        context.set_trailing_metadata([("x-trailing", "t")])
        return b"ok"

    def stop(self):
        self._server.stop(0)


@pytest.fixture(scope="module", params=["stream-shape", "unary-shape"])
def pair(request):
    """A sidecar pair proxying with the generic stream shape, or the unary fast path."""
    extra = []
    if request.param == "unary-shape":
        extra = ["--unary-method", "/t.T/FailNow", "--unary-method", "/t.T/Headers"]
    upstream = _Upstream()
    b = start_sidecar(service="t", app=upstream.address, extra=extra)
    a = start_sidecar(service="caller", upstreams={"t": [b.addr("inbound")]},
                      routes={"t.T": "t"}, extra=extra)
    yield a
    a.stop()
    b.stop()
    upstream.stop()


@pytest.mark.parametrize("method, code, message", [
    ("/t.T/FailNow", "9", "not now %E2%98%82"),
    ("/t.T/FailLater", "14", "try again"),
])
def test_upstream_errors_stay_trailers_only(pair, method, code, message):
    response = h2raw.call(pair.addr("outbound"), method, b"hello")
    assert response.trailers_only, response.header_blocks
    assert response.header("grpc-status") == code
    assert response.header("grpc-message") == message


def test_unrouted_call_is_trailers_only_with_unimplemented(pair):
    response = h2raw.call(pair.addr("outbound"), "/nobody.Home/Call", b"")
    assert response.trailers_only
    assert response.header("grpc-status") == "12"


def test_success_has_headers_data_and_trailers_with_metadata(pair):
    response = h2raw.call(pair.addr("outbound"), "/t.T/Headers", b"x",
                          headers=[("grpc-timeout", "5S")])
    assert len(response.header_blocks) == 2
    initial, trailing = response.header_blocks
    assert ("x-initial", "i") in initial
    assert any(k == "x-initial-bin" for k, _ in initial)
    assert ("x-trailing", "t") in trailing and ("grpc-status", "0") in trailing
    assert response.data == h2raw.grpc_frame(b"ok")
