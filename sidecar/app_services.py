"""Which gRPC services the local app serves, for announcing the instance to the control plane.

Flags win; otherwise the app's own server reflection service is asked (most gRPC servers
enable it, and the demo services do). Infrastructure services (health, reflection) are not
announced: every app has them and no route should send them elsewhere.
"""

from __future__ import annotations

import logging

import grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

log = logging.getLogger(__name__)

_NOT_ANNOUNCED = ("grpc.health.", "grpc.reflection.")


async def discover(app: str, timeout: float = 3.0) -> tuple[str, ...]:
    """The app's gRPC services by reflection; () if it has no reflection or does not answer."""
    async with grpc.aio.insecure_channel(app) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        try:
            async for response in stub.ServerReflectionInfo(iter([request]), timeout=timeout):
                names = [s.name for s in response.list_services_response.service]
                return tuple(sorted(n for n in names if not n.startswith(_NOT_ANNOUNCED)))
        except grpc.RpcError as err:
            log.warning("could not list the app's gRPC services by reflection (%s); "
                        "announce them with --grpc-service", err.code())
    return ()
