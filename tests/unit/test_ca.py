"""The certificate authority and the token store over the state dir, with a fake clock.

Certificates are checked with cryptography's own X.509 path validator (x509.verification),
not with the CA's code: what a TLS peer would accept, at the time the test says.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from control_plane.ca import (
    CaConfigError,
    CertificateAuthority,
    FailedPrecondition,
    FileState,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    TokenStore,
    Unauthenticated,
    check_ttl,
    load_operator_ca,
)
from control_plane.ca import certs as c
from control_plane.ca.roots import RETIRE_MARGIN
from control_plane.ca.tokens import PRUNE_AFTER, token_hash

DOMAIN = "pymesh.local"
T0 = 1_900_000_000.0  # 2030-03-17
HOUR = 3600.0


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def state(tmp_path: Path) -> FileState:
    return FileState(tmp_path / "state")


def make_ca(state: FileState, clock: Clock, **kwargs: object) -> CertificateAuthority:
    # a root generated at the fake time, so that it is valid at the times the tests use
    kwargs.setdefault("generate", lambda now: c.generate_root(now))
    return CertificateAuthority(state, trust_domain=lambda: DOMAIN, clock=clock,
                                **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def ca(state: FileState, clock: Clock) -> CertificateAuthority:
    return make_ca(state, clock)


@pytest.fixture
def tokens(state: FileState, clock: Clock) -> TokenStore:
    return TokenStore(state, clock=clock)


def csr_pem(uris: list[str], dns: list[str] = (), key: object | None = None,  # type: ignore[assignment]
            extra: list[x509.GeneralName] = ()) -> str:  # type: ignore[assignment]
    key = key or ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    names += [x509.DNSName(d) for d in dns]
    names += list(extra)
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ignored-by-the-ca")]))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    csr = builder.sign(key, hashes.SHA256())  # type: ignore[arg-type]
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def workload_csr(service: str = "orders", **kwargs: object) -> str:
    return csr_pem([f"spiffe://{DOMAIN}/service/{service}"], **kwargs)  # type: ignore[arg-type]


def load(text: str) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(text.encode())


def verify(cert_pem: str, bundle: tuple[str, ...] | list[str], at: float) -> list[str]:
    """The SANs of a workload certificate a TLS peer trusting `bundle` accepts at time `at`
    (raises VerificationError otherwise)."""
    chain = load(cert_pem)
    roots = [load(p)[0] for p in bundle]
    verifier = (verification.PolicyBuilder().store(verification.Store(roots))
                .time(dt.datetime.fromtimestamp(at, dt.UTC)).build_client_verifier())
    verified = verifier.verify(chain[0], chain[1:])
    return sorted(str(n.value) for n in verified.subjects or [])


def issue(ca: CertificateAuthority, tokens: TokenStore, service: str = "orders",
          allowed: tuple[str, ...] = ("orders",), csr: str | None = None):  # type: ignore[no-untyped-def]
    secret, _ = tokens.create(list(allowed))
    return ca.sign(csr or workload_csr(service), tokens.authenticate(secret))


# --- issuance ------------------------------------------------------------------------------------
def test_issued_certificate_carries_the_identity_and_verifies(
        ca: CertificateAuthority, tokens: TokenStore, clock: Clock) -> None:
    issued = issue(ca, tokens)
    cert = load(issued.certificate_pem)[0]
    assert issued.spiffe_id == f"spiffe://{DOMAIN}/service/orders"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [issued.spiffe_id]
    assert san.get_values_for_type(x509.DNSName) == [f"orders.svc.{DOMAIN}"]
    assert len(list(san)) == 2
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert "ignored-by-the-ca" not in cert.subject.rfc4514_string()
    assert verify(issued.certificate_pem, issued.trust_bundle, clock.now) == [
        f"orders.svc.{DOMAIN}", issued.spiffe_id]
    assert ca.issued == 1


def test_lifetime_is_the_ttl_backdated_one_minute(state: FileState, clock: Clock,
                                                  tokens: TokenStore) -> None:
    ca = make_ca(state, clock, ttl=10 * 60)
    issued = issue(ca, tokens)
    cert = load(issued.certificate_pem)[0]
    assert cert.not_valid_before_utc.timestamp() == pytest.approx(T0 - 60, abs=1)
    assert cert.not_valid_after_utc.timestamp() == pytest.approx(T0 + 600, abs=1)
    assert (issued.not_before, issued.not_after) == (pytest.approx(T0 - 60, abs=1),
                                                    pytest.approx(T0 + 600, abs=1))
    # a peer whose clock is 30 s behind still accepts it; after the TTL nobody does
    verify(issued.certificate_pem, issued.trust_bundle, T0 - 30)
    with pytest.raises(verification.VerificationError):
        verify(issued.certificate_pem, issued.trust_bundle, T0 + 601)


def test_default_ttl_is_24h_and_the_ttl_is_bounded(ca: CertificateAuthority,
                                                   tokens: TokenStore) -> None:
    issued = issue(ca, tokens)
    assert issued.not_after - T0 == pytest.approx(24 * HOUR, abs=1)
    assert check_ttl(60) == 60
    for bad in (30, 91 * 24 * HOUR):
        with pytest.raises(ValueError, match="TTL must be between"):
            check_ttl(bad)


def test_a_certificate_never_outlives_its_root(state: FileState, clock: Clock,
                                               tokens: TokenStore) -> None:
    ca = make_ca(state, clock, generate=lambda now: c.generate_root(now, lifetime=2 * HOUR))
    issued = issue(ca, tokens)
    root = load(issued.trust_bundle[0])[0]
    assert issued.not_after == root.not_valid_after_utc.timestamp()


def test_serials_differ(ca: CertificateAuthority, tokens: TokenStore) -> None:
    serials = {issue(ca, tokens).serial for _ in range(5)}
    assert len(serials) == 5


# --- what the CSR may ask for --------------------------------------------------------------------
@pytest.mark.parametrize(("csr", "reason"), [
    (lambda: csr_pem([]), "no subjectAltName"),
    (lambda: csr_pem([], dns=["orders.svc.pymesh.local"]), "exactly one URI SAN"),
    (lambda: csr_pem([f"spiffe://{DOMAIN}/service/orders", f"spiffe://{DOMAIN}/service/x"]),
     "exactly one URI SAN"),
    (lambda: csr_pem(["spiffe://other.example/service/orders"]), "not in this mesh's trust"),
    (lambda: csr_pem([f"spiffe://{DOMAIN}/ns/default/sa/orders"]), "not a workload identity"),
    (lambda: csr_pem([f"spiffe://{DOMAIN}/service/orders/extra"]), "invalid service name"),
    (lambda: csr_pem([f"spiffe://{DOMAIN}/service/-orders"]), "invalid service name"),
    (lambda: csr_pem(["https://orders.example/"]), "not a SPIFFE ID"),
    (lambda: workload_csr(dns=["payments.svc.pymesh.local"]), "unexpected SAN"),
    (lambda: workload_csr(extra=[x509.RFC822Name("ops@example.com")]), "unexpected SAN"),
    (lambda: workload_csr(key=rsa.generate_private_key(65537, 1024)), "RSA key too small"),
    (lambda: workload_csr(key=ec.generate_private_key(ec.SECP521R1())), "unsupported key"),
    (lambda: "not a CSR", "tampered or malformed CSR"),
    (lambda: "", "csr_pem is empty"),
], ids=["no-san", "dns-only", "two-uris", "other-domain", "other-path", "nested-path",
        "bad-name", "not-spiffe", "wrong-dns", "email", "small-rsa", "p521", "garbage", "empty"])
def test_bad_csrs_are_invalid_and_nothing_is_issued(ca: CertificateAuthority,
                                                    tokens: TokenStore, csr, reason) -> None:  # type: ignore[no-untyped-def]
    secret, _ = tokens.create(["orders"])
    record = tokens.authenticate(secret)
    with pytest.raises(InvalidArgument, match=reason) as info:
        ca.sign(csr(), record)
    assert info.value.violations[0][0] == "csr_pem"
    assert ca.issued == 0


def test_the_matching_dns_san_may_be_asked_for(ca: CertificateAuthority,
                                               tokens: TokenStore) -> None:
    issued = issue(ca, tokens, csr=workload_csr(dns=[f"orders.svc.{DOMAIN}"]))
    assert issued.service == "orders"


def tamper(pem_text: str, old: bytes, new: bytes) -> str:
    der = x509.load_pem_x509_csr(pem_text.encode()).public_bytes(serialization.Encoding.DER)
    assert der.count(old) == 1 and len(old) == len(new)
    changed = der.replace(old, new)
    body = base64.encodebytes(changed).decode().replace("\n", "")
    lines = [body[i:i + 64] for i in range(0, len(body), 64)]
    return "-----BEGIN CERTIFICATE REQUEST-----\n" + "\n".join(lines) + \
        "\n-----END CERTIFICATE REQUEST-----\n"


def test_a_csr_modified_after_signing_is_refused(ca: CertificateAuthority,
                                                 tokens: TokenStore) -> None:
    """Someone holding a CSR for `orders` rewrites its name to `ordert` (same length, so it
    still parses): only the signature check can catch it."""
    tampered = tamper(workload_csr("orders"), b"/service/orders", b"/service/ordert")
    assert x509.load_pem_x509_csr(tampered.encode()).extensions  # it does parse
    secret, _ = tokens.create(["orders", "ordert"])
    with pytest.raises(InvalidArgument, match="tampered or malformed CSR: its signature"):
        ca.sign(tampered, tokens.authenticate(secret))
    assert ca.issued == 0


def test_a_service_the_token_does_not_allow_is_denied(ca: CertificateAuthority,
                                                      tokens: TokenStore) -> None:
    secret, record = tokens.create(["payments", "shipping"])
    with pytest.raises(PermissionDenied) as info:
        ca.sign(workload_csr("orders"), tokens.authenticate(secret))
    assert str(info.value) == (f"bootstrap token {record.id} may not claim service 'orders' "
                               "(it allows: payments, shipping)")
    assert ca.issued == 0
    assert issue(ca, tokens, "shipping", allowed=("payments", "shipping")).service == "shipping"


def test_the_trust_domain_is_read_at_each_request(state: FileState, clock: Clock,
                                                  tokens: TokenStore) -> None:
    domain = ["a.example"]
    ca = CertificateAuthority(state, trust_domain=lambda: domain[0], clock=clock,
                              generate=lambda now: c.generate_root(now))
    secret, _ = tokens.create(["orders"])
    record = tokens.authenticate(secret)
    assert ca.sign(csr_pem(["spiffe://a.example/service/orders"]), record).spiffe_id == \
        "spiffe://a.example/service/orders"
    domain[0] = "b.example"
    with pytest.raises(InvalidArgument, match=r"not in this mesh's trust domain 'b\.example'"):
        ca.sign(csr_pem(["spiffe://a.example/service/orders"]), record)


# --- tokens --------------------------------------------------------------------------------------
def test_tokens_are_random_256_bit_and_stored_only_hashed(tokens: TokenStore,
                                                          state: FileState) -> None:
    secret, record = tokens.create(["orders"], description="orders in zone a")
    assert secret.startswith("pmt_")
    assert len(base64.urlsafe_b64decode(secret[4:] + "=")) == 32
    assert record.sha256 == token_hash(secret) and record.id == record.sha256[:16]
    stored = state.path("tokens").read_bytes()
    assert secret.encode() not in stored and secret[4:].encode() not in stored
    assert json.loads(stored)["tokens"][0]["sha256"] == token_hash(secret)
    other, _ = tokens.create(["orders"])
    assert other != secret
    assert tokens.authenticate(secret).id == record.id


def test_missing_and_unknown_tokens_are_unauthenticated(tokens: TokenStore) -> None:
    tokens.create(["orders"])
    for token in (None, ""):
        with pytest.raises(Unauthenticated, match="missing bootstrap token"):
            tokens.authenticate(token)
    with pytest.raises(Unauthenticated, match="unknown bootstrap token"):
        tokens.authenticate("pmt_" + "A" * 43)
    with pytest.raises(Unauthenticated, match="unknown bootstrap token"):
        tokens.authenticate("x" * 10_000)


def test_tokens_expire(tokens: TokenStore, clock: Clock) -> None:
    secret, record = tokens.create(["orders"], ttl=HOUR)
    forever, endless = tokens.create(["orders"], ttl=None)
    assert record.expires == T0 + HOUR
    clock.advance(HOUR - 1)
    assert tokens.authenticate(secret).id == record.id
    clock.advance(1)
    with pytest.raises(Unauthenticated, match=f"token {record.id} expired at "
                                              "2030-03-17T18:46:40Z"):
        tokens.authenticate(secret)
    assert {t.id: t.status(clock.now) for t in tokens.list()} == {record.id: "expired",
                                                                   endless.id: "active"}
    clock.advance(10 * 365 * 86400)
    assert tokens.authenticate(forever).expires is None


def test_default_token_ttl_is_720h(tokens: TokenStore) -> None:
    _, record = tokens.create(["orders"])
    assert record.expires == T0 + 720 * HOUR


def test_revoked_tokens_are_denied(tokens: TokenStore, clock: Clock) -> None:
    secret, record = tokens.create(["orders"])
    clock.advance(5)
    revoked = tokens.revoke(record.id)
    assert revoked.revoked == T0 + 5
    with pytest.raises(PermissionDenied, match=f"token {record.id} was revoked"):
        tokens.authenticate(secret)
    clock.advance(5)
    assert tokens.revoke(record.id.upper()).revoked == T0 + 5  # again: the first time stays
    with pytest.raises(NotFound, match="no token 'feedfacefeedface'"):
        tokens.revoke("feedfacefeedface")
    assert [t.status(clock.now) for t in tokens.list()] == ["revoked"]


def test_long_ended_tokens_are_pruned(tokens: TokenStore, clock: Clock) -> None:
    _, old = tokens.create(["orders"], ttl=HOUR)
    _, kept = tokens.create(["orders"])
    clock.advance(HOUR + PRUNE_AFTER - 1)
    assert {t.id for t in tokens.list()} == {old.id, kept.id}
    clock.advance(1)
    assert [t.id for t in tokens.list()] == [kept.id]


def test_bad_token_requests_name_every_field(tokens: TokenStore, state: FileState) -> None:
    with pytest.raises(InvalidArgument) as info:
        tokens.create(["orders", "bad name!", ""], ttl=-1, description="two\nlines")
    fields = [f for f, _ in info.value.violations]
    assert fields == ["services[1]", "services[2]", "ttl", "description"]
    with pytest.raises(InvalidArgument, match="at least one service"):
        tokens.create([])
    assert not state.path("tokens").exists()  # nothing stored


def test_token_services_are_sorted_and_unique(tokens: TokenStore) -> None:
    _, record = tokens.create(["b", "a", "b"])
    assert record.services == ("a", "b")


# --- persistence ---------------------------------------------------------------------------------
def test_state_files_are_private_and_the_root_survives_a_restart(
        state: FileState, clock: Clock, tokens: TokenStore) -> None:
    first = make_ca(state, clock)
    bundle = first.trust_bundle()
    tokens.create(["orders"])
    assert stat.S_IMODE(os.stat(state.dir).st_mode) == 0o700
    for name in ("root", "tokens"):
        assert stat.S_IMODE(os.stat(state.path(name)).st_mode) == 0o600
    assert not [p for p in os.listdir(state.dir) if ".tmp-" in p]
    again = make_ca(state, clock)
    assert again.trust_bundle() == bundle
    doc = json.loads(state.path("root").read_text())
    assert doc["roots"][0]["key"].startswith("-----BEGIN PRIVATE KEY-----")


def test_a_damaged_root_document_stops_the_ca_rather_than_replacing_the_root(
        state: FileState, clock: Clock) -> None:
    make_ca(state, clock).start()
    before = state.path("root").read_bytes()
    state.path("root").write_bytes(before[: len(before) // 2])
    with pytest.raises(CaConfigError, match="not valid JSON"):
        make_ca(state, clock).start()
    assert state.path("root").read_bytes() == before[: len(before) // 2]


# --- rotation ------------------------------------------------------------------------------------
def test_rotation_trusts_both_roots_until_the_old_ones_certificates_expire(
        state: FileState, clock: Clock, tokens: TokenStore) -> None:
    ca = make_ca(state, clock, ttl=HOUR)
    old_cert = issue(ca, tokens)
    [old_root] = ca.trust_bundle()
    clock.advance(600)
    view = ca.rotate()
    assert [r.state for r in view.roots] == ["active", "retiring"]
    retire = view.roots[1].retire_at
    assert retire == T0 + 600 + HOUR + RETIRE_MARGIN
    bundle = ca.trust_bundle()
    assert len(bundle) == 2 and bundle[1] == old_root
    new_cert = issue(ca, tokens)
    assert load(new_cert.certificate_pem)[0].issuer != load(old_cert.certificate_pem)[0].issuer
    assert new_cert.trust_bundle == bundle
    # both certificates verify against the two-root bundle; each only against its own root
    for cert in (old_cert, new_cert):
        verify(cert.certificate_pem, bundle, clock.now)
    with pytest.raises(verification.VerificationError):
        verify(new_cert.certificate_pem, [old_root], clock.now)
    # the old root's key is gone from the state as soon as it can no longer sign
    doc = json.loads(state.path("root").read_text())
    assert [r["key"] is None for r in doc["roots"]] == [True, False]
    # once every certificate the old root signed has expired, it leaves the bundle
    assert retire is not None
    clock.now = retire - 1
    assert len(ca.trust_bundle()) == 2
    clock.now = retire
    assert ca.trust_bundle() == (bundle[0],)
    assert [r.state for r in ca.view().roots] == ["active"]


def test_rotation_can_wait_before_signing_with_the_new_root(
        state: FileState, clock: Clock, tokens: TokenStore) -> None:
    ca = make_ca(state, clock, ttl=HOUR)
    [old_root] = ca.trust_bundle()
    view = ca.rotate(activate_after=600)
    assert [r.state for r in view.roots] == ["active", "pending"]
    assert view.roots[0].retire_at == T0 + 600 + HOUR + RETIRE_MARGIN
    assert len(ca.trust_bundle()) == 2  # sidecars learn the new root before it signs
    before = issue(ca, tokens)
    assert load(before.certificate_pem)[0].issuer == load(old_root)[0].subject
    clock.advance(600)
    after = issue(ca, tokens)
    assert load(after.certificate_pem)[0].issuer != load(old_root)[0].subject
    assert [r.state for r in ca.view().roots] == ["active", "retiring"]
    with pytest.raises(InvalidArgument, match="activate_after"):
        ca.rotate(activate_after=-1)


def test_a_restart_with_a_longer_ttl_keeps_old_roots_long_enough(
        state: FileState, clock: Clock) -> None:
    make_ca(state, clock, ttl=10 * HOUR).start()
    ca = make_ca(state, clock, ttl=HOUR)
    view = ca.rotate()
    assert view.roots[1].retire_at == T0 + 10 * HOUR + RETIRE_MARGIN


# --- an operator's root --------------------------------------------------------------------------
def write_pair(directory: Path, name: str, certs: list[x509.Certificate],
               key: c.SigningKey) -> tuple[str, str]:
    cert_file, key_file = directory / f"{name}.pem", directory / f"{name}.key"
    cert_file.write_text("".join(c.pem(x) for x in certs))
    key_file.write_text(c.key_pem(key))
    return str(cert_file), str(key_file)


def intermediate(root: x509.Certificate, root_key: c.SigningKey,
                 now: float) -> tuple[x509.Certificate, c.SigningKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "team intermediate")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(root.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(dt.datetime.fromtimestamp(now - 60, dt.UTC))
            .not_valid_after(dt.datetime.fromtimestamp(now + 365 * 86400, dt.UTC))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                root_key.public_key()), critical=False)  # type: ignore[arg-type]
            .sign(root_key, hashes.SHA256()))  # type: ignore[arg-type]
    return cert, key


def test_an_operator_root_signs_and_cannot_be_rotated_by_meshctl(
        state: FileState, clock: Clock, tokens: TokenStore, tmp_path: Path) -> None:
    root, key = c.generate_root(T0 - 86400, organization="acme")
    operator = load_operator_ca(*write_pair(tmp_path, "acme", [root], key), now=T0)
    ca = make_ca(state, clock, operator=operator)
    issued = issue(ca, tokens)
    assert ca.trust_bundle() == (c.pem(root),)
    verify(issued.certificate_pem, [c.pem(root)], clock.now)
    assert ca.view().source == "operator"
    with pytest.raises(FailedPrecondition, match="supplied by the operator"):
        ca.rotate()
    # the operator's key never reaches the state
    assert json.loads(state.path("root").read_text())["roots"][0]["key"] is None


def test_replacing_the_operator_root_keeps_the_previous_one_trusted(
        state: FileState, clock: Clock, tokens: TokenStore, tmp_path: Path) -> None:
    generated = make_ca(state, clock, ttl=HOUR)
    [first] = generated.trust_bundle()
    clock.advance(60)
    root, key = c.generate_root(T0, organization="acme")
    ca = make_ca(state, clock, ttl=HOUR, operator=c.ca_pair([root], key, T0))
    view = ca.view()
    assert [r.state for r in view.roots] == ["active", "retiring"]
    assert view.roots[1].retire_at == T0 + 60 + HOUR + RETIRE_MARGIN
    assert ca.trust_bundle() == (c.pem(root), first)
    # and back to a generated root: the operator's stays trusted, a new one signs
    clock.advance(60)
    back = make_ca(state, clock, ttl=HOUR)
    bundle = back.trust_bundle()
    assert len(bundle) == 3 and bundle[1:] == (c.pem(root), first)


def test_an_operator_intermediate_is_sent_as_part_of_the_chain(
        state: FileState, clock: Clock, tokens: TokenStore, tmp_path: Path) -> None:
    root, root_key = c.generate_root(T0 - 86400, organization="corp")
    inter, inter_key = intermediate(root, root_key, T0)
    ca = make_ca(state, clock, operator=load_operator_ca(
        *write_pair(tmp_path, "team", [inter, root], inter_key), now=T0))
    issued = issue(ca, tokens)
    assert [x.subject for x in load(issued.certificate_pem)][1] == inter.subject
    assert issued.trust_bundle == (c.pem(root),)
    verify(issued.certificate_pem, issued.trust_bundle, clock.now)


@pytest.mark.parametrize("problem", ["other-key", "not-a-ca", "no-root", "encrypted",
                                     "missing-file", "expired"])
def test_unusable_operator_roots_are_refused(problem: str, tmp_path: Path) -> None:
    root, key = c.generate_root(T0 - 86400)
    certs: list[x509.Certificate] = [root]
    key_file = None
    now = T0
    if problem == "other-key":
        key = ec.generate_private_key(ec.SECP256R1())
    elif problem == "not-a-ca":
        ca_pair = c.ca_pair([root], key, T0)
        leaf_key = ec.generate_private_key(ec.SECP256R1())
        csr = x509.load_pem_x509_csr(workload_csr(key=leaf_key).encode())
        certs = [c.issue(ca_pair, c.check_csr(csr, DOMAIN), T0, HOUR)]
        key = leaf_key
    elif problem == "no-root":
        inter, key = intermediate(root, key, T0)
        certs = [inter]
    elif problem == "expired":
        now = T0 + 11 * 365 * 86400
    cert_file, key_file = write_pair(tmp_path, "op", certs, key)
    if problem == "encrypted":
        Path(key_file).write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret")))
    if problem == "missing-file":
        key_file = str(tmp_path / "nope.key")
    expected = {"other-key": "does not belong", "not-a-ca": "not a CA certificate",
                "no-root": "not a self-signed root", "encrypted": "encrypted",
                "missing-file": "No such file", "expired": "not valid now"}[problem]
    with pytest.raises(CaConfigError, match=expected):
        load_operator_ca(cert_file, key_file, now=now)


def test_listeners_hear_of_every_bundle_change(state: FileState, clock: Clock) -> None:
    ca = make_ca(state, clock, ttl=HOUR)
    heard: list[int] = []
    ca.on_change(lambda bundle: heard.append(len(bundle)))
    ca.trust_bundle()
    ca.trust_bundle()
    assert heard == [1]  # the first root, once
    view = ca.rotate()
    assert heard == [1, 2]
    ca.trust_bundle()
    assert heard == [1, 2]
    retire = view.roots[1].retire_at
    assert retire is not None
    clock.now = retire
    ca.view()
    assert heard == [1, 2, 1]  # the old root retired by time
    other = make_ca(state, clock, ttl=HOUR)  # another replica rotates
    other.rotate()
    ca.trust_bundle()
    assert heard == [1, 2, 1, 2]
