"""The sidecar's spans: one SERVER span per inbound hop, one CLIENT span per outbound hop.

OpenTelemetry SDK underneath (TracerProvider, BatchSpanProcessor, OTLP/gRPC exporter), set up
for a proxy: the caller's context comes from our own parser (trace_context.py), not from the
SDK's propagators, so the per-call path builds no carriers; attributes are set in two batches
(at start and at end) rather than one lock per attribute; a span that is not sampled costs an
id and a tuple.

An exporter failure never fails or slows a call: spans are handed to the BatchSpanProcessor's
in-memory queue (bounded; full -> dropped) and exported by its own thread; force_flush and
shutdown, which the SDK would let block for the exporter's whole retry budget, are bounded here.

Environment (read by the SDK itself unless noted): OTEL_SDK_DISABLED, OTEL_SERVICE_NAME and
OTEL_RESOURCE_ATTRIBUTES (override our service.name), OTEL_BSP_SCHEDULE_DELAY /
MAX_QUEUE_SIZE / MAX_EXPORT_BATCH_SIZE / EXPORT_TIMEOUT, OTEL_SPAN_* and OTEL_ATTRIBUTE_*
limits, OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT / INSECURE / HEADERS / TIMEOUT / COMPRESSION /
CERTIFICATE / CLIENT_KEY / CLIENT_CERTIFICATE. Read here: OTEL_TRACES_SAMPLER and
OTEL_TRACES_SAMPLER_ARG (when set they pin the sampler and MeshConfig's ratio is ignored),
OTEL_TRACES_EXPORTER (otlp | console | none), OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL (only grpc
is built in; anything else is reported and grpc is used).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import unquote

import grpc
from opentelemetry import trace as trace_api
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
)
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)
from opentelemetry.util.types import Attributes

from sidecar.telemetry import trace_context as tc

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "http://127.0.0.1:4317"
INSTRUMENTATION_NAME = "pymesh.sidecar"
ATTEMPTS_ATTRIBUTE = "mesh.attempts"  # total upstream attempts, 1 = no retry
_MAX_STATUS_DESCRIPTION = 512
_METHOD_CACHE_LIMIT = 4096

# gRPC status codes that make a SERVER span an error (OpenTelemetry RPC conventions, gRPC):
# the others are the caller's problem, not the server's.
SERVER_ERROR_CODES = frozenset({2, 4, 12, 13, 14, 15})  # UNKNOWN, DEADLINE_EXCEEDED,
# UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS

_CODE_INT: dict[Any, int] = {code: code.value[0] for code in grpc.StatusCode}
_CODE_NAME: dict[int, str] = {code.value[0]: code.name for code in grpc.StatusCode}


def status_code_int(code: grpc.StatusCode | int) -> int:
    value = _CODE_INT.get(code)
    return int(code) if value is None else value  # type: ignore[arg-type]


class RatioSampler(Sampler):
    """Trace-id ratio sampling whose ratio can change while spans are being started.

    The decision is a pure function of the trace id (as TraceIdRatioBased), so every sidecar on
    a trace that starts without a decision reaches the same one.
    """

    def __init__(self, ratio: float) -> None:
        self._delegate = TraceIdRatioBased(_check_ratio(ratio))

    @property
    def ratio(self) -> float:
        return self._delegate.rate

    def set_ratio(self, ratio: float) -> None:
        self._delegate = TraceIdRatioBased(_check_ratio(ratio))  # swapped whole: no torn reads

    def decide(self, trace_id: int) -> bool:
        delegate = self._delegate
        return trace_id & delegate.TRACE_ID_LIMIT < delegate.bound

    def should_sample(self, parent_context: Context | None, trace_id: int, name: str,
                      kind: SpanKind | None = None, attributes: Attributes = None,
                      links: Sequence[trace_api.Link] | None = None,
                      trace_state: trace_api.TraceState | None = None) -> SamplingResult:
        return self._delegate.should_sample(parent_context, trace_id, name, kind, attributes,
                                            links, trace_state)

    def get_description(self) -> str:
        return f"MeshRatio{{{self.ratio}}}"


def _check_ratio(ratio: float) -> float:
    ratio = float(ratio)
    if not 0.0 <= ratio <= 1.0:  # also rejects NaN
        raise ValueError(f"sampling ratio must be between 0 and 1, got {ratio}")
    return ratio


def _sampler_from_env(env: Mapping[str, str]) -> Sampler | None:
    """The sampler OTEL_TRACES_SAMPLER / _ARG ask for, or None when unset or unknown."""
    name = env.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    if not name:
        return None
    arg = env.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
    ratio = 1.0
    if "traceidratio" in name:
        try:
            ratio = _check_ratio(float(arg or "1"))
        except ValueError:
            log.warning("OTEL_TRACES_SAMPLER_ARG=%r is not a ratio in [0, 1]; using 1.0", arg)
    samplers: dict[str, Callable[[], Sampler]] = {
        "always_on": lambda: ALWAYS_ON,
        "always_off": lambda: ALWAYS_OFF,
        "traceidratio": lambda: TraceIdRatioBased(ratio),
        "parentbased_always_on": lambda: ParentBased(ALWAYS_ON),
        "parentbased_always_off": lambda: ParentBased(ALWAYS_OFF),
        "parentbased_traceidratio": lambda: ParentBased(TraceIdRatioBased(ratio)),
    }
    make = samplers.get(name)
    if make is None:
        log.warning("OTEL_TRACES_SAMPLER=%r is not supported; MeshConfig's ratio applies", name)
        return None
    return make()


class ExportUnavailable(RuntimeError):
    """Spans cannot be exported (a broken install); calls and propagation still work."""


def _exporter_from_env(endpoint: str | None, env: Mapping[str, str]) -> SpanExporter | None:
    choice = env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() or "otlp"
    if choice == "none":
        return None
    if choice == "console":
        return ConsoleSpanExporter()
    if choice != "otlp":
        log.warning("OTEL_TRACES_EXPORTER=%r is not supported by the sidecar; using otlp", choice)
    protocol = (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc").strip().lower()
    if protocol != "grpc":
        log.warning("OTLP protocol %r is not built into the sidecar; exporting over grpc",
                    protocol)
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    except ImportError as err:
        raise ExportUnavailable(
            f"the OTLP exporter cannot be imported ({err}); if the message names "
            "InstrumentationScope, xds-protos' older copy of opentelemetry/proto has "
            "overwritten opentelemetry-proto's: reinstall opentelemetry-proto after "
            "xds-protos (pip install --force-reinstall --no-deps opentelemetry-proto==<ver>)"
        ) from err
    if endpoint is None and not (env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                                 or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")):
        endpoint = DEFAULT_ENDPOINT  # the SDK's own default is localhost, which may be ::1
    return OTLPSpanExporter(endpoint=endpoint)


def _split_method(method: str) -> tuple[str, str, str]:
    """'/pkg.Service/Method' -> (span name, rpc.service, rpc.method)."""
    name = method[1:] if method.startswith("/") else method
    service, _, rpc_method = name.rpartition("/")
    return name, service, rpc_method


def parse_peer(peer: str | None) -> tuple[str | None, int | None]:
    """grpc's `context.peer()` ('ipv4:1.2.3.4:5', 'ipv6:[::1]:5', 'unix:/p') -> (address, port)."""
    if not peer:
        return None, None
    if "%" in peer:  # newer grpc percent-encodes the IPv6 brackets
        peer = unquote(peer)
    scheme, _, rest = peer.partition(":")
    if scheme == "unix" or not rest:
        return (rest or peer), None
    host, _, port = rest.rpartition(":")
    if not host:
        return rest, None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port) if port.isdigit() else None


def split_host_port(address: str | None) -> tuple[str | None, int | None]:
    """'127.0.0.1:7000' / '[::1]:7000' / 'dns:host:7000' -> (host, port)."""
    if not address:
        return None, None
    if address.startswith("dns:"):
        address = address[4:].lstrip("/")
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return address, None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


class CallSpan:
    """One proxied call's span, and the context to send downstream.

    `span` is the SDK span when the call is sampled, else None: an unsampled call still gets
    its own span id (so the next hop's parent is well defined) without touching the SDK.
    """

    __slots__ = ("_client", "_parent", "flags", "span", "span_id", "trace_id")

    def __init__(self, span: trace_api.Span | None, client: bool,
                 parent: tc.TraceContext | None, trace_id: int, span_id: int, flags: int
                 ) -> None:
        self.span = span
        self._client = client
        self._parent = parent
        self.trace_id = trace_id  # 0: no trace at all (tracing disabled, no caller context)
        self.span_id = span_id
        self.flags = flags

    @property
    def sampled(self) -> bool:
        return self.span is not None

    @property
    def trace_id_hex(self) -> str | None:
        """32 hex digits (for access logs), or None if there is no trace."""
        return f"{self.trace_id:032x}" if self.trace_id else None

    def headers(self) -> tuple[tuple[str, str], ...]:
        """traceparent (+ tracestate, + the caller's B3 format) naming this span as the parent.

        With tracing disabled (OTEL_SDK_DISABLED) the caller's context passes unchanged.
        """
        parent = self._parent
        if self.span_id:
            if parent is None:
                return ((tc.TRACEPARENT, tc.format_traceparent(self.trace_id, self.span_id,
                                                               self.flags)),)
            return tc.propagation_headers(self.trace_id, self.span_id, bool(self.flags & 1),
                                          parent.tracestate, parent.source, parent.span_id,
                                          self.flags)
        if parent is not None:
            return tc.propagation_headers(parent.trace_id, parent.span_id, parent.sampled,
                                          parent.tracestate, parent.source, None, parent.flags)
        return ()

    def set_upstream(self, address: str | None, cluster: str | None = None) -> None:
        """Which endpoint the (latest) attempt went to: server.* and network.peer.*."""
        if self.span is None:
            return
        host, port = split_host_port(address)
        attrs: dict[str, Any] = {}
        if host is not None:
            attrs["server.address"] = host
            attrs["network.peer.address"] = host
        if port is not None:
            attrs["server.port"] = port
            attrs["network.peer.port"] = port
        if cluster:
            attrs["mesh.cluster"] = cluster
        if attrs:
            self.span.set_attributes(attrs)

    def record_retry(self, attempt: int, code: grpc.StatusCode | int,
                     upstream: str | None = None) -> None:
        """An event per failed attempt that is retried (attempts numbered from 1), so a trace
        shows why the call took longer."""
        if self.span is None:
            return
        value = status_code_int(code)
        attrs: dict[str, Any] = {"mesh.attempt": attempt, "rpc.grpc.status_code": value,
                                 "error.type": _CODE_NAME.get(value, str(value))}
        if upstream:
            attrs["mesh.upstream"] = upstream
        self.span.add_event("retry", attrs)

    def end(self, code: grpc.StatusCode | int, details: str | None = None,
            attempts: int | None = None) -> None:
        """End with the call's final status. CLIENT: error for any non-OK code; SERVER: error
        only for the codes that blame the server (SERVER_ERROR_CODES)."""
        span = self.span
        if span is None:
            return
        value = status_code_int(code)
        attrs: dict[str, Any] = {"rpc.grpc.status_code": value}
        if attempts is not None:
            attrs[ATTEMPTS_ATTRIBUTE] = attempts
        error = value != 0 if self._client else value in SERVER_ERROR_CODES
        if error:
            attrs["error.type"] = _CODE_NAME.get(value, str(value))
        span.set_attributes(attrs)
        if error:
            span.set_status(Status(StatusCode.ERROR,
                                   (details or "")[:_MAX_STATUS_DESCRIPTION] or None))
        span.end()


class _IdGenerator(RandomIdGenerator):
    """Random ids, except that a root span takes the trace id its sampling decision was made
    on (handed over just before start_span, per thread)."""

    def __init__(self) -> None:
        self._next = threading.local()

    def use_trace_id(self, trace_id: int) -> None:
        self._next.trace_id = trace_id

    def generate_trace_id(self) -> int:
        trace_id = getattr(self._next, "trace_id", 0)
        if trace_id:
            self._next.trace_id = 0
            return int(trace_id)
        return super().generate_trace_id()


class SidecarTracing:
    """The tracer provider of one sidecar (not the global one: the app has its own)."""

    def __init__(self, service: str, *, ratio: float = 1.0, endpoint: str | None = None,
                 exporter: SpanExporter | None = None, environ: Mapping[str, str] | None = None,
                 schedule_delay_millis: float | None = None) -> None:
        """`environ` is for our own choices (defaults to os.environ); the SDK and the OTLP
        exporter always read os.environ themselves."""
        env = os.environ if environ is None else environ
        self.service = service
        attributes: dict[str, Any] = {"mesh.service": service}
        if not env.get("OTEL_SERVICE_NAME") and "service.name=" not in env.get(
                "OTEL_RESOURCE_ATTRIBUTES", ""):
            attributes["service.name"] = f"mesh-sidecar/{service}"
        self._ratio_sampler = RatioSampler(ratio)
        pinned = _sampler_from_env(env)
        self._pinned = pinned is not None
        sampler = pinned if pinned is not None else ParentBased(self._ratio_sampler)
        self._ids = _IdGenerator()
        # No atexit hook: the SDK's would wait up to 30 s for a dead backend at exit; the
        # sidecar's drain calls shutdown(timeout) instead.
        self.provider = TracerProvider(sampler=sampler, resource=Resource.create(attributes),
                                       id_generator=self._ids, shutdown_on_exit=False)
        self._stopped = False
        self.enabled = env.get("OTEL_SDK_DISABLED", "").strip().lower() != "true"
        # Our own sampler decides before the SDK is asked, so unsampled calls skip it.
        self._decide_here = self.enabled and not self._pinned
        self.export_error: str | None = None
        # The exporter (and its gRPC channel) is made when the first span is recorded, not
        # here: a sidecar that records nothing never opens a second gRPC stack beside its
        # grpc.aio one (whose shutdown it could race: seen as a rare crash at exit).
        self._given_exporter = exporter
        self._endpoint = endpoint
        self._env = env
        self._schedule_delay_millis = schedule_delay_millis
        self._exporter_made = not self.enabled
        self.exporter: SpanExporter | None = None
        self.processor: BatchSpanProcessor | None = None
        self._tracer = self.provider.get_tracer(INSTRUMENTATION_NAME)
        self._methods: dict[str, tuple[str, str, str]] = {}

    def _make_exporter(self) -> None:
        self._exporter_made = True
        try:
            self.exporter = self._given_exporter if self._given_exporter is not None else (
                _exporter_from_env(self._endpoint, self._env))
        except ExportUnavailable as err:  # trace export is never worth failing calls over
            self.exporter = None
            self.export_error = str(err)
            log.error("tracing: spans will not be exported: %s", err)
        if self.exporter is not None:
            self.processor = BatchSpanProcessor(self.exporter,
                                                schedule_delay_millis=self._schedule_delay_millis)
            self.provider.add_span_processor(self.processor)

    # --- sampling -----------------------------------------------------------------------------
    @property
    def sampling_ratio(self) -> float:
        return self._ratio_sampler.ratio

    def set_sampling_ratio(self, ratio: float) -> bool:
        """Ratio for traces this sidecar starts (MeshConfig tracing.samplingPercent / 100).

        False when OTEL_TRACES_SAMPLER pins the sampler (the operator's choice wins).
        ValueError outside [0, 1].
        """
        _check_ratio(ratio)
        if self._pinned:
            return False
        self._ratio_sampler.set_ratio(ratio)
        return True

    # --- spans --------------------------------------------------------------------------------
    def start_server_span(self, method: str, parent: tc.TraceContext | None, *,
                          peer: str | None = None, local_address: str | None = None,
                          start_time_ns: int | None = None) -> CallSpan:
        """The inbound hop: `parent` from the caller's metadata (tc.extract), `peer` as grpc's
        context.peer(), `local_address` the listener's host:port."""
        return self._start(method, parent, False, peer, local_address, None, start_time_ns)

    def start_client_span(self, method: str, parent: tc.TraceContext | None, *,
                          upstream: str | None = None, cluster: str | None = None,
                          start_time_ns: int | None = None) -> CallSpan:
        """The outbound hop: `parent` from the app's metadata, `upstream` the endpoint
        (host:port) when already picked (else CallSpan.set_upstream later)."""
        return self._start(method, parent, True, upstream, None, cluster, start_time_ns)

    def _start(self, method: str, parent: tc.TraceContext | None, client: bool,
               address: str | None, local_address: str | None, cluster: str | None,
               start_time_ns: int | None) -> CallSpan:
        if not self.enabled:
            return CallSpan(None, client, parent, 0, 0, 0)
        sampled: bool | None = None
        if self._decide_here:
            if parent is None:
                trace_id = tc.new_trace_id()
                sampled = self._ratio_sampler.decide(trace_id)
                flags = TraceFlags.RANDOM_TRACE_ID
            else:
                trace_id = parent.trace_id
                sampled = parent.sampled
                if sampled is None:  # B3 deferred: decide as a root would, by trace id
                    sampled = self._ratio_sampler.decide(trace_id)
                flags = parent.flags & TraceFlags.RANDOM_TRACE_ID
            if not sampled:
                return CallSpan(None, client, parent, trace_id, tc.new_span_id(), flags)
            if parent is None:
                self._ids.use_trace_id(trace_id)
        if not self._exporter_made:
            self._make_exporter()
        name, kind, attrs = self._span_args(method, client, address, local_address, cluster)
        span = self._tracer.start_span(name, self._parent_context(parent, sampled), kind, attrs,
                                       start_time=start_time_ns)
        ctx = span.get_span_context()
        if not span.is_recording():  # a pinned sampler said no
            return CallSpan(None, client, parent, ctx.trace_id, ctx.span_id, ctx.trace_flags)
        return CallSpan(span, client, parent, ctx.trace_id, ctx.span_id, ctx.trace_flags)

    def _span_args(self, method: str, client: bool, address: str | None,
                   local_address: str | None, cluster: str | None
                   ) -> tuple[str, SpanKind, dict[str, Any]]:
        cached = self._methods.get(method)
        if cached is None:
            cached = _split_method(method)
            if len(self._methods) < _METHOD_CACHE_LIMIT:
                self._methods[method] = cached
        name, service, rpc_method = cached
        attrs: dict[str, Any] = {"rpc.system": "grpc", "rpc.service": service,
                                 "rpc.method": rpc_method}
        if client:
            if address:
                host, port = split_host_port(address)
                attrs["server.address"] = attrs["network.peer.address"] = host
                if port is not None:
                    attrs["server.port"] = attrs["network.peer.port"] = port
            if cluster:
                attrs["mesh.cluster"] = cluster
            return name, SpanKind.CLIENT, attrs
        if address:
            host, port = parse_peer(address)
            attrs["network.peer.address"] = host
            if port is not None:
                attrs["network.peer.port"] = port
        if local_address:
            host, port = split_host_port(local_address)
            attrs["server.address"] = host
            if port is not None:
                attrs["server.port"] = port
        return name, SpanKind.SERVER, attrs

    def _parent_context(self, parent: tc.TraceContext | None, sampled: bool | None
                        ) -> Context | None:
        if parent is None:
            return None
        flags = parent.flags
        if parent.sampled is None:  # B3 deferred (decided in _start, or here when pinned)
            if sampled is None:
                sampled = self._ratio_sampler.decide(parent.trace_id)
            flags = (flags & ~TraceFlags.SAMPLED) | (TraceFlags.SAMPLED if sampled else 0)
        span_context = SpanContext(parent.trace_id, parent.span_id, is_remote=True,
                                   trace_flags=TraceFlags(flags))
        return trace_api.set_span_in_context(NonRecordingSpan(span_context))

    # --- lifecycle ----------------------------------------------------------------------------
    def force_flush(self, timeout_s: float = 5.0) -> bool:
        """Export what is queued; True if that finished within `timeout_s` (the SDK's own
        force_flush ignores its timeout and can block for the exporter's retry budget)."""
        return _bounded(lambda: self.provider.force_flush(int(timeout_s * 1000)), timeout_s,
                        "flush")

    def shutdown(self, timeout_s: float = 5.0) -> bool:
        """Export what is queued for up to `timeout_s`, then stop; True if everything queued
        was exported. A drain must not wait on a trace backend that is down: the exporter is
        stopped first (its channel closed, so an export in flight ends now), then the SDK's
        own shutdown, which would otherwise wait up to 30 s for it."""
        if self._stopped:
            return True
        self._stopped = True
        flushed = self.force_flush(timeout_s) if self.processor is not None else True
        if self.exporter is not None:
            _bounded(self.exporter.shutdown, 1.0, "exporter shutdown")
        _bounded(self.provider.shutdown, 1.0, "shutdown")
        return flushed


def _bounded(fn: Any, timeout_s: float, what: str) -> bool:
    done = threading.Event()
    result: list[Any] = []

    def run() -> None:
        try:
            result.append(fn())
        except Exception:  # the exporter's failure is never ours to raise
            log.exception("trace export %s failed", what)
        finally:
            done.set()

    threading.Thread(target=run, name=f"trace-{what}", daemon=True).start()
    if not done.wait(timeout_s):
        log.warning("trace export %s did not finish in %.1fs; continuing without it", what,
                    timeout_s)
        return False
    return bool(result and result[0] is not False)
