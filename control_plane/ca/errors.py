"""What the CA and the token store refuse, by who is at fault; ca_api maps each to a status."""

from __future__ import annotations

from collections.abc import Sequence


class CaError(Exception):
    """Base: the message is shown to the caller as it is, so it names what is wrong."""


class Unauthenticated(CaError):
    """No token, an unknown one, or an expired one."""


class PermissionDenied(CaError):
    """A known token that may not do this (revoked, or the service is not among its own)."""


class InvalidArgument(CaError):
    """A malformed request; `violations` are (field, reason) pairs when fields are to blame."""

    def __init__(self, message: str, violations: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.violations = list(violations)


class NotFound(CaError):
    pass


class FailedPrecondition(CaError):
    """Not possible in the CA's configuration (e.g. rotating a root the operator supplies)."""


class Unavailable(CaError):
    """The CA's state (Consul KV) could not be read or written; nothing was changed."""
