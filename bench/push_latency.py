"""How fast a policy change reaches every connected sidecar (issue 3's target: from Apply
returning to the last ACK, p99 <= 1 s at N = 1,000), and what each connected sidecar costs the
control plane in memory.

    python -m bench.push_latency [--quick] [--sizes 100,1000] [--rounds 5]

For each N: a fresh control plane (embedded registry, policy file in a temp dir); its RSS at
rest; N simulated sidecars (bench/push_clients.py, in separate processes so that their CPU is
not the control plane's) connect, announce themselves and ACK everything, and the harness waits
until every stream has its full config and nothing was pushed for a while; RSS again. Then each
round applies, through the mesh.v1 PolicyService, a TrafficPolicy splitting svc-0 90/10 between
two new subsets (new names every round, so routes, clusters and endpoints all change) and
measures, per stream, from Apply returning to the moment that stream has ACKed routes,
clusters and endpoints holding the new subsets. Every step has a time limit; the control plane
and the client processes are stopped by pid at the end, even after a failure.

Writes bench/results/push-<timestamp>.json, prints a table and (full runs) rewrites the
"## Control plane push latency" section of docs/performance.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import struct_pb2
from mesh.v1 import policy_pb2, policy_pb2_grpc

from bench import procstat, push_report
from bench.procs import ROOT, Child, die_with_parent

TARGET_N = 1000
TARGET_P99_S = 1.0
POLICY_SERVICE = "svc-0"


@dataclass(frozen=True)
class PushPlan:
    sizes: tuple[int, ...] = (100, 1000)
    rounds: int = 5
    services: int = 10  # stream i is a sidecar of svc-(i mod services)
    streams_per_process: int = 500
    # Streams connect in batches, each waiting for the previous one to have its config: every
    # announcement changes every sidecar's endpoints, so N sidecars connecting at once make a
    # push storm the control plane takes long to get through (see docs/performance.md).
    connect_batch: int = 100
    quiet_s: float = 1.0  # "at rest": no stream received anything for this long
    connect_timeout_s: float = 240.0  # N streams connected and quiet
    round_timeout_s: float = 30.0  # every stream ACKed the new config


FULL = PushPlan()
QUICK = PushPlan(sizes=(20,), rounds=2, services=5, quiet_s=0.5, connect_batch=20,
                 connect_timeout_s=15.0, round_timeout_s=5.0)


class BenchError(Exception):
    pass


# --- statistics --------------------------------------------------------------------------------
def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest rank (q in 0..100) of a sorted list."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summarize_ms(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)
    return {name: round(percentile(ordered, q) * 1000, 1)
            for name, q in (("p50_ms", 50), ("p90_ms", 90), ("p99_ms", 99), ("max_ms", 100))}


def policy_for(round_no: int) -> policy_pb2.Resource:
    """svc-0 split 90/10 between two subsets named after the round: every round changes the
    routes, the clusters and (through the new cluster names) the endpoints."""
    v1, v2 = f"r{round_no}-v1", f"r{round_no}-v2"
    spec = struct_pb2.Struct()
    spec.update({"service": POLICY_SERVICE,
                 "subsets": [{"name": v1, "labels": {"version": "v1"}},
                             {"name": v2, "labels": {"version": "v2"}}],
                 "routes": [{"name": "split", "split": [{"subset": v1, "weight": 90},
                                                        {"subset": v2, "weight": 10}]}]})
    return policy_pb2.Resource(kind="TrafficPolicy", name=POLICY_SERVICE, spec=spec)


def marker_for(round_no: int) -> str:
    """Bytes found only in resources computed from round `round_no`'s policy (the cluster
    name of its v2 subset, which the routes, the clusters and the endpoints all carry)."""
    return f"{POLICY_SERVICE}|r{round_no}-v2"


# --- processes ---------------------------------------------------------------------------------
class ClientProcess:
    """One bench.push_clients process, spoken to by JSON lines over its stdin and stdout."""

    def __init__(self, control_plane: str, first: int, count: int, services: int,
                 log_dir: Path) -> None:
        self.first, self.count = first, count
        self.opened = 0  # streams started so far
        self.log_path = log_dir / f"clients-{first}.log"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(ROOT), str(ROOT / "gen"), env.get("PYTHONPATH", "")) if p)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bench.push_clients", "--control-plane", control_plane,
                 "--first", str(first), "--count", str(count), "--services", str(services)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env,
                cwd=str(ROOT), start_new_session=True, preexec_fn=die_with_parent)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._in, self._out = self.proc.stdin, self.proc.stdout

    @property
    def pid(self) -> int:
        return self.proc.pid

    def ask(self, command: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        if self.proc.poll() is not None:
            raise BenchError(f"client process {self.first} exited with {self.proc.returncode}"
                             f": {self.log_tail()}")
        self._in.write(json.dumps(command).encode() + b"\n")
        self._in.flush()
        ready, _, _ = select.select([self._out], [], [], timeout)
        if not ready:
            raise BenchError(f"client process {self.first} did not answer {command} within "
                             f"{timeout:g}s")
        line = self._out.readline()
        if not line:
            raise BenchError(f"client process {self.first} closed its output: "
                             f"{self.log_tail()}")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise BenchError(f"client process {self.first}: {reply['error']}")
        return reply

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-10:])
        return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(BenchError, OSError, ValueError):
                self.ask({"cmd": "quit"}, timeout=10)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for stream in (self._in, self._out):
            with contextlib.suppress(OSError):
                stream.close()


def start_control_plane(state_dir: Path) -> Child:
    return Child("control-plane", [sys.executable, "-m", "control_plane",
                                   "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
                                   "--state-dir", str(state_dir), "--log-level", "WARNING"])


_METRIC = re.compile(r"^(mesh_cp_[a-z_]+)\s+([0-9.eE+-]+)$")


def scrape(admin: str) -> dict[str, float]:
    """The control plane's own counters (pushes, ACKs, NACKs, translations, proxies)."""
    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {m.group(1): float(m.group(2)) for line in text.splitlines()
            if (m := _METRIC.match(line))}


def _counter_delta(before: dict[str, float], after: dict[str, float], name: str) -> int:
    key = f"mesh_cp_xds_{name}_total"
    return int(after.get(key, 0) - before.get(key, 0))


# --- one size ----------------------------------------------------------------------------------
def _statuses(clients: list[ClientProcess]) -> list[dict[str, Any]]:
    statuses = [c.ask({"cmd": "status"}) for c in clients]
    for c, s in zip(clients, statuses, strict=True):
        if s["errors"]:
            raise BenchError(f"{s['errors']} stream(s) of client process {c.first} failed: "
                             f"{s['last_error']}")
    return statuses


def wait_at_rest(clients: list[ClientProcess], quiet_s: float, timeout: float,
                 what: str) -> float:
    """Wait until every started stream has its full config and nothing arrived for quiet_s;
    returns when the last response arrived (monotonic)."""
    deadline = time.monotonic() + timeout
    while True:
        statuses = _statuses(clients)
        started = sum(s["started"] for s in statuses)
        configured = sum(s["configured"] for s in statuses)
        last = max(s["last_response"] for s in statuses)
        if configured == started and time.monotonic() - last >= quiet_s:
            return float(last)
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: after {timeout:g}s, {configured} of {started} streams "
                             f"have their config (last response "
                             f"{time.monotonic() - last:.1f}s ago)")
        time.sleep(0.05)


def spread(batch: int, room: list[int]) -> list[int]:
    """Split `batch` new streams over processes with `room` streams left, evenly."""
    shares = [0] * len(room)
    left = batch
    while left > 0 and any(r > s for r, s in zip(room, shares, strict=True)):
        for i, r in enumerate(room):
            if left and shares[i] < r:
                shares[i] += 1
                left -= 1
    return shares


def connect(clients: list[ClientProcess], n: int, plan: PushPlan) -> float:
    """Open all n streams, plan.connect_batch at a time (spread over the client processes);
    returns when the last response arrived once all are at rest."""
    deadline = time.monotonic() + plan.connect_timeout_s
    opened = 0
    while opened < n:
        batch = min(plan.connect_batch, n - opened)
        for c, share in zip(clients, spread(batch, [c.count - c.opened for c in clients]),
                            strict=True):
            if share:
                c.opened = c.ask({"cmd": "open", "count": share})["started"]
        opened += batch
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BenchError(f"connecting {n} streams took over {plan.connect_timeout_s:g}s")
        last = wait_at_rest(clients, plan.quiet_s if opened >= n else 0.1, remaining,
                            f"connecting {n} streams ({opened} opened)")
    return last


def measure_round(round_no: int, n: int, plan: PushPlan, clients: list[ClientProcess],
                  policy: policy_pb2_grpc.PolicyServiceStub, cp: Child) -> dict[str, Any]:
    for c in clients:
        c.ask({"cmd": "watch", "marker": marker_for(round_no)})
    metrics0 = scrape(cp.ports["admin"])
    cp_cpu0 = procstat.cpu_seconds(cp.pid)
    clients_cpu0 = procstat.total_cpu_seconds(c.pid for c in clients)
    sent = time.monotonic()
    policy.Apply(policy_pb2.ApplyRequest(resources=[policy_for(round_no)]), timeout=10)
    applied = time.monotonic()
    deadline = applied + plan.round_timeout_s
    done = 0
    while time.monotonic() < deadline:
        done = sum(c.ask({"cmd": "results"})["done"] for c in clients)
        if done == n:
            break
        time.sleep(0.02)
    finished = time.monotonic()
    cp_cpu = procstat.cpu_seconds(cp.pid) - cp_cpu0
    clients_cpu = procstat.total_cpu_seconds(c.pid for c in clients) - clients_cpu0
    streams = [s for c in clients for s in c.ask({"cmd": "results", "full": True})["streams"]]
    # Pushes still due after the last stream had it all (endpoints of the old subsets going
    # away) belong to the change too: count them once everything is at rest again.
    wait_at_rest(clients, plan.quiet_s, plan.round_timeout_s, f"round {round_no} settling")
    cp_cpu_to_rest = procstat.cpu_seconds(cp.pid) - cp_cpu0  # idle costs next to nothing
    metrics1 = scrape(cp.ports["admin"])
    latencies = [s["done"] - applied for s in streams if s["done"] is not None]
    # What a meshctl user waits for: Apply returns only after the control plane has done part
    # of the pushing (they share its event loop), so this is also shown from the request.
    from_sent = [s["done"] - sent for s in streams if s["done"] is not None]
    firsts = [min(v for k in ("rds", "cds", "eds") if (v := s[k]) is not None) - applied
              for s in streams if any(s[k] is not None for k in ("rds", "cds", "eds"))]
    return {
        "round": round_no,
        "apply_ms": round((applied - sent) * 1000, 1),
        "acked_all": len(latencies),
        "incomplete": n - len(latencies),
        **summarize_ms(latencies),
        "first_ack_p50_ms": summarize_ms(firsts)["p50_ms"],
        "from_apply_sent": summarize_ms(from_sent),
        "window_s": round(finished - applied, 3),
        "cp_cpu_s": round(cp_cpu, 3),
        "cp_cpu_to_rest_s": round(cp_cpu_to_rest, 3),
        "clients_cpu_s": round(clients_cpu, 3),
        "pushes": _counter_delta(metrics0, metrics1, "pushes"),
        "acks": _counter_delta(metrics0, metrics1, "acks"),
        "nacks": _counter_delta(metrics0, metrics1, "nacks"),
        "translations": _counter_delta(metrics0, metrics1, "translations"),
        "latencies_s": [round(x, 4) for x in latencies],
        "from_apply_sent_s": [round(x, 4) for x in from_sent],
    }


def bench_size(n: int, plan: PushPlan) -> dict[str, Any]:
    services = max(1, min(plan.services, n // 2))
    tmp = Path(tempfile.mkdtemp(prefix="bench-push-"))
    cp = start_control_plane(tmp / "state")
    clients: list[ClientProcess] = []
    ok = False
    try:
        rss_idle = procstat.memory(cp.pid)
        processes = math.ceil(n / plan.streams_per_process)
        started = time.monotonic()
        for k in range(processes):
            first = k * n // processes
            count = (k + 1) * n // processes - first
            clients.append(ClientProcess(cp.ports["grpc"], first, count, services, tmp))
        last = connect(clients, n, plan)
        connected_s = last - started
        if sum(s["configured"] for s in _statuses(clients)) != n:
            raise BenchError(f"not all {n} streams were opened")
        rss_connected = procstat.memory(cp.pid)
        connected = scrape(cp.ports["admin"]).get("mesh_cp_connected_proxies", 0)
        if int(connected) != n:
            raise BenchError(f"the control plane reports {connected:g} proxies, not {n}")
        rounds = []
        with grpc.insecure_channel(cp.ports["grpc"]) as channel:
            stub = policy_pb2_grpc.PolicyServiceStub(channel)
            for r in range(1, plan.rounds + 1):
                rounds.append(measure_round(r, n, plan, clients, stub, cp))
                print(f"    N={n} round {r}: " + push_report.round_line(rounds[-1]), flush=True)
        rss_after = procstat.memory(cp.pid)
        pooled = [x for r in rounds for x in r["latencies_s"]]
        pooled_sent = [x for r in rounds for x in r["from_apply_sent_s"]]
        result = {
            "n": n,
            "services": services,
            "client_processes": processes,
            "pids": {"control_plane": cp.pid, "clients": [c.pid for c in clients]},
            "connect_s": round(connected_s, 2),
            "cp_rss_idle_mib": round(rss_idle.rss_kib / 1024, 1),
            "cp_rss_connected_mib": round(rss_connected.rss_kib / 1024, 1),
            "cp_rss_per_sidecar_kib": round((rss_connected.rss_kib - rss_idle.rss_kib) / n, 1),
            "cp_rss_after_rounds_mib": round(rss_after.rss_kib / 1024, 1),
            "cp_peak_rss_mib": round(rss_after.hwm_kib / 1024, 1),
            "latency": {**summarize_ms(pooled), "samples": len(pooled),
                        "incomplete": sum(r["incomplete"] for r in rounds)},
            "latency_from_apply_sent": summarize_ms(pooled_sent),
            "apply_ms": sorted(r["apply_ms"] for r in rounds)[len(rounds) // 2],
            "rounds": rounds,
        }
        ok = True
        return result
    finally:
        for c in clients:
            c.stop()
        if not ok:
            (tmp / "control-plane.log").write_text(cp.output())
        cp.stop()
        if ok:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"logs of the failed run kept in {tmp}", file=sys.stderr)


def run_push_benchmark(plan: PushPlan) -> dict[str, Any]:
    _raise_fd_limit()
    with open("/proc/loadavg") as f:
        load_before = " ".join(f.read().split()[:3])
    result: dict[str, Any] = {
        "started_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "plan": asdict(plan),
        "host": {"cpus": os.cpu_count(), "grpcio": grpc.__version__,
                 "python": sys.version.split()[0], "loadavg_before": load_before},
        "target": {"n": TARGET_N, "p99_s": TARGET_P99_S},
        "sizes": {},
    }
    t0 = time.monotonic()
    for n in plan.sizes:
        print(f"  push latency, N={n} simulated sidecars", flush=True)
        result["sizes"][str(n)] = bench_size(n, plan)
    with open("/proc/loadavg") as f:
        result["host"]["loadavg_after"] = " ".join(f.read().split()[:3])
    result["duration_s"] = round(time.monotonic() - t0, 1)
    result["verdict"] = push_report.verdict(result)
    return result


def _raise_fd_limit() -> None:
    """N connections need N descriptors in the control plane, which inherits our limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def save(result: dict[str, Any], out_dir: Path) -> Path:
    stamp = result["started_at"].replace(":", "").replace("-", "")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"push-{stamp}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def run_after_paths(result: dict[str, Any], json_path: Path, docs_path: Path | None,
                    quick: bool) -> bool:
    """`make bench`'s second part (bench/run.py): measure, add the figures to the four-path
    result file under "push", print the table, update the docs section; False on failure."""
    print("\ncontrol plane push latency" + (" (quick)" if quick else ""), flush=True)
    try:
        push = run_push_benchmark(QUICK if quick else FULL)
    except BenchError as exc:
        print(f"FAILED: push benchmark: {exc}", file=sys.stderr)
        return False
    result["push"] = push
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(push_report.text_table(push))
    if docs_path:
        push_report.update_docs(docs_path, push, json_path)
    if not push["verdict"]["complete"]:
        print(f"FAILED: not every simulated sidecar ACKed every change (see {json_path})",
              file=sys.stderr)
    return bool(push["verdict"]["complete"])


def plan_from_args(args: argparse.Namespace) -> PushPlan:
    plan = QUICK if args.quick else FULL
    if args.sizes:
        plan = replace(plan, sizes=tuple(int(s) for s in args.sizes.split(",") if s.strip()))
    if args.rounds:
        plan = replace(plan, rounds=args.rounds)
    if args.streams_per_process:
        plan = replace(plan, streams_per_process=args.streams_per_process)
    return plan


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", help=f"comma-separated N (default {','.join(map(str, FULL.sizes))}"
                                   f"; --quick: {','.join(map(str, QUICK.sizes))})")
    p.add_argument("--rounds", type=int, help=f"policy changes per N (default {FULL.rounds})")
    p.add_argument("--streams-per-process", type=int,
                   help=f"simulated sidecars per client process (default "
                        f"{FULL.streams_per_process})")


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, lambda signum, _f: sys.exit(128 + signum))
    p = argparse.ArgumentParser(prog="python -m bench.push_latency", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="N=20, two rounds (~10 s): a smoke run, figures mean little")
    add_flags(p)
    p.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--docs", type=Path, default=None,
                   help="markdown file whose push section to rewrite (default: "
                        "docs/performance.md on full runs, none with --quick)")
    p.add_argument("--no-docs", action="store_true")
    args = p.parse_args(argv)
    plan = plan_from_args(args)
    if not plan.sizes or min(plan.sizes) < 2 or plan.rounds < 1:
        p.error("every size must be at least 2 and --rounds at least 1")
    try:
        result = run_push_benchmark(plan)
    except BenchError as exc:
        print(f"push benchmark failed: {exc}", file=sys.stderr)
        return 1
    path = save(result, args.out_dir)
    print()
    print(push_report.text_table(result))
    print(f"\nresult: {path}")
    docs_path = args.docs or (None if args.quick else ROOT / "docs" / "performance.md")
    if docs_path and not args.no_docs:
        push_report.update_docs(docs_path, result, path)
        print(f"docs:   {docs_path}")
    return 0 if result["verdict"]["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
