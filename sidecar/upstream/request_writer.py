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


async def write_all(call: Any, read: Any, max_bytes: int, too_large: Any,
                    owner: Any) -> str | None:
    """Copy messages from `read()` to `call` until EOF, then half-close.

    Returns a refusal message if a request message exceeds `max_bytes` (the call is then
    cancelled), else None. Any other failure ends the copy quietly: the status says why.
    `owner` is the handler task: grpc.aio reports a caller's cancel first as EOF on `read()`
    and only then cancels the handler, so before forwarding a half-close we make sure no
    cancellation is on its way (see the barrier below).
    """
    from grpc.aio import EOF

    cython_call = getattr(call, "_cython_call", None)
    connected = False
    with contextlib.suppress(Exception):
        while True:
            message = await read()
            if message is EOF:
                break
            if len(message) > max_bytes:
                call.cancel()
                return too_large("request", len(message))
            if cython_call is None:
                await call.write(message)
                continue
            if call.done():
                return None
            if not connected:
                await call.wait_for_connection()
                connected = True
            try:
                await cython_call.send_serialized_message(message)
            except cygrpc.InternalError:
                await _await_status(call)
                return None
        # A second read after EOF is a barrier: it completes through grpc-core's queue after
        # the caller's cancel (if any) has been delivered, so a cancel is never forwarded as a
        # half-close.
        await read()
        if owner.cancelling() or call.done():
            return None
        await call.done_writing()
    return None


async def _await_status(call: Any) -> None:
    done = asyncio.Event()
    call.add_done_callback(lambda _call: done.set())
    try:
        await asyncio.wait_for(done.wait(), _STATUS_GRACE)
    except TimeoutError:
        call.cancel()
