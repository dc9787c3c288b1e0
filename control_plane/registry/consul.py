"""Consul as the registry: watch it by blocking queries, and register announced sidecars in it.

Watching: one blocking query on the catalog's service list, and one per service on its passing
instances (`/v1/health/service/NAME?passing`). A blocking query returns as soon as Consul
changes, so a change reaches subscribers within a round trip. A failed query never touches the
view (static stability: a Consul outage must not empty every sidecar's endpoints); the source
says it is unhealthy and retries with capped, jittered backoff.

Registering (third party): an announced instance is registered through the agent with a TTL
check, which a per-instance task keeps passing; after its stream ends and the grace period
passes, it is deregistered. If the control plane dies, the check lapses and Consul itself stops
listing the instance (and deregisters it after `deregister_after`).

py-consul is synchronous (requests), so nothing of it runs on the event loop: each blocking
query runs in its own daemon thread with its own client (it holds an HTTP connection for up to
`wait`, and a cancelled watcher must not hold up shutdown); registrations and heartbeats, short
calls, share one client on a small thread pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import threading
import time
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import consul

from control_plane.registry.announce import Announcements
from control_plane.registry.backoff import Backoff, BackoffPolicy
from control_plane.registry.consul_mapping import (
    check_id_for,
    format_duration,
    instances_from_health,
    next_index,
    parse_consul_url,
    parse_index,
    register_kwargs,
)
from control_plane.registry.model import Instance, RegistryView
from control_plane.registry.source import ViewPublisher, ViewSubscription

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_WAIT = 30.0  # seconds a blocking query may hang (Consul's default is 5 minutes)
DEFAULT_TTL = 10.0  # TTL of the check on a registered instance; passed every ttl/3
DEFAULT_DEREGISTER_AFTER = 60.0  # Consul's minimum for DeregisterCriticalServiceAfter
DEFAULT_GRACE = 5.0
MIN_QUERY_INTERVAL = 0.05  # Consul's advice: rate-limit blocking queries (hot-loop guard)
DEREGISTER_ATTEMPTS = 3
OPS_THREADS = 8  # below requests' per-host pool size (10), so connections are reused


async def in_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a blocking call in a fresh daemon thread; cancelling the await abandons the call."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(setter: Callable[[Any], None], value: Any) -> None:
        def apply() -> None:
            if not future.done():
                setter(value)

        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(apply)

    def run() -> None:
        try:
            result = fn(*args, **kwargs)
        except BaseException as err:
            settle(future.set_exception, err)
        else:
            settle(future.set_result, result)

    threading.Thread(target=run, name="consul-call", daemon=True).start()
    return await future


def describe(err: BaseException) -> str:
    text = str(err).strip().replace("\n", " ")
    if len(text) > 300:
        text = text[:300] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


@dataclass
class _Registration:
    """What one instance's registration should be; a single task makes Consul agree."""

    desired: Instance | None
    ttl: float
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class ConsulRegistry:
    """A `RegistrySource` backed by a Consul agent (docs/control-plane.md, "Consul mapping")."""

    def __init__(self, url: str, *, wait: float = DEFAULT_WAIT, ttl: float = DEFAULT_TTL,
                 deregister_after: float | None = DEFAULT_DEREGISTER_AFTER,
                 grace: float = DEFAULT_GRACE, backoff: BackoffPolicy | None = None,
                 rng: random.Random | None = None, clock: Callable[[], float] = time.monotonic,
                 ignore_services: Iterable[str] = ("consul",), request_timeout: float = 5.0,
                 min_query_interval: float = MIN_QUERY_INTERVAL) -> None:
        self.scheme, self.host, self.port = parse_consul_url(url)
        if wait <= 0 or ttl <= 0:
            raise ValueError("wait and ttl must be positive")
        self.url = f"{self.scheme}://{self.host}:{self.port}"
        self.wait = wait
        self.ttl = ttl
        self.deregister_after = deregister_after
        self._backoff_policy = backoff or BackoffPolicy()
        self._rng = rng or random.Random()
        self._clock = clock
        self._ignore = frozenset(ignore_services)
        self._request_timeout = request_timeout
        self._min_interval = min_query_interval
        self._publisher = ViewPublisher()
        self._announced = Announcements(grace)
        self._instances: dict[str, tuple[Instance, ...]] = {}  # service -> passing instances
        self._watchers: dict[str, asyncio.Task[None]] = {}  # service -> its health watcher
        self._catalog_task: asyncio.Task[None] | None = None
        self._catalog_synced = False
        self._services_synced: set[str] = set()
        self._synced = asyncio.Event()
        self._errors: dict[str, tuple[float, str]] = {}  # what failed -> (when, why)
        self._registrations: dict[str, _Registration] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._stopped = False
        # Registrations share one client and a few threads (heartbeats are short calls, and
        # there may be thousands); each blocking query gets its own client and thread.
        self._ops = ThreadPoolExecutor(max_workers=OPS_THREADS,
                                       thread_name_prefix="consul-registration")
        self._ops_client = self._client()

    # --- RegistrySource -----------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        return not self._errors

    @property
    def last_error(self) -> str:
        if not self._errors:
            return ""
        what, (_, why) = max(self._errors.items(), key=lambda kv: kv[1][0])
        return f"{what}: {why}"

    @property
    def synced(self) -> bool:
        return self._synced.is_set()

    async def wait_synced(self, timeout: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._synced.wait(), timeout)
        return self.synced

    def view(self) -> RegistryView:
        return self._publisher.view()

    def changes(self) -> ViewSubscription:
        return self._publisher.subscribe()

    async def start(self) -> None:
        if self._catalog_task is None:
            self._catalog_task = asyncio.create_task(self._watch_catalog(),
                                                     name="consul-catalog")

    async def stop(self) -> None:
        """Stop watching and heartbeating. Registrations are left to their TTL: a restarting
        control plane must not pull every instance out of Consul."""
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
        tasks = [t for t in [self._catalog_task, *self._watchers.values(),
                             *(r.task for r in self._registrations.values())] if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._watchers.clear()
        self._registrations.clear()
        self._ops.shutdown(wait=False, cancel_futures=True)
        self._publisher.close()

    async def announce(self, instance: Instance, owner: Hashable = None) -> None:
        """Register the instance in Consul (TTL check kept passing) while `owner` holds it."""
        self._announced.announce(instance, owner)
        self._want(instance.instance_id, instance, self.ttl)
        self._schedule_expiry()

    async def withdraw(self, instance_id: str, grace: float | None = None,
                       owner: Hashable = None) -> None:
        self._announced.withdraw(instance_id, self._clock(), grace, owner)
        self.expire()
        self._schedule_expiry()

    # --- third-party registration --------------------------------------------------------------
    async def register(self, instance: Instance, ttl: float | None = None) -> None:
        """Register `instance` with a TTL check and keep it passing until `deregister`.

        Returns at once; the registration (and retries, if Consul is down) runs in the
        background and failures show in `healthy`/`last_error`."""
        self._want(instance.instance_id, instance, ttl or self.ttl)

    async def deregister(self, instance_id: str) -> None:
        """Stop heartbeating `instance_id` and remove it from Consul (in the background)."""
        self._want(instance_id, None, self.ttl)

    def registered(self) -> dict[str, Instance]:
        """Instances this control plane currently keeps registered."""
        return {iid: reg.desired for iid, reg in self._registrations.items()
                if reg.desired is not None}

    def expire(self) -> list[Instance]:
        """Deregister announced instances whose grace period is over (by the injected clock)."""
        gone = self._announced.expire(self._clock())
        for instance in gone:
            log.info("instance %s left: deregistering it from Consul", instance.instance_id)
            self._want(instance.instance_id, None, self.ttl)
        return gone

    def _schedule_expiry(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self._announced.next_deadline()
        if deadline is None or self._stopped:
            return
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(max(0.0, deadline - self._clock()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.expire()
        self._schedule_expiry()

    def _want(self, instance_id: str, desired: Instance | None, ttl: float) -> None:
        if self._stopped:
            return
        reg = self._registrations.get(instance_id)
        if reg is None:
            reg = _Registration(desired, ttl)
            self._registrations[instance_id] = reg
            reg.task = asyncio.create_task(self._reconcile(instance_id, reg),
                                           name=f"consul-registration-{instance_id}")
        else:
            reg.desired, reg.ttl = desired, ttl
            reg.wake.set()

    async def _reconcile(self, instance_id: str, reg: _Registration) -> None:
        """Make Consul hold `reg.desired` (or nothing): register, heartbeat, deregister.

        One task per instance, so a quick withdraw/re-announce can never reach Consul out of
        order."""
        client = self._ops_client
        backoff = Backoff(self._backoff_policy, self._rng)
        key = f"registration of {instance_id}"
        registered: tuple[Instance, float] | None = None  # what Consul holds, and its TTL
        while True:
            desired = reg.desired
            target = None if desired is None else (desired, reg.ttl)
            try:
                if target is None:
                    await self._op(client.agent.service.deregister, instance_id)
                elif registered != target:
                    kwargs = register_kwargs(target[0], target[1], self.deregister_after)
                    await self._op(client.agent.service.register, **kwargs)
                    registered = target
                elif not await self._op(client.agent.check.ttl_pass,
                                        check_id_for(instance_id)):
                    log.warning("Consul lost the registration of %s: registering again",
                                instance_id)
                    registered = None
                    continue
            except Exception as err:
                if target is None and backoff.failures + 1 >= DEREGISTER_ATTEMPTS:
                    log.warning("could not deregister %s from Consul (%s); its TTL check will "
                                "lapse instead", instance_id, describe(err))
                    self._recovered(key)
                    if reg.desired is None:
                        del self._registrations[instance_id]
                        return
                    continue
                self._failed(key, err)
                await self._sleep_or_wake(reg.wake, backoff.next_delay())
                continue
            self._recovered(key)
            backoff.reset()
            if target is None:
                registered = None
                if reg.desired is None:  # (no await since the check: announce cannot race)
                    del self._registrations[instance_id]
                    return
                continue
            if (reg.desired, reg.ttl) == registered:
                await self._sleep_or_wake(reg.wake, reg.ttl / 3)

    async def _op(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """A short agent call (register, pass, deregister) on the shared bounded pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._ops, functools.partial(fn, *args, **kwargs))

    @staticmethod
    async def _sleep_or_wake(event: asyncio.Event, delay: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), delay)
        event.clear()

    # --- watching --------------------------------------------------------------------------
    def _client(self) -> consul.Consul:
        return consul.Consul(host=self.host, port=self.port, scheme=self.scheme,
                             connections_timeout=self._request_timeout)

    async def _pace(self, last_start: float) -> float:
        """Hold back a query that would follow the previous one too closely."""
        loop = asyncio.get_running_loop()
        delay = last_start + self._min_interval - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        return loop.time()

    async def _watch_catalog(self) -> None:
        client = self._client()
        backoff = Backoff(self._backoff_policy, self._rng)
        index = 0
        started = float("-inf")
        wait = format_duration(self.wait)
        while True:
            started = await self._pace(started)
            try:
                raw_index, services = await in_thread(client.catalog.services,
                                                      index=index or None, wait=wait)
            except Exception as err:
                self._failed("catalog", err)
                index = 0  # re-read at once when Consul answers again: that is recovery
                await asyncio.sleep(backoff.next_delay())
                continue
            self._recovered("catalog")
            backoff.reset()
            index = next_index(index, parse_index(raw_index))
            self._catalog_synced = True
            self._set_services({str(s) for s in services or {}} - self._ignore)

    def _set_services(self, names: set[str]) -> None:
        for name in names - self._watchers.keys():
            self._watchers[name] = asyncio.create_task(self._watch_service(name),
                                                       name=f"consul-health-{name}")
        gone = self._watchers.keys() - names
        for name in gone:
            self._watchers.pop(name).cancel()
            self._instances.pop(name, None)
            self._services_synced.discard(name)
            self._errors.pop(f"service {name}", None)
        if gone:
            self._publish()
        self._check_synced()

    async def _watch_service(self, name: str) -> None:
        client = self._client()
        backoff = Backoff(self._backoff_policy, self._rng)
        index = 0
        started = float("-inf")
        wait = format_duration(self.wait)
        key = f"service {name}"
        while True:
            started = await self._pace(started)
            try:
                raw_index, entries = await in_thread(client.health.service, name,
                                                     index=index or None, wait=wait,
                                                     passing=True)
            except Exception as err:
                self._failed(key, err)
                index = 0
                await asyncio.sleep(backoff.next_delay())
                continue
            self._recovered(key)
            backoff.reset()
            index = next_index(index, parse_index(raw_index))
            self._instances[name] = tuple(i for i in instances_from_health(entries)
                                          if i.service == name)
            self._services_synced.add(name)
            self._publish()
            self._check_synced()

    def _publish(self) -> None:
        self._publisher.publish(RegistryView(tuple(
            inst for insts in self._instances.values() for inst in insts)))

    def _check_synced(self) -> None:
        if self._catalog_synced and self._watchers.keys() <= self._services_synced:
            self._synced.set()

    def _failed(self, what: str, err: BaseException) -> None:
        why = describe(err)
        if self._errors.get(what, (0.0, ""))[1] != why:
            log.warning("Consul %s failed (keeping the last view): %s", what, why)
        self._errors[what] = (time.monotonic(), why)

    def _recovered(self, what: str) -> None:
        if self._errors.pop(what, None) is not None:
            log.info("Consul %s recovered", what)
