"""The embedded registry's memory across a control-plane restart.

Without it a restarted control plane starts with an empty registry and pushes it to the first
sidecar that reconnects, taking away endpoints that are alive and about to reconnect too. So
the announced instances are written down on every change and, at start, taken back as if each
had just disconnected: they stay for a grace period long enough for their sidecars to come
back (longer than a sidecar's longest reconnect backoff), then leave unless re-announced.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from control_plane.registry.embedded import EmbeddedRegistry
from control_plane.registry.model import Instance, RegistryView
from sidecar.atomic_file import write_atomically

log = logging.getLogger(__name__)

RESTORED = "restored"  # the owner of instances read back from disk
RESTORE_GRACE = 40.0  # seconds: > the sidecars' 30 s maximum reconnect backoff


def save(view: RegistryView, path: str) -> None:
    doc = {"instances": [dataclasses.asdict(i) for i in view.instances]}
    write_atomically(path, json.dumps(doc))


def restore(registry: EmbeddedRegistry, path: str, grace: float = RESTORE_GRACE) -> int:
    """Announce the saved instances and start their grace period; returns how many."""
    try:
        doc = json.loads(Path(path).read_text())
        instances = [_instance(item) for item in doc["instances"]]
    except FileNotFoundError:
        return 0
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring saved registry %s: %s", path, exc)
        return 0
    for instance in instances:
        registry.add(instance, owner=RESTORED)
    for instance in instances:
        registry.remove(instance.instance_id, grace=grace, owner=RESTORED)
    return len(instances)


def _instance(item: dict[str, Any]) -> Instance:
    fields = {f.name for f in dataclasses.fields(Instance)}
    values = {k: v for k, v in item.items() if k in fields}
    for key in ("grpc_services", "tags"):
        values[key] = tuple(values.get(key, ()))
    values["meta"] = tuple(tuple(pair) for pair in values.get("meta", ()))
    # Files written before issue 5 lack mtls / plaintext_port: the defaults (plaintext) apply.
    for key, kind in (("mtls", bool), ("plaintext_port", int)):
        if key in values and not isinstance(values[key], kind):
            raise TypeError(f"instance {values.get('instance_id')!r}: {key} must be a "
                            f"{kind.__name__}")
    return Instance(**values)
