"""One PNG with the paths side by side: throughput, latency, CPU per request, memory; and (when
the pair's variants ran) the policy chain and tracing next to the bare pair."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.report import (
    BARE_PAIR,
    LABELS,
    TARGET_CPU_MS_PER_REQ,
    TARGET_POLICY_CPU_RATIO,
    Result,
    overheads,
)


def write_chart(result: Result, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display on a server; must precede pyplot
    import matplotlib.pyplot as plt

    names = list(result["paths"])
    labels = [LABELS.get(n, n) for n in names]
    paths = result["paths"]
    rate = result["plan"]["rate"]
    palette = ["#7f7f7f", "#2ca02c", "#1f77b4", "#9467bd", "#ff7f0e", "#8c564b"]
    colors = [palette[i % len(palette)] for i in range(len(names))]

    def val(name: str, phase: str, key: str) -> float:
        v = paths[name].get(phase, {}).get(key)
        return float(v) if isinstance(v, int | float) else 0.0

    vs_bare = overheads(result)
    rows = 3 if len(vs_bare) > 1 else 2
    fig, axes = plt.subplots(rows, 2, figsize=(13, 4 * rows))
    ax = axes[0][0]
    measured = [n for n in names if "max_throughput" in paths[n]]  # not the pair's variants
    ax.bar([LABELS.get(n, n) for n in measured],
           [val(n, "max_throughput", "rps") for n in measured],
           color=[colors[names.index(n)] for n in measured])
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    ax.set_title(f"max throughput (closed loop, {result['plan']['max_concurrency']} in flight)")
    ax.set_ylabel("requests / s")

    def latency(ax, phase: str, title: str) -> None:
        width = 0.25
        xs = range(len(names))
        for i, key in enumerate(("p50_ms", "p90_ms", "p99_ms")):
            ax.bar([x + (i - 1) * width for x in xs], [val(n, phase, key) for n in names],
                   width, label=key.removesuffix("_ms"))
        ax.set_xticks(list(xs), labels, rotation=20, ha="right", fontsize=8)
        ax.set_title(title)
        ax.set_ylabel("ms")
        ax.legend()

    latency(axes[0][1], "unloaded", "latency, unloaded (1 in flight)")
    latency(axes[1][0], "fixed_rate", f"latency at {rate:g} rps")

    ax = axes[1][1]
    proxied = [n for n in names if paths[n].get("hops")]
    per_hop = [val(n, "fixed_rate", "proxy_cpu_ms_per_req") / paths[n]["hops"] for n in proxied]
    ax.bar([LABELS.get(n, n) for n in proxied], per_hop,
           color=[colors[names.index(n)] for n in proxied])
    ax.axhline(TARGET_CPU_MS_PER_REQ, color="red", linestyle="--",
               label=f"target ≤ {TARGET_CPU_MS_PER_REQ} ms per sidecar")
    for i, n in enumerate(proxied):
        ax.annotate(f"{paths[n].get('proxy_rss_mib', 0):.0f} MiB", (i, per_hop[i]),
                    ha="center", va="bottom", fontsize=8)
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    ax.set_title(f"proxy CPU per request per proxy at {rate:g} rps (labels: RSS of all proxies)")
    ax.set_ylabel("CPU ms / request")
    ax.set_ylim(0, max([*per_hop, TARGET_CPU_MS_PER_REQ]) * 1.4)  # room for labels and legend
    ax.legend(loc="upper left")

    if rows == 3:
        _variants(axes[2][0], axes[2][1], vs_bare, rate)

    fig.suptitle(f"100-byte UnaryCall through each path — {result['started_at']} "
                 f"({result['host']['cpus']} CPUs, load avg {result['host']['loadavg_before']})",
                 fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def _variants(cpu_ax: Any, p50_ax: Any, vs_bare: dict[str, dict[str, Any]], rate: float) -> None:
    """The pair with policies / tracing next to the bare pair: CPU per sidecar (A and B
    stacked) with the issue 4 limit, and the p50s."""
    names = list(vs_bare)
    labels = [LABELS.get(n, n) for n in names]

    def num(v: Any) -> float:
        return float(v) if isinstance(v, int | float) else 0.0

    a = [num(vs_bare[n]["cpu_ms_per_req_a"]) for n in names]
    b = [num(vs_bare[n]["cpu_ms_per_req_b"]) for n in names]
    cpu_ax.bar(labels, a, label="sidecar A (outbound)", color="#9467bd")
    cpu_ax.bar(labels, b, bottom=a, label="sidecar B (inbound)", color="#c5b0d5")
    bare = num(vs_bare[BARE_PAIR]["cpu_ms_per_req"])
    if bare:
        cpu_ax.axhline(bare * TARGET_POLICY_CPU_RATIO, color="red", linestyle="--",
                       label=f"issue 4 limit for the policy chain: {TARGET_POLICY_CPU_RATIO:.2f}x "
                             "the bare pair")
    for i, n in enumerate(names):
        ratio = vs_bare[n]["cpu_vs_bare_pair"]
        if n != BARE_PAIR and isinstance(ratio, int | float):
            cpu_ax.annotate(f"{ratio:.2f}x", (i, a[i] + b[i]), ha="center", va="bottom",
                            fontsize=8)
    cpu_ax.set_title(f"the pair's CPU per request at {rate:g} rps, vs the bare pair")
    cpu_ax.set_ylabel("CPU ms / request (both sidecars)")
    cpu_ax.set_ylim(0, max([*(x + y for x, y in zip(a, b, strict=True)),
                            bare * TARGET_POLICY_CPU_RATIO]) * 1.4)
    cpu_ax.legend(loc="upper left", fontsize=8)

    width = 0.35
    xs = list(range(len(names)))
    p50_ax.bar([x - width / 2 for x in xs], [num(vs_bare[n]["unloaded_p50_ms"]) for n in names],
               width, label="unloaded p50")
    p50_ax.bar([x + width / 2 for x in xs], [num(vs_bare[n]["p50_at_rate_ms"]) for n in names],
               width, label=f"p50 at {rate:g} rps")
    p50_ax.set_xticks(xs, labels)
    p50_ax.set_title("the pair's p50, vs the bare pair")
    p50_ax.set_ylabel("ms")
    p50_ax.legend(fontsize=8)
