"""The control plane the mTLS paths follow, and the checks that a pair is wired as intended.

One control plane per run, shared by `pair_cp` and `pair_mtls` in every round, so the two differ
only in whether the sidecars hold bootstrap tokens. Its MeshConfig pins what would otherwise
differ from the static pairs: tracing off (the control plane's default samplingPercent is 1 and
overrides the sidecars' --trace-sampling 0) and mode PERMISSIVE (a sidecar without a token can
still be called; the caller of an mTLS sidecar dials its mTLS port in PERMISSIVE as in STRICT).
`--grace 0` makes a stopped sidecar's instance leave at once, so the next round's pair never
sees the previous round's endpoints.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench.procs import ROOT, UNARY_METHOD, Child, wait_for

MESH_CONFIG = """\
kind: MeshConfig
metadata: {name: default}
spec:
  mtls: {mode: PERMISSIVE}
  tracing: {samplingPercent: 0}
"""
TLS_MATCH_KEY = "envoy.transport_socket_match"


class BenchControlPlane:
    """`python -m control_plane` (embedded registry, its own CA) with a bootstrap token per
    service in `services`, created with meshctl as a user would."""

    def __init__(self, services: tuple[str, ...]) -> None:
        self.state_dir = Path(tempfile.mkdtemp(prefix="bench-cp-state-"))
        self.child = Child("control-plane", [
            sys.executable, "-m", "control_plane", "--listen", "127.0.0.1:0",
            "--admin", "127.0.0.1:0", "--state-dir", str(self.state_dir), "--grace", "0",
            "--log-level", "WARNING"])
        self.address = self.child.ports["grpc"]
        try:
            self.meshctl("apply", "-f", "-", stdin=MESH_CONFIG)
            self.tokens = {s: self.meshctl("token", "create", "--service", s).split()[-1]
                           for s in services}
        except BaseException:
            self.stop()
            raise

    def meshctl(self, *args: str, stdin: str | None = None) -> str:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(ROOT), str(ROOT / "gen"), env.get("PYTHONPATH", "")) if p)
        env.pop("MESH_CONTROL_PLANE", None)  # --control-plane names ours
        done = subprocess.run([sys.executable, "-m", "control_plane.cli", "--control-plane",
                               self.address, *args], input=stdin, capture_output=True,
                              text=True, timeout=30, env=env, cwd=ROOT)
        if done.returncode != 0 or not done.stdout.strip():
            raise RuntimeError(f"meshctl {' '.join(args)} failed ({done.returncode}):\n"
                               f"{done.stdout}{done.stderr}")
        return done.stdout

    def stop(self) -> None:
        self.child.stop()
        shutil.rmtree(self.state_dir, ignore_errors=True)


def admin_get(admin: str, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://{admin}{path}", timeout=2) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


def _json(admin: str, path: str) -> Any:
    code, body = admin_get(admin, path)
    return json.loads(body) if code == 200 else None


def wait_routed(a_admin: str, b_admin: str, cluster: str, b_inbound: str, *, mtls: bool,
                timeout: float = 30.0) -> dict[str, Any]:
    """Until both sidecars are ready (an mTLS sidecar: it holds its certificate) and A's
    cluster for B's service has exactly B's inbound port as its endpoint, marked for mTLS iff
    `mtls`. Raises (the path does not run) if it is wired otherwise; returns what was checked
    (for the result file)."""
    for admin in (b_admin, a_admin):
        wait_for(lambda admin=admin: admin_get(admin, "/ready")[0] == 200, timeout,  # type: ignore[misc]
                 f"{admin}/ready to answer 200", interval=0.05)

    def only_b() -> bool:
        clusters = _json(a_admin, "/clusters") or {}
        endpoints = [e["address"] for e in clusters.get(cluster, {}).get("endpoints", [])]
        return endpoints == [b_inbound]

    wait_for(only_b, timeout, f"sidecar A's cluster {cluster} to hold only {b_inbound}",
             interval=0.05)
    dump_a, dump_b = _json(a_admin, "/config_dump"), _json(b_admin, "/config_dump")
    marked = _tls_marked(dump_a, cluster)
    problems = []
    if marked != [mtls]:
        problems.append(f"A's endpoints of {cluster} marked for mTLS: {marked}, wanted [{mtls}]")
    for side, dump in (("A", dump_a), ("B", dump_b)):
        if (dump.get("identity") is not None) != mtls:
            problems.append(f"sidecar {side} identity: {dump.get('identity')}")
        if dump.get("mtls_mode") != "PERMISSIVE":
            problems.append(f"sidecar {side} mode: {dump.get('mtls_mode')}")
    refused = plaintext_refused(b_inbound)
    if refused != mtls:
        problems.append(f"a plaintext call to B's inbound {b_inbound}: "
                        f"{'refused' if refused else 'accepted'}")
    if problems:
        raise RuntimeError("pair not wired as intended: " + "; ".join(problems))
    return {"endpoint": b_inbound, "endpoint_mtls": marked == [True],
            "b_inbound_refuses_plaintext": refused,
            "mode": dump_a.get("mtls_mode"),
            "spiffe_id_a": (dump_a.get("identity") or {}).get("spiffe_id"),
            "spiffe_id_b": (dump_b.get("identity") or {}).get("spiffe_id")}


def plaintext_refused(address: str) -> bool:
    """Does a plaintext UnaryCall to `address` fail? (An mTLS-only port fails the handshake.)"""
    import grpc

    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(UNARY_METHOD)  # no serializers: raw bytes; b"" is a request
        try:
            call(b"", timeout=5)
        except grpc.RpcError:
            return True
    return False


def _tls_marked(dump: Mapping[str, Any], cluster: str) -> list[bool]:
    """Per endpoint of `cluster` in A's EDS: does it carry the transport-socket match for mTLS?"""
    out = []
    for cla in dump.get("load_assignments", []):
        if cla.get("cluster_name") != cluster:
            continue
        for locality in cla.get("endpoints", []):
            for lb in locality.get("lb_endpoints", []):
                meta = lb.get("metadata", {}).get("filter_metadata", {})
                out.append(meta.get(TLS_MATCH_KEY, {}).get("tlsMode") == "mtls")
    return out
