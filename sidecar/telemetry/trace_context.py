"""Trace context on the wire: W3C `traceparent` / `tracestate`, and B3 (single and multi header).

Pure functions over header values, run on every proxied call, so they are built to be cheap:
fixed-width precompiled patterns (no nested quantifiers, so no backtracking blow-ups on hostile
input), one pass over the metadata, and a small cache for `tracestate` values, which repeat
from call to call. Nothing here raises on bad input: a context that does not validate is simply
absent (None), which means "start a new trace" (W3C §3.2.2.x; SPECS.md §5).

Rules applied (W3C Trace Context level 2 and its test suite, strict level):
- traceparent: `version-traceid-parentid-flags`, lowercase hex; version `ff`, an all-zero trace
  id or parent id, a wrong length, or two traceparent headers -> invalid. A higher version is
  parsed by its version-00 prefix when the header is longer and the 56th character is `-`.
  Optional whitespace around the value is ignored.
- tracestate: only used with a valid traceparent; several headers are joined in order; empty
  members are dropped; any invalid member, a duplicated key or more than 32 members discards the
  whole tracestate (never a partial one). A kept tracestate is forwarded as received
  (normalised: no optional whitespace, no empty members).
- B3 is read when no valid traceparent arrived: `b3: {trace}-{span}[-{sampling}[-{parent}]]`,
  else `x-b3-traceid` / `x-b3-spanid` / `x-b3-sampled` / `x-b3-flags`. A 64-bit trace id is the
  same id left-padded with zeros. Debug (`d`, `x-b3-flags: 1`) counts as sampled. A B3 header
  with only a sampling decision (`b3: 0`) carries no ids and is ignored.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from typing import NamedTuple

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
B3 = "b3"
X_B3_TRACEID = "x-b3-traceid"
X_B3_SPANID = "x-b3-spanid"
X_B3_PARENTSPANID = "x-b3-parentspanid"
X_B3_SAMPLED = "x-b3-sampled"
X_B3_FLAGS = "x-b3-flags"

# Where a context came from; the same format is written downstream next to W3C.
W3C = "w3c"
B3_SINGLE = "b3"
B3_MULTI = "b3multi"

# Every header that carries trace context: the proxy drops these from what it forwards and
# writes its own (replace_trace_headers).
TRACE_HEADERS = frozenset({TRACEPARENT, TRACESTATE, B3, X_B3_TRACEID, X_B3_SPANID,
                           X_B3_PARENTSPANID, X_B3_SAMPLED, X_B3_FLAGS})

MAX_TRACESTATE_MEMBERS = 32
_OWS = " \t"

Metadata = tuple[tuple[str, str | bytes], ...]


class TraceContext(NamedTuple):
    """A caller's span: the parent of the span a sidecar records for the call.

    A NamedTuple rather than a frozen dataclass: one is built per call and tuples are cheaper.
    """

    trace_id: int
    span_id: int
    # None: the caller deferred the sampling decision (B3 without a sampling state).
    sampled: bool | None
    # Validated, normalised tracestate to pass on unchanged; None when absent or discarded.
    tracestate: str | None = None
    # W3C, or B3_SINGLE / B3_MULTI when the caller (also) sent B3: that format is written
    # downstream next to traceparent.
    source: str = W3C
    # The caller's trace flags that W3C defines (bit 0 sampled, bit 1 random trace id; B3: 1
    # if sampled). Undefined bits are dropped: W3C says to pass them on as zero.
    flags: int = 0


# --- traceparent ----------------------------------------------------------------------------
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_TRACEPARENT_LEN = 55
_KNOWN_FLAGS = 0x03


def parse_traceparent(value: str) -> TraceContext | None:
    """The caller's context from one traceparent value, or None if it is not valid."""
    if type(value) is not str:
        return None
    if value[:1] in _OWS or value[-1:] in _OWS:
        value = value.strip(_OWS)
    n = len(value)
    if n != _TRACEPARENT_LEN:
        # Only a future version may be longer, and only with a dash after the known fields.
        if n < _TRACEPARENT_LEN or value[:2] == "00" or value[_TRACEPARENT_LEN] != "-":
            return None
    m = _TRACEPARENT.match(value)
    if m is None:
        return None
    version, trace_hex, span_hex, flags = m.groups()
    if version == "ff":
        return None
    trace_id = int(trace_hex, 16)
    span_id = int(span_hex, 16)
    if not trace_id or not span_id:
        return None
    bits = int(flags, 16) & _KNOWN_FLAGS
    return TraceContext(trace_id, span_id, bool(bits & 1), None, W3C, bits)


def format_traceparent(trace_id: int, span_id: int, flags: int | bool | None) -> str:
    """A version-00 traceparent (the only version we write); `flags` the trace-flags byte
    (True/False/None for just sampled or not)."""
    return f"00-{trace_id:032x}-{span_id:016x}-{int(flags or 0) & _KNOWN_FLAGS:02x}"


# --- tracestate -----------------------------------------------------------------------------
# key = simple-key / tenant@system; value = 1..256 printable chars but ',' and '=', no
# trailing space. Linear-time patterns: bounded repeats of single character classes.
_KEY = re.compile(r"[a-z0-9][a-z0-9_\-*/]{0,255}"
                  r"|[a-z0-9][a-z0-9_\-*/]{0,240}@[a-z][a-z0-9_\-*/]{0,13}")
_VALUE = re.compile(r"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]")
_MAX_MEMBER = 256 + 1 + 256
_STATE_CACHE: dict[str, tuple[tuple[str, str], ...] | None] = {}
_STATE_CACHE_LIMIT = 512
_STATE_CACHE_MAX_KEY = 2048


def parse_tracestate(values: str | Sequence[str]) -> tuple[tuple[str, str], ...] | None:
    """The (key, value) members of one or more tracestate header values, in order.

    None when the list is invalid and must be discarded whole; () when it has no members.
    """
    if isinstance(values, str):
        joined = values
    else:
        try:
            joined = ",".join(values)
        except TypeError:  # not text
            return None
    cached = _STATE_CACHE.get(joined, _STATE_CACHE)
    if cached is not _STATE_CACHE:
        return cached  # type: ignore[return-value]
    result = _parse_tracestate(joined)
    if len(joined) <= _STATE_CACHE_MAX_KEY:
        if len(_STATE_CACHE) >= _STATE_CACHE_LIMIT:
            _STATE_CACHE.clear()
        _STATE_CACHE[joined] = result
    return result


def _parse_tracestate(joined: str) -> tuple[tuple[str, str], ...] | None:
    if type(joined) is not str:
        return None
    members: list[tuple[str, str]] = []
    seen: set[str] = set()
    for raw in joined.split(","):
        member = raw.strip(_OWS)
        if not member:
            continue
        if len(member) > _MAX_MEMBER or len(members) == MAX_TRACESTATE_MEMBERS:
            return None
        key, eq, value = member.partition("=")
        if (not eq or key in seen or _KEY.fullmatch(key) is None
                or _VALUE.fullmatch(value) is None):
            return None
        seen.add(key)
        members.append((key, value))
    return tuple(members)


def format_tracestate(members: Iterable[tuple[str, str]]) -> str:
    return ",".join(f"{k}={v}" for k, v in members)


def normalise_tracestate(values: str | Sequence[str]) -> str | None:
    """The tracestate to forward for these header values: None if invalid or empty."""
    members = parse_tracestate(values)
    return format_tracestate(members) if members else None


# --- B3 -------------------------------------------------------------------------------------
_B3_SINGLE = re.compile(r"([0-9a-f]{32}|[0-9a-f]{16})-([0-9a-f]{16})"
                        r"(?:-([01d])(?:-([0-9a-f]{16}))?)?")
_B3_ID = re.compile(r"[0-9a-f]{32}|[0-9a-f]{16}")
_B3_SPAN_ID = re.compile(r"[0-9a-f]{16}")
_B3_SAMPLED = {"1": True, "true": True, "d": True, "0": False, "false": False}


def parse_b3_single(value: str) -> TraceContext | None:
    """The context of a `b3` header, or None (invalid, or a sampling decision without ids)."""
    if type(value) is not str:
        return None
    m = _B3_SINGLE.fullmatch(value.strip(_OWS))
    if m is None:
        return None
    trace_hex, span_hex, state, _parent = m.groups()
    trace_id = int(trace_hex, 16)
    span_id = int(span_hex, 16)
    if not trace_id or not span_id:
        return None
    sampled = None if state is None else state != "0"
    return TraceContext(trace_id, span_id, sampled, None, B3_SINGLE, 1 if sampled else 0)


def parse_b3_multi(trace_id: str | None, span_id: str | None, sampled: str | None = None,
                   flags: str | None = None) -> TraceContext | None:
    """The context of the X-B3-* headers (values as received, None when absent)."""
    if type(trace_id) is not str or type(span_id) is not str:
        return None
    trace_id = trace_id.strip(_OWS)
    span_id = span_id.strip(_OWS)
    if _B3_ID.fullmatch(trace_id) is None or _B3_SPAN_ID.fullmatch(span_id) is None:
        return None
    tid = int(trace_id, 16)
    sid = int(span_id, 16)
    if not tid or not sid:
        return None
    decision: bool | None = None
    if type(flags) is str and flags.strip(_OWS) == "1":
        decision = True  # debug
    elif type(sampled) is str:
        decision = _B3_SAMPLED.get(sampled.strip(_OWS).lower())
    return TraceContext(tid, sid, decision, None, B3_MULTI, 1 if decision else 0)


def _b3_trace_hex(trace_id: int) -> str:
    # Keep 64-bit ids 64-bit: older Zipkin-era systems accept nothing longer.
    return f"{trace_id:016x}" if trace_id < 1 << 64 else f"{trace_id:032x}"


def format_b3_single(trace_id: int, span_id: int, sampled: bool | None,
                     parent_span_id: int | None = None) -> str:
    value = f"{_b3_trace_hex(trace_id)}-{span_id:016x}"
    if sampled is None:
        return value
    value += "-1" if sampled else "-0"
    if parent_span_id:
        value += f"-{parent_span_id:016x}"
    return value


def format_b3_multi(trace_id: int, span_id: int, sampled: bool | None,
                    parent_span_id: int | None = None) -> tuple[tuple[str, str], ...]:
    headers = [(X_B3_TRACEID, _b3_trace_hex(trace_id)), (X_B3_SPANID, f"{span_id:016x}")]
    if parent_span_id:
        headers.append((X_B3_PARENTSPANID, f"{parent_span_id:016x}"))
    if sampled is not None:
        headers.append((X_B3_SAMPLED, "1" if sampled else "0"))
    return tuple(headers)


# --- metadata in, metadata out ----------------------------------------------------------------
def extract(metadata: Iterable[tuple[str, str | bytes]] | None) -> TraceContext | None:
    """The caller's context from gRPC metadata (keys are lowercase on the wire), or None.

    A valid traceparent wins (its ids are used; B3 headers next to it only mark the source);
    then `b3`; then the X-B3-* headers. None means start a new trace.
    """
    if not metadata:
        return None
    parents: list[str | bytes] = []
    states: list[str] = []
    b3: str | bytes | None = None
    multi: dict[str, str | bytes] | None = None
    for key, value in metadata:
        if key not in TRACE_HEADERS:
            continue
        if key == TRACEPARENT:
            parents.append(value)
        elif key == TRACESTATE:
            if type(value) is str:
                states.append(value)
            else:
                states.append("\x00")  # not text: poisons the list, so it is discarded
        elif key == B3:
            b3 = value
        else:
            if multi is None:
                multi = {}
            multi[key] = value
    if len(parents) == 1:
        ctx = parse_traceparent(parents[0])  # type: ignore[arg-type]
        if ctx is not None:
            # B3 next to a valid traceparent (a sidecar upstream of us wrote both): the ids
            # come from traceparent, and B3 keeps being written for the apps that read it.
            source = W3C if b3 is None and multi is None else (
                B3_SINGLE if b3 is not None else B3_MULTI)
            state = normalise_tracestate(states) if states else None
            if state is not None or source is not W3C:
                return TraceContext(ctx.trace_id, ctx.span_id, ctx.sampled, state, source,
                                    ctx.flags)
            return ctx
    if b3 is not None:
        ctx = parse_b3_single(b3)  # type: ignore[arg-type]
        if ctx is not None:
            return ctx
    if multi is not None:
        return parse_b3_multi(multi.get(X_B3_TRACEID), multi.get(X_B3_SPANID),  # type: ignore[arg-type]
                              multi.get(X_B3_SAMPLED), multi.get(X_B3_FLAGS))  # type: ignore[arg-type]
    return None


def propagation_headers(trace_id: int, span_id: int, sampled: bool | None,
                        tracestate: str | None = None, source: str = W3C,
                        parent_span_id: int | None = None, flags: int | None = None
                        ) -> tuple[tuple[str, str], ...]:
    """The headers that carry span `span_id` downstream: W3C always, plus the caller's B3
    format when that is what arrived (so a B3-only app downstream still continues the trace).

    `sampled` None: no decision made (B3 deferred; traceparent says not sampled). `flags`: the
    whole trace-flags byte for traceparent, when known.
    """
    headers: tuple[tuple[str, str], ...] = (
        (TRACEPARENT, format_traceparent(trace_id, span_id,
                                         sampled if flags is None else flags)),)
    if tracestate:
        headers += ((TRACESTATE, tracestate),)
    if source == B3_SINGLE:
        headers += ((B3, format_b3_single(trace_id, span_id, sampled, parent_span_id)),)
    elif source == B3_MULTI:
        headers += format_b3_multi(trace_id, span_id, sampled, parent_span_id)
    return headers


def replace_trace_headers(metadata: Iterable[tuple[str, str | bytes]] | None,
                          headers: Iterable[tuple[str, str]]) -> Metadata:
    """`metadata` without any trace context header, followed by `headers`."""
    kept = tuple((k, v) for k, v in metadata or () if k not in TRACE_HEADERS)
    return kept + tuple(headers)


def new_trace_id(rng: random.Random | None = None) -> int:
    """A random non-zero 128-bit trace id (W3C level 2 asks for random ids)."""
    getrandbits = (rng or random).getrandbits
    while True:
        value = getrandbits(128)
        if value:
            return value


def new_span_id(rng: random.Random | None = None) -> int:
    getrandbits = (rng or random).getrandbits
    while True:
        value = getrandbits(64)
        if value:
            return value
