"""Hostile and unlucky clients on every port of a real sidecar process.

Each case throws something at the sidecar, then checks from outside that nothing broke: the
process is alive, fresh clients get correct answers on the outbound, inbound and admin ports,
its file descriptors and threads come back to where they were, and the upstream has no call
left open (a stuck proxied call would hold one). The sidecar exposes no count of its own
connections or calls in flight, so /proc and the upstream's view are what can be measured.

Cancellation is checked where it lands: the upstream's handler must see the caller leave, and
a raw HTTP/2 upstream shows on the wire whether it got a cancel (RST_STREAM) or a half-close.
"""

from __future__ import annotations

import random
import socket
import ssl
import struct
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import h2.config
import h2.connection
import h2.errors
import hpack
import pytest

from tests.component.conftest import (
    CALL_ID,
    HOLD,
    RESET_MESSAGE,
    STREAM,
    UNARY,
    OpenStream,
    RawUpstream,
    Rig,
    fd_count,
    thread_count,
    unary_future,
)
from tests.harness import start_sidecar, wait_for

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = (
    0, 1, 3, 4, 5, 6, 7, 8, 9)
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
CLOSE_TIMEOUT = 5.0  # a port must hang up on garbage within this
CANCEL_BOUND = 2.0  # a cancel must cross the sidecar within this
FD_SLACK = 2
THREAD_SLACK = 2


# --- raw bytes and HTTP/2 frames -----------------------------------------------------------
def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(
        ">I", stream_id) + payload


def grpc_message(body: bytes) -> bytes:
    return b"\x00" + struct.pack(">I", len(body)) + body


def _hpack_int(value: int, prefix_bits: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([value])
    out = [limit]
    value -= limit
    while value >= 128:
        out.append((value & 127) | 128)
        value >>= 7
    out.append(value)
    return bytes(out)


def literal_header(name: bytes, value: bytes) -> bytes:
    """HPACK literal without indexing, no Huffman: cheap to build at any size."""
    return b"\x00" + _hpack_int(len(name), 7) + name + _hpack_int(len(value), 7) + value


def request_headers(path: str, call_id: str) -> bytes:
    return hpack.Encoder().encode([(":method", "POST"), (":scheme", "http"), (":path", path),
                                   (":authority", "robust"), ("te", "trailers"),
                                   ("content-type", "application/grpc"), (CALL_ID, call_id)])


def header_frames(block: bytes, stream_id: int, chunk: int = 16384,
                  end_headers: bool = True) -> bytes:
    """A header block as HEADERS plus CONTINUATION frames."""
    parts = [block[i:i + chunk] for i in range(0, len(block), chunk)] or [b""]
    out = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        flags = END_HEADERS if (last and end_headers) else 0
        out.append(frame(HEADERS if i == 0 else CONTINUATION, flags, stream_id, part))
    return b"".join(out)


@dataclass
class Frame:
    kind: int
    flags: int
    stream_id: int
    payload: bytes


class RawClient:
    """A TCP client that speaks whatever bytes the test gives it."""

    def __init__(self, address: str, timeout: float = CLOSE_TIMEOUT) -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self._buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self, reset: bool = False) -> None:
        if reset:  # SO_LINGER 0: the kernel sends RST instead of FIN
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def wait_closed(self, timeout: float = CLOSE_TIMEOUT) -> bytes:
        """Read until the server hangs up; fail if it does not within `timeout`."""
        received = b""
        deadline = time.monotonic() + timeout
        try:
            while True:
                self.sock.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = self.sock.recv(65536)
                if not chunk:
                    return received
                received += chunk
        except ConnectionResetError:
            return received
        except TimeoutError:
            pytest.fail(f"server kept the connection open {timeout}s after garbage; "
                        f"it sent {received[:100]!r}")

    def frames_until(self, done: Callable[[Frame], bool],
                     timeout: float = CLOSE_TIMEOUT) -> tuple[list[Frame], str]:
        """HTTP/2 frames until `done` matches one ("match"), the server hangs up ("closed"), or
        `timeout` passes ("timeout"). Acknowledges the server's SETTINGS like a client must."""
        frames: list[Frame] = []
        deadline = time.monotonic() + timeout
        while True:
            while len(self._buffer) >= 9:
                length = int.from_bytes(self._buffer[:3], "big")
                if len(self._buffer) < 9 + length:
                    break
                f = Frame(self._buffer[3], self._buffer[4],
                          int.from_bytes(self._buffer[5:9], "big") & 0x7FFFFFFF,
                          self._buffer[9:9 + length])
                self._buffer = self._buffer[9 + length:]
                frames.append(f)
                if f.kind == SETTINGS and not f.flags & ACK:
                    self.send(frame(SETTINGS, ACK, 0))
                if done(f):
                    return frames, "match"
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return frames, "timeout"
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return frames, "closed"
            except TimeoutError:
                return frames, "timeout"
            if not chunk:
                return frames, "closed"
            self._buffer += chunk


def grpc_status_of(frames: list[Frame], stream_id: int) -> str | None:
    """grpc-status from the stream's last header block (the server's first blocks on a fresh
    connection, so a fresh HPACK decoder reads them)."""
    decoder = hpack.Decoder()
    status = None
    for f in frames:
        if f.kind == HEADERS and f.stream_id == stream_id:
            for name, value in decoder.decode(f.payload):
                if name == "grpc-status":
                    status = value
    return status


# --- the leak check ------------------------------------------------------------------------
@dataclass(frozen=True)
class Baseline:
    fds: int
    threads: int


def baseline(rig: Rig) -> Baseline:
    """What the sidecar holds once warmed up (upstream channel connected)."""
    rig.assert_serving("warmup")
    return Baseline(fd_count(rig.pid), thread_count(rig.pid))


def assert_recovered(rig: Rig, base: Baseline, tag: str = "after") -> None:
    """Still serving on every port, and nothing left behind: descriptors and threads back
    to the baseline, no call still open at the upstream."""
    rig.assert_serving(tag)
    wait_for(lambda: not rig.upstream.active(), timeout=5,
             what=f"upstream calls to end (open: {rig.upstream.active()})")
    wait_for(lambda: fd_count(rig.pid) <= base.fds + FD_SLACK, timeout=10,
             what=f"sidecar fds back to {base.fds}+{FD_SLACK} (now {fd_count(rig.pid)})")
    assert thread_count(rig.pid) <= base.threads + THREAD_SLACK, (
        f"threads grew from {base.threads} to {thread_count(rig.pid)}")
    rig.assert_serving(tag + "-again")


def all_ports(rig: Rig) -> dict[str, str]:
    return {**rig.grpc_ports, "admin": rig.admin}


# --- garbage -------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
def test_random_bytes_on_every_port(rig: Rig, seed: int) -> None:
    base = baseline(rig)
    rng = random.Random(seed)
    for name, address in all_ports(rig).items():
        for size in (1, 24, 1000, 70_000):
            client = RawClient(address)
            try:
                client.send(rng.randbytes(size))
                client.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the server may hang up before the bytes are all written
            reply = client.wait_closed()
            client.close()
            assert b"200 OK" not in reply, f"{name} answered random bytes with {reply[:80]!r}"
    assert_recovered(rig, base)


@pytest.mark.parametrize("request_bytes", [
    b"GET / HTTP/1.1\r\nHost: robust\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: robust\r\nConnection: Upgrade, HTTP2-Settings\r\n"
    b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
    b"POST /robust.Echo/Unary HTTP/1.1\r\nHost: robust\r\nContent-Type: application/grpc\r\n"
    b"Content-Length: 5\r\n\r\n\x00\x00\x00\x00\x00",
], ids=["get", "h2c-upgrade", "grpc-over-http1"])
def test_http1_request_on_grpc_ports(rig: Rig, request_bytes: bytes) -> None:
    base = baseline(rig)
    for name, address in rig.grpc_ports.items():
        client = RawClient(address)
        client.send(request_bytes)
        reply = client.wait_closed()  # not HTTP/2: the port must hang up by itself
        client.close()
        assert not reply.startswith(b"HTTP/1.1 2"), f"{name} served HTTP/1.1: {reply[:80]!r}"
    assert_recovered(rig, base)


def test_tls_client_hello_on_plaintext_grpc_ports(rig: Rig) -> None:
    base = baseline(rig)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    for name, address in rig.grpc_ports.items():
        host, port = address.rsplit(":", 1)
        raw = socket.create_connection((host, int(port)), timeout=CLOSE_TIMEOUT)
        started = time.monotonic()
        try:
            with pytest.raises((ssl.SSLError, ConnectionError)):
                try:
                    context.wrap_socket(raw, server_hostname="robust").close()
                except TimeoutError:
                    pytest.fail(f"TLS handshake to {name} hung instead of failing")
        finally:
            raw.close()
        assert time.monotonic() - started < CLOSE_TIMEOUT
    assert_recovered(rig, base)


FATAL_FRAMES = {
    # each is a connection error by RFC 9113; the server must hang up
    "bad-settings-length": frame(SETTINGS, 0, 0, b"12345"),
    "frame-longer-than-max": struct.pack(">I", 0xFFFFFF)[1:] + bytes([DATA, 0])
    + struct.pack(">I", 1) + b"x" * 100,
    "window-update-zero": frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 0)),
    "random-after-preface": random.Random(7).randbytes(600),
}
TOLERATED_FRAMES = {
    # protocol errors too, but grpc-core is lenient with these: it may ignore them
    "data-on-stream-0": frame(DATA, 0, 0, b"abc"),
    "headers-even-stream": frame(HEADERS, END_STREAM | END_HEADERS, 2, b"\x82"),
    "push-promise-from-client": frame(PUSH_PROMISE, END_HEADERS, 1, b"\x00\x00\x00\x02\x82"),
    "unknown-frame-type": frame(0xEE, 0, 0, b"hello"),
    "garbage-hpack": frame(HEADERS, END_STREAM | END_HEADERS, 1, random.Random(8).randbytes(64)),
    "rst-unopened-stream": frame(RST_STREAM, 0, 9, struct.pack(">I", 8)),
}


@pytest.mark.parametrize("name", [*FATAL_FRAMES, *TOLERATED_FRAMES])
def test_h2_preface_then_garbage_frames(rig: Rig, name: str) -> None:
    base = baseline(rig)
    garbage = FATAL_FRAMES.get(name) or TOLERATED_FRAMES[name]
    opaque = b"robust!!"
    for port, address in rig.grpc_ports.items():
        client = RawClient(address)
        try:
            client.send(PREFACE + frame(SETTINGS, 0, 0) + garbage + frame(PING, 0, 0, opaque))
        except ConnectionError:
            pass
        # the PING answered means the server has read past the garbage and lives with it
        frames, how = client.frames_until(
            lambda f: f.kind == GOAWAY or (f.kind == PING and f.flags & ACK
                                           and f.payload == opaque))
        client.close()
        assert how != "timeout", f"{port}: no GOAWAY, PING ack or hang-up after {name}"
        if name in FATAL_FRAMES:
            assert how == "closed" or frames[-1].kind == GOAWAY, (
                f"{port} answered a PING after {name} instead of hanging up")
    assert_recovered(rig, base)


@pytest.mark.parametrize("shape", ["one-huge-header", "continuation-flood",
                                   "never-ending-headers"])
def test_oversized_header_block_is_refused(rig: Rig, shape: str) -> None:
    base = baseline(rig)
    for port, address in rig.grpc_ports.items():
        call_id = f"huge-{shape}-{port}"
        head = request_headers(UNARY, call_id)
        if shape == "one-huge-header":  # 1 MiB value in HEADERS + 64 CONTINUATION frames
            wire = header_frames(head + literal_header(b"x-big", b"a" * (1 << 20)), 1)
        elif shape == "continuation-flood":  # 40 000 small headers in 1 KiB CONTINUATIONs
            block = head + b"".join(literal_header(b"x-h%d" % i, b"v" * 20)
                                    for i in range(40_000))
            wire = header_frames(block, 1, chunk=1024)
        else:  # CONTINUATION frames and never END_HEADERS
            block = head + b"".join(literal_header(b"x-h%d" % i, b"v" * 500)
                                    for i in range(2000))
            wire = header_frames(block, 1, end_headers=False)
        if shape != "never-ending-headers":
            wire += frame(DATA, END_STREAM, 1, grpc_message(b"x"))
        client = RawClient(address)
        try:
            client.send(PREFACE + frame(SETTINGS, 0, 0) + wire)
        except ConnectionError:
            pass  # hung up on us mid-way: that is a refusal too
        frames, how = client.frames_until(
            lambda f: f.kind in (GOAWAY, RST_STREAM)
            or (f.kind == HEADERS and f.stream_id == 1 and bool(f.flags & END_STREAM)))
        client.close()
        assert how != "timeout", f"{port}: no answer to a {shape} header block"
        status = grpc_status_of(frames, 1)
        assert status != "0", f"{port} accepted a {shape} header block"
        assert call_id not in rig.upstream.calls, f"{port} forwarded a {shape} header block"
    assert_recovered(rig, base)


# --- idle, stalled and vanishing clients ---------------------------------------------------
def test_half_open_connections_do_not_block_service(rig: Rig) -> None:
    base = baseline(rig)
    held: list[RawClient] = []
    try:
        for address in all_ports(rig).values():
            held += [RawClient(address) for _ in range(10)]  # connect, send nothing
        for address in rig.grpc_ports.values():
            for _ in range(10):  # preface, then stall (never ack, never open a stream)
                client = RawClient(address)
                client.send(PREFACE + frame(SETTINGS, 0, 0))
                held.append(client)
            stalled = RawClient(address)  # a stream opened, request never finished
            stalled.send(PREFACE + frame(SETTINGS, 0, 0)
                         + header_frames(request_headers(UNARY, "stalled-" + address), 1))
            held.append(stalled)
        for _ in range(10):  # admin: half a request line, then stall
            client = RawClient(rig.admin)
            client.send(b"GET /ready HTTP/1.1\r\n")
            held.append(client)
        for i in range(3):  # normal calls go on while all of that is held open
            rig.assert_serving(f"while-held-{i}")
        # the measure used by assert_recovered does see held connections
        assert fd_count(rig.pid) > base.fds + len(held) // 2
    finally:
        for client in held:
            client.close()
    assert_recovered(rig, base)


def _raw_call_start(address: str, path: str, call_id: str) -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                                header_encoding="utf-8"))
    conn.initiate_connection()
    conn.send_headers(1, [(":method", "POST"), (":scheme", "http"), (":path", path),
                          (":authority", address), ("te", "trailers"),
                          ("content-type", "application/grpc"), (CALL_ID, call_id),
                          (HOLD, "1")])
    return conn


@pytest.mark.parametrize("how", ["close", "reset"])
@pytest.mark.parametrize("path", [STREAM, UNARY], ids=["stream-shape", "unary-shape"])
def test_client_vanishes_mid_message(rig: Rig, path: str, how: str) -> None:
    """Headers and half of a message frame, then the client is gone (FIN or RST)."""
    base = baseline(rig)
    for port, address in rig.grpc_ports.items():
        call_id = f"vanish-{port}-{path}-{how}-{uuid.uuid4().hex[:6]}"
        conn = _raw_call_start(address, path, call_id)
        conn.send_data(1, b"\x00" + struct.pack(">I", 100) + b"0123456789")
        client = RawClient(address)
        client.send(conn.data_to_send())
        if path == STREAM:  # the sidecar opens the upstream call as soon as headers arrive
            record = rig.upstream.record(call_id)
        client.close(reset=how == "reset")
        if path == STREAM:
            assert record.ended.wait(CANCEL_BOUND + 3), f"{port}: upstream call never ended"
            assert record.cancelled, f"{port}: upstream saw no cancellation"
            assert not record.returned
        else:  # a unary call starts only with a whole request: nothing may reach upstream
            rig.assert_serving(f"after-vanish-{port}")
            assert call_id not in rig.upstream.calls
    assert_recovered(rig, base)


def test_many_connections_opened_and_dropped(rig: Rig) -> None:
    base = baseline(rig)
    ports = list(all_ports(rig).items())
    h2_start = PREFACE + frame(SETTINGS, 0, 0)
    for i in range(200):
        name, address = ports[i % len(ports)]
        client = RawClient(address)
        style = (i // len(ports)) % 4
        try:
            if style == 1 and name != "admin":
                client.send(h2_start)
            elif style == 1:
                client.send(b"GET /ready HTTP/1.1\r\n")
            elif style == 3 and name != "admin":
                client.send(h2_start + header_frames(request_headers(STREAM, f"drop-{i}"), 1))
        except ConnectionError:
            pass
        client.close(reset=style >= 2)
    assert_recovered(rig, base)


# --- cancellation --------------------------------------------------------------------------
@pytest.mark.parametrize("port", ["outbound", "inbound"])
def test_client_cancel_reaches_upstream_unary(rig: Rig, port: str) -> None:
    with grpc.insecure_channel(rig.grpc_ports[port]) as channel:
        call_id = f"cancel-unary-{port}"
        future = unary_future(channel, b"slow", call_id=call_id, hold=True)
        record = rig.upstream.record(call_id)
        cancelled_at = time.monotonic()
        assert future.cancel()
        assert record.ended.wait(CANCEL_BOUND), f"upstream still holds the call ({port})"
        assert record.cancelled and not record.returned
        assert record.ended_at is not None and record.ended_at - cancelled_at < CANCEL_BOUND
    rig.assert_serving()


@pytest.mark.parametrize("port", ["outbound", "inbound"])
def test_client_cancel_reaches_upstream_mid_stream(rig: Rig, port: str) -> None:
    with grpc.insecure_channel(rig.grpc_ports[port]) as channel:
        call_id = f"cancel-stream-{port}"
        stream = OpenStream(channel, call_id=call_id, hold=True)
        assert stream.roundtrip(b"one") == b"one"
        record = rig.upstream.record(call_id)
        assert stream.call.cancel()
        assert record.ended.wait(CANCEL_BOUND), f"upstream still holds the call ({port})"
        assert record.cancelled and not record.returned
        with pytest.raises(grpc.RpcError) as err:
            stream.rest()
        assert err.value.code() is grpc.StatusCode.CANCELLED
    rig.assert_serving()


@pytest.fixture
def raw_paths() -> Iterator[tuple[RawUpstream, dict[str, str]]]:
    """A RawUpstream reached directly, through a sidecar's outbound, and through its inbound."""
    raw = RawUpstream()
    sidecar = start_sidecar(service="raw", app=raw.address, upstreams={"raw": [raw.address]},
                            routes={"*": "raw"}, extra=["--no-learn-method-shapes"],
                            name="sidecar-raw")
    try:
        yield raw, {"direct": raw.address, "outbound": sidecar.addr("outbound"),
                    "inbound": sidecar.addr("inbound")}
    finally:
        assert sidecar.alive(), sidecar.output()
        sidecar.stop()
        raw.stop()


@pytest.mark.parametrize("path", ["direct", "outbound", "inbound"])
def test_client_cancel_reaches_upstream_as_reset_not_half_close(
        raw_paths: tuple[RawUpstream, dict[str, str]], path: str) -> None:
    """A cancelled call must not look finished to the upstream: a half-close first would let
    a client-streaming handler act on a partial request (commit half an upload)."""
    raw, addresses = raw_paths
    with grpc.insecure_channel(addresses[path]) as channel:
        call_id = f"rst-{path}"
        stream = OpenStream(channel, call_id=call_id)
        assert stream.roundtrip(b"one") == b"one"
        assert stream.call.cancel()
        seen = raw.stream(call_id)
        assert seen.closed.wait(CANCEL_BOUND), f"upstream stream still open ({path})"
        assert seen.reset_code == h2.errors.ErrorCodes.CANCEL, seen
        assert not seen.ended, f"upstream got END_STREAM (a half-close) before the cancel ({path})"


@pytest.mark.parametrize("port", ["outbound", "inbound"])
def test_upstream_cancel_reaches_client(rig: Rig, port: str) -> None:
    with grpc.insecure_channel(rig.grpc_ports[port]) as channel:
        stream = OpenStream(channel, call_id=f"upstream-cancels-{port}")
        assert stream.roundtrip(b"one") == b"one"
        stream.send(RESET_MESSAGE)
        with pytest.raises(grpc.RpcError) as err:
            stream.rest()
        assert err.value.code() is grpc.StatusCode.CANCELLED
        assert err.value.details() == "upstream cancelled the call"
    rig.assert_serving()


@pytest.mark.parametrize("path", ["direct", "outbound", "inbound"])
def test_upstream_reset_reaches_client(raw_paths: tuple[RawUpstream, dict[str, str]],
                                       path: str) -> None:
    _raw, addresses = raw_paths
    with grpc.insecure_channel(addresses[path]) as channel:
        stream = OpenStream(channel, call_id=f"upstream-resets-{path}")
        assert stream.roundtrip(b"one") == b"one"
        stream.send(RESET_MESSAGE)  # the upstream answers with RST_STREAM(CANCEL)
        with pytest.raises(grpc.RpcError) as err:
            stream.rest()
        assert err.value.code() is grpc.StatusCode.CANCELLED
