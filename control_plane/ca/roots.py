"""The set of roots a mesh trusts, and which one signs: pure, the time is a parameter.

A root is trusted from when it is added until its `retire_at` (none while it may still sign).
The signer is the newest root holding a key whose `sign_from` has come. A rotation adds a
root that signs from `sign_from` on (at once, or after a delay that lets every sidecar get
the new bundle first) and retires every older root once the last certificate it can have
signed has expired: `sign_from + max_ttl + RETIRE_MARGIN`. So during a rotation the bundle
holds two roots, and no workload ever holds a certificate its peers cannot verify.

Stored form (the "root" state document, JSON):
    {"version": 1, "max_ttl": seconds,
     "roots": [{"certificates": PEM (the CA cert, then its chain to the anchor),
                "key": PEM | null, "operator": bool, "sign_from": unix s,
                "retire_at": unix s | null}, ...]}      # oldest first
An operator's root (--ca-cert/--ca-key) is stored without its key (the key stays in the
operator's file) so that the next root can keep it trusted while its certificates run out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

from cryptography import x509

from control_plane.ca import certs as c

FORMAT_VERSION = 1
RETIRE_MARGIN = 300.0  # beyond the longest workload TTL: clock skew and renewal retries

ACTIVE, PENDING, RETIRING, INACTIVE = "active", "pending", "retiring", "inactive"


@dataclass(frozen=True, slots=True)
class Root:
    certs: tuple[x509.Certificate, ...]  # the CA certificate, then its chain to the anchor
    key: c.SigningKey | None  # None: trusted only (its key is gone, or is the operator's)
    sign_from: float
    retire_at: float | None = None
    operator: bool = False

    @property
    def cert(self) -> x509.Certificate:
        return self.certs[0]

    @property
    def anchor(self) -> x509.Certificate:
        return self.certs[-1]

    @property
    def fingerprint(self) -> str:
        return c.fingerprint(self.cert)

    def pair(self) -> c.CaPair:
        if self.key is None:
            raise ValueError("this root has no key")
        return c.CaPair(self.cert, self.key, self.certs[1:-1], self.anchor)


@dataclass(frozen=True, slots=True)
class RootSet:
    roots: tuple[Root, ...] = ()  # oldest first
    max_ttl: float = 0.0  # the longest workload TTL the CA has been configured with

    def signer(self, now: float) -> Root | None:
        """The newest root whose time to sign has come, if this process holds its key (an
        older root never signs again, even while it is still trusted)."""
        for root in reversed(self.roots):
            if root.sign_from <= now and not _retired(root, now):
                return root if root.key is not None else None
        return None

    def current(self, now: float) -> RootSet:
        """Without retired roots, and without the keys of roots that can never sign again
        (older than the newest root whose time to sign has come)."""
        started = [r for r in self.roots if r.sign_from <= now and not _retired(r, now)]
        newest = started[-1] if started else None
        kept: list[Root] = []
        older = newest is not None
        for root in self.roots:
            if root is newest:
                older = False
            if _retired(root, now):
                continue
            if older and root.key is not None:
                root = replace(root, key=None)
            kept.append(root)
        return replace(self, roots=tuple(kept))

    def trusted(self, now: float) -> tuple[Root, ...]:
        return tuple(r for r in self.roots if not _retired(r, now))

    def bundle(self, now: float) -> tuple[x509.Certificate, ...]:
        """The anchors to trust, the signer's first, each once."""
        signer = self.signer(now)
        ordered = [signer] if signer is not None else []
        ordered += [r for r in reversed(self.trusted(now)) if r is not signer]
        seen: set[str] = set()
        out: list[x509.Certificate] = []
        for root in ordered:
            fp = c.fingerprint(root.anchor)
            if fp not in seen:
                seen.add(fp)
                out.append(root.anchor)
        return tuple(out)

    def state_of(self, root: Root, now: float) -> str:
        if _retired(root, now):
            return INACTIVE
        if root is self.signer(now):
            return ACTIVE
        if root.key is not None and root.sign_from > now:
            return PENDING
        return RETIRING

    def rotate(self, new: Root, now: float, ttl: float) -> RootSet:
        """Add `new` (signing from new.sign_from) and retire every other root once what it
        can still sign has expired."""
        max_ttl = max(self.max_ttl, ttl)
        retire = max(new.sign_from, now) + max_ttl + RETIRE_MARGIN
        kept = tuple(replace(r, retire_at=retire if r.retire_at is None
                             else min(r.retire_at, retire))
                     for r in self.current(now).roots)
        return RootSet((*kept, new), max_ttl).current(now)

    def with_max_ttl(self, ttl: float) -> RootSet:
        return replace(self, max_ttl=max(self.max_ttl, ttl))

    # --- stored form -------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        roots = [{"certificates": "".join(c.pem(x) for x in r.certs),
                  "key": None if r.key is None or r.operator else c.key_pem(r.key),
                  "operator": r.operator, "sign_from": r.sign_from, "retire_at": r.retire_at}
                 for r in self.roots]
        return json.dumps({"version": FORMAT_VERSION, "max_ttl": self.max_ttl, "roots": roots},
                          indent=1, sort_keys=True).encode() + b"\n"


def _retired(root: Root, now: float) -> bool:
    return root.retire_at is not None and root.retire_at <= now


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise c.CaConfigError(f"{what}: expected a number")
    return float(value)


def from_bytes(data: bytes, what: str = "the CA state") -> RootSet:
    """The stored form back; a damaged document is a CaConfigError (never taken as empty,
    which would silently replace the mesh's root)."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise c.CaConfigError(f"{what} is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("version") != FORMAT_VERSION \
            or not isinstance(doc.get("roots"), list):
        raise c.CaConfigError(f"{what} is not a pymesh CA document (version {FORMAT_VERSION})")
    roots: list[Root] = []
    for i, entry in enumerate(doc["roots"]):
        where = f"{what}: roots[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("certificates"), str):
            raise c.CaConfigError(f"{where}: expected an object with certificates")
        certs = c.load_certificates(entry["certificates"].encode(), where)
        key = None
        if entry.get("key") is not None:
            if not isinstance(entry["key"], str):
                raise c.CaConfigError(f"{where}: key must be a PEM string")
            key = c.load_private_key(entry["key"].encode(), where)
        retire = entry.get("retire_at")
        roots.append(Root(tuple(certs), key, _number(entry.get("sign_from"), where),
                          None if retire is None else _number(retire, where),
                          bool(entry.get("operator", False))))
    return RootSet(tuple(roots), _number(doc.get("max_ttl", 0), what))
