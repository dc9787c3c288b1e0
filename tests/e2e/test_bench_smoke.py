"""The benchmark harness runs end to end: every path, real proxies, no gRPC errors.

Uses the shortest phases, so the figures mean nothing; what is checked is that `make bench`
would produce a complete result (every path measured, every call OK, the pair's variants
compared with the bare pair, spans received when tracing is at 100%, the mTLS pair compared with
the plaintext pair that follows the same control plane, chart written).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from tests.harness import ROOT

PATHS = ("direct", "nginx", "sidecar", "sidecar_pair", "pair_policies", "pair_trace1",
         "pair_trace100", "pair_cp", "pair_mtls")
VARIANTS = ("pair_policies", "pair_trace1", "pair_trace100")  # compared with sidecar_pair
CP_PAIRS = ("pair_cp", "pair_mtls")  # following a control plane; mTLS compared with plaintext
PAIRS = ("sidecar_pair", *VARIANTS, *CP_PAIRS)
PHASES = ("unloaded", "fixed_rate", "max_throughput")


def test_bench_quick_run_measures_every_path(tmp_path: Path) -> None:
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
        phases = PHASES[:2] if name in VARIANTS or name in CP_PAIRS else PHASES
        assert [p for p in PHASES if p in path] == list(phases), (name, path)
        for phase in phases:
            measured = path[phase]
            assert measured["error_count"] == 0 and not measured["errors"], (name, phase)
            assert measured["ok"] > 0 and measured["p50_ms"] > 0, (name, phase, measured)
        if name == "direct":
            assert path["proxy_rss_mib"] is None
        else:
            assert path["fixed_rate"]["proxy_cpu_ms_per_req"] > 0, (name, path)
            assert path["proxy_rss_mib"] > 0, (name, path)
        if name in PAIRS:
            by_sidecar = path["fixed_rate"]["proxy_cpu_ms_per_req_by_sidecar"]
            assert set(by_sidecar) == {"A", "B"} and min(by_sidecar.values()) > 0, (name, path)

    # tracing was on where asked: ~2 spans per call at 100% (A's CLIENT, B's SERVER span);
    # at 1% a few hundred calls may yield none, so only the count's presence is checked
    assert "otlp" not in result["paths"]["sidecar_pair"]
    assert result["paths"]["pair_trace1"]["otlp"]["spans"] >= 0
    assert result["paths"]["pair_trace100"]["otlp"]["spans_per_call"] > 1.5, result["paths"]
    vs_bare = result["vs_bare_pair"]
    assert list(vs_bare) == ["sidecar_pair", *VARIANTS]
    assert all(vs_bare[n]["cpu_vs_bare_pair"] > 0 for n in VARIANTS), vs_bare
    assert result["policy_target"]["limit_ratio"] == 1.15
    assert isinstance(result["policy_target"]["met"], bool)
    assert Path(result["chart"]).stat().st_size > 0
    assert "sidecar_pair" in stdout and "target" in stdout
    assert "target (issue 4) policy chain" in stdout

    # the mTLS pair's hop was mTLS, the other's plaintext (as the sidecars' config said before
    # measuring), and the mTLS pair is compared with the plaintext one
    tls, plain = result["paths"]["pair_mtls"]["wiring"], result["paths"]["pair_cp"]["wiring"]
    assert tls["endpoint_mtls"] and not plain["endpoint_mtls"], (tls, plain)
    assert tls["b_inbound_refuses_plaintext"] and not plain["b_inbound_refuses_plaintext"]
    assert tls["spiffe_id_a"].endswith("/service/bench-mesh-a"), tls
    assert tls["spiffe_id_b"].endswith("/service/bench-mesh-b"), tls
    assert plain["spiffe_id_a"] is None and plain["spiffe_id_b"] is None, plain
    mtls = result["mtls_vs_plaintext_pair"]
    assert (mtls["reference"], mtls["path"]) == ("pair_cp", "pair_mtls")
    assert mtls["cpu_ratio"] > 0 and mtls["unloaded_p50_ratio"] > 0, mtls
    assert mtls["cpu_ratio_a"] > 0 and mtls["cpu_ratio_b"] > 0, mtls
    assert "mTLS pair ÷ plaintext pair" in stdout
