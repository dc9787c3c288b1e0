"""mesh.v1.StatusService: what `meshctl proxy-status`, `endpoints` and `describe` show.

The servicer owns no state. It reads two injected callables at each call, so the ADS server and
the registry keep their own bookkeeping and this module only translates their plain records to
protos:

- ``proxy_status() -> Iterable[ProxyInfo]``: one record per connected ADS stream;
- ``endpoints() -> EndpointsReport``: the instances the mesh routes to, with which registry
  reported each, and each registry's health.

Times in these records are wall-clock seconds (``time.time()``), because they are shown to
people ("ACKed 3s ago") and compared across processes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

import grpc
from mesh.v1 import status_pb2, status_pb2_grpc

from control_plane.policy_api import to_timestamp
from control_plane.registry.model import Instance, RegistryView


@dataclass(frozen=True, slots=True)
class TypeStatus:
    """One xDS type on one stream, as the ADS server tracks it (docs/control-plane.md, ADS)."""

    type_url: str
    sent_version: str = ""
    sent_nonce: str = ""
    sent_at: float | None = None
    acked_version: str = ""
    acked_at: float | None = None
    nack_nonce: str = ""  # the nonce the last NACK answered
    nack_error: str = ""  # its error_detail message
    nacked_at: float | None = None
    # Policy-store revision the last sent / ACKed config was computed from (0: not tracked).
    sent_policy_revision: int = 0
    acked_policy_revision: int = 0


@dataclass(frozen=True, slots=True)
class ProxyInfo:
    """One connected ADS stream."""

    node_id: str
    service: str = ""
    instance_id: str = ""
    connected_since: float | None = None
    sidecar: bool = True  # False for a proxyless gRPC client
    types: tuple[TypeStatus, ...] = ()


@dataclass(frozen=True, slots=True)
class SourcedInstance:
    instance: Instance
    source: str  # "consul", "embedded", ...


@dataclass(frozen=True, slots=True)
class SourceHealth:
    source: str
    healthy: bool
    last_error: str = ""
    last_error_at: float | None = None


@dataclass(frozen=True, slots=True)
class EndpointsReport:
    instances: tuple[SourcedInstance, ...] = ()
    registries: tuple[SourceHealth, ...] = ()


ProxyStatusFn = Callable[[], Iterable[ProxyInfo]]
EndpointsFn = Callable[[], EndpointsReport]


class RegistrySource(Protocol):
    """The registry source contract of docs/control-plane.md, as far as status needs it."""

    @property
    def healthy(self) -> bool: ...

    @property
    def last_error(self) -> str: ...

    def view(self) -> RegistryView: ...


def registry_report(sources: Mapping[str, RegistrySource]) -> EndpointsFn:
    """An `endpoints` callable over named registry sources (e.g. {"consul": consul_source})."""

    def report() -> EndpointsReport:
        instances: list[SourcedInstance] = []
        health: list[SourceHealth] = []
        for name, source in sources.items():
            instances.extend(SourcedInstance(i, name) for i in source.view().instances)
            health.append(SourceHealth(name, bool(source.healthy), source.last_error or ""))
        return EndpointsReport(tuple(instances), tuple(health))

    return report


def proxy_to_proto(info: ProxyInfo) -> status_pb2.ProxyStatus:
    msg = status_pb2.ProxyStatus(node_id=info.node_id, service=info.service,
                                 instance_id=info.instance_id, sidecar=info.sidecar,
                                 connected_since=to_timestamp(info.connected_since))
    for t in info.types:
        msg.types.append(status_pb2.XdsTypeStatus(
            type_url=t.type_url, sent_version=t.sent_version, sent_nonce=t.sent_nonce,
            sent_at=to_timestamp(t.sent_at), acked_version=t.acked_version,
            acked_at=to_timestamp(t.acked_at), nack_nonce=t.nack_nonce, nack_error=t.nack_error,
            nacked_at=to_timestamp(t.nacked_at), sent_policy_revision=t.sent_policy_revision,
            acked_policy_revision=t.acked_policy_revision))
    return msg


def endpoints_to_proto(report: EndpointsReport, service: str = "") -> status_pb2.EndpointsResponse:
    """The report's instances (of `service`, or all when empty), ordered by service and id."""
    chosen = [s for s in report.instances if not service or s.instance.service == service]
    chosen.sort(key=lambda s: (s.instance.service, s.instance.instance_id, s.source))
    response = status_pb2.EndpointsResponse()
    for s in chosen:
        i = s.instance
        response.endpoints.append(status_pb2.Endpoint(
            service=i.service, instance_id=i.instance_id, address=i.address, port=i.port,
            version=i.version, zone=i.zone, healthy=i.healthy, source=s.source,
            grpc_services=list(i.grpc_services), sidecar=i.sidecar))
    for h in report.registries:
        response.registries.append(status_pb2.RegistryHealth(
            source=h.source, healthy=h.healthy, last_error=h.last_error,
            last_error_at=to_timestamp(h.last_error_at)))
    return response


class StatusServicer(status_pb2_grpc.StatusServiceServicer):
    """grpc.aio servicer; both callables are read on every call and must not block."""

    def __init__(self, proxy_status: ProxyStatusFn, endpoints: EndpointsFn) -> None:
        self._proxy_status = proxy_status
        self._endpoints = endpoints

    async def ProxyStatus(self, request: status_pb2.ProxyStatusRequest,
                          context: grpc.aio.ServicerContext) -> status_pb2.ProxyStatusResponse:
        proxies = sorted(self._proxy_status(), key=lambda p: p.node_id)
        return status_pb2.ProxyStatusResponse(proxies=[proxy_to_proto(p) for p in proxies])

    async def Endpoints(self, request: status_pb2.EndpointsRequest,
                        context: grpc.aio.ServicerContext) -> status_pb2.EndpointsResponse:
        return endpoints_to_proto(self._endpoints(), request.service)


def add_to_server(server: grpc.aio.Server, proxy_status: ProxyStatusFn,
                  endpoints: EndpointsFn) -> StatusServicer:
    servicer = StatusServicer(proxy_status, endpoints)
    status_pb2_grpc.add_StatusServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    return servicer
