"""Trace context on the wire (sidecar/telemetry/trace_context.py): the W3C test suite's cases
(strict level), B3 single and multi, which format wins, what goes downstream; hypothesis for
round trips, agreement with a plainly written reference parser, and garbage never raising."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.telemetry import trace_context as tc

TID = "12345678901234567890123456789012"
SID = "1234567890123456"
VALID = f"00-{TID}-{SID}-01"


def parent(value: str) -> tuple[int, int, bool] | None:
    ctx = tc.parse_traceparent(value)
    return None if ctx is None else (ctx.trace_id, ctx.span_id, bool(ctx.sampled))


# --- traceparent ------------------------------------------------------------------------------
def test_valid_traceparent() -> None:
    ctx = tc.parse_traceparent(VALID)
    assert ctx == tc.TraceContext(int(TID, 16), int(SID, 16), True, None, tc.W3C, 1)
    assert tc.parse_traceparent(f"00-{TID}-{SID}-00").sampled is False  # type: ignore[union-attr]


@pytest.mark.parametrize("value", [
    f"00-{TID}-{SID}-01.",                                  # v00 with trailing characters
    f"00-{TID}-{SID}-01-what-the-future-will-be-like",      # v00 cannot be extended
    f"ff-{TID}-{SID}-01",                                   # version ff
    f".0-{TID}-{SID}-01", f"0.-{TID}-{SID}-01",             # illegal version characters
    f"000-{TID}-{SID}-01", f"0-{TID}-{SID}-01",             # version too long / short
    f"00-{'0' * 32}-{SID}-01",                              # all-zero trace id
    f"00-.{TID[1:]}-{SID}-01", f"00-{TID[:-1]}.-{SID}-01",  # illegal trace id characters
    f"00-{TID}3-{SID}-01", f"00-{TID[:-1]}-{SID}-01",       # trace id too long / short
    f"00-{TID}-{'0' * 16}-01",                              # all-zero parent id
    f"00-{TID}-.{SID[1:]}-01", f"00-{TID}-{SID[:-1]}.-01",  # illegal parent id characters
    f"00-{TID}-{SID}7-01", f"00-{TID}-{SID[:-1]}-01",       # parent id too long / short
    f"00-{TID}-{SID}-.0", f"00-{TID}-{SID}-0.",             # illegal flags characters
    f"00-{TID}-{SID}-001", f"00-{TID}-{SID}-1",             # flags too long / short
    "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01",  # uppercase hex
    f"cc-{TID}-{SID}-01.what-the-future-will-be-like",      # future version, no dash after
    f"00_{TID}_{SID}_01", "", " ", "00", "traceparent",
])
def test_invalid_traceparent(value: str) -> None:
    assert tc.parse_traceparent(value) is None


@pytest.mark.parametrize("value", [
    f" {VALID}", f"\t{VALID}", f"{VALID} ", f"{VALID}\t", f"\t {VALID} \t",  # OWS
    f"cc-{TID}-{SID}-01", f"cc-{TID}-{SID}-01-what-the-future-will-be-like",  # future version
])
def test_traceparent_accepted_forms(value: str) -> None:
    assert parent(value) == (int(TID, 16), int(SID, 16), True)


def test_flags_keep_only_what_w3c_defines() -> None:
    assert tc.parse_traceparent(f"00-{TID}-{SID}-03").flags == 3  # type: ignore[union-attr]
    ctx = tc.parse_traceparent(f"00-{TID}-{SID}-ff")
    assert ctx is not None and ctx.flags == 3 and ctx.sampled is True
    assert tc.format_traceparent(1, 2, 0xFF).endswith("-03")


def test_format_traceparent() -> None:
    assert tc.format_traceparent(int(TID, 16), int(SID, 16), True) == VALID
    assert tc.format_traceparent(1, 2, False) == f"00-{'0' * 31}1-{'0' * 15}2-00"
    assert tc.format_traceparent(1, 2, None).endswith("-00")


# --- tracestate ---------------------------------------------------------------------------------
def state(*values: str) -> dict[str, str] | None:
    members = tc.parse_tracestate(list(values))
    return None if members is None else dict(members)


def test_tracestate_multiple_headers_join_in_order() -> None:
    members = tc.parse_tracestate(["foo=1,bar=2", "rojo=1,congo=2", "baz=3"])
    assert members == (("foo", "1"), ("bar", "2"), ("rojo", "1"), ("congo", "2"), ("baz", "3"))


@pytest.mark.parametrize("values", [
    ["foo=1 \t , \t bar=2, \t baz=3"], ["foo=1\t \t,\t \tbar=2,\t \tbaz=3"],
])
def test_tracestate_ows(values: list[str]) -> None:
    assert state(*values) == {"foo": "1", "bar": "2", "baz": "3"}


@pytest.mark.parametrize("value", [" foo=1", "\tfoo=1", "foo=1 ", "foo=1\t", "\t foo=1 \t"])
def test_tracestate_ows_single(value: str) -> None:
    assert state(value) == {"foo": "1"}


def test_tracestate_empty_members_and_headers() -> None:
    assert tc.parse_tracestate([""]) == ()
    assert state("foo=1", "") == {"foo": "1"}
    assert state("", "foo=1") == {"foo": "1"}
    assert state("foo=1,,,bar=2, ,") == {"foo": "1", "bar": "2"}
    assert tc.normalise_tracestate([""]) is None  # nothing to forward


@pytest.mark.parametrize("values", [
    ["foo=1,foo=1"], ["foo=1,foo=2"], ["foo=1", "foo=1"], ["foo=1", "foo=2"],  # duplicated keys
    ["foo =1"], ["FOO=1"], ["foo.bar=1"],                                        # illegal keys
    ["foo@=1,bar=2"], ["@foo=1,bar=2"], ["foo@@bar=1,bar=2"], ["foo@bar@baz=1,bar=2"],  # vendor
    ["foo=bar=baz"], ["foo=,bar=3"], ["foo=1\x7f"], ["foo=\u00e91"],             # illegal values
    ["foo=1", "z" * 257 + "=1"],                                                 # key too long
    ["foo=1", "t" * 242 + "@v=1"], ["foo=1", "t@" + "v" * 15 + "=1"],            # tenant/vendor
    ["foo=" + "v" * 257], ["novalue"], ["=1"],
])
def test_invalid_tracestate_is_discarded_whole(values: list[str]) -> None:
    assert tc.parse_tracestate(values) is None


def test_tracestate_length_limits_accepted() -> None:
    assert state("foo=1", "z" * 256 + "=1") == {"foo": "1", "z" * 256: "1"}
    assert state("foo=1", "t" * 241 + "@" + "v" * 14 + "=1") is not None
    assert state("foo=" + "v" * 256) == {"foo": "v" * 256}


def test_tracestate_all_allowed_characters() -> None:
    key = "abcdefghijklmnopqrstuvwxyz0123456789_-*/"
    value = "".join(map(chr, [*range(0x20, 0x2C), *range(0x2D, 0x3D), *range(0x3E, 0x7F)]))
    assert state(f"{key}={value}") == {key: value}
    assert state(f"{key}@a-z0-9_-*/={value}") == {f"{key}@a-z0-9_-*/": value}
    assert state("1digit=1") == {"1digit": "1"}  # W3C level 2 allows a leading digit
    assert state("foo= 1") == {"foo": " 1"}  # inner/leading space is part of the value


def test_tracestate_member_count_limit() -> None:
    members = [f"bar{i:02d}={i:02d}" for i in range(1, 33)]
    headers = [",".join(members[i:i + 10]) for i in range(0, 32, 10)]
    assert len(tc.parse_tracestate(headers) or ()) == 32
    assert tc.parse_tracestate([*headers, "bar33=33"]) is None
    # empty members do not count
    assert len(tc.parse_tracestate([",".join(members) + ",,,"]) or ()) == 32


def test_tracestate_not_text_is_discarded() -> None:
    assert tc.parse_tracestate([b"foo=1"]) is None  # type: ignore[list-item]
    assert tc.extract([("traceparent", VALID), ("tracestate", b"foo=1")]) == \
        tc.parse_traceparent(VALID)


def test_tracestate_cache_stays_bounded_and_correct() -> None:
    for i in range(3 * tc._STATE_CACHE_LIMIT):
        assert tc.parse_tracestate(f"k{i}=v{i}") == ((f"k{i}", f"v{i}"),)
    assert len(tc._STATE_CACHE) <= tc._STATE_CACHE_LIMIT
    assert tc.parse_tracestate("foo=1,foo=2") is None
    assert tc.parse_tracestate("foo=1,foo=2") is None  # from the cache, same answer


# --- extract: which header wins -----------------------------------------------------------------
def test_extract_traceparent_with_tracestate_normalised() -> None:
    ctx = tc.extract([("traceparent", VALID), ("tracestate", " foo=1 ,, bar=2"),
                      ("x-other", "v")])
    assert ctx is not None and ctx.tracestate == "foo=1,bar=2" and ctx.source == tc.W3C


def test_extract_without_context() -> None:
    assert tc.extract(None) is None
    assert tc.extract([]) is None
    assert tc.extract([("x-user", "a"), ("grpc-trace-bin", b"\x00")]) is None
    # tracestate without traceparent starts a new trace; the tracestate is not kept
    assert tc.extract([("tracestate", "foo=1")]) is None


def test_extract_duplicated_traceparent_is_invalid() -> None:
    other = f"00-{TID[:-1]}1-{SID}-01"
    assert tc.extract([("traceparent", VALID), ("traceparent", other)]) is None


def test_extract_invalid_traceparent_drops_tracestate() -> None:
    assert tc.extract([("traceparent", f"00-{'0' * 32}-{SID}-01"),
                       ("tracestate", "foo=1")]) is None


def test_extract_invalid_tracestate_keeps_traceparent() -> None:
    ctx = tc.extract([("traceparent", VALID), ("tracestate", "foo=1,foo=2")])
    assert ctx == tc.parse_traceparent(VALID)


def test_extract_traceparent_wins_over_b3_which_stays_the_source() -> None:
    ctx = tc.extract([("b3", f"{'a' * 32}-{'b' * 16}-1"), ("traceparent", VALID)])
    assert ctx is not None and ctx.trace_id == int(TID, 16) and ctx.span_id == int(SID, 16)
    assert ctx.source == tc.B3_SINGLE  # B3 keeps being written downstream
    ctx = tc.extract([("traceparent", VALID), ("x-b3-sampled", "1"), ("tracestate", "a=1")])
    assert ctx is not None and ctx.source == tc.B3_MULTI and ctx.tracestate == "a=1"


def test_extract_falls_back_to_b3_when_traceparent_invalid() -> None:
    ctx = tc.extract([("traceparent", "garbage"), ("b3", f"{'a' * 32}-{'b' * 16}-1")])
    assert ctx is not None and ctx.trace_id == int("a" * 32, 16) and ctx.source == tc.B3_SINGLE


def test_extract_single_b3_wins_over_multi() -> None:
    ctx = tc.extract([("x-b3-traceid", "c" * 16), ("x-b3-spanid", "d" * 16),
                      ("b3", f"{'a' * 16}-{'b' * 16}")])
    assert ctx is not None and ctx.source == tc.B3_SINGLE


# --- B3 -------------------------------------------------------------------------------------------
B3_TID = "80f198ee56343ba864fe8b2a57d3eff7"
B3_SID = "e457b5a2e4d86bd1"


@pytest.mark.parametrize(("value", "sampled"), [
    (f"{B3_TID}-{B3_SID}-1-05e3ac9a4f6e3b90", True),
    (f"{B3_TID}-{B3_SID}-1", True),
    (f"{B3_TID}-{B3_SID}-0", False),
    (f"{B3_TID}-{B3_SID}-d", True),
    (f"{B3_TID}-{B3_SID}", None),
])
def test_b3_single(value: str, sampled: bool | None) -> None:
    ctx = tc.parse_b3_single(value)
    assert ctx is not None
    assert (ctx.trace_id, ctx.span_id, ctx.sampled) == (int(B3_TID, 16), int(B3_SID, 16),
                                                        sampled)
    assert ctx.flags == (1 if sampled else 0)


def test_b3_single_64_bit_trace_id_is_left_padded() -> None:
    ctx = tc.parse_b3_single(f"a3ce929d0e0e4736-{B3_SID}-1")
    assert ctx is not None and ctx.trace_id == 0xA3CE929D0E0E4736
    assert tc.format_traceparent(ctx.trace_id, 1, 1)[3:35] == "0000000000000000a3ce929d0e0e4736"


@pytest.mark.parametrize("value", [
    "0", "1", "d",                                      # a decision without ids: ignored
    f"{B3_TID}-{B3_SID}-2", f"{B3_TID}-{B3_SID}-1-",   # bad sampling state / parent
    f"{B3_TID[:-1]}-{B3_SID}", f"{B3_TID}-{B3_SID[:-1]}", f"{B3_TID.upper()}-{B3_SID}",
    f"{'0' * 32}-{B3_SID}-1", f"{B3_TID}-{'0' * 16}-1", f"{B3_TID}-{B3_SID}-1-{'x' * 16}", "",
])
def test_b3_single_invalid(value: str) -> None:
    assert tc.parse_b3_single(value) is None


def test_b3_multi() -> None:
    ctx = tc.parse_b3_multi(B3_TID, B3_SID, "1")
    assert ctx == tc.TraceContext(int(B3_TID, 16), int(B3_SID, 16), True, None, tc.B3_MULTI, 1)
    assert tc.parse_b3_multi("463ac35c9f6413ad", B3_SID, None).sampled is None  # type: ignore
    assert tc.parse_b3_multi(B3_TID, B3_SID, "0").sampled is False  # type: ignore[union-attr]
    assert tc.parse_b3_multi(B3_TID, B3_SID, "true").sampled is True  # type: ignore[union-attr]
    assert tc.parse_b3_multi(B3_TID, B3_SID, "0", "1").sampled is True  # type: ignore  # debug
    assert tc.parse_b3_multi(B3_TID, None) is None
    assert tc.parse_b3_multi(None, B3_SID) is None
    assert tc.parse_b3_multi("xyz", B3_SID) is None
    assert tc.parse_b3_multi("0" * 16, B3_SID) is None
    assert tc.parse_b3_multi(B3_TID, b"e457b5a2e4d86bd1") is None  # type: ignore[arg-type]
    md = [("x-b3-traceid", B3_TID), ("x-b3-spanid", B3_SID), ("x-b3-sampled", "1")]
    assert tc.extract(md) == ctx


# --- what goes downstream -------------------------------------------------------------------------
def test_propagation_headers_w3c() -> None:
    assert tc.propagation_headers(int(TID, 16), int(SID, 16), True) == (("traceparent", VALID),)
    assert tc.propagation_headers(int(TID, 16), int(SID, 16), True, "foo=1") == (
        ("traceparent", VALID), ("tracestate", "foo=1"))
    assert tc.propagation_headers(1, 2, True, flags=3)[0][1].endswith("-03")


def test_propagation_headers_keep_the_callers_b3_format() -> None:
    single = tc.propagation_headers(5, 6, True, None, tc.B3_SINGLE, parent_span_id=7)
    assert single == (("traceparent", tc.format_traceparent(5, 6, True)),
                      ("b3", f"{5:016x}-{6:016x}-1-{7:016x}"))
    multi = tc.propagation_headers(int(B3_TID, 16), 6, False, None, tc.B3_MULTI, 7)
    assert dict(multi) == {"traceparent": tc.format_traceparent(int(B3_TID, 16), 6, False),
                           "x-b3-traceid": B3_TID, "x-b3-spanid": f"{6:016x}",
                           "x-b3-parentspanid": f"{7:016x}", "x-b3-sampled": "0"}
    deferred = tc.propagation_headers(5, 6, None, None, tc.B3_SINGLE)
    assert deferred[1] == ("b3", f"{5:016x}-{6:016x}")


def test_replace_trace_headers() -> None:
    md = [("x-user", "a"), ("traceparent", VALID), ("tracestate", "foo=1"), ("b3", "x"),
          ("x-b3-sampled", "1"), ("grpc-trace-bin", b"\x01"), ("x-user", "b")]
    out = tc.replace_trace_headers(md, (("traceparent", "new"),))
    assert out == (("x-user", "a"), ("grpc-trace-bin", b"\x01"), ("x-user", "b"),
                   ("traceparent", "new"))
    assert tc.replace_trace_headers(None, ()) == ()


def test_new_ids_are_nonzero_and_seedable() -> None:
    a = [tc.new_trace_id(random.Random(7)), tc.new_span_id(random.Random(7))]
    b = [tc.new_trace_id(random.Random(7)), tc.new_span_id(random.Random(7))]
    assert a == b and all(a)
    assert 0 < tc.new_trace_id() < 1 << 128 and 0 < tc.new_span_id() < 1 << 64


# --- properties -----------------------------------------------------------------------------------
trace_ids = st.integers(1, (1 << 128) - 1)
span_ids = st.integers(1, (1 << 64) - 1)


@given(trace_ids, span_ids, st.integers(0, 3))
def test_traceparent_round_trip(trace_id: int, span_id: int, flags: int) -> None:
    text = tc.format_traceparent(trace_id, span_id, flags)
    assert len(text) == 55
    assert tc.parse_traceparent(text) == tc.TraceContext(trace_id, span_id, bool(flags & 1),
                                                         None, tc.W3C, flags)


@given(trace_ids, span_ids, st.booleans(), st.one_of(st.none(), span_ids))
def test_b3_round_trip(trace_id: int, span_id: int, sampled: bool, parent_id: int | None
                       ) -> None:
    ctx = tc.parse_b3_single(tc.format_b3_single(trace_id, span_id, sampled, parent_id))
    assert ctx is not None and (ctx.trace_id, ctx.span_id, ctx.sampled) == (trace_id, span_id,
                                                                            sampled)
    multi = dict(tc.format_b3_multi(trace_id, span_id, sampled, parent_id))
    ctx = tc.parse_b3_multi(multi["x-b3-traceid"], multi["x-b3-spanid"],
                            multi["x-b3-sampled"])
    assert ctx is not None and (ctx.trace_id, ctx.span_id, ctx.sampled) == (trace_id, span_id,
                                                                            sampled)


_KEYCHARS = "abcdefghijklmnopqrstuvwxyz0123456789_-*/"
_LEAD = "abcdefghijklmnopqrstuvwxyz0123456789"
simple_keys = st.builds(lambda a, b: a + b, st.sampled_from(_LEAD),
                        st.text(_KEYCHARS, max_size=20))
tenant_keys = st.builds(lambda a, b, c, d: f"{a}{b}@{c}{d}", st.sampled_from(_LEAD),
                        st.text(_KEYCHARS, max_size=10),
                        st.sampled_from("abcdefghijklmnopqrstuvwxyz"),
                        st.text(_KEYCHARS, max_size=13))
_VALUECHARS = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) not in ",=")
values = st.builds(lambda a, b: a + b, st.text(_VALUECHARS, max_size=30),
                   st.sampled_from(_VALUECHARS.replace(" ", "")))


@given(st.lists(st.tuples(st.one_of(simple_keys, tenant_keys), values), max_size=32,
                unique_by=lambda kv: kv[0]))
def test_tracestate_round_trip(members: list[tuple[str, str]]) -> None:
    text = tc.format_tracestate(members)
    assert tc.parse_tracestate(text) == tuple(members)
    # ... and split over several headers with optional whitespace, the same list
    parts = [f" {k}={v}\t" for k, v in members]
    assert tc.parse_tracestate([",".join(parts[:3]), ",".join(parts[3:])]) == tuple(members)


def reference_traceparent(value: str) -> tuple[int, int, int] | None:
    """The W3C rules written the slow, obvious way, to check the fast parser against."""
    value = value.strip(" \t")
    parts = value.split("-")
    if len(parts) < 4:
        return None
    version, trace, span, flags = parts[:4]
    hexdigits = set("0123456789abcdef")
    if len(version) != 2 or not set(version) <= hexdigits or version == "ff":
        return None
    if version == "00" and len(parts) != 4:
        return None
    if (len(trace), len(span), len(flags)) != (32, 16, 2):
        return None
    if not set(trace + span + flags) <= hexdigits:
        return None
    if int(trace, 16) == 0 or int(span, 16) == 0:
        return None
    return int(trace, 16), int(span, 16), int(flags, 16) & 3


def mutate(text: str, data: st.DataObject) -> str:
    chars = list(text)
    for _ in range(data.draw(st.integers(0, 3))):
        op = data.draw(st.sampled_from(["set", "insert", "delete"]))
        pos = data.draw(st.integers(0, max(0, len(chars) - 1)))
        ch = data.draw(st.sampled_from("0123456789abcdefABF-. \t\u0661x"))
        if op == "set" and chars:
            chars[pos] = ch
        elif op == "insert":
            chars.insert(pos, ch)
        elif chars:
            del chars[pos]
    return "".join(chars)


@settings(max_examples=400)
@given(st.data(), st.sampled_from(["00", "01", "cc", "ff", "fe"]), trace_ids, span_ids,
       st.integers(0, 255), st.sampled_from(["", "-", "-x", ".x", "-00-ab"]))
def test_traceparent_agrees_with_reference(data: st.DataObject, version: str, trace_id: int,
                                           span_id: int, flags: int, tail: str) -> None:
    text = mutate(f"{version}-{trace_id:032x}-{span_id:016x}-{flags:02x}{tail}", data)
    ctx = tc.parse_traceparent(text)
    got = None if ctx is None else (ctx.trace_id, ctx.span_id, ctx.flags)
    assert got == reference_traceparent(text)


garbage_text = st.one_of(st.text(max_size=80), st.text("0123456789abcdef-", max_size=70))
garbage_values = st.one_of(garbage_text, st.binary(max_size=40), st.none(), st.integers())


@given(garbage_values, garbage_values, garbage_values, garbage_values)
def test_garbage_never_raises(a: object, b: object, c: object, d: object) -> None:
    tc.parse_traceparent(a)  # type: ignore[arg-type]
    tc.parse_b3_single(a)  # type: ignore[arg-type]
    tc.parse_b3_multi(a, b, c, d)  # type: ignore[arg-type]
    if isinstance(a, str):
        tc.parse_tracestate(a)
        tc.normalise_tracestate([a])
    tc.parse_tracestate([a, b])  # type: ignore[list-item]


@given(st.lists(st.tuples(st.sampled_from([*sorted(tc.TRACE_HEADERS), "x-user"]),
                          garbage_values), max_size=8))
def test_extract_never_raises_and_only_returns_valid_contexts(
        metadata: list[tuple[str, object]]) -> None:
    ctx = tc.extract(metadata)  # type: ignore[arg-type]
    if ctx is not None:
        assert 0 < ctx.trace_id < 1 << 128 and 0 < ctx.span_id < 1 << 64
        if ctx.tracestate is not None:
            assert tc.parse_tracestate(ctx.tracestate)
