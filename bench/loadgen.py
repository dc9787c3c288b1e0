"""Drive load with the Go load generator (bench/go/bin/loadgen).

The generator is not Python on purpose: it must not compete with the sidecar for the GIL-bound
CPU being measured, and it checks the gRPC status of every response (not only HTTP 200).
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.procs import die_with_parent, go_binary

METHOD = "/grpc.testing.TestService/UnaryCall"
PAYLOAD_BYTES = 100
RESPONSE_BYTES = 100


@dataclass(frozen=True)
class Load:
    """One load phase: closed loop at `concurrency`, or open loop at `rate` requests/s."""
    seconds: float
    concurrency: int = 1
    rate: float = 0.0          # 0: closed loop
    connections: int = 1
    warmup_seconds: float = 0.0


@dataclass
class LoadResult:
    ok: int
    errors: dict[str, int] = field(default_factory=dict)  # gRPC status name -> count
    seconds: float = 0.0
    rps: float = 0.0           # completed calls per second (ok + errors)
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    mean_ms: float = 0.0
    unsent: int = 0            # fixed rate: scheduled calls never sent (the path fell behind)
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def completed(self) -> int:
        return self.ok + self.error_count

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("raw")
        d["error_count"] = self.error_count
        return d


def run(target: str, load: Load, timeout_slack: float = 30.0) -> LoadResult:
    """Run one phase and return what the generator measured.

    The generator's own warm-up is off by default: the caller measures the proxies' CPU over
    the generator's whole life and divides by the calls it reports, so every call sent must
    be a counted one (a separate warm-up phase settles the proxies first).
    """
    argv = [str(go_binary("loadgen")), "--target", target,
            "--concurrency", str(load.concurrency), "--connections", str(load.connections),
            "--duration", f"{load.seconds:g}", "--warmup", f"{load.warmup_seconds:g}",
            "--rate", f"{load.rate:g}", "--payload-size", str(PAYLOAD_BYTES),
            "--response-size", str(RESPONSE_BYTES)]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False,
                          timeout=load.seconds + load.warmup_seconds + timeout_slack,
                          preexec_fn=die_with_parent)
    if proc.returncode != 0:
        raise RuntimeError(f"loadgen failed ({proc.returncode}) against {target}: "
                           f"{proc.stderr.strip()}")
    raw = json.loads(proc.stdout)
    lat = raw.get("latency_ms", {})
    return LoadResult(
        ok=int(raw["ok"]),
        errors={str(k): int(v) for k, v in (raw.get("errors") or {}).items()},
        seconds=float(raw["duration_s"]),
        rps=float(raw["rps"]),
        p50_ms=float(lat.get("p50", 0.0)), p90_ms=float(lat.get("p90", 0.0)),
        p99_ms=float(lat.get("p99", 0.0)), max_ms=float(lat.get("max", 0.0)),
        mean_ms=float(lat.get("mean", 0.0)),
        unsent=int(raw.get("unsent", 0)),
        raw=raw,
    )
