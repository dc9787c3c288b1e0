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
import random
from collections.abc import Callable
from typing import Any

import grpc
from grpc.aio import EOF, AioRpcError

from sidecar.cluster_runtime import ClusterRuntime
from sidecar.dataplane import DataPlane, Refusal, Target
from sidecar.identity import parse_spiffe_id
from sidecar.metadata import forwardable, inbound_forwardable
from sidecar.method_shapes import MethodShapes
from sidecar.model import Direction, Route
from sidecar.stages.fault import FaultInjector
from sidecar.stages.outlier import is_failure
from sidecar.stages.retry import RetryState, with_previous_attempts
from sidecar.telemetry.calls import CallRecord, Telemetry
from sidecar.tls import peer_identity
from sidecar.upstream.pool import UpstreamChannel
from sidecar.upstream.request_writer import ReplayingWriter, write_all

# grpc-core wording for failures of the hop itself (not statuses sent by an upstream app).
_CONNECT_FAILURES = ("failed to connect to all addresses", "Connection refused",
                     "connections to all backends failing", "Socket closed",
                     "Connection reset", "Broken pipe", "Cancelling all calls")
_HANDLER_CACHE_LIMIT = 4096
_READY = grpc.ChannelConnectivity.READY


class ProxyHandler(grpc.GenericRpcHandler):
    """The catch-all generic handler of one listener."""

    def __init__(self, direction: Direction, sidecar_name: str,
                 plane: Callable[[], DataPlane], shapes: MethodShapes,
                 max_message_bytes: int, telemetry: Telemetry,
                 local_address: str | None = None, rng: random.Random | None = None, *,
                 mtls: bool = False, has_identity: bool = False) -> None:
        """mtls: this listener's connections are mutual TLS (the peer's certificate is
        verified); has_identity: the sidecar has a workload certificate (for messages)."""
        self._direction = direction
        self._inbound = direction is Direction.INBOUND
        self._mtls = mtls
        self._callers: dict[str, str | None] = {}  # SPIFFE ID -> mesh service
        self._assumed_refusal = (
            f"mesh sidecar {sidecar_name!r} (inbound): plaintext refused: the control plane has "
            "not told this sidecar the mesh's mTLS mode yet, and a sidecar with a workload "
            "identity fails closed until it does")
        if has_identity:
            self._plaintext_refusal = (
                f"mesh sidecar {sidecar_name!r} (inbound): plaintext refused, the mesh's mTLS "
                "mode is STRICT; call through a mesh sidecar (mTLS port)")
        else:
            self._plaintext_refusal = (
                f"mesh sidecar {sidecar_name!r} (inbound): the mesh's mTLS mode is STRICT and "
                "this sidecar has no workload identity (start it with --token or --token-file)")
        self._telemetry = telemetry
        self.local_address = local_address
        self._random = rng or random.Random()
        self._faults: dict[int, tuple[Route, FaultInjector]] = {}  # by id(route)
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
        record = self._begin(method, context)
        await self._observed(self._forward_stream(method, service, context,
                                                  asyncio.current_task(), record),
                             method, context, record)

    async def _unary_call(self, method: str, request: bytes,
                          context: grpc.aio.ServicerContext) -> bytes | None:
        record = self._begin(method, context)
        result: bytes | None = await self._observed(
            self._forward_unary(method, request, context, record), method, context, record)
        return result

    def _begin(self, method: str, context: grpc.aio.ServicerContext) -> CallRecord:
        return self._telemetry.begin(self._direction, method, context.invocation_metadata(),
                                     context, self.local_address)

    async def _observed(self, forward: Any, method: str, context: grpc.aio.ServicerContext,
                        record: CallRecord) -> Any:
        """Run one call's forwarding: counted in flight (for the drain), cut off with a clear
        status if the drain times out, and recorded (span, metrics, access log) at the end."""
        task = asyncio.current_task()
        self._active.add(task)
        code: grpc.StatusCode = grpc.StatusCode.OK
        try:
            return await forward
        except asyncio.CancelledError:
            if self._cut_off_message is None:
                code = grpc.StatusCode.CANCELLED
                raise  # the caller cancelled
            code = grpc.StatusCode.UNAVAILABLE
            await context.abort(grpc.StatusCode.UNAVAILABLE, self._cut_off_message)
            return None
        except Exception:
            code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        finally:
            self._active.discard(task)
            if not self._active:
                self._idle.set()
            final = context.code() or code
            caller = ((self._caller(context) or context.peer())
                      if self._telemetry.access_log.enabled else None)
            self._telemetry.end(record, self._direction, method, final, context.details(),
                                caller)

    # --- forwarding ---------------------------------------------------------------------
    def _hop(self, message: str) -> str:
        return f"mesh sidecar {self._name!r} ({self._direction.value}): {message}"

    async def _admit(self, plane: DataPlane, method: str, context: grpc.aio.ServicerContext,
                     record: CallRecord) -> str | None:
        """The inbound stages before routing: the transport the mesh's mTLS mode allows, then
        authorization by the identity the caller's certificate proves (never a header), then the
        local rate limit. Returns the caller's SPIFFE ID (None: no client certificate)."""
        snapshot = plane.snapshot
        caller = None
        if self._mtls:
            caller = peer_identity(context)
        elif not snapshot.inbound_tls.plaintext_allowed:
            record.metrics.denied()
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                self._assumed_refusal if snapshot.inbound_tls.assumed
                                else self._plaintext_refusal)
        authorizer = snapshot.authorizer
        if authorizer.deny or authorizer.allow is not None:
            decision = authorizer.check(caller, method)
            if not decision.allowed:
                record.metrics.denied()
                await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                    self._hop(decision.message))
        limiter = plane.rate_limiter
        if limiter is not None:
            refusal = limiter.check(method, self._service_of(caller))
            if refusal is not None:
                record.metrics.rate_limited()
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, self._hop(refusal))
        return caller

    def _service_of(self, caller: str | None) -> str | None:
        """The mesh service named by a caller's SPIFFE ID (rate limits per caller)."""
        if caller is None:
            return None
        service = self._callers.get(caller, "")
        if service == "":
            parsed = parse_spiffe_id(caller)
            service = parsed[1] if parsed is not None else None
            if len(self._callers) < _HANDLER_CACHE_LIMIT:
                self._callers[caller] = service
        return service

    def _caller(self, context: grpc.aio.ServicerContext) -> str | None:
        """The calling mesh service, as proven by its certificate (None without mTLS)."""
        return self._service_of(peer_identity(context)) if self._mtls else None

    async def _enter(self, target: Target, context: grpc.aio.ServicerContext) -> None:
        """The stages before any upstream attempt: fault injection, then the breaker."""
        route = target.route
        if route.fault is not None:
            entry = self._faults.get(id(route))
            if entry is None or entry[0] is not route:
                if len(self._faults) > 1024:  # routes of old snapshots
                    self._faults.clear()
                entry = self._faults[id(route)] = (route, FaultInjector(route.fault,
                                                                        self._random))
            injector = entry[1]
            decision = injector.decide()
            if decision.delay:
                await asyncio.sleep(decision.delay)
            if decision.abort is not None:
                await context.abort(decision.abort, self._hop(injector.abort_message(route.name)))
        if not target.cluster.breaker.try_acquire():
            self._telemetry.metrics.breaker_trip(target.cluster.config.name)
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                self._hop(target.cluster.breaker.request_message()))

    async def _pending(self, cluster: ClusterRuntime, upstream: UpstreamChannel,
                       context: grpc.aio.ServicerContext) -> bool:
        """A call that must wait for a connection counts against the cluster's
        max_pending_requests (refused at once beyond it); True if it is pending."""
        if upstream.channel.get_state() is _READY:
            return False
        if not cluster.breaker.try_enter_pending():
            self._telemetry.metrics.breaker_trip(cluster.config.name, "max_pending_requests")
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                self._hop(cluster.breaker.pending_message()))
        return True

    @staticmethod
    async def _connected(cluster: ClusterRuntime, call: Any) -> None:
        """A pending call stops being pending once its connection is up (or it failed)."""
        try:
            await call.wait_for_connection()
        except AioRpcError:
            pass
        finally:
            cluster.breaker.leave_pending()

    @staticmethod
    async def _retry_to(state: RetryState, cluster: ClusterRuntime, record: CallRecord,
                        upstream: UpstreamChannel, code: grpc.StatusCode, trailing: Any,
                        committed: bool, deadline: float | None,
                        hash_key: str | None) -> UpstreamChannel | None:
        """After a failed attempt: the endpoint for the next one (another, when there is
        one), having waited its backoff; None when the failure goes back to the caller."""
        decision = state.on_failure(code, trailing, committed=committed,
                                    now=asyncio.get_running_loop().time(), deadline=deadline,
                                    budget=cluster.budget)
        if not decision.retry:
            return None
        nxt = cluster.pick(hash_key, upstream)
        if nxt is None:
            return None
        record.retried(code, upstream.address)
        if decision.delay:
            await asyncio.sleep(decision.delay)
        return nxt

    def _deadline_message(self, code: grpc.StatusCode, details: str | None, by_mesh: bool,
                          route: Route, upstream: str, attempts: int) -> str | None:
        if code is grpc.StatusCode.DEADLINE_EXCEEDED and by_mesh:
            return self._hop(f"route {route.name!r} timeout exceeded waiting for upstream "
                             f"{upstream} (attempt {attempts})")
        return details

    async def _forward_stream(self, method: str, service: str,
                              context: grpc.aio.ServicerContext, owner: Any,
                              record: CallRecord) -> None:
        metadata = context.invocation_metadata()
        plane = self._plane()
        caller = await self._admit(plane, method, context, record) if self._inbound else None
        target = plane.resolve(self._direction, method, metadata)
        if isinstance(target, Refusal):
            await context.abort(target.code, target.message)  # raises
            return
        await self._enter(target, context)
        cluster = target.cluster
        try:
            route = target.route
            hash_key = _header(metadata, route.hash_header) if route.hash_header else None
            upstream = cluster.pick(hash_key, None)
            if upstream is None:
                refusal = plane.no_endpoint(self._direction, cluster.config.name)
                await context.abort(refusal.code, refusal.message)
                return
            if self._shapes.should_ask(service):
                self._shapes.learn_from(service, upstream.channel)
            timeout, by_mesh = _timeout(context, route.timeout)
            fwd = record.headers(inbound_forwardable(metadata, caller) if self._inbound
                                 else forwardable(metadata))
            record.attempt(upstream.address, cluster.config.name)
            if route.retry is None:
                await self._stream_once(method, context, owner, cluster, upstream, fwd, timeout,
                                        by_mesh, route)
            else:
                await self._stream_with_retries(method, context, owner, cluster, upstream, fwd,
                                                timeout, by_mesh, route, hash_key, record)
        finally:
            cluster.breaker.release()

    async def _stream_once(self, method: str, context: grpc.aio.ServicerContext, owner: Any,
                           cluster: ClusterRuntime, upstream: UpstreamChannel, fwd: Any,
                           timeout: float | None, by_mesh: bool, route: Route) -> None:
        pending = await self._pending(cluster, upstream, context)
        call = upstream.stream(method)(timeout=timeout, metadata=fwd)
        pump = asyncio.get_running_loop().create_task(
            write_all(call, context.read, self._max_bytes, self._too_large, owner))
        try:
            if pending:
                await self._connected(cluster, call)
            outcome = await self._relay_responses(call, context, pump)
            if outcome is not None:
                code, details, headers_sent = outcome
                self._finish(context, code, details, headers_sent, upstream, cluster, route,
                             by_mesh, 1, await call.trailing_metadata())
        finally:
            if not call.done():
                call.cancel()
            if not pump.done():
                pump.cancel()
            if cluster.finished is not None:
                cluster.finished(upstream)

    async def _stream_with_retries(self, method: str, context: grpc.aio.ServicerContext,
                                   owner: Any, cluster: ClusterRuntime,
                                   upstream: UpstreamChannel, fwd: Any, timeout: float | None,
                                   by_mesh: bool, route: Route, hash_key: str | None,
                                   record: CallRecord) -> None:
        assert route.retry is not None
        state = RetryState(route.retry, self._random)
        budget = cluster.budget
        if budget is not None:
            budget.record_request()
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        writer = ReplayingWriter(route.retry.max_buffer_bytes)
        pump: asyncio.Task[str | None] | None = None
        call = None
        try:
            while True:
                now = loop.time()
                attempt_deadline = state.attempt_deadline(now, deadline)
                attempt_timeout = None if attempt_deadline is None else attempt_deadline - now
                pending = await self._pending(cluster, upstream, context)
                call = upstream.stream(method)(
                    timeout=attempt_timeout,
                    metadata=with_previous_attempts(fwd, state.previous_attempts))
                if pending:
                    await self._connected(cluster, call)
                await writer.attach(call)
                if pump is None:
                    pump = loop.create_task(
                        writer.pump(context.read, self._max_bytes, self._too_large, owner))
                outcome = await self._relay_responses(call, context, pump, writer)
                if cluster.finished is not None:
                    cluster.finished(upstream)
                if outcome is None:
                    return
                code, details, headers_sent = outcome
                trailing = await call.trailing_metadata()
                cluster.record(upstream, not is_failure(code))
                if code is not grpc.StatusCode.OK:
                    nxt = await self._retry_to(state, cluster, record, upstream, code, trailing,
                                               writer.committed, deadline, hash_key)
                    if nxt is not None:
                        upstream = nxt
                        record.attempt(upstream.address, cluster.config.name)
                        continue
                self._finish(context, code, details, headers_sent, upstream, cluster, route,
                             by_mesh or attempt_deadline != deadline, state.attempts, trailing)
                return
        finally:
            if call is not None and not call.done():
                call.cancel()
            if pump is not None and not pump.done():
                pump.cancel()

    async def _relay_responses(self, call: Any, context: grpc.aio.ServicerContext,
                               pump: asyncio.Task[str | None],
                               writer: ReplayingWriter | None = None
                               ) -> tuple[grpc.StatusCode, str | None, bool] | None:
        """Copy response headers and messages to the caller until the upstream ends.

        Returns (code, details, headers_sent), or None when the call was already finished here
        (a refused message)."""
        headers_sent = False
        refusal: str | None = None
        try:
            initial = await call.initial_metadata()
            if initial:
                if writer is not None:
                    writer.commit()
                await context.send_initial_metadata(forwardable(initial))
                headers_sent = True
            while True:
                message = await call.read()
                if message is EOF:
                    break
                if len(message) > self._max_bytes:
                    refusal = self._too_large("response", len(message))
                    break
                if writer is not None and not writer.committed:
                    writer.commit()
                headers_sent = True
                await context.write(message)
        except AioRpcError:
            pass  # the status says what happened
        except asyncio.CancelledError:
            if not (pump.done() and pump.result()):
                raise  # the caller went away (not the pump cancelling the upstream)
        refusal = refusal or (pump.result() if pump.done() else None)
        if refusal is not None:
            context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
            context.set_details(refusal)
            return None
        return await call.code(), await call.details(), headers_sent

    def _finish(self, context: grpc.aio.ServicerContext, code: grpc.StatusCode,
                details: str | None, headers_sent: bool, upstream: UpstreamChannel,
                cluster: ClusterRuntime, route: Route, by_mesh: bool, attempts: int,
                trailing: Any) -> None:
        if trailing:
            context.set_trailing_metadata(forwardable(trailing))
        if code is not grpc.StatusCode.OK:
            context.set_code(code)
            details = self._status_message(code, details, headers_sent, upstream.address,
                                           cluster.config.name)
            details = self._deadline_message(code, details, by_mesh, route, upstream.address,
                                             attempts)
            if details:
                context.set_details(details)

    async def _forward_unary(self, method: str, request: bytes,
                             context: grpc.aio.ServicerContext,
                             record: CallRecord) -> bytes | None:
        metadata = context.invocation_metadata()
        plane = self._plane()
        caller = await self._admit(plane, method, context, record) if self._inbound else None
        if len(request) > self._max_bytes:  # after admission: a stranger learns nothing
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                self._too_large("request", len(request)))
        target = plane.resolve(self._direction, method, metadata)
        if isinstance(target, Refusal):
            await context.abort(target.code, target.message)  # raises
            return None
        await self._enter(target, context)
        cluster = target.cluster
        route = target.route
        try:
            hash_key = _header(metadata, route.hash_header) if route.hash_header else None
            timeout, by_mesh = _timeout(context, route.timeout)
            fwd = record.headers(inbound_forwardable(metadata, caller) if self._inbound
                                 else forwardable(metadata))
            retry = route.retry
            state = RetryState(retry, self._random) if retry is not None else None
            budget = cluster.budget
            if state is not None and budget is not None:
                budget.record_request()
            loop = asyncio.get_running_loop()
            deadline = None if timeout is None else loop.time() + timeout
            upstream = cluster.pick(hash_key, None)
            while True:
                if upstream is None:
                    refusal = plane.no_endpoint(self._direction, cluster.config.name)
                    await context.abort(refusal.code, refusal.message)
                    return None
                attempt_timeout = timeout
                md: Any = fwd
                if state is not None:
                    now = loop.time()
                    attempt_deadline = state.attempt_deadline(now, deadline)
                    attempt_timeout = None if attempt_deadline is None else attempt_deadline - now
                    by_mesh = by_mesh or attempt_deadline != deadline
                    md = with_previous_attempts(fwd, state.previous_attempts)
                record.attempt(upstream.address, cluster.config.name)
                pending = await self._pending(cluster, upstream, context)
                call = upstream.unary(method)(request, timeout=attempt_timeout, metadata=md)
                try:
                    if pending:
                        await self._connected(cluster, call)
                    response = await call
                except AioRpcError as err:
                    code = err.code()
                    cluster.record(upstream, not is_failure(code))
                    initial = err.initial_metadata()
                    trailing = err.trailing_metadata()
                    if state is not None:
                        nxt = await self._retry_to(state, cluster, record, upstream, code,
                                                   trailing, bool(initial), deadline, hash_key)
                        if nxt is not None:
                            if cluster.finished is not None:
                                cluster.finished(upstream)
                            upstream = nxt
                            continue
                    if initial:
                        await context.send_initial_metadata(forwardable(initial))
                    details = self._status_message(code, err.details(), bool(initial),
                                                   upstream.address, cluster.config.name)
                    details = self._deadline_message(
                        code, details, by_mesh, route, upstream.address,
                        state.attempts if state is not None else 1)
                    await context.abort(code, details or "", forwardable(trailing))
                    return None
                finally:
                    if not call.done():
                        call.cancel()
                cluster.record(upstream, True)
                break
        finally:
            cluster.breaker.release()
            if upstream is not None and cluster.finished is not None:
                cluster.finished(upstream)
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


def _header(metadata: Any, name: str) -> str | None:
    values = [v for k, v in metadata or () if k == name and isinstance(v, str)]
    return ",".join(values) if values else None


def _timeout(context: grpc.aio.ServicerContext, route_timeout: float | None
             ) -> tuple[float | None, bool]:
    """The upstream call's timeout, and whether it is the mesh's (route) rather than the
    caller's own deadline."""
    remaining = context.time_remaining()
    if route_timeout is not None and (remaining is None or route_timeout < remaining):
        return route_timeout, True
    return remaining, False
