"""mesh.v1.PolicyService: Apply/Get/List/Delete over a policy store.

The wire carries each spec as a google.protobuf.Struct; this module turns it back into the
document a user wrote, lets control_plane.policy.validate judge it, and hands compiled
resources to the store, which decides the cross-resource rules and versions atomically. The
store is synchronous (a file write, or an HTTP call to Consul), so every call runs in a thread
and never blocks the event loop that also serves ADS.

Errors, as a client sees them:
- a bad document or request: INVALID_ARGUMENT, a message naming every bad field, and a
  google.rpc.BadRequest with one field violation per problem (paths like
  `documents[1].spec.routes[0].split[0].subset`, documents[i] being request.resources[i]);
- a stale resource_version: ABORTED; a missing resource: NOT_FOUND;
- the store's backend (Consul) not answering: UNAVAILABLE, message starting "policy store
  unavailable"; any other store failure: INTERNAL.
A rejected request changes nothing: the store applies all of a request or none of it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf import any_pb2, json_format
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from mesh.v1 import policy_pb2, policy_pb2_grpc

from control_plane.policy import schema
from control_plane.policy.serialize import spec_to_dict
from control_plane.policy.store import (
    Conflict,
    NotFound,
    PolicyStore,
    StoreError,
    StoreUnavailable,
)
from control_plane.policy.validate import FieldViolation, ValidationError, validate_documents

log = logging.getLogger(__name__)

T = TypeVar("T")

# Trailers are limited in size (grpc's default for received metadata is 8 KiB, and the
# details travel base64-encoded), so a request with very many problems reports the first ones
# and says how many more there are.
MAX_DETAILS_BYTES = 4096
MAX_MESSAGE_CHARS = 1024
MAX_DESCRIPTION_CHARS = 300
UNAVAILABLE_PREFIX = "policy store unavailable"


# --- wire <-> documents --------------------------------------------------------------------
def to_document(resource: policy_pb2.Resource) -> dict[str, Any]:
    """The document the validator reads. Absent parts stay absent so the validator reports
    them as missing rather than as empty strings."""
    doc: dict[str, Any] = {}
    if resource.kind:
        doc["kind"] = resource.kind
    metadata: dict[str, Any] = {}
    if resource.name:
        metadata["name"] = resource.name
    if resource.resource_version:
        metadata["resourceVersion"] = resource.resource_version
    if resource.name or resource.resource_version:
        doc["metadata"] = metadata
    if resource.HasField("spec"):
        doc["spec"] = json_format.MessageToDict(resource.spec)
    return doc


def to_timestamp(seconds: float | None) -> Timestamp | None:
    if seconds is None:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def to_proto(resource: schema.Resource) -> policy_pb2.Resource:
    """A stored resource in its canonical document form (every default spelled out)."""
    msg = policy_pb2.Resource(kind=resource.kind, name=resource.name,
                              resource_version=resource.resource_version,
                              create_time=to_timestamp(resource.create_time),
                              update_time=to_timestamp(resource.update_time))
    msg.spec.update(spec_to_dict(resource.spec))
    return msg


# --- errors --------------------------------------------------------------------------------
def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def bad_request_status(violations: Sequence[FieldViolation]) -> grpc.Status:
    """INVALID_ARGUMENT naming every bad field, with a BadRequest listing field and reason."""
    bad = error_details_pb2.BadRequest()
    size = 0
    for i, v in enumerate(violations):
        entry = error_details_pb2.BadRequest.FieldViolation(
            field=_clip(v.field, 200), description=_clip(v.description, MAX_DESCRIPTION_CHARS))
        size += entry.ByteSize() + 3
        if size > MAX_DETAILS_BYTES:
            rest = len(violations) - i
            bad.field_violations.append(error_details_pb2.BadRequest.FieldViolation(
                field="", description=f"... and {rest} more problem{'s' if rest > 1 else ''} "
                                      "(fix these first)"))
            break
        bad.field_violations.append(entry)
    detail = any_pb2.Any()
    detail.Pack(bad)
    fields = sorted({v.field or "(request)" for v in violations})
    noun = "field" if len(fields) == 1 else "fields"
    message = _clip(f"invalid request: {len(violations)} problem"
                    f"{'s' if len(violations) != 1 else ''} in {len(fields)} {noun}: "
                    + ", ".join(fields), MAX_MESSAGE_CHARS)
    return rpc_status.to_status(status_pb2.Status(code=code_pb2.INVALID_ARGUMENT,
                                                  message=message, details=[detail]))


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode,
                 message: str) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("unreachable")  # abort raises


async def _fail(context: grpc.aio.ServicerContext, exc: Exception) -> NoReturn:
    """The status a store or validation failure maps to (see the module docstring)."""
    if isinstance(exc, ValidationError):
        await context.abort_with_status(bad_request_status(exc.violations))
    if isinstance(exc, Conflict):
        await _abort(context, grpc.StatusCode.ABORTED, str(exc))
    if isinstance(exc, NotFound):
        await _abort(context, grpc.StatusCode.NOT_FOUND, str(exc))
    if isinstance(exc, StoreUnavailable):
        await _abort(context, grpc.StatusCode.UNAVAILABLE, f"{UNAVAILABLE_PREFIX}: {exc}")
    log.error("policy store failed: %s", exc)
    await _abort(context, grpc.StatusCode.INTERNAL, f"policy store error: {exc}")


def _check_kind(kind: str, *, required: bool) -> list[FieldViolation]:
    if not kind:
        return [FieldViolation("kind", "required")] if required else []
    if kind not in schema.KINDS:
        return [FieldViolation("kind", f'unknown kind "{kind}" (kinds: '
                                       f'{", ".join(schema.KINDS)})')]
    return []


def _check_name(name: str) -> list[FieldViolation]:
    return [] if name else [FieldViolation("name", "required")]


class PolicyServicer(policy_pb2_grpc.PolicyServiceServicer):
    """grpc.aio servicer over a control_plane.policy.store.PolicyStore."""

    def __init__(self, store: PolicyStore) -> None:
        self._store = store

    async def _run(self, context: grpc.aio.ServicerContext, fn: Callable[..., T], *args: Any,
                   **kwargs: Any) -> T:
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except (ValidationError, StoreError) as exc:
            await _fail(context, exc)

    async def Apply(self, request: policy_pb2.ApplyRequest,
                    context: grpc.aio.ServicerContext) -> policy_pb2.ApplyResponse:
        if not request.resources:
            await _fail(context, ValidationError([FieldViolation(
                "resources", "at least one resource is required")]))
        docs = [to_document(r) for r in request.resources]
        try:
            resources = validate_documents(docs)
        except ValidationError as exc:
            await _fail(context, exc)
        applied = await self._run(context, self._store.apply_report, resources,
                                  dry_run=request.dry_run)
        return policy_pb2.ApplyResponse(resources=[to_proto(a.resource) for a in applied],
                                        results=[a.result for a in applied])

    async def Get(self, request: policy_pb2.GetRequest,
                  context: grpc.aio.ServicerContext) -> policy_pb2.Resource:
        problems = _check_kind(request.kind, required=True) + _check_name(request.name)
        if problems:
            await _fail(context, ValidationError(problems))
        found = await self._run(context, self._store.get, request.kind, request.name)
        if found is None:
            await _fail(context, NotFound(f'{request.kind} "{request.name}" not found'))
        return to_proto(found)

    async def List(self, request: policy_pb2.ListRequest,
                   context: grpc.aio.ServicerContext) -> policy_pb2.ListResponse:
        problems = _check_kind(request.kind, required=False)
        if problems:
            await _fail(context, ValidationError(problems))
        found = await self._run(context, self._store.list, request.kind or None)
        ordered = sorted(found, key=lambda r: (r.kind, r.name))
        return policy_pb2.ListResponse(resources=[to_proto(r) for r in ordered])

    async def Delete(self, request: policy_pb2.DeleteRequest,
                     context: grpc.aio.ServicerContext) -> policy_pb2.DeleteResponse:
        problems = _check_kind(request.kind, required=True) + _check_name(request.name)
        if request.resource_version and not request.resource_version.isdigit():
            problems.append(FieldViolation("resource_version", "invalid resource version "
                                           f'"{request.resource_version}" (the version a get '
                                           "returned)"))
        if problems:
            await _fail(context, ValidationError(problems))
        deleted = await self._run(context, self._store.delete, request.kind, request.name,
                                  request.resource_version or None)
        return policy_pb2.DeleteResponse(resource=to_proto(deleted))


def add_to_server(server: grpc.aio.Server, store: PolicyStore) -> PolicyServicer:
    servicer = PolicyServicer(store)
    policy_pb2_grpc.add_PolicyServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    return servicer
