"""`meshctl`: apply, inspect and delete mesh policy; see what the proxies run.

Exit codes are part of the interface, so scripts can tell who is at fault:
0 ok; 1 the control plane refused the request (invalid, conflict, not found); 2 the command
could not be formed (bad arguments, unreadable file, malformed YAML, a document that is not a
resource); 3 the control plane could not be reached. A user error never shows a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, NoReturn, TextIO, TypeVar

import grpc
import yaml
from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.struct_pb2 import Struct
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from mesh.v1 import policy_pb2, policy_pb2_grpc, status_pb2, status_pb2_grpc

EXIT_OK = 0
EXIT_REJECTED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

DEFAULT_CONTROL_PLANE = "127.0.0.1:15010"
ENV_CONTROL_PLANE = "MESH_CONTROL_PLANE"

KINDS = ("TrafficPolicy", "AuthorizationPolicy", "RateLimitPolicy", "MeshConfig")
_ALIASES = {
    "trafficpolicy": "TrafficPolicy", "trafficpolicies": "TrafficPolicy", "tp": "TrafficPolicy",
    "authorizationpolicy": "AuthorizationPolicy", "authorizationpolicies": "AuthorizationPolicy",
    "authz": "AuthorizationPolicy",
    "ratelimitpolicy": "RateLimitPolicy", "ratelimitpolicies": "RateLimitPolicy",
    "rl": "RateLimitPolicy",
    "meshconfig": "MeshConfig", "meshconfigs": "MeshConfig",
}
ALL_KINDS = "all"  # `get all`: every kind
PROXY_KINDS = ("proxy", "proxies", "sidecar", "sidecars")  # `describe proxy NODE_ID`

LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
RDS = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
XDS_TYPES = (("LDS", LDS), ("RDS", RDS), ("CDS", CDS), ("EDS", EDS))
# The xDS types whose content a policy kind changes (what `describe` checks a proxy ACKed).
KIND_TYPES = {"TrafficPolicy": (RDS, CDS), "AuthorizationPolicy": (LDS,),
              "RateLimitPolicy": (LDS,), "MeshConfig": (LDS, CDS)}

SYNCED, NOT_SENT, STALE, NACKED = "SYNCED", "NOT SENT", "STALE", "NACKED"

_TOP_FIELDS = ("kind", "metadata", "spec")
_METADATA_FIELDS = ("name", "resourceVersion")
_READ_ONLY_METADATA = ("createTime", "updateTime")  # in `get -o yaml` output; ignored on apply


class CliError(Exception):
    """A failure to report to the user: a message, detail lines, and the exit code."""

    def __init__(self, message: str, code: int, details: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.details = list(details)


def usage_error(message: str, details: Sequence[str] = ()) -> CliError:
    return CliError(message, EXIT_USAGE, details)


# --- names ---------------------------------------------------------------------------------
def resolve_kind(text: str) -> str:
    """The canonical kind for a user's spelling (any case, plural, or short alias)."""
    kind = _ALIASES.get(text.strip().lower())
    if kind is None:
        known = ", ".join(f"{k} ({'/'.join(_aliases_of(k))})" if _aliases_of(k) else k
                          for k in KINDS)
        raise usage_error(f"unknown kind {text!r}; known kinds: {known}")
    return kind


def _aliases_of(kind: str) -> list[str]:
    return [a for a, k in _ALIASES.items() if k == kind and a != kind.lower()
            and not a.endswith("s")]


def ref(kind: str, name: str) -> str:
    """`trafficpolicy/orders`, as apply and delete report it."""
    return f"{kind.lower()}/{name}"


_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):(\d{1,5})$")


def check_address(address: str) -> str:
    """HOST:PORT, or a usage error saying what is wrong with it."""
    match = _HOST_PORT.match(address.strip())
    if not match or not 0 < int(match.group(2)) < 65536:
        raise usage_error(f"invalid control plane address {address!r}: expected HOST:PORT, "
                          f"e.g. {DEFAULT_CONTROL_PLANE}")
    return address.strip()


# --- documents -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Document:
    """One YAML document of an input file, with where it came from for error messages."""

    source: str  # file name, or "<stdin>"
    index: int  # 1-based position among the non-empty documents of its source
    line: int  # 1-based line where it starts
    data: Any

    @property
    def where(self) -> str:
        return f"{self.source}: document {self.index} (line {self.line})"


def parse_documents(text: str, source: str) -> list[Document]:
    """Every non-empty YAML document of `text`; malformed YAML is a usage error with the line
    and column, raised before anything is sent."""
    docs: list[Document] = []
    loader = yaml.SafeLoader(text)
    try:
        while loader.check_node():
            node = loader.get_node()
            data = loader.construct_document(node) if node is not None else None
            if data is not None:
                line = node.start_mark.line + 1 if node is not None else 1
                docs.append(Document(source, len(docs) + 1, line, data))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        what = ": ".join(p for p in (exc.context, exc.problem) if p)
        raise usage_error(f"malformed YAML at {where}: {what}") from None
    except yaml.YAMLError as exc:
        raise usage_error(f"malformed YAML in {source}: {exc}") from None
    except RecursionError:
        raise usage_error(f"{source}: YAML nested too deeply") from None
    finally:
        loader.dispose()
    return docs


def read_documents(paths: Sequence[str], stdin: TextIO) -> list[Document]:
    docs: list[Document] = []
    for path in paths:
        if path == "-":
            source = "<stdin>"
            try:
                text = stdin.read()
            except (OSError, UnicodeDecodeError) as exc:
                raise usage_error(f"cannot read standard input: {exc}") from None
        else:
            try:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
            except (OSError, UnicodeDecodeError) as exc:
                reason = getattr(exc, "strerror", None) or str(exc)
                raise usage_error(f"cannot read {path}: {reason}") from None
            source = path
        docs.extend(parse_documents(text, source))
    return docs


MAX_VALUES = 100_000  # YAML aliases can make a tiny file expand without bound
MAX_DEPTH = 64


class _Budget:
    def __init__(self) -> None:
        self.left = MAX_VALUES


def _json_value(value: Any, path: str, problems: list[str], budget: _Budget | None = None,
                depth: int = 0) -> Any:
    """YAML values as JSON values a Struct can hold (dates become ISO strings)."""
    budget = budget or _Budget()
    budget.left -= 1
    if budget.left < 0 or depth > MAX_DEPTH:
        raise usage_error(f"{path}: the document is too large or too deeply nested "
                          f"(at most {MAX_VALUES} values, {MAX_DEPTH} levels)")
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            name = key if isinstance(key, str) else str(key).lower() if isinstance(key, bool) \
                else str(key)
            out[name] = _json_value(item, f"{path}.{name}", problems, budget, depth + 1)
        return out
    if isinstance(value, list | tuple):
        return [_json_value(item, f"{path}[{i}]", problems, budget, depth + 1)
                for i, item in enumerate(value)]
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        problems.append(f"{path}: {value} is not a finite number")
        return None
    if value is None or isinstance(value, bool | int | float | str):
        return value
    problems.append(f"{path}: unsupported value of type {type(value).__name__}")
    return None


def to_resource(doc: Document) -> policy_pb2.Resource:
    """The wire form of one document. Only what the wire cannot carry is checked here (the
    shape of the envelope); the control plane validates everything else."""
    data = doc.data
    if not isinstance(data, Mapping):
        raise usage_error(f"{doc.where}: expected a resource (a mapping with kind, metadata and "
                          f"spec), got {_type_name(data)}")
    problems: list[str] = []
    for key in data:
        if key not in _TOP_FIELDS:
            problems.append(f"{key}: unknown field (a resource has {', '.join(_TOP_FIELDS)})")
    kind = data.get("kind", "")
    if not isinstance(kind, str):
        problems.append(f"kind: must be a string, got {_type_name(kind)}")
    metadata = data.get("metadata", {})
    name, version = "", ""
    if not isinstance(metadata, Mapping):
        problems.append(f"metadata: must be a mapping, got {_type_name(metadata)}")
    else:
        for key in metadata:
            if key not in _METADATA_FIELDS and key not in _READ_ONLY_METADATA:
                problems.append(f"metadata.{key}: unknown field (metadata has "
                                f"{', '.join(_METADATA_FIELDS)})")
        name = metadata.get("name", "")
        if not isinstance(name, str):
            problems.append(f"metadata.name: must be a string, got {_type_name(name)}")
        version = metadata.get("resourceVersion", "")
        if isinstance(version, int) and not isinstance(version, bool):
            version = str(version)
        if not isinstance(version, str):
            problems.append(f"metadata.resourceVersion: must be a string, "
                            f"got {_type_name(version)}")
    spec = data.get("spec")
    if spec is not None and not isinstance(spec, Mapping):
        problems.append(f"spec: must be a mapping, got {_type_name(spec)}")
    spec_value = _json_value(spec, "spec", problems) if isinstance(spec, Mapping) else None
    if problems:
        raise usage_error(f"{doc.where} is not a valid resource:", problems)
    resource = policy_pb2.Resource(kind=str(kind), name=str(name), resource_version=str(version))
    if spec_value is not None:
        resource.spec.update(spec_value)
    return resource


def _type_name(value: Any) -> str:
    if value is None:
        return "nothing"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


# --- what the server returns, as plain data ------------------------------------------------
_FIRST_KEYS = {"name": 0, "service": 1}  # then alphabetical, as kubectl prints


def plain(value: Any) -> Any:
    """Struct numbers are doubles: show 3.0 as 3. A Struct keeps no key order, so keys come
    out in a stable one: name and service first, then alphabetical."""
    if isinstance(value, dict):
        keys = sorted(value, key=lambda k: (_FIRST_KEYS.get(k, len(_FIRST_KEYS)), k))
        return {k: plain(value[k]) for k in keys}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value


def spec_dict(spec: Struct) -> dict[str, Any]:
    return plain(json_format.MessageToDict(spec))  # type: ignore[no-any-return]


def _seconds(msg: Message, field: str) -> float | None:
    if not msg.HasField(field):
        return None
    ts: Timestamp = getattr(msg, field)
    return float(ts.seconds) + ts.nanos / 1e9


def iso(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def resource_doc(resource: policy_pb2.Resource) -> dict[str, Any]:
    """The kubectl-style document for a resource; `meshctl apply` takes it back as it is."""
    metadata: dict[str, Any] = {"name": resource.name}
    if resource.resource_version:
        metadata["resourceVersion"] = resource.resource_version
    for key, field in (("createTime", "create_time"), ("updateTime", "update_time")):
        if resource.HasField(field):
            metadata[key] = iso(_seconds(resource, field))
    return {"kind": resource.kind, "metadata": metadata, "spec": spec_dict(resource.spec)}


def age(seconds: float | None, now: float) -> str:
    """A short human duration like kubectl's AGE column: 45s, 3m20s, 25m, 5h10m, 20h, 3d."""
    if seconds is None:
        return "-"
    d = max(0, int(now - seconds))
    if d < 120:
        return f"{d}s"
    minutes, hours = d // 60, d // 3600
    if d < 600:
        return f"{minutes}m{d % 60}s" if d % 60 else f"{minutes}m"
    if d < 3 * 3600:
        return f"{minutes}m"
    if d < 8 * 3600:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if d < 48 * 3600:
        return f"{hours}h"
    return f"{d // 86400}d"


def summary(kind: str, spec: Mapping[str, Any]) -> str:
    """One line of what a resource does, for the table."""

    def get(*path: str) -> Any:
        value: Any = spec
        for key in path:
            value = value.get(key) if isinstance(value, Mapping) else None
        return value

    def count(key: str) -> int:
        value = spec.get(key)
        return len(value) if isinstance(value, list) else 0

    parts: list[str] = []
    if kind == "MeshConfig":
        for label, value in (("mtls", get("mtls", "mode")), ("trustDomain", get("trustDomain")),
                             ("sampling", get("tracing", "samplingPercent"))):
            if value is not None:
                parts.append(f"{label}={value}{'%' if label == 'sampling' else ''}")
        return " ".join(parts)
    if get("service") is not None:
        parts.append(f"service={get('service')}")
    if kind == "TrafficPolicy":
        if get("loadBalancer", "algorithm"):
            parts.append(f"lb={get('loadBalancer', 'algorithm')}")
        if get("timeout"):
            parts.append(f"timeout={get('timeout')}")
        subsets = [s.get("name") for s in spec.get("subsets") or []
                   if isinstance(s, Mapping) and s.get("name")]
        if subsets:
            parts.append(f"subsets={','.join(map(str, subsets))}")
        if count("routes"):
            parts.append(f"routes={count('routes')}")
    elif kind == "AuthorizationPolicy":
        parts.append(f"rules={count('rules')}")
    elif kind == "RateLimitPolicy":
        if get("tokensPerSecond") is not None:
            parts.append(f"{get('tokensPerSecond')}/s")
        if get("burst") is not None:
            parts.append(f"burst={get('burst')}")
        if count("overrides"):
            parts.append(f"overrides={count('overrides')}")
    return " ".join(parts)


# --- tables --------------------------------------------------------------------------------
def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Columns padded to their widest cell, three spaces apart (no trailing blanks)."""
    all_rows = [list(headers), *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(headers))]
    lines = ["   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in all_rows]
    return "\n".join(lines) + "\n"


def resources_table(resources: Sequence[policy_pb2.Resource], now: float) -> str:
    rows = [(r.name, r.kind, r.resource_version or "-",
             age(_seconds(r, "create_time") or _seconds(r, "update_time"), now),
             summary(r.kind, spec_dict(r.spec)) or "-")
            for r in resources]
    return table(("NAME", "KIND", "VERSION", "AGE", "SUMMARY"), rows)


def sync_state(t: status_pb2.XdsTypeStatus | None) -> str:
    """istioctl's words: nothing sent; the last push was ACKed; not answered yet; rejected."""
    if t is None or not (t.sent_nonce or t.sent_version or t.HasField("sent_at")):
        return NOT_SENT
    if t.nack_error or t.nack_nonce:
        if t.nack_nonce and t.sent_nonce:
            if t.nack_nonce == t.sent_nonce:
                return NACKED
        else:  # no nonces reported: the NACK is about the last push if it came after it
            nacked, sent = _seconds(t, "nacked_at"), _seconds(t, "sent_at")
            if nacked is not None and (sent is None or nacked >= sent):
                return NACKED
    if t.acked_version == t.sent_version and (t.acked_version or t.HasField("acked_at")):
        return SYNCED
    return STALE


def _types_by_url(proxy: status_pb2.ProxyStatus) -> dict[str, status_pb2.XdsTypeStatus]:
    return {t.type_url: t for t in proxy.types}


def last_ack(proxy: status_pb2.ProxyStatus) -> float | None:
    acks = [s for t in proxy.types if (s := _seconds(t, "acked_at")) is not None]
    return max(acks) if acks else None


def _one_line(text: str) -> str:
    return " ".join(text.split())


def proxy_errors(proxy: status_pb2.ProxyStatus) -> list[str]:
    """`CDS: <error>` for each type whose last push was NACKed."""
    by_url = _types_by_url(proxy)
    return [f"{short}: {_one_line(by_url[url].nack_error) or '(no error message)'}"
            for short, url in XDS_TYPES if sync_state(by_url.get(url)) == NACKED]


def proxy_status_table(proxies: Sequence[status_pb2.ProxyStatus], now: float,
                       wide: bool = False) -> str:
    headers = ["NAME", "SERVICE", *(short for short, _ in XDS_TYPES), "LAST ACK"]
    if wide:
        headers += ["INSTANCE", "TYPE", "CONNECTED", "ERRORS"]
    rows = []
    for p in proxies:
        by_url = _types_by_url(p)
        row = [p.node_id, p.service or "-", *(sync_state(by_url.get(url)) for _, url in XDS_TYPES),
               age(last_ack(p), now)]
        if wide:
            row += [p.instance_id or "-", "sidecar" if p.sidecar else "proxyless",
                    age(_seconds(p, "connected_since"), now), "; ".join(proxy_errors(p)) or "-"]
        rows.append(row)
    return table(headers, rows)


def endpoints_table(response: status_pb2.EndpointsResponse, with_service: bool) -> str:
    headers = ["INSTANCE", "ADDRESS", "VERSION", "ZONE", "HEALTHY", "SOURCE"]
    rows = []
    for e in response.endpoints:
        host = f"[{e.address}]" if ":" in e.address else e.address
        row = [e.instance_id, f"{host}:{e.port}", e.version or "-", e.zone or "-",
               "yes" if e.healthy else "no", e.source or "-"]
        rows.append([e.service, *row] if with_service else row)
    return table(["SERVICE", *headers] if with_service else headers, rows)


def registries_table(registries: Sequence[status_pb2.RegistryHealth], now: float) -> str:
    rows = []
    for r in registries:
        error = _one_line(r.last_error)
        when = _seconds(r, "last_error_at")
        if error and when is not None:
            error = f"{error} ({age(when, now)} ago)"
        rows.append([r.source, "yes" if r.healthy else "no", error or "-"])
    return table(["REGISTRY", "HEALTHY", "LAST ERROR"], rows)


def _indent(text: str, by: str = "  ") -> str:
    return "".join(f"{by}{line}\n" if line else "\n" for line in text.splitlines())


def _revision(resource_version: str) -> int | None:
    return int(resource_version) if resource_version.isdigit() else None


def proxy_has(proxy: status_pb2.ProxyStatus, kind: str, revision: int) -> str | None:
    """Whether a proxy runs config computed from policy revision `revision` or later, judged on
    the xDS types the kind affects; None when the control plane does not track revisions."""
    types = [t for t in proxy.types if t.type_url in KIND_TYPES.get(kind, (LDS, RDS, CDS))]
    if not types or any(t.acked_policy_revision == 0 and t.sent_policy_revision == 0
                        for t in types):
        return None
    lacking = [t for t in types if t.acked_policy_revision < revision]
    for t in lacking:
        if t.sent_policy_revision >= revision and sync_state(t) == NACKED:
            return f"NACKED ({_one_line(t.nack_error)})"
    if any(t.sent_policy_revision >= revision for t in lacking):
        return "pending (sent, not ACKed yet)"
    if lacking:
        return "no (not sent yet)"
    acked = max((s for t in types if (s := _seconds(t, "acked_at")) is not None), default=None)
    return f"yes (ACKed at {iso(acked)})" if acked is not None else "yes"


def describe_resource(resource: policy_pb2.Resource,
                      proxies: Sequence[status_pb2.ProxyStatus] | None, proxy_error: str,
                      now: float) -> str:
    created, updated = _seconds(resource, "create_time"), _seconds(resource, "update_time")
    out = [f"Name:              {resource.name}",
           f"Kind:              {resource.kind}",
           f"Resource version:  {resource.resource_version or '-'}"]
    if created is not None:
        out.append(f"Created:           {iso(created)} ({age(created, now)} ago)")
    if updated is not None:
        out.append(f"Updated:           {iso(updated)} ({age(updated, now)} ago)")
    spec = spec_dict(resource.spec)
    out.append("Spec:")
    out.append(_indent(yaml.safe_dump(spec, sort_keys=False, default_flow_style=False))
               .rstrip("\n") if spec else "  {}")
    text = "\n".join(out) + "\n"
    if proxies is None:
        return text + f"Proxies:           unknown ({proxy_error})\n"
    if not proxies:
        return text + "Proxies:           none connected\n"
    revision = _revision(resource.resource_version)
    verdicts = [proxy_has(p, resource.kind, revision) if revision is not None else None
                for p in proxies]
    if all(v is not None for v in verdicts):
        rows = [(p.node_id, p.service or "-", v or "") for p, v in zip(proxies, verdicts,
                                                                       strict=True)]
        return (text + f"Proxies running version {resource.resource_version}:\n"
                + _indent(table(("NAME", "SERVICE", "HAS THIS VERSION"), rows)))
    return (text + "Proxies (the control plane does not say which config holds this version; "
            "their sync state):\n" + _indent(proxy_status_table(proxies, now)))


def describe_proxy(proxy: status_pb2.ProxyStatus, now: float) -> str:
    out = [f"Name:              {proxy.node_id}",
           f"Service:           {proxy.service or '-'}",
           f"Instance:          {proxy.instance_id or '-'}",
           f"Type:              {'sidecar' if proxy.sidecar else 'proxyless gRPC client'}"]
    connected = _seconds(proxy, "connected_since")
    if connected is not None:
        out.append(f"Connected since:   {iso(connected)} ({age(connected, now)} ago)")
    by_url = _types_by_url(proxy)
    for short, url in XDS_TYPES:
        t = by_url.get(url)
        out.append(f"{short}:               {sync_state(t)}")
        if t is None:
            continue
        for label, value, when in (("sent", t.sent_version, _seconds(t, "sent_at")),
                                   ("acked", t.acked_version, _seconds(t, "acked_at"))):
            if value or when is not None:
                stamp = f" at {iso(when)} ({age(when, now)} ago)" if when is not None else ""
                out.append(f"  {label + ' version:':<17}{value or '-'}{stamp}")
        if t.nack_error or t.nack_nonce:
            when = _seconds(t, "nacked_at")
            stamp = f" at {iso(when)} ({age(when, now)} ago)" if when is not None else ""
            out.append(f"  last NACK{stamp}: {_one_line(t.nack_error)}")
    return "\n".join(out) + "\n"


# --- talking to the control plane ----------------------------------------------------------
Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)


def field_violations(error: grpc.RpcError) -> list[tuple[str, str]]:
    """The google.rpc.BadRequest field violations attached to a failed call, if any."""
    try:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
    except ValueError:  # inconsistent status details: show the plain message
        return []
    if status is None:
        return []
    found: list[tuple[str, str]] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            found.extend((v.field, v.description) for v in bad.field_violations)
    return found


_RESOURCE_FIELD = re.compile(r"^(?:documents|resources)\[(\d+)\]\.?(.*)$")
STORE_UNAVAILABLE = "policy store unavailable"  # policy_api's message when Consul is down


def explain_violations(violations: Sequence[tuple[str, str]],
                       docs: Sequence[Document] = ()) -> list[str]:
    """One line per violation; a `documents[i].…` path names the document it came from."""
    lines = []
    for field, description in violations:
        match = _RESOURCE_FIELD.match(field)
        if match and int(match.group(1)) < len(docs):
            doc = docs[int(match.group(1))]
            data = doc.data if isinstance(doc.data, Mapping) else {}
            metadata = data.get("metadata")
            name = metadata.get("name") if isinstance(metadata, Mapping) else None
            label = f"{data.get('kind', '?')}/{name}" if name else str(data.get("kind", "?"))
            path = match.group(2)
            lines.append(f"{doc.where} [{label}]: {path + ': ' if path else ''}{description}")
        else:
            lines.append(f"{field}: {description}" if field else description)
    return lines


class Client:
    """Stubs over one channel; every failed call becomes a CliError with the right exit code."""

    def __init__(self, address: str, timeout: float) -> None:
        self.address = address
        self.timeout = timeout
        self.channel = grpc.insecure_channel(address)
        self.policy = policy_pb2_grpc.PolicyServiceStub(self.channel)  # type: ignore[no-untyped-call]
        self.status = status_pb2_grpc.StatusServiceStub(self.channel)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        self.channel.close()

    def call(self, method: Callable[..., Resp], request: Message,
             docs: Sequence[Document] = ()) -> Resp:
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as error:
            raise self.failure(error, docs) from None

    def failure(self, error: grpc.RpcError, docs: Sequence[Document] = ()) -> CliError:
        code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
        details = (error.details() if isinstance(error, grpc.Call) else "") or ""
        if code == grpc.StatusCode.UNAVAILABLE and details.startswith(STORE_UNAVAILABLE):
            return CliError(f"the control plane at {self.address} answered, but {details}; "
                            "nothing was changed (try again)", EXIT_REJECTED)
        if code == grpc.StatusCode.UNAVAILABLE:
            return CliError(f"cannot reach the control plane at {self.address}: {details} "
                            f"(is mesh-control-plane running? set --control-plane or "
                            f"{ENV_CONTROL_PLANE})", EXIT_UNREACHABLE)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return CliError(f"no answer from the control plane at {self.address} within "
                            f"{self.timeout:g}s", EXIT_UNREACHABLE)
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            violations = field_violations(error)
            if violations:
                noun = "problem" if len(violations) == 1 else "problems"
                return CliError(f"rejected by the control plane ({len(violations)} {noun}):",
                                EXIT_REJECTED, explain_violations(violations, docs))
            return CliError(f"rejected by the control plane: {details}", EXIT_REJECTED)
        if code == grpc.StatusCode.ABORTED:
            return CliError(f"conflict: {details} (get the resource again, then retry)",
                            EXIT_REJECTED)
        if code == grpc.StatusCode.NOT_FOUND:
            return CliError(details or "not found", EXIT_REJECTED)
        if code == grpc.StatusCode.UNIMPLEMENTED:
            return CliError(f"the control plane at {self.address} does not serve this API "
                            f"({details})", EXIT_REJECTED)
        return CliError(f"the control plane at {self.address} failed the request: "
                        f"{code.name}: {details}", EXIT_REJECTED)


# --- commands ------------------------------------------------------------------------------
@dataclass
class Io:
    out: TextIO
    err: TextIO
    stdin: TextIO
    now: Callable[[], float] = time.time


def cmd_apply(args: argparse.Namespace, client: Client, io: Io) -> int:
    docs = read_documents(args.filename, io.stdin)
    if not docs:
        raise usage_error(f"no resources in {', '.join(args.filename)}")
    resources = [to_resource(d) for d in docs]  # every document is checked before any is sent
    response = client.call(client.policy.Apply,
                           policy_pb2.ApplyRequest(resources=resources, dry_run=args.dry_run),
                           docs)
    suffix = " (dry run)" if args.dry_run else ""
    for resource, result in zip(response.resources, response.results, strict=False):
        io.out.write(f"{ref(resource.kind, resource.name)} {result}{suffix}\n")
    return EXIT_OK


def _dump(value: Any, output: str) -> str:
    if output == "json":
        return json.dumps(value, indent=2) + "\n"
    if isinstance(value, list):
        return "---\n".join(yaml.safe_dump(v, sort_keys=False) for v in value)
    return yaml.safe_dump(value, sort_keys=False)


def cmd_get(args: argparse.Namespace, client: Client, io: Io) -> int:
    every = args.kind.strip().lower() == ALL_KINDS
    if every and args.name:
        raise usage_error("`get all` takes no NAME")
    kind = "" if every else resolve_kind(args.kind)
    if args.name:
        resource = client.call(client.policy.Get, policy_pb2.GetRequest(kind=kind, name=args.name))
        if args.output in ("yaml", "json"):
            io.out.write(_dump(resource_doc(resource), args.output))
        else:
            io.out.write(resources_table([resource], io.now()))
        return EXIT_OK
    resources = list(client.call(client.policy.List, policy_pb2.ListRequest(kind=kind)).resources)
    if args.output in ("yaml", "json"):
        io.out.write(_dump([resource_doc(r) for r in resources], args.output))
    elif resources:
        io.out.write(resources_table(resources, io.now()))
    else:
        io.err.write(f"no {kind or 'resources'} found\n")
    return EXIT_OK


def cmd_delete(args: argparse.Namespace, client: Client, io: Io) -> int:
    kind = resolve_kind(args.kind)
    request = policy_pb2.DeleteRequest(kind=kind, name=args.name,
                                       resource_version=args.resource_version or "")
    client.call(client.policy.Delete, request)
    io.out.write(f"{ref(kind, args.name)} deleted\n")
    return EXIT_OK


def _proxies(client: Client) -> list[status_pb2.ProxyStatus]:
    response = client.call(client.status.ProxyStatus, status_pb2.ProxyStatusRequest())
    return sorted(response.proxies, key=lambda p: p.node_id)


def cmd_describe(args: argparse.Namespace, client: Client, io: Io) -> int:
    if args.kind.strip().lower() in PROXY_KINDS:
        match = [p for p in _proxies(client) if p.node_id == args.name]
        if not match:
            raise CliError(f"no connected proxy {args.name!r} (see `meshctl proxy-status`)",
                           EXIT_REJECTED)
        io.out.write(describe_proxy(match[0], io.now()))
        return EXIT_OK
    kind = resolve_kind(args.kind)
    resource = client.call(client.policy.Get, policy_pb2.GetRequest(kind=kind, name=args.name))
    proxies: list[status_pb2.ProxyStatus] | None
    try:
        proxies, proxy_error = _proxies(client), ""
    except CliError as exc:  # the resource is still worth showing
        proxies, proxy_error = None, exc.message
    io.out.write(describe_resource(resource, proxies, proxy_error, io.now()))
    return EXIT_OK


def cmd_proxy_status(args: argparse.Namespace, client: Client, io: Io) -> int:
    proxies = _proxies(client)
    if args.output in ("yaml", "json"):
        value = [json_format.MessageToDict(p) for p in proxies]
        io.out.write(_dump(value, args.output))
        return EXIT_OK
    if not proxies:
        io.err.write("no proxies connected\n")
        return EXIT_OK
    io.out.write(proxy_status_table(proxies, io.now(), wide=args.output == "wide"))
    nacked = sum(1 for p in proxies if proxy_errors(p))
    if nacked and args.output != "wide":
        io.err.write(f"{nacked} of {len(proxies)} proxies rejected their last config: "
                     f"see `meshctl proxy-status -o wide` or `meshctl describe proxy NAME`\n")
    return EXIT_OK


def cmd_endpoints(args: argparse.Namespace, client: Client, io: Io) -> int:
    response = client.call(client.status.Endpoints,
                           status_pb2.EndpointsRequest(service=args.service or ""))
    if args.output in ("yaml", "json"):
        io.out.write(_dump(json_format.MessageToDict(response), args.output))
        return EXIT_OK
    if response.endpoints:
        io.out.write(endpoints_table(response, with_service=not args.service))
    else:
        io.err.write(f"no endpoints for service {args.service!r}\n" if args.service
                     else "no endpoints\n")
    if response.registries:
        io.out.write("\n" + registries_table(response.registries, io.now()))
    return EXIT_OK


# --- arguments -----------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is a CliError (exit 2) rather than a SystemExit mid-flight."""

    def error(self, message: str) -> NoReturn:
        raise CliError(f"{message}\n{self.format_usage().rstrip()}", EXIT_USAGE)


EPILOG = ("kinds: TrafficPolicy (tp), AuthorizationPolicy (authz), RateLimitPolicy (rl), "
          "MeshConfig; any case.\nexit codes: 0 ok, 1 refused by the control plane, "
          "2 bad command or input, 3 control plane unreachable.")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="meshctl", description="Manage mesh policy and inspect the mesh.",
                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--control-plane", metavar="HOST:PORT",
                        default=os.environ.get(ENV_CONTROL_PLANE) or DEFAULT_CONTROL_PLANE,
                        help=f"control plane address (env {ENV_CONTROL_PLANE}; "
                             f"default {DEFAULT_CONTROL_PLANE})")
    parser.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                        help="per-request deadline (default 10)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("apply", help="create or update resources from YAML")
    p.add_argument("-f", "--filename", action="append", required=True, metavar="FILE",
                   help="YAML file (several documents allowed; - for stdin); repeatable")
    p.add_argument("--dry-run", action="store_true", help="validate only; store nothing")
    p.set_defaults(run=cmd_apply)

    p = sub.add_parser("get", help="list resources, or show one")
    p.add_argument("kind", metavar="KIND", help="a kind or alias, or `all`")
    p.add_argument("name", metavar="NAME", nargs="?")
    p.add_argument("-o", "--output", choices=("table", "yaml", "json"), default="table")
    p.set_defaults(run=cmd_get)

    p = sub.add_parser("delete", help="delete a resource")
    p.add_argument("kind", metavar="KIND")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--resource-version", metavar="VERSION",
                   help="only delete if this is still the stored version")
    p.set_defaults(run=cmd_delete)

    p = sub.add_parser("describe", help="a resource and which proxies run it; or `proxy NAME`")
    p.add_argument("kind", metavar="KIND", help="a kind or alias, or `proxy`")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(run=cmd_describe)

    p = sub.add_parser("proxy-status", help="every connected proxy and its xDS sync state")
    p.add_argument("-o", "--output", choices=("table", "wide", "yaml", "json"), default="table")
    p.set_defaults(run=cmd_proxy_status)

    p = sub.add_parser("endpoints", help="the instances of a service (all services if omitted)")
    p.add_argument("service", metavar="SERVICE", nargs="?")
    p.add_argument("-o", "--output", choices=("table", "yaml", "json"), default="table")
    p.set_defaults(run=cmd_endpoints)

    from control_plane import cli_ca  # `token` and `ca` (imported here: cli_ca imports cli)
    cli_ca.add_commands(sub)
    return parser


def run(argv: Sequence[str] | None, io: Io) -> int:
    """Parse, run one command, and turn every user-facing failure into a message + exit code."""
    try:
        args = build_parser().parse_args(argv)
        if args.timeout <= 0:
            raise usage_error("--timeout must be positive")
        address = check_address(args.control_plane)
        client = Client(address, args.timeout)
        try:
            code: int = args.run(args, client, io)
            return code
        finally:
            client.close()
    except CliError as exc:
        io.err.write(f"error: {exc.message}\n")
        for line in exc.details:
            io.err.write(f"  {line}\n")
        return exc.code


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run(argv, Io(sys.stdout, sys.stderr, sys.stdin))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `meshctl get tp | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
