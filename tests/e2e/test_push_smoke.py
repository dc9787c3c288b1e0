"""The push-latency benchmark (bench/push_latency.py) runs end to end in its quick mode: a real
control plane, 20 simulated sidecars on real ADS streams in a separate process, two policy
changes applied through the policy API, every stream ACKing each change, nothing left running.

The figures of a quick run mean little; what is checked is that `make bench` would produce a
complete, causal measurement.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.harness import ROOT

N = 20
ROUNDS = 2


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_push_benchmark_quick_run_measures_every_stream(tmp_path: Path) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "gen"),
                                         env.get("PYTHONPATH", "")])
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.push_latency", "--quick", "--out-dir", str(tmp_path),
         "--no-docs"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.terminate()  # SIGTERM: the harness stops the control plane and the clients
        stdout, stderr = proc.communicate(timeout=20)
        raise AssertionError(f"push benchmark took over 20 s:\n{stdout}\n{stderr}") from None
    assert proc.returncode == 0, f"{stdout}\n{stderr}"

    results = list(tmp_path.glob("push-*.json"))
    assert len(results) == 1, list(tmp_path.iterdir())
    result = json.loads(results[0].read_text())
    assert list(result["sizes"]) == [str(N)]
    size = result["sizes"][str(N)]
    assert size["latency"]["incomplete"] == 0 and size["latency"]["samples"] == N * ROUNDS
    assert len(size["rounds"]) == ROUNDS
    for r in size["rounds"]:
        assert r["acked_all"] == N and r["nacks"] == 0, r
        # every stream got new routes, clusters and endpoints: at least three pushes each
        assert r["pushes"] >= 3 * N, r
        # causal: no stream can hold the new config before the Apply request was sent
        assert len(r["from_apply_sent_s"]) == N and min(r["from_apply_sent_s"]) > 0, r
        assert r["p50_ms"] <= r["p99_ms"] <= r["max_ms"] < 5000, r
    assert size["cp_rss_idle_mib"] > 0 and size["cp_rss_connected_mib"] > 0
    assert size["client_processes"] >= 1
    assert result["verdict"] == {"complete": True, "target_met": None}
    assert "p99" in stdout and "KiB/sidecar" in stdout
    # the control plane and the client processes were stopped
    pids = [size["pids"]["control_plane"], *size["pids"]["clients"]]
    assert not [p for p in pids if _alive(p)], pids
