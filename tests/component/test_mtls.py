"""mTLS between sidecars over real TLS on 127.0.0.1: a grpc.aio server with the sidecar's inbound
credentials (sidecar/tls.py), clients with its channel credentials and name override, and
certificates from an in-test CA (tests/pki.py).

What a user would see: a bad peer (wrong CA, expired, another service's certificate, no client
certificate, plaintext) fails with UNAVAILABLE and nothing reaches the app, which counts its
calls; the app learns the caller's SPIFFE ID from the handshake, never from a header; and a
certificate rotation under load fails no call and breaks no stream. Also the sidecar's CA client
(sidecar/identity.py) against a real CertificateService server.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import tempfile
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from cryptography import x509
from mesh.v1 import ca_pb2, ca_pb2_grpc

from sidecar.identity import (
    CertificateSource,
    GrpcSigner,
    Identity,
    IdentityError,
    IdentityProvider,
    StaticCertificateSource,
    dns_name,
)
from sidecar.tls import (
    UpstreamTls,
    channel_credentials,
    channel_options,
    peer_identity,
    peer_service,
    server_credentials,
)
from tests.pki import TRUST_DOMAIN, TestCA

UNARY = "/test.App/Unary"
STREAM = "/test.App/Stream"
ORDERS_ID = f"spiffe://{TRUST_DOMAIN}/service/orders"
TIMEOUT = 5.0


class App(grpc.GenericRpcHandler):
    """The app behind the inbound listener: answers with the caller's proven identity and
    counts every call that reaches it."""

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
        who = peer_identity(context) or "-"
        service = peer_service(context, TRUST_DOMAIN) or "-"
        return f"{who}|{service}|".encode() + request

    async def _stream(self, requests: AsyncIterator[bytes],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        self.calls += 1
        async for message in requests:
            yield message


@contextlib.asynccontextmanager
async def serving(source: IdentityProvider | None, app: App | None = None
                  ) -> AsyncIterator[tuple[str, App]]:
    """The app on an mTLS port following `source` (or a plaintext port when None)."""
    app = app or App()
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((app,))
    if source is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", server_credentials(source))
    await server.start()
    try:
        yield f"127.0.0.1:{port}", app
    finally:
        await server.stop(0)


def mtls_channel(address: str, client: Identity, service: str = "payments"
                 ) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(address, channel_credentials(client),
                                   options=channel_options(service, TRUST_DOMAIN))


async def call(channel: grpc.aio.Channel, payload: bytes = b"hi",
               metadata: tuple[tuple[str, str], ...] = ()) -> bytes:
    return await channel.unary_unary(UNARY)(payload, timeout=TIMEOUT, metadata=metadata)


async def rejected(channel: grpc.aio.Channel) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(channel)
    await channel.close()
    return info.value


# --- the good path and what the app learns ------------------------------------------------------


def test_mtls_call_carries_the_callers_proven_identity_not_a_header() -> None:
    ca = TestCA()

    async def main() -> None:
        async with serving(StaticCertificateSource(ca.issue("payments"))) as (address, app):
            channel = mtls_channel(address, ca.issue("orders"))
            forged = (("x-forwarded-client-cert", "URI=spiffe://mesh.local/service/admin"),
                      ("x-mesh-caller", "admin"))
            assert await call(channel, b"hi", forged) == f"{ORDERS_ID}|orders|hi".encode()
            stream = channel.stream_stream(STREAM)(iter([b"a", b"b"]), timeout=TIMEOUT)
            assert [m async for m in stream] == [b"a", b"b"]
            await channel.close()
            assert app.calls == 2

    asyncio.run(main())


def test_certificates_without_one_spiffe_id_give_no_identity() -> None:
    ca = TestCA()

    async def main() -> None:
        async with serving(StaticCertificateSource(ca.issue("payments"))) as (address, _app):
            for odd in (ca.issue("orders", uris=[]),
                        ca.issue("orders", uris=[ORDERS_ID, "spiffe://mesh.local/service/x"])):
                channel = grpc.aio.secure_channel(
                    address, grpc.ssl_channel_credentials(ca.pem, odd.private_key_pem,
                                                          odd.certificate_chain_pem),
                    options=channel_options("payments", TRUST_DOMAIN))
                assert await call(channel) == b"-|-|hi"
                await channel.close()

    asyncio.run(main())


def test_plaintext_listener_has_no_peer_identity() -> None:
    async def main() -> None:
        async with serving(None) as (address, app):
            async with grpc.aio.insecure_channel(address) as channel:
                forged = (("x-forwarded-client-cert", f"URI={ORDERS_ID}"),)
                assert await call(channel, b"x", forged) == b"-|-|x"
            assert app.calls == 1

    asyncio.run(main())


def test_one_server_with_an_mtls_port_and_a_plaintext_port_as_in_permissive_mode() -> None:
    """PERMISSIVE: the same handler behind both ports; only the mTLS one proves identities,
    and it still refuses plaintext."""
    ca = TestCA()

    async def main() -> None:
        app = App()
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        server.add_generic_rpc_handlers((app,))
        tls_port = server.add_secure_port(
            "127.0.0.1:0", server_credentials(StaticCertificateSource(ca.issue("payments"))))
        plain_port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            channel = mtls_channel(f"127.0.0.1:{tls_port}", ca.issue("orders"))
            assert await call(channel) == f"{ORDERS_ID}|orders|hi".encode()
            await channel.close()
            async with grpc.aio.insecure_channel(f"127.0.0.1:{plain_port}") as plain:
                assert await call(plain) == b"-|-|hi"
            err = await rejected(grpc.aio.insecure_channel(f"127.0.0.1:{tls_port}"))
            assert err.code() is grpc.StatusCode.UNAVAILABLE
            assert app.calls == 2
        finally:
            await server.stop(0)

    asyncio.run(main())


# --- rejected peers: UNAVAILABLE, and nothing reaches the app -----------------------------------


def test_bad_peers_are_rejected_before_the_app() -> None:
    ca, other_ca = TestCA("mesh root"), TestCA("someone else's root")

    async def main() -> None:
        async with serving(StaticCertificateSource(ca.issue("payments"))) as (address, app):
            cases: dict[str, grpc.aio.Channel] = {
                # client certificate from a CA the server does not trust
                "client from wrong CA": mtls_channel(
                    address, other_ca.issue("orders", bundle=(ca.pem,))),
                # client does not trust the server's CA
                "server from wrong CA": mtls_channel(address, other_ca.issue("orders")),
                "expired client certificate": mtls_channel(
                    address, ca.issue("orders", expired=True)),
                # the server holds a payments certificate; the caller wanted inventory
                "another service's certificate": mtls_channel(
                    address, ca.issue("orders"), service="inventory"),
                "no client certificate": grpc.aio.secure_channel(
                    address, grpc.ssl_channel_credentials(ca.pem),
                    options=channel_options("payments", TRUST_DOMAIN)),
                "plaintext to the TLS port": grpc.aio.insecure_channel(address),
            }
            for what, channel in cases.items():
                err = await rejected(channel)
                assert err.code() is grpc.StatusCode.UNAVAILABLE, (what, err)
            assert app.calls == 0
            good = mtls_channel(address, ca.issue("orders"))
            assert await call(good) == f"{ORDERS_ID}|orders|hi".encode()
            await good.close()
            assert app.calls == 1

    asyncio.run(main())


def test_expired_or_misnamed_server_certificates_are_rejected_by_the_caller() -> None:
    ca = TestCA()

    async def main() -> None:
        for server in (ca.issue("payments", expired=True), ca.issue("inventory")):
            async with serving(StaticCertificateSource(server)) as (address, app):
                err = await rejected(mtls_channel(address, ca.issue("orders")))
                assert err.code() is grpc.StatusCode.UNAVAILABLE
                assert app.calls == 0

    asyncio.run(main())


def test_no_certificate_no_listener() -> None:
    class Empty:
        version = 0

        def current(self) -> None:
            return None

        def subscribe(self, _listener: Any) -> Any:
            return lambda: None

    with pytest.raises(IdentityError, match="no certificate yet"):
        server_credentials(Empty())
    # upstream channels can be made before the first certificate: with credentials no
    # server trusts (the pool renews them when the certificate arrives)
    assert isinstance(UpstreamTls(Empty(), TRUST_DOMAIN).credentials(), grpc.ChannelCredentials)


# --- rotation -----------------------------------------------------------------------------------


def served_certificate(address: str, client: Identity, server_name: str) -> x509.Certificate:
    """The certificate the server presents to a new connection (Python's own TLS client)."""
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
        with open(cert, "wb") as f:
            f.write(client.certificate_chain_pem)
        with open(key, "wb") as f:
            f.write(client.private_key_pem)
        context = ssl.create_default_context(cadata=client.bundle_pem.decode())
        context.load_cert_chain(cert, key)
        context.set_alpn_protocols(["h2"])
        host, port = address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=TIMEOUT) as raw, \
                context.wrap_socket(raw, server_hostname=server_name) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


class Pool:
    """What the sidecar's channel pool does with UpstreamTls: channels keyed on the identity
    generation, so a rotation makes new channels for new calls while old ones keep theirs."""

    def __init__(self, address: str, tls: UpstreamTls) -> None:
        self.address, self.tls = address, tls
        self.channels: dict[int, grpc.aio.Channel] = {}

    def get(self) -> grpc.aio.Channel:
        generation = self.tls.generation
        channel = self.channels.get(generation)
        if channel is None:
            channel = self.channels[generation] = grpc.aio.secure_channel(
                self.address, self.tls.credentials(), options=self.tls.options("payments"))
        return channel

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.channels.values()))


def test_rotation_under_load_fails_no_call_and_keeps_the_stream() -> None:
    old_root, new_root = TestCA("root 1"), TestCA("root 2")
    both = (old_root.pem, new_root.pem)
    server_source = StaticCertificateSource(old_root.issue("payments"))
    client_source = StaticCertificateSource(old_root.issue("orders"))
    new_server = new_root.issue("payments", bundle=both)
    new_client = new_root.issue("orders", bundle=both)
    failures: list[str] = []
    counts = {"unary": 0, "stream": 0, "unary_after": 0}

    async def main() -> None:
        done_rotating = asyncio.Event()
        async with serving(server_source) as (address, app):
            pool = Pool(address, UpstreamTls(client_source, TRUST_DOMAIN))
            stream_channel = pool.get()
            stream = stream_channel.stream_stream(STREAM)(timeout=60)
            deadline = time.monotonic() + 20  # bounded in time and in count

            async def unary_load(worker: int) -> None:
                for i in range(3000):
                    if time.monotonic() > deadline or (done_rotating.is_set()
                                                       and counts["unary_after"] >= 200):
                        return
                    after = done_rotating.is_set()
                    try:
                        reply = await call(pool.get(), f"{worker}-{i}".encode())
                        assert reply == f"{ORDERS_ID}|orders|{worker}-{i}".encode()
                        counts["unary"] += 1
                        counts["unary_after"] += after
                    except Exception as err:
                        failures.append(f"unary {worker}-{i}: {err!r}")

            async def stream_load() -> None:
                i = 0
                while time.monotonic() < deadline and i < 5000 and not (
                        done_rotating.is_set() and counts["unary_after"] >= 200):
                    message = f"s{i}".encode()
                    try:
                        await stream.write(message)
                        assert await stream.read() == message
                        counts["stream"] += 1
                    except Exception as err:
                        failures.append(f"stream {i}: {err!r}")
                        return
                    i += 1

            async def until(unary: int, stream: int) -> bool:
                while counts["unary"] < unary or counts["stream"] < stream:
                    if time.monotonic() > deadline:
                        return False
                    await asyncio.sleep(0.01)
                return True

            async def rotate() -> None:
                if not await until(100, 20):  # under load
                    return
                # the new root first (both trusted), then the new certificates
                server_source.set(old_root.issue("payments", bundle=both))
                client_source.set(old_root.issue("orders", bundle=both))
                if not await until(counts["unary"] + 100, counts["stream"] + 20):
                    return
                server_source.set(new_server)
                client_source.set(new_client)
                done_rotating.set()

            await asyncio.gather(stream_load(), rotate(), *(unary_load(w) for w in range(3)))
            assert done_rotating.is_set(), "load never got going"
            assert not failures, failures[:5]
            assert counts["unary_after"] >= 200 and counts["stream"] >= 40, counts
            await stream.done_writing()
            assert await stream.code() is grpc.StatusCode.OK  # the stream survived
            assert len(pool.channels) == 3  # new channels for new calls after each change
            assert app.calls == counts["unary"] + 1

            # new connections see the new certificate ...
            served = await asyncio.to_thread(served_certificate, address, new_client,
                                             dns_name(TRUST_DOMAIN, "payments"))
            assert served.serial_number == new_server.serial
            only_new = grpc.aio.secure_channel(
                address, grpc.ssl_channel_credentials(new_root.pem, new_client.private_key_pem,
                                                      new_client.certificate_chain_pem),
                options=channel_options("payments", TRUST_DOMAIN))
            assert await call(only_new) == f"{ORDERS_ID}|orders|hi".encode()
            await only_new.close()
            # ... and one trusting only the old root no longer gets a certificate it trusts
            err = await rejected(mtls_channel(address, old_root.issue("orders")))
            assert err.code() is grpc.StatusCode.UNAVAILABLE
            # the first channel (its connection made before the rotation) still works
            assert await call(stream_channel, b"old") == f"{ORDERS_ID}|orders|old".encode()
            await pool.close()

    asyncio.run(main())


# --- the sidecar's CA client against a real CertificateService ----------------------------------


class CertificateService(ca_pb2_grpc.CertificateServiceServicer):
    """Enough of the mesh CA: bearer-token check, then signs what the CSR names."""

    def __init__(self, ca: TestCA, token: str, ttl: float) -> None:
        self.ca, self.token, self.ttl = ca, token, ttl
        self.issued = 0

    async def Sign(self, request: ca_pb2.SignRequest, context: grpc.aio.ServicerContext
                   ) -> ca_pb2.SignResponse:
        metadata = dict(context.invocation_metadata() or ())
        if metadata.get("authorization") != f"Bearer {self.token}":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown bootstrap token")
        self.issued += 1
        pem = self.ca.sign_csr(request.csr_pem, now=time.time(), ttl=self.ttl)
        return ca_pb2.SignResponse(certificate_pem=pem, trust_bundle_pem=[self.ca.pem.decode()])

    async def TrustBundle(self, request: ca_pb2.TrustBundleRequest,
                          context: grpc.aio.ServicerContext) -> ca_pb2.TrustBundleResponse:
        return ca_pb2.TrustBundleResponse(trust_bundle_pem=[self.ca.pem.decode()],
                                          trust_domain=TRUST_DOMAIN)


def test_certificate_source_gets_certificates_from_the_ca_and_they_work_for_mtls() -> None:
    ca = TestCA()
    service = CertificateService(ca, token="s3cret", ttl=600)

    async def main() -> None:
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        ca_pb2_grpc.add_CertificateServiceServicer_to_server(service, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as control_plane:
            refused = CertificateSource("orders", TRUST_DOMAIN,
                                        GrpcSigner(control_plane, "wrong"), bundle_interval=None)
            refused.start()
            with pytest.raises(IdentityError, match="UNAUTHENTICATED: unknown bootstrap token"):
                await refused.wait_ready(2.0)
            await refused.close()
            assert service.issued == 0

            payments = CertificateSource("payments", TRUST_DOMAIN,
                                         GrpcSigner(control_plane, "s3cret"))
            orders = CertificateSource("orders", TRUST_DOMAIN,
                                       GrpcSigner(control_plane, "s3cret"))
            for source in (payments, orders):
                source.start()
                await source.wait_ready(5.0)
                assert source.next_refresh_at is not None
                assert 240 <= source.next_refresh_at - time.time() <= 360  # half of 600 s
            assert await orders.refresh_bundle() is False  # same roots
            async with serving(payments) as (address, app):
                tls = UpstreamTls(orders, TRUST_DOMAIN)
                async with grpc.aio.secure_channel(address, tls.credentials(),
                                                   options=tls.options("payments")) as channel:
                    assert await call(channel) == f"{ORDERS_ID}|orders|hi".encode()
                assert app.calls == 1
            await payments.close()
            await orders.close()
        await server.stop(0)

    asyncio.run(main())
