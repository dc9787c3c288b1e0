"""Which services the demo shop has, who calls whom, and the command line of every process.

Pure: no processes here, so the wiring can be read (and tested) in one place.

Port choice: every process binds port 0 and reports its addresses in a ready file. The order
follows the call graph: all apps first (apps that call out learn their sidecar's outbound
address from that sidecar's ready file at their first call); then the sidecars, callees before
callers, because a sidecar's --upstream flags name the inbound addresses of the sidecars of the
services it calls; last the load generator's own "client" sidecar.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

CLIENT_SERVICE = "loadgen"


@dataclass(frozen=True)
class ServiceSpec:
    name: str  # mesh service name
    module: str  # python -m module of the app
    grpc_service: str  # fully qualified gRPC service the app serves
    calls: tuple[str, ...] = ()  # mesh services it calls
    instances: int = 1
    app_args: tuple[str, ...] = ()  # extra flags for every instance of the app

    def instance_ids(self) -> list[str]:
        return [f"{self.name}-{i}" for i in range(1, self.instances + 1)]


@dataclass(frozen=True)
class Shop:
    services: tuple[ServiceSpec, ...]
    client_calls: tuple[str, ...] = ("frontend",)
    by_name: dict[str, ServiceSpec] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_name", {s.name: s for s in self.services})
        for spec in self.services:
            for callee in spec.calls:
                if callee not in self.by_name:
                    raise ValueError(f"{spec.name} calls unknown service {callee}")

    def tiers(self) -> list[list[ServiceSpec]]:
        """Services grouped so that each group only calls groups before it (callees first)."""
        placed: set[str] = set()
        tiers: list[list[ServiceSpec]] = []
        remaining = list(self.services)
        while remaining:
            tier = [s for s in remaining if all(c in placed for c in s.calls)]
            if not tier:
                raise ValueError(f"call graph has a cycle among {[s.name for s in remaining]}")
            tiers.append(tier)
            placed.update(s.name for s in tier)
            remaining = [s for s in remaining if s.name not in placed]
        return tiers

    def routes(self, calls: Sequence[str]) -> dict[str, str]:
        """gRPC service -> mesh service, for a sidecar whose app calls `calls`."""
        return {self.by_name[c].grpc_service: c for c in calls}


def shop(*, payments: int = 2, catalog: int = 2, payments_fail_rate: float = 0.0,
         payments_delay_ms: int = 0) -> Shop:
    """The demo shop: frontend -> catalog, cart, orders; orders -> payments."""
    pkg = "demo.v1"
    return Shop(services=(
        ServiceSpec("catalog", "demo_services.catalog", f"{pkg}.CatalogService",
                    instances=catalog),
        ServiceSpec("cart", "demo_services.cart", f"{pkg}.CartService"),
        ServiceSpec("payments", "demo_services.payments", f"{pkg}.PaymentService",
                    instances=payments,
                    app_args=("--fail-rate", str(payments_fail_rate),
                              "--delay-ms", str(payments_delay_ms))),
        ServiceSpec("orders", "demo_services.orders", f"{pkg}.OrderService",
                    calls=("payments",)),
        ServiceSpec("frontend", "demo_services.frontend", f"{pkg}.FrontendService",
                    calls=("catalog", "cart", "orders")),
    ))


def app_argv(spec: ServiceSpec, instance: str, ready_file: str,
             sidecar_ready_file: str) -> list[str]:
    argv = [sys.executable, "-m", spec.module, "--instance", instance, "--port", "0",
            "--ready-file", ready_file, *spec.app_args]
    if spec.calls:
        argv += ["--mesh-from-ready-file", sidecar_ready_file]
    return argv


def sidecar_argv(sidecar_cmd: Sequence[str], *, service: str, app: str | None,
                 upstreams: Mapping[str, Sequence[str]], routes: Mapping[str, str],
                 ready_file: str, extra: Sequence[str] = ()) -> list[str]:
    argv = [*sidecar_cmd, "--service", service, "--outbound", "127.0.0.1:0",
            "--inbound", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--ready-file", ready_file]
    if app:
        argv += ["--app", app]
    for name, addrs in upstreams.items():
        argv += ["--upstream", f"{name}={','.join(addrs)}"]
    for grpc_service, name in routes.items():
        argv += ["--route", f"{grpc_service}={name}"]
    return [*argv, *extra]
