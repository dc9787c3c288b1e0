"""The control plane's certificate authority (docs/identity.md): roots, CSR checks and
issuance (authority, certs, roots), bootstrap tokens (tokens), where both are kept (state)."""

from control_plane.ca.authority import (
    DEFAULT_TTL,
    CaView,
    CertificateAuthority,
    Issued,
    RootView,
    check_ttl,
    load_operator_ca,
)
from control_plane.ca.certs import CaConfigError
from control_plane.ca.errors import (
    CaError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from control_plane.ca.state import ConsulState, FileState, StateBackend
from control_plane.ca.tokens import TokenRecord, TokenStore

__all__ = ["DEFAULT_TTL", "CaConfigError", "CaError", "CaView", "CertificateAuthority",
           "ConsulState", "FailedPrecondition", "FileState", "InvalidArgument", "Issued",
           "NotFound", "PermissionDenied", "RootView", "StateBackend", "TokenRecord",
           "TokenStore", "Unauthenticated", "Unavailable", "check_ttl", "load_operator_ca"]
