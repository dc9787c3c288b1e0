"""The one interface every registry source offers, and the change feed they share.

The ADS server, the status API and metrics only talk to a `RegistrySource`: they never learn
whether instances came from Consul or from sidecars announcing themselves. The feed coalesces:
a slow consumer gets the latest view, never a backlog of stale ones, so a burst of Consul
changes costs one recomputation downstream.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator, Hashable
from typing import Protocol, runtime_checkable

from control_plane.registry.model import Instance, RegistryView


@runtime_checkable
class RegistrySource(Protocol):
    """Where instances come from (Consul, or sidecars announcing themselves)."""

    @property
    def healthy(self) -> bool:
        """False while the source cannot be read; the view is then the last good one."""
        ...

    @property
    def last_error(self) -> str:
        """Why the source is unhealthy ("" while healthy)."""
        ...

    @property
    def synced(self) -> bool:
        """True once the source has produced a complete view at least once."""
        ...

    def view(self) -> RegistryView: ...

    def changes(self) -> ViewSubscription:
        """An async iterator yielding the view each time it changes (not the current one).

        Subscribed when called, so `view()` then `changes()` misses nothing in between.
        """
        ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def announce(self, instance: Instance, owner: Hashable = None) -> None:
        """A sidecar is alive (its ADS stream is open). Re-announcing cancels a pending
        withdrawal. `owner` (e.g. the stream) lets two streams of one instance overlap."""
        ...

    async def withdraw(self, instance_id: str, grace: float | None = None,
                       owner: Hashable = None) -> None:
        """`owner`'s stream ended: the instance leaves after `grace` seconds unless it is
        announced again, or another owner still holds it. Returns at once."""
        ...


class ViewPublisher:
    """Holds the current view and wakes subscribers when it really changes."""

    def __init__(self, view: RegistryView | None = None) -> None:
        self._view = view or RegistryView()
        self._subscribers: weakref.WeakSet[ViewSubscription] = weakref.WeakSet()
        self._closed = False

    def view(self) -> RegistryView:
        return self._view

    def publish(self, view: RegistryView) -> bool:
        """Replace the view; True if it differed (subscribers are then woken)."""
        if view == self._view:
            return False
        self._view = view
        for sub in list(self._subscribers):
            sub._wake()
        return True

    def subscribe(self) -> ViewSubscription:
        sub = ViewSubscription(self)
        if self._closed:
            sub._end()
        else:
            self._subscribers.add(sub)
        return sub

    def close(self) -> None:
        """End every subscription (the source stopped)."""
        self._closed = True
        for sub in list(self._subscribers):
            sub._end()
        self._subscribers.clear()

    def _unsubscribe(self, sub: ViewSubscription) -> None:
        self._subscribers.discard(sub)


class ViewSubscription(AsyncIterator[RegistryView]):
    """One consumer's position in the feed: at most one pending wake-up, always the latest view."""

    def __init__(self, publisher: ViewPublisher) -> None:
        self._publisher = publisher
        self._event = asyncio.Event()
        self._ended = False

    def _wake(self) -> None:
        self._event.set()

    def _end(self) -> None:
        self._ended = True
        self._event.set()

    def close(self) -> None:
        self._publisher._unsubscribe(self)
        self._end()

    def __aiter__(self) -> ViewSubscription:
        return self

    async def __anext__(self) -> RegistryView:
        await self._event.wait()
        if self._ended:
            raise StopAsyncIteration
        self._event.clear()
        return self._publisher.view()
