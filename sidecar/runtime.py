"""The running sidecar: listeners, the current data plane, admin, and an orderly drain."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from typing import Any

import grpc
from google.protobuf import json_format

from sidecar import (
    static_config,
    xds_types,  # noqa: F401  (loads the types inside Anys, so /config_dump can expand them)
)
from sidecar.admin_http import AdminServer, Response
from sidecar.atomic_file import write_atomically
from sidecar.config import Settings
from sidecar.dataplane import DataPlane
from sidecar.identity import Identity
from sidecar.method_shapes import MethodShapes
from sidecar.model import Direction, InboundTls, MtlsMode, Snapshot
from sidecar.proxy import ProxyHandler
from sidecar.static_config import XdsResources, split_host_port
from sidecar.telemetry.access_log import AccessLog, AccessLogConfig
from sidecar.telemetry.calls import Telemetry
from sidecar.telemetry.metrics import SidecarMetrics
from sidecar.telemetry.tracing import SidecarTracing
from sidecar.upstream.pool import ChannelPool
from sidecar.workload_identity import WorkloadIdentity
from sidecar.xds_translate import compile_snapshot

log = logging.getLogger(__name__)

_REFUSE_WINDOW = 0.1  # seconds between refusing new calls and stopping the gRPC servers
_POLL_INTERVAL = 1.0  # seconds between outlier-detection sweeps


class Sidecar:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._limit_options = [
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
        ]
        if settings.minimal_stack:
            # Drops grpc-core filters a pass-through hop does not need; message sizes are then
            # enforced by the proxy itself (proxy.py), deadlines and compression still work.
            self._limit_options.append(("grpc.minimal_stack", 1))
        # With a bootstrap token: a workload certificate from the mesh CA, mTLS on --inbound
        # and to every upstream that takes it (docs/identity.md).
        self.identity: WorkloadIdentity | None = None
        self._config_roots: tuple[bytes, ...] = ()  # the trust bundle the config delivered
        if settings.wants_identity:
            assert settings.control_plane is not None
            self.identity = WorkloadIdentity(settings.service, settings.control_plane,
                                             settings.token, settings.token_file)
        # grpc-core's own retry layer stays off on upstream channels: the mesh retries (route
        # policy); a second layer would only buffer messages for nothing.
        self._upstream_options = [*self._limit_options, ("grpc.enable_retries", 0)]
        self.pool = ChannelPool(self._upstream_options)
        self.shapes = MethodShapes(settings.unary_methods, learn=settings.learn_method_shapes)
        self.telemetry = Telemetry(
            SidecarTracing(settings.service, ratio=settings.trace_sampling_percent / 100.0),
            SidecarMetrics(settings.service, version=settings.version),
            AccessLog(AccessLogConfig(settings.access_log, settings.access_log_sample),
                      settings.service))
        self.telemetry.metrics.watch_access_log(lambda: self.telemetry.access_log.dropped)
        self._plane: DataPlane | None = None
        self._resources = XdsResources()
        self._servers: dict[str, grpc.aio.Server] = {}  # by listener name
        self._handlers: dict[str, ProxyHandler] = {}
        self._admin = AdminServer({"/ready": self._ready, "/config_dump": self._config_dump,
                                   "/clusters": self._clusters, "/metrics": self._metrics})
        self.addresses: dict[str, str] = {}
        self.draining = False
        self._applied_at = 0.0
        self.xds: Any = None  # the XdsClient, when following a control plane
        self._poller: asyncio.Task[None] | None = None

    # --- config -------------------------------------------------------------------------
    def plane(self) -> DataPlane:
        assert self._plane is not None
        return self._plane

    def apply(self, version: str, resources: XdsResources) -> Snapshot:
        """Compile and swap in a new config; raises ConfigError and keeps the old one if bad."""
        snapshot = compile_snapshot(version, resources.listeners, resources.route_configs,
                                    resources.clusters, resources.load_assignments,
                                    require_clusters=not resources.dynamic)
        if self.identity is not None and not snapshot.inbound_tls.explicit:
            # A sidecar with an identity fails closed until a config says the mode (flags, a
            # static file or an old saved snapshot do not): its plaintext port refuses calls
            # rather than letting them past unauthenticated.
            snapshot = dataclasses.replace(snapshot, inbound_tls=InboundTls(
                MtlsMode.STRICT, snapshot.inbound_tls.trust_bundle, assumed=True))
        old = self._plane
        self._plane = DataPlane(snapshot, self.pool, self.settings.service,
                                old.clusters if old is not None else None,
                                local_zone=self.settings.zone,
                                previous_limiter=old.rate_limiter if old is not None else None,
                                on_ejection=self._ejected)
        self._resources = resources
        self._applied_at = time.time()
        self.pool.retain(self._plane.channel_keys())
        if self.identity is not None:
            self._trust_bundle_from(snapshot)
        self.telemetry.metrics.config_applied(version, self._applied_at)
        for name, runtime in self._plane.clusters.items():
            if runtime.detector is not None:
                self.telemetry.metrics.set_ejected(name, len(runtime.detector.ejected))
        if snapshot.trace_sampling_percent is not None:
            self.telemetry.tracing.set_sampling_ratio(snapshot.trace_sampling_percent / 100.0)
        log.info("config version %r active: %d clusters", version, len(snapshot.clusters))
        return snapshot

    def _trust_bundle_from(self, snapshot: Snapshot) -> None:
        """The roots pushed with the config win over those the last certificate came with: a
        root rotation reaches us with the next push, before any peer presents a new-root
        certificate (`meshctl ca rotate --activate-after`)."""
        assert self.identity is not None
        roots = snapshot.inbound_tls.trust_bundle or next(
            (c.tls.trust_bundle for c in snapshot.clusters.values()
             if c.tls is not None and c.tls.trust_bundle), ())
        self._config_roots = roots or self._config_roots
        if roots and self.identity.replace_trust_bundle(roots):
            log.info("trust bundle from config version %r: %d roots", snapshot.version,
                     len(roots))

    def _identity_changed(self, identity: Identity) -> None:
        roots = self._config_roots
        if roots and self.identity is not None and self.identity.replace_trust_bundle(roots):
            return  # the roots of the config win over a Sign answer's (it may predate a
            # rotation); replacing them published again, and that call did the rest
        renewed = self.pool.identity_changed()
        self.telemetry.metrics.certificate(identity.spiffe_id, identity.not_after)
        log.info("workload identity %s (serial %x) in use; %d upstream channels renewed",
                 identity.spiffe_id, identity.serial, renewed)

    def _initial_resources(self) -> XdsResources:
        s = self.settings
        flags = static_config.from_flags(s.service, s.app, s.upstreams, s.routes)
        if s.config_file:
            return static_config.merge(static_config.load_file(s.config_file), flags)
        return flags

    # --- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        identity = self.identity
        if identity is not None:
            identity.start(self._identity_changed)
            assert identity.upstream is not None
            self.pool = ChannelPool(self._upstream_options, tls=identity.upstream)
        self.apply("static-1", self._initial_resources())
        s = self.settings
        listeners: list[tuple[str, Direction, str, grpc.ServerCredentials | None]] = [
            ("outbound", Direction.OUTBOUND, s.outbound, None)]
        if identity is None:
            listeners.append(("inbound", Direction.INBOUND, s.inbound, None))
        else:
            assert s.inbound_plaintext is not None
            listeners += [("inbound", Direction.INBOUND, s.inbound,
                           identity.server_credentials()),
                          ("inbound_plaintext", Direction.INBOUND, s.inbound_plaintext, None)]
        for name, direction, address, credentials in listeners:
            await self._listen(name, direction, address, credentials)
        self._poller = asyncio.get_running_loop().create_task(self._poll_clusters())
        if identity is not None:
            log.info("mTLS on %s, plaintext on %s (taken in mTLS mode PERMISSIVE or DISABLE)",
                     self.addresses["inbound"], self.addresses["inbound_plaintext"])
        host, port = split_host_port(self.settings.admin)
        admin_port = await self._admin.start(host, port)
        self.addresses["admin"] = _with_port(self.settings.admin, admin_port)
        if self.settings.ready_file:
            write_atomically(self.settings.ready_file, json.dumps(self.addresses))
        log.info("sidecar %r listening: %s", self.settings.service, self.addresses)

    async def _listen(self, name: str, direction: Direction, address: str,
                      credentials: grpc.ServerCredentials | None) -> None:
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0), *self._limit_options])
        handler = ProxyHandler(direction, self.settings.service, self.plane, self.shapes,
                               self.settings.max_message_bytes, self.telemetry, address,
                               mtls=credentials is not None,
                               has_identity=self.identity is not None)
        self._handlers[name] = handler
        server.add_generic_rpc_handlers((handler,))
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
        if port == 0:
            raise OSError(f"cannot listen on {address} ({name})")
        await server.start()
        self._servers[name] = server
        self.addresses[name] = _with_port(address, port)
        handler.local_address = self.addresses[name]  # the bound port, not 0

    async def _poll_clusters(self) -> None:
        """Outlier detection's interval sweeps: ejections expire and failure rates are judged
        on a timer, not only when calls happen."""
        while True:
            await asyncio.sleep(_POLL_INTERVAL)
            for cluster in self.plane().clusters.values():
                cluster.poll()

    async def drain(self, timeout: float | None = None) -> None:
        """Stop accepting calls, give calls in flight `timeout` seconds, then close."""
        self.draining = True
        if self._poller is not None:
            self._poller.cancel()
        grace = self.settings.drain_timeout if timeout is None else timeout
        # stop(grace) refuses new calls at once but would wait out the whole grace period while
        # any connection is open (an idle client, a port scanner), so we wait for our own calls
        # in flight instead, then close at once.
        for name, handler in self._handlers.items():
            handler.refuse_new_calls(f"mesh sidecar {self.settings.service!r} "
                                     f"({name}): draining, not taking new calls")
        # Calls already on the wire when the servers stop are refused by our handler (a clear
        # UNAVAILABLE) rather than dropped by grpc-core as CANCELLED: give them a moment.
        await asyncio.sleep(_REFUSE_WINDOW)
        stopping = [asyncio.ensure_future(s.stop(grace)) for s in self._servers.values()]
        idle = asyncio.gather(*(h.wait_idle() for h in self._handlers.values()))
        try:
            await asyncio.wait_for(idle, grace)
        except TimeoutError:
            for name, handler in self._handlers.items():
                handler.cut_off(f"mesh sidecar {self.settings.service!r} ({name}): "
                                f"draining, call cut off after the {grace:g}s drain timeout")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(
                    *(h.wait_idle() for h in self._handlers.values())), 1.0)
        await asyncio.gather(*(s.stop(0) for s in self._servers.values()))
        await asyncio.gather(*stopping, return_exceptions=True)
        await self.shapes.close()
        await self.pool.close(0)
        if self.identity is not None:
            await self.identity.close()
        # Flush what telemetry is queued, briefly: a dead trace backend must not hold the exit.
        await asyncio.gather(asyncio.to_thread(self.telemetry.tracing.shutdown, 0.5),
                             asyncio.to_thread(self.telemetry.access_log.close, 0.5))
        await self._admin.close()

    async def wait_closed(self) -> None:
        await asyncio.gather(*(s.wait_for_termination() for s in self._servers.values()))

    # --- admin --------------------------------------------------------------------------
    def _ready(self, _query: str) -> Response:
        if self.draining:
            return Response(503, b"draining\n")
        if self._plane is None:
            return Response(503, b"no config yet\n")
        if self.identity is not None:  # first: the stream waits for the certificate
            reason = self.identity.not_ready()
            if reason is not None:
                return Response(503, f"{reason}\n".encode())
        if self.xds is not None and not (self.xds.synced.is_set() or self.xds.source):
            return Response(503, b"waiting for config from the control plane\n")
        return Response(200, b"ready\n")

    def _ejected(self, cluster: str, newly: int, now: int) -> None:
        metrics = self.telemetry.metrics
        for _ in range(newly):
            metrics.ejection(cluster)
        metrics.set_ejected(cluster, now)

    def _metrics(self, _query: str) -> Response:
        body, content_type = self.telemetry.metrics.render()
        return Response(200, body, content_type)

    def _config_dump(self, _query: str) -> Response:
        snapshot = self.plane().snapshot
        dump: dict[str, Any] = {
            "version": snapshot.version,
            "applied_at": self._applied_at,
            "service": self.settings.service,
            "limits": {"max_message_bytes": self.settings.max_message_bytes,
                       "grpc_minimal_stack": self.settings.minimal_stack,
                       "drain_timeout_s": self.settings.drain_timeout},
            "unary_methods": sorted(self.shapes.unary),
            "control_plane": self.xds.status() if self.xds is not None else None,
            "identity": self.identity.status() if self.identity is not None else None,
            "mtls_mode": snapshot.inbound_tls.mode.value,
            "listeners": [_to_json(x) for x in self._resources.listeners],
            "route_configs": [_to_json(x) for x in self._resources.route_configs.values()],
            "clusters": [_to_json(x) for x in self._resources.clusters],
            "load_assignments": [_to_json(x) for x in self._resources.load_assignments.values()],
        }
        return _json_response(dump)

    def _clusters(self, _query: str) -> Response:
        out = {}
        for name, runtime in self.plane().clusters.items():
            c = runtime.config
            ejected = runtime.detector.ejected if runtime.detector is not None else frozenset()
            out[name] = {
                "lb_policy": c.lb_policy.value,
                "circuit_breaker": {"max_requests": c.max_requests,
                                    "max_pending": c.max_pending,
                                    "active": runtime.breaker.active},
                "outlier_detection": c.outlier is not None,
                "retry_budget": None if runtime.budget is None else {
                    "granted": runtime.budget.granted, "refused": runtime.budget.refused},
                "endpoints": [{"address": e.address, "weight": e.weight, "zone": e.zone,
                               "ejected": any(ch.address == e.address for ch in ejected),
                               "calls_ok": runtime.stats.get(e.address, [0, 0])[0],
                               "calls_failed": runtime.stats.get(e.address, [0, 0])[1]}
                              for e in c.endpoints]}
        return _json_response(out)


def _to_json(message: Any) -> Any:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def _json_response(doc: Any) -> Response:
    return Response(200, json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n",
                    "application/json")


def _with_port(address: str, port: int) -> str:
    host, _ = split_host_port(address)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
