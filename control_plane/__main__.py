"""`mesh-control-plane`: registry + policy store -> translation -> ADS, plus the policy and status
APIs on one gRPC port and an admin HTTP port (/ready, /metrics)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from control_plane import ca_api, policy_api, status_api
from control_plane.ads_server import SERVER_OPTIONS, AdsServer, ProviderNotReady
from control_plane.ca import (
    CertificateAuthority,
    ConsulState,
    FileState,
    StateBackend,
    TokenStore,
    check_ttl,
    load_operator_ca,
)
from control_plane.cli_ca import parse_duration
from control_plane.metrics import ControlPlaneMetrics
from control_plane.policy.store import ConsulKVStore, FileStore, PolicyStore, StoreError
from control_plane.registry import persist
from control_plane.registry.consul import ConsulRegistry
from control_plane.registry.embedded import EmbeddedRegistry, NodeMetadataError, instance_from_node
from control_plane.translate import TranslationProvider
from sidecar.admin_http import AdminServer, Response
from sidecar.atomic_file import write_atomically
from sidecar.static_config import split_host_port

log = logging.getLogger("control_plane")

_REGISTRY_DEBOUNCE = 0.1  # seconds: registry changes closer than this are pushed together
# How often the CA state is read to notice a root rotated by another replica or retired by
# time (each read tells on_change listeners); more often while there are no roots yet.
_BUNDLE_REFRESH = 10.0
_BUNDLE_RETRY = 1.0


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"MESH_{name}", default)


def _cert_ttl(text: str) -> float:
    try:
        return check_ttl(parse_duration(text))
    except ValueError as e:  # argparse.ArgumentTypeError is one
        raise argparse.ArgumentTypeError(str(e)) from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mesh-control-plane",
        description="The mesh control plane: syncs instances (Consul, or announced by sidecars), "
                    "stores policy, and pushes config to sidecars and proxyless gRPC clients "
                    "over xDS v3 (ADS). Flags can also be set as MESH_CP_<FLAG> variables.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--listen", default=_env("CP_LISTEN", "127.0.0.1:15010"),
                   help="gRPC: ADS, the policy API and the status API")
    p.add_argument("--admin", default=_env("CP_ADMIN", "127.0.0.1:15014"),
                   help="admin HTTP: /ready, /metrics")
    p.add_argument("--consul", default=_env("CP_CONSUL"),
                   help="Consul agent URL, e.g. http://127.0.0.1:8500: instances come from its "
                        "catalog and policies live in its KV store; unset means the embedded "
                        "registry (sidecars announce themselves) and a local policy file")
    p.add_argument("--state-dir", default=_env("CP_STATE_DIR",
                                               os.path.join(os.path.expanduser("~"), ".pymesh",
                                                            "control-plane")),
                   help="where the local policy file is kept (without --consul)")
    p.add_argument("--grace", type=float, default=float(_env("CP_GRACE", "5") or 5),
                   help="seconds an announced instance stays after its sidecar disconnects")
    p.add_argument("--ca-cert", default=_env("CP_CA_CERT"),
                   help="the CA certificate to sign workload certificates with (PEM; may be "
                        "followed by its chain up to a self-signed root); unset means a root "
                        "generated at first start and kept in the state dir or Consul KV")
    p.add_argument("--ca-key", default=_env("CP_CA_KEY"),
                   help="the --ca-cert's private key (PEM, unencrypted; keep it mode 0600)")
    p.add_argument("--cert-ttl", type=_cert_ttl, default=_env("CP_CERT_TTL", "24h"),
                   help="lifetime of workload certificates, 1m to 2160h")
    p.add_argument("--ready-file", default=_env("CP_READY_FILE"),
                   help="write the bound addresses as JSON here once listening")
    p.add_argument("--log-level", default=_env("CP_LOG_LEVEL", "INFO"),
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


class ControlPlane:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.registry: ConsulRegistry | EmbeddedRegistry
        self.registry_file = ""
        self.store: PolicyStore
        if args.consul:
            import consul  # py-consul

            self.registry = ConsulRegistry(args.consul, grace=args.grace)
            kv = ConsulKVStore(consul.Consul(host=self.registry.host, port=self.registry.port,
                                             scheme=self.registry.scheme))
            ca_state: StateBackend = ConsulState(consul.Consul(
                host=self.registry.host, port=self.registry.port, scheme=self.registry.scheme))
            kv.start()
            self.store = kv
            self.source_name = "consul"
        else:
            self.registry = EmbeddedRegistry(grace=args.grace)
            self.registry_file = os.path.join(args.state_dir, "registry.json")
            restored = persist.restore(self.registry, self.registry_file)
            if restored:
                log.info("restored %d instances announced before the restart", restored)
            self.store = FileStore(os.path.join(args.state_dir, "policies.json"))
            self.source_name = "embedded"
            ca_state = FileState(args.state_dir)
        if bool(args.ca_cert) != bool(args.ca_key):
            raise ValueError("--ca-cert and --ca-key go together")
        operator = load_operator_ca(args.ca_cert, args.ca_key) if args.ca_cert else None
        self.ca = CertificateAuthority(ca_state, trust_domain=self._trust_domain,
                                       ttl=args.cert_ttl, operator=operator)
        self.tokens = TokenStore(ca_state)
        # The bundle the CA last announced (on_change), not a read of the CA state: translation
        # runs on the event loop for every cache miss and must not wait on Consul.
        self._trust_bundle: tuple[str, ...] = ()
        self.ads = AdsServer(_UntilReady(TranslationProvider(self.registry.view,
                                                             self.store.policy_set,
                                                             self._current_trust_bundle),
                                         self._not_ready),
                             on_connect=self._announce, on_disconnect=self._withdraw)
        self.metrics = ControlPlaneMetrics(self.ads, {self.source_name: self.registry},
                                           self.store)
        self.server = grpc.aio.server(options=[*SERVER_OPTIONS, ("grpc.so_reuseport", 0)])
        self.admin = AdminServer({"/ready": self._ready, "/metrics": self._metrics})
        self.addresses: dict[str, str] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._unsubscribe: Callable[[], None] | None = None

    def _trust_domain(self) -> str | None:
        """MeshConfig's trust domain; None until the policies have been read."""
        if isinstance(self.store, ConsulKVStore) and not self.store.ready.is_set():
            return None
        return self.store.policy_set().mesh_config().trust_domain

    def _current_trust_bundle(self) -> tuple[str, ...]:
        return self._trust_bundle

    async def _announce(self, node: object, owner: object) -> None:
        instance = instance_from_node(node)  # NodeMetadataError rejects the stream
        if instance is not None:
            await self.registry.announce(instance, owner=owner)

    async def _withdraw(self, node: object, owner: object) -> None:
        with contextlib.suppress(NodeMetadataError):
            instance = instance_from_node(node)
            if instance is not None:
                await self.registry.withdraw(instance.instance_id, owner=owner)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await self.registry.start()
        # Policy changes can come from another thread (the Consul KV watch): hop to the loop.
        def policies_changed(_policies: object) -> None:
            loop.call_soon_threadsafe(self.ads.notify_changed)

        self._unsubscribe = self.store.on_change(policies_changed)

        # Roots change from a worker thread (ca.start, a signing request, the refresh task): keep
        # the bundle, then hop to the loop to push it (CDS and LDS carry it inline).
        def bundle_changed(bundle: tuple[str, ...]) -> None:
            self._trust_bundle = tuple(bundle)
            with contextlib.suppress(RuntimeError):  # the loop is closing
                loop.call_soon_threadsafe(self.ads.notify_changed)

        self.ca.on_change(bundle_changed)
        self._tasks.append(loop.create_task(self._follow_registry()))
        self._tasks.append(loop.create_task(self._notify_when_ready()))
        self.ads.add_to_server(self.server)
        policy_api.add_to_server(self.server, self.store)
        await asyncio.to_thread(self.ca.start)  # before ADS serves: translation needs the roots
        self._tasks.append(loop.create_task(self._refresh_trust_bundle()))
        ca_api.add_to_server(self.server, self.ca, self.tokens)
        status_api.add_to_server(self.server, self.ads.proxy_status,
                                 status_api.registry_report({self.source_name: self.registry}))
        port = self.server.add_insecure_port(self.args.listen)
        if port == 0:
            raise OSError(f"cannot listen on {self.args.listen}")
        await self.server.start()
        host, _ = split_host_port(self.args.listen)
        self.addresses["grpc"] = f"{host}:{port}"
        admin_host, admin_port = split_host_port(self.args.admin)
        bound = await self.admin.start(admin_host, admin_port)
        self.addresses["admin"] = f"{admin_host}:{bound}"
        if self.args.ready_file:
            write_atomically(self.args.ready_file, json.dumps(self.addresses))
        log.info("control plane listening: %s (registry: %s)", self.addresses, self.source_name)

    async def _follow_registry(self) -> None:
        async for view in self.registry.changes():
            self.ads.notify_changed()
            if isinstance(self.registry, EmbeddedRegistry):
                await asyncio.to_thread(persist.save, view, self.registry_file)
            # Coalesce bursts (a thousand sidecars reconnecting after a restart): the
            # subscription hands over only the latest view, so one push covers the burst.
            await asyncio.sleep(_REGISTRY_DEBOUNCE)

    async def _refresh_trust_bundle(self) -> None:
        """Read the CA state now and then: the CA tells on_change when the bundle differs."""
        while True:
            await asyncio.sleep(_BUNDLE_REFRESH if self._trust_bundle else _BUNDLE_RETRY)
            try:
                await asyncio.to_thread(self.ca.roots)
            except Exception as exc:  # Consul down, a bad state document: keep the last bundle
                log.warning("certificate authority: cannot read the roots: %s", exc)

    async def _notify_when_ready(self) -> None:
        """Push once the registry and the policies have first been read (see _not_ready)."""
        while self._not_ready() is not None:  # noqa: ASYNC110 - set by other threads
            await asyncio.sleep(0.1)
        self.ads.notify_changed()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._unsubscribe is not None:
            self._unsubscribe()
        await self.ads.close()
        await self.server.stop(2)
        await self.registry.stop()
        self.store.close()
        await self.admin.close()

    def _not_ready(self) -> str | None:
        """Why config must not be pushed yet: pushing before the first read of the registry
        or the policies would take endpoints or policies away from every sidecar."""
        if not self.registry.synced:
            return "registry not synced yet"
        if isinstance(self.store, ConsulKVStore) and not self.store.ready.is_set():
            return "policies not read from Consul yet"
        if not self._trust_bundle:
            return "the certificate authority has no roots yet"
        return None

    def _ready(self, _query: str) -> Response:
        reason = self._not_ready()
        if reason is not None:
            return Response(503, f"{reason}\n".encode())
        return Response(200, b"ready\n")

    def _metrics(self, _query: str) -> Response:
        body, content_type = self.metrics.render()
        return Response(200, body, content_type)


class _UntilReady:
    """The translation provider, refusing to answer while the inputs are not known yet."""

    def __init__(self, provider: TranslationProvider, not_ready: Callable[[], str | None]
                 ) -> None:
        self._provider = provider
        self._not_ready = not_ready

    def resources_for(self, node: Any, type_url: str, names: Any) -> Any:
        reason = self._not_ready()
        if reason is not None:
            raise ProviderNotReady(reason)
        return self._provider.resources_for(node, type_url, names)

    def share_key(self, node: Any, type_url: str) -> str:
        return self._provider.share_key(node, type_url)

    def revision(self) -> int:
        return self._provider.revision()


async def _run(args: argparse.Namespace) -> None:
    plane = ControlPlane(args)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await plane.start()
    await stop.wait()
    await plane.stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(_run(args))
    except (StoreError, ValueError) as exc:
        print(f"mesh-control-plane: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"mesh-control-plane: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
