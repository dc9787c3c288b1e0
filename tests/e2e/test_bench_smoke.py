"""The benchmark harness runs end to end: four paths, real proxies, no gRPC errors.

Uses the shortest phases, so the figures mean nothing; what is checked is that `make bench`
would produce a complete result (all four paths measured, every call OK, chart written).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from tests.harness import ROOT

PATHS = ("direct", "nginx", "sidecar", "sidecar_pair")
PHASES = ("unloaded", "fixed_rate", "max_throughput")


def test_bench_quick_run_measures_all_four_paths(tmp_path: Path) -> None:
    assert shutil.which("nginx") or Path("/usr/sbin/nginx").exists(), (
        "nginx is needed by the benchmark's reference path: ./scripts/ensure-apt.sh nginx")
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.run", "--quick", "--phase-seconds", "0.4",
         "--rate", "200", "--out-dir", str(tmp_path), "--no-docs"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        proc.terminate()  # SIGTERM: the harness stops its proxies before exiting
        stdout, stderr = proc.communicate(timeout=30)
        raise AssertionError(f"bench.run took over 90 s:\n{stdout}\n{stderr}") from None
    assert proc.returncode == 0, f"bench.run failed:\n{stdout}\n{stderr}"

    results = list(tmp_path.glob("*.json"))
    assert len(results) == 1, list(tmp_path.iterdir())
    result = json.loads(results[0].read_text())
    assert list(result["paths"]) == list(PATHS)
    for name, path in result["paths"].items():
        assert path["grpc_errors"] == 0, (name, path)
        for phase in PHASES:
            measured = path[phase]
            assert measured["error_count"] == 0 and not measured["errors"], (name, phase)
            assert measured["ok"] > 0 and measured["p50_ms"] > 0, (name, phase, measured)
        if name == "direct":
            assert path["proxy_rss_mib"] is None
        else:
            assert path["fixed_rate"]["proxy_cpu_ms_per_req"] > 0, (name, path)
            assert path["proxy_rss_mib"] > 0, (name, path)
    assert Path(result["chart"]).stat().st_size > 0
    assert "sidecar_pair" in stdout and "target" in stdout
