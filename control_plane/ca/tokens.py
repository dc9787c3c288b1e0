"""Bootstrap tokens: what a workload shows the CA to get a certificate for a service name.

A token is 256 random bits (`pmt_` + 43 base64url characters). The control plane keeps only
its SHA-256 (a stolen state file or KV dump gives no usable token), the service names it may
claim, when it expires and whether it was revoked; its public id is the first 16 hex digits
of that hash. The token itself is shown once, by `meshctl token create`.

Sidecars present their token at every renewal, so a token lives as long as the workloads
that use it (720 h by default, or without expiry); revoking it stops renewals at once, and
the certificates already issued run out within the workload TTL.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from control_plane.ca.errors import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from control_plane.ca.spiffe import SERVICE_NAME
from control_plane.ca.state import TOKENS, StateBackend

PREFIX = "pmt_"
SECRET_BYTES = 32  # 256 bits
ID_HEX = 16
DEFAULT_TTL = 720 * 3600.0
MAX_TTL = 10 * 365 * 86400.0
MAX_SERVICES = 64
MAX_DESCRIPTION = 200
MAX_TOKEN_CHARS = 256
PRUNE_AFTER = 30 * 86400.0  # expired or revoked tokens stay listed this long, then go
MAX_WRITE_ATTEMPTS = 8
FORMAT_VERSION = 1

ACTIVE, EXPIRED, REVOKED = "active", "expired", "revoked"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class TokenRecord:
    id: str
    sha256: str
    services: tuple[str, ...]
    created: float
    expires: float | None  # None: never
    revoked: float | None = None
    description: str = ""

    def status(self, now: float) -> str:
        if self.revoked is not None:
            return REVOKED
        if self.expires is not None and self.expires <= now:
            return EXPIRED
        return ACTIVE

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "sha256": self.sha256, "services": list(self.services),
                "created": self.created, "expires": self.expires, "revoked": self.revoked,
                "description": self.description}


def check_request(services: Sequence[str], ttl: float | None,
                  description: str) -> tuple[tuple[str, ...], str]:
    """The services (sorted, each once) and description of a new token, or InvalidArgument
    naming every bad field."""
    problems: list[tuple[str, str]] = []
    if not services:
        problems.append(("services", "at least one service name is required"))
    if len(services) > MAX_SERVICES:
        problems.append(("services", f"at most {MAX_SERVICES} services per token"))
    for i, name in enumerate(services):
        if not SERVICE_NAME.fullmatch(name):
            problems.append((f"services[{i}]", f"invalid service name {name!r}: 1-63 letters, "
                             "digits, '.', '_' or '-', starting and ending with a letter or "
                             "digit"))
    if ttl is not None and not 0 < ttl <= MAX_TTL:
        problems.append(("ttl", f"must be positive and at most {MAX_TTL / 3600:.0f}h "
                                "(or zero: never expires)"))
    if len(description) > MAX_DESCRIPTION:
        problems.append(("description", f"at most {MAX_DESCRIPTION} characters"))
    if not description.isprintable():
        problems.append(("description", "must be printable text on one line"))
    if problems:
        raise InvalidArgument("invalid token request: " + "; ".join(f"{f}: {d}"
                                                                    for f, d in problems),
                              problems)
    return tuple(sorted(set(services))), description


def _parse(data: bytes | None) -> list[TokenRecord]:
    if data is None:
        return []
    try:
        doc = json.loads(data)
        if doc.get("version") != FORMAT_VERSION:
            raise ValueError(f"unknown format version {doc.get('version')!r}")
        return [TokenRecord(str(t["id"]), str(t["sha256"]), tuple(t["services"]),
                            float(t["created"]),
                            None if t.get("expires") is None else float(t["expires"]),
                            None if t.get("revoked") is None else float(t["revoked"]),
                            str(t.get("description", "")))
                for t in doc["tokens"]]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        # never read as "no tokens" and then overwritten: that would lose every token
        raise Unavailable(f"the token store is damaged: {e}") from None


def _serialize(records: Iterable[TokenRecord]) -> bytes:
    return json.dumps({"version": FORMAT_VERSION, "tokens": [r.to_json() for r in records]},
                      indent=1, sort_keys=True).encode() + b"\n"


class TokenStore:
    """Create, list, revoke and check tokens over a StateBackend (read on every use, so a
    token created or revoked through one control-plane replica counts on every other at
    once). Synchronous: the API calls it from a thread."""

    def __init__(self, state: StateBackend, *, clock: Callable[[], float] = time.time,
                 random_bytes: Callable[[int], bytes] = os.urandom) -> None:
        self._state = state
        self._clock = clock
        self._random = random_bytes

    def _update(self, change: Callable[[list[TokenRecord], float], list[TokenRecord]]
                ) -> list[TokenRecord]:
        for _ in range(MAX_WRITE_ATTEMPTS):
            data, version = self._state.read(TOKENS)
            now = self._clock()
            records = change(_parse(data), now)
            kept = [r for r in records if not _prunable(r, now)]
            if self._state.write(TOKENS, _serialize(kept), version):
                return kept
        raise Unavailable("the token store kept changing under this write (other control "
                          "planes are writing): try again")

    def create(self, services: Sequence[str], ttl: float | None = DEFAULT_TTL,
               description: str = "") -> tuple[str, TokenRecord]:
        """A new token (returned once, here) and its record. ttl None: never expires."""
        names, description = check_request(services, ttl, description)
        made: list[tuple[str, TokenRecord]] = []

        def add(records: list[TokenRecord], now: float) -> list[TokenRecord]:
            taken = {r.id for r in records}
            while True:
                secret = PREFIX + base64.urlsafe_b64encode(
                    self._random(SECRET_BYTES)).rstrip(b"=").decode()
                digest = token_hash(secret)
                if digest[:ID_HEX] not in taken:
                    break
            record = TokenRecord(digest[:ID_HEX], digest, names, now,
                                 None if ttl is None else now + ttl, None, description)
            made[:] = [(secret, record)]
            return [*records, record]

        self._update(add)
        return made[0]

    def list(self) -> list[TokenRecord]:
        data, _ = self._state.read(TOKENS)
        now = self._clock()
        return sorted((r for r in _parse(data) if not _prunable(r, now)),
                      key=lambda r: (r.created, r.id))

    def revoke(self, token_id: str) -> TokenRecord:
        """Revoke a token by id (revoking it again keeps the first revocation time)."""
        token_id = token_id.strip().lower()
        found: list[TokenRecord] = []

        def mark(records: list[TokenRecord], now: float) -> list[TokenRecord]:
            out = []
            for r in records:
                if r.id == token_id:
                    r = r if r.revoked is not None else replace(r, revoked=now)
                    found[:] = [r]
                out.append(r)
            if not found:
                raise NotFound(f"no token {token_id!r} (see `meshctl token list`)")
            return out

        self._update(mark)
        return found[0]

    def authenticate(self, token: str | None) -> TokenRecord:
        """The record of a usable token. Unauthenticated when it is missing, unknown or
        expired; PermissionDenied when it was revoked (a known caller told no)."""
        if not token:
            raise Unauthenticated("missing bootstrap token: send `authorization: Bearer "
                                  "<token>` metadata (create one with `meshctl token create`)")
        if len(token) > MAX_TOKEN_CHARS:
            raise Unauthenticated("unknown bootstrap token")
        digest = token_hash(token)
        data, _ = self._state.read(TOKENS)
        now = self._clock()
        for record in _parse(data):
            if record.sha256 == digest:
                if record.revoked is not None:
                    raise PermissionDenied(f"bootstrap token {record.id} was revoked at "
                                           f"{_iso(record.revoked)}")
                if record.expires is not None and record.expires <= now:
                    raise Unauthenticated(f"bootstrap token {record.id} expired at "
                                          f"{_iso(record.expires)}")
                return record
        raise Unauthenticated("unknown bootstrap token")


def _prunable(record: TokenRecord, now: float) -> bool:
    ended = record.revoked if record.revoked is not None else record.expires
    return ended is not None and ended + PRUNE_AFTER <= now
