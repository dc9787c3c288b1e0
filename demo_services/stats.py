"""Counters and latency percentiles of the load generator, and the one-line progress report.

Pure (time is passed in), so the numbers the demo prints can be checked without a network.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

WINDOW_SECONDS = 10.0  # live percentiles cover the last few seconds, not the whole run
MAX_SAMPLES = 200_000  # the whole-run percentiles keep at most this many latencies


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an already sorted list; 0 when empty."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclass
class LoadStats:
    started: float
    stopped: float | None = None  # when the load stopped (calls in flight may still finish)
    calls: int = 0
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    by_method: Counter[str] = field(default_factory=Counter)
    # mesh service -> instance -> calls it served (as reported in the responses)
    served: dict[str, Counter[str]] = field(default_factory=dict)
    recent: deque[tuple[float, float]] = field(default_factory=deque)
    samples: list[float] = field(default_factory=list)
    _last_report: tuple[float, int] | None = None

    def record(self, now: float, method: str, latency_ms: float, code: str,
               served: Iterable[tuple[str, str]] = ()) -> None:
        """One finished call; `served` lists (mesh service, instance) pairs the reply named."""
        self.calls += 1
        self.by_method[method] += 1
        if code == "OK":
            self.ok += 1
        else:
            self.errors[code] += 1
        for service, instance in served:
            if instance:
                self.served.setdefault(service, Counter())[instance] += 1
        self.recent.append((now, latency_ms))
        while self.recent and self.recent[0][0] < now - WINDOW_SECONDS:
            self.recent.popleft()
        if len(self.samples) < MAX_SAMPLES:
            self.samples.append(latency_ms)

    def progress_line(self, now: float) -> str:
        """Calls so far, errors by code, rate since the last line, recent p50/p99, who served."""
        last_time, last_calls = self._last_report or (self.started, 0)
        elapsed = max(now - last_time, 1e-9)
        rps = (self.calls - last_calls) / elapsed
        self._last_report = (now, self.calls)
        window = sorted(ms for t, ms in self.recent if t >= now - WINDOW_SECONDS)
        errors = " ".join(f"{code}={n}" for code, n in sorted(self.errors.items())) or "0"
        parts = [f"{now - self.started:5.0f}s", f"calls {self.calls}", f"ok {self.ok}",
                 f"err {errors}", f"{rps:5.1f} rps",
                 f"p50 {percentile(window, 50):.1f} p99 {percentile(window, 99):.1f} ms"]
        for service in sorted(self.served):
            counts = self.served[service]
            # "payments 1:40 2:38" for payments-1 and payments-2: short enough for one line.
            short = (i.removeprefix(f"{service}-") for i in sorted(counts))
            parts.append(f"{service} " + " ".join(
                f"{s}:{counts[i]}" for s, i in zip(short, sorted(counts), strict=True)))
        return " | ".join(parts)

    def summary(self, now: float) -> dict[str, Any]:
        elapsed = max((self.stopped or now) - self.started, 1e-9)
        ordered = sorted(self.samples)
        return {
            "seconds": round(elapsed, 2),
            "calls": self.calls,
            "ok": self.ok,
            "errors": dict(self.errors),
            "rps": round(self.calls / elapsed, 1),
            "latency_ms": {f"p{q}": round(percentile(ordered, q), 2) for q in (50, 90, 99)}
            | {"max": round(ordered[-1], 2) if ordered else 0.0},
            "by_method": dict(self.by_method),
            "served": {svc: dict(c) for svc, c in self.served.items()},
        }


def format_summary(summary: dict[str, Any]) -> str:
    lat = summary["latency_ms"]
    errors = ", ".join(f"{c}={n}" for c, n in sorted(summary["errors"].items())) or "none"
    lines = [
        f"{summary['calls']} calls in {summary['seconds']:.1f}s ({summary['rps']} rps): "
        f"{summary['ok']} OK, errors: {errors}",
        f"latency ms: p50 {lat['p50']}  p90 {lat['p90']}  p99 {lat['p99']}  max {lat['max']}",
        "by method: " + ", ".join(f"{m}={n}" for m, n in sorted(summary["by_method"].items())),
    ]
    for service, counts in sorted(summary["served"].items()):
        lines.append(f"{service} served by: "
                     + ", ".join(f"{i}={n}" for i, n in sorted(counts.items())))
    return "\n".join(lines)
