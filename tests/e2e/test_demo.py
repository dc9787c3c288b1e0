"""The demo (`make demo`) end to end: the shop's services behind sidecars that follow the control
plane, driven by the load generator, a TrafficPolicy applied with meshctl mid-run, and a clean
stop by --duration, SIGINT or SIGTERM without leaving processes.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
from demo.v1 import shop_pb2, shop_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.harness import ROOT, ManagedProcess, running, wait_for

PROGRESS = re.compile(r"calls (\d+) \| ok (\d+)")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "gen"),
                                         env.get("PYTHONPATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _start_demo(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, Path, Path]:
    workdir = tmp_path / "demo"
    log = tmp_path / "run.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "demo_services.run", "--workdir", str(workdir),
             "--summary-json", str(tmp_path / "summary.json"), *args],
            stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=_env())
    return proc, workdir, log


def _processes_mentioning(text: str, exclude: int | None = None) -> dict[int, str]:
    """Live processes whose command line contains `text` (every demo child names its workdir)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in (os.getpid(), exclude):
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and any(text.encode() in a for a in argv):
            found[int(entry)] = b" ".join(argv).decode(errors="replace")
    return found


def _wait_exit(proc: subprocess.Popen, log: Path, timeout: float = 90.0) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"demo did not exit within {timeout}s:\n{log.read_text(errors='replace')}")


def test_demo_runs_calls_end_to_end_through_sidecars_and_stops_clean(tmp_path: Path) -> None:
    proc, workdir, log = _start_demo(tmp_path, "--duration", "5", "--rps", "30")
    code = _wait_exit(proc, log)
    output = log.read_text(errors="replace")
    assert code == 0, output
    summary = json.loads((tmp_path / "summary.json").read_text())

    assert summary["failed"] == [], output
    assert summary["calls"] >= 40, output  # 30 rps for 5 s, with room for a busy machine
    assert summary["ok"] >= 0.95 * summary["calls"], output
    # Every kind of call went through, including both server streams (TrackOrder is relayed
    # by the frontend from orders: a stream across two sidecar pairs).
    assert set(summary["by_method"]) == {"BrowseCatalog", "AddToCart", "PlaceOrder",
                                         "TrackOrder"}, output
    # The sidecars spread calls over both instances of payments (behind orders) and catalog.
    assert set(summary["served"]["payments"]) == {"payments-1", "payments-2"}, output
    assert set(summary["served"]["catalog"]) == {"catalog-1", "catalog-2"}, output
    assert all(n > 0 for n in summary["served"]["payments"].values()), output

    # The control plane, 7 app instances and 8 sidecars (one per instance plus the load
    # generator's), each stopped by SIGTERM and exiting 0 by itself, none left running.
    names = {p["name"] for p in summary["processes"]}
    assert len(names) == 16 and {"sidecar-loadgen", "control-plane"} <= names, names
    assert all(p["returncode"] == 0 for p in summary["processes"]), summary["processes"]
    assert "SIGKILL" not in output, output
    assert _processes_mentioning(str(workdir)) == {}
    # Progress was printed once a second while the load ran.
    assert len(PROGRESS.findall(output)) >= 3, output


def test_sigint_mid_run_stops_everything_and_exits_0(tmp_path: Path) -> None:
    proc, workdir, log = _start_demo(tmp_path, "--rps", "20")
    try:
        def progressed() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"demo exited early:\n{log.read_text(errors='replace')}")
            return any(int(ok) > 0 for _, ok in PROGRESS.findall(log.read_text(errors="replace")))

        wait_for(progressed, timeout=60, interval=0.1, what="the demo's first successful calls")
        children = _processes_mentioning(str(workdir), exclude=proc.pid)
        assert len(children) == 16, children
        proc.send_signal(signal.SIGINT)
        code = _wait_exit(proc, log, timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = log.read_text(errors="replace")
    assert code == 0, output
    assert "stopped." in output and "SIGKILL" not in output, output
    survivors = _processes_mentioning(str(workdir))
    assert survivors == {}, f"left running: {survivors}"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ok"] > 0 and summary["failed"] == [], output


def test_sigterm_during_startup_leaves_no_processes(tmp_path: Path) -> None:
    proc, workdir, log = _start_demo(tmp_path, "--duration", "30")
    try:
        # As soon as the first children exist, before the demo is up.
        wait_for(lambda: _processes_mentioning(str(workdir), exclude=proc.pid), timeout=30,
                 interval=0.02, what="the demo's first child process")
        proc.send_signal(signal.SIGTERM)
        code = _wait_exit(proc, log, timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = log.read_text(errors="replace")
    assert code == 0, output
    assert "load:" not in output, "the load should never have started"
    assert _processes_mentioning(str(workdir)) == {}


def _progress_counts(output: str, service: str) -> list[dict[str, int]]:
    """The per-instance counts of `service` on every progress line so far ("payments 1:4 2:5"
    is {"payments-1": 4, "payments-2": 5}); lines before its first call are skipped."""
    found = []
    for line in output.splitlines():
        if not PROGRESS.search(line):
            continue
        for part in line.split(" | "):
            name, _, counts = part.strip().partition(" ")
            if name == service:
                found.append({f"{service}-{k}": int(v) for k, v in
                              (c.split(":") for c in counts.split())})
    return found


def _http_json(address: str, path: str) -> dict:
    with urllib.request.urlopen(f"http://{address}{path}", timeout=5) as response:
        return json.load(response)


def test_meshctl_applies_the_demo_split_and_the_load_follows_it(tmp_path: Path) -> None:
    proc, workdir, log = _start_demo(tmp_path, "--rps", "40")
    try:
        def output() -> str:
            if proc.poll() is not None:
                raise AssertionError(f"demo exited early:\n{log.read_text(errors='replace')}")
            return log.read_text(errors="replace")

        # Both versions serve while no policy is applied (round robin).
        wait_for(lambda: any(len(c) == 2 and min(c.values()) > 0
                             for c in _progress_counts(output(), "payments")),
                 timeout=60, interval=0.1, what="both payments instances serving")
        addresses = json.loads((workdir / "addresses.json").read_text())
        printed = output()
        control_plane = addresses["control-plane"]["grpc"]
        assert f"--control-plane {control_plane} apply -f " in printed, printed
        policy = ROOT / "demo_services" / "policies" / "payments-split.yaml"
        assert str(policy.relative_to(ROOT)) in printed, printed

        applied = subprocess.run(
            [sys.executable, "-m", "control_plane.cli", "--control-plane", control_plane,
             "apply", "-f", str(policy)],
            cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=30)
        assert applied.returncode == 0, applied.stdout + applied.stderr
        assert "payments" in applied.stdout, applied.stdout

        # orders' sidecar (the caller of payments) runs the split: meshctl says it ACKed the
        # policy's version, and its clusters include both subsets, each with its one instance.
        orders_admin = addresses["sidecar-orders-1"]["admin"]
        inbound = {addresses[f"sidecar-payments-{i}"]["inbound"] for i in (1, 2)}

        def split_active() -> bool:
            described = subprocess.run(
                [sys.executable, "-m", "control_plane.cli", "--control-plane", control_plane,
                 "describe", "TrafficPolicy", "payments"],
                cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=30)
            assert described.returncode == 0, described.stdout + described.stderr
            orders = [line for line in described.stdout.splitlines() if "orders~orders-1" in line]
            if not (orders and "yes (ACKed" in orders[0]):
                return False
            clusters = _http_json(orders_admin, "/clusters")
            return {e["address"] for c in ("payments|v1", "payments|v2")
                    for e in clusters.get(c, {}).get("endpoints", [])} == inbound

        wait_for(split_active, timeout=15, interval=0.2, what="orders' sidecar to run the split")
        # Count from the first progress line printed after the split became active.
        seen = len(_progress_counts(output(), "payments"))
        before = wait_for(lambda: _progress_counts(output(), "payments")[seen:], timeout=10,
                          interval=0.1, what="a progress line after the apply")[0]
        wait_for(lambda: sum(_progress_counts(output(), "payments")[-1].values())
                 >= sum(before.values()) + 80, timeout=90, interval=0.2,
                 what="80 charges after the split")
        proc.send_signal(signal.SIGINT)
        code = _wait_exit(proc, log, timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text(errors="replace")
    assert code == 0, text
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["failed"] == [] and summary["ok"] >= 0.95 * summary["calls"], text
    after = {i: summary["served"]["payments"].get(i, 0) - before.get(i, 0)
             for i in ("payments-1", "payments-2")}
    total = sum(after.values())
    assert total >= 80, (after, text)
    # 90/10 over >= 80 charges: v2's share is 10% +- 3.4 points (one standard deviation);
    # before the policy it was half. 25% is over four deviations away from either.
    assert after["payments-2"] / total <= 0.25, (after, text)
    assert after["payments-1"] / total >= 0.75, (after, text)
    assert _processes_mentioning(str(workdir)) == {}


# ---- the services on their own (no sidecar involved) ------------------------------------------


def _service(module: str, *args: str) -> ManagedProcess:
    return ManagedProcess([sys.executable, "-m", module, "--port", "0", *args],
                          name=module.rsplit(".", 1)[1])


def test_payments_fails_the_configured_fraction_with_unavailable() -> None:
    with running(_service("demo_services.payments", "--instance", "payments-9",
                          "--fail-rate", "1")) as payments:
        asyncio.run(_charge_fails(payments.addr("server")))


async def _charge_fails(address: str) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        call = shop_pb2_grpc.PaymentServiceStub(channel).Charge(
            shop_pb2.ChargeRequest(user_id="u", amount_cents=100), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "payments-9" in (err.value.details() or "")
        assert ("x-served-by", "payments-9") in tuple(await call.trailing_metadata())


def test_catalog_serves_health_reflection_and_a_price_stream() -> None:
    with running(_service("demo_services.catalog", "--instance", "catalog-7")) as catalog:
        asyncio.run(_check_catalog(catalog.addr("server")))


async def _check_catalog(address: str) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="demo.v1.CatalogService"), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING

        reflect = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        services = [s.name async for r in reflect
                    for s in r.list_services_response.service]
        assert "demo.v1.CatalogService" in services

        stub = shop_pb2_grpc.CatalogServiceStub(channel)
        call = stub.WatchPrices(shop_pb2.WatchPricesRequest(max_updates=3, interval_ms=1),
                                timeout=5)
        updates = [u async for u in call]
        assert [u.sequence for u in updates] == [1, 2, 3]
        assert {u.served_by for u in updates} == {"catalog-7"}
        assert ("x-served-by", "catalog-7") in tuple(await call.trailing_metadata())
