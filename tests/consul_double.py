"""An in-test double of Consul's HTTP API: a real HTTP/1.1 server on 127.0.0.1, one thread.

The Consul server cannot be installed from the package registries here, so tests run the mesh
(through py-consul, over real sockets) against this double. It implements the part of the API
the mesh and py-consul use, with Consul's semantics where they matter to a client:

  Agent (the one local agent of a single-node dev "cluster"):
    PUT  /v1/agent/service/register[?replace-existing-checks]   Name, ID, Address, Port, Tags,
         Meta (Consul's key/value limits), Check/Checks of TTL type only (CheckID, Name, TTL,
         Status, Notes, DeregisterCriticalServiceAfter); default check IDs "service:ID" and
         "service:ID:N"; a new TTL check starts critical unless Status says otherwise; keys
         are case-insensitive, as in Consul's decoder
    PUT  /v1/agent/service/deregister/ID                         404 for an unknown ID
    PUT  /v1/agent/check/pass|warn|fail/ID[?note=]               404 unknown check, 500 not TTL
    PUT  /v1/agent/check/update/ID                               {"Status", "Output"}
    GET  /v1/agent/services, /v1/agent/checks
  Catalog and health (blocking):
    GET  /v1/catalog/services                                    {name: [tags]}, incl. "consul"
    GET  /v1/catalog/service/NAME
    GET  /v1/health/service/NAME[?passing][&tag=T]               Node, Service, Checks; passing =
                                                                 every check (node's too) passing
  KV (blocking reads):
    GET    /v1/kv/KEY[?recurse][?keys[&separator=S]][?raw]       base64 Value (null if empty),
                                                                 404 + X-Consul-Index if none
    PUT    /v1/kv/KEY[?cas=N][?flags=N]                          true/false; cas=0: create only
    DELETE /v1/kv/KEY[?recurse][?cas=N]                          true/false
    PUT    /v1/txn                                               KV ops only (set, cas, get,
         get-tree, check-index, check-not-exists, delete, delete-cas, delete-tree), at most
         64; all or nothing under one index; 409 {"Errors": [{"OpIndex", "What"}]} on failure
  Status:
    GET  /v1/status/leader, /v1/status/peers

Blocking queries: `?index=N&wait=D` holds the request until the query's own index exceeds N or
the wait (a Go duration, default 5m, capped at `max_wait`, 10m as in Consul, plus up to wait/16
of jitter) elapses. Every response carries X-Consul-Index, which only grows (one Raft-like
counter; per-service and per-key indexes as Consul keeps them), except through the
`reset_index` hook. TTL checks turn critical ("TTL expired") when not updated within their TTL;
DeregisterCriticalServiceAfter removes the service (checked at once, where Consul reaps every
30 s). Periodic passes that do not change a check's status do not bump any index, as in Consul.

Not implemented (404 "unsupported by the Consul double"): ACLs and tokens (ignored), sessions
and locks, transactions, other check types, multiple nodes or datacenters, filters, prepared
queries, Connect, the UI. Consistency modes (`?stale`, `?consistent`) are accepted and ignored.

Test hooks: `set_unavailable("refuse")` (listener closed and open connections dropped: clients
get connection refused/reset), `set_unavailable("error")` (every request answered 500 "No
cluster leader", blocked queries released with it), `set_available()`; `reset_index(to)` (every
index rewound, as after a snapshot restore or a rebuilt cluster); direct state helpers
(`register_service`, `set_check`, `deregister_service`) and `requests` (a log of what clients
asked). Time: `clock` (default time.monotonic) drives TTLs; with a clock given, no reaper thread
runs and tests call `expire_checks()` after advancing it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import random
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

NODE = "pymesh-dev"
NODE_ADDRESS = "127.0.0.1"
DATACENTER = "dc1"
LEADER = "127.0.0.1:8300"
MAX_WAIT = 600.0  # Consul caps wait at 10 minutes
DEFAULT_WAIT = 300.0
KV_MAX_VALUE = 512 * 1024
TXN_MAX_OPS = 64
META_KEY_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
STATUSES = ("passing", "warning", "critical")
_DURATION_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


class ApiError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def parse_duration(text: str) -> float:
    """A Go duration ("10s", "1m30s", "250ms"; a bare number is seconds, as Consul allows)."""
    text = text.strip()
    if re.fullmatch(r"\d+", text):
        return float(text)
    parts = _DURATION_RE.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"invalid duration {text!r}")
    return sum(float(n) * _UNITS[u] for n, u in parts)


@dataclass
class _Service:
    id: str
    name: str
    address: str
    port: int
    tags: list[str]
    meta: dict[str, str]
    create_index: int
    modify_index: int


@dataclass
class _Check:
    id: str
    name: str
    service_id: str  # "" for node checks
    service_name: str
    status: str
    ttl: float | None
    notes: str = ""
    output: str = ""
    deregister_after: float | None = None
    expires_at: float | None = None
    critical_since: float | None = None
    create_index: int = 0
    modify_index: int = 0


@dataclass
class _Entry:
    key: str
    value: bytes
    flags: int
    create_index: int
    modify_index: int


@dataclass
class _Down:
    mode: str  # "refuse" | "error"
    generation: int


@dataclass
class RequestRecord:
    method: str
    path: str
    query: dict[str, list[str]] = field(default_factory=dict)
    at: float = field(default_factory=time.monotonic)


class ConsulState:
    """The data and its rules; every method takes the lock, so handlers and hooks can race."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.cond = threading.Condition(threading.RLock())
        self.index = 10  # a fresh dev agent is already a few writes in
        self.node_id = str(uuid.uuid4())
        self.services: dict[str, _Service] = {}
        self.checks: dict[str, _Check] = {}
        self.service_index: dict[str, int] = {}  # per service name, kept after removal
        self.services_table = 1
        self.kv: dict[str, _Entry] = {}
        self.tombstones: dict[str, int] = {}
        self.kv_table = 1
        self.generation = 0  # bumped by availability changes: wakes and aborts blocked queries
        self.down: _Down | None = None
        with self.cond:
            self.add_check(_Check("serfHealth", "Serf Health Status", "", "", "passing", None,
                                  output="Agent alive and reachable"))
            self.put_service(_Service("consul", "consul", "", 8300, [], {}, 0, 0), [], False)

    # --- indexes ---------------------------------------------------------------------------
    def _bump(self) -> int:
        self.index += 1
        self.cond.notify_all()
        return self.index

    def _touch_service(self, name: str, idx: int) -> None:
        if name:
            self.service_index[name] = idx
        else:  # a node check changed: every service's health did
            for svc in {s.name for s in self.services.values()}:
                self.service_index[svc] = idx

    def reset_index(self, to: int) -> None:
        with self.cond:
            self.index = to
            self.services_table = self.kv_table = to
            self.service_index = dict.fromkeys(self.service_index, to)
            self.tombstones = dict.fromkeys(self.tombstones, to)
            for obj in [*self.services.values(), *self.checks.values(), *self.kv.values()]:
                obj.create_index = obj.modify_index = to
            self.cond.notify_all()

    # --- services and checks ---------------------------------------------------------------
    def put_service(self, svc: _Service, checks: list[_Check], replace_checks: bool) -> None:
        with self.cond:
            idx = self._bump()
            old = self.services.get(svc.id)
            svc.create_index = old.create_index if old else idx
            svc.modify_index = idx
            if old and old.name != svc.name:
                self._touch_service(old.name, idx)
            self.services[svc.id] = svc
            keep = {c.id for c in checks}
            if replace_checks:
                for cid in [c.id for c in self.checks.values()
                            if c.service_id == svc.id and c.id not in keep]:
                    del self.checks[cid]
            for check in checks:
                existing = self.checks.get(check.id)
                if existing is not None and check.status == "":
                    check.status, check.output = existing.status, existing.output
                check.status = check.status or "critical"
                self.add_check(check, idx)
            self.services_table = idx
            self._touch_service(svc.name, idx)

    def add_check(self, check: _Check, idx: int | None = None) -> None:
        with self.cond:
            idx = idx or self._bump()
            old = self.checks.get(check.id)
            check.create_index = old.create_index if old else idx
            check.modify_index = idx
            now = self.clock()
            if check.ttl is not None:
                check.expires_at = now + check.ttl
            check.critical_since = now if check.status == "critical" else None
            self.checks[check.id] = check

    def remove_service(self, service_id: str) -> bool:
        with self.cond:
            svc = self.services.pop(service_id, None)
            if svc is None:
                return False
            idx = self._bump()
            for cid in [c.id for c in self.checks.values() if c.service_id == service_id]:
                del self.checks[cid]
            self.services_table = idx
            self._touch_service(svc.name, idx)
            return True

    def update_check(self, check_id: str, status: str, output: str | None,
                     ttl_only: bool = True) -> None:
        with self.cond:
            check = self.checks.get(check_id)
            if check is None:
                raise ApiError(404, f'Unknown check ID "{check_id}". Ensure that the check ID '
                                    "is passed, not the check name.")
            if ttl_only and check.ttl is None:
                raise ApiError(500, f'CheckID "{check_id}" does not have associated TTL')
            now = self.clock()
            if check.ttl is not None:
                check.expires_at = now + check.ttl
            if output is not None:
                check.output = output
            if status != check.status:
                check.status = status
                check.critical_since = now if status == "critical" else None
                idx = self._bump()
                check.modify_index = idx
                self._touch_service(check.service_name, idx)

    def expire_checks(self) -> list[str]:
        """Apply TTL expiry and DeregisterCriticalServiceAfter as of the clock; what changed."""
        changed: list[str] = []
        with self.cond:
            now = self.clock()
            for check in list(self.checks.values()):
                if (check.ttl is not None and check.status != "critical"
                        and check.expires_at is not None and check.expires_at <= now):
                    self.update_check(check.id, "critical", "TTL expired")
                    changed.append(check.id)
            for check in list(self.checks.values()):
                if (check.deregister_after is not None and check.critical_since is not None
                        and now - check.critical_since >= check.deregister_after
                        and self.remove_service(check.service_id)):
                    changed.append(check.service_id)
        return changed

    def next_deadline(self) -> float | None:
        with self.cond:
            times = [c.expires_at for c in self.checks.values()
                     if c.ttl is not None and c.status != "critical" and c.expires_at is not None]
            times += [c.critical_since + c.deregister_after for c in self.checks.values()
                      if c.deregister_after is not None and c.critical_since is not None]
            return min(times) if times else None

    # --- queries (each returns (index, body)) ----------------------------------------------
    def catalog_services(self) -> tuple[int, Any]:
        tags: dict[str, set[str]] = {}
        for svc in self.services.values():
            tags.setdefault(svc.name, set()).update(svc.tags)
        return self.services_table, {name: sorted(t) for name, t in sorted(tags.items())}

    def _index_of_service(self, name: str) -> int:
        return self.service_index.get(name) or self.services_table

    def _instances(self, name: str, tag: str | None) -> list[_Service]:
        found = [s for s in self.services.values()
                 if s.name == name and (tag is None or tag in s.tags)]
        return sorted(found, key=lambda s: s.id)

    def catalog_service(self, name: str, tag: str | None) -> tuple[int, Any]:
        body = [{"ID": self.node_id, "Node": NODE, "Address": NODE_ADDRESS,
                 "Datacenter": DATACENTER, "TaggedAddresses": {"lan": NODE_ADDRESS},
                 "NodeMeta": {}, "ServiceID": s.id, "ServiceName": s.name,
                 "ServiceTags": list(s.tags), "ServiceAddress": s.address,
                 "ServiceMeta": dict(s.meta), "ServicePort": s.port,
                 "ServiceEnableTagOverride": False, "CreateIndex": s.create_index,
                 "ModifyIndex": s.modify_index} for s in self._instances(name, tag)]
        return self._index_of_service(name), body

    def health_service(self, name: str, passing: bool, tag: str | None) -> tuple[int, Any]:
        node_checks = [c for c in self.checks.values() if not c.service_id]
        body = []
        for svc in self._instances(name, tag):
            checks = node_checks + sorted((c for c in self.checks.values()
                                           if c.service_id == svc.id), key=lambda c: c.id)
            if passing and any(c.status != "passing" for c in checks):
                continue
            body.append({"Node": self._node_json(), "Service": self._service_json(svc),
                         "Checks": [self._check_json(c) for c in checks]})
        return self._index_of_service(name), body

    def agent_services(self) -> Any:
        return {s.id: self._service_json(s) for s in self.services.values()
                if s.id != "consul"}

    def agent_checks(self) -> Any:
        return {c.id: self._check_json(c) for c in self.checks.values()}

    def _node_json(self) -> dict[str, Any]:
        return {"ID": self.node_id, "Node": NODE, "Address": NODE_ADDRESS,
                "Datacenter": DATACENTER, "TaggedAddresses": {"lan": NODE_ADDRESS},
                "Meta": {"consul-network-segment": ""}, "CreateIndex": 1, "ModifyIndex": 1}

    @staticmethod
    def _service_json(s: _Service) -> dict[str, Any]:
        return {"ID": s.id, "Service": s.name, "Tags": list(s.tags), "Address": s.address,
                "Meta": dict(s.meta), "Port": s.port, "Weights": {"Passing": 1, "Warning": 1},
                "EnableTagOverride": False, "Datacenter": DATACENTER,
                "CreateIndex": s.create_index, "ModifyIndex": s.modify_index}

    def _check_json(self, c: _Check) -> dict[str, Any]:
        svc = self.services.get(c.service_id)
        return {"Node": NODE, "CheckID": c.id, "Name": c.name, "Status": c.status,
                "Notes": c.notes, "Output": c.output, "ServiceID": c.service_id,
                "ServiceName": c.service_name, "ServiceTags": list(svc.tags) if svc else [],
                "Type": "ttl" if c.ttl is not None else "", "CreateIndex": c.create_index,
                "ModifyIndex": c.modify_index}

    # --- KV --------------------------------------------------------------------------------
    def kv_get(self, key: str, recurse: bool) -> tuple[int, list[_Entry]]:
        if recurse:
            entries = sorted((e for k, e in self.kv.items() if k.startswith(key)),
                             key=lambda e: e.key)
            marks = [e.modify_index for e in entries]
            marks += [i for k, i in self.tombstones.items() if k.startswith(key)]
            return (max(marks) if marks else self.kv_table), entries
        entry = self.kv.get(key)
        return (entry.modify_index if entry else self.kv_table), ([entry] if entry else [])

    def kv_put(self, key: str, value: bytes, cas: int | None, flags: int | None) -> bool:
        with self.cond:
            entry = self.kv.get(key)
            if cas is not None and (entry.modify_index if entry else 0) != cas:
                return False
            idx = self._bump()
            if entry is None:
                self.kv[key] = _Entry(key, value, flags or 0, idx, idx)
            else:
                entry.value, entry.modify_index = value, idx
                if flags is not None:
                    entry.flags = flags
            self.tombstones.pop(key, None)
            self.kv_table = idx
            return True

    def kv_delete(self, key: str, recurse: bool, cas: int | None) -> bool:
        with self.cond:
            if recurse:
                doomed = [k for k in self.kv if k.startswith(key)]
            else:
                entry = self.kv.get(key)
                if cas is not None and (entry is None or entry.modify_index != cas):
                    return entry is None
                doomed = [key] if entry else []
            if not doomed:
                return True
            idx = self._bump()
            for k in doomed:
                del self.kv[k]
                self.tombstones[k] = idx
            self.kv_table = idx
            return True


    def kv_txn(self, ops: list[dict[str, Any]]) -> tuple[int, Any]:
        """POST/PUT /v1/txn with KV operations: all or nothing, one index for all writes."""
        if len(ops) > TXN_MAX_OPS:
            raise ApiError(413, f"Transaction contains too many operations "
                                f"({len(ops)} > {TXN_MAX_OPS})")
        with self.cond:
            idx = self.index + 1  # what the commit will get
            kv = dict(self.kv)
            deleted: set[str] = set()
            results: list[dict[str, Any]] = []
            errors: list[dict[str, Any]] = []
            for i, raw in enumerate(ops):
                op = _lower_keys(raw)
                if set(op) != {"kv"}:
                    raise ApiError(400, "the Consul double supports KV transaction ops only")
                spec = _lower_keys(op["kv"])
                verb, key = str(spec.get("verb", "")), str(spec.get("key", ""))
                index = int(spec.get("index") or 0)
                cur = kv.get(key)
                cur_index = cur.modify_index if cur else 0

                def fail(what: str, i: int = i) -> None:
                    errors.append({"OpIndex": i, "What": what})

                if verb in ("set", "cas"):
                    if verb == "cas" and cur_index != index:
                        fail(f'failed to set key "{key}", index is stale')
                        continue
                    try:
                        value = base64.b64decode(spec.get("value") or "", validate=True)
                    except ValueError:
                        raise ApiError(400, f"Failed to decode value of op {i}") from None
                    if len(value) > KV_MAX_VALUE:
                        raise ApiError(413, f"Value for key {key!r} exceeds the limit")
                    flags = int(spec.get("flags") or 0)
                    kv[key] = _Entry(key, value, flags, cur.create_index if cur else idx, idx)
                    deleted.discard(key)
                    results.append({"KV": {"LockIndex": 0, "Key": key, "Flags": flags,
                                           "Value": None, "CreateIndex": kv[key].create_index,
                                           "ModifyIndex": idx}})
                elif verb == "get":
                    if cur is None:
                        fail(f'key "{key}" doesn\'t exist')
                    else:
                        results.append({"KV": _kv_json(cur)})
                elif verb == "get-tree":
                    results += [{"KV": _kv_json(e)} for k, e in sorted(kv.items())
                                if k.startswith(key)]
                elif verb == "check-index":
                    if cur is None or cur_index != index:
                        fail(f'current modify index {cur_index} != {index}')
                    else:
                        results.append({"KV": _kv_json(cur)})
                elif verb == "check-not-exists":
                    if cur is not None:
                        fail(f'key "{key}" exists')
                elif verb in ("delete", "delete-cas"):
                    if verb == "delete-cas" and cur_index != index:
                        fail(f'failed to delete key "{key}", index is stale')
                        continue
                    if kv.pop(key, None) is not None:
                        deleted.add(key)
                elif verb == "delete-tree":
                    for k in [k for k in kv if k.startswith(key)]:
                        del kv[k]
                        deleted.add(k)
                else:
                    raise ApiError(400, f"Invalid KV verb {verb!r} in op {i}")
            if errors:
                return 409, {"Results": None, "Errors": errors}
            if kv != self.kv or deleted:
                self._bump()
                self.kv = kv
                for k in deleted:
                    self.tombstones[k] = idx
                for k in kv:
                    self.tombstones.pop(k, None)
                self.kv_table = idx
            return 200, {"Results": results, "Errors": None}


def _kv_json(e: _Entry) -> dict[str, Any]:
    return {"LockIndex": 0, "Key": e.key, "Flags": e.flags,
            "Value": base64.b64encode(e.value).decode() if e.value else None,
            "CreateIndex": e.create_index, "ModifyIndex": e.modify_index}


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], double: ConsulDouble) -> None:
        self.double = double
        self.connections: set[socket.socket] = set()
        self.conn_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.conn_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.conn_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def drop_connections(self) -> None:
        with self.conn_lock:
            conns = list(self.connections)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class _Abort(Exception):
    """The double went down while this request was blocked: drop the connection."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        return None

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        double = self.server.double
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        query = parse_qs(parts.query, keep_blank_values=True)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        double.requests.append(RequestRecord(method, path, query))
        try:
            code, payload, index, raw = double._handle(method, path, query, body)
        except _Abort:
            self.close_connection = True
            return
        except ApiError as err:
            code, payload, index, raw = err.code, err.message, None, True
        data = payload if isinstance(payload, bytes) else (
            str(payload).encode() if raw else json.dumps(payload).encode())
        try:
            self.send_response(code)
            self.send_header("Content-Type", "text/plain; charset=utf-8" if raw
                             else "application/json")
            if index is not None:
                self.send_header("X-Consul-Index", str(index))
                self.send_header("X-Consul-KnownLeader", "true")
                self.send_header("X-Consul-LastContact", "0")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            self.close_connection = True


def _flag(query: dict[str, list[str]], name: str) -> bool:
    """Consul's boolean query parameters: present (even empty) and not false."""
    if name not in query:
        return False
    return query[name][-1].lower() not in ("false", "0")


def _one(query: dict[str, list[str]], name: str) -> str | None:
    return query[name][-1] if name in query else None


def _uint(query: dict[str, list[str]], name: str, what: str) -> int | None:
    text = _one(query, name)
    if text is None:
        return None
    if not text.isdigit():
        raise ApiError(400, f"Invalid {what}: {text!r}")
    return int(text)


def _lower_keys(obj: Any) -> dict[str, Any]:
    """Consul decodes registrations case-insensitively (and accepts snake_case)."""
    if not isinstance(obj, dict):
        raise ApiError(400, "Request decode failed: expected a JSON object")
    return {str(k).lower().replace("_", ""): v for k, v in obj.items()}


class ConsulDouble:
    """The server, its state, and the hooks tests use to make Consul misbehave."""

    def __init__(self, *, clock: Callable[[], float] | None = None, max_wait: float = MAX_WAIT,
                 seed: int = 0) -> None:
        self.state = ConsulState(clock or time.monotonic)
        self.max_wait = max_wait
        self.requests: list[RequestRecord] = []
        self._rng = random.Random(seed)
        self._server: _Server | None = _Server(("127.0.0.1", 0), self)
        self.port = self._server.server_address[1]
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._serve(self._server)
        if clock is None:
            reaper = threading.Thread(target=self._reap, name="consul-double-reaper",
                                      daemon=True)
            reaper.start()
            self._threads.append(reaper)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self, server: _Server) -> None:
        t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                             name="consul-double", daemon=True)
        t.start()

    def close(self) -> None:
        self._closed = True
        with self.state.cond:
            self.state.generation += 1
            self.state.down = _Down("refuse", self.state.generation)
            self.state.cond.notify_all()
        self._stop_server()

    def __enter__(self) -> ConsulDouble:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- hooks -----------------------------------------------------------------------------
    def set_unavailable(self, mode: str = "refuse") -> None:
        """"refuse": like a crashed agent (connections refused, open ones reset); "error":
        an agent without a cluster leader (500 on every request)."""
        if mode not in ("refuse", "error"):
            raise ValueError(mode)
        with self.state.cond:
            self.state.generation += 1
            self.state.down = _Down(mode, self.state.generation)
            self.state.cond.notify_all()
        if mode == "refuse":
            self._stop_server()

    def set_available(self) -> None:
        with self.state.cond:
            was = self.state.down
            self.state.generation += 1
            self.state.down = None
            self.state.cond.notify_all()
        if was is not None and was.mode == "refuse" and self._server is None:
            self._server = _Server(("127.0.0.1", self.port), self)
            self._serve(self._server)

    def reset_index(self, to: int = 1) -> None:
        """Rewind every index to `to`, as a snapshot restore or a rebuilt cluster does."""
        self.state.reset_index(to)

    def expire_checks(self) -> list[str]:
        return self.state.expire_checks()

    def register_service(self, name: str, service_id: str | None = None, *,
                         address: str = "", port: int = 0, tags: Iterable[str] = (),
                         meta: dict[str, str] | None = None,
                         ttl: float | None = None, status: str = "passing") -> str:
        """What PUT /v1/agent/service/register does, for test set-up (one TTL check if ttl)."""
        sid = service_id or name
        checks = []
        if ttl is not None:
            checks.append(_Check(f"service:{sid}", f"Service '{name}' check", sid, name,
                                 status, ttl))
        self.state.put_service(_Service(sid, name, address, port, list(tags), dict(meta or {}),
                                        0, 0), checks, True)
        return sid

    def deregister_service(self, service_id: str) -> bool:
        return self.state.remove_service(service_id)

    def set_check(self, check_id: str, status: str, output: str = "") -> None:
        self.state.update_check(check_id, status, output, ttl_only=False)

    def check_status(self, check_id: str) -> str | None:
        with self.state.cond:
            check = self.state.checks.get(check_id)
            return check.status if check else None

    def service_ids(self) -> set[str]:
        with self.state.cond:
            return {s for s in self.state.services if s != "consul"}

    def requests_to(self, prefix: str) -> list[RequestRecord]:
        return [r for r in list(self.requests) if r.path.startswith(prefix)]

    # --- internals -------------------------------------------------------------------------
    def _stop_server(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        server.drop_connections()

    def _reap(self) -> None:
        state = self.state
        while not self._closed:
            with state.cond:
                deadline = state.next_deadline()
                timeout = 1.0 if deadline is None else max(0.0, deadline - state.clock())
                if timeout > 0:
                    state.cond.wait(min(timeout, 1.0))
            state.expire_checks()

    def _handle(self, method: str, path: str, query: dict[str, list[str]],
                body: bytes) -> tuple[int, Any, int | None, bool]:
        state = self.state
        with state.cond:
            down = state.down
        if down is not None:
            if down.mode == "refuse":
                raise _Abort()
            raise ApiError(500, "rpc error making call: No cluster leader")
        if path.startswith("/v1/kv/"):
            return self._kv(method, path[len("/v1/kv/"):], query, body)
        if path.startswith("/v1/agent/"):
            return self._agent(method, path[len("/v1/agent/"):], query, body)
        if path == "/v1/txn":
            if method != "PUT":
                raise ApiError(405, f"method {method} not allowed")
            try:
                ops = json.loads(body or b"[]")
            except json.JSONDecodeError as err:
                raise ApiError(400, f"Failed to parse body: {err}") from None
            if not isinstance(ops, list):
                raise ApiError(400, "Failed to parse body: expected a list of operations")
            code, result = state.kv_txn(ops)
            return code, result, state.index, False
        if method != "GET":
            raise ApiError(405, f"method {method} not allowed")
        if path == "/v1/catalog/services":
            return self._blocking(query, state.catalog_services)
        if path.startswith("/v1/catalog/service/"):
            name = path[len("/v1/catalog/service/"):]
            return self._blocking(query, lambda: state.catalog_service(name, _one(query, "tag")))
        if path.startswith("/v1/health/service/"):
            name = path[len("/v1/health/service/"):]
            passing = _flag(query, "passing")
            return self._blocking(
                query, lambda: state.health_service(name, passing, _one(query, "tag")))
        if path == "/v1/status/leader":
            return 200, LEADER, None, False
        if path == "/v1/status/peers":
            return 200, [LEADER], None, False
        raise ApiError(404, f"unsupported by the Consul double: {method} {path}")

    def _blocking(self, query: dict[str, list[str]],
                  run: Callable[[], tuple[int, Any]]) -> tuple[int, Any, int | None, bool]:
        """Run `run` (under the lock) now, or when its index passes ?index, or at the wait."""
        min_index = _uint(query, "index", "index") or 0
        wait_text = _one(query, "wait")
        try:
            wait = parse_duration(wait_text) if wait_text else DEFAULT_WAIT
        except ValueError:
            raise ApiError(400, f"Invalid wait time: {wait_text!r}") from None
        wait = min(wait, self.max_wait)
        wait += wait / 16 * self._rng.random()
        state = self.state
        deadline = time.monotonic() + wait
        with state.cond:
            generation = state.generation
            while True:
                down = state.down
                if down is not None or state.generation != generation:
                    if down is not None and down.mode == "refuse":
                        raise _Abort()
                    if down is not None:
                        raise ApiError(500, "rpc error making call: No cluster leader")
                    generation = state.generation  # went down and up while we slept
                index, body = run()
                index = max(index, 1)
                remaining = deadline - time.monotonic()
                if min_index == 0 or index > min_index or remaining <= 0:
                    return 200, body, index, False
                state.cond.wait(remaining)

    def _agent(self, method: str, sub: str, query: dict[str, list[str]],
               body: bytes) -> tuple[int, Any, int | None, bool]:
        state = self.state
        if method == "GET" and sub == "services":
            with state.cond:
                return 200, state.agent_services(), None, False
        if method == "GET" and sub == "checks":
            with state.cond:
                return 200, state.agent_checks(), None, False
        if method != "PUT":
            raise ApiError(405, f"method {method} not allowed")
        if sub == "service/register":
            self._register(body, _flag(query, "replace-existing-checks"))
            return 200, b"", None, True
        if sub.startswith("service/deregister/"):
            sid = sub[len("service/deregister/"):]
            if not state.remove_service(sid):
                raise ApiError(404, f'Unknown service ID "{sid}". Ensure that the service ID '
                                    "is passed, not the service name.")
            return 200, b"", None, True
        for verb, status in (("pass", "passing"), ("warn", "warning"), ("fail", "critical")):
            if sub.startswith(f"check/{verb}/"):
                state.update_check(sub[len(f"check/{verb}/"):], status, _one(query, "note"))
                return 200, b"", None, True
        if sub.startswith("check/update/"):
            try:
                update = _lower_keys(json.loads(body or b"{}"))
            except json.JSONDecodeError as err:
                raise ApiError(400, f"Request decode failed: {err}") from None
            status = str(update.get("status", ""))
            if status not in STATUSES:
                raise ApiError(400, f"Invalid check status: {status!r}")
            state.update_check(sub[len("check/update/"):], status, update.get("output"))
            return 200, b"", None, True
        raise ApiError(404, f"unsupported by the Consul double: {method} /v1/agent/{sub}")

    def _register(self, body: bytes, replace_checks: bool) -> None:
        try:
            spec = _lower_keys(json.loads(body or b"null"))
        except json.JSONDecodeError as err:
            raise ApiError(400, f"Request decode failed: {err}") from None
        name = spec.get("name")
        if not isinstance(name, str) or not name:
            raise ApiError(400, "Invalid Service: Missing service name")
        sid = spec.get("id") or name
        port = spec.get("port") or 0
        if not isinstance(port, int) or not 0 <= port < 65536:
            raise ApiError(400, f"Invalid Service: bad port {port!r}")
        tags = spec.get("tags") or []
        meta = spec.get("meta") or {}
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise ApiError(400, "Request decode failed: Tags must be a list of strings")
        if not isinstance(meta, dict) or len(meta) > 64:
            raise ApiError(400, "Invalid Service Meta: at most 64 key/value pairs")
        for key, value in meta.items():
            if not META_KEY_RE.match(str(key)) or str(key).startswith("consul-"):
                raise ApiError(400, f"Invalid Service Meta: invalid key {key!r}")
            if not isinstance(value, str) or len(value) > 512:
                raise ApiError(400, f"Invalid Service Meta: value of {key!r} too long")
        defs = ([spec["check"]] if spec.get("check") else []) + list(spec.get("checks") or [])
        checks = []
        for i, raw in enumerate(defs):
            cdef = _lower_keys(raw)
            if not cdef.get("ttl"):
                raise ApiError(400, "the Consul double supports TTL checks only")
            try:
                ttl = parse_duration(str(cdef["ttl"]))
                dereg = cdef.get("deregistercriticalserviceafter")
                dereg_s = parse_duration(str(dereg)) if dereg else None
            except ValueError as err:
                raise ApiError(400, f"Invalid check: {err}") from None
            status = str(cdef.get("status") or "")
            if status and status not in STATUSES:
                raise ApiError(400, f"Invalid check status: {status!r}")
            default_id = f"service:{sid}" + (f":{i + 1}" if len(defs) > 1 else "")
            checks.append(_Check(str(cdef.get("checkid") or cdef.get("id") or default_id),
                                 str(cdef.get("name") or f"Service '{name}' check"), sid, name,
                                 status, ttl, notes=str(cdef.get("notes") or ""),
                                 deregister_after=dereg_s))
        self.state.put_service(_Service(sid, name, str(spec.get("address") or ""), port,
                                        list(tags), dict(meta), 0, 0), checks, replace_checks)

    def _kv(self, method: str, key: str, query: dict[str, list[str]],
            body: bytes) -> tuple[int, Any, int | None, bool]:
        state = self.state
        recurse = _flag(query, "recurse")
        if method == "GET":
            keys_only = _flag(query, "keys")
            separator = _one(query, "separator")
            raw = _flag(query, "raw")

            def run() -> tuple[int, Any]:
                index, entries = state.kv_get(key, recurse or keys_only)
                if not entries:
                    return index, None  # 404, still with an index to block on
                if keys_only:
                    names: list[str] = []
                    for e in entries:
                        name = e.key
                        if separator:
                            cut = name.find(separator, len(key))
                            name = name if cut < 0 else name[:cut + len(separator)]
                        if not names or names[-1] != name:
                            names.append(name)
                    return index, names
                if raw:
                    return index, entries[0].value
                return index, [_kv_json(e) for e in entries]

            code, payload, index, _ = self._blocking(query, run)
            if payload is None:
                return 404, b"", index, True
            return code, payload, index, raw
        if method == "PUT":
            if "acquire" in query or "release" in query:
                raise ApiError(400, "sessions are unsupported by the Consul double")
            if len(body) > KV_MAX_VALUE:
                raise ApiError(413, f"Value exceeds {KV_MAX_VALUE} byte limit")
            if not key:
                raise ApiError(400, "Missing key name")
            ok = state.kv_put(key, body, _uint(query, "cas", "cas index"),
                              _uint(query, "flags", "flags"))
            return 200, ok, None, False
        if method == "DELETE":
            cas = _uint(query, "cas", "cas index")
            if cas is not None and recurse:
                raise ApiError(400, "Conflicting flags: cas=N&recurse")
            return 200, state.kv_delete(key, recurse, cas), None, False
        raise ApiError(405, f"method {method} not allowed")
