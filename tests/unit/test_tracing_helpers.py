"""The pure parts of sidecar/telemetry/tracing.py, with the SDK's in-memory exporter (no
network): sampling decisions, span kinds and status rules, what goes downstream, addresses."""

from __future__ import annotations

import grpc
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from sidecar.telemetry import trace_context as tc
from sidecar.telemetry.tracing import (
    SERVER_ERROR_CODES,
    RatioSampler,
    SidecarTracing,
    parse_peer,
    split_host_port,
    status_code_int,
)

PARENT = tc.parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
UNSAMPLED = tc.parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00")


def tracing(ratio: float = 1.0) -> tuple[SidecarTracing, InMemorySpanExporter]:
    t = SidecarTracing("orders", ratio=ratio, environ={"OTEL_TRACES_EXPORTER": "none"})
    assert t.exporter is None and t.export_error is None
    memory = InMemorySpanExporter()
    t.provider.add_span_processor(SimpleSpanProcessor(memory))
    return t, memory


def test_ratio_sampler_decides_by_trace_id() -> None:
    s = RatioSampler(0.25)
    low = int(0.1 * (1 << 64))      # lower 64 bits below the bound: sampled
    high = int(0.9 * (1 << 64))
    assert s.decide((123 << 64) | low) and not s.decide((123 << 64) | high)
    s.set_ratio(1.0)
    assert s.decide((123 << 64) | high) and s.ratio == 1.0
    s.set_ratio(0.0)
    assert not s.decide(1)
    for bad in (-0.1, 1.01, float("nan")):
        with pytest.raises(ValueError, match="between 0 and 1"):
            RatioSampler(bad)


def test_span_kinds_names_and_parents() -> None:
    t, memory = tracing()
    server = t.start_server_span("/demo.Orders/Get", PARENT, peer="ipv4:10.1.2.3:5555",
                                 local_address="127.0.0.1:15006")
    server.end(grpc.StatusCode.OK)
    client = t.start_client_span("/demo.Orders/Get", None, upstream="10.0.0.9:7000")
    client.end(0)
    s, c = memory.get_finished_spans()
    assert (s.kind, c.kind) == (SpanKind.SERVER, SpanKind.CLIENT)
    assert s.name == c.name == "demo.Orders/Get"
    assert s.parent is not None and s.parent.span_id == PARENT.span_id  # type: ignore[union-attr]
    assert s.context.trace_id == PARENT.trace_id  # type: ignore[union-attr]
    assert c.parent is None
    assert dict(s.attributes) == {  # type: ignore[arg-type]
        "rpc.system": "grpc", "rpc.service": "demo.Orders", "rpc.method": "Get",
        "network.peer.address": "10.1.2.3", "network.peer.port": 5555,
        "server.address": "127.0.0.1", "server.port": 15006, "rpc.grpc.status_code": 0}
    assert c.attributes["server.address"] == "10.0.0.9"  # type: ignore[index]
    assert c.attributes["server.port"] == 7000  # type: ignore[index]
    assert s.resource.attributes["service.name"] == "mesh-sidecar/orders"


@pytest.mark.parametrize("code", list(grpc.StatusCode))
def test_status_rules(code: grpc.StatusCode) -> None:
    t, memory = tracing()
    t.start_client_span("/a.B/C", PARENT).end(code, "why")
    t.start_server_span("/a.B/C", PARENT).end(code, "why")
    client, server = memory.get_finished_spans()
    value = code.value[0]
    assert client.attributes["rpc.grpc.status_code"] == value  # type: ignore[index]
    assert client.status.status_code is (StatusCode.ERROR if value else StatusCode.UNSET)
    server_error = code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED,
                            grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INTERNAL,
                            grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS)
    assert server.status.status_code is (StatusCode.ERROR if server_error else StatusCode.UNSET)
    assert (value in SERVER_ERROR_CODES) is server_error
    if value:
        assert client.status.description == "why"


def test_headers_name_the_new_span_and_keep_tracestate() -> None:
    t, _memory = tracing()
    parent = tc.extract([("traceparent", tc.format_traceparent(PARENT.trace_id,  # type: ignore
                                                              PARENT.span_id, 1)),  # type: ignore
                         ("tracestate", "a=1,b=2")])
    span = t.start_server_span("/a.B/C", parent)
    headers = dict(span.headers())
    assert headers["traceparent"] == tc.format_traceparent(PARENT.trace_id,  # type: ignore
                                                           span.span_id, 1)
    assert headers["tracestate"] == "a=1,b=2"
    assert span.trace_id_hex == f"{PARENT.trace_id:032x}"  # type: ignore[union-attr]
    assert span.span_id != PARENT.span_id  # type: ignore[union-attr]


def test_unsampled_calls_get_ids_but_no_span() -> None:
    t, memory = tracing(ratio=0.0)
    child = t.start_server_span("/a.B/C", UNSAMPLED)
    root = t.start_client_span("/a.B/C", None)
    for span in (child, root):
        assert not span.sampled and span.span_id
        span.record_retry(1, grpc.StatusCode.UNAVAILABLE)
        span.set_upstream("127.0.0.1:1")
        span.end(grpc.StatusCode.INTERNAL)
    assert memory.get_finished_spans() == ()
    assert child.trace_id == UNSAMPLED.trace_id  # type: ignore[union-attr]
    assert dict(child.headers())["traceparent"].endswith("-00")
    assert dict(root.headers())["traceparent"].endswith("-02")  # random id, not sampled
    sampled_child = t.start_server_span("/a.B/C", PARENT)  # the caller decided: follow it
    assert sampled_child.sampled


def test_b3_deferred_decision_follows_the_ratio() -> None:
    deferred = tc.parse_b3_single("80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1")
    assert deferred is not None and deferred.sampled is None
    on, _ = tracing(1.0)
    off, _ = tracing(0.0)
    span_on = on.start_server_span("/a.B/C", deferred)
    span_off = off.start_server_span("/a.B/C", deferred)
    assert span_on.sampled and not span_off.sampled
    assert dict(span_on.headers())["b3"].split("-")[2] == "1"
    assert dict(span_off.headers())["b3"].split("-")[2] == "0"


@pytest.mark.parametrize(("peer", "expected"), [
    ("ipv4:127.0.0.1:5000", ("127.0.0.1", 5000)),
    ("ipv6:[::1]:5000", ("::1", 5000)),
    ("ipv6:%5B::1%5D:5000", ("::1", 5000)),
    ("unix:/tmp/sock", ("/tmp/sock", None)),
    ("", (None, None)),
    (None, (None, None)),
    ("weird", ("weird", None)),
])
def test_parse_peer(peer: str | None, expected: tuple) -> None:
    assert parse_peer(peer) == expected


@pytest.mark.parametrize(("address", "expected"), [
    ("127.0.0.1:7000", ("127.0.0.1", 7000)),
    ("[::1]:7000", ("::1", 7000)),
    ("dns:///orders.internal:443", ("orders.internal", 443)),
    ("orders", ("orders", None)),
    (None, (None, None)),
])
def test_split_host_port(address: str | None, expected: tuple) -> None:
    assert split_host_port(address) == expected


def test_status_code_int() -> None:
    assert status_code_int(grpc.StatusCode.UNAVAILABLE) == 14
    assert status_code_int(5) == 5


@pytest.mark.parametrize(("sampler", "arg", "root_sampled", "follows_parent"), [
    ("always_on", "", True, False),
    ("always_off", "", False, False),
    ("parentbased_always_off", "", False, True),
    ("parentbased_traceidratio", "1.0", True, True),
    ("traceidratio", "0", False, False),
])
def test_otel_traces_sampler_pins_the_sampler(sampler: str, arg: str, root_sampled: bool,
                                              follows_parent: bool) -> None:
    t = SidecarTracing("orders", environ={"OTEL_TRACES_EXPORTER": "none",
                                          "OTEL_TRACES_SAMPLER": sampler,
                                          "OTEL_TRACES_SAMPLER_ARG": arg})
    assert t.set_sampling_ratio(0.5) is False  # MeshConfig cannot override it
    assert t.start_client_span("/a.B/C", None).sampled is root_sampled
    if follows_parent:
        assert t.start_server_span("/a.B/C", PARENT).sampled
        assert not t.start_server_span("/a.B/C", UNSAMPLED).sampled


def test_unknown_otel_traces_sampler_leaves_mesh_config_in_charge() -> None:
    t = SidecarTracing("orders", ratio=0.0,
                       environ={"OTEL_TRACES_EXPORTER": "none", "OTEL_TRACES_SAMPLER": "nope"})
    assert t.set_sampling_ratio(1.0) is True
    assert t.start_client_span("/a.B/C", None).sampled
