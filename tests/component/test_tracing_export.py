"""Spans from sidecar/telemetry/tracing.py reach a real OTLP receiver (tests/otlp_receiver.py)
over gRPC, with the right tree, kinds, attributes and status.

Two hops are played with real gRPC servers on 127.0.0.1: `outbound()` is what the caller's
sidecar does on its outbound listener (CLIENT span, context injected upstream) and `Inbound` is
what the callee's sidecar does on its inbound listener (SERVER span, context passed to the app),
in front of an `App` that records the metadata it receives. The wiring into sidecar/proxy.py is
not under test here; the building blocks it will use are, on the wire.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from sidecar.metadata import forwardable
from sidecar.telemetry import trace_context as tc
from sidecar.telemetry.tracing import SidecarTracing
from tests.harness import wait_for
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan

METHOD = "/demo.Orders/Get"
APP_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
APP_SPAN = "00f067aa0ba902b7"
APP_TRACEPARENT = f"00-{APP_TRACE}-{APP_SPAN}-01"
STATUS_BY_PAYLOAD = {b"not_found": grpc.StatusCode.NOT_FOUND,
                     b"internal": grpc.StatusCode.INTERNAL,
                     b"unavailable": grpc.StatusCode.UNAVAILABLE}


class App(grpc.GenericRpcHandler):
    """The callee app: answers by payload, remembers each call's metadata."""

    def __init__(self) -> None:
        self.received: list[dict[str, str | bytes]] = []
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self.server.add_generic_rpc_handlers((self,))
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(self._answer)

    def _answer(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.received.append(dict(context.invocation_metadata()))
        code = STATUS_BY_PAYLOAD.get(request)
        if code is not None:
            context.abort(code, f"app says {code.name}")
        return b"done:" + request


class Inbound(grpc.GenericRpcHandler):
    """The callee's sidecar, inbound: SERVER span, continue the caller's context to the app."""

    def __init__(self, tracing: SidecarTracing, app: App) -> None:
        self.tracing = tracing
        self.channel = grpc.insecure_channel(app.address)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self.server.add_generic_rpc_handlers((self,))
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = details.method  # type: ignore[attr-defined]
        return grpc.unary_unary_rpc_method_handler(
            lambda request, context: self._forward(method, request, context))

    def _forward(self, method: str, request: bytes, context: grpc.ServicerContext) -> bytes:
        metadata = context.invocation_metadata()
        span = self.tracing.start_server_span(method, tc.extract(metadata), peer=context.peer(),
                                              local_address=self.address)
        outgoing = tc.replace_trace_headers(forwardable(metadata), span.headers())
        try:
            response = self.channel.unary_unary(method)(request, metadata=outgoing, timeout=5)
        except grpc.RpcError as err:
            span.end(err.code(), err.details())
            context.abort(err.code(), err.details() or "")
        span.end(grpc.StatusCode.OK)
        return response

    def stop(self) -> None:
        self.server.stop(None).wait(5)
        self.channel.close()


def outbound(tracing: SidecarTracing, upstreams: list[str], payload: bytes,
             app_metadata: tuple[tuple[str, str], ...] = ()) -> grpc.StatusCode:
    """The caller's sidecar, outbound: CLIENT span; retries UNAVAILABLE on the next upstream."""
    span = tracing.start_client_span(METHOD, tc.extract(app_metadata), cluster="orders")
    code = grpc.StatusCode.OK
    details = None
    for attempt, upstream in enumerate(upstreams, start=1):
        span.set_upstream(upstream, "orders")
        metadata = tc.replace_trace_headers(app_metadata, span.headers())
        with grpc.insecure_channel(upstream) as channel:
            try:
                channel.unary_unary(METHOD)(payload, metadata=metadata, timeout=5)
                code, details = grpc.StatusCode.OK, None
            except grpc.RpcError as err:
                code, details = err.code(), err.details()
        if code is not grpc.StatusCode.UNAVAILABLE or attempt == len(upstreams):
            span.end(code, details, attempts=attempt)
            return code
        span.record_retry(attempt, code, upstream)
    raise AssertionError("unreachable")


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as r:
        yield r


class Mesh:
    def __init__(self, receiver_endpoint: str, ratio: float = 1.0) -> None:
        self.front = SidecarTracing("frontend", endpoint=receiver_endpoint, ratio=ratio,
                                    environ={})
        self.orders = SidecarTracing("orders", endpoint=receiver_endpoint, ratio=ratio,
                                     environ={})
        assert self.front.export_error is None, self.front.export_error
        self.app = App()
        self.inbound = Inbound(self.orders, self.app)

    def call(self, payload: bytes = b"hello", app_metadata: tuple[tuple[str, str], ...] = (),
             upstreams: list[str] | None = None) -> grpc.StatusCode:
        return outbound(self.front, upstreams or [self.inbound.address], payload, app_metadata)

    def flush(self) -> None:
        assert self.front.force_flush(5) and self.orders.force_flush(5)

    def close(self) -> None:
        self.inbound.stop()
        self.app.server.stop(None).wait(5)
        self.front.shutdown(2)
        self.orders.shutdown(2)


@pytest.fixture
def mesh(receiver: OtlpReceiver) -> Iterator[Mesh]:
    m = Mesh(receiver.endpoint)
    yield m
    m.close()


def two_spans(receiver: OtlpReceiver) -> tuple[ReceivedSpan, ReceivedSpan]:
    spans = receiver.wait_for_spans(2)
    assert len(spans) == 2, spans
    by_kind = {s.kind: s for s in spans}
    return by_kind["CLIENT"], by_kind["SERVER"]


def test_two_hops_form_one_tree_continuing_the_callers_trace(mesh: Mesh,
                                                              receiver: OtlpReceiver) -> None:
    code = mesh.call(app_metadata=(("traceparent", APP_TRACEPARENT),
                                   ("tracestate", "vendor=opaque,other=1"), ("x-user", "ann")))
    assert code is grpc.StatusCode.OK
    mesh.flush()
    client, server = two_spans(receiver)

    assert client.trace_id == server.trace_id == APP_TRACE
    assert client.parent_span_id == APP_SPAN          # the app's own span
    assert server.parent_span_id == client.span_id    # the caller sidecar's CLIENT span
    assert (client.service, server.service) == ("mesh-sidecar/frontend", "mesh-sidecar/orders")
    assert client.name == server.name == "demo.Orders/Get"
    assert client.status == server.status == "UNSET"
    inbound_host, inbound_port = mesh.inbound.address.rsplit(":", 1)
    assert client.attributes == {
        "rpc.system": "grpc", "rpc.service": "demo.Orders", "rpc.method": "Get",
        "rpc.grpc.status_code": 0, "server.address": inbound_host,
        "server.port": int(inbound_port), "network.peer.address": inbound_host,
        "network.peer.port": int(inbound_port), "mesh.cluster": "orders", "mesh.attempts": 1}
    assert server.attributes["rpc.system"] == "grpc"
    assert server.attributes["rpc.grpc.status_code"] == 0
    assert server.attributes["network.peer.address"] == "127.0.0.1"
    assert isinstance(server.attributes["network.peer.port"], int)
    assert server.attributes["server.port"] == int(inbound_port)
    assert client.trace_state == ""  # (tracestate is propagated, not recorded on spans)

    # the app behind the callee's sidecar continues the same trace, under the SERVER span
    (seen,) = mesh.app.received
    assert seen["traceparent"] == f"00-{APP_TRACE}-{server.span_id}-01"
    assert seen["tracestate"] == "vendor=opaque,other=1"
    assert seen["x-user"] == "ann"


@pytest.mark.parametrize(("payload", "client_error", "server_error"), [
    (b"not_found", True, False),     # the caller's problem: only the CLIENT span is an error
    (b"internal", True, True),       # the server's problem: both
    (b"unavailable", True, True),
])
def test_error_status_marks_the_spans(mesh: Mesh, receiver: OtlpReceiver, payload: bytes,
                                      client_error: bool, server_error: bool) -> None:
    code = mesh.call(payload, (("traceparent", APP_TRACEPARENT),))
    assert code is STATUS_BY_PAYLOAD[payload]
    mesh.flush()
    client, server = two_spans(receiver)
    assert client.attributes["rpc.grpc.status_code"] == code.value[0]
    assert server.attributes["rpc.grpc.status_code"] == code.value[0]
    assert client.status == ("ERROR" if client_error else "UNSET")
    assert server.status == ("ERROR" if server_error else "UNSET")
    assert client.status_message == f"app says {code.name}"
    assert client.attributes["error.type"] == code.name
    assert ("error.type" in server.attributes) is server_error


def test_an_invalid_traceparent_is_replaced(mesh: Mesh, receiver: OtlpReceiver) -> None:
    bad = f"00-{'0' * 32}-{APP_SPAN}-01"
    mesh.call(app_metadata=(("traceparent", bad), ("tracestate", "vendor=opaque")))
    mesh.flush()
    client, server = two_spans(receiver)
    assert client.trace_id != "0" * 32 and client.parent_span_id == ""  # a new root
    assert server.trace_id == client.trace_id and server.parent_span_id == client.span_id
    (seen,) = mesh.app.received
    assert seen["traceparent"].split("-")[1] == client.trace_id
    assert "tracestate" not in seen  # dropped with the invalid traceparent


def test_no_context_starts_a_trace(mesh: Mesh, receiver: OtlpReceiver) -> None:
    mesh.call()
    mesh.flush()
    client, server = two_spans(receiver)
    assert client.parent_span_id == "" and server.parent_span_id == client.span_id


def test_b3_is_continued_and_passed_on_in_b3(mesh: Mesh, receiver: OtlpReceiver) -> None:
    b3_trace, b3_span = "80f198ee56343ba864fe8b2a57d3eff7", "e457b5a2e4d86bd1"
    mesh.call(app_metadata=(("b3", f"{b3_trace}-{b3_span}-1"),))
    mesh.flush()
    client, server = two_spans(receiver)
    assert client.trace_id == server.trace_id == b3_trace
    assert client.parent_span_id == b3_span
    (seen,) = mesh.app.received
    assert seen["b3"] == f"{b3_trace}-{server.span_id}-1-{client.span_id}"
    assert seen["traceparent"] == f"00-{b3_trace}-{server.span_id}-01"


def test_retry_attempts_are_visible(mesh: Mesh, receiver: OtlpReceiver) -> None:
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_address = f"127.0.0.1:{dead.getsockname()[1]}"
    dead.close()  # nothing listens there: connection refused, UNAVAILABLE
    code = mesh.call(upstreams=[dead_address, mesh.inbound.address])
    assert code is grpc.StatusCode.OK
    mesh.flush()
    client, server = two_spans(receiver)
    assert client.attributes["mesh.attempts"] == 2
    assert client.attributes["server.port"] == int(mesh.inbound.address.rsplit(":", 1)[1])
    ((name, event),) = client.events
    assert name == "retry"
    assert event == {"mesh.attempt": 1, "rpc.grpc.status_code": 14,
                     "error.type": "UNAVAILABLE", "mesh.upstream": dead_address}
    assert server.parent_span_id == client.span_id


def test_sampling_is_parent_based_with_a_settable_ratio(receiver: OtlpReceiver) -> None:
    mesh = Mesh(receiver.endpoint, ratio=0.0)
    try:
        mesh.call()  # a new trace at ratio 0: nothing recorded, context still propagated
        mesh.call(app_metadata=(("traceparent", f"00-{APP_TRACE}-{APP_SPAN}-00"),))
        mesh.flush()
        assert receiver.spans() == []
        unsampled, parent_unsampled = mesh.app.received
        assert unsampled["traceparent"].endswith("-02")  # random trace id flag, not sampled
        assert parent_unsampled["traceparent"].startswith(f"00-{APP_TRACE}-")
        assert parent_unsampled["traceparent"].endswith("-00")
        assert parent_unsampled["traceparent"].split("-")[2] != APP_SPAN  # a new span id

        mesh.call(app_metadata=(("traceparent", APP_TRACEPARENT),))  # the caller sampled it
        mesh.flush()
        client, server = two_spans(receiver)
        assert client.trace_id == server.trace_id == APP_TRACE

        receiver.clear()
        assert mesh.front.set_sampling_ratio(1.0) and mesh.orders.set_sampling_ratio(1.0)
        mesh.call()
        mesh.flush()
        two_spans(receiver)
        with pytest.raises(ValueError, match="between 0 and 1"):
            mesh.front.set_sampling_ratio(1.5)
    finally:
        mesh.close()


def test_standard_otel_variables_are_honoured(receiver: OtlpReceiver,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "custom-name")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test")
    tracing = SidecarTracing("frontend")
    try:
        tracing.start_client_span(METHOD, None).end(grpc.StatusCode.OK)
        assert tracing.force_flush(5)
        (span,) = receiver.wait_for_spans(1)
        assert span.service == "custom-name"
        assert span.resource["deployment.environment"] == "test"
        assert span.resource["mesh.service"] == "frontend"
    finally:
        tracing.shutdown(2)


def test_a_pinned_sampler_wins_over_mesh_config(receiver: OtlpReceiver,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    tracing = SidecarTracing("frontend", endpoint=receiver.endpoint)
    try:
        assert tracing.set_sampling_ratio(1.0) is False
        span = tracing.start_client_span(METHOD, None)
        assert not span.sampled and span.headers()[0][1].endswith(("-00", "-02"))
        span.end(grpc.StatusCode.OK)
        assert tracing.force_flush(5) and receiver.spans() == []
    finally:
        tracing.shutdown(2)


def test_sdk_disabled_passes_the_callers_context_unchanged(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    tracing = SidecarTracing("frontend")
    assert not tracing.enabled and tracing.exporter is None
    span = tracing.start_server_span(METHOD, tc.extract([("traceparent", APP_TRACEPARENT)]))
    assert span.headers() == (("traceparent", APP_TRACEPARENT),)
    assert span.trace_id_hex is None
    assert tracing.start_server_span(METHOD, None).headers() == ()
    span.end(grpc.StatusCode.INTERNAL)
    tracing.shutdown(1)


# --- the trace backend being down changes nothing for the calls -----------------------------------
def black_hole() -> socket.socket:
    """A port that accepts TCP connections and never says anything (a hung backend)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    return s


def export_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("OtelBatch")]


@pytest.mark.parametrize("backend", ["refused", "hung", "failing"])
def test_backend_down_changes_nothing_for_calls(backend: str) -> None:
    before = set(export_threads())
    hole = black_hole()
    failing = OtlpReceiver(fail_with=grpc.StatusCode.UNAVAILABLE)
    if backend == "refused":
        endpoint = f"http://127.0.0.1:{hole.getsockname()[1]}"
        hole.close()  # nothing listens there any more
    elif backend == "hung":
        endpoint = f"http://127.0.0.1:{hole.getsockname()[1]}"
    else:
        endpoint = failing.endpoint
    mesh = Mesh(endpoint)
    try:
        slowest = 0.0
        for _ in range(20):
            started = time.perf_counter()
            assert mesh.call() is grpc.StatusCode.OK
            slowest = max(slowest, time.perf_counter() - started)
        assert slowest < 1.0, slowest  # a call through two hops; ~ms normally
        assert len(mesh.app.received) == 20
        # more spans than the export queue holds (2048): ending them never blocks or raises
        started = time.perf_counter()
        for _ in range(3000):
            mesh.front.start_client_span(METHOD, None).end(grpc.StatusCode.OK)
        assert time.perf_counter() - started < 3.0
        started = time.perf_counter()
        mesh.front.force_flush(0.5)  # bounded, whatever the exporter is doing
        assert mesh.front.shutdown(0.5) is False  # it could not export everything: it says so
        mesh.orders.shutdown(0.5)
        assert time.perf_counter() - started < 5.0
        # and nothing is left behind retrying in the background
        wait_for(lambda: not (set(export_threads()) - before), timeout=5,
                 what="the export threads to stop")
    finally:
        mesh.inbound.stop()
        mesh.app.server.stop(None).wait(5)
        hole.close()
        failing.stop()
    if backend == "failing":
        assert failing.requests >= 1  # the exporter did try, and was told no
