"""X.509 with the `cryptography` package: roots, CSR checks, workload certificates.

Pure functions of their inputs (the time is a parameter), so the CA's rules can be tested
with a fake clock. Names and the order of the checks are the contract of docs/identity.md.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from control_plane.ca.spiffe import IdentityError, dns_name, service_of, spiffe_id

ROOT_LIFETIME = 10 * 365 * 86400.0  # 10 years
BACKDATE = 60.0  # not_before this far in the past: peers' clocks are never exactly ours
MAX_CSR_BYTES = 16 * 1024
MIN_RSA_BITS = 2048
WORKLOAD_CURVES = (ec.SECP256R1, ec.SECP384R1)

SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


class CsrError(ValueError):
    """The CSR cannot be signed; the message says why (INVALID_ARGUMENT for the caller)."""


class CaConfigError(ValueError):
    """A CA certificate or key that cannot be used (operator input, or a damaged state)."""


def _when(seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, dt.UTC)


def seconds(when: dt.datetime) -> float:
    return when.timestamp()


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def key_pem(key: SigningKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _hash_for(key: SigningKey) -> hashes.SHA256 | hashes.SHA384 | None:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return None
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


def _same_public_key(a: object, b: object) -> bool:
    def raw(k: object) -> bytes:
        return k.public_bytes(serialization.Encoding.DER,  # type: ignore[attr-defined,no-any-return]
                              serialization.PublicFormat.SubjectPublicKeyInfo)

    return raw(a) == raw(b)


# --- roots -----------------------------------------------------------------------------------
def generate_root(now: float, *, lifetime: float = ROOT_LIFETIME,
                  organization: str = "pymesh") -> tuple[x509.Certificate, SigningKey]:
    """A self-signed EC P-256 root. Its CN carries the creation time and the start of its key
    id, so that the two roots of a rotation are told apart by name as well as by fingerprint."""
    key = ec.generate_private_key(ec.SECP256R1())
    stamp = _when(now).strftime("%Y-%m-%dT%H:%M:%SZ")
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    # two roots must never share a name: verifiers look issuers up by name
    cn = f"{organization} root CA {stamp} {ski.digest.hex()[:8]}"
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_when(now - BACKDATE))
            .not_valid_after(_when(now + lifetime))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


@dataclass(frozen=True, slots=True)
class CaPair:
    """A CA that can sign: its certificate and key, the intermediates between it and the trust
    anchor (empty for a self-signed root), and the anchor itself (what the bundle carries)."""

    cert: x509.Certificate
    key: SigningKey
    chain: tuple[x509.Certificate, ...]
    anchor: x509.Certificate

    @property
    def intermediates(self) -> tuple[x509.Certificate, ...]:
        """What a workload sends after its own certificate: every CA certificate below the
        anchor (nothing when the CA is the self-signed root itself)."""
        if fingerprint(self.cert) == fingerprint(self.anchor):
            return ()
        return (self.cert, *self.chain)


def load_certificates(data: bytes, what: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise CaConfigError(f"{what}: not a PEM certificate ({e})") from None
    if not certs:
        raise CaConfigError(f"{what}: no certificate in it")
    return certs


def load_private_key(data: bytes, what: str) -> SigningKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise CaConfigError(f"{what}: the key is encrypted; supply it unencrypted (mode 0600)"
                            ) from None
    except (ValueError, UnsupportedAlgorithm) as e:
        raise CaConfigError(f"{what}: not a PEM private key ({e})") from None
    if isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
                  | ed25519.Ed25519PrivateKey):
        return key
    raise CaConfigError(f"{what}: unsupported key type {type(key).__name__} (use EC, RSA or "
                        "Ed25519)")


def _verify_issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    if not bc.ca:
        return False
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return True
    return ku.key_cert_sign


def ca_pair(certs: Sequence[x509.Certificate], key: SigningKey, now: float,
            what: str = "the CA") -> CaPair:
    """Check an operator's (or the stored) CA and make a CaPair of it.

    `certs` is the CA certificate, then optionally the chain up to a self-signed root. The key
    must be the first certificate's; every certificate must be a CA and valid now."""
    if not certs:
        raise CaConfigError(f"{what}: no certificate")
    cert = certs[0]
    if not _same_public_key(cert.public_key(), key.public_key()):
        raise CaConfigError(f"{what}: the private key does not belong to the certificate")
    for i, c in enumerate(certs):
        label = "certificate" if i == 0 else f"chain certificate {i}"
        if not _is_ca(c):
            raise CaConfigError(f"{what}: the {label} ({c.subject.rfc4514_string()}) is not a CA "
                                "certificate (basicConstraints CA=true and keyCertSign needed)")
        if not seconds(c.not_valid_before_utc) <= now <= seconds(c.not_valid_after_utc):
            raise CaConfigError(f"{what}: the {label} ({c.subject.rfc4514_string()}) is not "
                                f"valid now (valid {c.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ} "
                                f"to {c.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ})")
        if i + 1 < len(certs) and not _verify_issued_by(c, certs[i + 1]):
            raise CaConfigError(f"{what}: {label} is not signed by the next certificate in "
                                "the file (list the CA certificate first, then its issuers up "
                                "to the root)")
    anchor = certs[-1]
    if not _verify_issued_by(anchor, anchor):
        raise CaConfigError(f"{what}: the last certificate ({anchor.subject.rfc4514_string()}) "
                            "is not a self-signed root: append the chain up to the root")
    return CaPair(cert, key, tuple(certs[1:-1]), anchor)


# --- CSRs ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class CheckedCsr:
    """A CSR whose signature verified, with the workload identity it asks for."""

    public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey
    service: str
    spiffe_id: str
    dns_name: str


def parse_csr(csr_pem: str | bytes) -> x509.CertificateSigningRequest:
    """A CSR whose self-signature verifies (the holder of its key made it, and no byte of it
    changed since), or CsrError."""
    data = csr_pem.encode() if isinstance(csr_pem, str) else csr_pem
    if not data.strip():
        raise CsrError("csr_pem is empty")
    if len(data) > MAX_CSR_BYTES:
        raise CsrError(f"csr_pem is too large ({len(data)} bytes, at most {MAX_CSR_BYTES})")
    try:
        csr = x509.load_pem_x509_csr(data)
        valid = csr.is_signature_valid
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise CsrError(f"tampered or malformed CSR: cannot parse it ({e})") from None
    if not valid:
        raise CsrError("tampered or malformed CSR: its signature does not verify")
    return csr


def check_csr(csr: x509.CertificateSigningRequest, trust_domain: str) -> CheckedCsr:
    """The identity a verified CSR asks for: exactly one URI SAN, the SPIFFE ID of a service
    in this trust domain; at most the matching DNS SAN besides; a key gRPC peers accept."""
    key = csr.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, WORKLOAD_CURVES):
            raise CsrError(f"unsupported key curve {key.curve.name} (use P-256 or P-384)")
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise CsrError(f"RSA key too small ({key.key_size} bits, at least {MIN_RSA_BITS})")
    else:
        raise CsrError(f"unsupported key type {type(key).__name__} (use EC P-256)")
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise CsrError("the CSR has no subjectAltName: it must carry the workload's SPIFFE ID "
                       f"as a URI SAN ({spiffe_id(trust_domain, 'NAME')})") from None
    except ValueError as e:  # a malformed extension (x509.DuplicateExtension is one)
        raise CsrError(f"tampered or malformed CSR: {e}") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise CsrError(f"the CSR must carry exactly one URI SAN (the SPIFFE ID), it has "
                       f"{len(uris)}")
    try:
        service = service_of(uris[0], trust_domain)
    except IdentityError as e:
        raise CsrError(str(e)) from None
    expected_dns = dns_name(trust_domain, service)
    for name in san:
        if isinstance(name, x509.UniformResourceIdentifier):
            continue
        if isinstance(name, x509.DNSName) and name.value == expected_dns:
            continue
        raise CsrError(f"unexpected SAN {name.value!r} in the CSR (only the SPIFFE ID and "
                       f"{expected_dns!r} are allowed)")
    return CheckedCsr(key, service, uris[0], expected_dns)


# --- workload certificates -------------------------------------------------------------------
def issue(signer: CaPair, csr: CheckedCsr, now: float, ttl: float) -> x509.Certificate:
    """The workload certificate for a checked CSR: only the names the CA derived go in (nothing
    else of the CSR is copied), valid from a minute ago until `ttl` from now or the signer's own
    end, whichever is first."""
    not_after = min(now + ttl, seconds(signer.cert.not_valid_after_utc))
    for c in signer.chain:
        not_after = min(not_after, seconds(c.not_valid_after_utc))
    rsa_key = isinstance(csr.public_key, rsa.RSAPublicKey)
    ski = signer.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value \
        if _has(signer.cert, x509.SubjectKeyIdentifier) else \
        x509.SubjectKeyIdentifier.from_public_key(signer.key.public_key())
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([
                   x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pymesh"),
                   x509.NameAttribute(NameOID.COMMON_NAME, csr.service[:64])]))
               .issuer_name(signer.cert.subject)
               .public_key(csr.public_key)
               .serial_number(x509.random_serial_number())
               .not_valid_before(_when(now - BACKDATE))
               .not_valid_after(_when(not_after))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                            key_encipherment=rsa_key, data_encipherment=False,
                                            key_agreement=False, key_cert_sign=False,
                                            crl_sign=False, encipher_only=False,
                                            decipher_only=False),
                              critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                     ExtendedKeyUsageOID.CLIENT_AUTH]),
                              critical=False)
               .add_extension(x509.SubjectAlternativeName([
                   x509.UniformResourceIdentifier(csr.spiffe_id),
                   x509.DNSName(csr.dns_name)]), critical=False)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(csr.public_key),
                              critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                              critical=False))
    return builder.sign(signer.key, _hash_for(signer.key))


def _has(cert: x509.Certificate, ext: type[x509.ExtensionType]) -> bool:
    try:
        cert.extensions.get_extension_for_class(ext)
    except x509.ExtensionNotFound:
        return False
    return True


def verify_signature(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Whether `issuer`'s key made `cert`'s signature (no validity or name checks)."""
    return _verify_issued_by(cert, issuer)


__all__ = ["BACKDATE", "ROOT_LIFETIME", "CaConfigError", "CaPair", "CheckedCsr", "CsrError",
           "SigningKey", "ca_pair", "check_csr", "fingerprint", "generate_root", "issue",
           "key_pem", "load_certificates", "load_private_key", "parse_csr", "pem", "seconds",
           "verify_signature"]
