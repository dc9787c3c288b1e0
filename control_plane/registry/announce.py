"""Which announced instances are alive, which are leaving, and when they are gone.

Pure bookkeeping shared by the embedded and the Consul registry. An instance is held by the
streams ("owners") that announced it; when the last one ends, it leaves only after a grace
period, so a sidecar reconnecting (control plane restart, network blip) never makes its
endpoints flap. Time is a number passed in, so tests drive it with a fake clock.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

from control_plane.registry.model import Instance


@dataclass
class _Entry:
    instance: Instance
    owners: set[Hashable] = field(default_factory=set)
    leaves_at: float | None = None  # set once no owner holds it


class Announcements:
    def __init__(self, default_grace: float = 5.0) -> None:
        if default_grace < 0:
            raise ValueError("grace must be >= 0")
        self.default_grace = default_grace
        self._entries: dict[str, _Entry] = {}

    def announce(self, instance: Instance, owner: Hashable = None) -> bool:
        """Record `owner` holding `instance`; cancels a pending departure.

        Returns True if what the registry should show changed (new instance or new data)."""
        entry = self._entries.get(instance.instance_id)
        if entry is None:
            self._entries[instance.instance_id] = _Entry(instance, {owner})
            return True
        entry.owners.add(owner)
        entry.leaves_at = None
        if entry.instance != instance:
            entry.instance = instance
            return True
        return False

    def withdraw(self, instance_id: str, now: float, grace: float | None = None,
                 owner: Hashable = None) -> float | None:
        """`owner` let go. Returns when the instance leaves if that was the last owner."""
        entry = self._entries.get(instance_id)
        if entry is None:
            return None
        entry.owners.discard(owner)
        if entry.owners:
            return None
        grace = self.default_grace if grace is None else grace
        if grace < 0:
            raise ValueError("grace must be >= 0")
        leaves_at = now + grace
        if entry.leaves_at is None or leaves_at < entry.leaves_at:
            entry.leaves_at = leaves_at
        return entry.leaves_at

    def expire(self, now: float) -> list[Instance]:
        """Remove and return the instances whose grace period is over."""
        gone = [e for e in self._entries.values()
                if e.leaves_at is not None and e.leaves_at <= now]
        for entry in gone:
            del self._entries[entry.instance.instance_id]
        return [e.instance for e in gone]

    def next_deadline(self) -> float | None:
        deadlines = [e.leaves_at for e in self._entries.values() if e.leaves_at is not None]
        return min(deadlines) if deadlines else None

    def get(self, instance_id: str) -> Instance | None:
        entry = self._entries.get(instance_id)
        return entry.instance if entry else None

    def leaving(self, instance_id: str) -> bool:
        entry = self._entries.get(instance_id)
        return entry is not None and entry.leaves_at is not None

    def instances(self) -> tuple[Instance, ...]:
        """Everything still announced, including instances within their grace period."""
        return tuple(e.instance for e in self._entries.values())
