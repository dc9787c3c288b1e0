"""The sidecar's identity wiring, piece by piece: the identity flags and their errors, what the
inbound hop tells the app about its caller, which channel an endpoint is dialled on, the trust
domain asked from the CA, and the trust bundle delivered with the config."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from sidecar import config
from sidecar.cluster_runtime import dial
from sidecar.identity import (
    CertificateSource,
    IdentityError,
    SignResult,
    StaticCertificateSource,
)
from sidecar.metadata import FORWARDED_CLIENT_CERT, inbound_forwardable
from sidecar.model import Endpoint, UpstreamTlsSpec
from sidecar.tls import UpstreamTls
from sidecar.upstream.pool import ChannelPool
from sidecar.workload_identity import WorkloadIdentity
from tests.pki import TestCA

ENV = ("MESH_TOKEN", "MESH_TOKEN_FILE", "MESH_INBOUND_PLAINTEXT", "MESH_CONTROL_PLANE",
       "MESH_INBOUND", "MESH_SERVICE")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV:
        monkeypatch.delenv(name, raising=False)


# --- flags ----------------------------------------------------------------------------------------


def parse(*args: str) -> config.Settings:
    return config.parse(["--service", "cart", *args])


def refused(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """The one-line error a user sees (argparse usage error, exit status 2, no traceback)."""
    with pytest.raises(SystemExit) as info:
        parse(*args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize("flag", [["--token", "t0k3n"], ["--token-file", "/tmp/token"]])
def test_a_token_needs_a_control_plane(capsys: pytest.CaptureFixture[str], flag: list[str]
                                       ) -> None:
    assert refused(capsys, *flag) == ("mesh-sidecar: error: --token/--token-file need "
                                      "--control-plane (the mesh CA)")


def test_mesh_token_from_the_environment_needs_a_control_plane_too(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESH_TOKEN", "t0k3n")
    assert "need --control-plane" in refused(capsys)
    monkeypatch.setenv("MESH_CONTROL_PLANE", "127.0.0.1:18000")
    settings = parse()
    assert settings.token == "t0k3n" and settings.wants_identity


def test_inbound_plaintext_needs_an_identity(capsys: pytest.CaptureFixture[str]) -> None:
    assert refused(capsys, "--control-plane", "127.0.0.1:18000", "--inbound-plaintext",
                   "127.0.0.1:15007") == (
        "mesh-sidecar: error: --inbound-plaintext needs a workload identity (--token or "
        "--token-file): without one --inbound is plaintext already")


@pytest.mark.parametrize(("inbound", "plaintext"), [
    ("0.0.0.0:15006", "0.0.0.0:15007"),
    ("127.0.0.1:0", "127.0.0.1:0"),
    ("[::1]:15006", "[::1]:15007"),
    ("[::]:0", "[::]:0"),
])
def test_the_plaintext_port_defaults_to_inbound_plus_one(inbound: str, plaintext: str) -> None:
    settings = parse("--control-plane", "127.0.0.1:18000", "--token", "t", "--inbound", inbound)
    assert settings.inbound_plaintext == plaintext


def test_an_explicit_plaintext_address_is_kept() -> None:
    settings = parse("--control-plane", "127.0.0.1:18000", "--token-file", "/run/token",
                     "--inbound-plaintext", "10.0.0.5:9000")
    assert settings.inbound_plaintext == "10.0.0.5:9000"
    assert settings.wants_identity and settings.token is None


def test_a_bad_plaintext_address_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert refused(capsys, "--control-plane", "127.0.0.1:18000", "--token", "t",
                   "--inbound-plaintext", "nowhere") == \
        "mesh-sidecar: error: 'nowhere': expected HOST:PORT"


def test_inbound_port_65535_needs_an_explicit_plaintext_address(
        capsys: pytest.CaptureFixture[str]) -> None:
    """Port + 1 would be 65536, which grpc-core binds modulo 65536: a random port."""
    assert refused(capsys, "--control-plane", "127.0.0.1:18000", "--token", "t", "--inbound",
                   "0.0.0.0:65535") == (
        "mesh-sidecar: error: --inbound port 65535 leaves no next port for the plaintext "
        "inbound listener: set --inbound-plaintext")
    settings = parse("--control-plane", "127.0.0.1:18000", "--token", "t", "--inbound",
                     "0.0.0.0:65535", "--inbound-plaintext", "0.0.0.0:15007")
    assert settings.inbound_plaintext == "0.0.0.0:15007"


@pytest.mark.parametrize("flag", ["--inbound", "--outbound", "--admin"])
def test_ports_beyond_65535_are_refused(capsys: pytest.CaptureFixture[str], flag: str) -> None:
    assert refused(capsys, flag, "127.0.0.1:99999") == (
        "mesh-sidecar: error: '127.0.0.1:99999': port must be within 0..65535")


def test_without_a_token_there_is_one_plaintext_inbound_port() -> None:
    settings = parse("--control-plane", "127.0.0.1:18000")
    assert not settings.wants_identity and settings.inbound_plaintext is None


def test_the_token_never_shows_in_the_settings_repr() -> None:
    settings = parse("--control-plane", "127.0.0.1:18000", "--token", "sup3r-s3cret")
    assert "sup3r-s3cret" not in repr(settings)


def test_the_token_file_is_read_and_its_errors_are_clear(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("  abc.def \n")
    assert WorkloadIdentity("cart", "127.0.0.1:1", None, str(path))._token == "abc.def"
    path.write_text("\n")
    with pytest.raises(IdentityError, match=r"--token-file .* is empty"):
        WorkloadIdentity("cart", "127.0.0.1:1", None, str(path))
    with pytest.raises(IdentityError, match="cannot read --token-file"):
        WorkloadIdentity("cart", "127.0.0.1:1", None, str(path) + ".missing")
    with pytest.raises(IdentityError, match="mTLS needs a bootstrap token"):
        WorkloadIdentity("cart", "127.0.0.1:1", "   ", None)


def test_a_workload_identity_before_start_is_not_ready_and_changes_nothing() -> None:
    identity = WorkloadIdentity("cart", "127.0.0.1:1", "t", None)
    assert identity.current() is None
    assert identity.not_ready() == "waiting for a workload certificate"
    assert identity.replace_trust_bundle((TestCA().pem,)) is False
    assert identity.status()["spiffe_id"] == ""


# --- what the inbound hop passes to the app -------------------------------------------------------


def test_the_verified_caller_replaces_any_forwarded_client_cert() -> None:
    caller = "spiffe://mesh.local/service/orders"
    metadata = (("x-a", "1"), (FORWARDED_CLIENT_CERT, "URI=spiffe://mesh.local/service/admin"),
                ("x-b", b"\x00"), (FORWARDED_CLIENT_CERT, "By=forged"), ("x-a", "2"),
                ("grpc-trace-bin", b"t"), ("grpc-timeout", "1S"), ("te", "trailers"),
                ("user-agent", "x"), (":authority", "h"))
    assert inbound_forwardable(metadata, caller) == (
        ("x-a", "1"), ("x-b", b"\x00"), ("x-a", "2"), ("grpc-trace-bin", b"t"),
        (FORWARDED_CLIENT_CERT, f"URI={caller}"))


def test_a_plaintext_caller_gets_no_forwarded_client_cert() -> None:
    forged = ((FORWARDED_CLIENT_CERT, "URI=spiffe://mesh.local/service/admin"), ("x-a", "1"))
    assert inbound_forwardable(forged, None) == (("x-a", "1"),)
    assert inbound_forwardable(None, None) == ()
    assert inbound_forwardable((), "spiffe://td/service/a") == (
        (FORWARDED_CLIENT_CERT, "URI=spiffe://td/service/a"),)


# --- which channel an endpoint is dialled on ------------------------------------------------------


TLS = UpstreamTlsSpec("orders.svc.mesh.local", "spiffe://mesh.local/service/orders")
BOTH = Endpoint("10.0.0.1:7001", mtls=True, plaintext_address="10.0.0.1:7002")
STRICT_ONLY = Endpoint("10.0.0.3:7021", mtls=True)
PLAIN = Endpoint("10.0.0.2:7011")


@pytest.mark.parametrize(("identity", "endpoint", "tls", "key"), [
    (True, BOTH, TLS, ("10.0.0.1:7001", "orders.svc.mesh.local")),
    (True, STRICT_ONLY, TLS, ("10.0.0.3:7021", "orders.svc.mesh.local")),
    (True, PLAIN, TLS, ("10.0.0.2:7011", None)),  # an instance without identity: plaintext
    (False, BOTH, TLS, ("10.0.0.1:7002", None)),  # PERMISSIVE: its plaintext port
    (False, STRICT_ONLY, TLS, ("10.0.0.3:7021", None)),  # refuses the handshake: UNAVAILABLE
    (False, PLAIN, TLS, ("10.0.0.2:7011", None)),
    (True, PLAIN, None, ("10.0.0.2:7011", None)),  # DISABLE
    (False, PLAIN, None, ("10.0.0.2:7011", None)),
], ids=["id-both", "id-strict", "id-plain", "noid-both", "noid-strict", "noid-plain",
        "id-disable", "noid-disable"])
def test_dial_chooses_mtls_the_plaintext_port_or_plaintext(
        identity: bool, endpoint: Endpoint, tls: UpstreamTlsSpec | None,
        key: tuple[str, str | None]) -> None:
    source = StaticCertificateSource(TestCA().issue("cart"))

    async def main() -> None:
        pool = ChannelPool((), tls=UpstreamTls(source, "mesh.local") if identity else None)
        assert pool.has_identity is identity
        channel = dial(pool, endpoint, tls)
        assert channel.key == key
        assert dial(pool, endpoint, tls) is channel  # one channel per (address, name)
        await pool.close(0)

    asyncio.run(main())


def test_one_address_dialled_both_ways_gets_two_channels() -> None:
    source = StaticCertificateSource(TestCA().issue("cart"))

    async def main() -> None:
        pool = ChannelPool((), tls=UpstreamTls(source, "mesh.local"))
        secure = pool.get("10.0.0.1:7001", "orders.svc.mesh.local")
        plain = pool.get("10.0.0.1:7001")
        assert secure is not plain and secure.channel is not plain.channel
        source.set(TestCA().issue("cart"))
        assert pool.identity_changed() == 1  # only the mTLS one is renewed
        assert pool.identity_changed() == 0  # nothing new since
        await pool.close(0)

    asyncio.run(main())


# --- the trust domain, asked from the CA ----------------------------------------------------------


class FakeSigner:
    """The mesh CA's answers without a network: signs what the CSR names; can fail on demand."""

    def __init__(self, ca: TestCA, now: float) -> None:
        self.ca, self.now = ca, now
        self.domain_asked = 0
        self.signed = 0
        self.fail_domain: Exception | None = None

    async def trust_domain(self) -> str:
        self.domain_asked += 1
        if self.fail_domain is not None:
            raise self.fail_domain
        return self.ca.trust_domain

    async def sign(self, csr_pem: str) -> SignResult:
        self.signed += 1
        return SignResult(self.ca.sign_csr(csr_pem, now=self.now, ttl=600),
                          (self.ca.pem.decode(),))

    async def trust_bundle(self) -> tuple[str, ...]:
        return (self.ca.pem.decode(),)


def _source(signer: FakeSigner, trust_domain: str = "") -> CertificateSource:
    return CertificateSource("orders", trust_domain, signer, clock=lambda: signer.now,
                             rng=random.Random(7), bundle_interval=None)


def test_the_trust_domain_is_asked_once_before_the_first_csr() -> None:
    ca = TestCA(trust_domain="corp.example")
    signer = FakeSigner(ca, now=1_900_000_000.0)
    source = _source(signer)
    assert source.spiffe_id == ""

    async def main() -> None:
        assert await source.refresh()
        assert await source.refresh()

    asyncio.run(main())
    assert source.trust_domain == "corp.example"
    assert source.spiffe_id == "spiffe://corp.example/service/orders"
    identity = source.current()
    assert identity is not None and identity.spiffe_id == source.spiffe_id
    assert signer.domain_asked == 1 and signer.signed == 2


def test_a_given_trust_domain_is_not_asked() -> None:
    ca = TestCA(trust_domain="corp.example")
    signer = FakeSigner(ca, now=1_900_000_000.0)
    source = _source(signer, "corp.example")
    asyncio.run(source.refresh())
    assert signer.domain_asked == 0 and source.current() is not None


def test_a_failed_trust_domain_question_is_retried_and_reported() -> None:
    ca = TestCA(trust_domain="corp.example")
    signer = FakeSigner(ca, now=1_900_000_000.0)
    signer.fail_domain = IdentityError("the CA did not say its trust domain")
    source = _source(signer)

    async def main() -> None:
        assert not await source.refresh()
        assert source.last_error == "IdentityError: the CA did not say its trust domain"
        assert source.trust_domain == "" and source.current() is None and signer.signed == 0
        assert source.next_refresh_at is not None and source.next_refresh_at > signer.now
        signer.fail_domain = None
        assert await source.refresh()

    asyncio.run(main())
    assert source.last_error is None and signer.domain_asked == 2
    assert source.spiffe_id == "spiffe://corp.example/service/orders"


class OtherDomainSigner(FakeSigner):
    """A CA that says one trust domain and signs for another."""

    async def trust_domain(self) -> str:
        return "other.example"

    async def sign(self, csr_pem: str) -> SignResult:
        public_key = x509.load_pem_x509_csr(csr_pem.encode()).public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        cert = self.ca.certificate(public_key, uris=["spiffe://corp.example/service/orders"],
                                   dns=["orders.svc.corp.example"], not_before=self.now - 60,
                                   not_after=self.now + 600)
        return SignResult(cert.decode(), (self.ca.pem.decode(),))


def test_a_certificate_for_another_identity_is_refused() -> None:
    signer = OtherDomainSigner(TestCA(trust_domain="corp.example"), now=1_900_000_000.0)
    source = _source(signer)
    assert not asyncio.run(source.refresh())
    assert source.current() is None
    assert source.last_error == ("IdentityError: the CA issued spiffe://corp.example/service/"
                                 "orders, asked for spiffe://other.example/service/orders")


# --- the trust bundle from the config -------------------------------------------------------------


def test_replace_trust_bundle_publishes_the_same_certificate_with_the_new_roots() -> None:
    old_root, new_root = TestCA("root 1"), TestCA("root 2")
    identity = old_root.issue("orders")
    source = StaticCertificateSource(identity)
    tls = UpstreamTls(source, "mesh.local")
    seen: list[tuple[bytes, ...]] = []
    source.subscribe(lambda i: seen.append(i.trust_bundle_pem))
    generation = tls.generation

    both = (old_root.pem, new_root.pem)
    assert source.replace_trust_bundle(both) is True
    current = source.current()
    assert current is not None and current.trust_bundle_pem == both
    assert (current.certificate_chain_pem, current.private_key_pem, current.serial) == (
        identity.certificate_chain_pem, identity.private_key_pem, identity.serial)
    assert seen == [both]
    assert tls.generation == generation + 1  # upstream channels get renewed

    # the same roots again (whitespace aside), or none at all: nothing happens
    assert source.replace_trust_bundle((old_root.pem.rstrip(), b"\n" + new_root.pem)) is False
    assert source.replace_trust_bundle(()) is False
    assert seen == [both] and tls.generation == generation + 1


def test_replace_trust_bundle_before_the_first_certificate_does_nothing() -> None:
    signer = FakeSigner(TestCA(), now=1_900_000_000.0)
    source = _source(signer, "mesh.local")
    assert source.replace_trust_bundle((TestCA().pem,)) is False
    assert source.current() is None and source.version == 0


def test_channel_credentials_exist_before_the_first_certificate() -> None:
    signer = FakeSigner(TestCA(), now=1_900_000_000.0)
    tls = UpstreamTls(_source(signer, "mesh.local"), "mesh.local")
    assert isinstance(tls.credentials(), grpc.ChannelCredentials)
    assert tls.credentials() is tls.credentials()  # one placeholder, made once
