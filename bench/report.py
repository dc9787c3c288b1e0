"""Turn a benchmark result into the four-path table, the ratios and the target verdicts.

Works on the JSON-shaped result dict (as written to bench/results/), so a saved result can be
re-rendered without re-running the benchmark.
"""

from __future__ import annotations

from typing import Any

LABELS = {"direct": "direct", "nginx": "nginx grpc_pass", "sidecar": "one sidecar",
          "sidecar_pair": "sidecar pair", "sidecar_stream": "one sidecar, stream shape"}

# The targets, per sidecar (per hop).
TARGET_CPU_MS_PER_REQ = 0.5
TARGET_ADDED_P50_MS = 0.6

Result = dict[str, Any]


def _get(result: Result, path: str, *keys: str) -> float | None:
    node: Any = result["paths"].get(path)
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return float(node) if isinstance(node, int | float) else None


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _fmt(value: float | None, digits: int = 2, suffix: str = "") -> str:
    return "—" if value is None else f"{value:.{digits}f}{suffix}"


def _fmt_ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def derived(result: Result) -> dict[str, dict[str, float | None]]:
    """Per path: ratios to direct and to nginx, and per-hop costs."""
    out: dict[str, dict[str, float | None]] = {}
    for name, p in result["paths"].items():
        hops = p.get("hops", 0)
        p50 = _get(result, name, "unloaded", "p50_ms")
        direct_p50 = _get(result, "direct", "unloaded", "p50_ms")
        cpu = _get(result, name, "fixed_rate", "proxy_cpu_ms_per_req")
        added = None if p50 is None or direct_p50 is None else p50 - direct_p50
        rps = _get(result, name, "max_throughput", "rps")
        rss = _get(result, name, "proxy_rss_mib")
        out[name] = {
            "added_p50_ms": added if hops else None,
            "added_p50_ms_per_hop": added / hops if hops and added is not None else None,
            "proxy_cpu_ms_per_req_per_hop": cpu / hops if hops and cpu is not None else None,
            "max_rps_vs_direct": _ratio(rps, _get(result, "direct", "max_throughput", "rps")),
            "p50_vs_direct": _ratio(p50, direct_p50),
            "p99_at_rate_vs_direct": _ratio(
                _get(result, name, "fixed_rate", "p99_ms"),
                _get(result, "direct", "fixed_rate", "p99_ms")),
            "max_rps_vs_nginx": _ratio(rps, _get(result, "nginx", "max_throughput", "rps")),
            "p50_vs_nginx": _ratio(p50, _get(result, "nginx", "unloaded", "p50_ms")),
            "cpu_vs_nginx": _ratio(cpu, _get(result, "nginx", "fixed_rate",
                                             "proxy_cpu_ms_per_req")) if hops else None,
            "rss_vs_nginx": _ratio(rss, _get(result, "nginx", "proxy_rss_mib")) if hops else None,
        }
    return out


def targets(result: Result) -> list[dict[str, Any]]:
    """The issue's two targets, judged on every sidecar path present."""
    d = derived(result)
    rows = []
    for key, limit, label in (
            ("proxy_cpu_ms_per_req_per_hop", TARGET_CPU_MS_PER_REQ,
             f"proxy CPU per request per sidecar at {result['plan']['rate']:g} rps"),
            ("added_p50_ms_per_hop", TARGET_ADDED_P50_MS, "added p50 per hop, unloaded")):
        values = {name: d[name][key] for name in ("sidecar", "sidecar_pair") if name in d}
        known = [v for v in values.values() if v is not None]
        met = bool(known) and all(v <= limit for v in known)
        rows.append({"target": label, "limit_ms": limit, "values_ms": values, "met": met})
    return rows


def _triple(result: Result, name: str, phase: str) -> str:
    vals = [_get(result, name, phase, k) for k in ("p50_ms", "p90_ms", "p99_ms")]
    text = " / ".join(_fmt(v) for v in vals)
    if phase == "fixed_rate" and fell_behind(result, name):
        text += f" (only {_fmt(_get(result, name, phase, 'rps'), 0)} rps)"
    return text


def fell_behind(result: Result, name: str) -> bool:
    """The path could not keep up with the fixed rate (its latencies include queueing)."""
    rps = _get(result, name, "fixed_rate", "rps")
    unsent = _get(result, name, "fixed_rate", "unsent") or 0
    return rps is not None and (rps < 0.95 * result["plan"]["rate"] or unsent > 0)


def markdown_tables(result: Result) -> str:
    rate = result["plan"]["rate"]
    conc = result["plan"]["max_concurrency"]
    names = list(result["paths"])
    lines = [
        f"| path | max rps (closed loop, {conc} in flight) | unloaded p50 / p90 / p99 ms "
        f"| at {rate:g} rps p50 / p90 / p99 ms | proxy CPU ms/req at {rate:g} rps "
        "| proxy CPU ms/req at max | proxy RSS MiB | gRPC errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        p = result["paths"][name]
        cpu_rate = _get(result, name, "fixed_rate", "proxy_cpu_ms_per_req")
        cpu_max = _get(result, name, "max_throughput", "proxy_cpu_ms_per_req")
        lines.append(
            f"| {LABELS.get(name, name)} | {_fmt(_get(result, name, 'max_throughput', 'rps'), 0)} "
            f"| {_triple(result, name, 'unloaded')} | {_triple(result, name, 'fixed_rate')} "
            f"| {_fmt(cpu_rate, 3)} | {_fmt(cpu_max, 3)} "
            f"| {_fmt(_get(result, name, 'proxy_rss_mib'), 1)} | {p.get('grpc_errors', 0)} |")
    d = derived(result)
    lines += [
        "",
        "| path | max rps ÷ direct | unloaded p50 ÷ direct | added p50 per hop ms "
        "| max rps ÷ nginx | unloaded p50 ÷ nginx | CPU/req ÷ nginx | RSS ÷ nginx |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        r = d[name]
        lines.append(
            f"| {LABELS.get(name, name)} | {_fmt_ratio(r['max_rps_vs_direct'])} "
            f"| {_fmt_ratio(r['p50_vs_direct'])} | {_fmt(r['added_p50_ms_per_hop'], 3)} "
            f"| {_fmt_ratio(r['max_rps_vs_nginx'])} | {_fmt_ratio(r['p50_vs_nginx'])} "
            f"| {_fmt_ratio(r['cpu_vs_nginx'])} | {_fmt_ratio(r['rss_vs_nginx'])} |")
    lines += ["", "| target (issue 2) | limit | one sidecar | sidecar pair, per sidecar | met |",
              "|---|---:|---:|---:|---|"]
    for t in targets(result):
        v = t["values_ms"]
        lines.append(f"| {t['target']} | ≤ {t['limit_ms']:g} ms | {_fmt(v.get('sidecar'), 3)} "
                     f"| {_fmt(v.get('sidecar_pair'), 3)} | {'yes' if t['met'] else '**no**'} |")
    return "\n".join(lines)


def text_table(result: Result) -> str:
    """A plain-text rendering for the terminal."""
    rate = result["plan"]["rate"]
    d = derived(result)
    header = (f"{'path':<16} {'max rps':>8} {'p50':>6} {'p90':>6} {'p99':>6} "
              f"{'p50@' + format(rate, 'g'):>8} {'p99@' + format(rate, 'g'):>8} "
              f"{'cpu ms/req':>10} {'RSS MiB':>8} {'errors':>6} | {'rps/dir':>7} {'p50/dir':>7} "
              f"{'+p50/hop':>8} | {'rps/ngx':>7} {'cpu/ngx':>7} {'rss/ngx':>7}")
    lines = [header, "-" * len(header)]
    for name, p in result["paths"].items():
        r = d[name]
        cpu = _get(result, name, "fixed_rate", "proxy_cpu_ms_per_req")
        lines.append(
            f"{name:<16} {_fmt(_get(result, name, 'max_throughput', 'rps'), 0):>8} "
            f"{_fmt(_get(result, name, 'unloaded', 'p50_ms')):>6} "
            f"{_fmt(_get(result, name, 'unloaded', 'p90_ms')):>6} "
            f"{_fmt(_get(result, name, 'unloaded', 'p99_ms')):>6} "
            f"{_fmt(_get(result, name, 'fixed_rate', 'p50_ms')):>8} "
            f"{_fmt(_get(result, name, 'fixed_rate', 'p99_ms')):>8} "
            f"{_fmt(cpu, 3):>10} {_fmt(_get(result, name, 'proxy_rss_mib'), 1):>8} "
            f"{p.get('grpc_errors', 0):>6} | "
            f"{_fmt_ratio(r['max_rps_vs_direct']):>7} {_fmt_ratio(r['p50_vs_direct']):>7} "
            f"{_fmt(r['added_p50_ms_per_hop'], 3):>8} | "
            f"{_fmt_ratio(r['max_rps_vs_nginx']):>7} {_fmt_ratio(r['cpu_vs_nginx']):>7} "
            f"{_fmt_ratio(r['rss_vs_nginx']):>7}")
    lines.append("")
    for name in result["paths"]:
        if fell_behind(result, name):
            lines.append(f"note: {name} fell behind the fixed rate (achieved "
                         f"{_fmt(_get(result, name, 'fixed_rate', 'rps'), 0)} rps): its latency "
                         "at that rate includes queueing")
    for t in targets(result):
        vals = ", ".join(f"{k} {_fmt(v, 3)} ms" for k, v in t["values_ms"].items())
        lines.append(f"target {t['target']} ≤ {t['limit_ms']:g} ms: {vals} -> "
                     f"{'MET' if t['met'] else 'NOT MET'}")
    return "\n".join(lines)
