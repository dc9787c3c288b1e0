"""One PNG with the four paths side by side: throughput, latency, CPU per request, memory."""

from __future__ import annotations

from pathlib import Path

from bench.report import LABELS, TARGET_CPU_MS_PER_REQ, Result


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

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ax = axes[0][0]
    ax.bar(labels, [val(n, "max_throughput", "rps") for n in names], color=colors)
    ax.set_title(f"max throughput (closed loop, {result['plan']['max_concurrency']} in flight)")
    ax.set_ylabel("requests / s")

    def latency(ax, phase: str, title: str) -> None:
        width = 0.25
        xs = range(len(names))
        for i, key in enumerate(("p50_ms", "p90_ms", "p99_ms")):
            ax.bar([x + (i - 1) * width for x in xs], [val(n, phase, key) for n in names],
                   width, label=key.removesuffix("_ms"))
        ax.set_xticks(list(xs), labels)
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
        ax.annotate(f"RSS {paths[n].get('proxy_rss_mib', 0):.0f} MiB in all", (i, per_hop[i]),
                    ha="center", va="bottom", fontsize=8)
    ax.set_title(f"proxy CPU per request per proxy at {rate:g} rps")
    ax.set_ylabel("CPU ms / request")
    ax.set_ylim(0, max([*per_hop, TARGET_CPU_MS_PER_REQ]) * 1.4)  # room for labels and legend
    ax.legend(loc="upper left")

    fig.suptitle(f"100-byte UnaryCall through each path — {result['started_at']} "
                 f"({result['host']['cpus']} CPUs, load avg {result['host']['loadavg_before']})",
                 fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
