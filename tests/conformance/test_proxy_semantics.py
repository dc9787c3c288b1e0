"""What a user of an Envoy-like sidecar expects beyond the interop cases.

Each check runs on the direct path too: the direct run proves the check itself passes against a
plain server, so a failure on a proxy path is the proxy's doing.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from interop import messages_pb2, test_pb2_grpc

from tests.conformance.conftest import TEST_ROUTES
from tests.conformance.interop_client import Requests, channel
from tests.harness import start_sidecar, wait_for

ALL_PATHS = ("direct", "one_sidecar", "sidecar_pair")
PROXY_PATHS = ("one_sidecar", "sidecar_pair")
SMALL_LIMIT = 1024 * 1024
TEN_MB = 10 * 1024 * 1024


def _zeros(size: int) -> messages_pb2.Payload:
    return messages_pb2.Payload(body=bytes(size))


def _observe(server: str, call_id: str) -> dict:
    """Ask the server (directly, a side channel) what it saw of the call tagged `call_id`."""
    with channel(server) as ch:
        lookup = ch.unary_unary("/pymesh.conformance.Observer/Lookup")
        return json.loads(lookup(call_id.encode(), timeout=5))


@pytest.fixture(scope="module")
def limited_sidecar(test_server: str) -> Iterator[str]:
    """One sidecar with --max-message-bytes 1 MiB; yields its outbound address."""
    proc = start_sidecar(service="client", upstreams={"test": [test_server]}, routes=TEST_ROUTES,
                         extra=["--max-message-bytes", str(SMALL_LIMIT)],
                         name="sidecar-limited")
    try:
        yield proc.addr("outbound")
    finally:
        proc.stop()


# -- metadata ---------------------------------------------------------------------------------

BLOB = bytes(range(256)) + b"\x00\x00"  # every byte value; trailing NULs trip naive codecs
ECHO_MD = (("x-pymesh-echo-blob-bin", BLOB), ("x-pymesh-echo-empty-bin", b""),
           ("x-pymesh-echo-text", "spaces and ~!@#$%^&*()_+ ,;= symbols"))


def _echoed(md) -> dict:
    return {k: v for k, v in md or () if k.startswith("x-pymesh-echo-")}


@pytest.mark.parametrize("path", ALL_PATHS)
def test_binary_metadata_round_trips_unary(path: str, paths: dict[str, str]) -> None:
    with channel(paths[path]) as ch:
        _, call = test_pb2_grpc.TestServiceStub(ch).UnaryCall.with_call(
            messages_pb2.SimpleRequest(response_size=10), metadata=ECHO_MD, timeout=10)
    assert _echoed(call.initial_metadata()) == dict(ECHO_MD)
    assert _echoed(call.trailing_metadata()) == dict(ECHO_MD)


@pytest.mark.parametrize("path", ALL_PATHS)
def test_binary_metadata_round_trips_streaming(path: str, paths: dict[str, str]) -> None:
    req = messages_pb2.StreamingOutputCallRequest(
        response_parameters=[messages_pb2.ResponseParameters(size=5)])
    with channel(paths[path]) as ch:
        call = test_pb2_grpc.TestServiceStub(ch).FullDuplexCall(iter([req]), metadata=ECHO_MD,
                                                                timeout=10)
        assert [len(r.payload.body) for r in call] == [5]
        assert _echoed(call.initial_metadata()) == dict(ECHO_MD)
        assert _echoed(call.trailing_metadata()) == dict(ECHO_MD)


# -- rich status ------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ALL_PATHS)
def test_status_details_bin_passes_unchanged(path: str, paths: dict[str, str]) -> None:
    with channel(paths[path]) as ch, pytest.raises(grpc.RpcError) as info:
        test_pb2_grpc.TestServiceStub(ch).UnaryCall(
            messages_pb2.SimpleRequest(), metadata=(("x-pymesh-rich-error", "1"),), timeout=10)
    err = info.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "rich error requested"
    status = rpc_status.from_call(err)  # also checks code and message agree with the trailer
    assert status is not None, f"no grpc-status-details-bin in {err.trailing_metadata()}"
    assert len(status.details) == 1
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request)
    assert [(v.field, v.description) for v in bad_request.field_violations] == [
        ("payload.body", "rich error requested")]


# -- deadlines and cancellation ---------------------------------------------------------------

# The grpc-timeout header "may round up arbitrarily" (grpc core rounds to about three significant
# digits), so each hop may add up to ~1% of the timeout; measured: +8 ms on 7 s direct.
HOPS = {"direct": 1, "one_sidecar": 2, "sidecar_pair": 3}


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("shape", ["unary", "bidi"])
def test_deadline_reaches_server(path: str, shape: str, paths: dict[str, str],
                                 test_server: str) -> None:
    """The server's deadline is the client's (never later, beyond header rounding)."""
    timeout = 3.0
    call_id = f"deadline-{uuid.uuid4()}"
    md = (("x-pymesh-call-id", call_id),)
    with channel(paths[path]) as ch:
        stub = test_pb2_grpc.TestServiceStub(ch)
        client_deadline = time.time() + timeout
        if shape == "unary":
            stub.UnaryCall(messages_pb2.SimpleRequest(), metadata=md, timeout=timeout)
        else:
            list(stub.FullDuplexCall(iter(()), metadata=md, timeout=timeout))
    seen = _observe(test_server, call_id)
    assert seen.get("deadline_unix") is not None, f"server saw no deadline: {seen}"
    rounding = HOPS[path] * 0.01 * timeout
    late = seen["deadline_unix"] - client_deadline
    assert late <= rounding, f"server deadline {late:+.3f}s after the client's: {seen}"
    # ...and not lost on the way either (a proxy must not shorten it to a default).
    assert late > -1.0, f"server deadline {-late:.3f}s before the client's: {seen}"


def _await_cancel_seen(server: str, call_id: str) -> dict:
    """Wait until the server's handler for the call has ended; return what it recorded."""
    def finished() -> dict | None:
        seen = _observe(server, call_id)
        return seen if seen.get("done") else None

    return wait_for(finished, timeout=10, interval=0.05, what=f"server to finish call {call_id}")


@pytest.mark.parametrize("path", ALL_PATHS)
def test_client_cancel_reaches_server_bidi(path: str, paths: dict[str, str],
                                           test_server: str) -> None:
    """FullDuplexCall: one response, then the server sleeps 20 s; the client cancels.

    The server must be told (its handler is cancelled) rather than sleep on. The cancel lands
    while the handler sleeps because grpc.aio only cancels a handler at an await: a handler
    waiting for the next request sees its request stream end as if half-closed instead.
    """
    call_id = f"cancel-bidi-{uuid.uuid4()}"
    reqs = Requests()
    try:
        with channel(paths[path]) as ch:
            call = test_pb2_grpc.TestServiceStub(ch).FullDuplexCall(
                reqs, metadata=(("x-pymesh-call-id", call_id),), timeout=30)
            reqs.put(messages_pb2.StreamingOutputCallRequest(response_parameters=[
                messages_pb2.ResponseParameters(size=3),
                messages_pb2.ResponseParameters(size=1, interval_us=20_000_000)]))
            assert len(next(call).payload.body) == 3
            call.cancel()
            assert call.code() == grpc.StatusCode.CANCELLED
            seen = _await_cancel_seen(test_server, call_id)
    finally:
        reqs.close()
    assert seen["cancelled"] is True, seen


@pytest.mark.parametrize("path", ALL_PATHS)
def test_client_cancel_reaches_server_while_it_sleeps(path: str, paths: dict[str, str],
                                                      test_server: str) -> None:
    """StreamingOutputCall, the server sleeping 20 s before its reply; the client cancels."""
    call_id = f"cancel-sleep-{uuid.uuid4()}"
    req = messages_pb2.StreamingOutputCallRequest(
        response_parameters=[messages_pb2.ResponseParameters(size=1, interval_us=20_000_000)])
    with channel(paths[path]) as ch:
        call = test_pb2_grpc.TestServiceStub(ch).StreamingOutputCall(
            req, metadata=(("x-pymesh-call-id", call_id),), timeout=30)
        wait_for(lambda: _observe(test_server, call_id).get("started"), timeout=10,
                 interval=0.02, what="server to start the call")
        call.cancel()
    seen = _await_cancel_seen(test_server, call_id)
    assert seen["cancelled"] is True, seen


# -- routing ----------------------------------------------------------------------------------

def test_unknown_service_is_unimplemented_naming_it(paths: dict[str, str]) -> None:
    with channel(paths["one_sidecar"]) as ch:
        unary = ch.unary_unary("/no.such.Service/Method")
        with pytest.raises(grpc.RpcError) as info:
            unary(b"", timeout=10)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "no.such.Service" in (info.value.details() or "")
        stream = ch.stream_stream("/no.such.Other/Chat")
        with pytest.raises(grpc.RpcError) as info:
            list(stream(iter([b"x"]), timeout=10))
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "no.such.Other" in (info.value.details() or "")


# -- message sizes ----------------------------------------------------------------------------

def test_request_above_limit_is_resource_exhausted(limited_sidecar: str) -> None:
    with channel(limited_sidecar) as ch:
        stub = test_pb2_grpc.TestServiceStub(ch)
        # control: just under the limit passes
        ok = stub.UnaryCall(messages_pb2.SimpleRequest(response_size=1,
                                                       payload=_zeros(SMALL_LIMIT - 1024)),
                            timeout=10)
        assert len(ok.payload.body) == 1
        with pytest.raises(grpc.RpcError) as info:
            stub.UnaryCall(messages_pb2.SimpleRequest(payload=_zeros(2 * SMALL_LIMIT)),
                           timeout=10)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            stub.StreamingInputCall(iter([
                messages_pb2.StreamingInputCallRequest(payload=_zeros(10)),
                messages_pb2.StreamingInputCallRequest(payload=_zeros(2 * SMALL_LIMIT)),
            ]), timeout=10)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()


def test_response_above_limit_is_resource_exhausted(limited_sidecar: str) -> None:
    with channel(limited_sidecar) as ch:
        stub = test_pb2_grpc.TestServiceStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            stub.UnaryCall(messages_pb2.SimpleRequest(response_size=2 * SMALL_LIMIT), timeout=10)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
        call = stub.StreamingOutputCall(messages_pb2.StreamingOutputCallRequest(
            response_parameters=[messages_pb2.ResponseParameters(size=10),
                                 messages_pb2.ResponseParameters(size=2 * SMALL_LIMIT)]),
            timeout=10)
        with pytest.raises(grpc.RpcError) as info:
            list(call)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()


@pytest.mark.parametrize("path", ALL_PATHS)
def test_ten_megabyte_messages_pass_by_default(path: str, paths: dict[str, str]) -> None:
    with channel(paths[path]) as ch:
        stub = test_pb2_grpc.TestServiceStub(ch)
        resp = stub.UnaryCall(messages_pb2.SimpleRequest(response_size=TEN_MB,
                                                         payload=_zeros(TEN_MB)), timeout=20)
        assert len(resp.payload.body) == TEN_MB
        total = stub.StreamingInputCall(iter([messages_pb2.StreamingInputCallRequest(
            payload=_zeros(TEN_MB))]), timeout=20)
        assert total.aggregated_payload_size == TEN_MB


# -- early upstream errors --------------------------------------------------------------------

@pytest.mark.parametrize("path", ALL_PATHS)
def test_early_upstream_error_keeps_its_status(path: str, paths: dict[str, str]) -> None:
    """A streaming call the server rejects at once, while the caller is still sending.

    The server answers trailers-only UNIMPLEMENTED before reading the request; a proxy still
    writing that request upstream must pass the UNIMPLEMENTED on. (grpc.aio's client replaces
    the status with INTERNAL "Internal error from Core" when a write loses that race, a few
    percent of the time: hence many calls.)
    """
    attempts = 60
    with channel(paths[path]) as ch:
        method = ch.stream_stream("/grpc.testing.TestService/NoSuchStreamingMethod")
        seen: dict[str, int] = {}
        for _ in range(attempts):
            try:
                list(method(iter([b"\x00" * 64]), timeout=10))
                outcome = "OK"
            except grpc.RpcError as err:
                outcome = f"{err.code().name}: {err.details()}"
            seen[outcome] = seen.get(outcome, 0) + 1
    assert seen == {"UNIMPLEMENTED: Method not found!": attempts}, seen
