"""The CA and its tokens kept in Consul KV (py-consul against the Consul double, over real
sockets), as two control-plane replicas sharing one Consul see them: one root for both, a
token created or revoked through one counts on the other at once, a rotation on one is the
other's bundle, and Consul going away neither loses nor regenerates the root.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import consul
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from control_plane.ca import (
    CertificateAuthority,
    ConsulState,
    PermissionDenied,
    TokenStore,
    Unavailable,
)
from tests.consul_double import ConsulDouble

DOMAIN = "pymesh.local"


@pytest.fixture
def double() -> Iterator[ConsulDouble]:
    with ConsulDouble() as d:
        yield d


def replica(d: ConsulDouble) -> tuple[CertificateAuthority, TokenStore, ConsulState]:
    state = ConsulState(consul.Consul(host="127.0.0.1", port=d.port, connections_timeout=5))
    return (CertificateAuthority(state, trust_domain=lambda: DOMAIN), TokenStore(state), state)


def csr(service: str) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    request = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
               .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(
                   f"spiffe://{DOMAIN}/service/{service}")]), critical=False)
               .sign(key, hashes.SHA256()))
    return request.public_bytes(serialization.Encoding.PEM).decode()


def kv(d: ConsulDouble, key: str) -> bytes:
    with d.state.cond:
        return d.state.kv[key].value


def test_replicas_share_the_root_and_the_tokens(double: ConsulDouble) -> None:
    ca_a, tokens_a, _ = replica(double)
    ca_b, tokens_b, _ = replica(double)
    ca_a.start()
    ca_b.start()
    assert ca_a.trust_bundle() == ca_b.trust_bundle()
    assert len(ca_a.trust_bundle()) == 1
    assert ca_a.view().source == "consul"
    root_doc = json.loads(kv(double, "pymesh/ca/root"))
    assert len(root_doc["roots"]) == 1

    secret, record = tokens_a.create(["orders"])
    assert secret.encode() not in kv(double, "pymesh/ca/tokens")
    issued = ca_b.sign(csr("orders"), tokens_b.authenticate(secret))
    assert issued.trust_bundle == ca_a.trust_bundle()

    tokens_b.revoke(record.id)
    with pytest.raises(PermissionDenied, match="revoked"):
        tokens_a.authenticate(secret)

    ca_b.rotate()
    assert len(ca_a.trust_bundle()) == 2
    assert ca_a.trust_bundle() == ca_b.trust_bundle()
    assert [r.state for r in ca_a.view().roots] == ["active", "retiring"]


class RacedState:
    """A ConsulState whose next write is preceded by `race()`: another replica's write that
    lands between this one's read and its check-and-set."""

    def __init__(self, inner: ConsulState) -> None:
        self.inner = inner
        self.source = inner.source
        self.race: Callable[[], object] | None = None
        self.lost = 0

    def read(self, name: str) -> tuple[bytes | None, str]:
        return self.inner.read(name)

    def write(self, name: str, data: bytes, version: str) -> bool:
        race, self.race = self.race, None
        if race is not None:
            race()
        ok = self.inner.write(name, data, version)
        self.lost += not ok
        return ok


def test_a_lost_check_and_set_is_retried_and_loses_nothing(double: ConsulDouble) -> None:
    ca_a, tokens_a, state_a = replica(double)
    ca_b, tokens_b, _ = replica(double)
    raced = RacedState(state_a)
    tokens = TokenStore(raced)
    raced.race = lambda: tokens_b.create(["payments"])
    _, mine = tokens.create(["orders"])
    assert raced.lost == 1
    assert sorted(t.services for t in tokens_a.list()) == [("orders",), ("payments",)]
    assert mine.id in {t.id for t in tokens_b.list()}

    ca_b.start()
    ca = CertificateAuthority(raced, trust_domain=lambda: DOMAIN)
    raced.race = ca_b.rotate
    ca.rotate()
    assert raced.lost == 2
    assert [r.state for r in ca_a.view().roots] == ["active", "retiring", "retiring"]
    assert len(ca_b.trust_bundle()) == 3


def test_consul_down_keeps_the_root_and_refuses_token_checks(double: ConsulDouble) -> None:
    ca, tokens, _ = replica(double)
    ca.start()
    secret, _ = tokens.create(["orders"])
    record = tokens.authenticate(secret)
    bundle = ca.trust_bundle()
    double.set_unavailable("refuse")
    try:
        # the roots last read still sign; whether a token is still valid cannot be known
        assert ca.sign(csr("orders"), record).trust_bundle == bundle
        with pytest.raises(Unavailable, match="Consul did not answer"):
            tokens.authenticate(secret)
        with pytest.raises(Unavailable):
            ca.rotate()
    finally:
        double.set_available()
    assert ca.trust_bundle() == bundle  # not regenerated


def test_a_replica_starting_while_consul_is_down_answers_unavailable(
        double: ConsulDouble) -> None:
    ca, _, _ = replica(double)
    double.set_unavailable("refuse")
    try:
        ca.start()  # logs, does not raise: the control plane still starts
        with pytest.raises(Unavailable):
            ca.trust_bundle()
    finally:
        double.set_available()
    assert len(ca.trust_bundle()) == 1
