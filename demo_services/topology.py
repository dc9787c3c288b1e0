"""Which services the demo shop has, who calls whom, and the command line of every process.

Pure: no processes here, so the wiring can be read (and tested) in one place.

Port choice: every process binds port 0 and reports its addresses in a ready file. The control
plane starts first (every sidecar needs its address); then all apps (apps that call out learn
their sidecar's outbound address from that sidecar's ready file at their first call); then one
sidecar per instance plus the load generator's own "client" sidecar. Sidecars need no upstream
flags: each announces its instance (service, version, gRPC service) on its ADS stream and gets
routes and endpoints for the rest of the shop from the control plane.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
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
    # Version label of each instance, in instance order (TrafficPolicy subsets select on it);
    # instances beyond the tuple get its last entry, an empty tuple means "v1" for all.
    versions: tuple[str, ...] = ()

    def instance_ids(self) -> list[str]:
        return [f"{self.name}-{i}" for i in range(1, self.instances + 1)]

    def version_of(self, index: int) -> str:
        """Version label of the instance at `index` (0-based)."""
        if not self.versions:
            return "v1"
        return self.versions[min(index, len(self.versions) - 1)]

    def instances_with_versions(self) -> list[tuple[str, str]]:
        return [(inst, self.version_of(i)) for i, inst in enumerate(self.instance_ids())]


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


def payments_versions(instances: int) -> tuple[str, ...]:
    """payments-1 .. payments-(n-1) run v1 and the last one v2, so that a TrafficPolicy split
    between the two (demo_services/policies/payments-split.yaml) has something to split; a
    single instance is v1."""
    if instances < 2:
        return ("v1",)
    return ("v1",) * (instances - 1) + ("v2",)


def shop(*, payments: int = 2, catalog: int = 2, payments_fail_rate: float = 0.0,
         payments_delay_ms: int = 0) -> Shop:
    """The demo shop: frontend -> catalog, cart, orders; orders -> payments."""
    pkg = "demo.v1"
    return Shop(services=(
        ServiceSpec("catalog", "demo_services.catalog", f"{pkg}.CatalogService",
                    instances=catalog),
        ServiceSpec("cart", "demo_services.cart", f"{pkg}.CartService"),
        ServiceSpec("payments", "demo_services.payments", f"{pkg}.PaymentService",
                    instances=payments, versions=payments_versions(payments),
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


def control_plane_argv(*, state_dir: str, ready_file: str,
                       extra: Sequence[str] = ()) -> list[str]:
    """The control plane with the embedded registry (sidecars announce themselves) and its
    policy file under `state_dir`."""
    return [sys.executable, "-m", "control_plane", "--listen", "127.0.0.1:0",
            "--admin", "127.0.0.1:0", "--state-dir", state_dir, "--ready-file", ready_file,
            *extra]


def sidecar_argv(sidecar_cmd: Sequence[str], *, service: str, app: str | None,
                 control_plane: str, instance_id: str, ready_file: str, state_dir: str,
                 version: str = "", grpc_services: Sequence[str] = (),
                 extra: Sequence[str] = ()) -> list[str]:
    """A sidecar following the control plane. The gRPC services are given rather than found
    by reflection: the topology knows them, and the demo then starts without a round trip."""
    argv = [*sidecar_cmd, "--service", service, "--outbound", "127.0.0.1:0",
            "--inbound", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--ready-file", ready_file,
            "--control-plane", control_plane, "--instance-id", instance_id,
            "--state-dir", state_dir]
    if app:
        argv += ["--app", app]
    if version:
        argv += ["--version", version]
    for name in grpc_services:
        argv += ["--grpc-service", name]
    return [*argv, *extra]
