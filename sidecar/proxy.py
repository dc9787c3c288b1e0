"""The pass-through handler: forwards any gRPC call as raw bytes without changing what the
caller sees.

Two call shapes:
- stream-stream, correct for all four kinds of method; used unless a method is known to be
  unary. Request messages are pumped by a task (`call.write` / `done_writing`, never by handing
  the request iterator to the upstream call: an early upstream error then surfaces as its real
  status, not INTERNAL). Response headers are forwarded when the upstream sends them and never
  earlier, so a caller's retry logic sees the call uncommitted until the upstream commits it;
  an upstream trailers-only error goes back as trailers-only.
- unary-unary, the fast path for methods known to be unary (fewer grpc-core operations).

Both forward metadata minus reserved and hop-by-hop names (metadata.py), send the remaining
deadline upstream, and pass status code, message and trailers unchanged.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any

import grpc
from grpc.aio import EOF, AioRpcError

from sidecar.dataplane import DataPlane, Refusal
from sidecar.metadata import forwardable
from sidecar.method_shapes import MethodShapes
from sidecar.model import Direction
from sidecar.upstream.request_writer import write_all

# grpc-core wording for failures of the hop itself (not statuses sent by an upstream app).
_CONNECT_FAILURES = ("failed to connect to all addresses", "Connection refused",
                     "connections to all backends failing", "Socket closed",
                     "Connection reset", "Broken pipe", "Cancelling all calls")
_HANDLER_CACHE_LIMIT = 4096


class ProxyHandler(grpc.GenericRpcHandler):
    """The catch-all generic handler of one listener."""

    def __init__(self, direction: Direction, sidecar_name: str,
                 plane: Callable[[], DataPlane], shapes: MethodShapes,
                 max_message_bytes: int) -> None:
        self._direction = direction
        self._max_bytes = max_message_bytes
        self._name = sidecar_name
        self._plane = plane
        self._shapes = shapes
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}
        self._unary: frozenset[str] = frozenset()
        self._active: set[Any] = set()  # handler tasks of calls in flight
        self._idle = asyncio.Event()
        self._cut_off_message: str | None = None
        self._refusing: grpc.RpcMethodHandler | None = None

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        if self._refusing is not None:
            return self._refusing
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        unary = self._shapes.unary
        if unary is not self._unary:  # newly learned unary methods: rebuild handlers
            self._handlers.clear()
            self._unary = unary
        handler = self._handlers.get(method)
        if handler is None:
            if method in unary:
                handler = grpc.unary_unary_rpc_method_handler(
                    functools.partial(self._unary_call, method))
            else:
                service = method[1:].split("/", 1)[0]
                handler = grpc.stream_stream_rpc_method_handler(
                    functools.partial(self._stream_call, method, service))
            if len(self._handlers) < _HANDLER_CACHE_LIMIT:
                self._handlers[method] = handler
        return handler

    def _describe(self, upstream: str, cluster: str, details: str | None) -> str:
        return (f"mesh sidecar {self._name!r} ({self._direction.value}): upstream {upstream} "
                f"(cluster {cluster!r}) failed: {details}")

    def _status_message(self, code: grpc.StatusCode, details: str | None, headers_seen: bool,
                        upstream: str, cluster: str) -> str | None:
        """Upstream statuses pass unchanged; failures of the hop itself say where they came from."""
        if (code is grpc.StatusCode.UNAVAILABLE and not headers_seen and details
                and any(s in details for s in _CONNECT_FAILURES)):
            return self._describe(upstream, cluster, details)
        return details

    def _too_large(self, what: str, size: int) -> str:
        return (f"mesh sidecar {self._name!r} ({self._direction.value}): {what} message of "
                f"{size} bytes exceeds max_message_bytes {self._max_bytes}")

    # --- calls in flight, for an orderly drain -------------------------------------------
    @property
    def active_calls(self) -> int:
        return len(self._active)

    async def wait_idle(self) -> None:
        while self._active:
            self._idle.clear()
            await self._idle.wait()

    def refuse_new_calls(self, message: str) -> None:
        """From now on new calls get UNAVAILABLE (retryable elsewhere) with `message`."""
        async def refuse(_requests: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, message)
        self._refusing = grpc.stream_stream_rpc_method_handler(refuse)

    def cut_off(self, message: str) -> None:
        """End every call in flight with UNAVAILABLE and `message` (the drain timed out)."""
        self._cut_off_message = message
        for task in list(self._active):
            task.cancel()

    async def _stream_call(self, method: str, service: str, _requests: Any,
                           context: grpc.aio.ServicerContext) -> None:
        task = asyncio.current_task()
        self._active.add(task)
        try:
            await self._forward_stream(method, service, context, task)
        except asyncio.CancelledError:
            if self._cut_off_message is None:
                raise  # the caller cancelled
            await context.abort(grpc.StatusCode.UNAVAILABLE, self._cut_off_message)
        finally:
            self._active.discard(task)
            if not self._active:
                self._idle.set()

    async def _unary_call(self, method: str, request: bytes,
                          context: grpc.aio.ServicerContext) -> bytes | None:
        task = asyncio.current_task()
        self._active.add(task)
        try:
            return await self._forward_unary(method, request, context)
        except asyncio.CancelledError:
            if self._cut_off_message is None:
                raise
            await context.abort(grpc.StatusCode.UNAVAILABLE, self._cut_off_message)
            return None
        finally:
            self._active.discard(task)
            if not self._active:
                self._idle.set()

    # --- forwarding -----------------------------------------------------------------------
    async def _forward_stream(self, method: str, service: str,
                              context: grpc.aio.ServicerContext, owner: Any) -> None:
        metadata = context.invocation_metadata()
        target = self._plane().resolve(self._direction, method, metadata)
        if isinstance(target, Refusal):
            await context.abort(target.code, target.message)  # raises
            return
        if self._shapes.should_ask(service):
            self._shapes.learn_from(service, target.upstream.channel)
        call = target.upstream.stream(method)(
            timeout=_timeout(context, target.route.timeout), metadata=forwardable(metadata))
        pump = asyncio.get_running_loop().create_task(
            write_all(call, context.read, self._max_bytes, self._too_large, owner))
        headers_sent = False
        refusal: str | None = None
        try:
            try:
                initial = await call.initial_metadata()
                if initial:
                    await context.send_initial_metadata(forwardable(initial))
                    headers_sent = True
                while True:
                    message = await call.read()
                    if message is EOF:
                        break
                    if len(message) > self._max_bytes:
                        refusal = self._too_large("response", len(message))
                        break
                    headers_sent = True
                    await context.write(message)
            except AioRpcError:
                pass  # the status below says what happened
            except asyncio.CancelledError:
                if not (pump.done() and pump.result()):
                    raise  # the caller went away (not the pump cancelling the upstream)
            refusal = refusal or (pump.result() if pump.done() else None)
            if refusal is not None:
                context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
                context.set_details(refusal)
                return
            code = await call.code()
            trailing = await call.trailing_metadata()
            if trailing:
                context.set_trailing_metadata(forwardable(trailing))
            if code is not grpc.StatusCode.OK:
                context.set_code(code)
                details = self._status_message(code, await call.details(), headers_sent,
                                               target.upstream.address, target.cluster)
                if details:
                    context.set_details(details)
        finally:
            if not call.done():
                call.cancel()
            if not pump.done():
                pump.cancel()

    async def _forward_unary(self, method: str, request: bytes,
                             context: grpc.aio.ServicerContext) -> bytes | None:
        if len(request) > self._max_bytes:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                self._too_large("request", len(request)))
        metadata = context.invocation_metadata()
        target = self._plane().resolve(self._direction, method, metadata)
        if isinstance(target, Refusal):
            await context.abort(target.code, target.message)  # raises
            return None
        call = target.upstream.unary(method)(
            request, timeout=_timeout(context, target.route.timeout),
            metadata=forwardable(metadata))
        try:
            response = await call
        except AioRpcError as err:
            initial = err.initial_metadata()
            if initial:
                await context.send_initial_metadata(forwardable(initial))
            code = err.code()
            details = self._status_message(code, err.details(), bool(initial),
                                           target.upstream.address, target.cluster)
            await context.abort(code, details or "", forwardable(err.trailing_metadata()))
        finally:
            if not call.done():
                call.cancel()
        if len(response) > self._max_bytes:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                self._too_large("response", len(response)))
        initial = await call.initial_metadata()
        if initial:
            await context.send_initial_metadata(forwardable(initial))
        trailing = await call.trailing_metadata()
        if trailing:
            context.set_trailing_metadata(forwardable(trailing))
        return response


def _timeout(context: grpc.aio.ServicerContext, route_timeout: float | None) -> float | None:
    remaining = context.time_remaining()
    if route_timeout is not None and (remaining is None or route_timeout < remaining):
        return route_timeout
    return remaining
