"""A sidecar in front of an in-test echo upstream, plus what robustness and drain tests need to
watch it from outside: the upstream's own record of each call (started, cancelled, finished),
the sidecar's open file descriptors and threads, and one "is it still fine" check that makes
fresh connections to every port.

EchoUpstream is a grpc.aio server in this process (on its own event-loop thread): its handlers
can hold a call until the test releases it, and they record when grpc cancels them because the
caller went away, which is how the tests see a cancellation cross the proxy. RawUpstream is an
HTTP/2 server on the h2 package, for what grpc servers cannot do or show: send RST_STREAM, and
tell a caller's RST_STREAM apart from a half-close.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import queue
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import pytest

from tests.harness import ManagedProcess, start_sidecar, wait_for

ECHO_SERVICE = "robust.Echo"
UNARY = f"/{ECHO_SERVICE}/Unary"  # echoes the request; `x-hold: 1` holds it until released
STREAM = f"/{ECHO_SERVICE}/Stream"  # echoes each message; `x-hold: 1` holds after half-close
RESET_MESSAGE = b"reset"  # on STREAM: the upstream ends the call CANCELLED (RawUpstream: RST)
CALL_ID = "x-call-id"
HOLD = "x-hold"
CALL_TIMEOUT = 5.0


@dataclass
class CallRecord:
    """What the upstream saw of one call, keyed by the caller's `x-call-id`."""

    method: str
    started_at: float = field(default_factory=time.monotonic)
    ended: threading.Event = field(default_factory=threading.Event)
    released: asyncio.Event = field(default_factory=asyncio.Event)
    half_closed: bool = False  # the handler read a clean end of the request stream
    returned: bool = False  # the handler finished normally
    cancelled: bool = False  # grpc reported the call cancelled (caller left, or deadline)
    ended_at: float | None = None


class EchoUpstream:
    """Bytes-only echo methods on a real grpc.aio server on 127.0.0.1, run on its own event loop
    thread. grpc.aio (unlike the sync server, whose request iterator can end cleanly on a
    cancel) tells a cancelled call from a half-closed one, which the cancellation tests need."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls: dict[str, CallRecord] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="echo-upstream",
                                        daemon=True)
        self._thread.start()
        self.address: str = self._run(self._start())

    def _run(self, coro: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _start(self) -> str:
        self._server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        self._server.add_generic_rpc_handlers((self,))
        port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        return f"127.0.0.1:{port}"

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._run(self._server.stop(0))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def release(self, call_id: str) -> None:
        """Let a held call finish."""
        record = self.record(call_id)
        self._loop.call_soon_threadsafe(record.released.set)

    # --- grpc.GenericRpcHandler -------------------------------------------------------------
    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = details.method  # type: ignore[attr-defined]
        if method == UNARY:
            return grpc.unary_unary_rpc_method_handler(self._unary)
        if method == STREAM:
            return grpc.stream_stream_rpc_method_handler(self._stream)
        return None

    def _begin(self, method: str, context: grpc.aio.ServicerContext) -> tuple[CallRecord, bool]:
        metadata = dict(context.invocation_metadata() or ())
        record = CallRecord(method)
        call_id = str(metadata.get(CALL_ID) or uuid.uuid4())
        with self._lock:
            self.calls[call_id] = record

        def on_done(_ctx: grpc.aio.ServicerContext) -> None:
            # (ctx.cancelled() is not reliable here in grpcio 1.85; the handler's
            # CancelledError is what says the caller left)
            record.ended_at = time.monotonic()
            record.ended.set()

        context.add_done_callback(on_done)
        return record, metadata.get(HOLD) == "1"

    async def _unary(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        record, hold = self._begin(UNARY, context)
        try:
            if hold:
                await context.send_initial_metadata((("x-upstream", "held"),))
                await record.released.wait()
        except asyncio.CancelledError:
            record.cancelled = True
            raise
        record.returned = True
        return request

    async def _stream(self, _requests: Any, context: grpc.aio.ServicerContext) -> None:
        """Echo. A cancel can reach a grpc.aio handler as a clean end of the requests, so tests
        that watch for cancellation hold the call open after half-close."""
        record, hold = self._begin(STREAM, context)
        try:
            while True:
                message = await context.read()
                if message is grpc.aio.EOF:
                    record.half_closed = True
                    break
                if message == RESET_MESSAGE:  # grpc.aio servers cannot send RST_STREAM
                    await context.abort(grpc.StatusCode.CANCELLED, "upstream cancelled the call")
                await context.write(message)
            if hold:
                await record.released.wait()
        except asyncio.CancelledError:
            record.cancelled = True
            raise
        record.returned = True

    # --- what tests look at -----------------------------------------------------------------
    def record(self, call_id: str, timeout: float = CALL_TIMEOUT) -> CallRecord:
        """The call's record, once the upstream has seen the call."""
        return wait_for(lambda: self.calls.get(call_id), timeout=timeout,
                        what=f"upstream to see call {call_id}")

    def active(self) -> list[str]:
        return [cid for cid, r in list(self.calls.items()) if not r.ended.is_set()]


@dataclass
class RawStream:
    """What a RawUpstream saw of one HTTP/2 stream."""

    call_id: str
    path: str
    ended: bool = False  # END_STREAM from the caller: a half-close
    reset_code: int | None = None  # RST_STREAM from the caller
    closed: threading.Event = field(default_factory=threading.Event)  # reset or conn gone


class RawUpstream:
    """A raw HTTP/2 server (the h2 package) for what grpc servers neither do nor show.

    It echoes every gRPC message and never ends a stream itself, except that RESET_MESSAGE makes
    it send RST_STREAM(CANCEL): an upstream that really resets. It records exactly how the
    caller ended each stream: END_STREAM (a half-close) versus RST_STREAM and its code.
    """

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self.streams: dict[str, RawStream] = {}
        self._conns: list[socket.socket] = []
        self._stopped = threading.Event()
        threading.Thread(target=self._accept, name="raw-upstream", daemon=True).start()

    def stop(self) -> None:
        self._stopped.set()
        self._listener.close()
        for conn in list(self._conns):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def stream(self, call_id: str, timeout: float = CALL_TIMEOUT) -> RawStream:
        return wait_for(lambda: self.streams.get(call_id), timeout=timeout,
                        what=f"raw upstream to see call {call_id}")

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False,
                                                                    header_encoding="utf-8"))
        conn.initiate_connection()
        buffers: dict[int, bytes] = {}
        streams: dict[int, RawStream] = {}
        try:
            sock.sendall(conn.data_to_send())
            while chunk := sock.recv(65536):
                for event in conn.receive_data(chunk):
                    self._on_event(conn, event, buffers, streams)
                sock.sendall(conn.data_to_send())
        except (OSError, h2.exceptions.ProtocolError):
            pass
        finally:
            for record in streams.values():
                record.closed.set()
            sock.close()

    def _on_event(self, conn: h2.connection.H2Connection, event: h2.events.Event,
                  buffers: dict[int, bytes], streams: dict[int, RawStream]) -> None:
        if isinstance(event, h2.events.RequestReceived):
            headers = dict(event.headers)
            record = RawStream(str(headers.get(CALL_ID) or uuid.uuid4()), headers[":path"])
            streams[event.stream_id] = self.streams[record.call_id] = record
            buffers[event.stream_id] = b""
            conn.send_headers(event.stream_id, [(":status", "200"),
                                                ("content-type", "application/grpc")])
        elif isinstance(event, h2.events.DataReceived):
            conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            if event.stream_id in buffers:
                self._on_data(conn, buffers, event.stream_id, event.data)
        elif isinstance(event, h2.events.StreamEnded) and event.stream_id in streams:
            streams[event.stream_id].ended = True
        elif isinstance(event, h2.events.StreamReset) and event.stream_id in streams:
            streams[event.stream_id].reset_code = event.error_code
            streams[event.stream_id].closed.set()
            buffers.pop(event.stream_id, None)

    def _on_data(self, conn: h2.connection.H2Connection, buffers: dict[int, bytes],
                 stream_id: int, data: bytes) -> None:
        buffered = buffers[stream_id] + data
        while len(buffered) >= 5 and len(buffered) >= 5 + struct.unpack(">I", buffered[1:5])[0]:
            size = 5 + struct.unpack(">I", buffered[1:5])[0]
            if buffered[5:size] == RESET_MESSAGE:
                conn.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
                buffers.pop(stream_id)
                return
            conn.send_data(stream_id, buffered[:size])
            buffered = buffered[size:]
        buffers[stream_id] = buffered


# --- talking to the sidecar ----------------------------------------------------------------
def unary(address: str, payload: bytes, *, call_id: str | None = None, hold: bool = False,
          timeout: float = CALL_TIMEOUT, channel: grpc.Channel | None = None) -> bytes:
    """One unary call on a fresh channel (so it also proves new connections are accepted)."""
    own = channel is None
    ch = channel or grpc.insecure_channel(address)
    try:
        return ch.unary_unary(UNARY)(payload, timeout=timeout,
                                     metadata=_metadata(call_id, hold))
    finally:
        if own:
            ch.close()


def unary_future(channel: grpc.Channel, payload: bytes, *, call_id: str, hold: bool = False,
                 timeout: float = 20.0) -> grpc.Future:
    return channel.unary_unary(UNARY).future(payload, timeout=timeout,
                                             metadata=_metadata(call_id, hold))


def stream_echo(address: str, messages: list[bytes], timeout: float = CALL_TIMEOUT) -> list[bytes]:
    with grpc.insecure_channel(address) as ch:
        return list(ch.stream_stream(STREAM)(iter(messages), timeout=timeout))


def _metadata(call_id: str | None, hold: bool) -> list[tuple[str, str]]:
    md = []
    if call_id:
        md.append((CALL_ID, call_id))
    if hold:
        md.append((HOLD, "1"))
    return md


class OpenStream:
    """A bidirectional call whose messages the test sends one at a time."""

    _END = object()

    def __init__(self, channel: grpc.Channel, method: str = STREAM, *, call_id: str,
                 hold: bool = False, timeout: float = 20.0) -> None:
        self._outbox: queue.Queue[object] = queue.Queue()
        self.call = channel.stream_stream(method)(self._requests(), timeout=timeout,
                                                  metadata=_metadata(call_id, hold))

    def _requests(self) -> Iterator[bytes]:
        while True:
            item = self._outbox.get()
            if item is self._END:
                return
            assert isinstance(item, bytes)
            yield item

    def send(self, message: bytes) -> None:
        self._outbox.put(message)

    def roundtrip(self, message: bytes) -> bytes:
        self.send(message)
        return next(self.call)

    def half_close(self) -> None:
        self._outbox.put(self._END)

    def rest(self) -> list[bytes]:
        """The remaining responses; raises grpc.RpcError if the call did not end OK."""
        return list(self.call)


def admin_get(address: str, path: str, timeout: float = CALL_TIMEOUT) -> tuple[int, bytes]:
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


# --- the process from outside --------------------------------------------------------------
def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def thread_count(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    raise RuntimeError(f"no thread count for {pid}")


@dataclass
class Rig:
    """One sidecar whose outbound routes everything to `upstream` and whose inbound forwards
    to it as its app."""

    sidecar: ManagedProcess
    upstream: EchoUpstream

    @property
    def outbound(self) -> str:
        return self.sidecar.addr("outbound")

    @property
    def inbound(self) -> str:
        return self.sidecar.addr("inbound")

    @property
    def admin(self) -> str:
        return self.sidecar.addr("admin")

    @property
    def grpc_ports(self) -> dict[str, str]:
        return {"outbound": self.outbound, "inbound": self.inbound}

    @property
    def pid(self) -> int:
        return self.sidecar.proc.pid

    def assert_serving(self, tag: str = "check") -> None:
        """The process is alive and every port works for a new client."""
        assert self.sidecar.alive(), f"sidecar died:\n{self.sidecar.output()}"
        for name, address in self.grpc_ports.items():
            payload = f"{tag}-{name}-unary".encode()
            assert unary(address, payload) == payload
            messages = [f"{tag}-{name}-{i}".encode() for i in range(3)]
            assert stream_echo(address, messages) == messages
        status, body = admin_get(self.admin, "/ready")
        assert (status, body) == (200, b"ready\n")
        status, _ = admin_get(self.admin, "/clusters")
        assert status == 200
        assert self.sidecar.alive(), f"sidecar died:\n{self.sidecar.output()}"


def start_rig(upstream: EchoUpstream, extra: tuple[str, ...] = ()) -> Rig:
    sidecar = start_sidecar(service="robust", app=upstream.address,
                            upstreams={"echo": [upstream.address]}, routes={"*": "echo"},
                            extra=("--unary-method", UNARY, *extra), name="sidecar-robust")
    return Rig(sidecar, upstream)


@pytest.fixture
def echo_upstream() -> Iterator[EchoUpstream]:
    upstream = EchoUpstream()
    try:
        yield upstream
    finally:
        upstream.stop()


@pytest.fixture
def rig(echo_upstream: EchoUpstream) -> Iterator[Rig]:
    rig = start_rig(echo_upstream)
    try:
        yield rig
    finally:
        alive = rig.sidecar.alive()
        code = rig.sidecar.stop()
    # whatever the test threw at it, the sidecar still drains and exits cleanly
    assert alive and code == 0, f"sidecar exit {code}:\n{rig.sidecar.output()}"


@pytest.fixture
def rig_factory(echo_upstream: EchoUpstream) -> Iterator[Callable[..., Rig]]:
    """For tests that need their own sidecar flags (drain timeouts) and stop it themselves."""
    started: list[Rig] = []

    def make(*extra: str) -> Rig:
        r = start_rig(echo_upstream, tuple(extra))
        started.append(r)
        return r

    try:
        yield make
    finally:
        for r in started:
            r.sidecar.stop(timeout=5)
