"""grpc.testing.TestService: the reference interop server, written from the public description.

The conformance suite runs the interop client against this server directly and through the
sidecar, so the server has to behave exactly like the reference one (SPECS.md section 1).

Compression. A grpcio server never shows the application whether a request message arrived
compressed: the core decompresses it and filters `grpc-encoding` out of the invocation metadata
(checked with grpcio 1.85). The one handle Python has is the channel argument
`grpc.per_message_decompression=0`: the core then hands the handler the message bytes as they
came off the wire, and the server decodes them itself (wire.decode_message), which tells whether
they were compressed. That is what makes `expect_compressed` checkable; wire.py says where it is
exact and where it is not.

Response compression: grpc.aio ignores `context.set_compression()` in a unary handler unless
initial metadata is sent explicitly afterwards, so the handler does that.

Beyond the reference behaviour (used by test_proxy_semantics.py; all keyed on `x-pymesh-*`
request metadata, so interop clients never trigger them):
- `x-pymesh-echo-*` request metadata is echoed into the initial and the trailing metadata;
- `x-pymesh-call-id: ID` makes the server record the call's remaining deadline and whether it was
  cancelled, readable through the bytes-only `pymesh.conformance.Observer/Lookup` method;
- `x-pymesh-rich-error: 1` on UnaryCall fails with INVALID_ARGUMENT and a google.rpc.BadRequest
  in `grpc-status-details-bin`.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import inspect
import json
import os
import signal
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status
from interop import empty_pb2, messages_pb2, test_pb2

from tests.conformance.wire import NO_DECOMPRESSION, decode_message

SERVICE = "grpc.testing.TestService"
OBSERVER_SERVICE = "pymesh.conformance.Observer"
ECHO_INITIAL = "x-grpc-test-echo-initial"
ECHO_TRAILING = "x-grpc-test-echo-trailing-bin"
ECHO_PREFIX = "x-pymesh-echo-"
CALL_ID = "x-pymesh-call-id"
RICH_ERROR = "x-pymesh-rich-error"
MAX_MESSAGE = 64 * 1024 * 1024

_CODES = {code.value[0]: code for code in grpc.StatusCode}


@dataclass(frozen=True)
class Received:
    """A request message plus what only the wire could tell: whether it came compressed."""

    message: Any
    compressed: bool


def _deserializer(message_type: type) -> Callable[[bytes], Received]:
    def parse(data: bytes) -> Received:
        raw, compressed = decode_message(data)
        return Received(message_type.FromString(raw), compressed)

    return parse


def _zeros(size: int) -> messages_pb2.Payload:
    return messages_pb2.Payload(type=messages_pb2.COMPRESSABLE, body=bytes(size))


class CallLog:
    """What the server saw of calls tagged with x-pymesh-call-id; bounded, oldest dropped."""

    def __init__(self, limit: int = 1000) -> None:
        self._calls: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._limit = limit

    def record(self, call_id: str, **fields: Any) -> None:
        entry = self._calls.setdefault(call_id, {})
        entry.update(fields)
        self._calls.move_to_end(call_id)
        while len(self._calls) > self._limit:
            self._calls.popitem(last=False)

    def lookup(self, call_id: str) -> dict[str, Any]:
        return dict(self._calls.get(call_id, {}))


class TestService:
    """Handlers for grpc.testing.TestService on grpc.aio, taking `Received` requests."""

    __test__ = False  # not a pytest test class

    # -- metadata helpers -------------------------------------------------------------------

    def _start(self, context: grpc.aio.ServicerContext) -> tuple[list, list, bool]:
        """Collect what this call asks the server to echo.

        Returns (initial metadata to send, trailing metadata to send, rich error requested).
        """
        initial: list[tuple[str, Any]] = []
        trailing: list[tuple[str, Any]] = []
        rich = False
        for key, value in context.invocation_metadata() or ():
            if key == ECHO_INITIAL:
                initial.append((key, value))
            elif key == ECHO_TRAILING:
                trailing.append((key, value))
            elif key.startswith(ECHO_PREFIX):
                initial.append((key, value))
                trailing.append((key, value))
            elif key == RICH_ERROR:
                rich = True
        if trailing:
            context.set_trailing_metadata(tuple(trailing))
        return initial, trailing, rich

    @staticmethod
    async def _send_initial(context: grpc.aio.ServicerContext, initial: list,
                            compress: bool | None = None) -> None:
        if compress is not None:
            context.set_compression(grpc.Compression.Gzip if compress
                                    else grpc.Compression.NoCompression)
        if initial or compress:
            await context.send_initial_metadata(tuple(initial))

    @staticmethod
    async def _fail_status(context: grpc.aio.ServicerContext, echo: messages_pb2.EchoStatus,
                           trailing: list) -> None:
        code = _CODES.get(echo.code, grpc.StatusCode.UNKNOWN)
        await context.abort(code, echo.message, tuple(trailing))

    @staticmethod
    async def _check_compressed(context: grpc.aio.ServicerContext, expect: bool,
                                got: bool, trailing: list) -> None:
        if expect and not got:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "expected a compressed request message, got an uncompressed one",
                                tuple(trailing))

    # -- methods ----------------------------------------------------------------------------

    async def EmptyCall(self, request: Received, context) -> empty_pb2.Empty:
        initial, _, _ = self._start(context)
        await self._send_initial(context, initial)
        return empty_pb2.Empty()

    async def UnaryCall(self, request: Received, context) -> messages_pb2.SimpleResponse:
        initial, trailing, rich = self._start(context)
        req: messages_pb2.SimpleRequest = request.message
        if rich:
            await self._rich_error(context, trailing)
        await self._check_compressed(context, req.expect_compressed.value, request.compressed,
                                     trailing)
        if req.HasField("response_status") and req.response_status.code != 0:
            await self._fail_status(context, req.response_status, trailing)
        await self._send_initial(context, initial, req.response_compressed.value
                                 if req.HasField("response_compressed") else None)
        return messages_pb2.SimpleResponse(payload=_zeros(req.response_size))

    async def _rich_error(self, context, trailing: list) -> None:
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field="payload.body",
                                                        description="rich error requested"),
        ]))
        status = status_pb2.Status(code=grpc.StatusCode.INVALID_ARGUMENT.value[0],
                                   message="rich error requested", details=[detail])
        rich = rpc_status.to_status(status)
        await context.abort(rich.code, rich.details, (*trailing, *rich.trailing_metadata))

    async def StreamingInputCall(self, request_iterator: AsyncIterator[Received],
                                 context) -> messages_pb2.StreamingInputCallResponse:
        initial, trailing, _ = self._start(context)
        total = 0
        async for request in request_iterator:
            req: messages_pb2.StreamingInputCallRequest = request.message
            await self._check_compressed(context, req.expect_compressed.value,
                                         request.compressed, trailing)
            total += len(req.payload.body)
        await self._send_initial(context, initial)
        return messages_pb2.StreamingInputCallResponse(aggregated_payload_size=total)

    async def _respond(self, req: messages_pb2.StreamingOutputCallRequest,
                       context) -> AsyncIterator[messages_pb2.StreamingOutputCallResponse]:
        for params in req.response_parameters:
            if params.interval_us > 0:
                await asyncio.sleep(params.interval_us / 1e6)
            if params.HasField("compressed") and not params.compressed.value:
                context.disable_next_message_compression()
            yield messages_pb2.StreamingOutputCallResponse(payload=_zeros(params.size))

    @staticmethod
    def _wants_compression(reqs: Iterable[messages_pb2.StreamingOutputCallRequest]) -> bool:
        return any(p.compressed.value for r in reqs for p in r.response_parameters)

    async def StreamingOutputCall(self, request: Received, context):
        initial, trailing, _ = self._start(context)
        req: messages_pb2.StreamingOutputCallRequest = request.message
        compress = self._wants_compression([req])
        await self._send_initial(context, initial, True if compress else None)
        async for response in self._respond(req, context):
            yield response
        if req.HasField("response_status") and req.response_status.code != 0:
            await self._fail_status(context, req.response_status, trailing)

    async def FullDuplexCall(self, request_iterator: AsyncIterator[Received], context):
        initial, trailing, _ = self._start(context)
        sent_initial = False
        async for request in request_iterator:
            req: messages_pb2.StreamingOutputCallRequest = request.message
            if req.HasField("response_status") and req.response_status.code != 0:
                await self._fail_status(context, req.response_status, trailing)
            if not sent_initial:
                # Compression is per call in grpcio: decided by the first request.
                await self._send_initial(context, initial,
                                         True if self._wants_compression([req]) else None)
                sent_initial = True
            async for response in self._respond(req, context):
                yield response
        if not sent_initial:
            await self._send_initial(context, initial)

    async def HalfDuplexCall(self, request_iterator: AsyncIterator[Received], context):
        initial, trailing, _ = self._start(context)
        buffered = [request.message async for request in request_iterator]
        await self._send_initial(context, initial,
                                 True if self._wants_compression(buffered) else None)
        for req in buffered:
            if req.HasField("response_status") and req.response_status.code != 0:
                await self._fail_status(context, req.response_status, trailing)
            async for response in self._respond(req, context):
                yield response


def _call_id(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == CALL_ID:
            return value
    return None


def _observed(handler: Callable, log: CallLog) -> Callable:
    """Wrap a handler to record, for tagged calls, the deadline seen and how the call ended.

    grpc.aio reports a client's cancellation only by cancelling the handler task
    (`context.cancelled()` stays False, checked with grpcio 1.85), so CancelledError is the
    signal.
    """
    def begin(context: grpc.aio.ServicerContext) -> str | None:
        call_id = _call_id(context)
        if call_id is not None:
            remaining = context.time_remaining()
            log.record(call_id, started=True, time_remaining=remaining,
                       deadline_unix=None if remaining is None else time.time() + remaining,
                       cancelled=False, done=False)
        return call_id

    def end(call_id: str | None, cancelled: bool) -> None:
        if call_id is not None:
            log.record(call_id, done=True, cancelled=cancelled)

    if inspect.isasyncgenfunction(handler):
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator:
            call_id, cancelled = begin(context), False
            try:
                async for response in handler(request, context):
                    yield response
            except asyncio.CancelledError:
                cancelled = True
                raise
            finally:
                end(call_id, cancelled)
        return stream

    async def single(request: Any, context: grpc.aio.ServicerContext) -> Any:
        call_id, cancelled = begin(context), False
        try:
            return await handler(request, context)
        except asyncio.CancelledError:
            cancelled = True
            raise
        finally:
            end(call_id, cancelled)
    return single


def _observer_handler(log: CallLog) -> grpc.GenericRpcHandler:
    async def lookup(request: bytes, context) -> bytes:
        return json.dumps(log.lookup(request.decode())).encode()

    return grpc.method_handlers_generic_handler(OBSERVER_SERVICE, {
        "Lookup": grpc.unary_unary_rpc_method_handler(lookup),
    })


def _test_service_handler(service: TestService, log: CallLog) -> grpc.GenericRpcHandler:
    """Hand-built so requests go through wire.decode_message; UnimplementedCall is left out."""
    watch = functools.partial(_observed, log=log)

    def unary(fn, req_type, resp_type=None):
        return grpc.unary_unary_rpc_method_handler(
            watch(fn), request_deserializer=_deserializer(req_type),
            response_serializer=(resp_type or messages_pb2.SimpleResponse).SerializeToString)

    out_ser = messages_pb2.StreamingOutputCallResponse.SerializeToString
    out_req = _deserializer(messages_pb2.StreamingOutputCallRequest)
    return grpc.method_handlers_generic_handler(SERVICE, {
        "EmptyCall": unary(service.EmptyCall, empty_pb2.Empty, empty_pb2.Empty),
        "UnaryCall": unary(service.UnaryCall, messages_pb2.SimpleRequest),
        "CacheableUnaryCall": unary(service.UnaryCall, messages_pb2.SimpleRequest),
        "StreamingInputCall": grpc.stream_unary_rpc_method_handler(
            watch(service.StreamingInputCall),
            request_deserializer=_deserializer(messages_pb2.StreamingInputCallRequest),
            response_serializer=messages_pb2.StreamingInputCallResponse.SerializeToString),
        "StreamingOutputCall": grpc.unary_stream_rpc_method_handler(
            watch(service.StreamingOutputCall), request_deserializer=out_req,
            response_serializer=out_ser),
        "FullDuplexCall": grpc.stream_stream_rpc_method_handler(
            watch(service.FullDuplexCall), request_deserializer=out_req,
            response_serializer=out_ser),
        "HalfDuplexCall": grpc.stream_stream_rpc_method_handler(
            watch(service.HalfDuplexCall), request_deserializer=out_req,
            response_serializer=out_ser),
    })


async def build_server(address: str = "127.0.0.1:0") -> tuple[grpc.aio.Server, str]:
    """A started server; returns it with its bound host:port."""
    server = grpc.aio.server(options=[
        ("grpc.so_reuseport", 0),
        NO_DECOMPRESSION,
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.max_send_message_length", MAX_MESSAGE),
    ])
    log = CallLog()
    server.add_generic_rpc_handlers((_test_service_handler(TestService(), log),
                                     _observer_handler(log)))
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    await health.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection((
        test_pb2.DESCRIPTOR.services_by_name["TestService"].full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    ), server)
    host = address.rsplit(":", 1)[0]
    port = server.add_insecure_port(address)
    await server.start()
    return server, f"{host}:{port}"


def _write_ready(path: str, address: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"server": address}, f)
    os.replace(tmp, path)


async def _serve(address: str, ready_file: str | None) -> None:
    server, bound = await build_server(address)
    if ready_file:
        _write_ready(ready_file, bound)
    print(f"TestService listening on {bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="gRPC interop TestService (reference server)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=0, help="port (0 = pick a free one)")
    parser.add_argument("--ready-file", help="write {\"server\": HOST:PORT} here once bound")
    args = parser.parse_args(argv)
    asyncio.run(_serve(f"{args.host}:{args.port}", args.ready_file))


if __name__ == "__main__":
    main()
