"""Per-message compression as seen by a peer that asked the core not to decompress.

grpcio never tells the application whether a message arrived compressed: the core decompresses
it and hides `grpc-encoding`. With the channel argument `grpc.per_message_decompression=0` the
core hands over the bytes as they were on the wire instead, and this module recognises and
undoes the compression. gzip bytes start with 1f 8b and zlib ("deflate" in gRPC) bytes with a
header whose first byte has low nibble 8 and whose first two bytes are a multiple of 31. The
interop messages never start like that uncompressed (0x1f is not a valid protobuf tag and 0x78
would be field 15, which none of them has), so for them the answer is exact. It cannot tell a
genuinely compressed message from gzip bytes sent with the compressed flag off.
"""

from __future__ import annotations

import contextlib
import gzip
import zlib

NO_DECOMPRESSION = ("grpc.per_message_decompression", 0)


def decode_message(data: bytes) -> tuple[bytes, bool]:
    """Return (uncompressed message bytes, whether it arrived compressed)."""
    if data[:2] == b"\x1f\x8b":
        with contextlib.suppress(OSError, EOFError, zlib.error):
            return gzip.decompress(data), True
    if len(data) >= 2 and data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0:
        with contextlib.suppress(zlib.error):
            return zlib.decompress(data), True
    return data, False
