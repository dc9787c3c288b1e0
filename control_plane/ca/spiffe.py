"""The names a workload certificate carries (docs/identity.md "Names").

A workload of service NAME in trust domain TD is `spiffe://TD/service/NAME` (the certificate's
only URI SAN) and `NAME.svc.TD` (its DNS SAN, because grpcio's TLS client checks a host name).
The sidecar, translation (RBAC principals) and the CA must agree on these strings exactly, so
they are built here and nowhere else on the control-plane side.
"""

from __future__ import annotations

import re

# The same shapes the policy validator accepts for service names and trust domains.
SERVICE_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?")
TRUST_DOMAIN = re.compile(r"[a-z0-9._-]{1,255}")
SCHEME = "spiffe://"
WORKLOAD_PATH = "/service/"


class IdentityError(ValueError):
    """A name that is not a workload identity of this mesh; the message says why."""


def check_service_name(name: str) -> str:
    if not SERVICE_NAME.fullmatch(name):
        raise IdentityError(f"invalid service name {name!r}: 1-63 letters, digits, '.', '_' or "
                            "'-', starting and ending with a letter or digit")
    return name


def spiffe_id(trust_domain: str, service: str) -> str:
    return f"{SCHEME}{trust_domain}{WORKLOAD_PATH}{service}"


def dns_name(trust_domain: str, service: str) -> str:
    return f"{service}.svc.{trust_domain}"


def service_of(uri: str, trust_domain: str) -> str:
    """The service NAME of `spiffe://<trust_domain>/service/NAME`, or IdentityError.

    Strict on purpose: the CA signs what this accepts, so anything unusual (another trust
    domain, a query, a trailing slash, percent-encoding, upper-case scheme) is refused rather
    than normalised."""
    prefix = f"{SCHEME}{trust_domain}{WORKLOAD_PATH}"
    if not uri.startswith(SCHEME):
        raise IdentityError(f"URI SAN {uri!r} is not a SPIFFE ID (expected "
                            f"{spiffe_id(trust_domain, 'NAME')})")
    if not uri.startswith(prefix):
        domain = uri[len(SCHEME):].split("/", 1)[0]
        if domain != trust_domain:
            raise IdentityError(f"SPIFFE ID {uri!r} is not in this mesh's trust domain "
                                f"{trust_domain!r}")
        raise IdentityError(f"SPIFFE ID {uri!r} is not a workload identity (expected "
                            f"{spiffe_id(trust_domain, 'NAME')})")
    name = uri[len(prefix):]
    try:
        return check_service_name(name)
    except IdentityError as e:
        raise IdentityError(f"SPIFFE ID {uri!r}: {e}") from None
