"""mesh.v1 CertificateService, TokenService and CaAdminService (protos/mesh/v1/ca.proto) as
grpc.aio servicers over control_plane.ca.

The CA core is synchronous (key generation, signing, a file write or a Consul call), so every
call runs in a thread and never blocks the event loop that also serves ADS. Statuses, as a
client sees them: a missing, unknown or expired token UNAUTHENTICATED; a revoked token, or a
service the token may not claim, PERMISSION_DENIED; a bad CSR or request INVALID_ARGUMENT
(with a google.rpc.BadRequest naming the field); an unknown token id NOT_FOUND; rotating an
operator-supplied root FAILED_PRECONDITION; the CA's state (Consul) not answering UNAVAILABLE.
Every refusal issues and stores nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf import any_pb2
from google.protobuf.duration_pb2 import Duration
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from mesh.v1 import ca_pb2, ca_pb2_grpc

from control_plane.ca import (
    CaError,
    CaView,
    CertificateAuthority,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    TokenRecord,
    TokenStore,
    Unauthenticated,
    Unavailable,
)
from control_plane.ca.tokens import DEFAULT_TTL as DEFAULT_TOKEN_TTL
from control_plane.policy_api import to_timestamp

log = logging.getLogger(__name__)

T = TypeVar("T")

AUTHORIZATION = "authorization"
_CODES: dict[type[CaError], grpc.StatusCode] = {
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
}


def status_code(error: CaError) -> grpc.StatusCode:
    for kind, code in _CODES.items():
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL


def bearer_token(metadata: Any) -> str | None:
    """The token of `authorization: Bearer <token>`; None when absent. A malformed value is
    Unauthenticated saying what is expected."""
    values = [v for k, v in (metadata or ()) if k.lower() == AUTHORIZATION]
    if not values:
        return None
    if len(values) > 1:
        raise Unauthenticated("more than one authorization metadata entry")
    value = values[0] if isinstance(values[0], str) else values[0].decode("latin-1")
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("authorization metadata must be `Bearer <bootstrap token>`")
    return token.strip()


def _duration(seconds: float) -> Duration:
    d = Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def token_proto(record: TokenRecord) -> ca_pb2.Token:
    return ca_pb2.Token(id=record.id, services=list(record.services),
                        create_time=to_timestamp(record.created),
                        expire_time=to_timestamp(record.expires),
                        revoke_time=to_timestamp(record.revoked), description=record.description)


def ca_status_proto(view: CaView) -> ca_pb2.CaStatus:
    return ca_pb2.CaStatus(
        roots=[ca_pb2.Root(certificate_pem=r.certificate_pem, subject=r.subject,
                           fingerprint_sha256=r.fingerprint, not_before=to_timestamp(r.not_before),
                           not_after=to_timestamp(r.not_after), state=r.state,
                           sign_from=to_timestamp(r.sign_from),
                           retire_time=to_timestamp(r.retire_at))
               for r in view.roots],
        trust_domain=view.trust_domain, workload_ttl=_duration(view.ttl), source=view.source)


def invalid_argument_status(error: InvalidArgument) -> grpc.Status:
    """INVALID_ARGUMENT with the error's own message (what a sidecar logs) and a
    google.rpc.BadRequest naming each field (what meshctl lists)."""
    bad = error_details_pb2.BadRequest(field_violations=[
        error_details_pb2.BadRequest.FieldViolation(field=f, description=d[:300])
        for f, d in error.violations])
    detail = any_pb2.Any()
    detail.Pack(bad)
    return rpc_status.to_status(status_pb2.Status(code=code_pb2.INVALID_ARGUMENT,
                                                  message=str(error)[:1024], details=[detail]))


async def _fail(context: grpc.aio.ServicerContext, error: CaError) -> NoReturn:
    code = status_code(error)
    if isinstance(error, InvalidArgument) and error.violations:
        await context.abort_with_status(invalid_argument_status(error))
    await context.abort(code, str(error))
    raise AssertionError("unreachable")  # abort raises


async def _run(context: grpc.aio.ServicerContext, fn: Callable[..., T], *args: Any) -> T:
    try:
        return await asyncio.to_thread(fn, *args)
    except CaError as e:
        await _fail(context, e)


def _peer(context: grpc.aio.ServicerContext) -> str:
    try:
        return str(context.peer())
    except Exception:  # only for a log line
        return "?"


class CertificateServicer(ca_pb2_grpc.CertificateServiceServicer):
    def __init__(self, ca: CertificateAuthority, tokens: TokenStore) -> None:
        self._ca = ca
        self._tokens = tokens

    def _sign(self, token: str | None, csr_pem: str) -> Any:
        record = self._tokens.authenticate(token)
        return self._ca.sign(csr_pem, record)

    async def Sign(self, request: ca_pb2.SignRequest,
                   context: grpc.aio.ServicerContext) -> ca_pb2.SignResponse:
        try:
            token = bearer_token(context.invocation_metadata())
            issued = await asyncio.to_thread(self._sign, token, request.csr_pem)
        except CaError as e:
            if not isinstance(e, Unavailable):
                log.warning("certificate request from %s refused: %s", _peer(context), e)
            await _fail(context, e)
        return ca_pb2.SignResponse(certificate_pem=issued.certificate_pem,
                                   trust_bundle_pem=list(issued.trust_bundle),
                                   not_after=to_timestamp(issued.not_after),
                                   not_before=to_timestamp(issued.not_before),
                                   spiffe_id=issued.spiffe_id)

    async def TrustBundle(self, request: ca_pb2.TrustBundleRequest,
                          context: grpc.aio.ServicerContext) -> ca_pb2.TrustBundleResponse:
        bundle = await _run(context, self._ca.trust_bundle)
        domain = await _run(context, self._ca.trust_domain)
        return ca_pb2.TrustBundleResponse(trust_bundle_pem=list(bundle), trust_domain=domain)


class TokenServicer(ca_pb2_grpc.TokenServiceServicer):
    def __init__(self, tokens: TokenStore) -> None:
        self._tokens = tokens

    async def Create(self, request: ca_pb2.CreateTokenRequest,
                     context: grpc.aio.ServicerContext) -> ca_pb2.CreateTokenResponse:
        ttl: float | None = DEFAULT_TOKEN_TTL
        if request.HasField("ttl"):
            nanos = request.ttl.ToNanoseconds()
            if nanos < 0:
                await _fail(context, InvalidArgument("ttl must not be negative",
                                                     [("ttl", "must not be negative")]))
            ttl = None if nanos == 0 else nanos / 1e9
        secret, record = await _run(context, self._tokens.create, list(request.services), ttl,
                                    request.description)
        log.info("bootstrap token %s created for %s", record.id, ", ".join(record.services))
        return ca_pb2.CreateTokenResponse(token=token_proto(record), secret=secret)

    async def List(self, request: ca_pb2.ListTokensRequest,
                   context: grpc.aio.ServicerContext) -> ca_pb2.ListTokensResponse:
        records = await _run(context, self._tokens.list)
        return ca_pb2.ListTokensResponse(tokens=[token_proto(r) for r in records])

    async def Revoke(self, request: ca_pb2.RevokeTokenRequest,
                     context: grpc.aio.ServicerContext) -> ca_pb2.RevokeTokenResponse:
        if not request.id.strip():
            await _fail(context, InvalidArgument("id is required", [("id", "required")]))
        record = await _run(context, self._tokens.revoke, request.id)
        log.info("bootstrap token %s revoked", record.id)
        return ca_pb2.RevokeTokenResponse(token=token_proto(record))


class CaAdminServicer(ca_pb2_grpc.CaAdminServiceServicer):
    def __init__(self, ca: CertificateAuthority) -> None:
        self._ca = ca

    async def Show(self, request: ca_pb2.ShowCaRequest,
                   context: grpc.aio.ServicerContext) -> ca_pb2.CaStatus:
        return ca_status_proto(await _run(context, self._ca.view))

    async def Rotate(self, request: ca_pb2.RotateRootRequest,
                     context: grpc.aio.ServicerContext) -> ca_pb2.CaStatus:
        after = request.activate_after.ToNanoseconds() / 1e9 \
            if request.HasField("activate_after") else 0.0
        return ca_status_proto(await _run(context, self._ca.rotate, after))


def add_to_server(server: grpc.aio.Server, ca: CertificateAuthority,
                  tokens: TokenStore) -> None:
    """Serve the three CA services on `server` (the control plane's gRPC port)."""
    ca_pb2_grpc.add_CertificateServiceServicer_to_server(  # type: ignore[no-untyped-call]
        CertificateServicer(ca, tokens), server)
    ca_pb2_grpc.add_TokenServiceServicer_to_server(  # type: ignore[no-untyped-call]
        TokenServicer(tokens), server)
    ca_pb2_grpc.add_CaAdminServiceServicer_to_server(  # type: ignore[no-untyped-call]
        CaAdminServicer(ca), server)
