"""meshctl as a user runs it: a subprocess against a real policy/status server.

Checked: exit codes (0 ok, 1 refused, 2 bad input, 3 unreachable), what is printed, that bad
input never shows a traceback, and that nothing of a refused apply is stored.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from control_plane.registry.model import Instance
from control_plane.status_api import (
    EndpointsReport,
    ProxyInfo,
    SourcedInstance,
    SourceHealth,
    TypeStatus,
)
from tests.component.test_policy_api import ControlPlaneUnderTest
from tests.harness import ROOT

LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
RDS = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"

POLICIES = """\
kind: TrafficPolicy
metadata:
  name: orders
spec:
  service: orders
  timeout: 2s
  subsets:
    - {name: v1, labels: {version: v1}}
    - {name: v2, labels: {version: v2}}
  routes:
    - name: default
      split: [{subset: v1, weight: 90}, {subset: v2, weight: 10}]
---
kind: MeshConfig
metadata: {name: default}
spec:
  mtls: {mode: STRICT}
"""

INVALID = """\
kind: MeshConfig
metadata: {name: default}
spec: {mtls: {mode: PERMISSIVE}}
---
kind: TrafficPolicy
metadata:
  name: orders
spec:
  service: orders
  timeout: soon
  subsets: [{name: v1, labels: {version: v1}}]
  routes:
    - name: default
      split: [{subset: v3, weight: 100}]
"""



def meshctl(*args: str, address: str | None = None, stdin: str | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "MESH_CONTROL_PLANE"}
    full_env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "gen")])
    full_env.update(env or {})
    argv = [sys.executable, "-m", "control_plane.cli"]
    if address:
        argv += ["--control-plane", address]
    return subprocess.run([*argv, *args], input=stdin or "", capture_output=True, text=True,
                          env=full_env, cwd=str(ROOT), timeout=60, check=False)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}{result.stderr}"
    assert "Traceback" not in result.stderr
    return result.stdout


def no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stderr + result.stdout, result.stderr


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[ControlPlaneUnderTest]:
    cp = ControlPlaneUnderTest(tmp_path / "state")
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture
def policies(tmp_path: Path) -> Path:
    path = tmp_path / "policies.yaml"
    path.write_text(POLICIES)
    return path


def test_apply_get_delete_round_trip(plane: ControlPlaneUnderTest, policies: Path,
                                     tmp_path: Path) -> None:
    addr = plane.address
    assert ok(meshctl("apply", "-f", str(policies), address=addr)) == (
        "trafficpolicy/orders created\nmeshconfig/default created\n")
    assert ok(meshctl("apply", "-f", str(policies), address=addr)) == (
        "trafficpolicy/orders unchanged\nmeshconfig/default unchanged\n")

    table = ok(meshctl("get", "tp", address=addr)).splitlines()
    assert table[0].split() == ["NAME", "KIND", "VERSION", "AGE", "SUMMARY"]
    assert table[1].split()[:3] == ["orders", "TrafficPolicy", "1"]
    assert "service=orders" in table[1] and "subsets=v1,v2" in table[1]
    assert len(table) == 2
    every = ok(meshctl("get", "all", address=addr)).splitlines()
    assert [line.split()[0] for line in every[1:]] == ["default", "orders"]

    # edit what `get -o yaml` printed and apply it back through stdin
    doc = yaml.safe_load(ok(meshctl("get", "TrafficPolicy", "orders", "-o", "yaml",
                                    address=addr)))
    assert doc["metadata"]["resourceVersion"] == "1"
    assert doc["spec"]["routes"][0]["split"][1] == {"subset": "v2", "weight": 10}
    doc["spec"]["routes"][0]["split"] = [{"subset": "v1", "weight": 50},
                                         {"subset": "v2", "weight": 50}]
    assert ok(meshctl("apply", "-f", "-", stdin=yaml.safe_dump(doc), address=addr)) == (
        "trafficpolicy/orders configured\n")
    as_json = json.loads(ok(meshctl("get", "trafficpolicies", "orders", "-o", "json",
                                    address=addr)))
    assert as_json["metadata"]["resourceVersion"] == "2"
    assert as_json["spec"]["routes"][0]["split"][0]["weight"] == 50

    assert ok(meshctl("delete", "TP", "orders", address=addr)) == "trafficpolicy/orders deleted\n"
    gone = meshctl("get", "tp", "orders", address=addr)
    assert gone.returncode == 1 and gone.stdout == ""
    assert gone.stderr == 'error: TrafficPolicy "orders" not found\n'
    again = meshctl("delete", "tp", "orders", address=addr)
    assert again.returncode == 1 and "not found" in again.stderr
    empty = meshctl("get", "tp", address=addr)
    assert (empty.returncode, empty.stdout, empty.stderr) == (0, "", "no TrafficPolicy found\n")


def test_dry_run_stores_nothing(plane: ControlPlaneUnderTest, policies: Path) -> None:
    out = ok(meshctl("apply", "--dry-run", "-f", str(policies), address=plane.address))
    assert out == ("trafficpolicy/orders created (dry run)\n"
                   "meshconfig/default created (dry run)\n")
    assert plane.file_bytes() is None
    assert meshctl("get", "meshconfig", "default", address=plane.address).returncode == 1


def test_invalid_apply_lists_every_problem_and_stores_nothing(
        plane: ControlPlaneUnderTest, policies: Path, tmp_path: Path) -> None:
    ok(meshctl("apply", "-f", str(policies), address=plane.address))
    before = plane.file_bytes()
    bad = tmp_path / "bad.yaml"
    bad.write_text(INVALID)
    result = meshctl("apply", "-f", str(bad), address=plane.address)
    no_traceback(result)
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0] == "error: rejected by the control plane (2 problems):"
    where = f"  {bad}: document 2 (line 5) [TrafficPolicy/orders]: "
    assert sorted(lines[1:]) == sorted([
        where + 'spec.timeout: expected a duration like "500ms", "2s", "1m" or "1h", got "soon"',
        where + 'spec.routes[0].split[0].subset: unknown subset "v3" (defined: v1)',
    ]), result.stderr
    assert plane.file_bytes() == before
    mesh = yaml.safe_load(ok(meshctl("get", "meshconfig", "default", "-o", "yaml",
                                     address=plane.address)))
    assert mesh["spec"]["mtls"] == {"mode": "STRICT"}  # the valid document was not applied


def test_malformed_yaml_is_reported_locally(plane: ControlPlaneUnderTest,
                                            tmp_path: Path) -> None:
    bad = tmp_path / "broken.yaml"
    bad.write_text("kind: TrafficPolicy\nmetadata:\n  name: orders\n spec: [\n")
    result = meshctl("apply", "-f", str(bad), address=plane.address)
    no_traceback(result)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: malformed YAML at {bad}:4:2: ")
    assert plane.file_bytes() is None
    result = meshctl("apply", "-f", str(tmp_path / "missing.yaml"), address=plane.address)
    no_traceback(result)
    assert result.returncode == 2 and "cannot read" in result.stderr


def test_stale_version_is_a_conflict(plane: ControlPlaneUnderTest, policies: Path) -> None:
    addr = plane.address
    ok(meshctl("apply", "-f", str(policies), address=addr))
    read = ok(meshctl("get", "tp", "orders", "-o", "yaml", address=addr))
    doc = yaml.safe_load(read)
    doc["spec"]["timeout"] = "3s"
    ok(meshctl("apply", "-f", "-", stdin=yaml.safe_dump(doc), address=addr))
    doc["spec"]["timeout"] = "4s"  # still carries the version read before the last write
    result = meshctl("apply", "-f", "-", stdin=yaml.safe_dump(doc), address=addr)
    no_traceback(result)
    assert result.returncode == 1
    assert result.stderr.startswith("error: conflict: TrafficPolicy \"orders\" was changed since "
                                    "it was read (resourceVersion 1, stored 2)")
    current = yaml.safe_load(ok(meshctl("get", "tp", "orders", "-o", "yaml", address=addr)))
    assert current["spec"]["timeout"] == "3s"


def test_unreachable_control_plane(policies: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    for args in (("get", "tp"), ("apply", "-f", str(policies)), ("proxy-status",),
                 ("endpoints", "orders"), ("describe", "tp", "orders")):
        result = meshctl(*args, address=address)
        no_traceback(result)
        assert result.returncode == 3, (args, result.stderr)
        assert result.stderr.startswith(f"error: cannot reach the control plane at {address}")
    env_result = meshctl("get", "tp", env={"MESH_CONTROL_PLANE": address})
    assert env_result.returncode == 3 and address in env_result.stderr


def test_address_from_the_environment(plane: ControlPlaneUnderTest, policies: Path) -> None:
    env = {"MESH_CONTROL_PLANE": plane.address}
    assert ok(meshctl("apply", "-f", str(policies), env=env)).startswith("trafficpolicy/orders")


def test_usage_errors_exit_2(plane: ControlPlaneUnderTest) -> None:
    for args in (("get", "widgets"), ("get",), ("bogus",), ("get", "tp", "-o", "xml")):
        result = meshctl(*args, address=plane.address)
        no_traceback(result)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.startswith("error: ")
    bad_address = meshctl("get", "tp", address="nowhere")
    assert bad_address.returncode == 2 and "expected HOST:PORT" in bad_address.stderr


def mesh_status(plane: ControlPlaneUnderTest, revision: int) -> None:
    now = time.time()

    def synced(url: str, rev: int) -> TypeStatus:
        return TypeStatus(url, sent_version="v", sent_nonce="1", sent_at=now - 30,
                          acked_version="v", acked_at=now - 29, sent_policy_revision=rev,
                          acked_policy_revision=rev)

    plane.proxies = [
        ProxyInfo("orders~orders-1", "orders", "orders-1", now - 300,
                  types=tuple(synced(u, revision) for u in (LDS, RDS, CDS, EDS))),
        ProxyInfo("cart~cart-1", "cart", "cart-1", now - 200, types=(
            synced(LDS, revision), synced(RDS, revision - 1), synced(EDS, revision - 1),
            TypeStatus(CDS, sent_version="w", sent_nonce="2", sent_at=now - 5,
                       acked_version="v", acked_at=now - 40, nack_nonce="2",
                       nack_error="cluster orders|v2: no such lb policy", nacked_at=now - 4,
                       sent_policy_revision=revision, acked_policy_revision=revision - 1))),
    ]
    plane.report = EndpointsReport(
        instances=(SourcedInstance(Instance("orders", "orders-1", "127.0.0.1", 4001, "v1", "a"),
                                   "embedded"),
                   SourcedInstance(Instance("orders", "orders-2", "127.0.0.1", 4002, "v2", "b",
                                            healthy=False), "embedded")),
        registries=(SourceHealth("embedded", True),))


def test_proxy_status_endpoints_and_describe(plane: ControlPlaneUnderTest,
                                             policies: Path) -> None:
    addr = plane.address
    first = "kind: MeshConfig\nmetadata: {name: default}\nspec: {mtls: {mode: DISABLE}}\n"
    ok(meshctl("apply", "-f", "-", stdin=first, address=addr))  # revision 1
    ok(meshctl("apply", "-f", str(policies), address=addr))  # revision 2: orders
    mesh_status(plane, revision=2)

    result = meshctl("proxy-status", address=addr)
    lines = ok(result).splitlines()
    assert lines[0].split() == ["NAME", "SERVICE", "LDS", "RDS", "CDS", "EDS", "LAST", "ACK"]
    assert lines[1].split() == ["cart~cart-1", "cart", "SYNCED", "SYNCED", "NACKED", "SYNCED",
                                "29s"]
    assert lines[2].split() == ["orders~orders-1", "orders", *["SYNCED"] * 4, "29s"]
    assert "1 of 2 proxies rejected their last config" in result.stderr
    wide = ok(meshctl("proxy-status", "-o", "wide", address=addr))
    assert "CDS: cluster orders|v2: no such lb policy" in wide
    detail = ok(meshctl("describe", "proxy", "cart~cart-1", address=addr))
    assert "CDS:               NACKED" in detail
    assert "cluster orders|v2: no such lb policy" in detail

    endpoints = ok(meshctl("endpoints", "orders", address=addr)).splitlines()
    assert endpoints[0].split() == ["INSTANCE", "ADDRESS", "VERSION", "ZONE", "HEALTHY",
                                    "SOURCE"]
    assert endpoints[1].split() == ["orders-1", "127.0.0.1:4001", "v1", "a", "yes", "embedded"]
    assert endpoints[2].split() == ["orders-2", "127.0.0.1:4002", "v2", "b", "no", "embedded"]
    assert endpoints[4].split() == ["REGISTRY", "HEALTHY", "LAST", "ERROR"]
    none = meshctl("endpoints", "nope", address=addr)
    assert none.returncode == 0 and "no endpoints for service 'nope'" in none.stderr

    described = ok(meshctl("describe", "tp", "orders", address=addr))
    assert "Name:              orders\n" in described
    assert "Resource version:  2\n" in described
    assert "  timeout: 2s\n" in described
    assert "Proxies running version 2:" in described
    rows = {line.split()[0]: line for line in described.splitlines()
            if line.strip().startswith(("cart~", "orders~"))}
    assert "yes (ACKed at" in rows["orders~orders-1"]
    assert "NACKED (cluster orders|v2: no such lb policy)" in rows["cart~cart-1"]
    missing = meshctl("describe", "tp", "nope", address=addr)
    assert missing.returncode == 1 and 'TrafficPolicy "nope" not found' in missing.stderr
