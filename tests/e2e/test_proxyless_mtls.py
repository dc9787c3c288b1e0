"""A proxyless grpcio client joins the mesh's mTLS with certificates the control plane issues
(issue 5: "Proxyless grpcio clients can join with certificates the control plane issues").

Real parts end to end: the control plane's CA issues files with `meshctl ca issue`; grpcio's xDS
client reads them through the `file_watcher` certificate provider named in its bootstrap; the
control plane's translation (not a hand-built resource) sends the `proxyless-mtls` variant: a
CDS transport socket with the provider instance `mesh-identity` and the destination's SPIFFE
ID, EDS with the instance's mTLS port. The orders sidecar (with a token) verifies the client's
certificate, and its app sees the client's identity in x-forwarded-client-cert.

A proxyless client without `mtls: true` in its node metadata is the plaintext variant: it is sent
to the instance's plaintext port in PERMISSIVE and cannot reach it in STRICT.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.cp_fixtures import ORDERS, ORDERS_GRPC, ControlPlane, apply, http_get, meshctl
from tests.harness import ROOT, ManagedProcess, start_sidecar, wait_for
from tests.servers import IdentityServer

PROVIDER = "mesh-identity"
TRUST_DOMAIN = "pymesh.local"
METHOD = f"/{ORDERS_GRPC}/Place"

# One call through grpcio's xDS resolver; prints "OK <answer>" or "FAILED <code>: <details>".
CLIENT = r"""
import sys
import grpc
import grpc.experimental
creds = grpc.xds_channel_credentials(grpc.experimental.insecure_channel_credentials())
with grpc.secure_channel(sys.argv[1], creds) as channel:
    try:
        call = channel.unary_unary(sys.argv[2])
        answer = call(b"", timeout=15, wait_for_ready=sys.argv[3] == "wait")
        print("OK " + answer.decode(), flush=True)
    except grpc.RpcError as err:
        print(f"FAILED {err.code().name}: {err.details()}", flush=True)
"""


@dataclass
class Mesh:
    control_plane: ControlPlane
    app: IdentityServer
    sidecar: ManagedProcess
    token: str
    workdir: Path


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    workdir = tmp_path_factory.mktemp("proxyless-mtls")
    cp = ControlPlane(workdir / "cp")
    app = IdentityServer("orders-1")
    sidecar = None
    try:
        created = meshctl(cp.address, "token", "create", "--service", ORDERS,
                          "--service", "reports")
        assert created.code == 0, str(created)
        token = created.out.strip()
        sidecar = start_sidecar(service=ORDERS, app=app.address, name="sidecar-orders-1",
                                extra=["--control-plane", cp.address, "--grpc-service",
                                       ORDERS_GRPC, "--instance-id", "orders-1",
                                       "--state-dir", str(workdir / "orders-1"),
                                       "--no-learn-method-shapes"],
                                env=_env({"MESH_TOKEN": token}))
        wait_for(lambda: http_get(sidecar.addr("admin"), "/ready")[0] == 200, 20,
                 what="the orders sidecar ready with a certificate")
        yield Mesh(cp, app, sidecar, token, workdir)
    finally:
        if sidecar is not None:
            sidecar.stop()
        app.stop()
        cp.stop()


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "gen")])
    env.update(extra or {})
    return env


def run_client(mesh: Mesh, name: str, *, mtls: bool, wait: bool = True) -> str:
    """One call from a fresh grpcio process (its bootstrap is read once per process)."""
    workdir = mesh.workdir / name
    workdir.mkdir(exist_ok=True)
    node: dict[str, object] = {"id": f"reports~{name}", "cluster": "reports"}
    bootstrap: dict[str, object] = {
        "xds_servers": [{"server_uri": mesh.control_plane.address,
                         "channel_creds": [{"type": "insecure"}],
                         "server_features": ["xds_v3"]}],
        "node": node}
    if mtls:
        identity = workdir / "identity"
        issued = meshctl(mesh.control_plane.address, "ca", "issue", "--service", "reports",
                         "--out", str(identity), env={"MESH_TOKEN": mesh.token})
        assert issued.code == 0, str(issued)
        node["metadata"] = {"mtls": True}  # asks for the proxyless-mtls variant
        bootstrap["certificate_providers"] = {PROVIDER: {
            "plugin_name": "file_watcher", "config": {
                "certificate_file": str(identity / "cert.pem"),
                "private_key_file": str(identity / "key.pem"),
                "ca_certificate_file": str(identity / "bundle.pem"),
                "refresh_interval": "60s"}}}
    path = workdir / "bootstrap.json"
    path.write_text(json.dumps(bootstrap))
    result = subprocess.run([sys.executable, "-c", CLIENT, f"xds:///{ORDERS}", METHOD,
                             "wait" if wait else "fail-fast"],
                            env=_env({"GRPC_XDS_BOOTSTRAP": str(path)}),
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.stdout, f"proxyless client failed:\n{result.stderr[-3000:]}"
    return result.stdout.strip()


def test_a_proxyless_client_with_issued_files_calls_over_mtls(mesh: Mesh) -> None:
    before = mesh.app.calls
    assert run_client(mesh, "with-cert", mtls=True) == "OK orders-1"
    assert mesh.app.calls == before + 1
    # the orders sidecar verified the client's certificate and told its app who called
    assert mesh.app.last_metadata.get("x-forwarded-client-cert") == \
        f"URI=spiffe://{TRUST_DOMAIN}/service/reports"


def test_plaintext_proxyless_clients_use_the_plaintext_port_only_while_permissive(
        mesh: Mesh) -> None:
    before = mesh.app.calls
    assert run_client(mesh, "plain-permissive", mtls=False) == "OK orders-1"
    assert mesh.app.calls == before + 1
    assert "x-forwarded-client-cert" not in mesh.app.last_metadata  # no certificate, no claim

    apply(mesh.control_plane.address,
          "kind: MeshConfig\nmetadata: {name: default}\nspec:\n  mtls: {mode: STRICT}\n")
    try:
        wait_for(lambda: json.loads(http_get(mesh.sidecar.addr("admin"), "/config_dump")[1])
                 ["mtls_mode"] == "STRICT", 15, what="the orders sidecar in STRICT")
        before = mesh.app.calls
        answer = run_client(mesh, "plain-strict", mtls=False, wait=False)
        assert answer.startswith("FAILED UNAVAILABLE"), answer
        assert mesh.app.calls == before
        # the mTLS client is unaffected
        assert run_client(mesh, "with-cert-strict", mtls=True) == "OK orders-1"
    finally:
        meshctl(mesh.control_plane.address, "delete", "MeshConfig", "default")
