"""The request paths the benchmark compares, all ending at the same upstream.

direct        client -> upstream
nginx         client -> nginx grpc_pass -> upstream
sidecar       client -> sidecar (outbound) -> upstream
sidecar_pair  client -> sidecar A (outbound) -> sidecar B (inbound) -> upstream
The same pair with one thing turned on (compared with sidecar_pair, the "bare pair", which like
every other sidecar path runs with tracing off: --trace-sampling 0):
pair_policies  every policy stage on: header route + default route, retries with a budget,
               circuit breaker, outlier detection on A; a local rate limit on B (policy_config)
pair_trace1    tracing at 1% sampling, spans exported over OTLP/gRPC to an in-harness receiver
pair_trace100  tracing at 100% sampling, likewise
Two pairs whose sidecars follow a control plane started by the harness (bench/mesh_cp.py), to
measure what mTLS costs (compared with each other, not with the bare pair, whose config is static):
pair_cp        the pair from the control plane, no tokens: plaintext between A and B
pair_mtls      the same with a bootstrap token per sidecar: A dials B's inbound over mTLS
(optional, not run by default: sidecar_stream, one sidecar forced onto its generic
stream-stream shape, which every method not known to be unary takes)

Each is a context manager that starts the path's proxies, yields what the load generator
should target and which processes are the path's proxies, and stops them afterwards.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import policy_config, procstat
from bench.mesh_cp import BenchControlPlane, wait_routed
from bench.nginx import Nginx
from bench.procs import OtlpSink, start_sidecar

PATHS = ("direct", "nginx", "sidecar", "sidecar_pair", "pair_policies", "pair_trace1",
         "pair_trace100", "pair_cp", "pair_mtls")
# Compared with the bare pair only: the fixed-rate CPU phase and the unloaded p50 are what
# their figures need, and leaving out max throughput keeps `make bench` short.
PAIR_VARIANTS = ("pair_policies", "pair_trace1", "pair_trace100")
ALL_PHASES = ("unloaded", "fixed_rate", "max_throughput")
SHORT_PHASES = ("unloaded", "fixed_rate")


@dataclass
class Topology:
    name: str
    target: str                # where the load generator connects
    hops: int                  # proxies a request crosses
    pids: Callable[[], list[int]] = field(default=list)  # the proxies' processes, now
    description: str = ""
    phases: tuple[str, ...] = ALL_PHASES
    # per proxy (sidecar "A", "B"), its processes: CPU is also reported per sidecar
    parts: Callable[[], dict[str, list[int]]] | None = None
    # what the path reports beside the load figures: "otlp" (the OTLP receiver's span count,
    # filled in when the path stops), "wiring" (what was checked before measuring)
    after: dict[str, Any] = field(default_factory=dict)


# the control-plane pairs' services: B serves the upstream's gRPC service, A only calls
MESH_A, MESH_B = "bench-mesh-a", "bench-mesh-b"
UPSTREAM_GRPC_SERVICE = "grpc.testing.TestService"


class Shared:
    """What several paths use in one run (the control plane), started on first use and stopped
    by `close()` when the run ends."""

    def __init__(self) -> None:
        self._control_plane: BenchControlPlane | None = None

    def control_plane(self) -> BenchControlPlane:
        if self._control_plane is None:
            self._control_plane = BenchControlPlane((MESH_A, MESH_B))
        return self._control_plane

    def close(self) -> None:
        if self._control_plane is not None:
            self._control_plane.stop()
            self._control_plane = None


@contextlib.contextmanager
def direct(upstream: str, _shared: Shared) -> Iterator[Topology]:
    yield Topology("direct", upstream, 0, description="client -> upstream")


@contextlib.contextmanager
def nginx(upstream: str, _shared: Shared) -> Iterator[Topology]:
    proxy = Nginx(upstream)
    try:
        yield Topology("nginx", proxy.address, 1, proxy.pids,
                   "client -> nginx grpc_pass (1 worker, upstream keepalive) -> upstream")
    finally:
        proxy.stop()


@contextlib.contextmanager
def sidecar(upstream: str, _shared: Shared) -> Iterator[Topology]:
    a = start_sidecar("bench-sidecar", upstream=upstream)
    try:
        yield Topology("sidecar", a.ports["outbound"], 1,
                   lambda: procstat.with_descendants([a.pid]),
                   "client -> sidecar outbound -> upstream (tracing off)")
    finally:
        a.stop()


@contextlib.contextmanager
def sidecar_stream(upstream: str, _shared: Shared) -> Iterator[Topology]:
    a = start_sidecar("bench-sidecar-stream", upstream=upstream, unary=False)
    try:
        yield Topology("sidecar_stream", a.ports["outbound"], 1,
                       lambda: procstat.with_descendants([a.pid]),
                       "client -> sidecar outbound (stream-stream shape) -> upstream")
    finally:
        a.stop()


@contextlib.contextmanager
def _pair(name: str, upstream: str, description: str, *, phases: tuple[str, ...] = ALL_PHASES,
          trace_sampling: float = 0.0, env: dict[str, str] | None = None,
          a_config: Callable[[str], str] | None = None, b_config: str | None = None
          ) -> Iterator[Topology]:
    """Sidecar B in front of the upstream, sidecar A sending to B's inbound.

    `a_config(b_inbound)` gives A's static config file (A then has no --upstream/--route);
    `b_config` is B's. Both sidecars get the same `trace_sampling` and `env`.
    """
    b = start_sidecar(f"bench-{name}-b", app=upstream, trace_sampling=trace_sampling, env=env,
                      config=b_config)
    try:
        inbound = b.ports["inbound"]
        if a_config is None:
            a = start_sidecar(f"bench-{name}-a", upstream=inbound,
                              trace_sampling=trace_sampling, env=env)
        else:
            a = start_sidecar(f"bench-{name}-a", trace_sampling=trace_sampling, env=env,
                              config=a_config(inbound))
        try:
            yield Topology(name, a.ports["outbound"], 2,
                           lambda: procstat.with_descendants([a.pid, b.pid]), description,
                           phases=phases,
                           parts=lambda: {"A": procstat.with_descendants([a.pid]),
                                          "B": procstat.with_descendants([b.pid])})
        finally:
            a.stop()
    finally:
        b.stop()


@contextlib.contextmanager
def sidecar_pair(upstream: str, _shared: Shared) -> Iterator[Topology]:
    with _pair("sidecar_pair", upstream, "client -> sidecar A outbound -> sidecar B inbound -> "
               "upstream (tracing off)") as topology:
        yield topology


@contextlib.contextmanager
def pair_policies(upstream: str, _shared: Shared) -> Iterator[Topology]:
    work = Path(tempfile.mkdtemp(prefix="bench-policies-"))
    service_a, service_b = "bench-pair_policies-a", "bench-pair_policies-b"
    b_file = work / "b.json"
    b_file.write_text(json.dumps(policy_config.inbound_config(service_b)))

    def a_config(b_inbound: str) -> str:
        a_file = work / "a.json"
        a_file.write_text(json.dumps(policy_config.outbound_config(
            service_a, b_inbound, "grpc.testing.TestService")))
        policy_config.check_compiled(str(a_file), str(b_file), service_b, upstream)
        return str(a_file)

    try:
        with _pair("pair_policies", upstream,
                   "the pair with A: header route + default route, retries (unavailable, 2, "
                   "budget), breaker, outlier detection; B: local rate limit (tracing off)",
                   phases=SHORT_PHASES, a_config=a_config, b_config=str(b_file)) as topology:
            yield topology
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _traced_pair(name: str, percent: float) -> Callable[[str, Shared], Any]:
    @contextlib.contextmanager
    def path(upstream: str, _shared: Shared) -> Iterator[Topology]:
        sink = OtlpSink()
        stats: dict[str, int] | None = None
        try:
            env = {"OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint}
            with _pair(name, upstream, f"the pair with tracing at {percent:g}% sampling, "
                       "OTLP/gRPC to a receiver in its own process", phases=SHORT_PHASES,
                       trace_sampling=percent, env=env) as topology:
                yield topology
            # both sidecars have drained (flushing their queued spans) when _pair returns
            stats = sink.stop()
            topology.after["otlp"] = stats
        finally:
            if stats is None:
                with contextlib.suppress(Exception):
                    sink.stop()
    return path


pair_trace1 = _traced_pair("pair_trace1", 1.0)
pair_trace100 = _traced_pair("pair_trace100", 100.0)


@contextlib.contextmanager
def _control_plane_pair(name: str, upstream: str, shared: Shared, *, mtls: bool
                        ) -> Iterator[Topology]:
    """Sidecar B announces the upstream (--app, --grpc-service) to the control plane; sidecar A
    (no --app) learns its route and B's endpoint from it. With `mtls`, each holds a bootstrap
    token (MESH_TOKEN) for its service. Both sidecars: tracing off, UnaryCall declared unary,
    as on the static pairs. Measuring starts once A routes to this B alone (mesh_cp.wait_routed).
    """
    cp = shared.control_plane()
    work = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))

    def follow(service: str) -> tuple[list[str], dict[str, str] | None]:
        argv = ["--control-plane", cp.address, "--state-dir", str(work / service)]
        return argv, ({"MESH_TOKEN": cp.tokens[service]} if mtls else None)

    try:
        argv, env = follow(MESH_B)
        b = start_sidecar(MESH_B, app=upstream, env=env,
                          extra=[*argv, "--grpc-service", UPSTREAM_GRPC_SERVICE])
        try:
            argv, env = follow(MESH_A)
            a = start_sidecar(MESH_A, env=env, extra=argv)
            try:
                wiring = wait_routed(a.ports["admin"], b.ports["admin"], MESH_B,
                                     b.ports["inbound"], mtls=mtls)
                hop = "mTLS" if mtls else "plaintext"
                yield Topology(name, a.ports["outbound"], 2,
                               lambda: procstat.with_descendants([a.pid, b.pid]),
                               f"client -> sidecar A outbound -> ({hop}) sidecar B inbound -> "
                               "upstream, both following the control plane (tracing off)",
                               phases=SHORT_PHASES,
                               parts=lambda: {"A": procstat.with_descendants([a.pid]),
                                              "B": procstat.with_descendants([b.pid])},
                               after={"wiring": wiring})
            finally:
                a.stop()
        finally:
            b.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def pair_cp(upstream: str, shared: Shared) -> Iterator[Topology]:
    with _control_plane_pair("pair_cp", upstream, shared, mtls=False) as topology:
        yield topology


@contextlib.contextmanager
def pair_mtls(upstream: str, shared: Shared) -> Iterator[Topology]:
    with _control_plane_pair("pair_mtls", upstream, shared, mtls=True) as topology:
        yield topology


Factory = Callable[[str, Shared], contextlib.AbstractContextManager[Topology]]
FACTORIES: dict[str, Factory] = {
    "direct": direct, "nginx": nginx, "sidecar": sidecar, "sidecar_pair": sidecar_pair,
    "pair_policies": pair_policies, "pair_trace1": pair_trace1, "pair_trace100": pair_trace100,
    "pair_cp": pair_cp, "pair_mtls": pair_mtls, "sidecar_stream": sidecar_stream,
}
