"""The sidecar's ADS client (xDS v3, state of the world): config from the control plane.

It announces the sidecar (docs/control-plane.md "Node identity"), subscribes LDS and CDS as
wildcards and RDS / EDS for the names those reference, and hands the sidecar a complete set
only: a listener is never applied before its route configuration, nor a cluster before its
endpoints, so a config change cannot send calls to a cluster that has no endpoints yet.

Every response is answered at once, ACK or NACK (the control plane sends no further response
of a type until the last one is answered):
- complete set, new content: `apply(version, resources)` (Sidecar.apply) decides: ConfigError
  -> NACK with its message and the old config stays; else ACK, and the set is persisted;
- set still waiting for referenced RDS/EDS: the update is checked with the same compiler
  (missing route configurations count as empty) and ACKed or NACKed, like Envoy ACKs a
  cluster that is still warming. A referenced resource the control plane never sends is given
  up on after `missing_timeout` (gRPC's does-not-exist timer): the set is then applied with
  what is there (a cluster without endpoints, or a ConfigError that is logged).

The protocol logic is the pure `ClientCore`; `XdsClient` is the asyncio shell: one stream at a
time, reconnecting forever with exponential backoff and jitter, keeping the last applied config
while disconnected, persisting it atomically to `<state-dir>/snapshot.json`, and offering it
back (`load_persisted`) so a sidecar can start while the control plane is unreachable.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import random
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError, Message
from google.rpc import status_pb2

from sidecar import static_config
from sidecar.atomic_file import write_atomically
from sidecar.static_config import XdsResources
from sidecar.xds_translate import HCM_TYPE_URL, ConfigError, compile_snapshot

log = logging.getLogger(__name__)

LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE_TYPE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
TYPES = (LISTENER_TYPE, ROUTE_TYPE, CLUSTER_TYPE, ENDPOINT_TYPE)
SHORT_NAMES = {LISTENER_TYPE: "LDS", ROUTE_TYPE: "RDS", CLUSTER_TYPE: "CDS", ENDPOINT_TYPE: "EDS"}
_MESSAGES: dict[str, type[Message]] = {
    LISTENER_TYPE: listener_pb2.Listener, ROUTE_TYPE: route_pb2.RouteConfiguration,
    CLUSTER_TYPE: cluster_pb2.Cluster, ENDPOINT_TYPE: endpoint_pb2.ClusterLoadAssignment,
}
SNAPSHOT_FILE = "snapshot.json"
SNAPSHOT_FORMAT = "pymesh-xds-snapshot/1"
INVALID_ARGUMENT = 3  # google.rpc.Code of a NACK's error_detail

ApplyFn = Callable[[str, XdsResources], object]
_M = TypeVar("_M", bound=Message)


# --- node identity ---------------------------------------------------------------------------
@dataclass(frozen=True)
class NodeIdentity:
    """What the sidecar tells the control plane about itself; the embedded registry announces
    the instance from it (other sidecars dial `inbound_address`)."""

    service: str
    instance_id: str
    inbound_address: str  # HOST:PORT, never a wildcard host
    version: str = ""
    zone: str = ""
    grpc_services: tuple[str, ...] = ()
    mtls: bool = False  # inbound_address takes mTLS only (the sidecar has a workload identity)
    plaintext_address: str = ""  # then: where it takes plaintext (PERMISSIVE), HOST:PORT

    def to_node(self) -> base_pb2.Node:
        node = base_pb2.Node(id=f"{self.service}~{self.instance_id}", cluster=self.service,
                             user_agent_name="pymesh-sidecar")
        if self.zone:
            node.locality.zone = self.zone
        node.metadata.update({
            "service": self.service, "instance_id": self.instance_id,
            "inbound_address": self.inbound_address, "version": self.version,
            "zone": self.zone, "grpc_services": list(self.grpc_services), "mesh_sidecar": True,
        })
        if self.mtls:
            node.metadata.update({"mtls": True, "plaintext_address": self.plaintext_address})
        return node


def default_instance_id(service: str, inbound_address: str) -> str:
    """Unique enough when no --instance-id is given: one inbound port per host."""
    port = inbound_address.rpartition(":")[2]
    return f"{service}-{socket.gethostname()}-{port}"


# --- backoff ---------------------------------------------------------------------------------
class Backoff:
    """Exponential backoff with +-jitter (gRPC's connection backoff shape), seeded for tests."""

    def __init__(self, base: float = 0.25, maximum: float = 30.0, multiplier: float = 2.0,
                 jitter: float = 0.2, rng: random.Random | None = None) -> None:
        if base <= 0 or maximum < base or multiplier < 1 or not 0 <= jitter < 1:
            raise ValueError("backoff: need 0 < base <= maximum, multiplier >= 1, "
                             "0 <= jitter < 1")
        self.base, self.maximum, self.multiplier, self.jitter = base, maximum, multiplier, jitter
        self._rng = rng or random.Random()
        self.attempt = 0

    def next(self) -> float:
        ceiling = min(self.maximum, self.base * self.multiplier ** self.attempt)
        self.attempt += 1
        return ceiling * (1 + self._rng.uniform(-self.jitter, self.jitter))

    def reset(self) -> None:
        self.attempt = 0


# --- the protocol core -----------------------------------------------------------------------
@dataclass
class _TypeState:
    version: str = ""  # last accepted
    nonce: str = ""  # last received on this stream
    resources: dict[str, Message] = field(default_factory=dict)  # accepted
    received: bool = False  # accepted at least once (or seeded from disk)
    requested: frozenset[str] = frozenset()  # names last sent (RDS/EDS; LDS/CDS: wildcard)


@dataclass(frozen=True)
class Decision:
    """The core's verdict on one response. The shell applies `apply` (if set), then passes
    its outcome to `ClientCore.finish`, which says what to send."""

    type_url: str
    version: str
    nonce: str
    resources: dict[str, Message] | None = None  # the type's new accepted set
    error: str | None = None  # NACK without applying
    apply: XdsResources | None = None  # a complete, new set to apply
    apply_version: str = ""
    digest: str = ""


class ClientCore:
    """State of the world on the client side: pure, synchronous, one stream at a time."""

    def __init__(self, node: base_pb2.Node, local: XdsResources | None = None) -> None:
        self.node = node
        self.local = local or XdsResources()
        self._types = {t: _TypeState() for t in TYPES}
        self._node_pending = True
        self.applied_version = ""
        self.applied_digest = ""
        self.incomplete_since: float | None = None

    # --- stream lifecycle -------------------------------------------------------------
    def initial_requests(self) -> list[discovery_pb2.DiscoveryRequest]:
        """A new stream: nonces start over; ask for everything we hold or want."""
        self._node_pending = True
        wanted = self._wanted(self._accepted())
        requests = []
        for t in TYPES:
            st = self._types[t]
            st.nonce = ""
            if t in wanted:
                st.requested = wanted[t]
                if not st.requested:
                    continue  # nothing referenced yet: subscribe once something is
            requests.append(self._request(t))
        return requests

    def on_response(self, response: discovery_pb2.DiscoveryResponse) -> Decision:
        t = response.type_url
        d = Decision(t, response.version_info, response.nonce)
        if t not in self._types:
            return _replace(d, error=f"type_url {t!r} is not supported by this sidecar")
        self._types[t].nonce = response.nonce
        received, error = decode_resources(t, response.resources)
        if received is None:
            return _replace(d, error=f"{SHORT_NAMES[t]} version {response.version_info!r}: "
                                     f"{error}")
        view = self._accepted()
        if t in (ROUTE_TYPE, ENDPOINT_TYPE):
            # RDS/EDS responses may carry only some of the subscribed names
            new = {**view[t], **received}
        else:
            new = received
        view[t] = new
        seen = {tt: self._types[tt].received or tt == t for tt in TYPES}
        cp = _resources(view)
        merged = static_config.merge(cp, self.local)
        if not _missing(view, seen):
            digest = _digest(cp)
            if digest == self.applied_digest:
                return _replace(d, resources=new)
            return _replace(d, resources=new, apply=merged, digest=digest,
                            apply_version=_composite_version(
                                {tt: (response.version_info if tt == t
                                      else self._types[tt].version) for tt in TYPES}))
        try:
            _validate_partial(merged, view)
        except ConfigError as exc:
            return _replace(d, error=str(exc))
        return _replace(d, resources=new)

    def finish(self, d: Decision, error: str | None, now: float
               ) -> list[discovery_pb2.DiscoveryRequest]:
        """Record the outcome (`error`: why the update was rejected) and return what to send:
        the ACK or NACK, then any subscription changes it implies."""
        if d.type_url not in self._types:
            nack = discovery_pb2.DiscoveryRequest(type_url=d.type_url, response_nonce=d.nonce)
            nack.error_detail.CopyFrom(status_pb2.Status(code=INVALID_ARGUMENT,
                                                         message=error or ""))
            return [self._with_node(nack)]
        st = self._types[d.type_url]
        if error is None:
            assert d.resources is not None
            st.version, st.resources, st.received = d.version, d.resources, True
            if d.apply is not None:
                self.mark_applied(d.apply_version, d.digest)
        wanted = self._wanted(self._accepted())
        for t, names in wanted.items():  # forget what nothing references any more
            held = self._types[t].resources
            if held.keys() - names:
                self._types[t].resources = {n: r for n, r in held.items() if n in names}
        reply = self._request(d.type_url, error=error)
        reply.response_nonce = d.nonce
        out = [reply]
        for t, names in wanted.items():
            if names != self._types[t].requested:
                self._types[t].requested = names
                if t == d.type_url:
                    del reply.resource_names[:]
                    reply.resource_names.extend(sorted(names))
                else:
                    out.append(self._request(t))
        self._track_missing(now)
        return out

    def mark_applied(self, version: str, digest: str) -> None:
        self.applied_version, self.applied_digest = version, digest

    # --- resources that never arrive -------------------------------------------------
    def missing(self) -> dict[str, frozenset[str]]:
        """Referenced resources not received yet, by type ({} when the set is complete)."""
        seen = {t: self._types[t].received for t in TYPES}
        return _missing(self._accepted(), seen)

    def expired(self, now: float, timeout: float) -> Decision | None:
        """After `timeout` seconds incomplete: the accepted set to apply as it is (missing
        endpoints count as none), or None. Asked once per incomplete period."""
        if self.incomplete_since is None or now - self.incomplete_since < timeout:
            return None
        view = self._accepted()
        missing = _missing(view, {t: self._types[t].received for t in TYPES})
        self.incomplete_since = None
        if LISTENER_TYPE in missing or CLUSTER_TYPE in missing:
            return None  # nothing to build a config from yet
        cp = _resources(view)
        digest = _digest(cp)
        if digest == self.applied_digest:
            return None
        return Decision("", "", "", apply=static_config.merge(cp, self.local), digest=digest,
                        apply_version=_composite_version({t: self._types[t].version
                                                          for t in TYPES}))

    def _track_missing(self, now: float) -> None:
        if self.missing():
            if self.incomplete_since is None:
                self.incomplete_since = now
        else:
            self.incomplete_since = None

    # --- persistence ------------------------------------------------------------------
    def snapshot_doc(self, saved_at: float) -> dict[str, Any]:
        """The accepted state as JSON: one DiscoveryResponse-like entry per type."""
        entries = []
        for t in TYPES:
            st = self._types[t]
            if not st.received:
                continue
            anys = []
            for name in sorted(st.resources):
                packed = any_pb2.Any()
                packed.Pack(st.resources[name], deterministic=True)
                anys.append(base64.b64encode(packed.SerializeToString(deterministic=True))
                            .decode())
            entries.append({"type_url": t, "version_info": st.version, "resources": anys})
        return {"format": SNAPSHOT_FORMAT, "version": self.applied_version,
                "saved_at": saved_at, "responses": entries}

    def seed(self, doc: Mapping[str, Any]) -> tuple[str, XdsResources]:
        """Take a snapshot_doc as the accepted state; returns (version, set to apply).
        Raises ValueError when the document is not a usable snapshot."""
        if doc.get("format") != SNAPSHOT_FORMAT:
            raise ValueError(f"format {doc.get('format')!r} is not {SNAPSHOT_FORMAT!r}")
        states = {t: _TypeState() for t in TYPES}
        for i, entry in enumerate(doc.get("responses") or ()):
            t = entry.get("type_url")
            if t not in states:
                raise ValueError(f"responses[{i}].type_url: {t!r} is not an xDS type we use")
            anys = []
            for raw in entry.get("resources") or ():
                packed = any_pb2.Any()
                packed.ParseFromString(base64.b64decode(raw, validate=True))
                anys.append(packed)
            resources, error = decode_resources(t, anys)
            if resources is None:
                raise ValueError(f"responses[{i}]: {error}")
            states[t] = _TypeState(version=str(entry.get("version_info") or ""),
                                   resources=resources, received=True)
        if not (states[LISTENER_TYPE].received and states[CLUSTER_TYPE].received):
            raise ValueError("no listeners or clusters in the snapshot")
        self._types = states
        cp = _resources(self._accepted())
        version = str(doc.get("version") or _composite_version(
            {t: states[t].version for t in TYPES}))
        self.mark_applied(version, _digest(cp))
        return version, static_config.merge(cp, self.local)

    # --- helpers ----------------------------------------------------------------------
    def _accepted(self) -> dict[str, dict[str, Message]]:
        return {t: st.resources for t, st in self._types.items()}

    @staticmethod
    def _wanted(view: Mapping[str, Mapping[str, Message]]) -> dict[str, frozenset[str]]:
        return {ROUTE_TYPE: route_names(view[LISTENER_TYPE].values()),
                ENDPOINT_TYPE: eds_names(view[CLUSTER_TYPE].values())}

    def _request(self, t: str, error: str | None = None) -> discovery_pb2.DiscoveryRequest:
        st = self._types[t]
        request = discovery_pb2.DiscoveryRequest(
            type_url=t, version_info=st.version, response_nonce=st.nonce,
            resource_names=sorted(st.requested) if t in (ROUTE_TYPE, ENDPOINT_TYPE) else [])
        if error is not None:
            request.error_detail.CopyFrom(status_pb2.Status(code=INVALID_ARGUMENT,
                                                            message=error))
        return self._with_node(request)

    def _with_node(self, request: discovery_pb2.DiscoveryRequest
                   ) -> discovery_pb2.DiscoveryRequest:
        if self._node_pending:
            request.node.CopyFrom(self.node)
            self._node_pending = False
        return request


def _replace(d: Decision, **changes: Any) -> Decision:
    fields = {**d.__dict__, **changes}
    return Decision(**fields)


def decode_resources(type_url: str, anys: Iterable[any_pb2.Any]
                     ) -> tuple[dict[str, Message] | None, str]:
    """Resources by name, or (None, why not)."""
    cls = _MESSAGES[type_url]
    out: dict[str, Message] = {}
    for i, packed in enumerate(anys):
        if packed.type_url != type_url:
            return None, f"resources[{i}]: a {packed.type_url!r} in a {SHORT_NAMES[type_url]} " \
                         "response"
        message = cls()
        try:
            message.ParseFromString(packed.value)
        except DecodeError as exc:
            return None, f"resources[{i}]: cannot be parsed: {exc}"
        name = _name_of(message)
        if not name:
            return None, f"resources[{i}]: has no name"
        if name in out:
            return None, f"resources[{i}]: duplicate name {name!r}"
        out[name] = message
    return out, ""


def _name_of(message: Message) -> str:
    if isinstance(message, endpoint_pb2.ClusterLoadAssignment):
        return message.cluster_name
    return str(getattr(message, "name", ""))


def route_names(listeners: Iterable[Message]) -> frozenset[str]:
    """Route configurations the listeners load by RDS."""
    names = set()
    for listener in listeners:
        assert isinstance(listener, listener_pb2.Listener)
        if listener.HasField("api_listener"):
            candidates = [listener.api_listener.api_listener]
        else:
            candidates = [f.typed_config for chain in listener.filter_chains
                          for f in chain.filters]
        for packed in candidates:
            if packed.type_url != HCM_TYPE_URL:
                continue
            hcm = hcm_pb2.HttpConnectionManager()
            with contextlib.suppress(DecodeError):
                packed.Unpack(hcm)
            if hcm.HasField("rds") and hcm.rds.route_config_name:
                names.add(hcm.rds.route_config_name)
    return frozenset(names)


def eds_names(clusters: Iterable[Message]) -> frozenset[str]:
    """ClusterLoadAssignments the clusters load by EDS."""
    names = set()
    for cluster in clusters:
        assert isinstance(cluster, cluster_pb2.Cluster)
        if (cluster.WhichOneof("cluster_discovery_type") == "type"
                and cluster.type == cluster_pb2.Cluster.EDS
                and not cluster.HasField("load_assignment")):
            names.add(cluster.eds_cluster_config.service_name or cluster.name)
    return frozenset(names)


def _missing(view: Mapping[str, Mapping[str, Message]], seen: Mapping[str, bool]
             ) -> dict[str, frozenset[str]]:
    missing: dict[str, frozenset[str]] = {}
    for t in (LISTENER_TYPE, CLUSTER_TYPE):
        if not seen[t]:
            missing[t] = frozenset({"*"})
    for t, names in ClientCore._wanted(view).items():
        absent = names - view[t].keys()
        if absent:
            missing[t] = absent
    return missing


def _resources(view: Mapping[str, Mapping[str, Message]]) -> XdsResources:
    """The accepted resources as one set: only the RDS/EDS resources still referenced."""
    wanted = ClientCore._wanted(view)
    listeners = view[LISTENER_TYPE]
    clusters = view[CLUSTER_TYPE]
    routes = view[ROUTE_TYPE]
    endpoints = view[ENDPOINT_TYPE]
    return XdsResources(
        listeners=[_typed(listeners[n], listener_pb2.Listener) for n in sorted(listeners)],
        route_configs={n: _typed(routes[n], route_pb2.RouteConfiguration)
                       for n in sorted(wanted[ROUTE_TYPE]) if n in routes},
        clusters=[_typed(clusters[n], cluster_pb2.Cluster) for n in sorted(clusters)],
        load_assignments={n: _typed(endpoints[n], endpoint_pb2.ClusterLoadAssignment)
                          for n in sorted(wanted[ENDPOINT_TYPE]) if n in endpoints},
        dynamic=True)


def _typed(message: Message, cls: type[_M]) -> _M:
    assert isinstance(message, cls)
    return message


def _validate_partial(merged: XdsResources, view: Mapping[str, Mapping[str, Message]]) -> None:
    """Compile what is there; route configurations not received yet count as empty."""
    routes = dict(merged.route_configs)
    for name in ClientCore._wanted(view)[ROUTE_TYPE] - routes.keys():
        routes[name] = route_pb2.RouteConfiguration(name=name)
    compile_snapshot("partial", merged.listeners, routes, merged.clusters,
                     merged.load_assignments, require_clusters=False)


def _digest(resources: XdsResources) -> str:
    digest = hashlib.sha256()
    groups: Sequence[Iterable[Message]] = (
        resources.listeners, resources.route_configs.values(), resources.clusters,
        resources.load_assignments.values())
    for group in groups:
        digest.update(b"|")
        for message in group:
            data = message.SerializeToString(deterministic=True)
            digest.update(len(data).to_bytes(8, "big") + data)
    return digest.hexdigest()


def _composite_version(versions: Mapping[str, str]) -> str:
    """One version for the whole set, readable against proxy-status: LDS/RDS/CDS/EDS."""
    return "/".join(versions[t] or "-" for t in TYPES)


# --- the asyncio shell -----------------------------------------------------------------------
class XdsClient:
    """Keeps the sidecar's config in step with the control plane, forever."""

    def __init__(self, control_plane: str, node: base_pb2.Node, apply: ApplyFn, *,
                 local: XdsResources | None = None, state_dir: str | None = None,
                 backoff: Backoff | None = None,
                 sleep: Callable[[float], Any] = asyncio.sleep,
                 clock: Callable[[], float] = time.time, missing_timeout: float = 15.0,
                 channel_options: Sequence[tuple[str, Any]] = (),
                 before_connect: Callable[[], Awaitable[Any]] | None = None) -> None:
        """control_plane: HOST:PORT of the ADS server. apply(version, resources) swaps a
        complete config in, raising ConfigError to reject it. local: the sidecar's own
        resources (its inbound|app cluster) added to every set the control plane sends.
        before_connect: awaited before the first stream opens (the stream announces the
        instance: a sidecar with a token waits for its certificate, so no caller is sent to
        an instance that cannot complete a handshake)."""
        self.target = control_plane
        self.core = ClientCore(node, local)
        self._apply = apply
        self.snapshot_path = os.path.join(state_dir, SNAPSHOT_FILE) if state_dir else None
        self._backoff = backoff or Backoff()
        self._sleep = sleep
        self._clock = clock
        self._missing_timeout = missing_timeout
        self._channel_options = list(channel_options) or [
            ("grpc.keepalive_time_ms", 60_000), ("grpc.keepalive_timeout_ms", 20_000)]
        self._task: asyncio.Task[None] | None = None
        self._before_connect = before_connect
        self._timer: asyncio.TimerHandle | None = None
        self._pending_doc: dict[str, Any] | None = None
        self._persist_task: asyncio.Task[None] | None = None
        # what status pages show
        self.connected = False
        self.attempts = 0  # streams opened (or tried)
        self.source = ""  # where the applied config came from: "control-plane" | "persisted"
        self.last_error = ""  # why the last stream ended, or the last failure to persist/apply
        self.last_nack: tuple[str, str, float] | None = None  # (type, message, when)
        self.synced = asyncio.Event()  # a config from the control plane has been applied

    # --- public -----------------------------------------------------------------------
    @property
    def applied_version(self) -> str:
        return self.core.applied_version

    def load_persisted(self) -> tuple[str, XdsResources] | None:
        """The last applied snapshot from the state dir, also taken as the accepted state (so
        the first stream asks with its versions); None if there is none or it is unusable."""
        if self.snapshot_path is None:
            return None
        try:
            doc = json.loads(Path(self.snapshot_path).read_text())
            if not isinstance(doc, dict):
                raise ValueError("not a JSON object")
            return self.core.seed(doc)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, DecodeError) as exc:
            log.warning("ignoring persisted xDS snapshot %s: %s", self.snapshot_path, exc)
            return None

    async def start(self) -> bool:
        """Apply the persisted snapshot if there is one (static stability: serve on the last
        known config even if the control plane is down), then follow the control plane in the
        background. Returns whether a persisted snapshot was applied."""
        used = False
        persisted = self.load_persisted()
        if persisted is not None:
            version, resources = persisted
            try:
                self._apply(version, resources)
                self.source = "persisted"
                used = True
                log.info("started from persisted xDS snapshot %s", version)
            except Exception as exc:  # a bad file must not stop the sidecar from starting
                log.warning("persisted xDS snapshot rejected: %s", exc)
                self.core.mark_applied("", "")
        self._task = asyncio.create_task(self._connect_when_ready(), name="xds-client")
        return used

    async def _connect_when_ready(self) -> None:
        if self._before_connect is not None:
            await self._before_connect()
        await self.run()

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._persist_task is not None:
            with contextlib.suppress(Exception):
                await self._persist_task
        self.connected = False

    async def run(self) -> None:
        """Streams one after another, forever (until cancelled)."""
        while True:
            self.attempts += 1
            try:
                await self._session()
                reason = "the control plane ended the stream"
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                reason = f"{exc.code().name}: {exc.details()}"
            except Exception as exc:
                log.exception("xDS stream failed")
                reason = f"{type(exc).__name__}: {exc}"
            finally:
                self.connected = False
            delay = self._backoff.next()
            if reason != self.last_error:
                log.warning("control plane %s: %s; retrying in %.2fs (keeping config %s)",
                            self.target, reason, delay, self.applied_version or "-")
            self.last_error = reason
            await self._sleep(delay)

    def status(self) -> dict[str, Any]:
        """For the sidecar's admin pages."""
        nack = None
        if self.last_nack is not None:
            t, message, at = self.last_nack
            nack = {"type": SHORT_NAMES.get(t, t), "error": message, "at": at}
        return {"control_plane": self.target, "connected": self.connected,
                "applied_version": self.applied_version, "source": self.source,
                "attempts": self.attempts, "last_error": self.last_error, "last_nack": nack,
                "missing": {SHORT_NAMES[t]: sorted(n) for t, n in self.core.missing().items()}}

    # --- one stream -------------------------------------------------------------------
    async def _session(self) -> None:
        async with grpc.aio.insecure_channel(self.target, options=self._channel_options) as ch:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(ch)  # type: ignore[no-untyped-call]
            call = stub.StreamAggregatedResources()
            for request in self.core.initial_requests():
                await call.write(request)
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    return
                if not self.connected:
                    self.connected = True
                    self._backoff.reset()
                    log.info("connected to control plane %s", self.target)
                for request in self._handle(response):
                    await call.write(request)

    def _handle(self, response: discovery_pb2.DiscoveryResponse
                ) -> list[discovery_pb2.DiscoveryRequest]:
        now = self._clock()
        decision = self.core.on_response(response)
        error = decision.error
        applied = False
        if error is None and decision.apply is not None:
            error = self._try_apply(decision)
            applied = error is None
        requests = self.core.finish(decision, error, now)
        if error is not None:
            self.last_nack = (decision.type_url, error, now)
            log.warning("NACK %s version %r: %s", SHORT_NAMES.get(decision.type_url,
                        decision.type_url), decision.version, error)
        if applied:
            self._applied()
        self._arm_missing_timer()
        return requests

    def _try_apply(self, decision: Decision) -> str | None:
        assert decision.apply is not None
        try:
            self._apply(decision.apply_version, decision.apply)
        except ConfigError as exc:
            return str(exc)
        except Exception as exc:  # a bug while applying: reject the update, keep serving
            log.exception("applying xDS version %s failed", decision.apply_version)
            return f"sidecar error while applying: {type(exc).__name__}: {exc}"
        return None

    def _applied(self) -> None:
        self.source = "control-plane"
        self.synced.set()
        log.info("xDS config %s applied", self.applied_version)
        if self.snapshot_path is not None:
            self._pending_doc = self.core.snapshot_doc(self._clock())
            if self._persist_task is None or self._persist_task.done():
                self._persist_task = asyncio.create_task(self._persist(), name="xds-persist")

    async def _persist(self) -> None:
        """Writes the latest snapshot off the event loop; bursts collapse into one write."""
        assert self.snapshot_path is not None
        while self._pending_doc is not None:
            doc, self._pending_doc = self._pending_doc, None
            try:
                await asyncio.to_thread(write_atomically, self.snapshot_path,
                                        json.dumps(doc, indent=1))
            except OSError as exc:
                self.last_error = f"cannot persist the xDS snapshot: {exc}"
                log.warning("%s", self.last_error)

    # --- does-not-exist timer ---------------------------------------------------------
    def _arm_missing_timer(self) -> None:
        if self.core.incomplete_since is None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            return
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._missing_timeout,
                                                                self._on_missing_timeout)

    def _on_missing_timeout(self) -> None:
        self._timer = None
        missing = self.core.missing()
        decision = self.core.expired(self._clock(), self._missing_timeout)
        if decision is None:
            self._arm_missing_timer()
            return
        log.warning("control plane never sent %s; applying without them",
                    {SHORT_NAMES[t]: sorted(n) for t, n in missing.items()})
        error = self._try_apply(decision)
        if error is None:
            self.core.mark_applied(decision.apply_version, decision.digest)
            self._applied()
        else:
            self.last_error = f"config without missing resources rejected: {error}"
            log.warning("%s", self.last_error)
