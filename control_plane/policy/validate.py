"""Parsed YAML/JSON -> policy Resources, or one error listing every bad field.

A user fixing a policy file should see all of its problems at once, each as a field path and a
reason, so the validator never stops at the first error: it walks the whole document, records
every violation, and raises a single ValidationError at the end. It is strict (an unknown field
is an error, with the closest known name suggested) because a silently ignored typo in a
timeout or a split is worse than a rejected apply. Whatever the input, the only exception it
raises is ValidationError (fuzzed in tests/unit/test_policy_validate.py).

Paths look like `spec.routes[1].split[0].subset`; validate_documents() prefixes them with
`documents[i].` so a multi-document apply says which document is wrong.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

import yaml

from control_plane.policy import schema as s

MAX_TEXT_BYTES = 4 * 1024 * 1024  # a policy file is small; refuse absurd inputs early
MAX_U32 = 2**32 - 1
MAX_WEIGHT = 1_000_000
MAX_TOKENS_PER_SECOND = 1_000_000.0
MIN_DURATION = Decimal("0.001")  # 1ms
MAX_DURATION = Decimal(24 * 3600)  # 24h

_RESOURCE_NAME = re.compile(r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?")
_SERVICE_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?")
_LOCAL_NAME = _SERVICE_NAME  # subset and route names: they end up in cluster/route names
_LABEL_KEY = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._/-]{0,61}[A-Za-z0-9])?")
_HEADER_NAME = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]+")
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_METHOD = re.compile(rf"/{_IDENT}(\.{_IDENT})*/(\*|{_IDENT})")
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
_SPIFFE_ID = re.compile(r"spiffe://[a-z0-9._-]+(/[A-Za-z0-9._~!$&'()*+,;=:@%-]+)*")
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]{1,255}")
_RE2_UNSUPPORTED = re.compile(r"\(\?[=!<]|\\[1-9]|\(\?P=")  # lookaround, backreferences
_UNITS = {"ms": Decimal("0.001"), "s": Decimal(1), "m": Decimal(60), "h": Decimal(3600)}


@dataclass(frozen=True, slots=True)
class FieldViolation:
    field: str  # e.g. "spec.routes[1].split[0].subset"; "" = the document itself
    description: str


class ValidationError(Exception):
    """Every problem found, so the user can fix them all in one go."""

    def __init__(self, violations: Sequence[FieldViolation]) -> None:
        self.violations: list[FieldViolation] = list(violations)
        super().__init__(self.message())

    def message(self) -> str:
        return "; ".join(f"{v.field}: {v.description}" if v.field else v.description
                         for v in self.violations)

    def prefixed(self, prefix: str) -> ValidationError:
        return ValidationError([FieldViolation(_join(prefix, v.field), v.description)
                                for v in self.violations])


def _join(prefix: str, path: str) -> str:
    if not prefix:
        return path
    if not path:
        return prefix
    return prefix + path if path.startswith("[") else f"{prefix}.{path}"


def _describe(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return type(value).__name__


def _quote(value: str, limit: int = 60) -> str:
    text = value if len(value) <= limit else value[:limit] + "..."
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _suggest(word: str, choices: Iterable[str]) -> str:
    choices = list(choices)
    if len(word) > 64:
        return ""
    lowered = {c.lower(): c for c in choices}
    if word.lower() in lowered:
        return lowered[word.lower()]
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if close:
        return close[0]
    close = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.6)
    return lowered[close[0]] if close else ""


# ---------------------------------------------------------------------------------------------
# durations


def parse_duration(text: str) -> float:
    """'500ms' -> 0.5. Raises ValueError with the reason for anything else."""
    m = _DURATION.fullmatch(text)
    if m is None:
        raise ValueError(f'expected a duration like "500ms", "2s", "1m" or "1h", got '
                         f"{_quote(text)}")
    try:
        seconds = Decimal(m.group(1)) * _UNITS[m.group(2)]
    except InvalidOperation as e:  # pragma: no cover - the regex admits only plain decimals
        raise ValueError(f"not a number: {_quote(m.group(1))}") from e
    if seconds < MIN_DURATION:
        raise ValueError(f"must be at least 1ms, got {_quote(text)}")
    if seconds > MAX_DURATION:
        raise ValueError(f"must be at most 24h, got {_quote(text)}")
    return float(seconds)


def format_duration(seconds: float) -> str:
    """The inverse of parse_duration: the largest unit that keeps the value whole."""
    exact = Decimal(repr(float(seconds)))
    for unit in ("h", "m", "s"):
        n = exact / _UNITS[unit]
        if n == n.to_integral_value():
            return f"{int(n)}{unit}"
    ms = (exact * 1000).normalize()
    text = format(ms, "f")
    return f"{text}ms"


# ---------------------------------------------------------------------------------------------
# YAML


class _StrictLoader(yaml.SafeLoader):
    """Safe loading, plus: duplicate keys are errors and aliases are refused.

    PyYAML silently keeps the last of two equal keys, which would hide a mistake; aliases
    could expand a small file into an exponentially large tree for the validator to walk.
    """


def _compose_node(loader: _StrictLoader, parent: Any, index: Any) -> Any:
    if loader.check_event(yaml.AliasEvent):
        event = loader.peek_event()
        raise yaml.composer.ComposerError(
            None, None, "YAML aliases (*name) are not supported in policy files", event.start_mark)
    return yaml.composer.Composer.compose_node(loader, parent, index)


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode,
                       deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:
            continue  # unhashable: the base constructor reports it
        if duplicate:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark,
                f"found duplicate key {key!r}", key_node.start_mark)
    return yaml.constructor.SafeConstructor.construct_mapping(loader, node, deep=deep)


_StrictLoader.compose_node = _compose_node  # type: ignore[method-assign,assignment]
_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    lambda loader, node: _construct_mapping(loader, node))  # type: ignore[arg-type]
# No policy field is a date: keep `2024-13-01`-like scalars as the strings they look like
# (PyYAML would build a datetime, or fail with a bare ValueError for an impossible date).
_StrictLoader.add_constructor(
    "tag:yaml.org,2002:timestamp",
    lambda loader, node: loader.construct_scalar(node))  # type: ignore[arg-type]


def parse_documents(text: str | bytes) -> list[dict[str, Any]]:
    """Every non-empty document of a YAML (or JSON) text, in order."""
    if isinstance(text, bytes):
        if len(text) > MAX_TEXT_BYTES:
            raise ValidationError([FieldViolation("", f"input larger than {MAX_TEXT_BYTES} "
                                                      "bytes")])
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValidationError([FieldViolation("", f"input is not UTF-8: {e}")]) from None
    if len(text) > MAX_TEXT_BYTES:
        raise ValidationError([FieldViolation("", f"input larger than {MAX_TEXT_BYTES} bytes")])
    try:
        raw = list(yaml.load_all(text, Loader=_StrictLoader))  # a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = e.problem or e.context or "syntax error"
        if e.problem and e.context:
            what += f" ({e.context})"
        raise ValidationError([FieldViolation("", f"malformed YAML: {where}{what}")]) from None
    except yaml.YAMLError as e:
        raise ValidationError([FieldViolation("", f"malformed YAML: {e}")]) from None
    except RecursionError:
        raise ValidationError([FieldViolation("", "malformed YAML: nesting too deep")]) from None
    except Exception as e:  # the input is all PyYAML had, so it is the input's fault
        # PyYAML's scalar constructors fail bare on hostile values: ValueError for `!!int x` or
        # an integer with more digits than Python converts, IndexError for an empty `!!int`
        raise ValidationError([FieldViolation(
            "", f"malformed YAML: bad value ({type(e).__name__}: {e})")]) from None
    docs: list[dict[str, Any]] = []
    violations = []
    for i, doc in enumerate(d for d in raw if d is not None):
        if isinstance(doc, dict):
            docs.append(doc)
        else:
            violations.append(FieldViolation(
                f"documents[{i}]", "expected a mapping with kind, metadata and spec, got "
                                   + _describe(doc)))
    if violations:
        raise ValidationError(violations)
    return docs


# ---------------------------------------------------------------------------------------------
# the walker


class _Missing:
    pass


_MISSING: Any = _Missing()


class _Checker:
    """Records violations while compiling; callers get a placeholder when a value is bad."""

    def __init__(self) -> None:
        self.violations: list[FieldViolation] = []

    def bad(self, path: str, description: str) -> None:
        self.violations.append(FieldViolation(path, description))

    # --- shapes -------------------------------------------------------------------------------

    def mapping(self, value: Any, path: str, known: Sequence[str],
                required: Sequence[str] = ()) -> dict[str, Any] | None:
        """The known fields of a mapping; unknown ones and missing required ones reported."""
        if not isinstance(value, Mapping):
            self.bad(path, f"expected a mapping, got {_describe(value)}")
            return None
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                shown = f" {_quote(str(key))}" if isinstance(key, int | float) else ""
                self.bad(path, f"field names must be strings, got {_describe(key)}{shown}")
                continue
            if key in known:
                if item is not None:  # null = absent, as in kubectl
                    out[key] = item
                continue
            hint = _suggest(key, known)
            self.bad(_join(path, key), f"unknown field {_quote(key)}"
                     + (f' (did you mean "{hint}"?)' if hint else
                        f" (known: {', '.join(known)})"))
        for key in required:
            if key not in out:
                self.bad(_join(path, key), "required")
        return out

    def list_of(self, value: Any, path: str, *, non_empty_hint: str = "") -> list[Any] | None:
        if not isinstance(value, list | tuple):
            self.bad(path, f"expected a list, got {_describe(value)}")
            return None
        if not value and non_empty_hint:
            self.bad(path, f"must not be empty ({non_empty_hint})")
            return None
        return list(value)

    # --- scalars ------------------------------------------------------------------------------

    def string(self, value: Any, path: str, *, pattern: re.Pattern[str] | None = None,
               what: str = "", max_len: int = 1024) -> str | None:
        if not isinstance(value, str):
            hint = ""
            if isinstance(value, bool | int | float):
                hint = " (quote it)"
            self.bad(path, f"expected a string, got {_describe(value)}{hint}")
            return None
        if len(value) > max_len:
            self.bad(path, f"longer than {max_len} characters")
            return None
        if pattern is not None and pattern.fullmatch(value) is None:
            self.bad(path, f"invalid {what or 'value'} {_quote(value)}")
            return None
        return value

    def name(self, value: Any, path: str, pattern: re.Pattern[str], rule: str) -> str | None:
        if not isinstance(value, str):
            return self.string(value, path)
        if pattern.fullmatch(value) is None:
            self.bad(path, f"invalid name {_quote(value)}: {rule}")
            return None
        return value

    def service(self, value: Any, path: str) -> str | None:
        return self.name(value, path, _SERVICE_NAME,
                         "1-63 letters, digits, '.', '_' or '-', starting and ending with a "
                         "letter or digit")

    def local_name(self, value: Any, path: str) -> str | None:
        return self.name(value, path, _LOCAL_NAME,
                         "1-63 letters, digits, '.', '_' or '-', starting and ending with a "
                         "letter or digit")

    def number(self, value: Any, path: str, lo: float, hi: float, *,
               lo_open: bool = False) -> float | None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.bad(path, f"expected a number, got {_describe(value)}")
            return None
        if isinstance(value, float) and not math.isfinite(value):
            self.bad(path, f"must be a finite number, got {value}")
            return None
        if (value <= lo if lo_open else value < lo) or value > hi:
            low = f"greater than {_fmt(lo)}" if lo_open else f"at least {_fmt(lo)}"
            self.bad(path, f"must be {low} and at most {_fmt(hi)}, got {_fmt(value)}")
            return None
        return float(value)

    def integer(self, value: Any, path: str, lo: int, hi: int) -> int | None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.bad(path, f"expected a whole number, got {_describe(value)}")
            return None
        if isinstance(value, float):  # google.protobuf.Struct carries every number as a double
            if not math.isfinite(value) or not value.is_integer():
                self.bad(path, f"expected a whole number, got {_fmt(value)}")
                return None
            value = int(value)
        if not lo <= value <= hi:
            self.bad(path, f"must be between {lo} and {hi}, got {_fmt(value)}")
            return None
        return value

    def boolean(self, value: Any, path: str) -> bool | None:
        if not isinstance(value, bool):
            self.bad(path, f"expected true or false, got {_describe(value)}")
            return None
        return value

    def enum(self, value: Any, path: str, choices: Sequence[str]) -> str | None:
        if not isinstance(value, str):
            self.bad(path, f"expected one of {', '.join(choices)}, got {_describe(value)}")
            return None
        if value not in choices:
            hint = _suggest(value, choices)
            self.bad(path, f"unknown value {_quote(value)}"
                     + (f' (did you mean "{hint}"? one of ' if hint else " (one of ")
                     + ", ".join(choices) + ")")
            return None
        return value

    def duration(self, value: Any, path: str) -> float | None:
        if not isinstance(value, str):
            self.bad(path, f'expected a duration string like "500ms" or "2s", got '
                           f"{_describe(value)}")
            return None
        try:
            return parse_duration(value)
        except ValueError as e:
            self.bad(path, str(e))
            return None

    def method(self, value: Any, path: str) -> str | None:
        if not isinstance(value, str):
            return self.string(value, path)
        if _METHOD.fullmatch(value) is None:
            self.bad(path, f"invalid method {_quote(value)}: expected \"/pkg.Service/Method\" "
                           'or "/pkg.Service/*"')
            return None
        return value

    def header_name(self, value: Any, path: str) -> str | None:
        if not isinstance(value, str):
            return self.string(value, path)
        if value.startswith(":"):
            self.bad(path, f"pseudo-header {_quote(value)} cannot be used")
        elif value != value.lower() and _HEADER_NAME.fullmatch(value.lower()):
            self.bad(path, f"header names are lower case (did you mean \"{value.lower()}\"?)")
        elif _HEADER_NAME.fullmatch(value) is None or len(value) > 256:
            self.bad(path, f"invalid header name {_quote(value)}")
        elif value.startswith("grpc-"):
            self.bad(path, f"{_quote(value)}: headers starting with grpc- are reserved by gRPC")
        elif value.endswith("-bin"):
            self.bad(path, f"{_quote(value)}: binary (-bin) headers cannot be matched")
        else:
            return value
        return None


def _fmt(n: float) -> str:
    if isinstance(n, float) and n.is_integer() and abs(n) < 1e16:
        return str(int(n))
    return repr(n) if isinstance(n, float) else str(n)


def _get(obj: dict[str, Any] | None, key: str) -> Any:
    return _MISSING if obj is None else obj.get(key, _MISSING)


def _present(value: Any) -> bool:
    return value is not _MISSING


# ---------------------------------------------------------------------------------------------
# TrafficPolicy


def _load_balancer(c: _Checker, value: Any, path: str) -> s.LoadBalancer:
    m = c.mapping(value, path, ("algorithm", "hashHeader"))
    algorithm = "ROUND_ROBIN"
    if _present(v := _get(m, "algorithm")):
        algorithm = c.enum(v, _join(path, "algorithm"), s.LB_ALGORITHMS) or algorithm
    hash_header = ""
    if _present(v := _get(m, "hashHeader")):
        hash_header = c.header_name(v, _join(path, "hashHeader")) or ""
        if algorithm != "RING_HASH":  # also when algorithm is left at its default
            c.bad(_join(path, "hashHeader"), "only applies to algorithm RING_HASH")
    elif algorithm == "RING_HASH":
        c.bad(_join(path, "hashHeader"), "required with algorithm RING_HASH (the request "
                                         "header whose value picks the instance)")
    return s.LoadBalancer(algorithm=algorithm, hash_header=hash_header)


def _retry(c: _Checker, value: Any, path: str) -> s.RetryPolicy:
    m = c.mapping(value, path, ("maxAttempts", "retryOn", "perTryTimeout", "backoff", "budget"))
    out = s.RetryPolicy()
    max_attempts = out.max_attempts
    if _present(v := _get(m, "maxAttempts")):
        p = _join(path, "maxAttempts")
        if isinstance(v, int | float) and not isinstance(v, bool) and v > 5:
            c.bad(p, f"must be between 2 and 5 (gRPC caps attempts at 5, gRFC A6), got {_fmt(v)}")
        else:
            max_attempts = c.integer(v, p, 2, 5) or max_attempts
    retry_on = out.retry_on
    if _present(v := _get(m, "retryOn")):
        p = _join(path, "retryOn")
        items = c.list_of(v, p, non_empty_hint="list the status codes to retry, e.g. "
                                                "[UNAVAILABLE]")
        if items is not None:
            codes: list[str] = []
            for i, item in enumerate(items):
                code = c.enum(item, f"{p}[{i}]", s.RETRYABLE_CODES)
                if code is None:
                    continue
                if code in codes:
                    c.bad(f"{p}[{i}]", f"{code} listed twice")
                codes.append(code)
            retry_on = tuple(dict.fromkeys(codes)) or retry_on
    per_try = None
    if _present(v := _get(m, "perTryTimeout")):
        per_try = c.duration(v, _join(path, "perTryTimeout"))
    backoff = out.backoff
    if _present(v := _get(m, "backoff")):
        bp = _join(path, "backoff")
        bm = c.mapping(v, bp, ("baseInterval", "maxInterval"))
        base = backoff.base_interval
        if _present(b := _get(bm, "baseInterval")):
            base = c.duration(b, _join(bp, "baseInterval")) or base
        maximum = base * 10
        if _present(b := _get(bm, "maxInterval")):
            got = c.duration(b, _join(bp, "maxInterval"))
            if got is not None and got < base:
                c.bad(_join(bp, "maxInterval"), f"must be at least baseInterval "
                      f"({format_duration(base)}), got {format_duration(got)}")
            maximum = got or maximum
        backoff = s.RetryBackoff(base_interval=base, max_interval=maximum)
    budget = out.budget
    if _present(v := _get(m, "budget")):
        bp = _join(path, "budget")
        bm = c.mapping(v, bp, ("retryRatio", "minRetriesPerSecond"))
        ratio, floor = budget.retry_ratio, budget.min_retries_per_second
        if _present(b := _get(bm, "retryRatio")):
            got = c.number(b, _join(bp, "retryRatio"), 0.0, 1.0)
            ratio = ratio if got is None else got
        if _present(b := _get(bm, "minRetriesPerSecond")):
            got = c.number(b, _join(bp, "minRetriesPerSecond"), 0.0, 100_000.0)
            floor = floor if got is None else got
        budget = s.RetryBudget(retry_ratio=ratio, min_retries_per_second=floor)
    return s.RetryPolicy(max_attempts=max_attempts, retry_on=retry_on, per_try_timeout=per_try,
                         backoff=backoff, budget=budget)


def _circuit_breaker(c: _Checker, value: Any, path: str) -> s.CircuitBreaker:
    m = c.mapping(value, path, ("maxRequests", "maxPendingRequests"))
    out = s.CircuitBreaker()
    max_requests, max_pending = out.max_requests, out.max_pending_requests
    if _present(v := _get(m, "maxRequests")):
        got = c.integer(v, _join(path, "maxRequests"), 1, MAX_U32)
        max_requests = max_requests if got is None else got
    if _present(v := _get(m, "maxPendingRequests")):
        got = c.integer(v, _join(path, "maxPendingRequests"), 0, MAX_U32)
        max_pending = max_pending if got is None else got
    return s.CircuitBreaker(max_requests=max_requests, max_pending_requests=max_pending)


def _outlier_detection(c: _Checker, value: Any, path: str) -> s.OutlierDetection:
    m = c.mapping(value, path, ("consecutiveErrors", "interval", "baseEjectionTime",
                                "maxEjectionPercent", "failurePercentage"))
    d = s.OutlierDetection()
    consecutive, interval, base, max_pct = (d.consecutive_errors, d.interval,
                                            d.base_ejection_time, d.max_ejection_percent)
    if _present(v := _get(m, "consecutiveErrors")):
        consecutive = c.integer(v, _join(path, "consecutiveErrors"), 1, MAX_U32) or consecutive
    if _present(v := _get(m, "interval")):
        interval = c.duration(v, _join(path, "interval")) or interval
    if _present(v := _get(m, "baseEjectionTime")):
        base = c.duration(v, _join(path, "baseEjectionTime")) or base
    if _present(v := _get(m, "maxEjectionPercent")):
        got = c.integer(v, _join(path, "maxEjectionPercent"), 0, 100)
        max_pct = max_pct if got is None else got
    failure = None
    if _present(v := _get(m, "failurePercentage")):
        fp = _join(path, "failurePercentage")
        fm = c.mapping(v, fp, ("threshold", "minimumHosts", "requestVolume"))
        f = s.FailurePercentage()
        threshold, hosts, volume = f.threshold, f.minimum_hosts, f.request_volume
        if _present(x := _get(fm, "threshold")):
            got = c.integer(x, _join(fp, "threshold"), 0, 100)
            threshold = threshold if got is None else got
        if _present(x := _get(fm, "minimumHosts")):
            got = c.integer(x, _join(fp, "minimumHosts"), 0, MAX_U32)
            hosts = hosts if got is None else got
        if _present(x := _get(fm, "requestVolume")):
            got = c.integer(x, _join(fp, "requestVolume"), 0, MAX_U32)
            volume = volume if got is None else got
        failure = s.FailurePercentage(threshold=threshold, minimum_hosts=hosts,
                                      request_volume=volume)
    return s.OutlierDetection(consecutive_errors=consecutive, interval=interval,
                              base_ejection_time=base, max_ejection_percent=max_pct,
                              failure_percentage=failure)


def _subsets(c: _Checker, value: Any, path: str) -> tuple[s.Subset, ...]:
    items = c.list_of(value, path)
    if items is None:
        return ()
    out: list[s.Subset] = []
    first: dict[str, int] = {}
    for i, item in enumerate(items):
        p = f"{path}[{i}]"
        m = c.mapping(item, p, ("name", "labels"), required=("name", "labels"))
        name = None
        if _present(v := _get(m, "name")):
            name = c.local_name(v, _join(p, "name"))
            if name is not None:
                if name in first:
                    c.bad(_join(p, "name"), f"duplicate subset name {_quote(name)} (also "
                                            f"{path}[{first[name]}])")
                else:
                    first[name] = i
        labels: list[tuple[str, str]] = []
        if _present(v := _get(m, "labels")):
            lp = _join(p, "labels")
            if not isinstance(v, Mapping):
                c.bad(lp, f"expected a mapping of label to value, got {_describe(v)}")
            elif not v:
                c.bad(lp, "must not be empty (a subset selects instances by at least one "
                          "label, e.g. {version: v1})")
            else:
                for key, val in v.items():
                    if not isinstance(key, str):
                        c.bad(lp, f"label names must be strings, got {_describe(key)}")
                        continue
                    kp = _join(lp, key)
                    if _LABEL_KEY.fullmatch(key) is None:
                        c.bad(kp, f"invalid label name {_quote(key)}")
                        continue
                    got = c.string(val, kp, max_len=253)
                    if got is not None:
                        labels.append((key, got))
        out.append(s.Subset(name=name or "", labels=tuple(sorted(labels))))
    return tuple(out)


def _header_match(c: _Checker, value: Any, path: str) -> s.HeaderMatch:
    ops = ("exact", "prefix", "suffix", "regex", "present")
    m = c.mapping(value, path, ("name", *ops), required=("name",))
    name = ""
    if _present(v := _get(m, "name")):
        name = c.header_name(v, _join(path, "name")) or ""
    given = [op for op in ops if _present(_get(m, op))]
    if m is not None and len(given) != 1:
        c.bad(path, "needs exactly one of exact, prefix, suffix, regex, present"
                    + (f" (got {', '.join(given)})" if given else ""))
    kwargs: dict[str, Any] = {}
    for op in given:
        v = _get(m, op)
        op_path = _join(path, op)
        if op == "present":
            kwargs[op] = c.boolean(v, op_path)
            continue
        text = c.string(v, op_path)
        if text is None:
            continue
        if op == "prefix" and text == "":
            c.bad(op_path, 'must not be empty (use "present: true" to match any value)')
        if op == "regex":
            if _RE2_UNSUPPORTED.search(text):
                c.bad(op_path, "lookaround and backreferences are not supported (RE2 syntax)")
                continue
            try:
                re.compile(text)
            except (re.error, RecursionError, OverflowError, ValueError) as e:
                c.bad(op_path, f"invalid regular expression: {e}")
                continue
        kwargs[op] = text
    return s.HeaderMatch(name=name, **kwargs)


def _route_match(c: _Checker, value: Any, path: str) -> s.RouteMatch:
    m = c.mapping(value, path, ("method", "headers"))
    method = ""
    if _present(v := _get(m, "method")):
        method = c.method(v, _join(path, "method")) or ""
    headers: list[s.HeaderMatch] = []
    if _present(v := _get(m, "headers")):
        hp = _join(path, "headers")
        items = c.list_of(v, hp)
        for i, item in enumerate(items or ()):
            headers.append(_header_match(c, item, f"{hp}[{i}]"))
    return s.RouteMatch(method=method, headers=tuple(headers))


def _split(c: _Checker, value: Any, path: str,
           subsets: Sequence[str]) -> tuple[s.WeightedSubset, ...]:
    items = c.list_of(value, path, non_empty_hint="leave split out to send to the whole "
                                                  "service")
    if items is None:
        return ()
    out: list[s.WeightedSubset] = []
    seen: dict[str, int] = {}
    total = 0
    all_weights_valid = True
    for i, item in enumerate(items):
        p = f"{path}[{i}]"
        m = c.mapping(item, p, ("subset", "weight"), required=("subset", "weight"))
        name = ""
        if _present(v := _get(m, "subset")):
            got = c.string(v, _join(p, "subset"))
            if got is not None:
                if got not in subsets:
                    defined = ", ".join(subsets) if subsets else "none"
                    c.bad(_join(p, "subset"), f"unknown subset {_quote(got)} (defined: "
                                              f"{defined})")
                elif got in seen:
                    c.bad(_join(p, "subset"), f"subset {_quote(got)} listed twice (also "
                                              f"{path}[{seen[got]}])")
                else:
                    seen[got] = i
                name = got
        weight = 0
        if _present(v := _get(m, "weight")):
            got_w = c.integer(v, _join(p, "weight"), 0, MAX_WEIGHT)
            if got_w is None:
                all_weights_valid = False
            else:
                weight = got_w
        else:
            all_weights_valid = False
        total += weight
        out.append(s.WeightedSubset(subset=name, weight=weight))
    if all_weights_valid and total == 0:
        c.bad(path, "weights add up to 0: at least one must be positive")
    return tuple(out)


def _fault(c: _Checker, value: Any, path: str) -> s.Fault:
    m = c.mapping(value, path, ("delay", "abort"))
    if m is not None and not m:
        c.bad(path, "needs delay, abort or both")
    delay = abort = None
    if _present(v := _get(m, "delay")):
        dp = _join(path, "delay")
        dm = c.mapping(v, dp, ("percent", "fixedDelay"), required=("fixedDelay",))
        fixed, pct = 0.0, 100.0
        if _present(x := _get(dm, "fixedDelay")):
            fixed = c.duration(x, _join(dp, "fixedDelay")) or fixed
        if _present(x := _get(dm, "percent")):
            got = c.number(x, _join(dp, "percent"), 0.0, 100.0)
            pct = pct if got is None else got
        delay = s.FaultDelay(fixed_delay=fixed, percent=pct)
    if _present(v := _get(m, "abort")):
        ap = _join(path, "abort")
        am = c.mapping(v, ap, ("percent", "code"), required=("code",))
        code, pct = "UNAVAILABLE", 100.0
        if _present(x := _get(am, "code")):
            choices = [k for k in s.STATUS_CODES if k != "OK"]
            code = c.enum(x, _join(ap, "code"), choices) or code
        if _present(x := _get(am, "percent")):
            got = c.number(x, _join(ap, "percent"), 0.0, 100.0)
            pct = pct if got is None else got
        abort = s.FaultAbort(code=code, percent=pct)
    return s.Fault(delay=delay, abort=abort)


def _routes(c: _Checker, value: Any, path: str, subsets: Sequence[str]) -> tuple[s.Route, ...]:
    items = c.list_of(value, path)
    if items is None:
        return ()
    out: list[s.Route] = []
    first: dict[str, int] = {}
    for i, item in enumerate(items):
        p = f"{path}[{i}]"
        m = c.mapping(item, p, ("name", "match", "split", "timeout", "retry", "fault"),
                      required=("name",))
        name = ""
        if _present(v := _get(m, "name")):
            name = c.local_name(v, _join(p, "name")) or ""
            if name in first:
                c.bad(_join(p, "name"), f"duplicate route name {_quote(name)} (also "
                                        f"{path}[{first[name]}])")
            elif name:
                first[name] = i
        match = s.RouteMatch()
        if _present(v := _get(m, "match")):
            match = _route_match(c, v, _join(p, "match"))
        split: tuple[s.WeightedSubset, ...] = ()
        if _present(v := _get(m, "split")):
            split = _split(c, v, _join(p, "split"), subsets)
        timeout = None
        if _present(v := _get(m, "timeout")):
            timeout = c.duration(v, _join(p, "timeout"))
        retry = None
        if _present(v := _get(m, "retry")):
            retry = _retry(c, v, _join(p, "retry"))
        fault = None
        if _present(v := _get(m, "fault")):
            fault = _fault(c, v, _join(p, "fault"))
        out.append(s.Route(name=name, match=match, split=split, timeout=timeout, retry=retry,
                           fault=fault))
    return tuple(out)


def _traffic_policy(c: _Checker, value: Any, path: str) -> s.TrafficPolicy:
    m = c.mapping(value, path, ("service", "loadBalancer", "timeout", "retry", "circuitBreaker",
                                "outlierDetection", "subsets", "routes"), required=("service",))
    service = ""
    if _present(v := _get(m, "service")):
        service = c.service(v, _join(path, "service")) or ""
    lb = s.LoadBalancer()
    if _present(v := _get(m, "loadBalancer")):
        lb = _load_balancer(c, v, _join(path, "loadBalancer"))
    timeout = None
    if _present(v := _get(m, "timeout")):
        timeout = c.duration(v, _join(path, "timeout"))
    retry = None
    if _present(v := _get(m, "retry")):
        retry = _retry(c, v, _join(path, "retry"))
    breaker = None
    if _present(v := _get(m, "circuitBreaker")):
        breaker = _circuit_breaker(c, v, _join(path, "circuitBreaker"))
    outlier = None
    if _present(v := _get(m, "outlierDetection")):
        outlier = _outlier_detection(c, v, _join(path, "outlierDetection"))
    subsets: tuple[s.Subset, ...] = ()
    if _present(v := _get(m, "subsets")):
        subsets = _subsets(c, v, _join(path, "subsets"))
    names = list(dict.fromkeys(x.name for x in subsets if x.name))
    routes: tuple[s.Route, ...] = ()
    if _present(v := _get(m, "routes")):
        routes = _routes(c, v, _join(path, "routes"), names)
    return s.TrafficPolicy(service=service, load_balancer=lb, timeout=timeout, retry=retry,
                           circuit_breaker=breaker, outlier_detection=outlier, subsets=subsets,
                           routes=routes)


# ---------------------------------------------------------------------------------------------
# AuthorizationPolicy, RateLimitPolicy, MeshConfig


def _authorization_policy(c: _Checker, value: Any, path: str) -> s.AuthorizationPolicy:
    m = c.mapping(value, path, ("service", "rules"), required=("service", "rules"))
    service = ""
    if _present(v := _get(m, "service")):
        service = c.service(v, _join(path, "service")) or ""
    rules: list[s.AuthorizationRule] = []
    if _present(v := _get(m, "rules")):
        rp = _join(path, "rules")
        items = c.list_of(v, rp, non_empty_hint="a policy needs at least one rule; to deny "
                                                "everything use [{action: DENY}]")
        for i, item in enumerate(items or ()):
            p = f"{rp}[{i}]"
            rm = c.mapping(item, p, ("action", "from", "methods"), required=("action",))
            action = "ALLOW"
            if _present(x := _get(rm, "action")):
                action = c.enum(x, _join(p, "action"), s.AUTHZ_ACTIONS) or action
            sources: list[s.Source] = []
            if _present(x := _get(rm, "from")):
                fp = _join(p, "from")
                srcs = c.list_of(x, fp, non_empty_hint="leave from out to match any caller")
                for j, src in enumerate(srcs or ()):
                    sp = f"{fp}[{j}]"
                    sm = c.mapping(src, sp, ("service", "spiffeId"))
                    if sm is not None and len(sm) != 1:
                        c.bad(sp, "needs exactly one of service, spiffeId")
                        continue
                    if _present(y := _get(sm, "service")):
                        sources.append(s.Source(service=c.service(y, _join(sp, "service"))
                                                or ""))
                    elif _present(y := _get(sm, "spiffeId")):
                        sid = c.string(y, _join(sp, "spiffeId"), pattern=_SPIFFE_ID,
                                       what="SPIFFE ID (spiffe://TRUST_DOMAIN/PATH)", max_len=2048)
                        sources.append(s.Source(spiffe_id=sid or ""))
            methods: list[str] = []
            if _present(x := _get(rm, "methods")):
                mp = _join(p, "methods")
                ms = c.list_of(x, mp, non_empty_hint="leave methods out to match any method")
                for j, meth in enumerate(ms or ()):
                    got = c.method(meth, f"{mp}[{j}]")
                    if got is not None:
                        methods.append(got)
            rules.append(s.AuthorizationRule(action=action, sources=tuple(sources),
                                             methods=tuple(methods)))
    return s.AuthorizationPolicy(service=service, rules=tuple(rules))


def _bucket(c: _Checker, m: dict[str, Any] | None, path: str) -> tuple[float, int]:
    tps = 1.0
    if _present(v := _get(m, "tokensPerSecond")):
        tps = c.number(v, _join(path, "tokensPerSecond"), 0.0, MAX_TOKENS_PER_SECOND,
                       lo_open=True) or tps
    burst = max(1, math.ceil(tps))
    if _present(v := _get(m, "burst")):
        burst = c.integer(v, _join(path, "burst"), 1, MAX_U32) or burst
    return tps, burst


def _rate_limit_policy(c: _Checker, value: Any, path: str) -> s.RateLimitPolicy:
    m = c.mapping(value, path, ("service", "tokensPerSecond", "burst", "perMethod", "perCaller",
                                "overrides"), required=("service", "tokensPerSecond"))
    service = ""
    if _present(v := _get(m, "service")):
        service = c.service(v, _join(path, "service")) or ""
    tps, burst = _bucket(c, m, path)
    per_method = per_caller = False
    if _present(v := _get(m, "perMethod")):
        per_method = bool(c.boolean(v, _join(path, "perMethod")))
    if _present(v := _get(m, "perCaller")):
        per_caller = bool(c.boolean(v, _join(path, "perCaller")))
    overrides: list[s.RateLimitOverride] = []
    if _present(v := _get(m, "overrides")):
        op = _join(path, "overrides")
        seen: dict[tuple[str, str], int] = {}
        for i, item in enumerate(c.list_of(v, op) or ()):
            p = f"{op}[{i}]"
            om = c.mapping(item, p, ("method", "caller", "tokensPerSecond", "burst"),
                           required=("tokensPerSecond",))
            method = caller = ""
            if _present(x := _get(om, "method")):
                method = c.method(x, _join(p, "method")) or ""
            if _present(x := _get(om, "caller")):
                caller = c.service(x, _join(p, "caller")) or ""
            if om is not None and "method" not in om and "caller" not in om:
                c.bad(p, "needs method, caller or both (what the override applies to)")
            otps, oburst = _bucket(c, om, p)
            key = (method, caller)
            if (method or caller) and key in seen:
                c.bad(p, f"duplicate override for the same method and caller (also "
                         f"{op}[{seen[key]}])")
            seen.setdefault(key, i)
            overrides.append(s.RateLimitOverride(tokens_per_second=otps, burst=oburst,
                                                 method=method, caller=caller))
    return s.RateLimitPolicy(service=service, tokens_per_second=tps, burst=burst,
                             per_method=per_method, per_caller=per_caller,
                             overrides=tuple(overrides))


def _mesh_config(c: _Checker, value: Any, path: str) -> s.MeshConfig:
    m = c.mapping(value, path, ("mtls", "trustDomain", "tracing"))
    d = s.MeshConfig()
    mode, domain, sampling = d.mtls_mode, d.trust_domain, d.sampling_percent
    if _present(v := _get(m, "mtls")):
        mp = _join(path, "mtls")
        mm = c.mapping(v, mp, ("mode",))
        if _present(x := _get(mm, "mode")):
            mode = c.enum(x, _join(mp, "mode"), s.MTLS_MODES) or mode
    if _present(v := _get(m, "trustDomain")):
        domain = c.string(v, _join(path, "trustDomain"), pattern=_TRUST_DOMAIN,
                          what="trust domain (lower-case letters, digits, '.', '_', '-')") \
            or domain
    if _present(v := _get(m, "tracing")):
        tp = _join(path, "tracing")
        tm = c.mapping(v, tp, ("samplingPercent",))
        if _present(x := _get(tm, "samplingPercent")):
            got = c.number(x, _join(tp, "samplingPercent"), 0.0, 100.0)
            sampling = sampling if got is None else got
    return s.MeshConfig(mtls_mode=mode, trust_domain=domain, sampling_percent=sampling)


_SPECS: dict[str, Callable[[_Checker, Any, str], s.Spec]] = {
    s.TRAFFIC_POLICY: _traffic_policy,
    s.AUTHORIZATION_POLICY: _authorization_policy,
    s.RATE_LIMIT_POLICY: _rate_limit_policy,
    s.MESH_CONFIG: _mesh_config,
}


# ---------------------------------------------------------------------------------------------
# public entry points


def _resource_version(c: _Checker, value: Any, path: str) -> str:
    if isinstance(value, bool):
        c.bad(path, "expected a version string, got a boolean")
        return ""
    if isinstance(value, int | float):
        got = c.integer(value, path, 0, 2**63 - 1)
        return "" if got is None else str(got)
    if not isinstance(value, str):
        c.bad(path, f"expected a version string, got {_describe(value)}")
        return ""
    if value and (not value.isascii() or not value.isdigit() or len(value) > 19):
        c.bad(path, f"invalid resource version {_quote(value)} (the version a get returned)")
        return ""
    return str(int(value)) if value else ""


def validate(doc: Any) -> s.Resource:
    """One parsed document -> its Resource (resource_version as given, if any)."""
    c = _Checker()
    m = c.mapping(doc, "", ("kind", "metadata", "spec"), required=("kind", "metadata"))
    if m is None:
        raise ValidationError(c.violations)
    kind = None
    if _present(v := _get(m, "kind")):
        if isinstance(v, str) and v not in s.KINDS:
            hint = _suggest(v, s.KINDS)
            c.bad("kind", f"unknown kind {_quote(v)}" + (f' (did you mean "{hint}"?)' if hint
                                                        else f" (kinds: {', '.join(s.KINDS)})"))
        else:
            kind = c.enum(v, "kind", s.KINDS)
    name = ""
    version = ""
    if _present(v := _get(m, "metadata")):
        mm = c.mapping(v, "metadata", ("name", "resourceVersion"), required=("name",))
        if _present(x := _get(mm, "name")):
            name = c.name(x, "metadata.name", _RESOURCE_NAME,
                          "1-253 lower-case letters, digits, '.' or '-', starting and ending "
                          "with a letter or digit") or ""
            if kind == s.MESH_CONFIG and name and name != s.MESH_CONFIG_NAME:
                c.bad("metadata.name", f'a MeshConfig must be named "{s.MESH_CONFIG_NAME}", '
                                       f"got {_quote(name)}")
        if _present(x := _get(mm, "resourceVersion")):
            version = _resource_version(c, x, "metadata.resourceVersion")
    spec: s.Spec | None = None
    raw_spec = _get(m, "spec")
    if kind is not None:
        if not _present(raw_spec):
            if kind == s.MESH_CONFIG:
                raw_spec = {}
            else:
                c.bad("spec", "required")
        if _present(raw_spec):
            spec = _SPECS[kind](c, raw_spec, "spec")
    if c.violations or kind is None or spec is None:
        raise ValidationError(c.violations or [FieldViolation("", "invalid resource")])
    return s.Resource(kind=kind, name=name, spec=spec, resource_version=version)


def validate_set(resources: Sequence[s.Resource],
                 existing: Iterable[s.Resource] = ()) -> None:
    """Rules across resources: names unique in one apply, one policy per kind per service.

    `resources` is one apply (paths name them as documents[i]); `existing` is what is stored,
    which the apply replaces by (kind, name).
    """
    violations: list[FieldViolation] = []
    seen: dict[tuple[str, str], int] = {}
    for i, r in enumerate(resources):
        if r.key in seen:
            violations.append(FieldViolation(
                f"documents[{i}].metadata.name",
                f"duplicate {r.kind} {_quote(r.name)} in one apply (also documents"
                f"[{seen[r.key]}])"))
        else:
            seen[r.key] = i
    incoming = {r.key for r in resources}
    owners: dict[tuple[str, str], str] = {}  # (kind, service) -> stored name
    for r in existing:
        if r.key not in incoming and r.kind != s.MESH_CONFIG:
            owners.setdefault((r.kind, r.service), r.name)
    claimed: dict[tuple[str, str], int] = {}
    for i, r in enumerate(resources):
        if r.kind == s.MESH_CONFIG or seen.get(r.key) != i:
            continue
        key = (r.kind, r.service)
        if key in owners:
            violations.append(FieldViolation(
                f"documents[{i}].spec.service",
                f"service {_quote(r.service)} already has {r.kind} {_quote(owners[key])}; "
                f"one {r.kind} per service (edit or delete that one)"))
        elif key in claimed:
            violations.append(FieldViolation(
                f"documents[{i}].spec.service",
                f"service {_quote(r.service)} has two {r.kind}s in this apply (also "
                f"documents[{claimed[key]}]); one {r.kind} per service"))
        else:
            claimed[key] = i
    if violations:
        raise ValidationError(violations)


def validate_documents(docs: Sequence[Any],
                       existing: Iterable[s.Resource] = ()) -> list[s.Resource]:
    """A whole apply: every document validated, then the cross-resource rules."""
    violations: list[FieldViolation] = []
    out: list[s.Resource] = []
    for i, doc in enumerate(docs):
        try:
            out.append(validate(doc))
        except ValidationError as e:
            violations.extend(e.prefixed(f"documents[{i}]").violations)
    if violations:
        raise ValidationError(violations)
    validate_set(out, existing)
    return out
