"""The gRPC interop client cases, written from the public description (SPECS.md section 1).

Each case function takes a target address and returns an *observation*: a plain, JSON-able dict
of what a user of the call could see (status code, details, payload sizes, echoed metadata,
whether a response arrived compressed). Observations hold nothing that depends on the path
(no addresses, no timings), so the suite can run a case directly and through sidecars and
compare the records. `check(case, observation)` compares an observation with what the
description expects; the CLI runs a case and exits 0 when it passes:

    python -m tests.conformance.interop_client --target 127.0.0.1:PORT --case large_unary
"""

from __future__ import annotations

import argparse
import contextlib
import json
import queue
import sys
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from interop import empty_pb2, messages_pb2, test_pb2_grpc

from tests.conformance.wire import NO_DECOMPRESSION, decode_message

Observation = dict[str, Any]

MAX_MESSAGE = 64 * 1024 * 1024
CALL_TIMEOUT = 10.0
SPECIAL_MESSAGE = "\t\ntest with whitespace\r\nand Unicode BMP ☺ and non-BMP 😈\t\n"
ECHO_INITIAL = ("x-grpc-test-echo-initial", "test_initial_metadata_value")
ECHO_TRAILING = ("x-grpc-test-echo-trailing-bin", b"\xab\xab\xab")
STREAM_REQUEST_SIZES = (27182, 8, 1828, 45904)
STREAM_RESPONSE_SIZES = (31415, 9, 2653, 58979)


@contextlib.contextmanager
def channel(target: str, *extra_options: tuple[str, Any]) -> Iterator[grpc.Channel]:
    options = [("grpc.max_receive_message_length", MAX_MESSAGE),
               ("grpc.max_send_message_length", MAX_MESSAGE), *extra_options]
    with grpc.insecure_channel(target, options=options) as ch:
        yield ch


def _zeros(size: int) -> messages_pb2.Payload:
    return messages_pb2.Payload(type=messages_pb2.COMPRESSABLE, body=bytes(size))


def _error(err: grpc.RpcError, details: bool = True) -> Observation:
    obs: Observation = {"code": err.code().name}
    if details:
        obs["details"] = err.details()
    return obs


def _simple(resp: messages_pb2.SimpleResponse) -> Observation:
    body = resp.payload.body
    return {"code": "OK", "body_len": len(body), "body_zero": not any(body)}


class Requests:
    """A request iterator the test feeds step by step (the sync API pulls it on its own thread)."""

    _CLOSE = object()

    def __init__(self) -> None:
        self._queue: queue.Queue[Any] = queue.Queue()

    def put(self, request: Any) -> None:
        self._queue.put(request)

    def close(self) -> None:
        self._queue.put(self._CLOSE)

    def __iter__(self) -> Requests:
        return self

    def __next__(self) -> Any:
        item = self._queue.get()
        if item is self._CLOSE:
            self._queue.put(self._CLOSE)  # stay closed
            raise StopIteration
        return item


def _stream_request(*sizes: int, payload: int = 0, **fields: Any
                    ) -> messages_pb2.StreamingOutputCallRequest:
    return messages_pb2.StreamingOutputCallRequest(
        response_type=messages_pb2.COMPRESSABLE,
        response_parameters=[messages_pb2.ResponseParameters(size=s) for s in sizes],
        payload=_zeros(payload) if payload else None, **fields)


# -- the cases ---------------------------------------------------------------------------------

def empty_unary(target: str) -> Observation:
    with channel(target) as ch:
        resp = test_pb2_grpc.TestServiceStub(ch).EmptyCall(empty_pb2.Empty(),
                                                           timeout=CALL_TIMEOUT)
    return {"code": "OK", "response_bytes": resp.ByteSize()}


def large_unary(target: str) -> Observation:
    req = messages_pb2.SimpleRequest(response_type=messages_pb2.COMPRESSABLE,
                                     response_size=314159, payload=_zeros(271828))
    with channel(target) as ch:
        return _simple(test_pb2_grpc.TestServiceStub(ch).UnaryCall(req, timeout=CALL_TIMEOUT))


def _unary_step(stub: test_pb2_grpc.TestServiceStub, req: messages_pb2.SimpleRequest,
                compression: grpc.Compression | None = None) -> Observation:
    try:
        return _simple(stub.UnaryCall(req, timeout=CALL_TIMEOUT, compression=compression))
    except grpc.RpcError as err:
        return _error(err)


def client_compressed_unary(target: str) -> Observation:
    """The description's three steps, plus one proving compressed calls work without the check.

    `compressed_unchecked` (compressed request, expect_compressed=false) is ours: through a proxy
    that recompresses nothing, it is the step that shows compressed calls still succeed.
    """
    def req(expect: bool) -> messages_pb2.SimpleRequest:
        return messages_pb2.SimpleRequest(response_type=messages_pb2.COMPRESSABLE,
                                          response_size=314159, payload=_zeros(271828),
                                          expect_compressed=messages_pb2.BoolValue(value=expect))

    with channel(target) as ch:
        stub = test_pb2_grpc.TestServiceStub(ch)
        return {
            "probe": _unary_step(stub, req(True)),
            "compressed": _unary_step(stub, req(True), grpc.Compression.Gzip),
            "uncompressed": _unary_step(stub, req(False)),
            "compressed_unchecked": _unary_step(stub, req(False), grpc.Compression.Gzip),
        }


def server_compressed_unary(target: str) -> Observation:
    """Asks for a compressed then an uncompressed response and reports which arrived compressed.

    The channel asks the core not to decompress (wire.py), so the client sees the wire bytes.
    """
    def step(method: Callable, compressed: bool) -> Observation:
        req = messages_pb2.SimpleRequest(
            response_type=messages_pb2.COMPRESSABLE, response_size=314159,
            payload=_zeros(271828), response_compressed=messages_pb2.BoolValue(value=compressed))
        try:
            raw = method(req.SerializeToString(), timeout=CALL_TIMEOUT)
        except grpc.RpcError as err:
            return _error(err)
        data, was_compressed = decode_message(raw)
        obs = _simple(messages_pb2.SimpleResponse.FromString(data))
        obs["compressed"] = was_compressed
        return obs

    with channel(target, NO_DECOMPRESSION) as ch:
        method = ch.unary_unary("/grpc.testing.TestService/UnaryCall")
        return {"compressed": step(method, True), "uncompressed": step(method, False)}


def client_streaming(target: str) -> Observation:
    reqs = [messages_pb2.StreamingInputCallRequest(payload=_zeros(n))
            for n in STREAM_REQUEST_SIZES]
    with channel(target) as ch:
        resp = test_pb2_grpc.TestServiceStub(ch).StreamingInputCall(iter(reqs),
                                                                    timeout=CALL_TIMEOUT)
    return {"code": "OK", "aggregated_payload_size": resp.aggregated_payload_size}


def _sizes(responses: Iterator[messages_pb2.StreamingOutputCallResponse]) -> list[int]:
    return [len(r.payload.body) for r in responses]


def server_streaming(target: str) -> Observation:
    with channel(target) as ch:
        call = test_pb2_grpc.TestServiceStub(ch).StreamingOutputCall(
            _stream_request(*STREAM_RESPONSE_SIZES), timeout=CALL_TIMEOUT)
        sizes = _sizes(call)
        return {"code": call.code().name, "sizes": sizes}


def ping_pong(target: str) -> Observation:
    reqs = Requests()
    sizes = []
    try:
        with channel(target) as ch:
            call = test_pb2_grpc.TestServiceStub(ch).FullDuplexCall(reqs, timeout=CALL_TIMEOUT)
            for out, inp in zip(STREAM_RESPONSE_SIZES, STREAM_REQUEST_SIZES, strict=True):
                reqs.put(_stream_request(out, payload=inp))
                sizes.append(len(next(call).payload.body))
            reqs.close()
            rest = _sizes(call)
            return {"code": call.code().name, "sizes": sizes, "after_half_close": rest}
    finally:
        reqs.close()


def empty_stream(target: str) -> Observation:
    with channel(target) as ch:
        call = test_pb2_grpc.TestServiceStub(ch).FullDuplexCall(iter(()), timeout=CALL_TIMEOUT)
        sizes = _sizes(call)
        return {"code": call.code().name, "sizes": sizes}


def _echoes(call: grpc.Call) -> Observation:
    initial = [v for k, v in call.initial_metadata() or () if k == ECHO_INITIAL[0]]
    trailing = [v.hex() for k, v in call.trailing_metadata() or () if k == ECHO_TRAILING[0]]
    return {"initial_echo": initial, "trailing_echo": trailing}


def custom_metadata(target: str) -> Observation:
    metadata = (ECHO_INITIAL, ECHO_TRAILING)
    req = messages_pb2.SimpleRequest(response_type=messages_pb2.COMPRESSABLE,
                                     response_size=314159, payload=_zeros(271828))
    with channel(target) as ch:
        stub = test_pb2_grpc.TestServiceStub(ch)
        resp, call = stub.UnaryCall.with_call(req, metadata=metadata, timeout=CALL_TIMEOUT)
        unary = {**_simple(resp), **_echoes(call)}
        stream = stub.FullDuplexCall(iter([_stream_request(314159, payload=271828)]),
                                     metadata=metadata, timeout=CALL_TIMEOUT)
        sizes = _sizes(stream)
        duplex = {"code": stream.code().name, "sizes": sizes, **_echoes(stream)}
    return {"unary": unary, "full_duplex": duplex}


def _status_steps(target: str, code: int, message: str, duplex: bool) -> Observation:
    status = messages_pb2.EchoStatus(code=code, message=message)
    obs: Observation = {}
    with channel(target) as ch:
        stub = test_pb2_grpc.TestServiceStub(ch)
        try:
            stub.UnaryCall(messages_pb2.SimpleRequest(response_status=status),
                           timeout=CALL_TIMEOUT)
            obs["unary"] = {"code": "OK"}
        except grpc.RpcError as err:
            obs["unary"] = _error(err)
        if duplex:
            call = stub.FullDuplexCall(
                iter([messages_pb2.StreamingOutputCallRequest(response_status=status)]),
                timeout=CALL_TIMEOUT)
            try:
                sizes = _sizes(call)
                obs["full_duplex"] = {"code": "OK", "sizes": sizes}
            except grpc.RpcError as err:
                obs["full_duplex"] = _error(err)
    return obs


def status_code_and_message(target: str) -> Observation:
    return _status_steps(target, 2, "test status message", duplex=True)


def special_status_message(target: str) -> Observation:
    return _status_steps(target, 2, SPECIAL_MESSAGE, duplex=False)


def _call_empty(target: str, path: str) -> Observation:
    with channel(target) as ch:
        method = ch.unary_unary(path, request_serializer=empty_pb2.Empty.SerializeToString,
                                response_deserializer=empty_pb2.Empty.FromString)
        try:
            method(empty_pb2.Empty(), timeout=CALL_TIMEOUT)
            return {"code": "OK"}
        except grpc.RpcError as err:
            return _error(err)


def unimplemented_method(target: str) -> Observation:
    return _call_empty(target, "/grpc.testing.TestService/UnimplementedCall")


def unimplemented_service(target: str) -> Observation:
    return _call_empty(target, "/grpc.testing.UnimplementedService/UnimplementedCall")


def cancel_after_begin(target: str) -> Observation:
    reqs = Requests()
    try:
        with channel(target) as ch:
            future = test_pb2_grpc.TestServiceStub(ch).StreamingInputCall.future(
                reqs, timeout=CALL_TIMEOUT)
            future.cancel()
            return {"code": future.code().name, "cancelled": future.cancelled()}
    finally:
        reqs.close()


def cancel_after_first_response(target: str) -> Observation:
    reqs = Requests()
    try:
        with channel(target) as ch:
            call = test_pb2_grpc.TestServiceStub(ch).FullDuplexCall(reqs, timeout=CALL_TIMEOUT)
            reqs.put(_stream_request(31415, payload=27182))
            first = len(next(call).payload.body)
            call.cancel()
            try:
                rest = _sizes(call)
                return {"code": "OK", "first_size": first, "after_cancel": rest}
            except grpc.RpcError as err:
                return {**_error(err, details=False), "first_size": first}
    finally:
        reqs.close()


def timeout_on_sleeping_server(target: str) -> Observation:
    reqs = Requests()
    try:
        with channel(target) as ch:
            call = test_pb2_grpc.TestServiceStub(ch).FullDuplexCall(reqs, timeout=0.001)
            reqs.put(messages_pb2.StreamingOutputCallRequest(payload=_zeros(27182)))
            try:
                sizes = _sizes(call)
                return {"code": "OK", "sizes": sizes}
            except grpc.RpcError as err:
                return _error(err, details=False)
    finally:
        reqs.close()


CASES: dict[str, Callable[[str], Observation]] = {fn.__name__: fn for fn in (
    empty_unary, large_unary, client_compressed_unary, server_compressed_unary,
    client_streaming, server_streaming, ping_pong, empty_stream, custom_metadata,
    status_code_and_message, special_status_message, unimplemented_method,
    unimplemented_service, cancel_after_begin, cancel_after_first_response,
    timeout_on_sleeping_server,
)}

_LARGE = {"code": "OK", "body_len": 314159, "body_zero": True}

# What the description requires of each observation. Keys an observation has beyond these
# (e.g. the details of UNIMPLEMENTED, which each implementation words its own way) are not
# checked against the description, only compared across paths.
EXPECTED: dict[str, Observation] = {
    "empty_unary": {"code": "OK", "response_bytes": 0},
    "large_unary": _LARGE,
    "client_compressed_unary": {
        "probe": {"code": "INVALID_ARGUMENT"},
        "compressed": _LARGE,
        "uncompressed": _LARGE,
        "compressed_unchecked": _LARGE,
    },
    "server_compressed_unary": {
        "compressed": {**_LARGE, "compressed": True},
        "uncompressed": {**_LARGE, "compressed": False},
    },
    "client_streaming": {"code": "OK", "aggregated_payload_size": 74922},
    "server_streaming": {"code": "OK", "sizes": list(STREAM_RESPONSE_SIZES)},
    "ping_pong": {"code": "OK", "sizes": list(STREAM_RESPONSE_SIZES), "after_half_close": []},
    "empty_stream": {"code": "OK", "sizes": []},
    "custom_metadata": {
        "unary": {**_LARGE, "initial_echo": [ECHO_INITIAL[1]],
                  "trailing_echo": [ECHO_TRAILING[1].hex()]},
        "full_duplex": {"code": "OK", "sizes": [314159], "initial_echo": [ECHO_INITIAL[1]],
                        "trailing_echo": [ECHO_TRAILING[1].hex()]},
    },
    "status_code_and_message": {
        "unary": {"code": "UNKNOWN", "details": "test status message"},
        "full_duplex": {"code": "UNKNOWN", "details": "test status message"},
    },
    "special_status_message": {"unary": {"code": "UNKNOWN", "details": SPECIAL_MESSAGE}},
    "unimplemented_method": {"code": "UNIMPLEMENTED"},
    "unimplemented_service": {"code": "UNIMPLEMENTED"},
    "cancel_after_begin": {"code": "CANCELLED", "cancelled": True},
    "cancel_after_first_response": {"code": "CANCELLED", "first_size": 31415},
    "timeout_on_sleeping_server": {"code": "DEADLINE_EXCEEDED"},
}


def mismatches(expected: Any, observed: Any, where: str = "") -> list[str]:
    """Where `observed` differs from `expected` (dicts: only the expected keys count)."""
    if isinstance(expected, dict):
        if not isinstance(observed, dict):
            return [f"{where or '.'}: expected a record, got {observed!r}"]
        out = []
        for key, value in expected.items():
            if key not in observed:
                out.append(f"{where}.{key}: missing (expected {value!r})")
            else:
                out.extend(mismatches(value, observed[key], f"{where}.{key}"))
        return out
    if expected != observed:
        return [f"{where or '.'}: expected {expected!r}, observed {observed!r}"]
    return []


def check(case: str, observation: Observation) -> None:
    """Raise AssertionError naming every field where the case did not behave as described."""
    problems = mismatches(EXPECTED[case], observation)
    if problems:
        raise AssertionError(f"{case} failed: " + "; ".join(problems))


def run(case: str, target: str) -> Observation:
    """Run one case and check it; returns the observation."""
    observation = CASES[case](target)
    check(case, observation)
    return observation


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="gRPC interop client (the 16 core cases)")
    parser.add_argument("--target", required=True, help="HOST:PORT of a TestService")
    parser.add_argument("--case", action="append", required=True,
                        help=f"case to run (repeatable, or 'all'): {', '.join(CASES)}")
    args = parser.parse_args(argv)
    names = list(CASES) if "all" in args.case else args.case
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown case(s): {', '.join(unknown)}")
    failed = 0
    for name in names:
        try:
            observation = CASES[name](args.target)
            check(name, observation)
            print(f"PASS {name} {json.dumps(observation, ensure_ascii=False)}")
        except (AssertionError, grpc.RpcError) as err:
            failed += 1
            print(f"FAIL {name}: {err}")
    print(f"{len(names) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
