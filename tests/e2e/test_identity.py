"""Workload identity through real sidecars, a real control plane and real TLS (issue 5, "Show").

One control plane (its CA issuing one-minute certificates, so renewals happen while the module
runs) and three sidecars shared by the module:
- `orders-1`: the server, with a bootstrap token, in front of an EchoApp that counts every call
  it receives (unary methods answer "orders-1"; `Chat` echoes a bidirectional stream);
- `frontend-1`: a caller with a token (mTLS to orders);
- `legacy-1`: a caller without a token (plaintext: the plaintext port, where the mode allows).
The test process also calls the orders sidecar's two ports directly, presenting certificates
from `meshctl ca issue` (the CA's real Sign path), from another CA, expired ones made under the
mesh's own root (read from the control plane's state), or none.

Every refusal is checked for its status and for the app's call count staying unchanged; every
refusal test first shows the same path with good credentials reaching the app, so a refusal
cannot come from a broken setup. Mode switches go through `meshctl apply` and wait until every
sidecar has ACKed the new config and reports the mode on /config_dump.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from tests.e2e.cp_fixtures import (
    EDS,
    LDS,
    ORDERS,
    ORDERS_GRPC,
    PLACE,
    Load,
    MeshApi,
    apply,
    cluster_endpoints,
    http_get,
    meshctl,
    node_id,
    stop_all,
    wait_synced,
)
from tests.e2e.identity_fixtures import (
    CaControlPlane,
    Credentials,
    EchoApp,
    EchoStream,
    Issuer,
    config_dump,
    create_token,
    identity,
    log_mark,
    metric,
    metric_total,
    serial,
    spiffe,
    wait_logged,
    wait_ready,
)
from tests.harness import ManagedProcess, start_sidecar, wait_for
from tests.pki import TestCA

ROTATION_BOUND = 75.0  # seconds: the most a rotation test may run its load


@dataclass
class Mesh:
    cp: CaControlPlane
    api: MeshApi
    issuer: Issuer
    app: EchoApp
    server: ManagedProcess  # orders-1, with a token
    client: ManagedProcess  # frontend-1, with a token
    legacy: ManagedProcess  # legacy-1, no token
    workdir: Path

    @property
    def sidecars(self) -> list[ManagedProcess]:
        return [self.server, self.client, self.legacy]

    @property
    def nodes(self) -> list[str]:
        return [node_id(ORDERS, "orders-1"), node_id("frontend", "frontend-1"),
                node_id("legacy", "legacy-1")]


def _sidecar(cp: CaControlPlane, workdir: Path, service: str, instance_id: str, *,
             token: str | None, app: EchoApp | None = None,
             grpc_service: str | None = None) -> ManagedProcess:
    """A sidecar following `cp`, with `token` as MESH_TOKEN (None: no identity). grpc-core
    logs at INFO whatever the outer environment says: its handshake-failure lines are how a
    server tells why it refused a client (see wait_logged)."""
    env = {"GRPC_VERBOSITY": "info"}
    if token:
        env["MESH_TOKEN"] = token
    extra = ["--control-plane", cp.address, "--instance-id", instance_id,
             "--state-dir", str(workdir / instance_id)]
    if grpc_service:
        extra += ["--grpc-service", grpc_service]
    return start_sidecar(service=service, app=app.address if app else None,
                         name=f"sidecar-{instance_id}", extra=extra,
                         env=env)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    workdir = tmp_path_factory.mktemp("identity")
    cp = CaControlPlane(workdir / "cp", cert_ttl="1m")
    started: list[object] = [cp]
    api: MeshApi | None = None
    try:
        token, _ = create_token(cp.address, ORDERS, "frontend", "reports")
        app = EchoApp("orders-1", ORDERS_GRPC)
        started.append(app)
        server = _sidecar(cp, workdir, ORDERS, "orders-1", token=token, app=app,
                          grpc_service=ORDERS_GRPC)
        started.append(server)
        client = _sidecar(cp, workdir, "frontend", "frontend-1", token=token)
        started.append(client)
        legacy = _sidecar(cp, workdir, "legacy", "legacy-1", token=None)
        started.append(legacy)
        api = MeshApi(cp.address)
        mesh = Mesh(cp, api, Issuer(cp.address, token, workdir / "issued"), app, server,
                    client, legacy, workdir)
        for sidecar in (server, client):
            wait_ready(sidecar)
        wait_synced(api, mesh.nodes)
        yield mesh
    except BaseException:
        for p in started:
            if isinstance(p, ManagedProcess):
                print(f"--- {p.name} ---\n{p.output()[-4000:]}")
        raise
    finally:
        if api is not None:
            api.close()
        stop_all(reversed(started))


# --- helpers ----------------------------------------------------------------------------------
def set_mode(mesh: Mesh, mode: str) -> None:
    """MeshConfig mtls.mode through meshctl; returns once every sidecar has ACKed the config
    it makes (inbound listeners and endpoints) and reports the mode."""
    apply(mesh.cp.address, "kind: MeshConfig\nmetadata: {name: default}\n"
                           f"spec:\n  mtls: {{mode: {mode}}}\n")
    revision = mesh.api.revision("MeshConfig", "default")
    wait_synced(mesh.api, mesh.nodes, revision, changed=(LDS, EDS))
    for sidecar in mesh.sidecars:
        wait_for(lambda s=sidecar: config_dump(s).get("mtls_mode") == mode, 10,  # type: ignore[misc]
                 interval=0.05, what=f"{sidecar.name} to report mtls_mode {mode}")


@contextlib.contextmanager
def authorization(mesh: Mesh, yaml_text: str, name: str) -> Iterator[None]:
    """An AuthorizationPolicy in force at the orders sidecar for the block, deleted after."""
    apply(mesh.cp.address, yaml_text)
    revision = mesh.api.revision("AuthorizationPolicy", name)
    wait_synced(mesh.api, [node_id(ORDERS, "orders-1")], revision, changed=(LDS,))
    try:
        yield
    finally:
        deleted = meshctl(mesh.cp.address, "delete", "AuthorizationPolicy", name)
        assert deleted.code == 0, str(deleted)

        def lifted() -> bool:
            try:
                via(mesh.client)
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.PERMISSION_DENIED:  # type: ignore[attr-defined]
                    raise
                return False
            return True

        wait_for(lifted, 10, interval=0.05, what=f"AuthorizationPolicy {name} to be lifted")


def via(sidecar: ManagedProcess, method: str = PLACE,
        metadata: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A plaintext call from an app to its own sidecar's outbound port (the mesh's way in)."""
    with grpc.insecure_channel(sidecar.addr("outbound")) as channel:
        answer: bytes = channel.unary_unary(method)(b"", metadata=metadata, timeout=5)
        return answer


def plaintext(target: str, metadata: tuple[tuple[str, str], ...] = ()) -> bytes:
    with grpc.insecure_channel(target) as channel:
        answer: bytes = channel.unary_unary(PLACE)(b"", metadata=metadata, timeout=5)
        return answer


def served(mesh: Mesh, call: Callable[[], bytes], caller: str | None) -> None:
    """`call` reaches the orders app exactly once, which sees `caller` as the verified caller
    (None: no x-forwarded-client-cert, i.e. a plaintext hop)."""
    before = mesh.app.calls
    assert call() == b"orders-1"
    assert mesh.app.calls == before + 1
    expected = None if caller is None else f"URI={spiffe(caller)}"
    assert mesh.app.caller() == expected


def refused(mesh: Mesh, call: Callable[[], bytes], code: grpc.StatusCode,
            *details: str) -> str:
    """`call` fails with `code` (its details containing each of `details`), and the app
    receives nothing. Returns the details."""
    before = mesh.app.calls
    with pytest.raises(grpc.RpcError) as info:
        call()
    err = info.value
    message = err.details() or ""  # type: ignore[attr-defined]
    assert err.code() == code, f"{err.code()}: {message}"  # type: ignore[attr-defined]
    for part in details:
        assert part in message, message
    assert mesh.app.calls == before, "a refused call reached the app"
    return message


def refused_handshake(mesh: Mesh, call: Callable[[], bytes], reason: str) -> None:
    """The orders sidecar's mTLS port ends the handshake (the client sees only UNAVAILABLE:
    in TLS 1.3 the server checks the client's certificate after the client is done), nothing
    reaches the app, and the sidecar's log says why."""
    mark = log_mark(mesh.server)
    refused(mesh, call, grpc.StatusCode.UNAVAILABLE)
    wait_logged(mesh.server, mark, reason)


def mtls(mesh: Mesh, creds: Credentials, metadata: tuple[tuple[str, str], ...] = ()
         ) -> Callable[[], bytes]:
    """A direct call to the orders sidecar's mTLS port presenting `creds`."""
    return lambda: creds.call(mesh.server.addr("inbound"), PLACE, service=ORDERS,
                              metadata=metadata)


FORGED = (("x-forwarded-client-cert", f"URI={spiffe('reports')}"),)


def only_reports(name: str) -> str:
    return (f"kind: AuthorizationPolicy\nmetadata: {{name: {name}}}\nspec:\n"
            f"  service: {ORDERS}\n  rules:\n    - action: ALLOW\n"
            f"      from: [{{service: reports}}]\n")


# --- 1. mTLS between sidecars -----------------------------------------------------------------
def test_mtls_between_sidecars_and_the_app_sees_the_verified_caller(mesh: Mesh) -> None:
    set_mode(mesh, "PERMISSIVE")
    # the caller's sidecar dials the orders sidecar's mTLS port
    assert cluster_endpoints(mesh.client)[ORDERS] == [mesh.server.addr("inbound")]
    served(mesh, lambda: via(mesh.client), "frontend")

    server_id = identity(mesh.server)
    assert server_id["spiffe_id"] == spiffe(ORDERS)
    assert server_id["trust_bundle_roots"] == 1
    assert isinstance(server_id["not_after"], float)
    assert server_id["not_after"] - time.time() <= 61, "--cert-ttl 1m"
    assert identity(mesh.client)["spiffe_id"] == spiffe("frontend")
    # what the mTLS port presents: the orders identity, signed by the mesh's root
    presented = mesh.issuer.peer_certificate(mesh.server.addr("inbound"), ORDERS)
    assert presented.issuer == mesh.cp.signing_root().cert.subject
    assert presented.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
        .get_values_for_type(x509.UniformResourceIdentifier) == [spiffe(ORDERS)]
    assert f"{presented.serial_number:x}" == server_id["serial"] or \
        f"{presented.serial_number:x}" == identity(mesh.server)["serial"]  # (renewed since)
    expiry = metric(mesh.server, "mesh_sidecar_certificate_expiry_timestamp_seconds")
    assert [labels for labels, _ in expiry] == [f'{{spiffe_id="{spiffe(ORDERS)}"}}']
    # the gauge follows renewals: read the identity again next to it
    assert abs(expiry[0][1] - float(identity(mesh.server)["not_after"])) < 1  # type: ignore[arg-type]


# --- 2. refusals ------------------------------------------------------------------------------
def test_client_certificate_from_another_ca_is_refused(mesh: Mesh) -> None:
    good = mesh.issuer.credentials("frontend")
    served(mesh, mtls(mesh, good), "frontend")
    stranger = TestCA("not the mesh", trust_domain="pymesh.local").issue("frontend")
    wrong_ca = Credentials(stranger.private_key_pem, stranger.certificate_chain_pem,
                           good.bundle)
    refused_handshake(mesh, mtls(mesh, wrong_ca),
                      "CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate")


def test_expired_certificate_signed_by_the_mesh_root_is_refused(mesh: Mesh) -> None:
    root = mesh.cp.signing_root()
    bundle = mesh.issuer.bundle()
    fresh = root.issue("frontend")
    # the root really is the mesh's: a current certificate it signs is accepted
    served(mesh, mtls(mesh, Credentials(fresh.private_key_pem, fresh.certificate_chain_pem,
                                        bundle)), "frontend")
    expired = root.issue("frontend", ttl=600, expired=True)
    refused_handshake(mesh, mtls(mesh, Credentials(expired.private_key_pem,
                                                   expired.certificate_chain_pem, bundle)),
                      "CERTIFICATE_VERIFY_FAILED: certificate has expired")


def test_no_client_certificate_is_refused(mesh: Mesh) -> None:
    bundle = mesh.issuer.bundle()
    served(mesh, mtls(mesh, mesh.issuer.credentials("frontend")), "frontend")
    refused_handshake(mesh, mtls(mesh, Credentials(None, None, bundle)),
                      "PEER_DID_NOT_RETURN_A_CERTIFICATE")


def test_plaintext_to_the_mtls_port_is_refused(mesh: Mesh) -> None:
    set_mode(mesh, "PERMISSIVE")  # even when plaintext is allowed on the plaintext port
    served(mesh, lambda: plaintext(mesh.server.addr("inbound_plaintext")), None)
    refused_handshake(mesh, lambda: plaintext(mesh.server.addr("inbound")),
                      "WRONG_VERSION_NUMBER")


def test_certificate_of_a_service_the_policy_does_not_allow(mesh: Mesh) -> None:
    set_mode(mesh, "STRICT")
    denied_before = metric_total(mesh.server, "mesh_sidecar_authz_denied_total")
    with authorization(mesh, only_reports("orders-callers"), "orders-callers"):
        expected = ("AuthorizationPolicy 'orders-callers'", spiffe("frontend"), PLACE)
        # frontend's own sidecar, with frontend's certificate
        refused(mesh, lambda: via(mesh.client), grpc.StatusCode.PERMISSION_DENIED, *expected)
        # the same certificate from the CA, presented directly
        refused(mesh, mtls(mesh, mesh.issuer.credentials("frontend")),
                grpc.StatusCode.PERMISSION_DENIED, *expected)
        # the allowed caller gets through, and the app sees who it is
        served(mesh, mtls(mesh, mesh.issuer.credentials("reports")), "reports")
        assert metric_total(mesh.server, "mesh_sidecar_authz_denied_total") \
            == denied_before + 2


def test_forged_identity_header_grants_nothing(mesh: Mesh) -> None:
    set_mode(mesh, "PERMISSIVE")
    frontend = mesh.issuer.credentials("frontend")
    # without a policy the forged header is not what the app sees: the proven caller is
    served(mesh, lambda: plaintext(mesh.server.addr("inbound_plaintext"), FORGED), None)
    served(mesh, mtls(mesh, frontend, FORGED), "frontend")
    served(mesh, lambda: via(mesh.client, metadata=FORGED), "frontend")
    with authorization(mesh, only_reports("orders-callers"), "orders-callers"):
        # plaintext claiming to be reports: no identity at all
        refused(mesh, lambda: plaintext(mesh.server.addr("inbound_plaintext"), FORGED),
                grpc.StatusCode.PERMISSION_DENIED, "AuthorizationPolicy 'orders-callers'")
        # frontend's certificate claiming to be reports: frontend it is
        refused(mesh, mtls(mesh, frontend, FORGED), grpc.StatusCode.PERMISSION_DENIED,
                "AuthorizationPolicy 'orders-callers'", spiffe("frontend"))
        refused(mesh, lambda: via(mesh.client, metadata=FORGED),
                grpc.StatusCode.PERMISSION_DENIED, spiffe("frontend"))


def test_revoked_token_gets_no_certificate_and_no_call_reaches_its_app(mesh: Mesh) -> None:
    set_mode(mesh, "STRICT")
    token, token_id = create_token(mesh.cp.address, "payments")
    revoked = meshctl(mesh.cp.address, "token", "revoke", token_id)
    assert revoked.code == 0, str(revoked)
    listed = meshctl(mesh.cp.address, "token", "list")
    assert listed.code == 0 and any(
        line.split()[:3] == [token_id, "payments", "revoked"]
        for line in listed.out.splitlines()), str(listed)
    # what the CA answers that token, as a user sees it
    issue = meshctl(mesh.cp.address, "ca", "issue", "--service", "payments", "--out",
                    str(mesh.workdir / "revoked"), env={"MESH_TOKEN": token})
    assert issue.code != 0 and f"token {token_id} was revoked" in issue.err, str(issue)
    assert "Traceback" not in issue.err

    app = EchoApp("payments-1", "shop.Payments")
    sidecar = _sidecar(mesh.cp, mesh.workdir, "payments", "payments-1", token=token,
                       app=app, grpc_service="shop.Payments")
    try:
        reason = f"waiting for a workload certificate: PERMISSION_DENIED: bootstrap token " \
                 f"{token_id} was revoked"

        def says_why() -> bool:
            status, body = http_get_ready(sidecar)
            return status == 503 and reason in body

        wait_for(says_why, 15, interval=0.05, what="/ready to name the revoked token")
        status = identity(sidecar)
        assert "serial" not in status and f"token {token_id} was revoked" in str(
            status["last_error"])
        wait_for(lambda: config_dump(sidecar).get("mtls_mode") == "STRICT", 10,
                 interval=0.05, what="the payments sidecar to follow the mesh mode")
        # without a certificate it does not announce itself: no caller is sent to it
        shown = meshctl(mesh.cp.address, "endpoints", "payments")
        assert "payments-1" not in shown.out + shown.err, str(shown)
        assert not cluster_endpoints(mesh.client).get("payments")
        pay = "/shop.Payments/Pay"
        with pytest.raises(grpc.RpcError) as routed:
            via(mesh.client, pay)
        assert routed.value.code() in (grpc.StatusCode.UNIMPLEMENTED,  # type: ignore[attr-defined]
                                       grpc.StatusCode.UNAVAILABLE), routed.value

        calls: list[tuple[Callable[[], bytes], grpc.StatusCode]] = [
            # a direct caller with a good mesh certificate cannot verify the placeholder
            # certificate it presents
            (lambda: mesh.issuer.credentials("frontend").call(
                sidecar.addr("inbound"), pay, service="payments"),
             grpc.StatusCode.UNAVAILABLE),
            (lambda: plaintext(sidecar.addr("inbound")), grpc.StatusCode.UNAVAILABLE),
            (lambda: plaintext(sidecar.addr("inbound_plaintext")),
             grpc.StatusCode.UNAUTHENTICATED),
        ]
        for call, code in calls:
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == code, info.value  # type: ignore[attr-defined]
        assert app.calls == 0
        assert http_get_ready(sidecar)[0] == 503
    finally:
        sidecar.stop()
        app.stop()


def http_get_ready(sidecar: ManagedProcess) -> tuple[int, str]:
    status, body = http_get(sidecar.addr("admin"), "/ready")
    return status, body.decode(errors="replace")


# --- 3. PERMISSIVE and STRICT -----------------------------------------------------------------
def test_permissive_accepts_plaintext_and_mtls_strict_refuses_plaintext(mesh: Mesh) -> None:
    plaintext_port = mesh.server.addr("inbound_plaintext")
    set_mode(mesh, "PERMISSIVE")
    served(mesh, lambda: via(mesh.client), "frontend")  # mTLS
    served(mesh, lambda: plaintext(plaintext_port), None)  # plaintext, direct
    served(mesh, lambda: via(mesh.legacy), None)  # a sidecar without identity: plaintext port

    set_mode(mesh, "STRICT")
    served(mesh, lambda: via(mesh.client), "frontend")
    refused(mesh, lambda: plaintext(plaintext_port), grpc.StatusCode.UNAUTHENTICATED,
            "STRICT")
    before = mesh.app.calls
    with pytest.raises(grpc.RpcError):
        via(mesh.legacy)
    assert mesh.app.calls == before

    set_mode(mesh, "PERMISSIVE")  # and back: migration can be undone
    served(mesh, lambda: plaintext(plaintext_port), None)
    served(mesh, lambda: via(mesh.legacy), None)


# --- 5. DISABLE -------------------------------------------------------------------------------
def test_disable_is_plaintext_everywhere(mesh: Mesh) -> None:
    set_mode(mesh, "DISABLE")
    plaintext_port = mesh.server.addr("inbound_plaintext")
    # callers, with or without identity, are sent to the plaintext port
    for caller in (mesh.client, mesh.legacy):
        assert cluster_endpoints(caller)[ORDERS] == [plaintext_port], caller.name
    served(mesh, lambda: via(mesh.client), None)  # no TLS, so no verified caller
    served(mesh, lambda: via(mesh.legacy), None)
    served(mesh, lambda: plaintext(plaintext_port), None)
    assert config_dump(mesh.server)["mtls_mode"] == "DISABLE"


# --- 4. rotation under load -------------------------------------------------------------------
def _rotation_load(mesh: Mesh) -> tuple[Load, EchoStream]:
    load = Load(mesh.client.addr("outbound"), max_seconds=ROTATION_BOUND)
    stream = EchoStream(mesh.client.addr("outbound"), mesh.app.chat,
                        max_seconds=ROTATION_BOUND)
    load.wait_calls(0, 5)
    stream.wait_echoed(5)
    return load, stream


def _finish(load: Load, stream: EchoStream) -> None:
    """More calls and echoes after the change; then zero failures, and the stream, never
    broken, closes cleanly."""
    load.wait_calls(load.mark(), 20)
    stream.wait_echoed(stream.echoed + 10)
    assert stream.open, stream.errors
    load.stop()
    print(f"{len(load.served)} unary calls, {stream.echoed} stream echoes, "
          f"{len(load.failures)} failures")
    assert load.failures == [], load.describe_failures()
    assert set(load.served) == {"orders-1"}
    assert stream.close() == grpc.StatusCode.OK
    assert stream.errors == []


def test_certificates_renew_and_the_root_rotates_under_load_without_a_failed_call(
        mesh: Mesh) -> None:
    """One window (one-minute certificates) for both: a root rotation, then both sidecars renew
    (about 30 s after issue) with certificates of the new root, under unary load and one long
    bidirectional stream opened before either."""
    set_mode(mesh, "STRICT")
    assert {identity(s)["trust_bundle_roots"] for s in (mesh.server, mesh.client)} == {1}
    app_before = mesh.app.calls
    old_root = mesh.cp.signing_root().cert.subject
    load, stream = _rotation_load(mesh)
    try:
        rotated = meshctl(mesh.cp.address, "ca", "rotate")
        assert rotated.code == 0, str(rotated)
        before = {s.name: serial(s) for s in (mesh.server, mesh.client)}
        wait_for(lambda: all(identity(s)["trust_bundle_roots"] == 2
                             for s in (mesh.server, mesh.client)),
                 timeout=15, interval=0.1, what="both sidecars to trust the two roots")
        # then each renews with a certificate of the new root, while its peer still may hold
        # one of the old root
        wait_for(lambda: all(serial(s) != before[s.name] for s in (mesh.server, mesh.client)),
                 timeout=50, interval=0.2, what="both sidecars to renew after the rotation")
        new_root = mesh.cp.signing_root().cert.subject
        assert new_root != old_root
        mesh.issuer.forget()  # a client that knows the new bundle
        presented = mesh.issuer.peer_certificate(mesh.server.addr("inbound"), ORDERS)
        assert presented.issuer == new_root
        _finish(load, stream)
    finally:
        load.stop()
        stream.close()
    assert mesh.app.calls >= app_before + len(load.served) + 1  # + the stream
