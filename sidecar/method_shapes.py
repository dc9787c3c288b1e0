"""Learn which methods are unary, so their calls can take the cheaper unary-unary shape.

The stream-stream shape is correct for every method but costs more grpc-core work per call.
The unary shape is only correct for methods that really are unary (through it, client
streaming loses messages and server streaming hangs), so a method takes it only when we know:
from config, or from the upstream's own server reflection service, asked once per gRPC service
in the background. Anything unknown stays on the stream-stream shape.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable

import grpc
from google.protobuf import descriptor_pb2
from google.protobuf.message import DecodeError
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

log = logging.getLogger(__name__)

_RETRY_AFTER = 60.0  # seconds before asking again a service whose reflection failed
_MAX_SERVICES = 1024


class MethodShapes:
    """The set of unary method paths, replaced (never mutated) when it grows."""

    def __init__(self, unary: Iterable[str] = (), learn: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.unary: frozenset[str] = frozenset(unary)
        self._learn = learn
        self._clock = clock
        self._asked: dict[str, float] = {}  # gRPC service -> when we last asked
        self._tasks: set[asyncio.Task[None]] = set()

    def should_ask(self, service: str) -> bool:
        if not self._learn:
            return False
        asked = self._asked.get(service)
        if asked is not None and self._clock() - asked < _RETRY_AFTER:
            return False
        if asked is None and len(self._asked) >= _MAX_SERVICES:
            return False
        self._asked[service] = self._clock()
        return True

    def learn_from(self, service: str, channel: grpc.aio.Channel, timeout: float = 5.0) -> None:
        """Ask `channel`'s reflection service about `service` in the background."""
        task = asyncio.get_running_loop().create_task(self._ask(service, channel, timeout))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def add(self, methods: Iterable[str]) -> None:
        new = self.unary.union(methods)
        if new != self.unary:
            self.unary = new

    async def _ask(self, service: str, channel: grpc.aio.Channel, timeout: float) -> None:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(file_containing_symbol=service)
        try:
            responses = [r async for r in stub.ServerReflectionInfo(iter([request]),
                                                                    timeout=timeout)]
            files = [descriptor_pb2.FileDescriptorProto.FromString(raw)
                     for response in responses if response is not None
                     for raw in response.file_descriptor_response.file_descriptor_proto]
        except (grpc.RpcError, DecodeError) as err:
            # No reflection (or something else answering that method): stay on the stream shape.
            log.debug("reflection for %s unavailable: %s", service, err)
            return
        self.add(unary_methods_of(service, files))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def unary_methods_of(service: str,
                     files: Iterable[descriptor_pb2.FileDescriptorProto]) -> list[str]:
    """The "/pkg.Service/Method" paths of `service`'s unary methods found in `files`."""
    found: list[str] = []
    for fd in files:
        for svc in fd.service:
            full = f"{fd.package}.{svc.name}" if fd.package else svc.name
            if full != service:
                continue
            found.extend(f"/{full}/{m.name}" for m in svc.method
                         if not m.client_streaming and not m.server_streaming)
    return found
