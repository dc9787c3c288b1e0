"""What every demo service shares: flags, the server with health and reflection, the ready
file, the lazily resolved channel to the instance's own sidecar, and error relaying.

Services never dial each other: every outgoing call goes to the sidecar's outbound listener,
which routes it by gRPC service name. That is the whole point of the demo.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import time
from collections.abc import Callable, Iterable, Sequence
from typing import NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

SERVED_BY = "x-served-by"
# Request metadata an app must copy onto its outgoing calls so a trace (and a request id)
# follows the call through the mesh; the sidecar cannot do it, it does not see causality.
PROPAGATED_HEADERS = ("traceparent", "tracestate", "baggage", "x-request-id")
DEFAULT_CALL_TIMEOUT = 5.0
GRACE_SECONDS = 2.0

log = logging.getLogger("demo")


def base_parser(service: str) -> argparse.ArgumentParser:
    """Flags common to every demo service; each flag also reads a DEMO_-prefixed env var."""
    p = argparse.ArgumentParser(prog=f"python -m demo_services.{service}",
                                description=f"The demo shop's {service} service.")
    p.add_argument("--port", type=int, default=int(os.environ.get("DEMO_PORT", "0")),
                   help="port on 127.0.0.1 (0 picks a free one; see --ready-file)")
    p.add_argument("--instance", default=os.environ.get("DEMO_INSTANCE", f"{service}-1"),
                   help="instance id, returned in responses and in the x-served-by trailer")
    p.add_argument("--ready-file", default=os.environ.get("DEMO_READY_FILE"),
                   help='once listening, write {"server": "127.0.0.1:P"} to this file')
    return p


def add_mesh_flags(p: argparse.ArgumentParser) -> None:
    """Flags of services that call others (through their sidecar only)."""
    p.add_argument("--mesh", default=os.environ.get("MESH_OUTBOUND"),
                   help="HOST:PORT of this instance's sidecar outbound listener "
                        "(env MESH_OUTBOUND)")
    p.add_argument("--mesh-from-ready-file", metavar="PATH",
                   help="instead of --mesh: read the sidecar's outbound address from its ready "
                        "file at the first outgoing call (lets the app start before its sidecar)")


def served_by(instance: str) -> tuple[tuple[str, str], ...]:
    return ((SERVED_BY, instance),)


def outgoing_metadata(context: grpc.aio.ServicerContext) -> tuple[tuple[str, str], ...]:
    """The incoming headers that must travel on to the next hop."""
    return tuple((k, v) for k, v in context.invocation_metadata() or ()
                 if k in PROPAGATED_HEADERS and isinstance(v, str))


def remaining_timeout(context: grpc.aio.ServicerContext) -> float:
    """Downstream calls get what is left of our caller's deadline, never more."""
    left = context.time_remaining()
    if left is None:
        return DEFAULT_CALL_TIMEOUT
    return max(0.0, min(left, DEFAULT_CALL_TIMEOUT))


async def relay_error(context: grpc.aio.ServicerContext, err: grpc.aio.AioRpcError, hop: str,
                      instance: str) -> NoReturn:
    """Fail our call with the downstream status code, naming the hop that failed."""
    await context.abort(err.code(), f"{hop}: {err.details()}",
                        trailing_metadata=served_by(instance))
    raise AssertionError("unreachable")  # abort raises; this line satisfies the type checker


class MeshChannel:
    """One channel to the instance's sidecar outbound listener, opened on first use.

    The app and its sidecar need each other's address; with every port chosen by the kernel one
    of them must learn the other's late. The app does, by reading the sidecar's ready file when
    it makes its first outgoing call.
    """

    def __init__(self, address: str | None, ready_file: str | None = None,
                 wait_timeout: float = 30.0) -> None:
        if not address and not ready_file:
            raise SystemExit("one of --mesh (or MESH_OUTBOUND) or --mesh-from-ready-file is needed")
        self._address = address
        self._ready_file = ready_file
        self._wait_timeout = wait_timeout
        self._channel: grpc.aio.Channel | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> grpc.aio.Channel:
        if self._channel is None:
            async with self._lock:
                if self._channel is None:
                    address = self._address or await self._read_ready_file()
                    self._channel = grpc.aio.insecure_channel(address)
        return self._channel

    async def _read_ready_file(self) -> str:
        assert self._ready_file is not None
        deadline = time.monotonic() + self._wait_timeout
        while True:
            try:
                return read_ready_file(self._ready_file)["outbound"]
            except (FileNotFoundError, json.JSONDecodeError, KeyError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"sidecar ready file {self._ready_file} did not appear "
                                       f"within {self._wait_timeout}s") from None
                await asyncio.sleep(0.05)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close(None)


def read_ready_file(path: str) -> dict[str, str]:
    """Small and local: fine to read from the event loop."""
    with open(path) as f:
        return {str(k): str(v) for k, v in json.load(f).items()}


def write_ready_file(path: str, data: dict[str, str]) -> None:
    """Atomically, so a reader never sees half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


async def serve(*, port: int, instance: str, ready_file: str | None,
                register: Callable[[grpc.aio.Server], None], service_names: Sequence[str],
                on_stop: Iterable[Callable[[], object]] = ()) -> None:
    """Run a server with health and reflection until SIGTERM or SIGINT, then stop gracefully."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {instance} %(message)s")
    # SO_REUSEPORT (grpc's default) would let a stale process silently share our port.
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    register(server)
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME], server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    for name in ("", *service_names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    address = f"127.0.0.1:{bound}"
    if ready_file:
        write_ready_file(ready_file, {"server": address})
    log.info("serving %s on %s", ", ".join(service_names), address)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping")
    await health_servicer.enter_graceful_shutdown()
    await server.stop(GRACE_SECONDS)
    for fn in on_stop:
        result = fn()
        if asyncio.iscoroutine(result):
            await result
