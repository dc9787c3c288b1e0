"""Simulated sidecars for the push-latency benchmark: many ADS streams in one process.

    python -m bench.push_clients --control-plane HOST:PORT --first 0 --count 500 --services 10

Each stream behaves like our sidecar's ADS client as far as the control plane can tell: its own
channel and TCP connection, a node with `mesh_sidecar` metadata (so the embedded registry
announces it), wildcard LDS and CDS, then RDS and EDS for the names those reference, and an ACK
(version + nonce) for every response. It does not compile or apply anything: what is measured is
the control plane, and this process runs apart from it so its CPU is not counted as the
control plane's.

The harness (bench/push_latency.py) drives it with one JSON command per line on stdin and reads
one JSON reply per line on stdout:
  {"cmd": "open", "count": K}   -> start K more streams (the harness connects in batches)
  {"cmd": "status"}             -> streams started/open/configured, responses, last response
                                   time, errors
  {"cmd": "watch", "marker": M} -> from now on, note when each stream ACKs an RDS, CDS and EDS
                                   response whose resources contain the bytes M
  {"cmd": "results", "full": B} -> how many streams ACKed all three; with full, every time
  {"cmd": "quit"}               -> close every stream and exit 0
Times are time.monotonic() (CLOCK_MONOTONIC, the same clock in every process of the machine).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.service.discovery.v3 import discovery_pb2

from sidecar.xds_client import eds_names, route_names

log = logging.getLogger("push_clients")

ADS_METHOD = ("/envoy.service.discovery.v3.AggregatedDiscoveryService/"
              "StreamAggregatedResources")
LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
RDS = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
TYPES = (LDS, RDS, CDS, EDS)
# A TrafficPolicy change reaches a sidecar as new routes (RDS), new subset clusters (CDS) and
# their endpoints (EDS, once the sidecar has asked for the new names): all three count.
WATCHED = (RDS, CDS, EDS)
# Every stream its own connection, as real sidecars have (grpc-core would otherwise share one
# subchannel between channels with equal arguments).
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]


def service_of(index: int, services: int) -> str:
    return f"svc-{index % services}"


def version_of(index: int, services: int) -> str:
    """Alternating per service, so every service has v1 and v2 instances to split between."""
    return "v1" if (index // services) % 2 == 0 else "v2"


def grpc_service_of(service: str) -> str:
    return f"bench.v1.{service.replace('-', '_').title().replace('_', '')}"


def node_for(index: int, services: int) -> base_pb2.Node:
    """The node a sidecar sends (docs/control-plane.md "Node identity"). The inbound address is
    never dialled: the control plane only passes it on in EDS."""
    service = service_of(index, services)
    instance = f"{service}-{index}"
    node = base_pb2.Node(id=f"{service}~{instance}", cluster=service,
                         user_agent_name="pymesh-push-bench")
    node.metadata.update({
        "service": service, "instance_id": instance,
        "inbound_address": f"127.0.0.{1 + index // 50000}:{10000 + index % 50000}",
        "version": version_of(index, services), "zone": "",
        "grpc_services": [grpc_service_of(service)], "mesh_sidecar": True,
    })
    return node


@dataclass
class _TypeState:
    version: str = ""
    nonce: str = ""
    names: frozenset[str] = frozenset()
    received: bool = False


@dataclass
class Totals:
    """What the harness asks about, over all streams of this process."""

    responses: int = 0
    last_response: float = 0.0
    errors: int = 0
    last_error: str = ""
    marker: bytes = b""


@dataclass
class SimStream:
    index: int
    node: base_pb2.Node
    totals: Totals
    types: dict[str, _TypeState] = field(default_factory=lambda: {t: _TypeState()
                                                                  for t in TYPES})
    open: bool = False
    acked: dict[str, float] = field(default_factory=dict)  # watched type -> ACK time

    @property
    def configured(self) -> bool:
        return all(s.received for s in self.types.values())

    def watch(self) -> None:
        self.acked = {}

    def done_at(self) -> float | None:
        if len(self.acked) < len(WATCHED):
            return None
        return max(self.acked.values())

    async def run(self, target: str) -> None:
        async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
            call = channel.stream_stream(
                ADS_METHOD, request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
                response_deserializer=discovery_pb2.DiscoveryResponse.FromString)()
            try:
                await call.write(discovery_pb2.DiscoveryRequest(node=self.node, type_url=LDS))
                await call.write(discovery_pb2.DiscoveryRequest(type_url=CDS))
                self.open = True
                while True:
                    response = await call.read()
                    if response is grpc.aio.EOF:
                        raise ConnectionError("the control plane ended the stream")
                    for request in self.answer(response):
                        await call.write(request)
                    self.note_ack(response, time.monotonic())
            except asyncio.CancelledError:
                call.cancel()
                raise
            except (grpc.RpcError, ConnectionError) as exc:
                self.totals.errors += 1
                self.totals.last_error = f"stream {self.index}: {exc}"
                log.warning("stream %d ended: %s", self.index, exc)
            finally:
                self.open = False

    def answer(self, response: discovery_pb2.DiscoveryResponse
               ) -> list[discovery_pb2.DiscoveryRequest]:
        """The ACK of `response`, then any subscription change it implies (as our sidecar
        does: route names from the listeners, EDS names from the clusters)."""
        self.totals.responses += 1
        self.totals.last_response = time.monotonic()
        t = response.type_url
        state = self.types[t]
        state.version, state.nonce, state.received = (response.version_info, response.nonce,
                                                       True)
        follow: list[discovery_pb2.DiscoveryRequest] = []
        if t == LDS:
            listeners = [listener_pb2.Listener.FromString(a.value) for a in response.resources]
            follow = self._subscribe(RDS, route_names(listeners))
        elif t == CDS:
            clusters = [cluster_pb2.Cluster.FromString(a.value) for a in response.resources]
            follow = self._subscribe(EDS, eds_names(clusters))
        ack = discovery_pb2.DiscoveryRequest(
            type_url=t, version_info=state.version, response_nonce=state.nonce,
            resource_names=sorted(state.names) if t in (RDS, EDS) else [])
        return [ack, *follow]

    def _subscribe(self, t: str, names: frozenset[str]) -> list[discovery_pb2.DiscoveryRequest]:
        state = self.types[t]
        if names == state.names:
            return []
        state.names = names
        return [discovery_pb2.DiscoveryRequest(type_url=t, version_info=state.version,
                                               response_nonce=state.nonce,
                                               resource_names=sorted(names))]

    def note_ack(self, response: discovery_pb2.DiscoveryResponse, now: float) -> None:
        marker = self.totals.marker
        t = response.type_url
        if (marker and t in WATCHED and t not in self.acked
                and any(marker in a.value for a in response.resources)):
            self.acked[t] = now


class Clients:
    def __init__(self, target: str, first: int, count: int, services: int) -> None:
        self.target = target
        self.totals = Totals()
        self.streams = [SimStream(i, node_for(i, services), self.totals)
                        for i in range(first, first + count)]
        self.tasks: list[asyncio.Task[None]] = []

    def open(self, count: int) -> int:
        """Start the next `count` streams; returns how many are started in all."""
        for s in self.streams[len(self.tasks):len(self.tasks) + count]:
            self.tasks.append(asyncio.create_task(s.run(self.target), name=f"stream-{s.index}"))
        return len(self.tasks)

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def handle(self, command: dict[str, Any]) -> dict[str, Any]:
        cmd = command.get("cmd")
        if cmd == "open":
            return {"started": self.open(int(command["count"]))}
        if cmd == "status":
            return {"streams": len(self.streams), "started": len(self.tasks),
                    "open": sum(1 for s in self.streams if s.open),
                    "configured": sum(1 for s in self.streams if s.configured),
                    "responses": self.totals.responses,
                    "last_response": self.totals.last_response,
                    "errors": self.totals.errors, "last_error": self.totals.last_error}
        if cmd == "watch":
            self.totals.marker = str(command["marker"]).encode()
            for s in self.streams:
                s.watch()
            return {"ok": True}
        if cmd == "results":
            done = [s.done_at() for s in self.streams]
            reply: dict[str, Any] = {"done": sum(1 for d in done if d is not None),
                                     "errors": self.totals.errors,
                                     "last_error": self.totals.last_error}
            if command.get("full"):
                reply["streams"] = [{"done": d, **{k: s.acked.get(t) for k, t in
                                                   (("rds", RDS), ("cds", CDS), ("eds", EDS))}}
                                    for s, d in zip(self.streams, done, strict=True)]
            return reply
        return {"error": f"unknown command {cmd!r}"}


async def serve(args: argparse.Namespace) -> int:
    clients = Clients(args.control_plane, args.first, args.count, args.services)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while True:
            line = await reader.readline()
            if not line:  # the harness is gone
                return 1
            try:
                command = json.loads(line)
            except ValueError:
                reply: dict[str, Any] = {"error": f"not JSON: {line[:80]!r}"}
            else:
                if command.get("cmd") == "quit":
                    await clients.stop()
                    _reply({"bye": True})
                    return 0
                reply = clients.handle(command)
            _reply(reply)
    finally:
        await clients.stop()


def _reply(doc: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.push_clients", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--control-plane", required=True, metavar="HOST:PORT")
    p.add_argument("--first", type=int, default=0, help="index of this process's first stream")
    p.add_argument("--count", type=int, required=True, help="streams in this process")
    p.add_argument("--services", type=int, default=10,
                   help="stream i is a sidecar of service svc-(i mod SERVICES)")
    args = p.parse_args(argv)
    if args.count < 1 or args.services < 1 or args.first < 0:
        p.error("--count and --services must be positive, --first not negative")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(serve(args))
    return 1


if __name__ == "__main__":
    sys.exit(main())
