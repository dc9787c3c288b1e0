from __future__ import annotations

from collections import Counter

from google.protobuf import descriptor_pb2

from sidecar.balancer.round_robin import RoundRobin
from sidecar.metadata import forwardable
from sidecar.method_shapes import MethodShapes, unary_methods_of


def test_forwardable_keeps_app_metadata_and_drops_reserved_and_hop_by_hop():
    incoming = [(":authority", "x"), ("content-type", "application/grpc"),
                ("user-agent", "grpc-python"), ("te", "trailers"), ("grpc-timeout", "1S"),
                ("grpc-encoding", "gzip"), ("grpc-accept-encoding", "gzip"),
                ("connection", "close"), ("keep-alive", "1"),
                ("x-user", "u1"), ("x-user", "u2"), ("trace-bin", b"\x00\xff"),
                ("grpc-previous-rpc-attempts", "1"), ("grpc-status-details-bin", b"\x08\x03"),
                ("grpc-retry-pushback-ms", "10"), ("traceparent", "00-ab-cd-01")]
    assert forwardable(incoming) == (
        ("x-user", "u1"), ("x-user", "u2"), ("trace-bin", b"\x00\xff"),
        ("grpc-previous-rpc-attempts", "1"), ("grpc-status-details-bin", b"\x08\x03"),
        ("grpc-retry-pushback-ms", "10"), ("traceparent", "00-ab-cd-01"))
    assert forwardable(None) == ()


def test_round_robin_spreads_evenly_and_handles_empty():
    rr = RoundRobin(["a", "b", "c"], start=5)
    assert Counter(rr.pick() for _ in range(300)) == {"a": 100, "b": 100, "c": 100}
    assert RoundRobin([]).pick() is None


def test_unary_methods_are_read_from_descriptors():
    fd = descriptor_pb2.FileDescriptorProto(name="t.proto", package="pkg")
    svc = fd.service.add(name="Svc")
    svc.method.add(name="Unary")
    svc.method.add(name="ServerStream", server_streaming=True)
    svc.method.add(name="ClientStream", client_streaming=True)
    other = fd.service.add(name="Other")
    other.method.add(name="AlsoUnary")
    assert unary_methods_of("pkg.Svc", [fd]) == ["/pkg.Svc/Unary"]


def test_reflection_is_asked_once_per_service_then_retried_after_a_while():
    now = [100.0]
    shapes = MethodShapes(["/a.A/M"], clock=lambda: now[0])
    assert "/a.A/M" in shapes.unary
    assert shapes.should_ask("pkg.Svc")
    assert not shapes.should_ask("pkg.Svc")
    now[0] += 61
    assert shapes.should_ask("pkg.Svc")
    assert not MethodShapes(learn=False).should_ask("pkg.Svc")
    before = shapes.unary
    shapes.add(["/a.A/M"])
    assert shapes.unary is before  # unchanged set is not replaced: handlers stay cached
