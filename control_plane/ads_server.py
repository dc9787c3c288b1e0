"""The Aggregated Discovery Service (xDS v3, state of the world) on grpc.aio.

One task per stream writes pushes; one reads requests into the stream's protocol state
(control_plane/xds/protocol.py). Resources come from an injected provider (the control plane's
translate step). `notify_changed()` wakes every stream to re-evaluate; what makes that cheap for
thousands of streams is the per-change cache: resources are computed, packed, hashed and
serialized once per (share key, type, subscribed names), and each stream only appends its own
nonce to the cached bytes (protobuf messages concatenate: the serialized nonce field is merged
into the cached response). That is why the service is registered with a bytes serializer
rather than through the generated servicer.

Robustness: a stream's bad request ends only that stream (INVALID_ARGUMENT); a provider error
is logged and leaves the stream on what it had; a vanished client ends its handler, whose
finally cancels its reader task and runs the disconnect hook.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError, Message

from control_plane.status_api import ProxyInfo
from control_plane.xds.protocol import (
    SHORT_NAMES,
    ProtocolError,
    RequestKind,
    StreamState,
    Subscription,
    version_of,
)

log = logging.getLogger(__name__)

ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
SOTW_METHOD = "StreamAggregatedResources"
DELTA_METHOD = "DeltaAggregatedResources"

# Server options that suit long-lived ADS streams: find vanished clients within ~40 s (so the
# embedded registry withdraws their instances) and let clients keep the stream alive with pings.
SERVER_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


class ResourceProvider(Protocol):
    """The control plane's translate step, as the ADS server sees it.

    `resources_for` returns the resources of one type for one node: for a wildcard subscription
    (names None) all of them, otherwise those of the requested names that exist. Optional
    methods, looked up with getattr:
    - `share_key(node, type_url) -> Hashable | None`: nodes with equal keys get equal resources
      for that type and names, so they are computed once per change. It must depend only on
      the node and the type (it is asked once per stream and type). None: not shared.
    - `revision() -> int`: the policy-store revision the current output is computed from
      (shown in proxy-status; 0 when unknown).
    """

    def resources_for(self, node: base_pb2.Node, type_url: str,
                      names: frozenset[str] | None) -> Mapping[str, Message]: ...


NodeHook = Callable[[base_pb2.Node, Hashable], Awaitable[None] | None]


@dataclass(frozen=True, slots=True)
class _Prepared:
    version: str
    body: bytes  # a serialized DiscoveryResponse without its nonce
    revision: int
    count: int


class _Failed:
    """Cache marker: the provider failed for this key in this generation (logged once)."""


_FAILED = _Failed()


class ProviderNotReady(Exception):
    """The provider cannot say yet what to send (e.g. policies not read from Consul): streams
    keep what they have, and notify_changed() once it can."""


@dataclass
class AdsCounters:
    """Totals since start, for /metrics."""

    streams_opened: int = 0
    pushes: int = 0
    acks: int = 0
    nacks: int = 0
    stale_requests: int = 0
    protocol_errors: int = 0
    provider_errors: int = 0
    translations: int = 0  # provider calls (cache misses)


class _Stream:
    def __init__(self, stream_id: int, now: float) -> None:
        self.id = stream_id
        self.state = StreamState(stream_id, now)
        self.wake = asyncio.Event()
        self.share_keys: dict[str, Hashable] = {}
        self.connected = False  # on_connect has run (so on_disconnect must)
        self.reader_done = False
        self.error: ProtocolError | None = None


class AdsServer:
    def __init__(self, provider: ResourceProvider, *, on_connect: NodeHook | None = None,
                 on_disconnect: NodeHook | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        """on_connect(node, owner) runs when a stream has identified itself (first request),
        on_disconnect(node, owner) when that stream ends; `owner` is the stream's id, so two
        overlapping streams of one node (a reconnect) are told apart. Either may be async. An
        on_connect raising ValueError rejects the stream with INVALID_ARGUMENT and its message
        (a sidecar whose metadata cannot describe it); other errors are logged."""
        self._provider = provider
        self._share_key = getattr(provider, "share_key", None)
        self._revision = getattr(provider, "revision", None)
        self._on_connect = on_connect
        self._on_disconnect = on_disconnect
        self._clock = clock
        self._streams: dict[int, _Stream] = {}
        self._ids = itertools.count(1)
        self._nonces = itertools.count(1)
        self._cache: dict[tuple[Hashable, str, Subscription], _Prepared | _Failed] = {}
        self._closing = False
        self._all_closed = asyncio.Event()
        self._all_closed.set()
        self.counters = AdsCounters()

    # --- wiring -------------------------------------------------------------------------
    def add_to_server(self, server: grpc.aio.Server) -> None:
        handlers = {
            SOTW_METHOD: grpc.stream_stream_rpc_method_handler(
                self._sotw, request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
                response_serializer=_as_bytes),
            DELTA_METHOD: grpc.stream_stream_rpc_method_handler(
                self._delta,
                request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
                response_serializer=_as_bytes),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(ADS_SERVICE,
                                                                              handlers),))

    def notify_changed(self) -> None:
        """The provider's output may have changed: drop the cache, re-evaluate every stream."""
        self._cache.clear()
        for stream in self._streams.values():
            stream.wake.set()

    def proxy_status(self) -> list[ProxyInfo]:
        """One record per stream that has identified itself (status API, meshctl)."""
        return [info for s in list(self._streams.values())
                if (info := s.state.status()) is not None]

    @property
    def connected(self) -> int:
        return len(self._streams)

    async def close(self, timeout: float = 5.0) -> None:
        """End every stream (status OK, so clients reconnect elsewhere) and wait for their
        disconnect hooks; new streams are refused."""
        self._closing = True
        for stream in self._streams.values():
            stream.wake.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._all_closed.wait(), timeout)

    # --- one stream ---------------------------------------------------------------------
    async def _delta(self, _requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
                     ) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                            "incremental (delta) xDS is not supported: use the state of the "
                            f"world method {SOTW_METHOD}")

    async def _sotw(self, requests: AsyncIterator[discovery_pb2.DiscoveryRequest],
                    context: grpc.aio.ServicerContext) -> None:
        if self._closing:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "control plane is shutting down")
        stream = _Stream(next(self._ids), self._clock())
        self._streams[stream.id] = stream
        self._all_closed.clear()
        self.counters.streams_opened += 1
        reader = asyncio.create_task(self._read(stream, requests),
                                     name=f"ads-reader-{stream.id}")
        try:
            await self._write(stream, context)
        finally:
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader
            del self._streams[stream.id]
            if stream.connected and stream.state.node is not None:
                await self._hook(self._on_disconnect, stream.state.node, stream.id,
                                 "on_disconnect")
            if not self._streams:
                self._all_closed.set()
        if stream.error is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(stream.error))

    async def _read(self, stream: _Stream,
                    requests: AsyncIterator[discovery_pb2.DiscoveryRequest]) -> None:
        try:
            async for request in requests:
                try:
                    kind = stream.state.on_request(request, self._clock())
                except ProtocolError as exc:
                    self.counters.protocol_errors += 1
                    stream.error = exc
                    return
                if kind is RequestKind.ACK:
                    self.counters.acks += 1
                elif kind is RequestKind.NACK:
                    self.counters.nacks += 1
                    node = stream.state.node
                    log.warning("%s NACKed %s version %s: %s", node.id if node else "?",
                                SHORT_NAMES.get(request.type_url, request.type_url),
                                request.version_info or "-", request.error_detail.message)
                elif kind is RequestKind.STALE:
                    self.counters.stale_requests += 1
                if not stream.connected and stream.state.node is not None:
                    # set first: if the stream ends while the hook runs, on_disconnect still
                    # runs (withdrawing what was never announced is harmless; the reverse
                    # would leave a dead instance announced)
                    stream.connected = True
                    try:
                        await self._hook(self._on_connect, stream.state.node, stream.id,
                                         "on_connect", reject=True)
                    except ValueError as exc:
                        stream.connected = False
                        stream.error = ProtocolError(f"node: {exc}")
                        return
                stream.wake.set()
        except DecodeError as exc:
            self.counters.protocol_errors += 1
            stream.error = ProtocolError(f"request: not a DiscoveryRequest: {exc}")
        except grpc.RpcError as exc:
            log.debug("ads stream %d: reading failed: %s", stream.id, exc)
        except Exception:
            log.exception("ads stream %d: reading failed", stream.id)
        finally:
            stream.reader_done = True
            stream.wake.set()

    async def _write(self, stream: _Stream, context: grpc.aio.ServicerContext) -> None:
        while True:
            await stream.wake.wait()
            stream.wake.clear()
            if stream.reader_done or self._closing:
                return
            for type_url in stream.state.subscribed_types():
                body = self._next_push(stream, type_url)
                if body is not None:
                    await context.write(body)
                    self.counters.pushes += 1

    def _next_push(self, stream: _Stream, type_url: str) -> bytes | None:
        state = stream.state
        if not state.may_push(type_url):
            return None
        prepared = self._prepared(stream, type_url, state.subscription(type_url))
        if prepared is None:
            return None
        if not state.needs_push(type_url, prepared.version):
            state.still_current(type_url, prepared.version, prepared.revision)
            return None
        nonce = f"{stream.id}-{next(self._nonces)}"
        state.record_push(type_url, prepared.version, nonce, self._clock(), prepared.revision)
        return prepared.body + discovery_pb2.DiscoveryResponse(nonce=nonce).SerializeToString()

    # --- resources, once per change -----------------------------------------------------
    def _prepared(self, stream: _Stream, type_url: str, names: Subscription) -> _Prepared | None:
        node = stream.state.node
        assert node is not None
        share = self._share(stream, node, type_url)
        key = (share, type_url, names)
        cached = self._cache.get(key)
        if cached is None:
            cached = self._compute(node, type_url, names)
            self._cache[key] = cached
        return cached if isinstance(cached, _Prepared) else None

    def _share(self, stream: _Stream, node: base_pb2.Node, type_url: str) -> Hashable:
        key = stream.share_keys.get(type_url)
        if key is None:
            shared = None
            if self._share_key is not None:
                try:
                    shared = self._share_key(node, type_url)
                except Exception:
                    log.exception("provider share_key failed for node %s", node.id)
            key = ("shared", shared) if shared is not None else ("stream", stream.id)
            stream.share_keys[type_url] = key
        return key

    def _compute(self, node: base_pb2.Node, type_url: str,
                 names: Subscription) -> _Prepared | _Failed:
        self.counters.translations += 1
        try:
            revision = int(self._revision()) if self._revision is not None else 0
            resources = self._provider.resources_for(node, type_url, names)
            return _prepare(type_url, resources, names, revision)
        except ProviderNotReady as exc:
            log.info("not pushing %s to %s yet: %s", SHORT_NAMES.get(type_url, type_url),
                     node.id, exc)
            return _FAILED
        except Exception:
            self.counters.provider_errors += 1
            log.exception("cannot compute %s for node %s: the stream keeps what it has",
                          SHORT_NAMES.get(type_url, type_url), node.id)
            return _FAILED

    async def _hook(self, hook: NodeHook | None, node: base_pb2.Node, owner: int, what: str,
                    reject: bool = False) -> None:
        if hook is None:
            return
        try:
            result = hook(node, owner)
            if inspect.isawaitable(result):
                await result
        except ValueError:
            if reject:
                raise
            log.exception("%s failed for node %s", what, node.id)
        except Exception:
            log.exception("%s failed for node %s", what, node.id)


def _prepare(type_url: str, resources: Mapping[str, Message], names: Subscription,
             revision: int) -> _Prepared:
    expected = type_url.rpartition("/")[2]
    packed: list[tuple[str, any_pb2.Any]] = []
    for name in sorted(resources):
        if names is not None and name not in names:
            continue  # the client did not ask for it
        message = resources[name]
        if message.DESCRIPTOR.full_name != expected:
            raise TypeError(f"resource {name!r} is a {message.DESCRIPTOR.full_name}, "
                            f"not a {expected}")
        any_msg = any_pb2.Any()
        any_msg.Pack(message, deterministic=True)
        packed.append((name, any_msg))
    version = version_of(packed)
    response = discovery_pb2.DiscoveryResponse(version_info=version, type_url=type_url,
                                               resources=[a for _, a in packed])
    return _Prepared(version, response.SerializeToString(deterministic=True), revision,
                     len(packed))


def _as_bytes(message: bytes) -> bytes:
    return message
