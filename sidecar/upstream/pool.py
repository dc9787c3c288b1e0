"""One gRPC channel per upstream endpoint, shared by every call and every config version.

Channels outlive snapshots: a new config that keeps an endpoint keeps its connection (no
reconnect, no reset of long-lived streams). An endpoint that leaves the config is closed after a
grace period so calls still using it can finish.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Sequence

import grpc

Option = tuple[str, int | str]


class UpstreamChannel:
    """A channel to one endpoint, with its per-method call factories cached."""

    __slots__ = ("_stream", "_unary", "address", "channel")

    def __init__(self, address: str, options: Sequence[Option],
                 credentials: grpc.ChannelCredentials | None = None) -> None:
        self.address = address
        if credentials is None:
            self.channel = grpc.aio.insecure_channel(address, options=options)
        else:
            self.channel = grpc.aio.secure_channel(address, credentials, options=options)
        self._stream: dict[str, grpc.aio.StreamStreamMultiCallable] = {}
        self._unary: dict[str, grpc.aio.UnaryUnaryMultiCallable] = {}

    def stream(self, method: str) -> grpc.aio.StreamStreamMultiCallable:
        factory = self._stream.get(method)
        if factory is None:
            factory = self.channel.stream_stream(method)
            if len(self._stream) < 4096:  # bounded: method names come from the network
                self._stream[method] = factory
        return factory

    def unary(self, method: str) -> grpc.aio.UnaryUnaryMultiCallable:
        factory = self._unary.get(method)
        if factory is None:
            factory = self.channel.unary_unary(method)
            if len(self._unary) < 4096:
                self._unary[method] = factory
        return factory


class ChannelPool:
    def __init__(self, options: Sequence[Option], close_grace: float = 30.0) -> None:
        self._options = tuple(options)
        self._channels: dict[str, UpstreamChannel] = {}
        self._close_grace = close_grace
        self._closing: set[asyncio.Task[None]] = set()

    def get(self, address: str) -> UpstreamChannel:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = UpstreamChannel(address, self._options)
        return ch

    def retain(self, addresses: Iterable[str]) -> None:
        """Close (after the grace period) channels to endpoints no longer in the config."""
        keep = set(addresses)
        for address in [a for a in self._channels if a not in keep]:
            ch = self._channels.pop(address)
            task = asyncio.get_running_loop().create_task(ch.channel.close(self._close_grace))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self, grace: float | None = None) -> None:
        channels = list(self._channels.values())
        self._channels.clear()
        await asyncio.gather(*(ch.channel.close(grace) for ch in channels),
                             return_exceptions=True)
        for task in list(self._closing):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
