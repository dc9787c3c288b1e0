"""Small real gRPC servers for component tests (sync grpcio, threads, 127.0.0.1:0)."""

from __future__ import annotations

import threading
from concurrent import futures

import grpc


class IdentityServer:
    """Answers any unary method with its own name, so a test can see which instance served.

    Counts calls per method; the metadata of the last call is kept for inspection.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls = 0
        self.last_metadata: dict[str, str | bytes] = {}
        self._lock = threading.Lock()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=8),
                                   options=[("grpc.so_reuseport", 0)])
        self._server.add_generic_rpc_handlers((self,))
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{self.port}"
        self._server.start()

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(self._answer)

    def _answer(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        with self._lock:
            self.calls += 1
            self.last_metadata = dict(context.invocation_metadata())
        return self.name.encode()

    def stop(self) -> None:
        self._server.stop(0)


def call_raw(target: str, method: str, payload: bytes = b"", metadata=(), timeout: float = 5.0,
             channel: grpc.Channel | None = None) -> bytes:
    if channel is not None:
        return channel.unary_unary(method)(payload, metadata=metadata, timeout=timeout)
    with grpc.insecure_channel(target) as ch:
        return ch.unary_unary(method)(payload, metadata=metadata, timeout=timeout)
