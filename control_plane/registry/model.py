"""What the mesh knows about instances: one immutable view, whatever the source.

Consul and the embedded registry both produce a RegistryView; translation reads only this, so
the rest of the control plane does not care where instances come from.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Instance:
    service: str  # mesh service name, e.g. "orders"
    instance_id: str  # unique in the mesh
    address: str  # where the mesh reaches it: its sidecar's inbound host...
    port: int  # ...and port (or the app itself when sidecar is False)
    version: str = ""  # subset label, e.g. "v1"
    zone: str = ""
    grpc_services: tuple[str, ...] = ()  # fully qualified gRPC services it serves
    tags: tuple[str, ...] = ()
    meta: tuple[tuple[str, str], ...] = ()  # everything else, sorted by key
    sidecar: bool = True
    healthy: bool = True
    # Issue 5: a sidecar with a workload identity serves mTLS only on `port` and plaintext on
    # `plaintext_port` (same address; 0: none known). Translation picks the port by mesh mode.
    mtls: bool = False
    plaintext_port: int = 0

    @property
    def endpoint(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"

    def label(self, key: str) -> str | None:
        """A label for subset selection: version and zone, then meta."""
        if key == "version":
            return self.version
        if key == "zone":
            return self.zone
        return dict(self.meta).get(key)


@dataclass(frozen=True, slots=True)
class RegistryView:
    instances: tuple[Instance, ...] = ()
    _by_service: dict[str, tuple[Instance, ...]] = field(default_factory=dict, compare=False,
                                                         repr=False)

    def __post_init__(self) -> None:
        ordered = tuple(sorted(self.instances, key=lambda i: (i.service, i.instance_id)))
        object.__setattr__(self, "instances", ordered)
        grouped: dict[str, list[Instance]] = {}
        for inst in ordered:
            grouped.setdefault(inst.service, []).append(inst)
        object.__setattr__(self, "_by_service", {k: tuple(v) for k, v in grouped.items()})

    def services(self) -> dict[str, tuple[Instance, ...]]:
        return dict(self._by_service)

    def instances_of(self, service: str) -> tuple[Instance, ...]:
        return self._by_service.get(service, ())

    def service_for_grpc(self, grpc_service: str) -> str | None:
        """Which mesh service serves a fully qualified gRPC service (first by name)."""
        for name, insts in self._by_service.items():
            if any(grpc_service in i.grpc_services for i in insts):
                return name
        return None
