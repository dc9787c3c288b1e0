"""Writing request messages to an upstream stream call without losing the upstream's status.

grpcio's aio `Call.write()` has a race (grpc/grpc issue #36066, fix proposed in PR #43486):
when the upstream ends a call while a request message is still being written (an immediate
UNIMPLEMENTED, an early abort of a client stream), the failed write overwrites the status the
upstream sent with `INTERNAL: Internal error from Core`. Through a proxy that turns a correct
upstream error into a wrong one a few percent of the time.

We therefore send through the call's Cython object, which is what `write()` does minus the
status overwrite, and treat a failed send as what it means here: the upstream has finished,
and its status arrives on the read side. If a future grpcio drops that attribute we fall back to
the public `write()`. If grpc-core were ever to fail a send without delivering a status (the
case the overwrite exists for), we cancel the call after a grace period rather than hang.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from grpc._cython import cygrpc

_STATUS_GRACE = 5.0  # seconds to wait for the status after a failed send


async def send(call: Any, message: bytes) -> bool:
    """Send one request message; False if the upstream has already finished the call."""
    cython_call = getattr(call, "_cython_call", None)
    if cython_call is None:  # a grpcio without the attribute: the public path
        try:
            await call.write(message)
        except Exception:
            return False
        return True
    if call.done():
        return False
    await call.wait_for_connection()
    try:
        await cython_call.send_serialized_message(message)
    except cygrpc.InternalError:
        await _await_status(call)
        return False
    return True


async def half_close_after_barrier(call: Any, read: Any, owner: Any) -> None:
    """Half-close upstream, unless the caller's EOF was really a cancel.

    grpc.aio reports a caller's cancel first as EOF on `read()` and only then cancels the
    handler task (`owner`). A second read after EOF is a barrier: it completes through
    grpc-core's queue after the cancel (if any) has been delivered, so a cancel is never
    forwarded as a half-close.
    """
    await read()
    if owner.cancelling() or call.done():
        return
    await call.done_writing()


async def write_all(call: Any, read: Any, max_bytes: int, too_large: Any,
                    owner: Any) -> str | None:
    """Copy messages from `read()` to `call` until EOF, then half-close.

    Returns a refusal message if a request message exceeds `max_bytes` (the call is then
    cancelled), else None. Any other failure ends the copy quietly: the status says why.
    """
    from grpc.aio import EOF

    with contextlib.suppress(Exception):
        while True:
            message = await read()
            if message is EOF:
                break
            if len(message) > max_bytes:
                call.cancel()
                return too_large("request", len(message))
            if not await send(call, message):
                return None
        await half_close_after_barrier(call, read, owner)
    return None


class ReplayingWriter:
    """Request messages of a retried stream call: kept until the call commits, so a new
    attempt can be sent the same messages (gRFC A6: a call commits once the upstream sends
    response headers or a message, or once the request no longer fits the replay buffer)."""

    __slots__ = ("_lock", "buffer", "buffered", "call", "committed", "eof", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.buffer: list[bytes] = []
        self.buffered = 0
        self.committed = False
        self.eof = False
        self.call: Any = None
        self._lock = asyncio.Lock()

    def commit(self) -> None:
        self.committed = True
        self.buffer = []

    async def attach(self, call: Any) -> None:
        """Make `call` the current attempt and send it everything sent so far."""
        async with self._lock:
            self.call = call
            for message in self.buffer:
                if not await send(call, message):
                    return
            if self.eof:
                with contextlib.suppress(Exception):
                    await call.done_writing()

    async def pump(self, read: Any, max_bytes: int, too_large: Any, owner: Any) -> str | None:
        from grpc.aio import EOF

        with contextlib.suppress(Exception):
            while True:
                message = await read()
                if message is EOF:
                    break
                if len(message) > max_bytes:
                    self.call.cancel()
                    return too_large("request", len(message))
                async with self._lock:
                    if not self.committed:
                        self.buffered += len(message)
                        if self.buffered > self.limit:
                            self.commit()
                        else:
                            self.buffer.append(message)
                    await send(self.call, message)
            await read()  # the barrier of half_close_after_barrier
            if owner.cancelling():
                return None
            async with self._lock:
                self.eof = True
                if not self.call.done():
                    await self.call.done_writing()
        return None


async def _await_status(call: Any) -> None:
    done = asyncio.Event()
    call.add_done_callback(lambda _call: done.set())
    try:
        await asyncio.wait_for(done.wait(), _STATUS_GRACE)
    except TimeoutError:
        call.cancel()
