"""A raw HTTP/2 client (the `h2` package) for what grpcio hides: which frames a response is
made of (trailers-only or not), and exactly which headers arrive."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events


@dataclass
class RawResponse:
    header_blocks: list[list[tuple[str, str]]] = field(default_factory=list)
    data: bytes = b""
    ended: bool = False
    reset_code: int | None = None

    @property
    def trailers_only(self) -> bool:
        """One HEADERS block that ended the stream and carries grpc-status, and no data."""
        return (len(self.header_blocks) == 1 and not self.data
                and any(k == "grpc-status" for k, _ in self.header_blocks[0]))

    def header(self, name: str) -> str | None:
        for block in self.header_blocks:
            for k, v in block:
                if k == name:
                    return v
        return None


def grpc_frame(message: bytes) -> bytes:
    return b"\x00" + struct.pack(">I", len(message)) + message


def call(address: str, path: str, message: bytes = b"", headers: list[tuple[str, str]] = (),
         timeout: float = 5.0) -> RawResponse:
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                                header_encoding="utf-8"))
    conn.initiate_connection()
    stream_id = conn.get_next_available_stream_id()
    conn.send_headers(stream_id, [(":method", "POST"), (":scheme", "http"), (":path", path),
                                  (":authority", address), ("te", "trailers"),
                                  ("content-type", "application/grpc"), *headers])
    conn.send_data(stream_id, grpc_frame(message), end_stream=True)
    sock.sendall(conn.data_to_send())
    response = RawResponse()
    try:
        while not (response.ended or response.reset_code is not None):
            chunk = sock.recv(65536)
            if not chunk:
                break
            for event in conn.receive_data(chunk):
                if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                    response.header_blocks.append(list(event.headers))
                elif isinstance(event, h2.events.DataReceived):
                    response.data += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    response.ended = True
                elif isinstance(event, h2.events.StreamReset):
                    response.reset_code = event.error_code
            sock.sendall(conn.data_to_send())
    finally:
        sock.close()
    return response
