"""Workload identity on the sidecar: names, the CSR, identity checks, and renewal (half life with
jitter, backoff while the certificate is valid) with a fake clock and seeded randomness."""

from __future__ import annotations

import asyncio
import random

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sidecar.identity import (
    CertificateSource,
    Identity,
    IdentityError,
    RenewalPolicy,
    RenewalSchedule,
    SignResult,
    StaticCertificateSource,
    build_csr,
    dns_name,
    generate_key,
    identity_from_pem,
    parse_spiffe_id,
    private_key_pem,
    read_token,
    spiffe_id,
)
from tests.pki import TRUST_DOMAIN, TestCA

START = 1_750_000_000.0  # the fake clock's epoch (unix seconds)
TTL = 3600.0


# --- names --------------------------------------------------------------------------------------


def test_names_follow_the_contract() -> None:
    assert spiffe_id("mesh.local", "orders") == "spiffe://mesh.local/service/orders"
    assert dns_name("mesh.local", "orders") == "orders.svc.mesh.local"


@pytest.mark.parametrize(("uri", "parsed"), [
    ("spiffe://mesh.local/service/orders", ("mesh.local", "orders")),
    ("spiffe://other.td/service/a-b_c.d", ("other.td", "a-b_c.d")),
    ("spiffe://mesh.local/ns/default/sa/orders", None),
    ("spiffe://mesh.local/service/", None),
    ("spiffe://mesh.local/service/a/b", None),
    ("spiffe:///service/orders", None),
    ("https://mesh.local/service/orders", None),
    ("", None),
])
def test_parse_spiffe_id(uri: str, parsed: tuple[str, str] | None) -> None:
    assert parse_spiffe_id(uri) == parsed


# --- CSR ----------------------------------------------------------------------------------------


def test_csr_names_the_spiffe_id_and_dns_san_and_proves_the_key() -> None:
    key = generate_key()
    csr = x509.load_pem_x509_csr(build_csr(key, "orders", "corp.example").encode())
    assert csr.is_signature_valid
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://corp.example/service/orders"]
    assert san.get_values_for_type(x509.DNSName) == ["orders.svc.corp.example"]
    assert len(list(san)) == 2
    public = csr.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public.curve.name == "secp256r1"
    der = serialization.Encoding.DER
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    assert public.public_bytes(der, spki) == key.public_key().public_bytes(der, spki)
    assert "PRIVATE" not in build_csr(key, "orders", "corp.example")


def test_every_key_is_new() -> None:
    assert private_key_pem(generate_key()) != private_key_pem(generate_key())


# --- identity checks ----------------------------------------------------------------------------


def test_identity_from_pem_reads_the_certificate() -> None:
    ca = TestCA()
    ident = ca.issue("orders", ttl=TTL, now=START)
    assert ident.spiffe_id == "spiffe://mesh.local/service/orders"
    assert ident.not_after == START + TTL
    assert ident.not_before == START - 60
    assert ident.trust_bundle_pem == (ca.pem,)
    assert ident.valid_at(START) and not ident.valid_at(START + TTL)
    assert "PRIVATE" not in repr(ident)


def test_identity_rejects_a_key_that_is_not_the_certificates() -> None:
    ca = TestCA()
    a, b = ca.issue("orders"), ca.issue("orders")
    with pytest.raises(IdentityError, match="does not belong"):
        identity_from_pem(b.private_key_pem, a.certificate_chain_pem, (ca.pem,))


def test_identity_needs_exactly_one_spiffe_uri_and_a_bundle() -> None:
    ca = TestCA()
    two = ca.issue("orders", uris=["spiffe://mesh.local/service/a",
                                   "spiffe://mesh.local/service/b"])
    with pytest.raises(IdentityError, match="exactly one spiffe"):
        identity_from_pem(two.private_key_pem, two.certificate_chain_pem, (ca.pem,))
    none = ca.issue("orders", uris=[])
    with pytest.raises(IdentityError, match="exactly one spiffe"):
        identity_from_pem(none.private_key_pem, none.certificate_chain_pem, (ca.pem,))
    good = ca.issue("orders")
    with pytest.raises(IdentityError, match="empty trust bundle"):
        identity_from_pem(good.private_key_pem, good.certificate_chain_pem, ())
    with pytest.raises(IdentityError, match="unreadable PEM"):
        identity_from_pem(b"not a key", good.certificate_chain_pem, (ca.pem,))


def test_bundle_text_with_two_roots_splits_into_two() -> None:
    old, new = TestCA("old"), TestCA("new")
    ident = old.issue("orders")
    both = identity_from_pem(ident.private_key_pem, ident.certificate_chain_pem,
                             old.pem + new.pem)
    assert both.trust_bundle_pem == (old.pem, new.pem)
    assert both.bundle_pem == old.pem + new.pem


def test_static_source_from_files_reloads_on_change(tmp_path) -> None:
    ca = TestCA()
    first, second = ca.issue("orders"), ca.issue("orders")
    paths = [tmp_path / n for n in ("cert.pem", "key.pem", "bundle.pem")]

    def write(ident: Identity) -> None:
        paths[0].write_bytes(ident.certificate_chain_pem)
        paths[1].write_bytes(ident.private_key_pem)
        paths[2].write_bytes(ident.bundle_pem)

    write(first)
    source = StaticCertificateSource.from_files(*(str(p) for p in paths))
    seen: list[int] = []
    source.subscribe(lambda i: seen.append(i.serial))
    assert source.current().serial == first.serial  # type: ignore[union-attr]
    assert source.reload() is False and seen == []
    write(second)
    assert source.reload() is True
    assert seen == [second.serial] and source.version == 2
    with pytest.raises(IdentityError, match="cannot read"):
        StaticCertificateSource.from_files(str(tmp_path / "missing"), *(str(p) for p in paths[1:]))


def test_a_failing_subscriber_does_not_stop_the_others() -> None:
    ca = TestCA()
    source = StaticCertificateSource(ca.issue("orders"))
    seen: list[int] = []

    def broken(_i: Identity) -> None:
        raise RuntimeError("boom")

    source.subscribe(broken)
    unsubscribe = source.subscribe(lambda i: seen.append(i.serial))
    new = ca.issue("orders")
    source.set(new)
    assert seen == [new.serial]
    unsubscribe()
    source.set(ca.issue("orders"))
    assert seen == [new.serial]


def test_read_token(tmp_path) -> None:
    assert read_token(" abc \n", None) == "abc"
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    assert read_token(None, str(token_file)) == "from-file"
    assert read_token("flag", str(token_file)) == "flag"
    with pytest.raises(IdentityError, match="meshctl token create"):
        read_token(None, None)
    token_file.write_text("  \n")
    with pytest.raises(IdentityError, match="is empty"):
        read_token("", str(token_file))
    with pytest.raises(IdentityError, match="cannot read --token-file"):
        read_token(None, str(tmp_path / "absent"))


# --- renewal schedule (pure) --------------------------------------------------------------------


def test_renewal_at_half_life_with_bounded_jitter() -> None:
    schedule = RenewalSchedule(RenewalPolicy(), random.Random(7))
    times = [schedule.after_success(START, START + TTL) - START for _ in range(500)]
    assert all(0.4 * TTL <= t <= 0.6 * TTL for t in times)
    assert max(times) - min(times) > 0.15 * TTL  # really jittered, not constant
    assert abs(sum(times) / len(times) - 0.5 * TTL) < 0.02 * TTL


def test_backoff_grows_caps_and_stays_before_expiry() -> None:
    policy = RenewalPolicy(initial_backoff=1.0, max_backoff=30.0, multiplier=2.0)
    schedule = RenewalSchedule(policy, random.Random(1))
    far = START + 10 * TTL
    delays = [schedule.after_failure(START, far) - START for _ in range(8)]
    ceilings = [1, 2, 4, 8, 16, 30, 30, 30]
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert ceiling / 2 <= delay <= ceiling
    # with 20 s of validity left, no wait reaches past half of it
    assert schedule.after_failure(START, START + 20) - START <= 10
    # an expired (or absent) certificate: plain backoff, never below the floor
    assert schedule.after_failure(START, START - 5) - START >= policy.min_delay
    assert schedule.after_failure(START, None) - START >= policy.min_delay
    schedule.after_success(START, far)
    assert schedule.failures == 0
    assert schedule.after_failure(START, far) - START <= 1.0


# --- CertificateSource with a fake clock and a fake CA ------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = START
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now


class FakeSigner:
    """Signs like the mesh CA, or fails the next `fail` calls."""

    def __init__(self, ca: TestCA, clock: FakeClock, ttl: float = TTL) -> None:
        self.ca, self.clock, self.ttl = ca, clock, ttl
        self.fail = 0
        self.csrs: list[str] = []
        self.bundle: tuple[str, ...] = (ca.pem.decode(),)

    async def sign(self, csr_pem: str) -> SignResult:
        self.csrs.append(csr_pem)
        if self.fail:
            self.fail -= 1
            raise ConnectionError("control plane unreachable")
        return SignResult(self.ca.sign_csr(csr_pem, now=self.clock.now, ttl=self.ttl),
                          self.bundle)

    async def trust_bundle(self) -> tuple[str, ...]:
        return self.bundle


_KEYS: list[ec.EllipticCurvePrivateKey] = []


def _recording_key() -> ec.EllipticCurvePrivateKey:
    key = generate_key()
    _KEYS.append(key)
    return key


class Stop(Exception):
    pass


def run_source(source: CertificateSource, clock: FakeClock, sleeps: int,
               between: list | None = None) -> None:
    """Run the renewal loop for `sleeps` waits; `between[i]`, if callable, runs before wait i."""

    async def fake_sleep(delay: float) -> None:
        assert delay >= 0
        if len(clock.sleeps) >= sleeps:
            raise Stop
        step = between[len(clock.sleeps)] if between and len(clock.sleeps) < len(between) \
            else None
        if callable(step):
            step()
        clock.sleeps.append(delay)
        clock.now += delay

    source._sleep = fake_sleep

    async def main() -> None:
        with pytest.raises(Stop):
            await source.run()

    asyncio.run(main())


def make_source(signer: FakeSigner, clock: FakeClock, seed: int = 3) -> CertificateSource:
    return CertificateSource("orders", TRUST_DOMAIN, signer, clock=clock, rng=random.Random(seed),
                             new_key=_recording_key, bundle_interval=None)


def test_first_certificate_at_once_then_renewal_at_half_life_with_a_new_key() -> None:
    clock = FakeClock()
    signer = FakeSigner(TestCA(), clock)
    source = make_source(signer, clock)
    seen: list[Identity] = []
    source.subscribe(seen.append)
    run_source(source, clock, sleeps=2)
    assert len(signer.csrs) == 3 and len(seen) == 3  # at once, then after each of 2 waits
    for delay in clock.sleeps[:2]:
        assert 0.4 * TTL <= delay <= 0.6 * TTL
    assert len({i.serial for i in seen}) == 3
    assert len({i.private_key_pem for i in seen}) == 3  # a new key each time
    assert source.current() is seen[-1]
    assert seen[-1].spiffe_id == "spiffe://mesh.local/service/orders"
    assert source.last_error is None
    # every certificate was renewed while still valid
    for earlier, later_issue_at in zip(seen, [START + sum(clock.sleeps[:k + 1])
                                              for k in range(2)], strict=False):
        assert earlier.valid_at(later_issue_at)


def test_failures_back_off_keep_the_current_certificate_and_recover() -> None:
    clock = FakeClock()
    signer = FakeSigner(TestCA(), clock, ttl=600.0)
    source = make_source(signer, clock)
    seen: list[Identity] = []
    source.subscribe(seen.append)
    # first certificate, then the CA is down for 4 attempts, then back
    run_source(source, clock, sleeps=5, between=[lambda: setattr(signer, "fail", 4)])
    first = seen[0]
    renew_wait, *retries = clock.sleeps
    assert 0.4 * 600 <= renew_wait <= 0.6 * 600
    backoffs = retries[:4]
    assert backoffs == sorted(backoffs) and backoffs[0] <= 1.0 and backoffs[-1] > 2.0
    assert len(seen) == 2  # only the recovery published
    assert seen[1].serial != first.serial
    renewed_at = START + renew_wait + sum(backoffs)
    assert first.valid_at(renewed_at)  # recovered before the old certificate expired
    assert source.last_error is None


def test_retries_while_the_ca_is_down_all_land_before_expiry() -> None:
    clock = FakeClock()
    signer = FakeSigner(TestCA(), clock, ttl=120.0)
    source = make_source(signer, clock)
    run_source(source, clock, sleeps=12, between=[lambda: setattr(signer, "fail", 100)])
    first = source.current()
    assert first is not None
    attempts_at = [START + sum(clock.sleeps[:k + 1]) for k in range(len(clock.sleeps))]
    assert all(t < first.not_after for t in attempts_at)  # halving the time left each time
    assert source.last_error == "ConnectionError: control plane unreachable"
    assert source.current() is first


def test_a_certificate_for_another_identity_is_a_failure() -> None:
    clock = FakeClock()
    ca = TestCA()
    signer = FakeSigner(ca, clock)

    class WrongName(FakeSigner):
        async def sign(self, csr_pem: str) -> SignResult:
            key = _KEYS[-1]
            return SignResult(ca.sign_csr(build_csr(key, "admin", TRUST_DOMAIN),
                                          now=clock.now, ttl=TTL), self.bundle)

    source = make_source(WrongName(ca, clock), clock)
    assert asyncio.run(source.refresh()) is False
    assert source.current() is None
    assert "issued spiffe://mesh.local/service/admin" in (source.last_error or "")

    class WrongKey(FakeSigner):
        async def sign(self, csr_pem: str) -> SignResult:
            other = build_csr(generate_key(), "orders", TRUST_DOMAIN)
            return SignResult(ca.sign_csr(other, now=clock.now, ttl=TTL), self.bundle)

    source = make_source(WrongKey(ca, clock), clock)
    assert asyncio.run(source.refresh()) is False
    assert "does not belong" in (source.last_error or "")
    assert asyncio.run(make_source(signer, clock).refresh()) is True


def test_wait_ready_reports_the_last_error() -> None:
    clock = FakeClock()
    signer = FakeSigner(TestCA(), clock)
    signer.fail = 1
    source = make_source(signer, clock)

    async def main() -> None:
        await source.refresh()
        with pytest.raises(IdentityError, match="control plane unreachable"):
            await source.wait_ready(0.05)
        await source.refresh()
        assert (await source.wait_ready(0.05)) is source.current()

    asyncio.run(main())


def test_a_new_trust_bundle_is_published_with_the_same_certificate() -> None:
    clock = FakeClock()
    old, new = TestCA("old"), TestCA("new")
    signer = FakeSigner(old, clock)
    source = make_source(signer, clock)
    seen: list[Identity] = []

    async def main() -> None:
        assert await source.refresh_bundle() is False  # nothing to update yet
        await source.refresh()
        source.subscribe(seen.append)
        assert await source.refresh_bundle() is False  # unchanged: no notification
        signer.bundle = (old.pem.decode(), new.pem.decode())
        assert await source.refresh_bundle() is True

    asyncio.run(main())
    assert len(seen) == 1
    assert seen[0].trust_bundle_pem == (old.pem, new.pem)
    assert seen[0].certificate_chain_pem == source.current().certificate_chain_pem  # type: ignore[union-attr]
