"""The four request paths the benchmark compares, all ending at the same upstream.

direct        client -> upstream
nginx         client -> nginx grpc_pass -> upstream
sidecar       client -> sidecar (outbound) -> upstream
sidecar_pair  client -> sidecar A (outbound) -> sidecar B (inbound) -> upstream
(optional, not run by default: sidecar_stream, one sidecar forced onto its generic
stream-stream shape, which every method not known to be unary takes)

Each is a context manager that starts the path's proxies, yields what the load generator
should target and which processes are the path's proxies, and stops them afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from bench import procstat
from bench.nginx import Nginx
from bench.procs import start_sidecar

PATHS = ("direct", "nginx", "sidecar", "sidecar_pair")


@dataclass
class Topology:
    name: str
    target: str                # where the load generator connects
    hops: int                  # proxies a request crosses
    pids: Callable[[], list[int]] = field(default=list)  # the proxies' processes, now
    description: str = ""


@contextlib.contextmanager
def direct(upstream: str) -> Iterator[Topology]:
    yield Topology("direct", upstream, 0, description="client -> upstream")


@contextlib.contextmanager
def nginx(upstream: str) -> Iterator[Topology]:
    proxy = Nginx(upstream)
    try:
        yield Topology("nginx", proxy.address, 1, proxy.pids,
                   "client -> nginx grpc_pass (1 worker, upstream keepalive) -> upstream")
    finally:
        proxy.stop()


@contextlib.contextmanager
def sidecar(upstream: str) -> Iterator[Topology]:
    a = start_sidecar("bench-sidecar", upstream=upstream)
    try:
        yield Topology("sidecar", a.ports["outbound"], 1,
                   lambda: procstat.with_descendants([a.pid]),
                   "client -> sidecar outbound -> upstream")
    finally:
        a.stop()


@contextlib.contextmanager
def sidecar_stream(upstream: str) -> Iterator[Topology]:
    a = start_sidecar("bench-sidecar-stream", upstream=upstream, unary=False)
    try:
        yield Topology("sidecar_stream", a.ports["outbound"], 1,
                       lambda: procstat.with_descendants([a.pid]),
                       "client -> sidecar outbound (stream-stream shape) -> upstream")
    finally:
        a.stop()


@contextlib.contextmanager
def sidecar_pair(upstream: str) -> Iterator[Topology]:
    b = start_sidecar("bench-sidecar-b", app=upstream)
    try:
        a = start_sidecar("bench-sidecar-a", upstream=b.ports["inbound"])
        try:
            yield Topology("sidecar_pair", a.ports["outbound"], 2,
                       lambda: procstat.with_descendants([a.pid, b.pid]),
                       "client -> sidecar A outbound -> sidecar B inbound -> upstream")
        finally:
            a.stop()
    finally:
        b.stop()


FACTORIES: dict[str, Callable[[str], contextlib.AbstractContextManager[Topology]]] = {
    "direct": direct, "nginx": nginx, "sidecar": sidecar, "sidecar_pair": sidecar_pair,
    "sidecar_stream": sidecar_stream,
}
