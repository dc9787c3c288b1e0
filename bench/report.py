"""Turn a benchmark result into the tables, the ratios and the target verdicts.

Works on the JSON-shaped result dict (as written to bench/results/), so a saved result can be
re-rendered without re-running the benchmark.
"""

from __future__ import annotations

from typing import Any

LABELS = {"direct": "direct", "nginx": "nginx grpc_pass", "sidecar": "one sidecar",
          "sidecar_pair": "sidecar pair", "sidecar_stream": "one sidecar, stream shape",
          "pair_policies": "pair, all policies", "pair_trace1": "pair, tracing 1%",
          "pair_trace100": "pair, tracing 100%",
          "pair_cp": "pair via control plane, plaintext",
          "pair_mtls": "pair via control plane, mTLS"}

# The targets, per sidecar (per hop).
TARGET_CPU_MS_PER_REQ = 0.5
TARGET_ADDED_P50_MS = 0.6
# Issue 4: the full policy chain costs at most 15% more CPU per request than a bare hop.
TARGET_POLICY_CPU_RATIO = 1.15
BARE_PAIR = "sidecar_pair"
PAIR_VARIANTS = ("pair_policies", "pair_trace1", "pair_trace100")
# Issue 5: the mTLS pair against the same pair in plaintext, both following one control plane.
PLAINTEXT_PAIR = "pair_cp"
MTLS_PAIR = "pair_mtls"

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
    table = _text_table(result)
    extra = [t for t in (text_overheads(result), text_mtls(result)) if t]
    return "\n\n".join([table, *extra])


def _text_table(result: Result) -> str:
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


# --- issue 4 (policy chain) and issue 6 (tracing): each variant of the pair vs the bare pair ---


def _round_ratios(result: Result, name: str, reference: str = BARE_PAIR,
                  phase: str = "fixed_rate", key: str = "proxy_cpu_ms_per_req") -> list[float]:
    """`key` of `name` ÷ the reference path's (by default: CPU per request ÷ the bare pair's),
    round by round (same round, minutes apart)."""
    rounds = result.get("rounds", {})
    out = []
    for mine, ref in zip(rounds.get(name, []), rounds.get(reference, []), strict=False):
        a = mine.get(phase, {}).get(key)
        b = ref.get(phase, {}).get(key)
        if isinstance(a, int | float) and isinstance(b, int | float) and b > 0:
            out.append(a / b)
    return out


def overheads(result: Result) -> dict[str, dict[str, Any]]:
    """Per variant present (and the bare pair itself, as the reference row): CPU per request
    in all, per sidecar and for A and B, its ratio to the bare pair's, and the added p50."""
    paths = result["paths"]
    if BARE_PAIR not in paths:
        return {}
    bare_cpu = _get(result, BARE_PAIR, "fixed_rate", "proxy_cpu_ms_per_req")
    bare_p50 = _get(result, BARE_PAIR, "unloaded", "p50_ms")
    bare_rate_p50 = _get(result, BARE_PAIR, "fixed_rate", "p50_ms")
    out: dict[str, dict[str, Any]] = {}
    for name in (BARE_PAIR, *PAIR_VARIANTS):
        if name not in paths:
            continue
        cpu = _get(result, name, "fixed_rate", "proxy_cpu_ms_per_req")
        ratio = _ratio(cpu, bare_cpu)
        p50 = _get(result, name, "unloaded", "p50_ms")
        rate_p50 = _get(result, name, "fixed_rate", "p50_ms")
        otlp = paths[name].get("otlp") or {}
        out[name] = {
            "cpu_ms_per_req": cpu,
            "cpu_ms_per_req_per_sidecar": None if cpu is None else cpu / 2,
            "cpu_ms_per_req_a": _get(result, name, "fixed_rate",
                                     "proxy_cpu_ms_per_req_by_sidecar", "A"),
            "cpu_ms_per_req_b": _get(result, name, "fixed_rate",
                                     "proxy_cpu_ms_per_req_by_sidecar", "B"),
            "cpu_vs_bare_pair": ratio,
            "cpu_added_pct": None if ratio is None else (ratio - 1) * 100,
            "cpu_added_ms_per_req_per_sidecar": (None if cpu is None or bare_cpu is None
                                                 else (cpu - bare_cpu) / 2),
            "cpu_vs_bare_pair_by_round": _round_ratios(result, name),
            "unloaded_p50_ms": p50,
            "added_p50_ms": None if p50 is None or bare_p50 is None else p50 - bare_p50,
            "p50_at_rate_ms": rate_p50,
            "added_p50_at_rate_ms": (None if rate_p50 is None or bare_rate_p50 is None
                                     else rate_p50 - bare_rate_p50),
            "p99_at_rate_ms": _get(result, name, "fixed_rate", "p99_ms"),
            "spans_per_call": otlp.get("spans_per_call"),
            "fell_behind": fell_behind(result, name),
        }
    return out


def policy_target(result: Result) -> dict[str, Any] | None:
    """Issue 4's target judged on this run, or None when either path is missing."""
    o = overheads(result).get("pair_policies")
    if o is None or o["cpu_vs_bare_pair"] is None:
        return None
    ratio = o["cpu_vs_bare_pair"]
    return {"target": "policy chain CPU per request ÷ bare pair's, at the fixed rate",
            "limit_ratio": TARGET_POLICY_CPU_RATIO, "ratio": ratio,
            "added_pct": o["cpu_added_pct"], "met": ratio <= TARGET_POLICY_CPU_RATIO}


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:+.0f}%"


def _signed(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:+.{digits}f}"


def markdown_overheads(result: Result) -> str:
    rate = result["plan"]["rate"]
    lines = [
        f"| path | proxy CPU ms/req at {rate:g} rps, per sidecar (A / B) | ÷ bare pair "
        "| added CPU ms/req per sidecar | unloaded p50 ms | added p50 ms "
        f"| at {rate:g} rps p50 / p99 ms | spans received per call | gRPC errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, o in overheads(result).items():
        ref = name == BARE_PAIR
        ratio = "(reference)" if ref else (
            f"{_fmt_ratio(o['cpu_vs_bare_pair'])} ({_pct(o['cpu_added_pct'])})")
        rate_text = f"{_fmt(o['p50_at_rate_ms'])} / {_fmt(o['p99_at_rate_ms'])}"
        if o["fell_behind"]:
            rate_text += f" (only {_fmt(_get(result, name, 'fixed_rate', 'rps'), 0)} rps)"
        spans = o["spans_per_call"]
        lines.append(
            f"| {LABELS.get(name, name)} | {_fmt(o['cpu_ms_per_req_per_sidecar'], 3)} "
            f"({_fmt(o['cpu_ms_per_req_a'], 3)} / {_fmt(o['cpu_ms_per_req_b'], 3)}) "
            f"| {ratio} | {'—' if ref else _signed(o['cpu_added_ms_per_req_per_sidecar'])} "
            f"| {_fmt(o['unloaded_p50_ms'])} | {'—' if ref else _signed(o['added_p50_ms'], 2)} "
            f"| {rate_text} | {'—' if spans is None else f'{spans:.2f}'} "
            f"| {result['paths'][name].get('grpc_errors', 0)} |")
    return "\n".join(lines)


def text_overheads(result: Result) -> str:
    o = overheads(result)
    if len(o) < 2:
        return ""
    lines = ["vs the bare pair (CPU per request at the fixed rate; unloaded p50):"]
    for name, r in o.items():
        if name == BARE_PAIR:
            continue
        spans = r["spans_per_call"]
        lines.append(
            f"  {name:<14} CPU {_fmt_ratio(r['cpu_vs_bare_pair'])} ({_pct(r['cpu_added_pct'])}, "
            f"{_signed(r['cpu_added_ms_per_req_per_sidecar'])} ms per sidecar), "
            f"p50 {_signed(r['added_p50_ms'], 2)} ms"
            + ("" if spans is None else f", {spans:.2f} spans received per call"))
    t = policy_target(result)
    if t is not None:
        lines.append(f"target (issue 4) policy chain CPU ≤ {t['limit_ratio']:.2f}x the bare "
                     f"pair's: {t['ratio']:.2f}x ({_pct(t['added_pct'])}) -> "
                     f"{'MET' if t['met'] else 'NOT MET'}")
    return "\n".join(lines)


# --- issue 5 (mTLS): the mTLS pair vs the plaintext pair, both from the control plane ----------


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def mtls_cost(result: Result) -> dict[str, Any] | None:
    """What mTLS between the two sidecars costs: the mTLS pair ÷ the plaintext pair (same
    control plane, same routing, same run), or None unless both ran."""
    if PLAINTEXT_PAIR not in result["paths"] or MTLS_PAIR not in result["paths"]:
        return None
    by: dict[str, dict[str, float | None]] = {}
    for name in (PLAINTEXT_PAIR, MTLS_PAIR):
        cpu = _get(result, name, "fixed_rate", "proxy_cpu_ms_per_req")
        by[name] = {
            "cpu_ms_per_req": cpu,
            "cpu_ms_per_req_per_sidecar": None if cpu is None else cpu / 2,
            "cpu_ms_per_req_a": _get(result, name, "fixed_rate",
                                     "proxy_cpu_ms_per_req_by_sidecar", "A"),
            "cpu_ms_per_req_b": _get(result, name, "fixed_rate",
                                     "proxy_cpu_ms_per_req_by_sidecar", "B"),
            "unloaded_p50_ms": _get(result, name, "unloaded", "p50_ms"),
            "unloaded_p99_ms": _get(result, name, "unloaded", "p99_ms"),
            "p50_at_rate_ms": _get(result, name, "fixed_rate", "p50_ms"),
            "p99_at_rate_ms": _get(result, name, "fixed_rate", "p99_ms"),
            "proxy_rss_mib": _get(result, name, "proxy_rss_mib"),
        }
    plain, tls = by[PLAINTEXT_PAIR], by[MTLS_PAIR]
    ratio = _ratio(tls["cpu_ms_per_req"], plain["cpu_ms_per_req"])
    return {
        "reference": PLAINTEXT_PAIR, "path": MTLS_PAIR, "by_path": by,
        "cpu_ratio": ratio,
        "cpu_added_pct": None if ratio is None else (ratio - 1) * 100,
        "cpu_ratio_a": _ratio(tls["cpu_ms_per_req_a"], plain["cpu_ms_per_req_a"]),
        "cpu_ratio_b": _ratio(tls["cpu_ms_per_req_b"], plain["cpu_ms_per_req_b"]),
        "cpu_added_ms_per_req_per_sidecar": _diff(tls["cpu_ms_per_req_per_sidecar"],
                                                  plain["cpu_ms_per_req_per_sidecar"]),
        "unloaded_p50_ratio": _ratio(tls["unloaded_p50_ms"], plain["unloaded_p50_ms"]),
        "added_unloaded_p50_ms": _diff(tls["unloaded_p50_ms"], plain["unloaded_p50_ms"]),
        "p50_at_rate_ratio": _ratio(tls["p50_at_rate_ms"], plain["p50_at_rate_ms"]),
        "added_p50_at_rate_ms": _diff(tls["p50_at_rate_ms"], plain["p50_at_rate_ms"]),
        "p99_at_rate_ratio": _ratio(tls["p99_at_rate_ms"], plain["p99_at_rate_ms"]),
        "rss_ratio": _ratio(tls["proxy_rss_mib"], plain["proxy_rss_mib"]),
        "cpu_ratio_by_round": _round_ratios(result, MTLS_PAIR, PLAINTEXT_PAIR),
        "unloaded_p50_ratio_by_round": _round_ratios(result, MTLS_PAIR, PLAINTEXT_PAIR,
                                                     "unloaded", "p50_ms"),
        # following a control plane should cost nothing per call: the plaintext pair ÷ the
        # static bare pair, when it ran, shows the two references agree
        "plaintext_pair_cpu_vs_bare_pair": _ratio(
            plain["cpu_ms_per_req"], _get(result, BARE_PAIR, "fixed_rate",
                                          "proxy_cpu_ms_per_req")),
        "fell_behind": [n for n in (PLAINTEXT_PAIR, MTLS_PAIR) if fell_behind(result, n)],
    }


def markdown_mtls(result: Result) -> str:
    m = mtls_cost(result)
    if m is None:
        return ""
    rate = result["plan"]["rate"]
    lines = [
        f"| path | proxy CPU ms/req at {rate:g} rps, per sidecar (A / B) "
        "| unloaded p50 / p99 ms "
        f"| at {rate:g} rps p50 / p99 ms | proxy RSS MiB | gRPC errors |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in m["by_path"].items():
        lines.append(
            f"| {LABELS.get(name, name)} | {_fmt(r['cpu_ms_per_req_per_sidecar'], 3)} "
            f"({_fmt(r['cpu_ms_per_req_a'], 3)} / {_fmt(r['cpu_ms_per_req_b'], 3)}) "
            f"| {_fmt(r['unloaded_p50_ms'])} / {_fmt(r['unloaded_p99_ms'])} "
            f"| {_fmt(r['p50_at_rate_ms'])} / {_fmt(r['p99_at_rate_ms'])} "
            f"| {_fmt(r['proxy_rss_mib'], 1)} | {result['paths'][name].get('grpc_errors', 0)} |")
    lines.append(
        f"| **mTLS ÷ plaintext** | **{_fmt_ratio(m['cpu_ratio'])}** "
        f"({_fmt_ratio(m['cpu_ratio_a'])} / {_fmt_ratio(m['cpu_ratio_b'])}) "
        f"| **{_fmt_ratio(m['unloaded_p50_ratio'])}** / — "
        f"| {_fmt_ratio(m['p50_at_rate_ratio'])} / {_fmt_ratio(m['p99_at_rate_ratio'])} "
        f"| {_fmt_ratio(m['rss_ratio'])} | |")
    return "\n".join(lines)


def text_mtls(result: Result) -> str:
    m = mtls_cost(result)
    if m is None:
        return ""
    rounds = ", ".join(f"{v:.2f}x" for v in m["cpu_ratio_by_round"])
    line = (f"mTLS pair ÷ plaintext pair (same control plane, same run): CPU per request "
            f"{_fmt_ratio(m['cpu_ratio'])} ({_pct(m['cpu_added_pct'])}, "
            f"{_signed(m['cpu_added_ms_per_req_per_sidecar'])} ms per sidecar; "
            f"A {_fmt_ratio(m['cpu_ratio_a'])}, B {_fmt_ratio(m['cpu_ratio_b'])}), "
            f"unloaded p50 {_fmt_ratio(m['unloaded_p50_ratio'])} "
            f"({_signed(m['added_unloaded_p50_ms'], 2)} ms), "
            f"p50 at {result['plan']['rate']:g} rps {_fmt_ratio(m['p50_at_rate_ratio'])}")
    if rounds:
        line += f"; CPU ratio by round {rounds}"
    if m["plaintext_pair_cpu_vs_bare_pair"] is not None:
        line += (f"\n  (plaintext pair ÷ static bare pair, CPU per request: "
                 f"{_fmt_ratio(m['plaintext_pair_cpu_vs_bare_pair'])})")
    return line
