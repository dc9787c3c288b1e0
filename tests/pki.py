"""A small certificate authority for tests: roots, workload certificates shaped like the mesh
CA's (docs/identity.md), and the odd ones the tests need (expired, other names, no SPIFFE ID).
"""

from __future__ import annotations

import datetime
import itertools
import time
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sidecar.identity import Identity, dns_name, identity_from_pem, private_key_pem, spiffe_id

TRUST_DOMAIN = "mesh.local"
_serials = itertools.count(1000)


def _utc(ts: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC)


class TestCA:
    __test__ = False  # not a pytest class

    def __init__(self, name: str = "test root", trust_domain: str = TRUST_DOMAIN) -> None:
        self.trust_domain = trust_domain
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = time.time()
        self.cert = (x509.CertificateBuilder()
                     .subject_name(self.name).issuer_name(self.name)
                     .public_key(self.key.public_key())
                     .serial_number(next(_serials))
                     .not_valid_before(_utc(now - 3600)).not_valid_after(_utc(now + 86400 * 30))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None),
                                    critical=True)
                     .add_extension(x509.KeyUsage(
                         digital_signature=True, content_commitment=False,
                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                         key_cert_sign=True, crl_sign=True, encipher_only=False,
                         decipher_only=False), critical=True)
                     .add_extension(x509.SubjectKeyIdentifier.from_public_key(
                         self.key.public_key()), critical=False)
                     .sign(self.key, hashes.SHA256()))
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM)

    def certificate(self, public_key: ec.EllipticCurvePublicKey, *, uris: Sequence[str],
                    dns: Sequence[str], not_before: float, not_after: float) -> bytes:
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
        sans += [x509.DNSName(d) for d in dns]
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([])).issuer_name(self.name)
                   .public_key(public_key).serial_number(next(_serials))
                   .not_valid_before(_utc(not_before)).not_valid_after(_utc(not_after))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                                  critical=True)
                   .add_extension(x509.KeyUsage(
                       digital_signature=True, content_commitment=False,
                       key_encipherment=False, data_encipherment=False, key_agreement=False,
                       key_cert_sign=False, crl_sign=False, encipher_only=False,
                       decipher_only=False), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                         ExtendedKeyUsageOID.CLIENT_AUTH]),
                                  critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       self.key.public_key()), critical=False))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    def issue(self, service: str, *, ttl: float = 3600.0, now: float | None = None,
              expired: bool = False, uris: Sequence[str] | None = None,
              dns: Sequence[str] | None = None,
              bundle: Sequence[bytes] | None = None) -> Identity:
        """A workload identity for `service`, trusting this root (or `bundle`)."""
        now = time.time() if now is None else now
        key = ec.generate_private_key(ec.SECP256R1())
        not_before, not_after = now - 60, now + ttl
        if expired:
            not_before, not_after = now - 2 * ttl, now - ttl
        cert = self.certificate(
            key.public_key(),
            uris=[spiffe_id(self.trust_domain, service)] if uris is None else uris,
            dns=[dns_name(self.trust_domain, service)] if dns is None else dns,
            not_before=not_before, not_after=not_after)
        if uris is not None and len(uris) != 1:
            # identity_from_pem insists on one SPIFFE ID: build the odd ones by hand
            leaf = x509.load_pem_x509_certificate(cert)
            return Identity(spiffe_id="", private_key_pem=private_key_pem(key),
                            certificate_chain_pem=cert,
                            trust_bundle_pem=tuple(bundle or (self.pem,)),
                            not_before=not_before, not_after=not_after,
                            serial=leaf.serial_number)
        return identity_from_pem(private_key_pem(key), cert, tuple(bundle or (self.pem,)))

    def sign_csr(self, csr_pem: str, *, now: float, ttl: float) -> str:
        """What the mesh CA does with a good CSR: the names from its URI SAN, nothing else."""
        csr = x509.load_pem_x509_csr(csr_pem.encode())
        assert csr.is_signature_valid
        uri = csr.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier)[0]
        service = uri.rsplit("/", 1)[1]
        public_key = csr.public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        return self.certificate(public_key, uris=[uri],
                                dns=[dns_name(self.trust_domain, service)],
                                not_before=now - 60, not_after=now + ttl).decode()


class LoadedCA(TestCA):
    """A TestCA around an existing root and its key, e.g. the mesh CA's own root read from the
    control plane's state: it mints what the mesh CA never would (an expired certificate, a
    name no token allows) under the root every sidecar trusts, so a refusal can only come
    from the check under test, not from an unknown issuer."""

    def __init__(self, cert_pem: bytes, key_pem: bytes, trust_domain: str = TRUST_DOMAIN) -> None:
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise TypeError(f"LoadedCA needs an EC root key, got {type(key).__name__}")
        self.trust_domain = trust_domain
        self.key = key
        self.cert = x509.load_pem_x509_certificate(cert_pem)
        self.name = self.cert.subject
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM)
