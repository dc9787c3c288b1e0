"""The mesh's certificate authority: which roots are trusted, which signs, and issuance.

Roots come from the "root" state document (state dir or Consul KV), created at first use
with a generated root, or from the operator (--ca-cert/--ca-key). The document is read on
every use so that control-plane replicas sharing Consul agree on the roots at once; when
Consul does not answer, the last roots read are used (signing needs no write). Any change
(first root, rotation, a new operator root) is one check-and-set write, retried on a lost race.

Synchronous: the API calls it from a thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509

from control_plane.ca import certs as c
from control_plane.ca.errors import (
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    Unavailable,
)
from control_plane.ca.roots import Root, RootSet, from_bytes
from control_plane.ca.state import ROOT, StateBackend
from control_plane.ca.tokens import TokenRecord

log = logging.getLogger(__name__)

DEFAULT_TTL = 24 * 3600.0
MIN_TTL = 60.0
MAX_TTL = 90 * 86400.0
MAX_ACTIVATE_AFTER = 7 * 86400.0
MAX_WRITE_ATTEMPTS = 8

TrustDomain = Callable[[], str | None]  # None: not known yet (policies not read)


def check_ttl(ttl: float) -> float:
    """A workload TTL the CA accepts (ValueError otherwise, for flag parsing)."""
    if not MIN_TTL <= ttl <= MAX_TTL:
        raise ValueError(f"the workload certificate TTL must be between 1m and "
                         f"{MAX_TTL / 3600:.0f}h, got {ttl:g}s")
    return ttl


def load_operator_ca(cert_file: str, key_file: str, now: float | None = None) -> c.CaPair:
    """The operator's CA from --ca-cert (the CA certificate, then optionally its chain up to
    a self-signed root) and --ca-key (its unencrypted PEM key); CaConfigError says what is
    wrong with them."""
    def read(path: str, what: str) -> bytes:
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as e:
            raise c.CaConfigError(f"{what} {path}: {e.strerror or e}") from None

    certs = c.load_certificates(read(cert_file, "--ca-cert"), f"--ca-cert {cert_file}")
    key = c.load_private_key(read(key_file, "--ca-key"), f"--ca-key {key_file}")
    return c.ca_pair(certs, key, time.time() if now is None else now,
                     f"--ca-cert {cert_file} / --ca-key {key_file}")


@dataclass(frozen=True, slots=True)
class Issued:
    certificate_pem: str  # the workload certificate, then any intermediates
    trust_bundle: tuple[str, ...]
    not_before: float
    not_after: float
    spiffe_id: str
    service: str
    serial: int


@dataclass(frozen=True, slots=True)
class RootView:
    certificate_pem: str
    subject: str
    fingerprint: str
    not_before: float
    not_after: float
    state: str
    sign_from: float
    retire_at: float | None


@dataclass(frozen=True, slots=True)
class CaView:
    roots: tuple[RootView, ...]  # active, pending, retiring
    trust_domain: str
    ttl: float
    source: str


class CertificateAuthority:
    def __init__(self, state: StateBackend, *, trust_domain: TrustDomain,
                 ttl: float = DEFAULT_TTL, operator: c.CaPair | None = None,
                 clock: Callable[[], float] = time.time,
                 generate: Callable[[float], tuple[x509.Certificate, c.SigningKey]] =
                 c.generate_root) -> None:
        self._state = state
        self._trust_domain = trust_domain
        self.ttl = check_ttl(ttl)
        self._operator = operator
        self._clock = clock
        self._generate = generate
        self._lock = threading.Lock()
        self._cache: tuple[bytes, RootSet] | None = None  # last document read, parsed
        self._last: RootSet | None = None  # last roots in force (used while Consul is down)
        self.issued = 0  # certificates signed by this process (for metrics and tests)
        self._listeners: list[Callable[[tuple[str, ...]], None]] = []
        self._bundle_seen: tuple[str, ...] = ()

    @property
    def source(self) -> str:
        return "operator" if self._operator is not None else self._state.source

    def start(self) -> None:
        """Create or adopt the roots now rather than at the first request, so a bad state or
        an unusable operator root stops the control plane at start. Consul being down is not
        fatal: the CA then answers UNAVAILABLE until it is back."""
        try:
            self.roots()
        except Unavailable as e:
            log.warning("certificate authority: roots not loaded yet: %s", e)

    # --- roots -------------------------------------------------------------------------------
    def _parse(self, data: bytes) -> RootSet:
        if self._cache is not None and self._cache[0] == data:
            return self._cache[1]
        parsed = from_bytes(data, f"the CA state ({self._state.source})")
        self._cache = (data, parsed)
        return parsed

    def _with_operator_key(self, roots: RootSet) -> RootSet:
        """The stored document never holds the operator's key: put it back in memory."""
        op = self._operator
        if op is None:
            return roots
        fp = c.fingerprint(op.cert)
        return RootSet(tuple(Root(r.certs, op.key, r.sign_from, r.retire_at, True)
                             if r.operator and r.fingerprint == fp else r for r in roots.roots),
                       roots.max_ttl)

    def _wanted(self, roots: RootSet, now: float) -> RootSet | None:
        """The document to write before this CA can work, or None if it can as it is."""
        signer = roots.signer(now)
        op = self._operator
        if op is not None:
            if signer is None or c.fingerprint(signer.cert) != c.fingerprint(op.cert):
                new = Root((op.cert, *op.chain, op.anchor) if op.anchor is not op.cert
                           else (op.cert,), op.key, now, None, True)
                log.info("certificate authority: adopting the operator's root %s",
                         op.cert.subject.rfc4514_string())
                return roots.rotate(new, now, self.ttl)
        elif signer is None:
            cert, key = self._generate(now)
            log.info("certificate authority: generated a root %s (%s)",
                     cert.subject.rfc4514_string(), c.fingerprint(cert)[:16])
            return roots.rotate(Root((cert,), key, now), now, self.ttl)
        if roots.max_ttl < self.ttl:
            return roots.with_max_ttl(self.ttl)
        return None

    def roots(self) -> RootSet:
        """The roots in force now (creating the first one if there is none)."""
        with self._lock:
            current = self._read_roots()
        self._notify_if_changed(current)
        return current

    def _read_roots(self) -> RootSet:
        for _ in range(MAX_WRITE_ATTEMPTS):
            now = self._clock()
            try:
                data, version = self._state.read(ROOT)
            except Unavailable:
                if self._last is not None:
                    return self._last.current(now)
                raise
            stored = self._with_operator_key(self._parse(data) if data is not None
                                             else RootSet())
            wanted = self._wanted(stored, now)
            if wanted is None:
                self._last = stored
                return stored.current(now)
            if self._state.write(ROOT, wanted.to_bytes(), version):
                self._last = wanted
                return wanted.current(now)
        raise Unavailable("the CA state kept changing under this write (other control "
                          "planes are writing): try again")

    def on_change(self, callback: Callable[[tuple[str, ...]], None]) -> None:
        """Call `callback(trust bundle PEMs)` whenever this CA notices the bundle changed: a
        rotation (here or by another replica, seen at the next read), a root retired by time.
        The control plane reads the bundle periodically (any call reads it) to notice both."""
        self._listeners.append(callback)

    def _notify_if_changed(self, roots: RootSet) -> None:
        anchors = roots.bundle(self._clock())
        fingerprints = tuple(c.fingerprint(a) for a in anchors)
        with self._lock:
            if fingerprints == self._bundle_seen:
                return
            self._bundle_seen = fingerprints
        bundle = tuple(c.pem(a) for a in anchors)
        for callback in list(self._listeners):
            try:
                callback(bundle)
            except Exception:
                log.exception("certificate authority: trust bundle listener failed")

    def trust_bundle(self) -> tuple[str, ...]:
        return tuple(c.pem(a) for a in self.roots().bundle(self._clock()))

    def trust_domain(self) -> str:
        domain = self._trust_domain()
        if domain is None:
            raise Unavailable("the trust domain is not known yet (the policies have not been "
                              "read): try again")
        return domain

    # --- issuance ----------------------------------------------------------------------------
    def sign(self, csr_pem: str, token: TokenRecord) -> Issued:
        """A workload certificate for a CSR presented with an authenticated token, checked in
        the contract's order: CSR signature, the identity it asks for, then whether the token
        may claim that service. Nothing is issued on any failure."""
        try:
            csr = c.parse_csr(csr_pem)
        except c.CsrError as e:
            raise InvalidArgument(str(e), [("csr_pem", str(e))]) from None
        domain = self.trust_domain()
        try:
            checked = c.check_csr(csr, domain)
        except c.CsrError as e:
            raise InvalidArgument(str(e), [("csr_pem", str(e))]) from None
        if checked.service not in token.services:
            raise PermissionDenied(f"bootstrap token {token.id} may not claim service "
                                   f"{checked.service!r} (it allows: "
                                   f"{', '.join(token.services)})")
        roots = self.roots()
        now = self._clock()
        signer = roots.signer(now)
        if signer is None:  # roots() guarantees one; a clock jump could still get here
            raise Unavailable("the CA has no root that can sign now: try again")
        pair = signer.pair()
        cert = c.issue(pair, checked, now, self.ttl)
        chain = "".join(c.pem(x) for x in pair.intermediates)
        issued = Issued(c.pem(cert) + chain, tuple(c.pem(a) for a in roots.bundle(now)),
                        c.seconds(cert.not_valid_before_utc), c.seconds(cert.not_valid_after_utc),
                        checked.spiffe_id, checked.service, cert.serial_number)
        with self._lock:
            self.issued += 1
        log.info("certificate authority: issued %s (serial %x, token %s) valid until %s",
                 checked.spiffe_id, cert.serial_number, token.id,
                 cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"))
        return issued

    # --- operations --------------------------------------------------------------------------
    def rotate(self, activate_after: float = 0.0) -> CaView:
        """Add a generated root that signs from `activate_after` seconds on."""
        if self._operator is not None:
            raise FailedPrecondition(
                "the root is supplied by the operator (--ca-cert/--ca-key): to rotate, restart "
                "the control plane with the new certificate and key; the previous root stays "
                "trusted until the certificates it signed have expired")
        if not 0 <= activate_after <= MAX_ACTIVATE_AFTER:
            message = f"activate_after must be between 0 and {MAX_ACTIVATE_AFTER / 3600:.0f}h"
            raise InvalidArgument(message, [("activate_after", message)])
        with self._lock:
            for _ in range(MAX_WRITE_ATTEMPTS):
                data, version = self._state.read(ROOT)
                now = self._clock()
                stored = self._parse(data) if data is not None else RootSet()
                cert, key = self._generate(now)
                rotated = stored.rotate(Root((cert,), key, now + activate_after), now, self.ttl)
                if self._state.write(ROOT, rotated.to_bytes(), version):
                    self._last = rotated
                    log.info("certificate authority: new root %s (%s) signs from %s",
                             cert.subject.rfc4514_string(), c.fingerprint(cert)[:16],
                             time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                           time.gmtime(now + activate_after)))
                    break
            else:
                raise Unavailable("the CA state kept changing under this rotation: try again")
        return self.view()  # reads the roots again, which tells the listeners

    def view(self) -> CaView:
        roots = self.roots()
        now = self._clock()
        order = {"active": 0, "pending": 1, "retiring": 2}
        views = [RootView("".join(c.pem(x) for x in r.certs), r.cert.subject.rfc4514_string(),
                          c.fingerprint(r.cert),
                          c.seconds(r.cert.not_valid_before_utc),
                          c.seconds(r.cert.not_valid_after_utc), roots.state_of(r, now),
                          r.sign_from, r.retire_at)
                 for r in roots.trusted(now)]
        views.sort(key=lambda v: (order.get(v.state, 3), -v.sign_from))
        return CaView(tuple(views), self._trust_domain() or "", self.ttl, self.source)
