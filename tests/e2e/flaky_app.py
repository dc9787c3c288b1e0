"""A misbehaving test app for the traffic-management end-to-end tests (issue 4, "Show").

A real gRPC server (sync grpcio, threads, 127.0.0.1:0) that a test can tell, at any moment, to
fail a share of its calls, to be slow, to push back on retries, or how to end its streams; it
records every call it sees (which method, which attempt, whether it failed), so a test can
check what the mesh did on the way: which instance a retry went to, how many attempts a call
took, how many calls were in flight at once.

Methods (any gRPC service; the tests use shop.Orders):
- .../Slow: unary, answers with the app's name after `slow_delay` seconds;
- .../Chat: bidirectional stream, see `stream_mode`;
- any other method: unary, answers with the app's name, or fails with `fail_code` for a
  `fail_share` of its calls (seeded randomness), adding `grpc-retry-pushback-ms: pushback`
  to the failure's trailers when set.
Server reflection is not served, so a sidecar in front keeps these methods on its stream path.
"""

from __future__ import annotations

import functools
import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass

import grpc

PREVIOUS_ATTEMPTS = "grpc-previous-rpc-attempts"
PUSHBACK = "grpc-retry-pushback-ms"

ECHO = "echo"  # answer each request message with "<name>:<message>", end OK when the caller does
FAIL_AFTER_FIRST = "fail_after_first"  # answer the first message, then fail with fail_code
FAIL_BEFORE_FIRST = "fail_before_first"  # read the first message, fail before any answer
STREAM_MODES = (ECHO, FAIL_AFTER_FIRST, FAIL_BEFORE_FIRST)


@dataclass(frozen=True)
class Call:
    """One call (one attempt, as the mesh sees it) that reached the app."""

    at: float  # time.monotonic() when it arrived
    method: str
    previous_attempts: int  # grpc-previous-rpc-attempts sent with it (0: a first attempt)
    failed: bool  # the app failed it on purpose
    user: str | None = None  # x-user-id, if any
    request_id: str | None = None  # x-request-id, if any: the same for every attempt of a call

    @property
    def retried(self) -> bool:
        return self.previous_attempts > 0


class FlakyApp:
    def __init__(self, name: str, seed: int = 0, workers: int = 32) -> None:
        self.name = name
        self.fail_share = 0.0
        self.fail_code = grpc.StatusCode.UNAVAILABLE
        self.pushback: str | None = None
        self.slow_delay = 1.0
        self.stream_mode = ECHO
        self.in_flight = 0
        self.calls: list[Call] = []
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers),
                                   options=[("grpc.so_reuseport", 0)])
        self._server.add_generic_rpc_handlers((self,))
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{self.port}"
        self._server.start()

    # --- what the test controls --------------------------------------------------------------
    def behave(self, *, fail_share: float = 0.0,
               fail_code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE,
               pushback: str | None = None, slow_delay: float = 1.0,
               stream_mode: str = ECHO) -> int:
        """Set every behaviour at once (unnamed ones back to healthy defaults). Returns the
        mark from which on every recorded call had the new behaviour."""
        if not 0.0 <= fail_share <= 1.0 or stream_mode not in STREAM_MODES:
            raise ValueError(f"bad behaviour: fail_share={fail_share}, stream={stream_mode}")
        with self._lock:
            self.fail_share = fail_share
            self.fail_code = fail_code
            self.pushback = pushback
            self.slow_delay = slow_delay
            self.stream_mode = stream_mode
            return len(self.calls)

    def mark(self) -> int:
        with self._lock:
            return len(self.calls)

    def since(self, mark: int, method: str | None = None) -> list[Call]:
        """Calls recorded after `mark`, optionally only those whose method ends with `method`."""
        with self._lock:
            calls = self.calls[mark:]
        return [c for c in calls if method is None or c.method.endswith(method)]

    def stop(self) -> None:
        self._stopping.set()
        self._server.stop(0)

    # --- serving -----------------------------------------------------------------------------
    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method: str = details.method  # type: ignore[attr-defined]
        if method.startswith("/grpc."):  # reflection, health: not served
            return None
        if method.endswith("/Chat"):
            return grpc.stream_stream_rpc_method_handler(functools.partial(self._chat, method))
        if method.endswith("/Slow"):
            return grpc.unary_unary_rpc_method_handler(functools.partial(self._slow, method))
        return grpc.unary_unary_rpc_method_handler(functools.partial(self._answer, method))

    def _record(self, method: str, context: grpc.ServicerContext,
                fails: Callable[[], bool]) -> bool:
        """Record the call; `fails()` decides (under the lock, so a call is recorded with the
        behaviour that decided it) whether the app fails it."""
        metadata = dict(context.invocation_metadata())
        previous = metadata.get(PREVIOUS_ATTEMPTS, "0")
        user, request_id = metadata.get("x-user-id"), metadata.get("x-request-id")
        with self._lock:
            failed = fails()
            self.calls.append(Call(
                time.monotonic(), method,
                int(previous) if isinstance(previous, str) and previous.isdigit() else -1,
                failed, user if isinstance(user, str) else None,
                request_id if isinstance(request_id, str) else None))
        return failed

    def _fail(self, context: grpc.ServicerContext, code: grpc.StatusCode,
              pushback: str | None, why: str) -> None:
        if pushback is not None:
            context.set_trailing_metadata(((PUSHBACK, pushback),))
        context.abort(code, f"{self.name}: {why}")

    def _answer(self, method: str, request: bytes, context: grpc.ServicerContext) -> bytes:
        def fails() -> bool:
            share = self.fail_share
            return share >= 1.0 or (share > 0.0 and self._random.random() < share)

        if self._record(method, context, fails):
            with self._lock:
                share, code, pushback = self.fail_share, self.fail_code, self.pushback
            self._fail(context, code, pushback, f"failing {share:.0%} of calls on purpose")
        return self.name.encode()

    def _slow(self, method: str, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._record(method, context, lambda: False)
        with self._lock:
            self.in_flight += 1
            delay = self.slow_delay
        try:
            end = time.monotonic() + delay
            while context.is_active() and not self._stopping.is_set():
                left = end - time.monotonic()
                if left <= 0:
                    break
                self._stopping.wait(min(left, 0.02))
        finally:
            with self._lock:
                self.in_flight -= 1
        return self.name.encode()

    def _chat(self, method: str, requests: Iterator[bytes],
              context: grpc.ServicerContext) -> Iterator[bytes]:
        with self._lock:
            mode, code = self.stream_mode, self.fail_code
        self._record(method, context, lambda: mode != ECHO)
        for n, message in enumerate(requests):
            if mode == FAIL_BEFORE_FIRST:
                self._fail(context, code, None, "stream failed before any response")
            yield self.name.encode() + b":" + message
            if mode == FAIL_AFTER_FIRST and n == 0:
                self._fail(context, code, None, "stream failed after one response")

