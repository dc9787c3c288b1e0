"""One gRPC channel per upstream endpoint, shared by every call and every config version.

Channels outlive snapshots: a new config that keeps an endpoint keeps its connection (no
reconnect, no reset of long-lived streams). An endpoint that leaves the config is closed after a
grace period so calls still using it can finish.

mTLS endpoints get a secure channel with the workload's current certificate; the pool is keyed
by (address, server name), so one address is never dialled both ways by mistake. Credentials are
fixed for a grpc channel's life: when the identity changes (renewal, new trust bundle) every
mTLS `UpstreamChannel` swaps in a new grpc channel for new calls, and the old one is closed only
once its calls have ended (a long-lived stream keeps its connection and its TLS session to the
end: a rotation fails no call).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:
    from sidecar.tls import UpstreamTls

Option = tuple[str, int | str]
Key = tuple[str, str | None]  # (address, TLS server name or None for plaintext)

# How long a retired channel may wait for its calls to end before it is closed anyway: longer
# than any sane call, shorter than forever (a stuck stream must not pin a connection for days).
RETIRE_GRACE = 24 * 3600.0


class UpstreamChannel:
    """A channel to one endpoint, with its per-method call factories cached."""

    __slots__ = ("_stream", "_unary", "address", "channel", "server_name")

    def __init__(self, address: str, channel: grpc.aio.Channel,
                 server_name: str | None = None) -> None:
        self.address = address
        self.server_name = server_name  # the TLS name checked in the handshake; None: plaintext
        self.channel = channel
        self._stream: dict[str, grpc.aio.StreamStreamMultiCallable] = {}
        self._unary: dict[str, grpc.aio.UnaryUnaryMultiCallable] = {}

    @property
    def key(self) -> Key:
        return (self.address, self.server_name)

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

    def replace(self, channel: grpc.aio.Channel) -> grpc.aio.Channel:
        """New calls use `channel` from now on; returns the old one (calls on it go on)."""
        old, self.channel = self.channel, channel
        self._stream = {}
        self._unary = {}
        return old


class ChannelPool:
    def __init__(self, options: Sequence[Option], close_grace: float = 30.0,
                 tls: UpstreamTls | None = None) -> None:
        self._options = tuple(options)
        self._channels: dict[Key, UpstreamChannel] = {}
        self._close_grace = close_grace
        self._closing: set[asyncio.Task[None]] = set()
        self._tls = tls
        self._tls_generation = tls.generation if tls is not None else 0

    @property
    def has_identity(self) -> bool:
        return self._tls is not None

    def get(self, address: str, server_name: str | None = None) -> UpstreamChannel:
        """The channel to `address`: mTLS checking `server_name` when given (the pool must have
        an identity then), else plaintext."""
        key = (address, server_name)
        ch = self._channels.get(key)
        if ch is None:
            ch = self._channels[key] = UpstreamChannel(address, self._open(address, server_name),
                                                       server_name)
        return ch

    def _open(self, address: str, server_name: str | None) -> grpc.aio.Channel:
        if server_name is None:
            return grpc.aio.insecure_channel(address, options=self._options)
        assert self._tls is not None, "an mTLS channel needs a workload identity"
        # The handshake checks that the server's certificate names `server_name` (its DNS SAN).
        return grpc.aio.secure_channel(address, self._tls.credentials(),
                                       options=(*self._options,
                                                ("grpc.ssl_target_name_override", server_name)))

    def identity_changed(self) -> int:
        """Give every mTLS channel the current certificate for new calls; the old grpc channels
        close when their calls have ended. Returns how many channels were renewed."""
        if self._tls is None or self._tls.generation == self._tls_generation:
            return 0
        self._tls_generation = self._tls.generation
        renewed = 0
        for ch in self._channels.values():
            if ch.server_name is not None:
                old = ch.replace(self._open(ch.address, ch.server_name))
                self._close_later(old, RETIRE_GRACE)
                renewed += 1
        return renewed

    def retain(self, keep: Iterable[Key]) -> None:
        """Close (after the grace period) channels to endpoints no longer in the config."""
        wanted = set(keep)
        for key in [k for k in self._channels if k not in wanted]:
            self._close_later(self._channels.pop(key).channel, self._close_grace)

    def _close_later(self, channel: grpc.aio.Channel, grace: float) -> None:
        task = asyncio.get_running_loop().create_task(channel.close(grace))
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
