"""Observability end to end (issue 6, "Show"): traces, metrics and access logs of calls through
real sidecar processes, read back as an operator would (an OTLP/gRPC receiver standing in for
Jaeger, a Prometheus scrape of /metrics, the access-log file).

The main mesh of the module, every sidecar exporting to one in-test OTLP receiver at 100%
sampling:

    test --> sidecar A "frontend" (outbound; static --config: route retry policy) -->
             sidecar B "orders" (inbound) --> orders app (records every call's metadata)

The orders app answers by method: Place OK, Missing NOT_FOUND, Broken INTERNAL, Flaky
UNAVAILABLE on the first attempt of a request id then OK (A retries UNAVAILABLE), Slow waits
until the test lets it go. A test finds its own spans by the trace id the app received (or the
one the test sent), never by "the latest spans", since the sidecars also trace their own
reflection calls. Negative checks ("no span for these calls") wait for a later sampled call's
spans from the same sidecars first: a sidecar exports its spans in the order they ended.
"""

from __future__ import annotations

import collections
import json
import re
import secrets
import socket
import statistics
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.cp_fixtures import (
    LDS,
    ControlPlane,
    MeshApi,
    apply,
    cluster_endpoints,
    http_get,
    wait_synced,
)
from tests.harness import ManagedProcess, start_sidecar, wait_for
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan, iter_trace

ORDERS_GRPC = "shop.Orders"
PLACE = "/shop.Orders/Place"
MISSING = "/shop.Orders/Missing"
BROKEN = "/shop.Orders/Broken"
FLAKY = "/shop.Orders/Flaky"
SLOW = "/shop.Orders/Slow"
HOME = "/shop.Frontend/Home"
CALL_TIMEOUT = 5.0
TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
METRIC = "mesh_sidecar"


def otel_env(endpoint: str) -> dict[str, str]:
    """Export to `endpoint`, in batches every 50 ms (tests wait on spans, not on 5 s timers)."""
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_BSP_SCHEDULE_DELAY": "50"}


# --- apps -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Seen:
    """One call as the app received it."""

    method: str
    metadata: dict[str, str]
    request_id: str | None

    @property
    def traceparent(self) -> tuple[str, str, str]:
        """(trace id, parent span id, flags) of the traceparent the app got; fails if invalid."""
        value = self.metadata.get("traceparent", "")
        match = TRACEPARENT.match(value)
        assert match, f"the app got no valid traceparent: {self.metadata}"
        return match.group(1), match.group(2), match.group(3)


class OrdersApp(grpc.GenericRpcHandler):
    """The callee: answers shop.Orders methods by name (see the module docstring) and records
    each call. Anything else (the sidecars' reflection probes) is UNIMPLEMENTED."""

    def __init__(self, name: str = "orders-1") -> None:
        self.name = name
        self._lock = threading.Lock()
        self._seen: list[Seen] = []
        self._flaked: set[str] = set()
        self.release = threading.Event()  # lets Slow calls finish
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        self._server.add_generic_rpc_handlers((self,))
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{self.port}"
        self._server.start()

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method: str = details.method  # type: ignore[attr-defined]
        if not method.startswith(f"/{ORDERS_GRPC}/"):
            return None
        return grpc.unary_unary_rpc_method_handler(
            lambda request, context: self._answer(method, context))

    def _answer(self, method: str, context: grpc.ServicerContext) -> bytes:
        md = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        request_id = md.get("x-request-id")
        with self._lock:
            self._seen.append(Seen(method, md, request_id))
            first_try = request_id not in self._flaked
            if request_id is not None:
                self._flaked.add(request_id)
        if method == MISSING:
            context.abort(grpc.StatusCode.NOT_FOUND, "no such order")
        if method == BROKEN:
            context.abort(grpc.StatusCode.INTERNAL, "orders app broke")
        if method == FLAKY and first_try:
            context.abort(grpc.StatusCode.UNAVAILABLE, "orders app flaked")
        if method == SLOW:
            self.release.wait(CALL_TIMEOUT)
        return self.name.encode()

    def seen(self, request_id: str) -> list[Seen]:
        with self._lock:
            return [s for s in self._seen if s.request_id == request_id]

    def stop(self) -> None:
        self.release.set()
        self._server.stop(0)


class FrontendApp(grpc.GenericRpcHandler):
    """A demo-like frontend: Home calls orders' Place through its own sidecar's outbound port,
    copying the trace context (and request id) it received, as demo_services do."""

    PROPAGATED = ("traceparent", "tracestate", "x-request-id")

    def __init__(self) -> None:
        self.outbound: str | None = None  # its sidecar's outbound, known once that started
        self._channel: grpc.Channel | None = None
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self._server.add_generic_rpc_handlers((self,))
        self.address = f"127.0.0.1:{self._server.add_insecure_port('127.0.0.1:0')}"
        self._server.start()

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        if details.method != HOME:  # type: ignore[attr-defined]
            return None
        return grpc.unary_unary_rpc_method_handler(self._home)

    def _home(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        assert self.outbound is not None
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.outbound)
        md = [(k, v) for k, v in context.invocation_metadata() if k in self.PROPAGATED]
        answer: bytes = self._channel.unary_unary(PLACE)(b"", metadata=md, timeout=CALL_TIMEOUT)
        return b"home via " + answer

    def stop(self) -> None:
        if self._channel is not None:
            self._channel.close()
        self._server.stop(0)


# --- calls ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Outcome:
    code: str
    details: str
    answer: bytes | None
    seconds: float


def call(target: str, method: str, request_id: str,
         metadata: Sequence[tuple[str, str]] = (), channel: grpc.Channel | None = None
         ) -> Outcome:
    md = (("x-request-id", request_id), *metadata)
    started = time.monotonic()
    ch = channel or grpc.insecure_channel(target)
    try:
        answer = ch.unary_unary(method)(b"", metadata=md, timeout=CALL_TIMEOUT)
        return Outcome("OK", "", answer, time.monotonic() - started)
    except grpc.RpcError as err:
        return Outcome(err.code().name, err.details() or "",  # type: ignore[attr-defined]
                       None, time.monotonic() - started)
    finally:
        if channel is None:
            ch.close()


def in_trace(receiver: OtlpReceiver, trace_id: str, count: int,
             timeout: float = 10.0) -> list[ReceivedSpan]:
    """The spans of one trace, once `count` have arrived."""
    return receiver.wait_for_spans(count, timeout=timeout,
                                   where=lambda s: s.trace_id == trace_id)


def one(spans: Sequence[ReceivedSpan], kind: str, service: str | None = None) -> ReceivedSpan:
    found = [s for s in spans if s.kind == kind and (service is None or s.service == service)]
    assert len(found) == 1, f"expected one {kind} span of {service}: {describe_spans(spans)}"
    return found[0]


def describe_spans(spans: Sequence[ReceivedSpan]) -> str:
    return "; ".join(f"{s.service} {s.kind} {s.name} {s.span_id}<-{s.parent_span_id or 'root'}"
                     f" {s.status}" for s in spans)


def settled(receiver: OtlpReceiver, target: str, services: int, tag: str) -> None:
    """Returns once every span the sidecars on the path from `target` ended before now has arrived:
    a call continuing a sampled caller trace is recorded by each of the `services` sidecars,
    and each exports its spans in the order they ended."""
    trace_id = secrets.token_hex(16)
    outcome = call(target, PLACE, tag, [("traceparent", f"00-{trace_id}-{CALLER_SPAN}-01")])
    assert outcome.code == "OK", outcome
    in_trace(receiver, trace_id, services)


# --- the main mesh ----------------------------------------------------------------------------
@dataclass
class Pair:
    """Sidecar A (frontend, outbound) -> sidecar B (orders, inbound) -> the orders app."""

    app: OrdersApp
    a: ManagedProcess
    b: ManagedProcess
    a_log: Path
    b_log: Path

    @property
    def entry(self) -> str:
        return self.a.addr("outbound")

    @property
    def b_inbound_port(self) -> int:
        return int(self.b.addr("inbound").rsplit(":", 1)[1])


def retrying_config(path: Path, upstream: str) -> Path:
    """A static config (Envoy static_resources) for A's outbound: shop.Orders -> cluster orders
    at `upstream`, retried on UNAVAILABLE up to twice."""
    host, port = upstream.rsplit(":", 1)
    hcm = {"@type": "type.googleapis.com/envoy.extensions.filters.network."
                    "http_connection_manager.v3.HttpConnectionManager",
           "stat_prefix": "outbound",
           "route_config": {"name": "outbound", "virtual_hosts": [{
               "name": "all", "domains": ["*"], "routes": [{
                   "name": "orders", "match": {"prefix": f"/{ORDERS_GRPC}/"},
                   "route": {"cluster": "orders", "retry_policy": {
                       "retry_on": "unavailable", "num_retries": 2,
                       "retry_back_off": {"base_interval": "0.01s"}}}}]}]}}
    config = {"static_resources": {
        "listeners": [{"name": "outbound", "traffic_direction": "OUTBOUND",
                       "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                       "filter_chains": [{"filters": [{
                           "name": "envoy.filters.network.http_connection_manager",
                           "typed_config": hcm}]}]}],
        "clusters": [{"name": "orders", "type": "STATIC", "lb_policy": "ROUND_ROBIN",
                      "load_assignment": {"cluster_name": "orders", "endpoints": [{
                          "lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                              "address": host, "port_value": int(port)}}}}]}]}}]}}
    path.write_text(json.dumps(config))
    return path


SAMPLE_ALL = ["--trace-sampling", "100"]


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as r:
        yield r


@pytest.fixture(scope="module")
def pair(receiver: OtlpReceiver, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    root = tmp_path_factory.mktemp("observability")
    app = OrdersApp()
    env = otel_env(receiver.endpoint)
    started: list[Any] = [app]
    try:
        b_log = root / "orders-access.log"
        b = start_sidecar(service="orders", app=app.address, env=env, name="sidecar-orders",
                          extra=[*SAMPLE_ALL, "--access-log", str(b_log)])
        started.append(b)
        a_log = root / "frontend-access.log"
        a = start_sidecar(service="frontend", env=env, name="sidecar-frontend",
                          config=str(retrying_config(root / "frontend.json", b.addr("inbound"))),
                          extra=[*SAMPLE_ALL, "--access-log", str(a_log)])
        started.append(a)
        yield Pair(app, a, b, a_log, b_log)
    finally:
        for thing in reversed(started):
            thing.stop()


# --- traces -----------------------------------------------------------------------------------
def test_two_hops_form_one_tree(pair: Pair, receiver: OtlpReceiver) -> None:
    outcome = call(pair.entry, PLACE, "tree-1")
    assert outcome == Outcome("OK", "", b"orders-1", outcome.seconds)
    [seen] = pair.app.seen("tree-1")
    trace_id, app_parent, flags = seen.traceparent
    spans = in_trace(receiver, trace_id, 2)
    client = one(spans, "CLIENT", "mesh-sidecar/frontend")
    server = one(spans, "SERVER", "mesh-sidecar/orders")

    # one tree: A's CLIENT span is the root (the caller sent no context), B's SERVER span its
    # child, and the app is told that B's SERVER span is its parent (sampled)
    assert client.parent_span_id == "", describe_spans(spans)
    assert server.parent_span_id == client.span_id, describe_spans(spans)
    assert app_parent == server.span_id
    assert flags == "03"  # sampled, and (W3C level 2) a random trace id: A made it up
    assert [(depth, s.kind) for depth, s in iter_trace(spans, trace_id)] == [
        (0, "CLIENT"), (1, "SERVER")]

    for span in (client, server):
        assert span.name == "shop.Orders/Place"
        assert span.attributes["rpc.system"] == "grpc"
        assert span.attributes["rpc.service"] == ORDERS_GRPC
        assert span.attributes["rpc.method"] == "Place"
        assert span.attributes["rpc.grpc.status_code"] == 0
        assert span.attributes["mesh.attempts"] == 1
        assert span.status == "UNSET"  # OK leaves the status unset, as the conventions ask
        assert "error.type" not in span.attributes
        assert span.proto.end_time_unix_nano > span.proto.start_time_unix_nano
    # CLIENT: the upstream it called is B's inbound listener
    assert client.attributes["server.address"] == "127.0.0.1"
    assert client.attributes["server.port"] == pair.b_inbound_port
    assert client.attributes["mesh.cluster"] == "orders"
    # B's span lies within A's
    assert client.proto.start_time_unix_nano <= server.proto.start_time_unix_nano
    assert server.proto.end_time_unix_nano <= client.proto.end_time_unix_nano
    assert client.resource["mesh.service"] == "frontend"
    assert server.resource["mesh.service"] == "orders"


def test_server_span_names_its_listener_and_its_caller(pair: Pair,
                                                        receiver: OtlpReceiver) -> None:
    """docs/observability.md: a SERVER span's server.* is the listener (B's inbound) and its
    network.peer.* the caller (A's connection), not the app B forwarded to."""
    assert call(pair.entry, PLACE, "listener-1").code == "OK"
    [seen] = pair.app.seen("listener-1")
    spans = in_trace(receiver, seen.traceparent[0], 2)
    server = one(spans, "SERVER")
    attrs = server.attributes
    assert (attrs["server.address"], attrs["server.port"]) == ("127.0.0.1",
                                                               pair.b_inbound_port), attrs
    assert attrs["network.peer.address"] == "127.0.0.1"
    assert attrs["network.peer.port"] not in (pair.app.port, pair.b_inbound_port), attrs


@pytest.mark.parametrize(("method", "code", "message", "server_error"), [
    (MISSING, "NOT_FOUND", "no such order", False),   # the caller's problem: SERVER not error
    (BROKEN, "INTERNAL", "orders app broke", True),   # the server's fault: both are errors
])
def test_an_error_status_marks_the_spans(pair: Pair, receiver: OtlpReceiver, method: str,
                                         code: str, message: str, server_error: bool) -> None:
    rid = f"error-{code}"
    outcome = call(pair.entry, method, rid)
    assert (outcome.code, outcome.details) == (code, message)  # unchanged for the caller
    [seen] = pair.app.seen(rid)
    spans = in_trace(receiver, seen.traceparent[0], 2)
    client, server = one(spans, "CLIENT"), one(spans, "SERVER")
    number = grpc.StatusCode[code].value[0]

    assert client.status == "ERROR"  # CLIENT: any non-OK code
    assert message in client.status_message
    assert client.attributes["error.type"] == code
    assert client.attributes["rpc.grpc.status_code"] == number
    assert server.attributes["rpc.grpc.status_code"] == number
    if server_error:
        assert server.status == "ERROR"
        assert message in server.status_message
        assert server.attributes["error.type"] == code
    else:
        assert server.status == "UNSET"
        assert "error.type" not in server.attributes
    assert server.parent_span_id == client.span_id


def test_a_retried_call_shows_each_attempt(pair: Pair, receiver: OtlpReceiver) -> None:
    outcome = call(pair.entry, FLAKY, "retry-1")
    assert outcome.code == "OK", outcome  # A retried the UNAVAILABLE
    tries = pair.app.seen("retry-1")
    assert len(tries) == 2
    trace_id = tries[0].traceparent[0]
    spans = in_trace(receiver, trace_id, 3)
    client = one(spans, "CLIENT")
    servers = sorted((s for s in spans if s.kind == "SERVER"),
                     key=lambda s: s.proto.start_time_unix_nano)

    assert client.status == "UNSET"
    assert client.attributes["mesh.attempts"] == 2
    assert client.attributes["rpc.grpc.status_code"] == 0
    assert [(name, attrs["mesh.attempt"], attrs["rpc.grpc.status_code"], attrs["error.type"])
            for name, attrs in client.events] == [("retry", 1, 14, "UNAVAILABLE")]
    # one SERVER span per attempt, each a child of the one CLIENT span
    assert len(servers) == 2, describe_spans(spans)
    assert all(s.parent_span_id == client.span_id for s in servers)
    assert [s.status for s in servers] == ["ERROR", "UNSET"]  # UNAVAILABLE is a server fault
    assert [s.attributes["rpc.grpc.status_code"] for s in servers] == [14, 0]
    # each attempt reached the app as a child of its own SERVER span
    assert [t.traceparent[:2] for t in tries] == [(trace_id, s.span_id) for s in servers]


def test_a_callers_traceparent_is_continued(pair: Pair, receiver: OtlpReceiver) -> None:
    md = [("traceparent", f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"),
          ("tracestate", "vendor=abc,other=1")]
    assert call(pair.entry, PLACE, "continue-1", md).code == "OK"
    [seen] = pair.app.seen("continue-1")
    spans = in_trace(receiver, CALLER_TRACE, 2)
    client, server = one(spans, "CLIENT"), one(spans, "SERVER")

    assert client.parent_span_id == CALLER_SPAN  # A's span is a child of the caller's
    assert server.parent_span_id == client.span_id
    assert seen.traceparent == (CALLER_TRACE, server.span_id, "01")
    assert seen.metadata.get("tracestate") == "vendor=abc,other=1"


def test_a_b3_caller_is_continued(pair: Pair, receiver: OtlpReceiver) -> None:
    trace_id, span_id = "463ac35c9f6413ad48485a3953bb6124", "a2fb4a1d1a96d312"
    assert call(pair.entry, PLACE, "b3-1", [("b3", f"{trace_id}-{span_id}-1")]).code == "OK"
    [seen] = pair.app.seen("b3-1")
    spans = in_trace(receiver, trace_id, 2)
    client, server = one(spans, "CLIENT"), one(spans, "SERVER")
    assert client.parent_span_id == span_id
    assert server.parent_span_id == client.span_id
    assert seen.traceparent == (trace_id, server.span_id, "01")
    # the app gets B3 too, naming B's span, so a B3-only app continues the same trace
    assert seen.metadata.get("b3", "").startswith(f"{trace_id}-{server.span_id}-1")


@pytest.mark.parametrize("traceparent", [
    f"00-{'0' * 32}-{CALLER_SPAN}-01",                  # all-zero trace id
    f"00-{CALLER_TRACE}-{'0' * 16}-01",                 # all-zero parent id
    f"ff-{CALLER_TRACE}-{CALLER_SPAN}-01",              # version ff is forbidden
    f"00-{CALLER_TRACE.upper()}-{CALLER_SPAN}-01",      # upper-case hex
    f"00-{CALLER_TRACE[:30]}-{CALLER_SPAN}-01",         # short trace id
    "not a traceparent",
], ids=["zero-trace", "zero-parent", "version-ff", "uppercase", "short", "garbage"])
def test_an_invalid_traceparent_is_replaced_by_a_new_trace(pair: Pair, receiver: OtlpReceiver,
                                                            traceparent: str) -> None:
    rid = f"invalid-{traceparent}"
    md = [("traceparent", traceparent), ("tracestate", "vendor=abc")]
    assert call(pair.entry, PLACE, rid, md).code == "OK"
    [seen] = pair.app.seen(rid)
    trace_id, parent, flags = seen.traceparent
    assert trace_id not in (CALLER_TRACE, "0" * 32)
    assert "tracestate" not in seen.metadata  # only ever kept with a valid traceparent
    spans = in_trace(receiver, trace_id, 2)
    client, server = one(spans, "CLIENT"), one(spans, "SERVER")
    assert client.parent_span_id == ""  # a new root
    assert server.parent_span_id == client.span_id
    assert (parent, flags) == (server.span_id, "03")  # sampled, random trace id


def test_an_unsampled_caller_is_followed(pair: Pair, receiver: OtlpReceiver) -> None:
    """Parent-based sampling: the caller said no, so no span, whatever our 100%; the context
    still flows (same trace, not sampled)."""
    trace_id = "5c0ffee5c0ffee5c0ffee5c0ffee5c0f"
    md = [("traceparent", f"00-{trace_id}-{CALLER_SPAN}-00")]
    assert call(pair.entry, PLACE, "unsampled-1", md).code == "OK"
    [seen] = pair.app.seen("unsampled-1")
    got_trace, _parent, flags = seen.traceparent
    assert (got_trace, flags) == (trace_id, "00")
    settled(receiver, pair.entry, 2, "unsampled-marker")
    assert not [s for s in receiver.spans() if s.trace_id == trace_id]


# --- a demo-like chain of two services ---------------------------------------------------------
def test_a_chain_of_two_services_is_one_trace(pair: Pair, receiver: OtlpReceiver) -> None:
    """test -> sidecar W (web) inbound -> frontend app -> W outbound -> B inbound -> orders app:
    one trace, each span the child of the one before, the app's hop included."""
    frontend = FrontendApp()
    web = None
    try:
        web = start_sidecar(service="web", app=frontend.address, name="sidecar-web",
                            upstreams={"orders": [pair.b.addr("inbound")]},
                            routes={ORDERS_GRPC: "orders"}, env=otel_env(receiver.endpoint),
                            extra=SAMPLE_ALL)
        frontend.outbound = web.addr("outbound")
        trace_id = "0123456789abcdef0123456789abcdef"
        md = [("traceparent", f"00-{trace_id}-{CALLER_SPAN}-01")]
        outcome = call(web.addr("inbound"), HOME, "chain-1", md)
        assert (outcome.code, outcome.answer) == ("OK", b"home via orders-1"), outcome
    finally:
        frontend.stop()
        if web is not None:
            web.stop()
    [seen] = pair.app.seen("chain-1")
    spans = in_trace(receiver, trace_id, 3)
    web_server = one(spans, "SERVER", "mesh-sidecar/web")
    web_client = one(spans, "CLIENT", "mesh-sidecar/web")
    orders_server = one(spans, "SERVER", "mesh-sidecar/orders")

    assert web_server.parent_span_id == CALLER_SPAN
    assert web_client.parent_span_id == web_server.span_id  # through the frontend app
    assert orders_server.parent_span_id == web_client.span_id
    assert seen.traceparent == (trace_id, orders_server.span_id, "01")
    assert [(d, s.service, s.kind, s.name) for d, s in iter_trace(spans, trace_id)] == [
        (0, "mesh-sidecar/web", "SERVER", "shop.Frontend/Home"),
        (1, "mesh-sidecar/web", "CLIENT", "shop.Orders/Place"),
        (2, "mesh-sidecar/orders", "SERVER", "shop.Orders/Place")]


# --- a trace backend that is down --------------------------------------------------------------
def latencies(entry: str, count: int, tag: str) -> list[float]:
    """`count` calls on one channel; every one must succeed."""
    with grpc.insecure_channel(entry) as channel:
        outcomes = [call(entry, PLACE, f"{tag}-{n}", channel=channel) for n in range(count)]
    failed = collections.Counter(f"{o.code}: {o.details}" for o in outcomes if o.code != "OK")
    assert not failed, failed
    return [o.seconds for o in outcomes]


def start_pair(app: OrdersApp, env: dict[str, str], tag: str) -> list[ManagedProcess]:
    b = start_sidecar(service="orders", app=app.address, env=env, name=f"sidecar-orders-{tag}",
                      extra=SAMPLE_ALL)
    try:
        a = start_sidecar(service="frontend", upstreams={"orders": [b.addr("inbound")]},
                          routes={ORDERS_GRPC: "orders"}, env=env,
                          name=f"sidecar-frontend-{tag}", extra=SAMPLE_ALL)
    except BaseException:
        b.stop()
        raise
    return [a, b]


def stop_quickly(sidecars: Sequence[ManagedProcess], limit: float = 5.0) -> None:
    """Drain and exit 0 within `limit` seconds each, whatever the trace backend does."""
    for sidecar in sidecars:
        started = time.monotonic()
        code = sidecar.stop()
        took = time.monotonic() - started
        assert code == 0, sidecar.output()[-3000:]
        assert took < limit, f"{sidecar.name} took {took:.1f}s to stop"


@pytest.mark.parametrize("backend", ["refusing", "never-answering"])
def test_no_trace_backend_changes_nothing_for_calls(backend: str) -> None:
    """The OTLP endpoint refuses connections (a bound port nobody listens on), or accepts them
    and never speaks HTTP/2 (a listening socket nobody accepts from)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    if backend == "never-answering":
        sock.listen(1)
    app = OrdersApp()
    sidecars: list[ManagedProcess] = []
    try:
        endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
        sidecars = start_pair(app, otel_env(endpoint), backend)
        took = latencies(sidecars[0].addr("outbound"), 150, backend)
        assert statistics.median(took) < 0.05, statistics.median(took)
        assert max(took) < 1.0, max(took)
        stop_quickly(sidecars)
    finally:
        for sidecar in sidecars:
            sidecar.stop()
        app.stop()
        sock.close()


def test_trace_backend_stopped_mid_test_changes_nothing_for_calls() -> None:
    app = OrdersApp()
    backend = OtlpReceiver()
    sidecars: list[ManagedProcess] = []
    try:
        sidecars = start_pair(app, otel_env(backend.endpoint), "stopped")
        entry = sidecars[0].addr("outbound")
        before = latencies(entry, 60, "up")
        backend.wait_for_spans(1, where=lambda s: s.service == "mesh-sidecar/frontend")
        backend.wait_for_spans(1, where=lambda s: s.service == "mesh-sidecar/orders")
        backend.stop()
        after = latencies(entry, 150, "down")
        baseline = statistics.median(before)
        assert statistics.median(after) < 3 * baseline + 0.01, (baseline, after)
        assert max(after) < 1.0, max(after)
        stop_quickly(sidecars)
    finally:
        for sidecar in sidecars:
            sidecar.stop()
        backend.stop()
        app.stop()


# --- metrics ----------------------------------------------------------------------------------
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(sidecar: ManagedProcess) -> Samples:
    status, body = http_get(sidecar.addr("admin"), "/metrics")
    assert status == 200, body
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def series(samples: Samples, name: str) -> list[tuple[dict[str, str], float]]:
    return [(dict(labels), v) for (n, labels), v in samples.items() if n == name]


def test_metrics_count_known_traffic(pair: Pair) -> None:
    before_a, before_b = scrape(pair.a), scrape(pair.b)
    with grpc.insecure_channel(pair.entry) as channel:
        outcomes = ([call(pair.entry, PLACE, f"m-ok-{n}", channel=channel) for n in range(20)]
                    + [call(pair.entry, MISSING, f"m-nf-{n}", channel=channel)
                       for n in range(5)]
                    + [call(pair.entry, FLAKY, f"m-retry-{n}", channel=channel)
                       for n in range(3)])
    assert collections.Counter(o.code for o in outcomes) == {"OK": 23, "NOT_FOUND": 5}
    after_a, after_b = scrape(pair.a), scrape(pair.b)

    def delta(after: Samples, before: Samples, name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    requests = f"{METRIC}_requests_total"
    out = {"direction": "outbound", "service": ORDERS_GRPC}
    inb = {"direction": "inbound", "service": ORDERS_GRPC}
    # A, outbound: what the caller saw (a retried call counts once, with its final status)
    assert delta(after_a, before_a, requests, **out, method="Place", grpc_status="OK") == 20
    assert delta(after_a, before_a, requests, **out, method="Missing",
                 grpc_status="NOT_FOUND") == 5
    assert delta(after_a, before_a, requests, **out, method="Flaky", grpc_status="OK") == 3
    assert delta(after_a, before_a, requests, **out, method="Flaky",
                 grpc_status="UNAVAILABLE") == 0
    assert delta(after_a, before_a, f"{METRIC}_retries_total", **out, method="Flaky") == 3
    assert delta(after_a, before_a, f"{METRIC}_retries_total", **out, method="Place") == 0
    # B, inbound: every attempt that reached it
    assert delta(after_b, before_b, requests, **inb, method="Place", grpc_status="OK") == 20
    assert delta(after_b, before_b, requests, **inb, method="Missing",
                 grpc_status="NOT_FOUND") == 5
    assert delta(after_b, before_b, requests, **inb, method="Flaky",
                 grpc_status="UNAVAILABLE") == 3
    assert delta(after_b, before_b, requests, **inb, method="Flaky", grpc_status="OK") == 3

    histogram = f"{METRIC}_request_duration_seconds"
    for after, before, labels, counts in (
            (after_a, before_a, out, {"Place": 20, "Missing": 5, "Flaky": 3}),
            (after_b, before_b, inb, {"Place": 20, "Missing": 5, "Flaky": 6})):
        for method, count in counts.items():
            assert delta(after, before, f"{histogram}_count", **labels, method=method) == count
            assert delta(after, before, f"{histogram}_bucket", **labels, method=method,
                         le="+Inf") == count
            assert delta(after, before, f"{histogram}_sum", **labels, method=method) > 0
            buckets = sorted((float(lbl["le"]), v) for lbl, v in series(after,
                             f"{histogram}_bucket") if lbl["method"] == method
                             and lbl["direction"] == labels["direction"])
            assert [v for _le, v in buckets] == sorted(v for _le, v in buckets)  # cumulative

    for samples in (after_a, after_b):
        orders_in_flight = [(lbl, v) for lbl, v in series(samples,
                            f"{METRIC}_requests_in_flight") if lbl["service"] == ORDERS_GRPC]
        assert orders_in_flight and all(v == 0 for _lbl, v in orders_in_flight), \
            orders_in_flight
        [(info, one_)] = series(samples, f"{METRIC}_config_info")
        assert info["version"] and one_ == 1
        assert value(samples, f"{METRIC}_config_age_seconds") >= 0
    assert value(after_a, f"{METRIC}_info", service="frontend", version="") == 1


def test_in_flight_gauge_follows_a_call(pair: Pair) -> None:
    pair.app.release.clear()
    result: list[Outcome] = []
    caller = threading.Thread(target=lambda: result.append(call(pair.entry, SLOW, "slow-1")))
    caller.start()
    try:
        for sidecar, direction in ((pair.a, "outbound"), (pair.b, "inbound")):
            wait_for(lambda s=sidecar, d=direction: value(  # type: ignore[misc]
                scrape(s), f"{METRIC}_requests_in_flight", direction=d,
                service=ORDERS_GRPC, method="Slow") == 1, timeout=5,
                what=f"{direction} in-flight Slow = 1")
    finally:
        pair.app.release.set()
        caller.join(CALL_TIMEOUT + 1)
    assert result and result[0].code == "OK", result
    for sidecar, direction in ((pair.a, "outbound"), (pair.b, "inbound")):
        samples = scrape(sidecar)
        assert value(samples, f"{METRIC}_requests_in_flight", direction=direction,
                     service=ORDERS_GRPC, method="Slow") == 0


# --- access log -------------------------------------------------------------------------------
ACCESS_KEYS = {"time", "service", "direction", "method", "status", "grpc_code", "duration_ms",
               "attempts", "trace_id", "caller", "upstream"}


def access_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    # only whole lines: the writer may be mid-line
    return [json.loads(line) for line in lines if line.endswith("\n")]


def logged(path: Path, trace_id: str, count: int = 1) -> list[dict[str, Any]]:
    def found() -> list[dict[str, Any]] | None:
        got = [e for e in access_lines(path) if e["trace_id"] == trace_id]
        return got if len(got) >= count else None
    result: list[dict[str, Any]] = wait_for(found, timeout=10, interval=0.05,
                                            what=f"{count} access-log lines of {trace_id}")
    return result


@pytest.mark.parametrize(("method", "status", "code", "attempts"), [
    (PLACE, "OK", 0, 1), (MISSING, "NOT_FOUND", 5, 1), (FLAKY, "OK", 0, 2)])
def test_access_log_has_a_json_line_per_call(pair: Pair, method: str, status: str, code: int,
                                             attempts: int) -> None:
    trace_id = secrets.token_hex(16)
    rid = f"log-{method}"
    md = [("traceparent", f"00-{trace_id}-{CALLER_SPAN}-01")]
    started = time.time()
    outcome = call(pair.entry, method, rid, md)
    assert outcome.code == status

    [a_line] = logged(pair.a_log, trace_id)
    assert set(a_line) == ACCESS_KEYS
    assert a_line["service"] == "frontend"
    assert a_line["direction"] == "outbound"
    assert a_line["method"] == method
    assert (a_line["status"], a_line["grpc_code"]) == (status, code)
    assert a_line["attempts"] == attempts
    assert a_line["upstream"] == pair.b.addr("inbound")
    assert 0 < a_line["duration_ms"] <= outcome.seconds * 1000 + 1
    logged_at = datetime.fromisoformat(a_line["time"]).timestamp()  # "...Z": UTC
    assert started - 2 <= logged_at <= time.time() + 1, a_line["time"]

    b_lines = logged(pair.b_log, trace_id, attempts)  # B saw every attempt
    assert len(b_lines) == attempts
    for line in b_lines:
        assert (line["service"], line["direction"], line["method"]) == ("orders", "inbound",
                                                                        method)
        assert line["upstream"] == pair.app.address
        assert line["attempts"] == 1
    assert b_lines[-1]["status"] == status


def test_access_log_names_the_caller(pair: Pair) -> None:
    """docs/observability.md: `caller` is the peer's identity (SPIFFE ID with mTLS) or its
    address; without mTLS B's inbound line names A's connection."""
    trace_id = secrets.token_hex(16)
    md = [("traceparent", f"00-{trace_id}-{CALLER_SPAN}-01")]
    assert call(pair.entry, PLACE, "log-caller", md).code == "OK"
    [line] = logged(pair.b_log, trace_id)
    assert line["caller"] is not None and line["caller"].startswith(("127.0.0.1:", "ipv4:")), \
        line


# --- sampling from MeshConfig -----------------------------------------------------------------
def mesh_config(percent: float) -> str:
    return ("kind: MeshConfig\nmetadata: {name: default}\n"
            f"spec:\n  tracing: {{samplingPercent: {percent}}}\n")


def test_mesh_config_sampling_percent_decides_new_traces(receiver: OtlpReceiver,
                                                         tmp_path: Path) -> None:
    """The sidecars start with --trace-sampling 100; the control plane's MeshConfig (or its
    default, 1%) wins. Trace ids are random: at 1%, 5 or more sampled of 20 has odds ~1e-6."""
    cp = ControlPlane(tmp_path / "control-plane")
    app = OrdersApp("orders-cp")
    env = otel_env(receiver.endpoint)
    started: list[Any] = [cp, app]
    api = MeshApi(cp.address)
    try:
        common = ["--control-plane", cp.address, *SAMPLE_ALL]
        orders = start_sidecar(service="orders", app=app.address, env=env,
                               name="sidecar-orders-cp",
                               extra=[*common, "--instance-id", "orders-cp", "--version", "v1",
                                      "--grpc-service", ORDERS_GRPC,
                                      "--state-dir", str(tmp_path / "orders-cp")])
        started.append(orders)
        client = start_sidecar(service="shopper", env=env, name="sidecar-shopper",
                               extra=[*common, "--instance-id", "shopper-1",
                                      "--state-dir", str(tmp_path / "shopper-1")])
        started.append(client)
        nodes = ["orders~orders-cp", "shopper~shopper-1"]
        entry = client.addr("outbound")

        def enforce(percent: float) -> None:
            apply(cp.address, mesh_config(percent))
            wait_synced(api, nodes, api.revision("MeshConfig", "default"), changed=(LDS,))

        def new_traces(tag: str, count: int) -> list[tuple[str, str]]:
            """(trace id, flags) the app got for `count` calls with no trace context."""
            out = []
            for n in range(count):
                outcome = call(entry, PLACE, f"{tag}-{n}")
                assert outcome.code == "OK", outcome
                [seen] = app.seen(f"{tag}-{n}")
                trace_id, _parent, flags = seen.traceparent
                out.append((trace_id, flags))
            return out

        def traced(traces: list[tuple[str, str]]) -> None:
            assert {flags for _t, flags in traces} == {"03"}, traces  # sampled, random id
            for trace_id, _flags in traces:
                spans = in_trace(receiver, trace_id, 2)
                assert {(s.service, s.kind) for s in spans} == {
                    ("mesh-sidecar/shopper", "CLIENT"), ("mesh-sidecar/orders", "SERVER")}

        # No MeshConfig yet: the control plane's default (1%) overrides --trace-sampling 100.
        wait_synced(api, nodes, changed=(LDS,))
        wait_for(lambda: cluster_endpoints(client).get("orders"), timeout=10,
                 what="the client sidecar to route to orders")
        default = new_traces("cp-default", 20)
        assert sum(flags == "03" for _t, flags in default) <= 4, default  # not 20 of 20

        enforce(100)
        traced(new_traces("cp-100", 5))

        enforce(0)
        untraced = new_traces("cp-0", 30)
        assert {flags for _t, flags in untraced} == {"02"}, untraced  # not sampled
        settled(receiver, entry, 2, "cp-0-marker")  # a sampled caller is still followed
        ids = {t for t, _f in untraced}
        assert not [s for s in receiver.spans() if s.trace_id in ids]

        enforce(100)  # and back, while running
        traced(new_traces("cp-100-again", 5))
    finally:
        api.close()
        for thing in reversed(started):
            thing.stop()
