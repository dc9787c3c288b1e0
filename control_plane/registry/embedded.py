"""The default registry (no Consul): sidecars announce themselves on their ADS stream.

An instance is in the view while a stream of it is open, and for a grace period after the last
one ends, so a sidecar that reconnects (control plane restart, a blip) keeps its endpoints.
The identity a sidecar announces is its ADS `node` (docs/control-plane.md, "Node identity").
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Hashable, Mapping

from envoy.config.core.v3 import base_pb2
from google.protobuf import struct_pb2

from control_plane.registry.announce import Announcements
from control_plane.registry.model import Instance, RegistryView
from control_plane.registry.source import ViewPublisher, ViewSubscription

log = logging.getLogger(__name__)

DEFAULT_GRACE = 5.0
_KNOWN_KEYS = frozenset({"service", "instance_id", "inbound_address", "version", "zone",
                         "grpc_services", "mesh_sidecar", "mtls", "plaintext_address"})


class NodeMetadataError(ValueError):
    """A node says it is a mesh sidecar but its metadata cannot describe an instance."""


class EmbeddedRegistry:
    """Instances announced by connected sidecars. Never unhealthy: it has nothing to lose."""

    def __init__(self, grace: float = DEFAULT_GRACE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._announced = Announcements(grace)
        self._clock = clock
        self._publisher = ViewPublisher()
        self._timer: asyncio.TimerHandle | None = None

    # --- RegistrySource -----------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        return True

    @property
    def last_error(self) -> str:
        return ""

    @property
    def synced(self) -> bool:
        return True

    def view(self) -> RegistryView:
        return self._publisher.view()

    def changes(self) -> ViewSubscription:
        return self._publisher.subscribe()

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._publisher.close()

    async def announce(self, instance: Instance, owner: Hashable = None) -> None:
        self.add(instance, owner)

    async def withdraw(self, instance_id: str, grace: float | None = None,
                       owner: Hashable = None) -> None:
        self.remove(instance_id, grace, owner)
        self._schedule()

    # --- the synchronous core (tests drive it with a fake clock) ------------------------------
    def add(self, instance: Instance, owner: Hashable = None) -> None:
        if self._announced.announce(instance, owner):
            self._publish()

    def remove(self, instance_id: str, grace: float | None = None,
               owner: Hashable = None) -> None:
        self._announced.withdraw(instance_id, self._clock(), grace, owner)
        self.expire()

    def expire(self) -> list[Instance]:
        """Drop instances whose grace period is over (by the injected clock)."""
        gone = self._announced.expire(self._clock())
        if gone:
            log.info("instances left the mesh: %s", ", ".join(i.instance_id for i in gone))
            self._publish()
        return gone

    def _publish(self) -> None:
        self._publisher.publish(RegistryView(self._announced.instances()))

    def _schedule(self) -> None:
        """Wake up at the next departure (only when called from inside an event loop)."""
        deadline = self._announced.next_deadline()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if deadline is None:
            return
        self._timer = loop.call_later(max(0.0, deadline - self._clock()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.expire()
        self._schedule()


# --- node identity ---------------------------------------------------------------------------
def instance_from_node(node: base_pb2.Node) -> Instance | None:
    """The instance a sidecar's ADS node describes; None for other nodes (proxyless clients).

    Raises NodeMetadataError (naming the field) when a node claims `mesh_sidecar` but its
    metadata cannot be reached or identified: announcing it would publish a dead endpoint.
    """
    fields = node.metadata.fields
    if not _truthy(fields.get("mesh_sidecar")):
        return None
    service = _string(fields, "service") or node.cluster
    if not service:
        raise NodeMetadataError("node metadata.service: missing (and node.cluster is empty)")
    instance_id = _string(fields, "instance_id")
    if not instance_id and "~" in node.id:
        instance_id = node.id.split("~", 1)[1]
    instance_id = instance_id or node.id
    if not instance_id:
        raise NodeMetadataError("node metadata.instance_id: missing (and node.id is empty)")
    inbound = _string(fields, "inbound_address")
    if not inbound:
        raise NodeMetadataError("node metadata.inbound_address: missing")
    address, port = _split_host_port(inbound, "inbound_address")
    mtls = _truthy(fields.get("mtls"))
    plaintext_port = 0
    plaintext = _string(fields, "plaintext_address")
    if plaintext:
        plain_host, plaintext_port = _split_host_port(plaintext, "plaintext_address")
        if plain_host != address:
            # Instance keeps one address: a plaintext port elsewhere could not be described.
            raise NodeMetadataError(f"node metadata.plaintext_address: {plaintext!r}: host must "
                                    f"be the inbound_address host {address!r}")
    meta = tuple(sorted((key, value.string_value) for key, value in fields.items()
                        if key not in _KNOWN_KEYS and value.WhichOneof("kind") == "string_value"))
    return Instance(service=service, instance_id=instance_id, address=address, port=port,
                    version=_string(fields, "version"), zone=_string(fields, "zone"),
                    grpc_services=_string_list(fields, "grpc_services"), meta=meta,
                    sidecar=True, mtls=mtls, plaintext_port=plaintext_port)


def _truthy(value: struct_pb2.Value | None) -> bool:
    if value is None:
        return False
    kind = value.WhichOneof("kind")
    if kind == "bool_value":
        return value.bool_value
    if kind == "string_value":
        return value.string_value.lower() == "true"
    return False


def _string(fields: Mapping[str, struct_pb2.Value], key: str) -> str:
    value = fields.get(key)
    if value is None:
        return ""
    if value.WhichOneof("kind") != "string_value":
        raise NodeMetadataError(f"node metadata.{key}: must be a string")
    return str(value.string_value)


def _string_list(fields: Mapping[str, struct_pb2.Value], key: str) -> tuple[str, ...]:
    value = fields.get(key)
    if value is None:
        return ()
    kind = value.WhichOneof("kind")
    if kind == "string_value":  # tolerated: "pkg.A,pkg.B"
        items = [s.strip() for s in value.string_value.split(",")]
    elif kind == "list_value":
        items = []
        for i, item in enumerate(value.list_value.values):
            if item.WhichOneof("kind") != "string_value":
                raise NodeMetadataError(f"node metadata.{key}[{i}]: must be a string")
            items.append(item.string_value.strip())
    else:
        raise NodeMetadataError(f"node metadata.{key}: must be a list of strings")
    return tuple(sorted({s for s in items if s}))


def _split_host_port(text: str, key: str) -> tuple[str, int]:
    where = f"node metadata.{key}"
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise NodeMetadataError(f"{where}: {text!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise NodeMetadataError(f"{where}: {text!r}: write an IPv6 host in brackets")
    try:
        port = int(port_text)
    except ValueError:
        raise NodeMetadataError(f"{where}: {text!r}: port is not a number") from None
    if not 0 < port < 65536:
        raise NodeMetadataError(f"{where}: {text!r}: port must be within 1..65535")
    if host in ("0.0.0.0", "::"):
        raise NodeMetadataError(f"{where}: {text!r}: a wildcard address cannot be dialled")
    return host, port
