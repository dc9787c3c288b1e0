"""Consul's JSON <-> `Instance`, and the blocking-query index rules. Pure functions.

Mapping (docs/control-plane.md, "Consul mapping"): Service name = service, ID = instance_id,
Address/Port = address/port (a service without an Address is reached at its node's), Tags =
tags; Meta keys `version`, `zone`, `grpc_services` (comma-separated), `sidecar` ("true" /
"false"), `pymesh-mtls` ("true": Port serves mTLS only) and `pymesh-plaintext-port` (the
plaintext port at the same Address); any other Meta -> meta. An instance registered by other
Consul tooling, without `sidecar` meta, is taken as reached directly (sidecar=False), and one
without `pymesh-mtls` as plaintext.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

from control_plane.registry.model import Instance

log = logging.getLogger(__name__)

MTLS_META = "pymesh-mtls"
PLAINTEXT_PORT_META = "pymesh-plaintext-port"
MESH_META_KEYS = ("version", "zone", "grpc_services", "sidecar", MTLS_META, PLAINTEXT_PORT_META)
# Consul's own limits on service Meta (a registration breaking them is refused with a 400).
META_KEY_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
META_MAX_PAIRS = 64
META_MAX_VALUE = 512


# --- Consul -> Instance ----------------------------------------------------------------------
def instance_from_health_entry(entry: Mapping[str, Any]) -> Instance | None:
    """One element of GET /v1/health/service/NAME; None (logged) if it cannot be dialled."""
    service = entry.get("Service") or {}
    node = entry.get("Node") or {}
    name = str(service.get("Service") or "")
    instance_id = str(service.get("ID") or name)
    address = str(service.get("Address") or node.get("Address") or "")
    try:
        port = int(service.get("Port") or 0)
    except (TypeError, ValueError):
        port = 0
    if not name or not address or not 0 < port < 65536:
        log.warning("ignoring Consul service instance %r of %r: no usable address:port",
                    instance_id, name)
        return None
    meta = {str(k): str(v) for k, v in (service.get("Meta") or {}).items()}
    grpc_services = tuple(sorted({s.strip() for s in meta.get("grpc_services", "").split(",")
                                  if s.strip()}))
    return Instance(
        service=name,
        instance_id=instance_id,
        address=address,
        port=port,
        version=meta.get("version", ""),
        zone=meta.get("zone", ""),
        grpc_services=grpc_services,
        tags=tuple(str(t) for t in service.get("Tags") or ()),
        meta=tuple(sorted((k, v) for k, v in meta.items() if k not in MESH_META_KEYS)),
        sidecar=meta.get("sidecar", "").lower() == "true",
        healthy=True,
        mtls=meta.get(MTLS_META, "").lower() == "true",
        plaintext_port=_port(meta.get(PLAINTEXT_PORT_META, "")),
    )


def _port(text: str) -> int:
    """A Meta port, 0 when absent or unusable (then no plaintext port is known)."""
    try:
        port = int(text.strip())
    except ValueError:
        return 0
    return port if 0 < port < 65536 else 0


def instances_from_health(entries: Iterable[Mapping[str, Any]] | None) -> tuple[Instance, ...]:
    """A passing-instances answer, in a stable order (Consul's order is not a change)."""
    found = (instance_from_health_entry(e) for e in entries or ())
    return tuple(sorted((i for i in found if i is not None), key=lambda i: i.instance_id))


# --- Instance -> Consul ----------------------------------------------------------------------
def check_id_for(instance_id: str) -> str:
    """The TTL check of a registration: Consul's own default name for a service's one check."""
    return f"service:{instance_id}"


def registration_meta(instance: Instance) -> dict[str, str]:
    """Meta for a registration, dropping (and logging) what Consul would refuse."""
    meta: dict[str, str] = {}
    for key, value in instance.meta:
        if key in MESH_META_KEYS or key.startswith("consul-"):
            continue
        if not META_KEY_RE.match(key) or len(value) > META_MAX_VALUE:
            log.warning("instance %s: meta %r not registered in Consul (invalid key or value)",
                        instance.instance_id, key)
            continue
        meta[key] = value
    mesh = {"version": instance.version, "zone": instance.zone,
            "grpc_services": ",".join(instance.grpc_services)}
    room = (META_MAX_PAIRS - 1 - sum(1 for v in mesh.values() if v)
            - int(instance.mtls) - int(instance.plaintext_port > 0))
    if len(meta) > room:
        log.warning("instance %s: only %d meta pairs registered in Consul",
                    instance.instance_id, room)
        meta = dict(sorted(meta.items())[:room])
    meta.update({k: v for k, v in mesh.items() if v})
    meta["sidecar"] = "true" if instance.sidecar else "false"
    if instance.mtls:
        meta[MTLS_META] = "true"
    if instance.plaintext_port > 0:
        meta[PLAINTEXT_PORT_META] = str(instance.plaintext_port)
    return meta


def register_kwargs(instance: Instance, ttl: float,
                    deregister_after: float | None) -> dict[str, Any]:
    """Arguments of py-consul's `agent.service.register` for an announced instance.

    On the wire (PUT /v1/agent/service/register): name, id, address, port, tags, meta and one
    TTL check. The check starts passing: we register an instance because its stream is alive
    now. Existing checks are replaced, so registering again is idempotent.
    """
    check: dict[str, Any] = {
        "CheckID": check_id_for(instance.instance_id),
        "Name": "pymesh: sidecar stream alive",
        "TTL": format_duration(ttl),
        "Status": "passing",
        "Notes": "kept passing by the mesh control plane while the sidecar's ADS stream lives",
    }
    if deregister_after is not None:
        check["DeregisterCriticalServiceAfter"] = format_duration(deregister_after)
    return {
        "name": instance.service,
        "service_id": instance.instance_id,
        "address": instance.address,
        "port": instance.port,
        "tags": list(instance.tags),
        "meta": registration_meta(instance),
        "check": check,
        "replace_existing_checks": True,
    }


def format_duration(seconds: float) -> str:
    """Seconds as a Go duration string ("10s", "250ms")."""
    if seconds >= 1 and float(seconds).is_integer():
        return f"{int(seconds)}s"
    return f"{round(seconds * 1000)}ms"


# --- blocking queries ------------------------------------------------------------------------
def next_index(previous: int, returned: int) -> int:
    """The index for the next blocking query, after one returned `returned`.

    Consul's rules: an index that went backwards (a restored snapshot, a rebuilt cluster) must
    not be waited on -- reset to 0, so the next query is a plain read; and an index below 1
    would make every blocking query return at once -- use 1.
    """
    if returned < previous:
        return 0
    return max(returned, 1)


def parse_index(header: object) -> int:
    """X-Consul-Index as an int (0 if absent or garbled: the next query is then a plain read)."""
    try:
        return max(int(str(header)), 0)
    except (TypeError, ValueError):
        return 0


# --- the --consul flag -----------------------------------------------------------------------
def parse_consul_url(url: str) -> tuple[str, str, int]:
    """`http://HOST:PORT` (or `HOST:PORT`) -> (scheme, host, port)."""
    text = url if "//" in url else f"http://{url}"
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"--consul {url!r}: scheme must be http or https")
    if not parts.hostname:
        raise ValueError(f"--consul {url!r}: no host")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 8500)
    except ValueError:
        raise ValueError(f"--consul {url!r}: bad port") from None
    if parts.path not in ("", "/"):
        raise ValueError(f"--consul {url!r}: give only scheme://host:port")
    return parts.scheme, parts.hostname, port
