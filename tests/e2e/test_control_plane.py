"""The control plane end to end (issue 3, "Show"), embedded registry, local policy file.

One mesh for the module: `mesh-control-plane`, three orders instances (IdentityServer apps:
orders-1 and orders-2 at v1, orders-3 at v2) behind sidecars that announce themselves, and a
client sidecar ("frontend-1") whose outbound port the test calls. Policy goes in through meshctl
(a subprocess, as a user runs it); what the tests check is what a caller sees: which instance
answered, and that no call failed.

The tests run in file order on the shared mesh: the first one starts from an empty policy store.
"""

from __future__ import annotations

import base64
import collections
import json
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.e2e.cp_fixtures import (
    CDS,
    EDS,
    ORDERS,
    RDS,
    XDS_TYPES,
    ControlPlane,
    Load,
    Mesh,
    apply,
    cluster_endpoints,
    http_get,
    meshctl,
    node_id,
    proxy_status_rows,
    ready,
    served_by,
    split_policy,
    start_client_sidecar,
    start_mesh,
    wait_synced,
)
from tests.harness import wait_for

CANARY = (("x-canary", "true"),)
SPLIT_CALLS = 1000
TOLERANCE = 0.05  # +-5 percentage points


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    root = tmp_path_factory.mktemp("cp-e2e")
    cp = ControlPlane(root / "control-plane")
    mesh = start_mesh(root, cp)
    try:
        yield mesh
    finally:
        mesh.close()


def persisted(state_dir: Path) -> bytes:
    """Every resource in a sidecar's persisted snapshot, serialized (b"" if none yet)."""
    try:
        snapshot = json.loads((state_dir / "snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return b""
    return b"".join(base64.b64decode(r) for response in snapshot["responses"]
                    for r in response["resources"])


def v2_share(mesh: Mesh, answers: list[str]) -> float:
    unknown = set(answers) - mesh.instance_ids()
    assert not unknown, f"answers from unknown instances: {unknown}"
    return sum(1 for a in answers if a in mesh.instance_ids("v2")) / len(answers)


def assert_split(mesh: Mesh, answers: list[str], v2_percent: int) -> None:
    share = v2_share(mesh, answers)
    counts = collections.Counter(answers)
    assert abs(share - v2_percent / 100) <= TOLERANCE, (
        f"v2 served {share:.1%} of {len(answers)} calls, expected {v2_percent}% +-5pp: {counts}")
    # inside the v1 subset, calls still spread over both instances
    v1 = [counts[i] for i in sorted(mesh.instance_ids("v1"))]
    if v2_percent < 100:
        assert all(n >= 0.3 * sum(v1) for n in v1), f"v1 subset not balanced: {counts}"


def follow_canary(mesh: Mesh, channel: grpc.Channel, started: float) -> float:
    """Seconds from `started` until calls with the canary header all go to v2; at most 1 s."""
    only_v2 = collections.Counter({i: 10 for i in mesh.instance_ids("v2")})
    wait_for(lambda: served_by(channel, 10, CANARY) == only_v2, timeout=1.0, interval=0.0,
             what="canary calls (x-canary: true) to go to v2 only")
    return time.monotonic() - started


def assert_every_proxy_runs(mesh: Mesh, revision: int) -> None:
    """`meshctl describe tp orders` says every proxy runs policy version `revision`."""
    described = meshctl(mesh.cp.address, "describe", "tp", ORDERS)
    assert described.code == 0, described
    assert f"Proxies running version {revision}:" in described.out, described
    table = described.out.split(f"version {revision}:", 1)[1].strip().splitlines()
    assert table[0].split() == ["NAME", "SERVICE", "HAS", "THIS", "VERSION"], described
    rows = [line.split() for line in table[1:]]
    assert {r[0] for r in rows} == set(mesh.node_ids), described
    for row in rows:
        assert row[2] == "yes", f"{row[0]} ACKed revision {revision}, describe says:\n{described}"


def test_meshctl_split_applies_under_continuous_load_without_failing_a_call(mesh: Mesh) -> None:
    outbound = mesh.client.addr("outbound")
    load = Load(outbound)
    canary_channel = grpc.insecure_channel(outbound)
    try:
        # no policy yet: round robin over every orders instance
        before = collections.Counter(load.wait_calls(0, 300))
        assert set(before) == mesh.instance_ids(), before
        assert all(n >= 80 for n in before.values()), before

        # 90/10, applied with meshctl while the calls keep running
        out = apply(mesh.cp.address, split_policy(90, 10))
        assert out.out.strip() == "trafficpolicy/orders created", out
        revision = mesh.api.revision("TrafficPolicy", ORDERS)
        wait_synced(mesh.api, [mesh.client_node], revision, timeout=5,
                    changed=(RDS, CDS, EDS))  # new subset clusters, their endpoints, routes
        wait_synced(mesh.api, mesh.node_ids, revision, timeout=5, changed=(RDS, CDS))
        assert_every_proxy_runs(mesh, revision)

        mark = load.mark()
        assert_split(mesh, load.wait_calls(mark, SPLIT_CALLS), 10)

        # change it: a canary header route first, and 50/50 for everyone else
        apply(mesh.cp.address, split_policy(50, 50, canary=True))
        took = follow_canary(mesh, canary_channel, time.monotonic())
        assert took <= 1.0
        mark = load.mark()
        assert_split(mesh, load.wait_calls(mark, SPLIT_CALLS), 50)
    finally:
        load.stop()
        canary_channel.close()
    assert not load.failures, (f"{len(load.failures)} of {len(load.served)} calls failed: "
                               f"{load.describe_failures()}\n{mesh.cp.output()}")
    assert len(load.served) >= 300 + 2 * SPLIT_CALLS


def test_describe_shows_which_proxies_run_a_route_only_change(mesh: Mesh) -> None:
    """`meshctl describe` answers "does every proxy run this version?" also for a change that
    only touches routes (the clusters stay the same, so CDS is not pushed again)."""
    apply(mesh.cp.address, split_policy(90, 10))
    with grpc.insecure_channel(mesh.client.addr("outbound")) as channel:
        apply(mesh.cp.address, split_policy(50, 50, canary=True))  # same subsets, new routes
        follow_canary(mesh, channel, time.monotonic())
    revision = mesh.api.revision("TrafficPolicy", ORDERS)
    wait_synced(mesh.api, mesh.node_ids, revision)  # every proxy ACKed the new routes

    assert_every_proxy_runs(mesh, revision)


def test_sidecar_config_dump_shows_the_config_the_control_plane_pushed(mesh: Mesh) -> None:
    """/config_dump is how an operator sees what a sidecar runs (docs/architecture.md: "always
    shows real xDS"), so it must work for config from the control plane too."""
    apply(mesh.cp.address, split_policy(90, 10))
    revision = mesh.api.revision("TrafficPolicy", ORDERS)
    wait_synced(mesh.api, [mesh.client_node], revision)

    status, body = http_get(mesh.client.addr("admin"), "/config_dump")

    assert status == 200, f"/config_dump answered {status}: {body!r}"
    dump = json.loads(body)
    weights = {c["name"]: c["weight"]
               for config in dump["route_configs"] for vhost in config.get("virtual_hosts", [])
               for route in vhost.get("routes", [])
               for c in route.get("route", {}).get("weighted_clusters", {}).get("clusters", [])}
    assert weights == {"orders|v1": 90, "orders|v2": 10}, weights
    assert dump["control_plane"], dump["control_plane"]


def wait_all_synced_again(mesh: Mesh, node_ids: list[str], revision: int) -> None:
    """After a restart: every sidecar back on a stream, SYNCED, as meshctl proxy-status shows."""
    wait_synced(mesh.api, node_ids, revision, timeout=20)
    status = meshctl(mesh.cp.address, "proxy-status")
    assert status.code == 0, status
    rows = proxy_status_rows(status.out)
    assert set(rows) == set(node_ids), status
    for name, cells in rows.items():
        assert cells[2:6] == ["SYNCED"] * 4, f"{name}: {cells}\n{status}"


def test_sidecars_keep_serving_while_the_control_plane_is_killed(mesh: Mesh) -> None:
    apply(mesh.cp.address, split_policy(90, 10))
    revision = mesh.api.revision("TrafficPolicy", ORDERS)
    # a second client sidecar, stopped before the outage and started again during it: it has
    # only its persisted snapshot to go on
    spare_id = "frontend-2"
    spare_dir = mesh.root / spare_id
    spare = start_client_sidecar(mesh.cp.address, spare_dir, spare_id)
    mesh.extra.append(spare)
    wait_synced(mesh.api, mesh.node_ids, revision)
    wait_synced(mesh.api, [node_id("frontend", spare_id)], revision, changed=XDS_TYPES)
    wait_for(lambda: b"orders|v2" in persisted(spare_dir), timeout=5,
             what="the spare sidecar to persist a snapshot with the policy's subsets")
    assert spare.stop() == 0, spare.output()

    load = Load(mesh.client.addr("outbound"))
    try:
        load.wait_calls(0, 100)
        mesh.cp.kill()

        # the data path does not need the control plane: calls keep working, same split
        mark = load.mark()
        assert_split(mesh, load.wait_calls(mark, SPLIT_CALLS), 10)

        # a sidecar starting now cannot reach the control plane: it starts from its snapshot
        spare = start_client_sidecar(mesh.cp.address, spare_dir, spare_id)
        mesh.extra.append(spare)
        wait_for(lambda: ready(spare), timeout=10, what="the restarted spare sidecar's /ready")
        with grpc.insecure_channel(spare.addr("outbound")) as channel:
            answers = served_by(channel, 50)
        assert set(answers) <= mesh.instance_ids() and sum(answers.values()) == 50, answers
        assert cluster_endpoints(spare)["orders|v2"], cluster_endpoints(spare)
        assert not load.failures, (f"{len(load.failures)} of {len(load.served)} calls failed "
                                   f"with the control plane down: {load.describe_failures()}")
    finally:
        load.stop()
        if not mesh.cp.proc.alive():
            mesh.cp.restart()  # leave the module's mesh whole for the next tests
    # the spare joins the live mesh once the control plane is back
    wait_all_synced_again(mesh, [*mesh.node_ids, node_id("frontend", spare_id)], revision)
    assert spare.stop() == 0, spare.output()


RESTARTS = 2  # each restart races the sidecars' reconnections anew


def test_sidecars_reconnect_and_converge_after_a_restart_without_failing_a_call(
        mesh: Mesh) -> None:
    apply(mesh.cp.address, split_policy(90, 10))
    revision = mesh.api.revision("TrafficPolicy", ORDERS)
    wait_synced(mesh.api, mesh.node_ids, revision)
    load = Load(mesh.client.addr("outbound"))
    outages: list[tuple[float, float]] = []  # (killed, restarted)
    try:
        load.wait_calls(0, 100)
        for _ in range(RESTARTS):
            killed = time.monotonic()
            mesh.cp.kill()
            load.wait_calls(load.mark(), 200)

            # back on the same port: every sidecar reconnects and is SYNCED again ...
            outages.append((killed, time.monotonic()))
            mesh.cp.restart()
            wait_all_synced_again(mesh, mesh.node_ids, revision)
            load.wait_calls(load.mark(), 100)

        # ... and converges: a policy change after the restart takes effect
        with grpc.insecure_channel(mesh.client.addr("outbound")) as channel:
            apply(mesh.cp.address, split_policy(50, 50, canary=True))
            assert follow_canary(mesh, channel, time.monotonic()) <= 1.0
        mark = load.mark()
        assert_split(mesh, load.wait_calls(mark, SPLIT_CALLS), 50)
    finally:
        load.stop()
        if not mesh.cp.proc.alive():
            mesh.cp.restart()
    # and no call failed at any point: not while it was down, not while sidecars reconnected
    assert not load.failures, (
        f"{len(load.failures)} of {len(load.served) + len(load.failures)} calls failed: "
        f"{load.describe_failures()}; failures at "
        f"{sorted({round(f.at - outages[0][0], 1) for f in load.failures})[:10]}s, control "
        f"plane killed / restarted at "
        f"{[(round(k - outages[0][0], 1), round(r - outages[0][0], 1)) for k, r in outages]}s")


BAD_INPUTS = {
    "malformed YAML": (
        "kind: TrafficPolicy\nmetadata: {name: payments\nspec: {service: payments}\n",
        2, ["malformed YAML at <stdin>:3:"]),
    "unknown kind": (
        "kind: TraficPolicy\nmetadata: {name: payments}\nspec: {service: payments}\n",
        1, ['kind: unknown kind "TraficPolicy"']),
    "unknown field": (
        split_policy(90, 10, name="payments").replace("  routes:", "  retry: {maxAtempts: 3}\n"
                                                                   "  routes:"),
        1, ['spec.retry.maxAtempts: unknown field "maxAtempts"']),
    "out-of-range value": (
        split_policy(90, 10, name="payments").replace(
            "  routes:", "  outlierDetection: {maxEjectionPercent: 150}\n  routes:"),
        1, ["spec.outlierDetection.maxEjectionPercent: must be between 0 and 100, got 150"]),
    "unknown subset": (
        split_policy(90, 10, name="payments").replace("subset: v2", "subset: v3"),
        1, ['spec.routes[0].split[1].subset: unknown subset "v3" (defined: v1, v2)']),
    "duplicate name": (
        split_policy(90, 10, name="payments") + "---\n" + split_policy(50, 50, name="payments"),
        1, ["document 2", "metadata.name: duplicate TrafficPolicy \"payments\""]),
    # a valid document first: nothing of a rejected request is stored
    "valid then invalid": (
        split_policy(90, 10, name="payments") + "---\n"
        + split_policy(90, 10, name="refunds").replace("weight: 10}", "weight: -1}"),
        1, ["document 2", "spec.routes[0].split[1].weight"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_through_meshctl_gets_a_clear_error_and_changes_nothing(
        mesh: Mesh, case: str) -> None:
    yaml_text, exit_code, needles = BAD_INPUTS[case]
    before = meshctl(mesh.cp.address, "get", "all", "-o", "yaml")
    assert before.code == 0, before

    result = meshctl(mesh.cp.address, "apply", "-f", "-", stdin=yaml_text)

    assert result.code == exit_code, result
    assert "Traceback" not in result.out + result.err, result
    assert result.err.startswith("error: "), result
    for needle in needles:
        assert needle in result.err, f"{needle!r} not in the message:\n{result}"
    after = meshctl(mesh.cp.address, "get", "all", "-o", "yaml")
    assert after == before, f"store changed:\n{before}\n{after}"


def test_bad_input_from_a_file_names_the_file(mesh: Mesh, tmp_path: Path) -> None:
    bad = tmp_path / "policies.yaml"
    bad.write_text(split_policy(90, 10, name="payments").replace("subset: v2", "subset: v3"))
    result = meshctl(mesh.cp.address, "apply", "-f", str(bad))
    assert result.code == 1, result
    assert f"{bad}: document 1" in result.err and "unknown subset" in result.err, result
    assert "Traceback" not in result.err, result
