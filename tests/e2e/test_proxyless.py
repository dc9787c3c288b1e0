"""A proxyless gRPC client (grpcio's own xDS client, `xds:///orders`) follows the control plane
(issue 3, "Show"): gRPC's xDS implementation is the independent check that our xDS is right.

The client runs in a subprocess, so GRPC_XDS_BOOTSTRAP is set before grpc initialises. Its
bootstrap names the control plane and a node without `mesh_sidecar` metadata, so it is served
the API listener for `orders` (and is not announced as an instance). It dials the orders
instances' inbound sidecar addresses, which is what EDS carries. The test drives it over its
stdin/stdout: one JSON line per batch of calls, answered with which instance served each.
"""

from __future__ import annotations

import collections
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.cp_fixtures import (
    ORDERS,
    ControlPlane,
    MeshApi,
    MeshInstance,
    apply,
    child_env,
    meshctl,
    proxy_status_rows,
    split_policy,
    start_instance,
    stop_all,
    wait_synced,
)
from tests.harness import ROOT, wait_for

PROXYLESS_NODE = "shop-client~proxyless-1"
CANARY = (("x-canary", "true"),)

# Reads {"calls": N, "metadata": [[k, v], ...]} lines; answers each with one JSON line:
# {"served": {instance: count}, "failures": {"CODE: details": count}}. Every call has a 5 s
# deadline, so a batch is bounded; the first call waits for the xDS resources to arrive.
CLIENT = r"""
import collections, json, sys
import grpc

channel = grpc.insecure_channel(sys.argv[1])
place = channel.unary_unary("/shop.Orders/Place")
first = True
for line in sys.stdin:
    command = json.loads(line)
    served, failures = collections.Counter(), collections.Counter()
    for _ in range(command["calls"]):
        try:
            answer = place(b"", timeout=5, wait_for_ready=first,
                           metadata=[tuple(m) for m in command.get("metadata", [])])
            served[answer.decode()] += 1
        except grpc.RpcError as err:
            failures[f"{err.code().name}: {err.details()}"] += 1
        first = False
    print(json.dumps({"served": served, "failures": failures}), flush=True)
channel.close()
"""


class ProxylessClient:
    """grpcio with its xDS resolver, in a child process, making calls when told to."""

    def __init__(self, control_plane: str, workdir: Path, target: str = f"xds:///{ORDERS}"):
        bootstrap = workdir / "bootstrap.json"
        bootstrap.write_text(json.dumps({
            "xds_servers": [{"server_uri": control_plane,
                             "channel_creds": [{"type": "insecure"}],
                             "server_features": ["xds_v3"]}],
            "node": {"id": PROXYLESS_NODE, "cluster": "shop-client",
                     "metadata": {"app": "shop-client"}},  # no mesh_sidecar: proxyless
        }))
        self._stderr = open(workdir / "proxyless.log", "w+")  # closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CLIENT, target], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self._stderr, text=True, cwd=ROOT,
            env=child_env({"GRPC_XDS_BOOTSTRAP": str(bootstrap)}))

    def calls(self, count: int,
              metadata: Sequence[tuple[str, str]] = ()) -> collections.Counter[str]:
        """Which instance served each of `count` calls; fails the test if any call failed."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"calls": count, "metadata": metadata}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()  # bounded: each call has a 5 s deadline
        assert line, f"proxyless client died:\n{self.log()}"
        result = json.loads(line)
        assert not result["failures"], f"proxyless calls failed: {result}"
        return collections.Counter(result["served"])

    def log(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read()[-5000:]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self._stderr.close()


@dataclass
class Orders:
    cp: ControlPlane
    instances: list[MeshInstance]
    api: MeshApi

    def ids(self, version: str | None = None) -> set[str]:
        return {i.instance_id for i in self.instances if version in (None, i.version)}


@pytest.fixture(scope="module")
def orders(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orders]:
    root = tmp_path_factory.mktemp("proxyless")
    cp = ControlPlane(root / "control-plane")
    instances: list[MeshInstance] = []
    api = MeshApi(cp.address)
    try:
        for instance_id, version in (("orders-1", "v1"), ("orders-2", "v1"), ("orders-3", "v2")):
            instances.append(start_instance(cp.address, root, instance_id, version))
        wait_synced(api, [i.node_id for i in instances])
        yield Orders(cp, instances, api)
    finally:
        api.close()
        stop_all([*(i.sidecar for i in instances), *(i.app for i in instances), cp])


@pytest.fixture
def client(orders: Orders, tmp_path: Path) -> Iterator[ProxylessClient]:
    proxyless = ProxylessClient(orders.cp.address, tmp_path)
    try:
        yield proxyless
    finally:
        proxyless.close()


def test_proxyless_grpc_client_balances_and_follows_the_split(orders: Orders,
                                                              client: ProxylessClient) -> None:
    # no policy: the service is reached and calls are balanced over its three instances
    before = client.calls(300)
    assert set(before) == orders.ids(), before
    assert all(80 <= n <= 120 for n in before.values()), before

    # the control plane sees it as a proxyless client with every type ACKed
    wait_synced(orders.api, [PROXYLESS_NODE])
    status = meshctl(orders.cp.address, "proxy-status", "-o", "wide")
    assert status.code == 0, status
    row = proxy_status_rows(status.out)[PROXYLESS_NODE]
    assert row[2:6] == ["SYNCED"] * 4 and "proxyless" in row, status
    endpoints = meshctl(orders.cp.address, "endpoints", ORDERS)
    assert "proxyless" not in endpoints.out and "shop-client" not in endpoints.out, endpoints

    # the split, with a canary header route, applied with meshctl: gRPC follows within 1 s
    apply(orders.cp.address, split_policy(90, 10, canary=True))
    v2_only = collections.Counter({i: 10 for i in orders.ids("v2")})
    started = time.monotonic()
    wait_for(lambda: client.calls(10, CANARY) == v2_only, timeout=1.0, interval=0.0,
             what="the proxyless client's canary calls to go to v2 only")
    assert time.monotonic() - started <= 1.0

    # and the weighted split: 90/10 over 1,000 calls, +-5 percentage points
    after = client.calls(1000)
    assert set(after) <= orders.ids(), after
    v2 = sum(n for name, n in after.items() if name in orders.ids("v2")) / 1000
    assert abs(v2 - 0.10) <= 0.05, f"v2 served {v2:.1%}, expected 10% +-5pp: {after}"
    v1 = [after[i] for i in sorted(orders.ids("v1"))]
    assert all(n >= 0.3 * sum(v1) for n in v1), f"v1 subset not balanced: {after}"

    # a change follows too: everything to v2
    apply(orders.cp.address, split_policy(0, 100))
    started = time.monotonic()
    all_v2 = collections.Counter({i: 20 for i in orders.ids("v2")})
    wait_for(lambda: client.calls(20) == all_v2, timeout=1.0, interval=0.0,
             what="the proxyless client to send everything to v2")
    assert time.monotonic() - started <= 1.0
