"""Where policy resources live: a local file, or Consul KV shared by several control planes.

Both stores have the same rules, decided by the pure plan_apply(): an apply is validated against
what is stored (one policy per kind per service), is all-or-nothing, and a resource that carries
a resource_version is only written if that is still the stored version (else Conflict, which the
API turns into ABORTED). Every write gets a new, higher version; applying an identical spec
changes nothing and keeps the version (so a re-apply does not trigger a push).

After each change a store tells its subscribers (changes() / on_change) with the new PolicySet,
so the control plane re-translates. The stores are synchronous (a file write, an HTTP call to
Consul): async callers run them in a thread (asyncio.to_thread).
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import contextlib
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from control_plane.policy import schema as s
from control_plane.policy.serialize import to_document
from control_plane.policy.validate import (
    FieldViolation,
    ValidationError,
    validate,
    validate_set,
)
from sidecar.atomic_file import write_atomically

log = logging.getLogger(__name__)

CREATED, CONFIGURED, UNCHANGED = "created", "configured", "unchanged"

Key = tuple[str, str]  # (kind, name)


class StoreError(Exception):
    """The store could not do what was asked (not the user's fault unless a subclass says)."""


class Conflict(StoreError):
    """A stale resource_version: someone changed the resource since the caller read it."""


class NotFound(StoreError):
    pass


class StoreUnavailable(StoreError):
    """The backend (Consul) did not answer; nothing was changed."""


@dataclass(frozen=True, slots=True)
class Applied:
    resource: s.Resource  # as stored (on a dry run: as it would be; version "" if it changes)
    result: str  # created | configured | unchanged


ResourceList = list[s.Resource]  # aliases: the stores' list() method shadows the builtin
AppliedList = list[Applied]
TxnOps = list[dict[str, Any]]


class PolicyStore(Protocol):
    def apply(self, resources: Sequence[s.Resource], *,
              dry_run: bool = False) -> ResourceList: ...

    def apply_report(self, resources: Sequence[s.Resource], *,
                     dry_run: bool = False) -> AppliedList: ...

    def get(self, kind: str, name: str) -> s.Resource | None: ...

    def list(self, kind: str | None = None) -> ResourceList: ...

    def delete(self, kind: str, name: str,
               resource_version: str | None = None) -> s.Resource: ...

    def policy_set(self) -> s.PolicySet: ...

    def changes(self, since: int | None = None) -> ChangeStream: ...

    def on_change(self, callback: Callable[[s.PolicySet], None]) -> Callable[[], None]: ...

    def close(self) -> None: ...


# ---------------------------------------------------------------------------------------------
# the rules, shared by both stores


def _label(key: Key) -> str:
    return f'{key[0]} "{key[1]}"'


def plan_apply(current: Mapping[Key, s.Resource],
               incoming: Sequence[s.Resource]) -> list[tuple[s.Resource, s.Resource | None, str]]:
    """For each incoming resource: (it, what is stored, result). Raises ValidationError for
    cross-resource rules and Conflict for stale versions (every one of them, in one message)."""
    validate_set(incoming, current.values())
    conflicts = []
    plan: list[tuple[s.Resource, s.Resource | None, str]] = []
    for r in incoming:
        stored = current.get(r.key)
        if r.resource_version:
            if stored is None:
                conflicts.append(f"{_label(r.key)} has resourceVersion {r.resource_version} but "
                                 "no longer exists")
            elif stored.resource_version != r.resource_version:
                conflicts.append(f"{_label(r.key)} was changed since it was read (resourceVersion "
                                 f"{r.resource_version}, stored {stored.resource_version})")
        if stored is None:
            result = CREATED
        elif stored.spec == r.spec:
            result = UNCHANGED
        else:
            result = CONFIGURED
        plan.append((r, stored, result))
    if conflicts:
        raise Conflict("; ".join(conflicts) + ": get the current version and apply again")
    return plan


def _check_delete(stored: s.Resource | None, key: Key, resource_version: str | None) -> s.Resource:
    if stored is None:
        raise NotFound(f"{_label(key)} not found")
    if resource_version and stored.resource_version != resource_version:
        raise Conflict(f"{_label(key)} was changed since it was read (resourceVersion "
                       f"{resource_version}, stored {stored.resource_version})")
    return stored


def _stored_form(r: s.Resource) -> dict[str, Any]:
    doc = to_document(r)
    doc["metadata"].pop("resourceVersion", None)
    return {"document": doc, "createTime": r.create_time, "updateTime": r.update_time}


def _from_stored_form(value: Any, version: str) -> s.Resource:
    """A stored entry -> Resource; a bare document (hand-written into Consul KV) is accepted."""
    if isinstance(value, Mapping) and "document" in value:
        doc, created, updated = value["document"], value.get("createTime"), value.get("updateTime")
    else:
        doc, created, updated = value, None, None
    r = validate(doc)
    return s.Resource(kind=r.kind, name=r.name, spec=r.spec, resource_version=version,
                      create_time=float(created) if isinstance(created, int | float) else None,
                      update_time=float(updated) if isinstance(updated, int | float) else None)


# ---------------------------------------------------------------------------------------------
# change notification


class _Notifier:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: list[Callable[[s.PolicySet], None]] = []

    def subscribe(self, callback: Callable[[s.PolicySet], None]) -> Callable[[], None]:
        with self._lock:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._lock, contextlib.suppress(ValueError):
                self._subscribers.remove(callback)
        return unsubscribe

    def publish(self, policies: s.PolicySet) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        for callback in subscribers:
            try:
                callback(policies)
            except Exception:  # a broken subscriber must not break the store
                log.exception("policy change subscriber failed")


class ChangeStream:
    """Async iterator of PolicySets, one after each change; changes that pile up while the
    consumer is busy are coalesced into the latest. Subscribes when created, so nothing
    between `store.policy_set()` and the first `async for` is missed (pass since=revision)."""

    def __init__(self, notifier: _Notifier, current: s.PolicySet, since: int | None) -> None:
        self._lock = threading.Lock()
        self._latest: s.PolicySet | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None
        self._closed = False
        self._unsubscribe = notifier.subscribe(self._on_change)
        if since is not None and current.revision != since:
            self._latest = current

    def _on_change(self, policies: s.PolicySet) -> None:
        with self._lock:
            self._latest = policies
            loop, event = self._loop, self._event
        if loop is not None and event is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
                loop.call_soon_threadsafe(event.set)

    def __aiter__(self) -> ChangeStream:
        return self

    async def __anext__(self) -> s.PolicySet:
        with self._lock:
            if self._event is None:
                self._loop = asyncio.get_running_loop()
                self._event = asyncio.Event()
            event = self._event
        while True:
            with self._lock:
                if self._closed:
                    raise StopAsyncIteration
                latest, self._latest = self._latest, None
                if latest is None:
                    event.clear()
            if latest is not None:
                return latest
            await event.wait()

    def close(self) -> None:
        self._unsubscribe()
        with self._lock:
            self._closed = True
            loop, event = self._loop, self._event
        if loop is not None and event is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(event.set)

    async def aclose(self) -> None:
        self.close()


class _Base:
    def __init__(self) -> None:
        self._notifier = _Notifier()
        self._publish_lock = threading.RLock()
        self._published: s.PolicySet | None = None

    def _publish_latest(self) -> None:
        """Tell subscribers about the current set, unless they have it already.

        Always the current set, read under one lock: two writers finishing in some order (an
        apply and the watch, say) can never leave subscribers with the older of two sets.
        """
        with self._publish_lock:
            current = self.policy_set()
            if self._published is not None and current.resources == self._published.resources:
                return
            self._published = current
            self._notifier.publish(current)

    def policy_set(self) -> s.PolicySet:
        raise NotImplementedError

    def changes(self, since: int | None = None) -> ChangeStream:
        return ChangeStream(self._notifier, self.policy_set(), since)

    def on_change(self, callback: Callable[[s.PolicySet], None]) -> Callable[[], None]:
        """Call `callback(policy_set)` after each change (on the thread that saw it)."""
        return self._notifier.subscribe(callback)


# ---------------------------------------------------------------------------------------------
# FileStore


class FileStore(_Base):
    """Policies in one JSON file (the control plane's state dir), for one control plane.

    Versions come from a revision counter kept in the file, so they keep growing across
    restarts. An exclusive lock on PATH.lock keeps a second control plane off the same file.
    A file that cannot be read or holds an invalid resource stops the start (StoreError)
    rather than being taken as empty, which would push policy-less config to every sidecar.
    """

    def __init__(self, path: str | os.PathLike[str], *,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__()
        self._path = Path(path)
        self._clock = clock
        self._lock = threading.RLock()
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fd: int | None = self._take_lock()
        try:
            self._revision, self._resources = self._load()
        except BaseException:
            self.close()
            raise
        self._set = s.PolicySet(tuple(self._resources.values()), self._revision)
        self._published = self._set

    @property
    def path(self) -> Path:
        return self._path

    def _take_lock(self) -> int:
        import fcntl

        lock_path = self._path.with_name(self._path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StoreError(f"{self._path} is in use by another control plane "
                             f"(lock {lock_path})") from None
        return fd

    def close(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # releases the flock

    def _load(self) -> tuple[int, dict[Key, s.Resource]]:
        try:
            raw = self._path.read_bytes()
        except FileNotFoundError:
            return 0, {}
        except OSError as e:
            raise StoreError(f"cannot read the policy file {self._path}: {e}") from None
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise StoreError(f"the policy file {self._path} is not valid JSON: {e}") from None
        if not isinstance(data, dict) or not isinstance(data.get("resources", []), list):
            raise StoreError(f"the policy file {self._path} is not a pymesh policy file")
        revision = data.get("revision", 0)
        if not isinstance(revision, int) or revision < 0:
            raise StoreError(f"the policy file {self._path} has an invalid revision")
        resources: dict[Key, s.Resource] = {}
        problems: list[str] = []
        for i, entry in enumerate(data.get("resources", [])):
            version = entry.get("resourceVersion", "") if isinstance(entry, dict) else ""
            try:
                r = _from_stored_form(entry, str(version))
            except ValidationError as e:
                problems.append(f"resources[{i}]: {e.message()}")
                continue
            resources[r.key] = r
        if problems:
            raise StoreError(f"the policy file {self._path} holds invalid resources: "
                             + "; ".join(problems))
        return revision, resources

    def _save(self, revision: int, resources: Mapping[Key, s.Resource]) -> None:
        entries = []
        for key in sorted(resources):
            r = resources[key]
            entry = _stored_form(r)
            entry["resourceVersion"] = r.resource_version
            entries.append(entry)
        data = json.dumps({"revision": revision, "resources": entries}, indent=1,
                          sort_keys=True).encode() + b"\n"
        try:
            write_atomically(self._path, data)
        except OSError as e:
            raise StoreError(f"cannot write the policy file {self._path}: {e}") from None

    # --- the PolicyStore API -----------------------------------------------------------------

    def policy_set(self) -> s.PolicySet:
        with self._lock:
            return self._set

    def get(self, kind: str, name: str) -> s.Resource | None:
        with self._lock:
            return self._resources.get((kind, name))

    def list(self, kind: str | None = None) -> ResourceList:
        with self._lock:
            return [self._resources[k] for k in sorted(self._resources)
                    if kind is None or k[0] == kind]

    def apply(self, resources: Sequence[s.Resource], *,
              dry_run: bool = False) -> ResourceList:
        return [a.resource for a in self.apply_report(resources, dry_run=dry_run)]

    def apply_report(self, resources: Sequence[s.Resource], *,
                     dry_run: bool = False) -> AppliedList:
        with self._lock:
            plan = plan_apply(self._resources, resources)
            changed = any(result != UNCHANGED for _, _, result in plan)
            revision = self._revision + 1 if changed else self._revision
            now = self._clock()
            out: AppliedList = []
            updated = dict(self._resources)
            for r, stored, result in plan:
                if result == UNCHANGED and stored is not None:
                    out.append(Applied(stored, result))
                    continue
                version = "" if dry_run else str(revision)
                created = stored.create_time if stored is not None else now
                new = s.Resource(r.kind, r.name, r.spec, version, created, now)
                updated[r.key] = new
                out.append(Applied(new, result))
            if dry_run or not changed:
                return out
            self._save(revision, updated)
            self._commit(revision, updated)
        self._publish_latest()
        return out

    def delete(self, kind: str, name: str,
               resource_version: str | None = None) -> s.Resource:
        with self._lock:
            stored = _check_delete(self._resources.get((kind, name)), (kind, name),
                                   resource_version)
            updated = dict(self._resources)
            del updated[(kind, name)]
            revision = self._revision + 1
            self._save(revision, updated)
            self._commit(revision, updated)
        self._publish_latest()
        return stored

    def _commit(self, revision: int, resources: dict[Key, s.Resource]) -> None:
        self._revision, self._resources = revision, resources
        self._set = s.PolicySet(tuple(resources.values()), revision)


# ---------------------------------------------------------------------------------------------
# ConsulKVStore

MAX_TXN_OPS = 64  # Consul's limit per transaction before 1.x raised it to 128
MAX_VALUE_BYTES = 512 * 1024  # Consul's limit per KV value
MAX_APPLY_ATTEMPTS = 8  # re-plans after losing a CAS race to another control plane


def _consul_errors() -> tuple[type[BaseException], ...]:
    """What a failed Consul call raises: py-consul's errors and the HTTP client's."""
    import consul
    import requests

    return (consul.ConsulException, requests.RequestException, OSError, ValueError)


class ConsulKVStore(_Base):
    """Policies as Consul KV entries `PREFIX<kind>/<name>`, shared by every control plane.

    A resource's version is its entry's ModifyIndex, so Consul's own check-and-set is the
    concurrency check: an apply is one transaction (/v1/txn) of `cas` operations, each with
    the ModifyIndex it was planned against (0 = must not exist), and fails as a whole if any
    entry moved. A blocking query on the prefix (index + wait, backoff with jitter on errors,
    index reset handled) picks up changes made by other replicas or by `consul kv`.

    Until the first successful read, `ready` is False and policy_set() is empty: the control
    plane must not push config before that (it would drop every policy from the sidecars).
    When Consul goes away the last view is kept and `healthy`/`last_error` say so.
    """

    def __init__(self, client: Any, prefix: str = "pymesh/policies/", *, wait: str = "30s",
                 clock: Callable[[], float] = time.time, rng: random.Random | None = None,
                 backoff_base: float = 0.2, backoff_max: float = 10.0) -> None:
        super().__init__()
        if not prefix.endswith("/"):
            prefix += "/"
        self._client = client
        self._prefix = prefix.lstrip("/")
        self._wait = wait
        self._clock = clock
        self._rng = rng or random.Random()
        self._backoff = (backoff_base, backoff_max)
        self._lock = threading.RLock()
        self._set = s.PolicySet()
        self._published = self._set
        self._index = 0
        self._parsed: dict[str, tuple[int, s.Resource | None]] = {}  # key -> (ModifyIndex, r)
        self.ready = threading.Event()
        self.healthy = False
        self.last_error = ""
        self.invalid_entries: dict[str, str] = {}  # KV key -> why it was ignored
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._errors = _consul_errors()

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Read once (if Consul answers) and watch the prefix in a background thread."""
        with contextlib.suppress(StoreUnavailable):
            self._read()
        self._thread = threading.Thread(target=self._watch, name="policy-kv-watch",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop watching. The watch thread may sit in a blocking query for up to `wait`; it is
        a daemon and exits at its next wake-up."""
        self._stop.set()

    def _watch(self) -> None:
        index = self._index
        delay = self._backoff[0]
        failing = False
        while not self._stop.is_set():
            try:
                # after a failure, one plain read first: it says at once whether Consul is back
                blocking = index > 0 and not failing
                got, items = self._client.kv.get(self._prefix, recurse=True,
                                                 index=str(index) if blocking else None,
                                                 wait=self._wait)
                new_index = int(got)
            except self._errors as e:
                failing = True
                self._failed(e)
                self._stop.wait(delay * (0.5 + self._rng.random()))
                delay = min(delay * 2, self._backoff[1])
                continue
            failing = False
            delay = self._backoff[0]
            if self._stop.is_set():
                return
            # an index that went backwards means Consul's state was rebuilt (snapshot restore,
            # new cluster): take the listing as it is and start blocking afresh from it
            reset = new_index < index
            self._install(new_index, items or [], force=reset)
            index = max(new_index, 1)

    def _failed(self, error: BaseException) -> None:
        with self._lock:
            self.healthy = False
            self.last_error = f"consul: {error}"
        log.warning("policy store: consul query failed: %s", error)

    # --- reading -----------------------------------------------------------------------------

    def _key(self, kind: str, name: str) -> str:
        return f"{self._prefix}{kind}/{name}"

    def _parse(self, items: Iterable[Mapping[str, Any]]) -> dict[Key, tuple[s.Resource, int]]:
        """KV entries -> resources (with their ModifyIndex); bad entries are reported, skipped."""
        out: dict[Key, tuple[s.Resource, int]] = {}
        parsed: dict[str, tuple[int, s.Resource | None]] = {}
        invalid: dict[str, str] = {}
        for item in items:
            key = str(item.get("Key", ""))
            modify = int(item.get("ModifyIndex", 0))
            rest = key[len(self._prefix):]
            if not key.startswith(self._prefix) or rest.count("/") != 1 or rest.endswith("/"):
                if rest and not rest.endswith("/"):
                    invalid[key] = "not a <kind>/<name> key"
                continue
            cached = self._parsed.get(key)
            if cached is not None and cached[0] == modify:
                r = cached[1]
                if r is None:
                    invalid[key] = self.invalid_entries.get(key, "invalid")
            else:
                r = None
                try:
                    raw = item.get("Value") or b""
                    value = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
                    r = _from_stored_form(value, str(modify))
                    if (r.kind, r.name) != tuple(rest.split("/", 1)):
                        invalid[key] = f"holds {_label(r.key)}, not what its key says"
                        r = None
                except ValidationError as e:
                    invalid[key] = e.message()
                except (ValueError, UnicodeDecodeError) as e:
                    invalid[key] = f"not JSON: {e}"
            parsed[key] = (modify, r)
            if r is not None:
                out[r.key] = (r, modify)
        with self._lock:
            self._parsed = parsed
            self.invalid_entries = invalid
        for key, why in invalid.items():
            log.warning("policy store: ignoring %s: %s", key, why)
        return out

    def _install(self, index: int, items: Iterable[Mapping[str, Any]], *,
                 force: bool = False) -> dict[Key, tuple[s.Resource, int]]:
        current = self._parse(items)
        with self._lock:
            self.healthy = True
            self.last_error = ""
            if force or index >= self._index:
                self._set = s.PolicySet(tuple(r for r, _ in current.values()), index)
                self._index = index
            self.ready.set()
        self._publish_latest()
        return current

    def _read(self) -> dict[Key, tuple[s.Resource, int]]:
        try:
            got, items = self._client.kv.get(self._prefix, recurse=True)
            index = int(got)
        except self._errors as e:
            self._failed(e)
            raise StoreUnavailable(f"Consul did not answer: {e}") from None
        return self._install(index, items or [])

    # --- the PolicyStore API -----------------------------------------------------------------

    def policy_set(self) -> s.PolicySet:
        with self._lock:
            return self._set

    def get(self, kind: str, name: str) -> s.Resource | None:
        found = self._read().get((kind, name))
        return found[0] if found else None

    def list(self, kind: str | None = None) -> ResourceList:
        current = self._read()
        return [current[k][0] for k in sorted(current) if kind is None or k[0] == kind]

    def apply(self, resources: Sequence[s.Resource], *,
              dry_run: bool = False) -> ResourceList:
        return [a.resource for a in self.apply_report(resources, dry_run=dry_run)]

    def apply_report(self, resources: Sequence[s.Resource], *,
                     dry_run: bool = False) -> AppliedList:
        for attempt in range(MAX_APPLY_ATTEMPTS):
            if attempt:  # lost a race: let the other writer finish before re-reading
                time.sleep(self._rng.uniform(0, 0.005 * 2 ** attempt))
            current = self._read()
            plan = plan_apply({k: r for k, (r, _) in current.items()}, resources)
            now = self._clock()
            out: AppliedList = []
            ops: TxnOps = []
            op_slots: builtins.list[int] = []  # which out[] entry each op writes
            violations = []
            for i, (r, stored, result) in enumerate(plan):
                if result == UNCHANGED and stored is not None:
                    out.append(Applied(stored, result))
                    continue
                created = stored.create_time if stored is not None else now
                new = s.Resource(r.kind, r.name, r.spec, "", created, now)
                out.append(Applied(new, result))
                value = json.dumps(_stored_form(new), sort_keys=True).encode()
                if len(value) > MAX_VALUE_BYTES:
                    violations.append(FieldViolation(
                        f"documents[{i}]", f"too large for Consul KV ({len(value)} bytes, limit "
                                           f"{MAX_VALUE_BYTES})"))
                modify = current[r.key][1] if r.key in current else 0
                ops.append({"KV": {"Verb": "cas", "Key": self._key(r.kind, r.name),
                                   "Value": base64.b64encode(value).decode(), "Index": modify}})
                op_slots.append(i)
            if len(ops) > MAX_TXN_OPS:
                violations.append(FieldViolation(
                    "", f"at most {MAX_TXN_OPS} resources can change in one apply with the "
                        f"Consul store ({len(ops)} would)"))
            if violations:
                raise ValidationError(violations)
            if dry_run or not ops:
                return out
            results = self._txn(ops)
            if results is None:
                continue  # lost a CAS race: re-read and re-plan (a stale version -> Conflict)
            for slot, result_entry in zip(op_slots, results, strict=True):
                applied = out[slot]
                version = str(result_entry.get("KV", {}).get("ModifyIndex", ""))
                out[slot] = Applied(s.Resource(applied.resource.kind, applied.resource.name,
                                               applied.resource.spec, version,
                                               applied.resource.create_time,
                                               applied.resource.update_time), applied.result)
            with contextlib.suppress(StoreUnavailable):
                self._read()  # read our own write; the watch would catch up anyway
            return out
        raise Conflict("the policies kept changing during this apply (other control planes are "
                       "writing): apply again")

    def _txn(self, ops: TxnOps) -> TxnOps | None:
        """Results of a committed transaction, or None if it was rolled back (CAS failed)."""
        from consul.exceptions import ClientError

        try:
            response = self._client.txn.put(ops)
        except ClientError as e:
            if str(e).startswith("409"):
                return None
            raise StoreUnavailable(f"Consul refused the write: {e}") from None
        except self._errors as e:
            self._failed(e)
            raise StoreUnavailable(f"Consul did not answer: {e}") from None
        results = (response or {}).get("Results") or []
        if len(results) != len(ops):
            raise StoreUnavailable(f"unexpected transaction response from Consul: {response!r}")
        return list(results)

    def delete(self, kind: str, name: str,
               resource_version: str | None = None) -> s.Resource:
        for _ in range(MAX_APPLY_ATTEMPTS):
            found = self._read().get((kind, name))
            stored = _check_delete(found[0] if found else None, (kind, name), resource_version)
            assert found is not None
            try:
                deleted = self._client.kv.delete(self._key(kind, name), cas=found[1])
            except self._errors as e:
                self._failed(e)
                raise StoreUnavailable(f"Consul did not answer: {e}") from None
            if deleted:
                with contextlib.suppress(StoreUnavailable):
                    self._read()
                return stored
        raise Conflict(f"{_label((kind, name))} kept changing during this delete: try again")
