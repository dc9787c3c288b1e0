"""Shutdown as an operator sees it: SIGTERM (or Ctrl-C) drains the sidecar.

Calls in flight finish, nothing new gets in (connections refused, or calls UNAVAILABLE so
clients retry elsewhere), /ready says 503 while draining so a load balancer stops sending, and
the process exits 0: as soon as the last call ends, or once --drain-timeout has passed, cutting
off whatever is still running.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable

import grpc
import pytest

from tests.component.conftest import (
    STREAM,
    OpenStream,
    Rig,
    admin_get,
    unary,
    unary_future,
)
from tests.harness import wait_for

SIGNALS = [signal.SIGTERM, signal.SIGINT]
EXIT_MARGIN = 3.0  # seconds past the point the sidecar should be gone
PROMPT_EXIT = 2.0  # with nothing in flight, a drain should be over in well under this
PREFACE_AND_SETTINGS = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes(
    [0, 0, 0, 4, 0, 0, 0, 0, 0])


def _exit_code_within(rig: Rig, seconds: float) -> int:
    try:
        return rig.sidecar.proc.wait(seconds)
    except subprocess.TimeoutExpired:
        pass
    pytest.fail(f"sidecar still running {seconds}s later:\n{rig.sidecar.output()}")


def _assert_refuses_new_calls(rig: Rig, channels: dict[str, grpc.Channel], tag: str) -> None:
    """New calls fail UNAVAILABLE (retryable) and never reach the upstream, both on a fresh
    connection and on a connection opened before the drain."""
    for port, address in rig.grpc_ports.items():
        fresh = f"{tag}-fresh-{port}"
        with pytest.raises(grpc.RpcError) as err:
            unary(address, b"late", call_id=fresh, timeout=3)
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE, err.value
        reused = f"{tag}-reused-{port}"
        with pytest.raises(grpc.RpcError) as err:
            unary(address, b"late", call_id=reused, timeout=3, channel=channels[port])
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE, err.value
        assert fresh not in rig.upstream.calls and reused not in rig.upstream.calls


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_drain_lets_calls_in_flight_finish(rig_factory: Callable[..., Rig],
                                           sig: signal.Signals) -> None:
    drain_timeout = 8.0
    rig = rig_factory("--drain-timeout", str(drain_timeout))
    rig.assert_serving()
    channels = {port: grpc.insecure_channel(a) for port, a in rig.grpc_ports.items()}
    try:
        unaries, streams = {}, {}
        # both call shapes in flight on both ports (UNARY takes the sidecar's unary path)
        for port, channel in channels.items():
            unaries[port] = unary_future(channel, f"slow-{port}".encode(),
                                         call_id=f"held-{port}", hold=True)
            streams[port] = OpenStream(channel, STREAM, call_id=f"stream-{port}")
            assert streams[port].roundtrip(b"before") == b"before"
            rig.upstream.record(f"held-{port}")

        signalled = time.monotonic()
        rig.sidecar.signal(sig)
        wait_for(lambda: admin_get(rig.admin, "/ready")[0] == 503, timeout=3,
                 what="/ready to say 503 while draining")
        _assert_refuses_new_calls(rig, channels, "during-drain")
        for port, stream in streams.items():  # calls in flight still work both ways
            assert stream.roundtrip(b"during") == b"during", port
        assert rig.sidecar.alive(), "sidecar exited with calls in flight"

        for port in channels:
            rig.upstream.release(f"held-{port}")
            assert unaries[port].result(5) == f"slow-{port}".encode()
            streams[port].half_close()
            assert streams[port].rest() == []
        finished = time.monotonic()
    finally:
        for channel in channels.values():
            channel.close()
    # exits once idle: well before the drain timeout runs out
    assert _exit_code_within(rig, PROMPT_EXIT) == 0, rig.sidecar.output()
    assert time.monotonic() - signalled < drain_timeout, "drain waited for its full timeout"
    assert time.monotonic() - finished < PROMPT_EXIT


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_drain_cuts_off_calls_that_outlive_the_timeout(rig_factory: Callable[..., Rig],
                                                       sig: signal.Signals) -> None:
    drain_timeout = 1.0
    rig = rig_factory("--drain-timeout", str(drain_timeout))
    rig.assert_serving()
    with grpc.insecure_channel(rig.outbound) as out, grpc.insecure_channel(rig.inbound) as inb:
        held = unary_future(out, b"forever", call_id="forever-unary", hold=True)
        stream = OpenStream(inb, STREAM, call_id="forever-stream", hold=True)
        assert stream.roundtrip(b"one") == b"one"
        records = [rig.upstream.record("forever-unary"), rig.upstream.record("forever-stream")]

        signalled = time.monotonic()
        rig.sidecar.signal(sig)
        with pytest.raises(grpc.RpcError) as unary_err:
            held.result(drain_timeout + EXIT_MARGIN)
        with pytest.raises(grpc.RpcError) as stream_err:
            stream.rest()
        cut_off_after = time.monotonic() - signalled
    for err in (unary_err.value, stream_err.value):
        assert err.code() is grpc.StatusCode.UNAVAILABLE, err
    assert drain_timeout * 0.9 <= cut_off_after < drain_timeout + EXIT_MARGIN, cut_off_after
    for record in records:  # the upstream is told too, not left holding the calls
        assert record.ended.wait(EXIT_MARGIN) and record.cancelled, record
    assert _exit_code_within(rig, EXIT_MARGIN) == 0, rig.sidecar.output()
    assert time.monotonic() - signalled < drain_timeout + EXIT_MARGIN


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_idle_channels_do_not_hold_up_the_drain(rig_factory: Callable[..., Rig],
                                                sig: signal.Signals) -> None:
    """An app's connected but idle channel, and an idle admin connection, must not keep the
    process for the drain timeout: with no call in flight the drain is over at once."""
    rig = rig_factory("--drain-timeout", "8")
    with grpc.insecure_channel(rig.outbound) as out, grpc.insecure_channel(rig.inbound) as inb:
        for address, channel in ((rig.outbound, out), (rig.inbound, inb)):
            assert unary(address, b"warm", channel=channel) == b"warm"  # connected, now idle
        host, port = rig.admin.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5):
            signalled = time.monotonic()
            rig.sidecar.signal(sig)
            assert _exit_code_within(rig, PROMPT_EXIT) == 0, rig.sidecar.output()
            assert time.monotonic() - signalled < PROMPT_EXIT


def _accepted(pid: int, socks: list[socket.socket]) -> bool:
    """Whether process `pid` holds the server side of every one of `socks` (matched by the
    client's port in /proc/net/tcp, then by socket inode among the process's fds)."""
    client_ports = {s.getsockname()[1] for s in socks}
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                if remote_port in client_ports:
                    inodes.add(fields[9])
    held = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            held.add(target[8:-1])
    return len(inodes & held) >= len(socks)


@pytest.mark.parametrize("handshake", [b"", PREFACE_AND_SETTINGS], ids=["silent", "preface-only"])
def test_stray_connections_do_not_hold_up_the_drain(rig_factory: Callable[..., Rig],
                                                    handshake: bytes) -> None:
    """A client that connected to a gRPC port and never sends a call (a TCP health check, a
    port scanner, a stalled peer) ignores GOAWAY and never closes; with no call in flight it
    must not keep the sidecar alive until --drain-timeout."""
    rig = rig_factory("--drain-timeout", "5")
    rig.assert_serving()
    stray = []
    try:
        for address in rig.grpc_ports.values():
            host, port = address.rsplit(":", 1)
            sock = socket.create_connection((host, int(port)), timeout=5)
            if handshake:
                sock.sendall(handshake)
                assert len(sock.recv(9)) == 9  # the server's SETTINGS: it took the connection
            stray.append(sock)
        wait_for(lambda: _accepted(rig.pid, stray),
                 what="the sidecar to accept the stray connections")
        signalled = time.monotonic()
        rig.sidecar.signal(signal.SIGTERM)
        assert _exit_code_within(rig, PROMPT_EXIT) == 0, rig.sidecar.output()
        assert time.monotonic() - signalled < PROMPT_EXIT
    finally:
        for sock in stray:
            sock.close()
