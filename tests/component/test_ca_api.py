"""The CA API on a real grpc.aio server (127.0.0.1:0) over the state dir, and meshctl's token
and ca commands as a user runs them (subprocesses).

What a caller sees: status codes and messages, that a refused request issues nothing and
stores nothing, that an issued certificate verifies against the bundle with the right names
and lifetime, and that two workloads holding such certificates complete a real mTLS handshake
in grpcio in which the server learns the client's SPIFFE ID from the peer certificate.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from mesh.v1 import ca_pb2, ca_pb2_grpc

from control_plane import ca_api
from control_plane.ca import CertificateAuthority, FileState, TokenStore
from tests.component.test_meshctl import meshctl, no_traceback, ok

DOMAIN = "pymesh.local"
TIMEOUT = 5.0
TTL = 2 * 3600.0


class CaUnderTest:
    """The three CA services over a FileState in `state_dir`, served from an event-loop thread
    so that sync clients and meshctl subprocesses can call them."""

    def __init__(self, state_dir: Path) -> None:
        self.state = FileState(state_dir)
        self.ca = CertificateAuthority(self.state, trust_domain=lambda: DOMAIN, ttl=TTL)
        self.tokens = TokenStore(self.state)
        self.ca.start()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="ca-under-test")
        self._thread.start()
        self.address: str = self._call(self._start())
        self.channel = grpc.insecure_channel(self.address)
        self.certs = ca_pb2_grpc.CertificateServiceStub(self.channel)
        self.token_api = ca_pb2_grpc.TokenServiceStub(self.channel)

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _start(self) -> str:
        self._server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        ca_api.add_to_server(self._server, self.ca, self.tokens)
        port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        return f"127.0.0.1:{port}"

    def stop(self) -> None:
        self.channel.close()
        self._call(self._server.stop(0))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def files(self) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(self.state.dir.iterdir())}

    def sign(self, csr: str, token: str | None, metadata: tuple[tuple[str, str], ...] = ()
             ) -> ca_pb2.SignResponse:
        md = metadata or ((("authorization", f"Bearer {token}"),) if token else ())
        return self.certs.Sign(ca_pb2.SignRequest(csr_pem=csr), timeout=TIMEOUT, metadata=md)

    def create_token(self, *services: str) -> tuple[str, str]:
        response = self.token_api.Create(ca_pb2.CreateTokenRequest(services=list(services)),
                                         timeout=TIMEOUT)
        return response.secret, response.token.id


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[CaUnderTest]:
    cp = CaUnderTest(tmp_path / "state")
    try:
        yield cp
    finally:
        cp.stop()


def new_csr(service: str, domain: str = DOMAIN) -> tuple[ec.EllipticCurvePrivateKey, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
           .add_extension(x509.SubjectAlternativeName([
               x509.UniformResourceIdentifier(f"spiffe://{domain}/service/{service}")]),
               critical=False)
           .sign(key, hashes.SHA256()))
    return key, csr.public_bytes(serialization.Encoding.PEM).decode()


def refused(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def assert_nothing_issued(plane: CaUnderTest, before: dict[str, bytes]) -> None:
    assert plane.ca.issued == 0
    assert plane.files() == before


# --- Sign ---------------------------------------------------------------------------------------
def test_a_valid_csr_gets_a_certificate_that_verifies_against_the_bundle(
        plane: CaUnderTest) -> None:
    token, _ = plane.create_token("orders")
    _, csr = new_csr("orders")
    start = time.time()
    response = plane.sign(csr, token)
    chain = x509.load_pem_x509_certificates(response.certificate_pem.encode())
    leaf = chain[0]
    assert len(chain) == 1
    roots = [x509.load_pem_x509_certificate(p.encode()) for p in response.trust_bundle_pem]
    assert len(roots) == 1
    verified = (verification.PolicyBuilder().store(verification.Store(roots))
                .build_client_verifier().verify(leaf, []))
    assert sorted(str(n.value) for n in verified.subjects or []) == [
        f"orders.svc.{DOMAIN}", f"spiffe://{DOMAIN}/service/orders"]
    assert response.spiffe_id == f"spiffe://{DOMAIN}/service/orders"
    not_before = leaf.not_valid_before_utc.timestamp()
    not_after = leaf.not_valid_after_utc.timestamp()
    assert start - 61 <= not_before <= time.time() - 59
    assert not_after - not_before == pytest.approx(TTL + 60, abs=2)
    assert response.not_after.ToSeconds() == int(not_after)
    assert response.not_before.ToSeconds() == int(not_before)
    assert plane.ca.issued == 1
    bundle = plane.certs.TrustBundle(ca_pb2.TrustBundleRequest(), timeout=TIMEOUT)
    assert list(bundle.trust_bundle_pem) == list(response.trust_bundle_pem)
    assert bundle.trust_domain == DOMAIN


def test_a_name_the_token_does_not_allow_is_permission_denied(plane: CaUnderTest) -> None:
    token, token_id = plane.create_token("payments")
    before = plane.files()
    _, csr = new_csr("orders")
    error = refused(lambda: plane.sign(csr, token))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error.details() == (f"bootstrap token {token_id} may not claim service 'orders' "
                               "(it allows: payments)")
    assert_nothing_issued(plane, before)


def test_a_revoked_token_is_permission_denied(plane: CaUnderTest) -> None:
    token, token_id = plane.create_token("orders")
    plane.token_api.Revoke(ca_pb2.RevokeTokenRequest(id=token_id), timeout=TIMEOUT)
    before = plane.files()
    _, csr = new_csr("orders")
    error = refused(lambda: plane.sign(csr, token))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error.details().startswith(f"bootstrap token {token_id} was revoked at ")
    assert_nothing_issued(plane, before)


@pytest.mark.parametrize(("metadata", "message"), [
    ((), "missing bootstrap token"),
    ((("authorization", "Bearer pmt_" + "A" * 43),), "unknown bootstrap token"),
    ((("authorization", "Basic b3JkZXJzOnNlY3JldA=="),), "must be `Bearer <bootstrap token>`"),
    ((("authorization", "Bearer "),), "must be `Bearer <bootstrap token>`"),
], ids=["missing", "unknown", "not-bearer", "empty"])
def test_a_missing_or_unknown_token_is_unauthenticated(
        plane: CaUnderTest, metadata: tuple[tuple[str, str], ...], message: str) -> None:
    plane.create_token("orders")
    before = plane.files()
    _, csr = new_csr("orders")
    error = refused(lambda: plane.certs.Sign(ca_pb2.SignRequest(csr_pem=csr), timeout=TIMEOUT,
                                             metadata=metadata))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert message in error.details()
    assert_nothing_issued(plane, before)


def _tampered(csr_pem: str) -> str:
    """The CSR with its name changed after it was signed (same length: it still parses)."""
    der = x509.load_pem_x509_csr(csr_pem.encode()).public_bytes(serialization.Encoding.DER)
    changed = der.replace(b"/service/orders", b"/service/ordert")
    assert changed != der
    x509.load_der_x509_csr(changed)  # still well-formed
    return ("-----BEGIN CERTIFICATE REQUEST-----\n" + base64.encodebytes(changed).decode()
            + "-----END CERTIFICATE REQUEST-----\n")


def test_a_tampered_csr_is_invalid_argument(plane: CaUnderTest) -> None:
    token, _ = plane.create_token("orders", "ordert")
    before = plane.files()
    _, csr = new_csr("orders")
    error = refused(lambda: plane.sign(_tampered(csr), token))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "tampered or malformed CSR: its signature does not verify"
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    bad = error_details_pb2.BadRequest()
    status.details[0].Unpack(bad)
    assert [v.field for v in bad.field_violations] == ["csr_pem"]
    garbage = refused(lambda: plane.sign("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n"
                                         "-----END CERTIFICATE REQUEST-----\n", token))
    assert garbage.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert garbage.details().startswith("tampered or malformed CSR")
    assert_nothing_issued(plane, before)


def test_a_csr_for_another_trust_domain_is_invalid_argument(plane: CaUnderTest) -> None:
    token, _ = plane.create_token("orders")
    _, csr = new_csr("orders", domain="evil.example")
    error = refused(lambda: plane.sign(csr, token))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not in this mesh's trust domain 'pymesh.local'" in error.details()
    assert plane.ca.issued == 0


def test_token_api_errors(plane: CaUnderTest) -> None:
    error = refused(lambda: plane.token_api.Create(
        ca_pb2.CreateTokenRequest(services=["ok", "not ok"]), timeout=TIMEOUT))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "services[1]" in error.details()
    missing = refused(lambda: plane.token_api.Revoke(ca_pb2.RevokeTokenRequest(id="00ff"),
                                                     timeout=TIMEOUT))
    assert missing.code() == grpc.StatusCode.NOT_FOUND
    assert plane.token_api.List(ca_pb2.ListTokensRequest(), timeout=TIMEOUT).tokens == []


# --- the certificates work in grpcio's TLS -------------------------------------------------------
def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def test_two_workloads_complete_an_mtls_handshake_and_see_each_others_identity(
        plane: CaUnderTest) -> None:
    token, _ = plane.create_token("orders", "payments")
    server_key, server_csr = new_csr("orders")
    client_key, client_csr = new_csr("payments")
    server_cert = plane.sign(server_csr, token)
    client_cert = plane.sign(client_csr, token)
    bundle = "".join(server_cert.trust_bundle_pem).encode()
    seen: list[list[bytes]] = []

    def whoami(request: bytes, context: grpc.ServicerContext) -> bytes:
        seen.append(context.auth_context().get("x509_subject_alternative_name", []))
        return request

    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(2), options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "test.Who", {"Ami": grpc.unary_unary_rpc_method_handler(whoami)}),))
    creds = grpc.ssl_server_credentials(
        [(_pem_key(server_key), server_cert.certificate_pem.encode())],
        root_certificates=bundle, require_client_auth=True)
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    try:
        client_creds = grpc.ssl_channel_credentials(
            root_certificates=bundle, private_key=_pem_key(client_key),
            certificate_chain=client_cert.certificate_pem.encode())
        target = ("grpc.ssl_target_name_override", f"orders.svc.{DOMAIN}")
        with grpc.secure_channel(f"127.0.0.1:{port}", client_creds, options=[target]) as ch:
            assert ch.unary_unary("/test.Who/Ami")(b"hi", timeout=TIMEOUT) == b"hi"
        assert f"spiffe://{DOMAIN}/service/payments".encode() in seen[0]
        # the handshake itself checks that the server is the service the client meant
        wrong = ("grpc.ssl_target_name_override", f"payments.svc.{DOMAIN}")
        with grpc.secure_channel(f"127.0.0.1:{port}", client_creds, options=[wrong]) as ch:
            error = refused(lambda: ch.unary_unary("/test.Who/Ami")(b"hi", timeout=TIMEOUT))
            assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert len(seen) == 1
    finally:
        server.stop(0)


# --- meshctl ------------------------------------------------------------------------------------
def test_meshctl_token_create_list_revoke(plane: CaUnderTest) -> None:
    addr = plane.address
    created = meshctl("token", "create", "--service", "orders", "--service", "cart",
                      "--ttl", "48h", "--description", "orders and cart", address=addr)
    token = ok(created).strip()
    assert token.startswith("pmt_") and "\n" not in token
    [record] = plane.tokens.list()
    assert created.stderr.startswith(f"token {record.id} created for cart, orders; expires ")
    assert "shown only this once" in created.stderr
    assert record.services == ("cart", "orders")
    assert record.expires is not None
    assert record.expires - record.created == pytest.approx(48 * 3600)

    _, csr = new_csr("orders")
    assert plane.sign(csr, token).spiffe_id.endswith("/service/orders")

    table = ok(meshctl("token", "list", address=addr)).splitlines()
    assert table[0].split() == ["ID", "SERVICES", "STATUS", "AGE", "EXPIRES", "DESCRIPTION"]
    assert table[1].split()[:3] == [record.id, "cart,orders", "active"]
    assert table[1].endswith("orders and cart")

    assert ok(meshctl("token", "revoke", record.id, address=addr)).startswith(
        f"token {record.id} revoked (at ")
    listed = json.loads(ok(meshctl("token", "list", "-o", "json", address=addr)))
    assert [(t["id"], t["status"]) for t in listed] == [(record.id, "revoked")]
    error = refused(lambda: plane.sign(new_csr("orders")[1], token))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED

    never = json.loads(ok(meshctl("token", "create", "--service", "x", "--ttl", "never",
                                  "-o", "json", address=addr)))
    assert never["expires"] == "never" and never["token"].startswith("pmt_")


def test_meshctl_token_errors(plane: CaUnderTest) -> None:
    addr = plane.address
    before = plane.files()
    for args, code, message in [
        (("token", "revoke", "feedfacefeedface"), 1, "error: no token 'feedfacefeedface'"),
        (("token", "create", "--service", "bad name!"), 1,
         "error: rejected by the control plane (1 problem):\n  services[0]: invalid service"),
        (("token", "create", "--service", "orders", "--ttl", "soon"), 2,
         "error: argument --ttl: expected a duration"),
        (("token", "create"), 2, "error: the following arguments are required: --service"),
        (("token",), 2, "error: the following arguments are required: COMMAND"),
    ]:
        result = meshctl(*args, address=addr)
        no_traceback(result)
        assert (result.returncode, result.stdout) == (code, ""), (args, result.stderr)
        assert result.stderr.startswith(message), (args, result.stderr)
    assert plane.files() == before
    empty = meshctl("token", "list", address=addr)
    assert (empty.returncode, empty.stdout, empty.stderr) == (0, "", "no tokens\n")


def test_meshctl_ca_show_rotate_and_issue(plane: CaUnderTest, tmp_path: Path) -> None:
    addr = plane.address
    shown = ok(meshctl("ca", "show", address=addr))
    assert "Trust domain:   pymesh.local" in shown and "Workload TTL:   2h" in shown
    assert "Root source:    state-dir" in shown
    [first] = [line.split()[1] for line in shown.splitlines() if line.startswith("active")]

    rotated = ok(meshctl("ca", "rotate", address=addr))
    assert rotated.startswith("new root ") and "signs workload certificates from now on" in rotated
    assert f"root {first} stays trusted until " in rotated
    status = json.loads(ok(meshctl("ca", "show", "-o", "json", address=addr)))
    assert [r["state"] for r in status["roots"]] == ["active", "retiring"]
    assert status["roots"][1]["fingerprintSHA256"].startswith(first)
    pem = ok(meshctl("ca", "show", "-o", "pem", address=addr))
    assert len(x509.load_pem_x509_certificates(pem.encode())) == 2

    # a proxyless client's files: a key made locally, its chain, the bundle
    token, _ = plane.create_token("reports")
    out = tmp_path / "identity"
    issued = meshctl("ca", "issue", "--service", "reports", "--out", str(out), address=addr,
                     env={"MESH_TOKEN": token})
    assert ok(issued).startswith(f"spiffe://{DOMAIN}/service/reports until ")
    assert stat.S_IMODE(os.stat(out / "key.pem").st_mode) == 0o600
    cert = x509.load_pem_x509_certificate((out / "cert.pem").read_bytes())
    assert cert.issuer.rfc4514_string() == status["roots"][0]["subject"]
    assert len(x509.load_pem_x509_certificates((out / "bundle.pem").read_bytes())) == 2
    key = serialization.load_pem_private_key((out / "key.pem").read_bytes(), None)
    assert key.public_key() == cert.public_key()
    denied = meshctl("ca", "issue", "--service", "orders", "--out", str(out), address=addr,
                     env={"MESH_TOKEN": token})
    no_traceback(denied)
    assert denied.returncode == 1 and "may not claim service 'orders'" in denied.stderr
    assert x509.load_pem_x509_certificate((out / "cert.pem").read_bytes()) == cert
    missing = meshctl("ca", "issue", "--service", "reports", "--out", str(out), address=addr)
    assert missing.returncode == 2 and "a bootstrap token is needed" in missing.stderr


def test_meshctl_unreachable_control_plane() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    for args in (("token", "list"), ("token", "create", "--service", "a"), ("ca", "show"),
                 ("ca", "rotate")):
        result = meshctl(*args, address=address)
        no_traceback(result)
        assert result.returncode == 3, (args, result.stderr)
        assert result.stderr.startswith(f"error: cannot reach the control plane at {address}")


def test_the_bundle_served_changes_with_a_rotation(plane: CaUnderTest) -> None:
    first = plane.certs.TrustBundle(ca_pb2.TrustBundleRequest(), timeout=TIMEOUT)
    plane.ca.rotate(activate_after=600)
    second = plane.certs.TrustBundle(ca_pb2.TrustBundleRequest(), timeout=TIMEOUT)
    assert second.trust_bundle_pem[0] == first.trust_bundle_pem[0]
    assert len(second.trust_bundle_pem) == 2
    token, _ = plane.create_token("orders")
    response = plane.sign(new_csr("orders")[1], token)
    issuer = x509.load_pem_x509_certificate(response.certificate_pem.encode()).issuer
    first_root = x509.load_pem_x509_certificate(first.trust_bundle_pem[0].encode())
    assert issuer == first_root.subject  # the pending root does not sign yet
    assert dt.datetime.now(dt.UTC) < first_root.not_valid_after_utc
