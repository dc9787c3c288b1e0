"""The sidecar's upstream channel pool with a workload identity (sidecar/upstream/pool.py), against
a real TLS server on 127.0.0.1 that requires client certificates (the sidecar's own inbound
credentials, sidecar/tls.py) and certificates from the in-test CA (tests/pki.py).

What the caller and the server see: an mTLS call works and the server learns the caller's
certificate from the handshake; after a new identity (renewal, a trust bundle from the config,
the first certificate after a placeholder) new calls go over a new connection with the new
certificate, while a stream opened before keeps its connection to its end, and that old
connection is closed once the stream is over; a server holding another service's certificate is
refused by the handshake with UNAVAILABLE before anything reaches its app.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

import grpc
import pytest
from cryptography import x509

from sidecar.identity import (
    CertificateSource,
    Identity,
    IdentityProvider,
    SignResult,
    StaticCertificateSource,
)
from sidecar.tls import UpstreamTls, server_credentials
from sidecar.upstream.pool import ChannelPool
from tests.pki import TRUST_DOMAIN, TestCA

UNARY = "/test.App/Serial"  # answers with the serial of the caller's certificate
STREAM = "/test.App/Stream"  # echoes each message with that serial
PAYMENTS = f"payments.svc.{TRUST_DOMAIN}"
TIMEOUT = 5.0


def _peer_serial(context: grpc.aio.ServicerContext) -> bytes:
    pem = context.auth_context()["x509_pem_cert"][0]
    return b"%x" % x509.load_pem_x509_certificate(pem).serial_number


class App(grpc.GenericRpcHandler):
    def __init__(self) -> None:
        self.calls = 0

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = details.method  # type: ignore[attr-defined]
        if method == UNARY:
            return grpc.unary_unary_rpc_method_handler(self._unary)
        if method == STREAM:
            return grpc.stream_stream_rpc_method_handler(self._stream)
        return None

    async def _unary(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.calls += 1
        return _peer_serial(context)

    async def _stream(self, requests: AsyncIterator[bytes],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        self.calls += 1
        serial = _peer_serial(context)
        async for message in requests:
            yield message + b"|" + serial


@contextlib.asynccontextmanager
async def serving(source: IdentityProvider) -> AsyncIterator[tuple[str, int, App]]:
    app = App()
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((app,))
    port = server.add_secure_port("127.0.0.1:0", server_credentials(source))
    await server.start()
    try:
        yield f"127.0.0.1:{port}", port, app
    finally:
        await server.stop(0)


def serial(source: IdentityProvider) -> bytes:
    identity = source.current()
    assert identity is not None
    return b"%x" % identity.serial


def connections_to(port: int) -> int:
    """Established TCP connections to 127.0.0.1:`port` (client ends, as the kernel lists them)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):  # grpc-core may use v4-mapped sockets
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                remote, state = fields[2], fields[3]
                if state == "01" and int(remote.rsplit(":", 1)[1], 16) == port:
                    count += 1
    return count


async def until(predicate: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def pool_for(source: IdentityProvider) -> ChannelPool:
    return ChannelPool([("grpc.enable_retries", 0)], tls=UpstreamTls(source, TRUST_DOMAIN))


def renew_on_change(pool: ChannelPool, source: IdentityProvider) -> None:
    """What runtime.Sidecar._identity_changed does with the pool."""

    def changed(_identity: Identity) -> None:
        pool.identity_changed()

    source.subscribe(changed)


def test_rotation_moves_new_calls_to_a_new_connection_and_keeps_the_open_stream() -> None:
    ca = TestCA()
    client = StaticCertificateSource(ca.issue("orders"))
    first = serial(client)

    async def main() -> None:
        async with serving(StaticCertificateSource(ca.issue("payments"))) as (address, port, app):
            pool = pool_for(client)
            upstream = pool.get(address, PAYMENTS)
            assert await upstream.unary(UNARY)(b"", timeout=TIMEOUT) == first
            stream = upstream.stream(STREAM)(timeout=30)
            await stream.write(b"a")
            assert await stream.read() == b"a|" + first
            old = upstream.channel
            assert connections_to(port) == 1

            client.set(ca.issue("orders"))  # a renewal: new key, new certificate
            second = serial(client)
            assert second != first
            assert pool.identity_changed() == 1
            assert pool.get(address, PAYMENTS) is upstream  # same endpoint, same pool entry
            assert upstream.channel is not old

            # new calls: a new connection, with the new certificate
            assert await upstream.unary(UNARY)(b"", timeout=TIMEOUT) == second
            assert connections_to(port) == 2
            # the stream opened before: its connection and certificate, to its end
            for message in (b"b", b"c"):
                await stream.write(message)
                assert await stream.read() == message + b"|" + first
            assert old.get_state() is not grpc.ChannelConnectivity.SHUTDOWN
            await stream.done_writing()
            assert await stream.code() is grpc.StatusCode.OK
            del stream  # as the proxy's call handler does when it returns: a finished call
            # object still alive keeps its connection referenced in grpc-core

            # ... after which the old channel is closed and its connection goes away
            await until(lambda: old.get_state() is grpc.ChannelConnectivity.SHUTDOWN,
                        "the old channel to shut down")
            await until(lambda: connections_to(port) == 1, "the old connection to close")
            assert await upstream.unary(UNARY)(b"", timeout=TIMEOUT) == second
            assert app.calls == 4
            assert pool.identity_changed() == 0  # nothing new: nothing renewed
            await pool.close(0)

    asyncio.run(main())


def test_a_rotation_without_open_calls_closes_the_old_connection_at_once() -> None:
    ca = TestCA()
    client = StaticCertificateSource(ca.issue("orders"))

    async def main() -> None:
        async with serving(StaticCertificateSource(ca.issue("payments"))) as (address, port, _):
            pool = pool_for(client)
            upstream = pool.get(address, PAYMENTS)
            plain_key = pool.get(address)  # the same address in plaintext: not renewed
            await upstream.unary(UNARY)(b"", timeout=TIMEOUT)
            old = upstream.channel
            client.set(ca.issue("orders"))
            assert pool.identity_changed() == 1
            assert plain_key.channel is not None
            await until(lambda: old.get_state() is grpc.ChannelConnectivity.SHUTDOWN,
                        "the idle old channel to shut down")
            await until(lambda: connections_to(port) == 0, "the old connection to close")
            assert await upstream.unary(UNARY)(b"", timeout=TIMEOUT) == serial(client)
            await pool.close(0)

    asyncio.run(main())


def test_a_server_with_another_services_certificate_is_refused_by_the_handshake() -> None:
    ca = TestCA()
    client = StaticCertificateSource(ca.issue("orders"))

    async def main() -> None:
        async with serving(StaticCertificateSource(ca.issue("inventory"))) as (address, _, app):
            pool = pool_for(client)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await pool.get(address, PAYMENTS).unary(UNARY)(b"", timeout=TIMEOUT)
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE
            # the right name for that server works: it was the name, not the certificates
            inventory = pool.get(address, f"inventory.svc.{TRUST_DOMAIN}")
            assert await inventory.unary(UNARY)(b"", timeout=TIMEOUT) == serial(client)
            assert app.calls == 1
            await pool.close(0)

    asyncio.run(main())


def test_a_trust_bundle_from_the_config_renews_the_channels() -> None:
    """A root rotation reaches the caller with the config before its own renewal: the server
    already shows a certificate of the new root, which the caller trusts once the bundle is
    replaced (the sidecar does this on every config, runtime._trust_bundle_from)."""
    old_root, new_root = TestCA("root 1"), TestCA("root 2")
    both = (old_root.pem, new_root.pem)
    client = StaticCertificateSource(old_root.issue("orders"))  # trusts the old root only

    async def main() -> None:
        server = StaticCertificateSource(new_root.issue("payments", bundle=both))
        async with serving(server) as (address, _, app):
            pool = pool_for(client)
            renew_on_change(pool, client)  # as the sidecar does
            upstream = pool.get(address, PAYMENTS)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await upstream.unary(UNARY)(b"", timeout=TIMEOUT)
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE
            assert client.replace_trust_bundle(both)
            assert await upstream.unary(UNARY)(b"", timeout=TIMEOUT) == serial(client)
            assert app.calls == 1
            await pool.close(0)

    asyncio.run(main())


class Signer:
    """The mesh CA without a network, answering only when told to."""

    def __init__(self, ca: TestCA) -> None:
        self.ca = ca

    async def trust_domain(self) -> str:
        return self.ca.trust_domain

    async def sign(self, csr_pem: str) -> SignResult:
        return SignResult(self.ca.sign_csr(csr_pem, now=time.time(), ttl=600),
                          (self.ca.pem.decode(),))

    async def trust_bundle(self) -> tuple[str, ...]:
        return (self.ca.pem.decode(),)


def test_channels_made_before_the_first_certificate_work_once_it_arrives() -> None:
    ca = TestCA()
    client = CertificateSource("orders", "", Signer(ca), bundle_interval=None)

    async def main() -> None:
        async with serving(StaticCertificateSource(ca.issue("payments"))) as (address, _, app):
            pool = pool_for(client)
            renew_on_change(pool, client)
            upstream = pool.get(address, PAYMENTS)  # placeholder credentials
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await upstream.unary(UNARY)(b"", timeout=TIMEOUT)
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE
            assert app.calls == 0
            assert await client.refresh()  # the first certificate, trust domain asked first
            assert await upstream.unary(UNARY)(b"", timeout=TIMEOUT) == serial(client)
            assert app.calls == 1
            await pool.close(0)

    asyncio.run(main())
