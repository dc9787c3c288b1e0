"""Command-line flags (each also readable from a MESH_-prefixed environment variable)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from sidecar.static_config import split_host_port
from sidecar.xds_translate import ConfigError

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Settings:
    service: str
    app: str | None = None
    config_file: str | None = None
    outbound: str = "127.0.0.1:15001"
    inbound: str = "0.0.0.0:15006"
    admin: str = "127.0.0.1:15000"
    upstreams: dict[str, tuple[str, ...]] = field(default_factory=dict)
    routes: dict[str, str] = field(default_factory=dict)
    unary_methods: tuple[str, ...] = ()
    learn_method_shapes: bool = True
    minimal_stack: bool = True
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    drain_timeout: float = 10.0
    ready_file: str | None = None
    log_level: str = "INFO"
    control_plane: str | None = None
    state_dir: str | None = None
    instance_id: str = ""
    version: str = ""
    zone: str = ""
    grpc_services: tuple[str, ...] = ()
    trace_sampling_percent: float = 1.0
    access_log: str = "off"
    access_log_sample: float = 1.0
    token: str | None = field(default=None, repr=False)  # bootstrap token for the mesh CA
    token_file: str | None = None
    inbound_plaintext: str | None = None  # with an identity: the plaintext inbound listener

    @property
    def wants_identity(self) -> bool:
        return bool(self.token or self.token_file)


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"MESH_{name}", default)


def _env_list(name: str) -> list[str]:
    value = os.environ.get(f"MESH_{name}", "")
    return value.split() if value else []


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mesh-sidecar",
        description="gRPC sidecar proxy: the app sends its outbound calls to --outbound; other "
                    "sidecars reach the app through --inbound. Every flag can also be set with "
                    "an environment variable named MESH_<FLAG> (e.g. MESH_APP=127.0.0.1:8080); "
                    "repeatable flags take a space-separated list there.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--service", default=_env("SERVICE"),
                   help="mesh service name of the local app (env MESH_SERVICE); required")
    p.add_argument("--app", default=_env("APP"),
                   help="HOST:PORT of the local app, where inbound calls are forwarded")
    p.add_argument("--config", default=_env("CONFIG"),
                   help="static config: Envoy-style static_resources (listeners with an "
                        "http_connection_manager, clusters) as JSON or YAML")
    p.add_argument("--outbound", default=_env("OUTBOUND", "127.0.0.1:15001"),
                   help="listener the app sends its outbound gRPC calls to (plaintext)")
    p.add_argument("--inbound", default=_env("INBOUND", "0.0.0.0:15006"),
                   help="listener other sidecars connect to; forwards to --app")
    p.add_argument("--admin", default=_env("ADMIN", "127.0.0.1:15000"),
                   help="admin HTTP: /ready, /config_dump, /clusters")
    p.add_argument("--upstream", action="append", default=_env_list("UPSTREAM"),
                   metavar="SERVICE=ADDR[,ADDR...]",
                   help="instances of a mesh service (their inbound sidecars); repeatable")
    p.add_argument("--route", action="append", default=_env_list("ROUTE"),
                   metavar="GRPC_SERVICE=SERVICE",
                   help="send calls for a gRPC service (e.g. shop.Catalog, or * for any other) "
                        "to a mesh service; repeatable")
    p.add_argument("--unary-method", action="append", default=_env_list("UNARY_METHOD"),
                   metavar="/pkg.Service/Method",
                   help="a method known to be unary (takes the cheaper unary proxy path); "
                        "repeatable")
    p.add_argument("--no-learn-method-shapes", action="store_true",
                   default=_env("NO_LEARN_METHOD_SHAPES") == "1",
                   help="do not ask upstreams' reflection service which methods are unary")
    p.add_argument("--no-minimal-stack", action="store_true",
                   default=_env("NO_MINIMAL_STACK") == "1",
                   help="run grpc-core's full filter stack on both listeners and upstream "
                        "channels (by default the sidecar uses grpc.minimal_stack, which is "
                        "cheaper per call, and enforces message sizes itself)")
    p.add_argument("--max-message-bytes", type=int,
                   default=int(_env("MAX_MESSAGE_BYTES", str(DEFAULT_MAX_MESSAGE_BYTES)) or 0),
                   help="largest message accepted or sent, either direction; larger ones get "
                        "RESOURCE_EXHAUSTED")
    p.add_argument("--drain-timeout", type=float, default=float(_env("DRAIN_TIMEOUT", "10") or 0),
                   help="seconds calls in flight get to finish after SIGTERM")
    p.add_argument("--control-plane", default=_env("CONTROL_PLANE"),
                   help="HOST:PORT of the control plane (xDS over ADS); without it the config "
                        "comes from --config and the routing flags only")
    p.add_argument("--state-dir", default=_env("STATE_DIR"),
                   help="where the last accepted control-plane config is kept, to start from "
                        "when the control plane is unreachable; unset means "
                        "~/.pymesh/sidecar-<instance id>")
    p.add_argument("--instance-id", default=_env("INSTANCE_ID", ""),
                   help="this instance's id in the mesh; empty means <service>-<inbound port>")
    p.add_argument("--version", default=_env("VERSION", ""),
                   help="version label of the local app (TrafficPolicy subsets select on it)")
    p.add_argument("--zone", default=_env("ZONE", ""), help="zone of this instance")
    p.add_argument("--grpc-service", action="append", default=_env_list("GRPC_SERVICE"),
                   metavar="pkg.Service",
                   help="a gRPC service the local app serves, announced to the control plane; "
                        "repeatable; none means: ask the app's reflection service")
    p.add_argument("--trace-sampling", type=float,
                   default=float(_env("TRACE_SAMPLING", "1") or 0),
                   help="percent of calls that start a new trace here (MeshConfig "
                        "tracing.samplingPercent from the control plane overrides it); spans go "
                        "by OTLP/gRPC to OTEL_EXPORTER_OTLP_ENDPOINT (default "
                        "http://127.0.0.1:4317)")
    p.add_argument("--access-log", default=_env("ACCESS_LOG", "off"),
                   help="one JSON line per call to: off, stdout, stderr or a file path")
    p.add_argument("--access-log-sample", type=float,
                   default=float(_env("ACCESS_LOG_SAMPLE", "1") or 0),
                   help="fraction of successful calls logged (errors are always logged)")
    p.add_argument("--token", default=_env("TOKEN"),
                   help="bootstrap token for the mesh CA (`meshctl token create --service S`); "
                        "prefer MESH_TOKEN or --token-file, a flag shows in `ps`. With a token "
                        "the sidecar gets a workload certificate and --inbound takes mTLS only")
    p.add_argument("--token-file", default=_env("TOKEN_FILE"),
                   help="file holding the bootstrap token")
    p.add_argument("--inbound-plaintext", default=_env("INBOUND_PLAINTEXT"),
                   help="with a token: plaintext inbound listener for callers outside the mesh, "
                        "used in mTLS mode PERMISSIVE or DISABLE (refused in STRICT); unset "
                        "means --inbound's host and port + 1 (port 0 if --inbound's is 0)")
    p.add_argument("--ready-file", default=_env("READY_FILE"),
                   help="write the bound addresses as JSON to this file once listening")
    p.add_argument("--log-level", default=_env("LOG_LEVEL", "INFO"),
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def parse(argv: Sequence[str] | None = None) -> Settings:
    p = parser()
    args = p.parse_args(argv)
    try:
        return _settings(args)
    except ConfigError as exc:
        p.error(str(exc))
        raise  # unreachable: error() exits


def _settings(args: argparse.Namespace) -> Settings:
    if not args.service:
        raise ConfigError("--service (or MESH_SERVICE) is required")
    for flag in ("outbound", "inbound", "admin"):
        split_host_port(getattr(args, flag))
    if args.app:
        split_host_port(args.app)
    upstreams: dict[str, tuple[str, ...]] = {}
    for item in args.upstream:
        name, sep, addresses = item.partition("=")
        if not sep or not name or not addresses:
            raise ConfigError(f"--upstream {item!r}: expected SERVICE=ADDR[,ADDR...]")
        addrs = tuple(a for a in addresses.split(",") if a)
        for a in addrs:
            split_host_port(a)
        upstreams[name] = upstreams.get(name, ()) + addrs
    routes: dict[str, str] = {}
    for item in args.route:
        grpc_service, sep, target = item.partition("=")
        if not sep or not grpc_service or not target:
            raise ConfigError(f"--route {item!r}: expected GRPC_SERVICE=SERVICE")
        if target not in upstreams and not args.config and not args.control_plane:
            raise ConfigError(f"--route {item!r}: no --upstream named {target!r}")
        routes[grpc_service] = target
    for m in args.unary_method:
        if not (m.startswith("/") and m.count("/") == 2):
            raise ConfigError(f"--unary-method {m!r}: expected /pkg.Service/Method")
    if args.control_plane:
        split_host_port(args.control_plane)
    if args.max_message_bytes <= 0:
        raise ConfigError("--max-message-bytes must be positive")
    if not 0 <= args.trace_sampling <= 100:
        raise ConfigError("--trace-sampling must be a percentage (0-100)")
    if not 0 <= args.access_log_sample <= 1:
        raise ConfigError("--access-log-sample must be between 0 and 1")
    if args.drain_timeout < 0:
        raise ConfigError("--drain-timeout must not be negative")
    inbound_plaintext = None
    if args.token or args.token_file:
        if not args.control_plane:
            raise ConfigError("--token/--token-file need --control-plane (the mesh CA)")
        inbound_plaintext = args.inbound_plaintext or _next_port(args.inbound)
        split_host_port(inbound_plaintext)
    elif args.inbound_plaintext:
        raise ConfigError("--inbound-plaintext needs a workload identity (--token or "
                          "--token-file): without one --inbound is plaintext already")
    return Settings(service=args.service, app=args.app, config_file=args.config,
                    outbound=args.outbound, inbound=args.inbound, admin=args.admin,
                    upstreams=upstreams, routes=routes, unary_methods=tuple(args.unary_method),
                    learn_method_shapes=not args.no_learn_method_shapes,
                    minimal_stack=not args.no_minimal_stack,
                    max_message_bytes=args.max_message_bytes, drain_timeout=args.drain_timeout,
                    ready_file=args.ready_file, log_level=args.log_level,
                    control_plane=args.control_plane, state_dir=args.state_dir,
                    instance_id=args.instance_id, version=args.version, zone=args.zone,
                    grpc_services=tuple(args.grpc_service),
                    trace_sampling_percent=args.trace_sampling, access_log=args.access_log,
                    access_log_sample=args.access_log_sample, token=args.token,
                    token_file=args.token_file, inbound_plaintext=inbound_plaintext)


def _next_port(address: str) -> str:
    host, port = split_host_port(address)
    if port == 65535:
        raise ConfigError("--inbound port 65535 leaves no next port for the plaintext inbound "
                          "listener: set --inbound-plaintext")
    bracketed = f"[{host}]" if ":" in host else host
    return f"{bracketed}:{port + 1 if port else 0}"
