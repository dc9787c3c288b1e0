"""`make bench`: what a hop costs, measured on several paths to one upstream in one run.

For each path (direct, nginx grpc_pass, one sidecar, a sidecar pair; then the pair with every
policy on, and with tracing at 1% and at 100%; then a pair following a control plane, plaintext
and mTLS) and the same load (UnaryCall, 100-byte payload,
100-byte response, one HTTP/2 connection from the client):
  1. warm-up, closed loop (connections, channels and caches settle; not reported);
  2. unloaded latency: closed loop with one call in flight;
  3. fixed rate (default 500 rps): latency under load, and the proxies' CPU per request;
  4. max throughput: closed loop at a fixed concurrency (not for the pair's variants, which
     are compared with the bare pair on phases 2 and 3 only, nor for the control-plane pairs,
     the mTLS one compared with the plaintext one likewise).
Proxy CPU is utime + stime from /proc over each phase, summed over the path's proxy
processes (and per sidecar for the pairs); RSS is read after the phases. Sidecars run with
--trace-sampling 0 except on the tracing paths. Any gRPC error fails the run (exit 1).

Writes bench/results/<timestamp>.json and .png, prints the table with ratios, and (full runs)
rewrites the generated part of docs/performance.md. Then (unless --skip-push) the control
plane's push latency to N simulated sidecars (bench/push_latency.py; quick with --quick), added
to the same result file under "push" and to its own section of docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import docs, loadgen, nginx, procstat, report
from bench.loadgen import Load
from bench.paths import FACTORIES, PATHS, Shared, Topology
from bench.procs import ROOT, start_upstream
from bench.report import text_table


@dataclass(frozen=True)
class Plan:
    warmup_s: float = 1.0
    unloaded_s: float = 3.0
    rate_s: float = 5.0
    max_s: float = 4.0
    rate: float = 500.0
    max_concurrency: int = 32
    warmup_concurrency: int = 8
    rounds: int = 3  # the machine is shared: the median of three rounds rejects one bad one


FULL = Plan()
QUICK = Plan(warmup_s=0.5, unloaded_s=2.0, rate_s=2.0, max_s=2.0, rounds=1)


def _machine_busy() -> tuple[float, float]:
    """(busy jiffies, total jiffies) of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [float(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    total = sum(fields[:8])
    return total - idle, total


class Meter:
    """CPU used by the path's proxies (in all, and per part: each sidecar of a pair) and by the
    upstream over one load phase."""

    def __init__(self, proxy_pids: list[int], upstream_pid: int,
                 parts: dict[str, list[int]] | None = None) -> None:
        self.proxy_pids = proxy_pids
        self.upstream_pid = upstream_pid
        self.parts = parts or {}

    def __enter__(self) -> Meter:
        self._parts = {k: procstat.total_cpu_seconds(v) for k, v in self.parts.items()}
        self._proxy = procstat.total_cpu_seconds(self.proxy_pids)
        self._upstream = procstat.cpu_seconds(self.upstream_pid)
        self._busy, self._total = _machine_busy()
        self._t = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        self.proxy_cpu_s = procstat.total_cpu_seconds(self.proxy_pids) - self._proxy
        self.part_cpu_s = {k: procstat.total_cpu_seconds(v) - self._parts[k]
                           for k, v in self.parts.items()}
        self.upstream_cpu_s = procstat.cpu_seconds(self.upstream_pid) - self._upstream
        busy, total = _machine_busy()
        cpus = os.cpu_count() or 1
        self.machine_busy_cores = ((busy - self._busy) / (total - self._total) * cpus
                                   if total > self._total else 0.0)
        self.wall_s = time.monotonic() - self._t


def measure(topology: Topology, upstream_pid: int, load: Load) -> dict[str, Any]:
    parts = topology.parts() if topology.parts else None
    with Meter(topology.pids(), upstream_pid, parts) as meter:
        result = loadgen.run(topology.target, load)
    out = result.as_dict()
    n = max(result.completed, 1)
    out["load"] = asdict(load)
    out["proxy_cpu_ms_per_req"] = meter.proxy_cpu_s * 1000 / n if topology.hops else None
    if parts:
        out["proxy_cpu_ms_per_req_by_sidecar"] = {k: v * 1000 / n
                                                  for k, v in meter.part_cpu_s.items()}
    out["proxy_cpu_cores"] = meter.proxy_cpu_s / meter.wall_s if topology.hops else None
    out["upstream_cpu_ms_per_req"] = meter.upstream_cpu_s * 1000 / n
    out["machine_busy_cores"] = round(meter.machine_busy_cores, 2)
    return out


def bench_path(name: str, upstream: str, upstream_pid: int, plan: Plan, shared: Shared
               ) -> dict[str, Any]:
    with FACTORIES[name](upstream, shared) as topology:
        print(f"  {name}: {topology.description}", flush=True)
        warmup = measure(topology, upstream_pid,
                         Load(plan.warmup_s, concurrency=plan.warmup_concurrency))
        loads = {
            "unloaded": Load(plan.unloaded_s, concurrency=1),
            "fixed_rate": Load(plan.rate_s, concurrency=plan.max_concurrency, rate=plan.rate),
            "max_throughput": Load(plan.max_s, concurrency=plan.max_concurrency),
        }
        phases = {phase: measure(topology, upstream_pid, load)
                  for phase, load in loads.items() if phase in topology.phases}
        pids = topology.pids()
        mem = procstat.total_memory(pids) if topology.hops else None
    errors = warmup["error_count"] + sum(p["error_count"] for p in phases.values())
    out = {
        "description": topology.description,
        "hops": topology.hops,
        "proxy_processes": len(pids),
        "target": topology.target,
        **phases,
        "warmup_errors": warmup["errors"],
        "proxy_rss_mib": mem.rss_kib / 1024 if mem else None,
        "proxy_peak_rss_mib": mem.hwm_kib / 1024 if mem else None,
        "grpc_errors": errors,
    }
    if "wiring" in topology.after:
        out["wiring"] = topology.after["wiring"]
    otlp = topology.after.get("otlp")
    if otlp is not None:  # spans the receiver got per call sent (warm-up included)
        calls = warmup["ok"] + warmup["error_count"] + sum(
            p["ok"] + p["error_count"] for p in phases.values())
        out["otlp"] = {**otlp, "calls": calls,
                       "spans_per_call": otlp["spans"] / calls if calls else None}
    return out


def _median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of every numeric leaf across rounds (structure of the first round)."""
    first = runs[0]
    out: dict[str, Any] = {}
    for key, value in first.items():
        if isinstance(value, dict) and all(isinstance(r.get(key), dict) for r in runs):
            out[key] = _median_of([r[key] for r in runs])
        elif isinstance(value, int | float) and not isinstance(value, bool) and all(
                isinstance(r.get(key), int | float) for r in runs):
            out[key] = (sum(r[key] for r in runs) if key in ("grpc_errors", "ok", "error_count")
                        else statistics.median(r[key] for r in runs))
        else:
            out[key] = value
    return out


def host_info() -> dict[str, Any]:
    import grpc

    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    return {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "nginx": nginx.version(),
        "loadavg_before": load,
    }


def run_benchmark(plan: Plan, names: list[str]) -> dict[str, Any]:
    result: dict[str, Any] = {
        "started_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host": host_info(),
        "plan": asdict(plan),
        "workload": {"method": loadgen.METHOD, "payload_bytes": loadgen.PAYLOAD_BYTES,
                     "response_bytes": loadgen.RESPONSE_BYTES, "client_connections": 1,
                     "load_generator": "bench/go/bin/loadgen (grpc-go)",
                     "upstream": "bench/go/bin/interop_server (grpc-go TestService)"},
    }
    t0 = time.monotonic()
    upstream = start_upstream()
    shared = Shared()
    try:
        rounds: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
        for i in range(plan.rounds):
            print(f"round {i + 1}/{plan.rounds}", flush=True)
            for name in names:
                rounds[name].append(bench_path(name, upstream.ports["server"], upstream.pid,
                                               plan, shared))
    finally:
        shared.close()
        upstream.stop()
    result["paths"] = {n: _median_of(r) if len(r) > 1 else r[0] for n, r in rounds.items()}
    if plan.rounds > 1:
        result["rounds"] = rounds
    overheads = report.overheads(result)
    if len(overheads) > 1:  # the bare pair and at least one variant
        result["vs_bare_pair"] = overheads
        result["policy_target"] = report.policy_target(result)
    mtls = report.mtls_cost(result)
    if mtls is not None:
        result["mtls_vs_plaintext_pair"] = mtls
    with open("/proc/loadavg") as f:
        result["host"]["loadavg_after"] = " ".join(f.read().split()[:3])
    result["duration_s"] = round(time.monotonic() - t0, 1)
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="short phases, one round: a smoke run, figures are rough")
    p.add_argument("--phase-seconds", type=float,
                   help="override every phase's duration (warm-up gets half)")
    p.add_argument("--rate", type=float, help=f"fixed-rate phase, rps (default {FULL.rate:g})")
    p.add_argument("--concurrency", type=int,
                   help=f"calls in flight for max throughput (default {FULL.max_concurrency})")
    p.add_argument("--rounds", type=int, help="repeat all paths N times, report medians")
    p.add_argument("--paths", default=",".join(PATHS),
                   help="comma-separated, in order; any of " + ",".join(FACTORIES))
    p.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--docs", type=Path, default=None,
                   help="markdown file to update (default: docs/performance.md on full runs, "
                        "none with --quick)")
    p.add_argument("--no-docs", action="store_true", help="do not update any markdown file")
    p.add_argument("--no-chart", action="store_true")
    p.add_argument("--skip-push", action="store_true",
                   help="leave out the control plane push-latency benchmark (bench/push_latency"
                        ".py) that runs after the paths")
    return p.parse_args(argv)


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds the `finally`s that stop the proxies


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    args = parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.phase_seconds:
        s = args.phase_seconds
        plan = replace(plan, warmup_s=s / 2, unloaded_s=s, rate_s=s, max_s=s)
    if args.rate:
        plan = replace(plan, rate=args.rate)
    if args.concurrency:
        plan = replace(plan, max_concurrency=args.concurrency)
    if args.rounds:
        plan = replace(plan, rounds=args.rounds)
    names = [n.strip().replace("-", "_") for n in args.paths.split(",") if n.strip()]
    unknown = [n for n in names if n not in FACTORIES]
    if unknown:
        print(f"unknown path(s): {', '.join(unknown)}", file=sys.stderr)
        return 2

    result = run_benchmark(plan, names)
    stamp = result["started_at"].replace(":", "").replace("-", "")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    json_path = args.out_dir / f"{stamp}.json"
    if not args.no_chart:
        from bench.chart import write_chart

        result["chart"] = str(write_chart(result, args.out_dir / f"{stamp}.png"))
    json_path.write_text(json.dumps(result, indent=2) + "\n")

    print()
    print(text_table(result))
    print(f"\nresult: {json_path}" + (f"\nchart:  {result['chart']}" if "chart" in result else ""))
    docs_path = args.docs or (None if args.quick else ROOT / "docs" / "performance.md")
    if docs_path and not args.no_docs:
        docs.update(docs_path, result, json_path)
        print(f"docs:   {docs_path}")
    code = 0
    errors = sum(p["grpc_errors"] for p in result["paths"].values())
    if errors:
        print(f"FAILED: {errors} gRPC errors (see {json_path})", file=sys.stderr)
        code = 1
    if not args.skip_push:
        from bench import push_latency

        if not push_latency.run_after_paths(result, json_path,
                                            None if args.no_docs else docs_path, args.quick):
            code = 1
    return code


if __name__ == "__main__":
    sys.exit(main())
