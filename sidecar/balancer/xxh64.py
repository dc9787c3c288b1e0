"""XXH64 (seed 0 by default), written from the public xxHash specification.

Ring hash uses XXH64 because gRPC's ring_hash policy (gRFC A42) hashes both the request key
and the ring entries with it: with the same algorithm, the same endpoint keys and the same ring
sizes, a sidecar and a proxyless gRPC client build the same ring. Python's hash() is salted per
process, and hashlib has no 64-bit non-cryptographic hash, so the few lines live here.
"""

from __future__ import annotations

_P1 = 0x9E3779B185EBCA87
_P2 = 0xC2B2AE3D27D4EB4F
_P3 = 0x165667B19E3779F9
_P4 = 0x85EBCA77C2B2AE63
_P5 = 0x27D4EB2F165667C5
_M = 0xFFFFFFFFFFFFFFFF


def _round(acc: int, lane: int) -> int:
    acc = (acc + lane * _P2) & _M
    acc = ((acc << 31) | (acc >> 33)) & _M
    return (acc * _P1) & _M


def _merge(acc: int, val: int) -> int:
    acc ^= _round(0, val)
    return (acc * _P1 + _P4) & _M


def xxh64(data: bytes, seed: int = 0) -> int:
    """The 64-bit XXH64 digest of `data` as an unsigned int."""
    n = len(data)
    pos = 0
    if n >= 32:
        v1 = (seed + _P1 + _P2) & _M
        v2 = (seed + _P2) & _M
        v3 = seed & _M
        v4 = (seed - _P1) & _M
        limit = n - 32
        frombytes = int.from_bytes
        while pos <= limit:
            v1 = _round(v1, frombytes(data[pos:pos + 8], "little"))
            v2 = _round(v2, frombytes(data[pos + 8:pos + 16], "little"))
            v3 = _round(v3, frombytes(data[pos + 16:pos + 24], "little"))
            v4 = _round(v4, frombytes(data[pos + 24:pos + 32], "little"))
            pos += 32
        h = (((v1 << 1) | (v1 >> 63)) + ((v2 << 7) | (v2 >> 57))
             + ((v3 << 12) | (v3 >> 52)) + ((v4 << 18) | (v4 >> 46))) & _M
        h = _merge(h, v1)
        h = _merge(h, v2)
        h = _merge(h, v3)
        h = _merge(h, v4)
    else:
        h = (seed + _P5) & _M
    h = (h + n) & _M
    while pos + 8 <= n:
        h ^= _round(0, int.from_bytes(data[pos:pos + 8], "little"))
        h = ((((h << 27) | (h >> 37)) & _M) * _P1 + _P4) & _M
        pos += 8
    if pos + 4 <= n:
        h ^= (int.from_bytes(data[pos:pos + 4], "little") * _P1) & _M
        h = ((((h << 23) | (h >> 41)) & _M) * _P2 + _P3) & _M
        pos += 4
    while pos < n:
        h ^= (data[pos] * _P5) & _M
        h = ((((h << 11) | (h >> 53)) & _M) * _P1) & _M
        pos += 1
    h ^= h >> 33
    h = (h * _P2) & _M
    h ^= h >> 29
    h = (h * _P3) & _M
    h ^= h >> 32
    return h
