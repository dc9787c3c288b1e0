"""A small HTTP/1.1 server for admin endpoints (GET only), on asyncio streams.

Admin pages are tiny and rare, so a dependency-free server is enough; it must still survive
anything a port scanner sends: bounded request size, a read timeout, and any error closes only
that connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

_MAX_REQUEST_BYTES = 16 * 1024
_READ_TIMEOUT = 5.0
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            503: "Service Unavailable"}


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"


Handler = Callable[[str], Awaitable[Response] | Response]


class AdminServer:
    def __init__(self, routes: dict[str, Handler]) -> None:
        self._routes = routes
        self._server: asyncio.base_events.Server | None = None

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(self._serve, host, port,
                                                  limit=_MAX_REQUEST_BYTES)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _READ_TIMEOUT)
            response = await self._respond(head)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                ConnectionError):
            writer.close()
            return
        except Exception:  # a handler bug must not take the admin port down
            log.exception("admin handler failed")
            response = Response(500, b"internal error\n")
        try:
            writer.write(b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
                         b"Connection: close\r\n\r\n" % (
                             response.status, _REASONS.get(response.status, "").encode(),
                             response.content_type.encode(), len(response.body)))
            writer.write(response.body)
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _respond(self, head: bytes) -> Response:
        try:
            request_line = head.split(b"\r\n", 1)[0].decode("ascii")
            method, target, _version = request_line.split(" ")
        except (UnicodeDecodeError, ValueError):
            return Response(400, b"bad request\n")
        if method not in ("GET", "HEAD"):
            return Response(405, b"only GET\n")
        path, _, query = target.partition("?")
        handler = self._routes.get(path)
        if handler is None:
            listing = "".join(f"{p}\n" for p in sorted(self._routes))
            return Response(404, f"not found; try:\n{listing}".encode())
        result = handler(query)
        if isinstance(result, Response):
            return result
        return await result
