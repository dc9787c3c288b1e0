"""Policy validation: what a user sees for good and bad policy files, plus fuzzing.

The validator's promises: a valid document compiles to frozen values with every default filled
in; a bad one raises one ValidationError naming every bad field path with a reason; and nothing
else ever escapes it, whatever the input (hypothesis, derandomized so runs are repeatable).
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from control_plane.policy import schema as s
from control_plane.policy.serialize import to_document
from control_plane.policy.validate import (
    FieldViolation,
    ValidationError,
    format_duration,
    parse_documents,
    parse_duration,
    validate,
    validate_documents,
    validate_set,
)

TRAFFIC_YAML = """\
kind: TrafficPolicy
metadata: {name: orders}
spec:
  service: orders
  loadBalancer: {algorithm: RING_HASH, hashHeader: x-user-id}
  timeout: 2s
  retry: {maxAttempts: 3, retryOn: [UNAVAILABLE, RESOURCE_EXHAUSTED], perTryTimeout: 500ms,
          backoff: {baseInterval: 25ms, maxInterval: 250ms},
          budget: {retryRatio: 0.2, minRetriesPerSecond: 10}}
  circuitBreaker: {maxRequests: 1000, maxPendingRequests: 100}
  outlierDetection: {consecutiveErrors: 5, interval: 10s, baseEjectionTime: 30s,
                     maxEjectionPercent: 50,
                     failurePercentage: {threshold: 85, minimumHosts: 3, requestVolume: 50}}
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
  routes:
    - name: canary
      match: {method: /shop.Orders/*, headers: [{name: x-canary, exact: "true"}]}
      split: [{subset: v2, weight: 100}]
    - name: default
      split: [{subset: v1, weight: 90}, {subset: v2, weight: 10}]
      timeout: 1s
      fault: {delay: {percent: 10, fixedDelay: 100ms}, abort: {percent: 5, code: UNAVAILABLE}}
"""

AUTHZ_YAML = """\
kind: AuthorizationPolicy
metadata: {name: payments}
spec:
  service: payments
  rules:
    - action: DENY
      from: [{spiffeId: "spiffe://pymesh.local/service/untrusted"}]
    - action: ALLOW
      from: [{service: checkout}]
      methods: [/shop.Payments/Charge, /shop.Payments/*]
"""

RATE_YAML = """\
kind: RateLimitPolicy
metadata: {name: catalog}
spec:
  service: catalog
  tokensPerSecond: 100
  burst: 200
  perCaller: true
  overrides:
    - {method: /shop.Catalog/Search, tokensPerSecond: 10}
    - {caller: frontend, tokensPerSecond: 500, burst: 1000}
"""

MESH_YAML = """\
kind: MeshConfig
metadata: {name: default}
spec:
  mtls: {mode: STRICT}
  trustDomain: example.org
  tracing: {samplingPercent: 12.5}
"""

EXAMPLES = [TRAFFIC_YAML, AUTHZ_YAML, RATE_YAML, MESH_YAML]


def doc(text: str = TRAFFIC_YAML) -> dict[str, Any]:
    return parse_documents(text)[0]


def violations(d: Any) -> dict[str, str]:
    with pytest.raises(ValidationError) as info:
        validate(d)
    return {v.field: v.description for v in info.value.violations}


# ---------------------------------------------------------------------------------------------
# valid documents compile to the values the rest of the control plane reads


def test_traffic_policy_compiles_with_durations_in_seconds() -> None:
    r = validate(doc())
    assert (r.kind, r.name, r.resource_version) == ("TrafficPolicy", "orders", "")
    p = r.spec
    assert isinstance(p, s.TrafficPolicy)
    assert p.service == "orders"
    assert p.load_balancer == s.LoadBalancer("RING_HASH", "x-user-id")
    assert p.timeout == 2.0
    assert p.retry == s.RetryPolicy(3, ("UNAVAILABLE", "RESOURCE_EXHAUSTED"), 0.5,
                                    s.RetryBackoff(0.025, 0.25), s.RetryBudget(0.2, 10.0))
    assert p.circuit_breaker == s.CircuitBreaker(1000, 100)
    assert p.outlier_detection == s.OutlierDetection(5, 10.0, 30.0, 50,
                                                     s.FailurePercentage(85, 3, 50))
    assert p.subsets == (s.Subset("v1", (("version", "v1"),)), s.Subset("v2", (("version", "v2"),)))
    canary, default = p.routes
    assert canary.match == s.RouteMatch("/shop.Orders/*",
                                        (s.HeaderMatch("x-canary", exact="true"),))
    assert canary.split == (s.WeightedSubset("v2", 100),)
    assert canary.timeout is None and canary.retry is None and canary.fault is None
    assert default.match == s.RouteMatch()
    assert default.split == (s.WeightedSubset("v1", 90), s.WeightedSubset("v2", 10))
    assert default.timeout == 1.0
    assert default.fault == s.Fault(s.FaultDelay(0.1, 10.0), s.FaultAbort("UNAVAILABLE", 5.0))
    assert default.fault.abort is not None and default.fault.abort.code_number == 14


def test_minimal_traffic_policy_gets_defaults() -> None:
    r = validate({"kind": "TrafficPolicy", "metadata": {"name": "t"}, "spec": {"service": "a"}})
    assert r.spec == s.TrafficPolicy(service="a")
    r = validate({"kind": "TrafficPolicy", "metadata": {"name": "t"},
                  "spec": {"service": "a", "retry": {}, "outlierDetection": {}}})
    assert isinstance(r.spec, s.TrafficPolicy)
    assert r.spec.retry == s.RetryPolicy()  # 2 attempts on UNAVAILABLE, 25ms..250ms backoff
    assert r.spec.outlier_detection == s.OutlierDetection()


def test_backoff_max_defaults_to_ten_times_base() -> None:
    d = {"kind": "TrafficPolicy", "metadata": {"name": "t"},
         "spec": {"service": "a", "retry": {"backoff": {"baseInterval": "100ms"}}}}
    r = validate(d)
    assert isinstance(r.spec, s.TrafficPolicy) and r.spec.retry is not None
    assert r.spec.retry.backoff == s.RetryBackoff(0.1, 1.0)


def test_other_kinds_compile() -> None:
    a = validate(doc(AUTHZ_YAML)).spec
    assert a == s.AuthorizationPolicy("payments", (
        s.AuthorizationRule("DENY", (s.Source(spiffe_id="spiffe://pymesh.local/service/untrusted"),)),
        s.AuthorizationRule("ALLOW", (s.Source(service="checkout"),),
                            ("/shop.Payments/Charge", "/shop.Payments/*"))))
    r = validate(doc(RATE_YAML)).spec
    assert r == s.RateLimitPolicy("catalog", 100.0, 200, False, True, (
        s.RateLimitOverride(10.0, 10, method="/shop.Catalog/Search"),  # burst defaults to rate
        s.RateLimitOverride(500.0, 1000, caller="frontend")))
    m = validate(doc(MESH_YAML)).spec
    assert m == s.MeshConfig("STRICT", "example.org", 12.5)
    empty = validate({"kind": "MeshConfig", "metadata": {"name": "default"}})
    assert empty.spec == s.MeshConfig()


def test_struct_numbers_are_doubles_and_whole_ones_are_integers() -> None:
    """The policy API carries specs as google.protobuf.Struct, where every number is a double."""
    d = doc()
    d["spec"]["retry"]["maxAttempts"] = 3.0
    d["spec"]["routes"][1]["split"] = [{"subset": "v1", "weight": 90.0},
                                       {"subset": "v2", "weight": 10.0}]
    d["metadata"]["resourceVersion"] = 12.0
    r = validate(d)
    assert isinstance(r.spec, s.TrafficPolicy) and r.spec.retry is not None
    assert r.spec.retry.max_attempts == 3 and isinstance(r.spec.retry.max_attempts, int)
    assert r.spec.routes[1].split[0].weight == 90
    assert r.resource_version == "12"


def test_resource_version_string_or_number() -> None:
    d = doc()
    d["metadata"]["resourceVersion"] = "007"
    assert validate(d).resource_version == "7"
    d["metadata"]["resourceVersion"] = ""
    assert validate(d).resource_version == ""


def test_yaml_null_means_absent() -> None:
    r = validate(doc("kind: TrafficPolicy\nmetadata: {name: a}\nspec:\n  service: a\n  timeout:\n"))
    assert isinstance(r.spec, s.TrafficPolicy) and r.spec.timeout is None


def test_header_match_operators_and_subset_selection() -> None:
    d = {"kind": "TrafficPolicy", "metadata": {"name": "t"}, "spec": {
        "service": "a", "subsets": [{"name": "eu", "labels": {"zone": "eu-1", "version": "v2"}}],
        "routes": [{"name": "r", "match": {"headers": [
            {"name": "x-a", "prefix": "ab"}, {"name": "x-b", "suffix": "yz"},
            {"name": "x-c", "regex": "[0-9]+"}, {"name": "x-d", "present": False}]},
            "split": [{"subset": "eu", "weight": 1}]}]}}
    r = validate(d)
    assert isinstance(r.spec, s.TrafficPolicy)
    a, b, c, dd = r.spec.routes[0].match.headers
    assert a.matches("abc") and not a.matches("xabc") and not a.matches(None)
    assert b.matches("xyz") and not b.matches("yzx")
    assert c.matches("123") and not c.matches("12a")
    assert dd.matches(None) and not dd.matches("")

    class Inst:
        def __init__(self, **labels: str) -> None:
            self.labels = labels

        def label(self, key: str) -> str | None:
            return self.labels.get(key)

    subset = r.spec.subset("eu")
    assert subset is not None and subset.labels == (("version", "v2"), ("zone", "eu-1"))
    assert subset.selects(Inst(zone="eu-1", version="v2"))
    assert not subset.selects(Inst(zone="eu-1", version="v1"))
    assert s.method_matches("/shop.Orders/*", "/shop.Orders/Get")
    assert not s.method_matches("/shop.Orders/*", "/shop.OrdersX/Get")
    assert s.method_matches("/shop.Orders/Get", "/shop.Orders/Get")
    assert not s.method_matches("/shop.Orders/Get", "/shop.Orders/GetX")


# ---------------------------------------------------------------------------------------------
# bad documents: every bad field, with its path and why


def test_every_violation_is_reported_at_once() -> None:
    d = doc()
    spec = d["spec"]
    spec["tmeout"] = spec.pop("timeout")
    spec["retry"]["maxAttempts"] = 7
    spec["retry"]["retryOn"] = ["UNAVAILABE", "NOT_FOUND"]
    spec["subsets"][1]["name"] = "v1"
    spec["routes"][1]["split"][0]["subset"] = "v3"
    spec["routes"][1]["split"][1]["weight"] = -1
    spec["routes"][0]["match"]["method"] = "shop.Orders/Get"
    spec["routes"][1]["fault"]["abort"]["percent"] = 101
    got = violations(d)
    assert got == {
        "spec.tmeout": 'unknown field "tmeout" (did you mean "timeout"?)',
        "spec.retry.maxAttempts": "must be between 2 and 5 (gRPC caps attempts at 5, gRFC A6), "
                                  "got 7",
        "spec.retry.retryOn[0]": 'unknown value "UNAVAILABE" (did you mean "UNAVAILABLE"? one of '
                                 "CANCELLED, DEADLINE_EXCEEDED, INTERNAL, RESOURCE_EXHAUSTED, "
                                 "UNAVAILABLE)",
        "spec.retry.retryOn[1]": 'unknown value "NOT_FOUND" (one of CANCELLED, DEADLINE_EXCEEDED,'
                                 " INTERNAL, RESOURCE_EXHAUSTED, UNAVAILABLE)",
        "spec.subsets[1].name": 'duplicate subset name "v1" (also spec.subsets[0])',
        # v2 is no longer defined either: the canary route's reference is reported too
        "spec.routes[0].split[0].subset": 'unknown subset "v2" (defined: v1)',
        "spec.routes[1].split[0].subset": 'unknown subset "v3" (defined: v1)',
        "spec.routes[1].split[1].subset": 'unknown subset "v2" (defined: v1)',
        "spec.routes[1].split[1].weight": "must be between 0 and 1000000, got -1",
        "spec.routes[0].match.method": 'invalid method "shop.Orders/Get": expected '
                                       '"/pkg.Service/Method" or "/pkg.Service/*"',
        "spec.routes[1].fault.abort.percent": "must be at least 0 and at most 100, got 101",
    }


def test_message_of_the_design_example() -> None:
    d = doc()
    d["spec"]["routes"][1]["split"][0]["subset"] = "v3"
    with pytest.raises(ValidationError) as info:
        validate(d)
    assert info.value.violations == [FieldViolation(
        "spec.routes[1].split[0].subset", 'unknown subset "v3" (defined: v1, v2)')]
    assert str(info.value) == ('spec.routes[1].split[0].subset: unknown subset "v3" '
                               "(defined: v1, v2)")


def _set(d: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """Set a dotted path (with [i]) in a copy of d; value _DEL deletes it."""
    d = copy.deepcopy(d)
    parts: list[Any] = []
    for part in path.split("."):
        name, _, rest = part.partition("[")
        parts.append(name)
        for idx in rest.rstrip("]").split("][") if rest else []:
            parts.append(int(idx))
    node: Any = d
    for p in parts[:-1]:
        node = node[p]
    if value is _DEL:
        del node[parts[-1]]
    else:
        node[parts[-1]] = value
    return d


_DEL = object()

BAD_CASES = [
    # (path to change, new value, field reported, part of the reason)
    ("kind", "TraficPolicy", "kind", 'unknown kind "TraficPolicy" (did you mean "TrafficPolicy"?)'),
    ("kind", "Gateway", "kind", "kinds: TrafficPolicy, AuthorizationPolicy, RateLimitPolicy"),
    ("kind", 3, "kind", "expected one of TrafficPolicy"),
    ("kind", _DEL, "kind", "required"),
    ("metadata", _DEL, "metadata", "required"),
    ("spec", _DEL, "spec", "required"),
    ("spec", [], "spec", "expected a mapping, got a list"),
    ("metadata.name", "Orders_1", "metadata.name", 'invalid name "Orders_1": 1-253 lower-case'),
    ("metadata.name", "", "metadata.name", "invalid name"),
    ("metadata.nmae", "x", "metadata.nmae", 'did you mean "name"?'),
    ("metadata.resourceVersion", "v7", "metadata.resourceVersion", "invalid resource version"),
    ("metadata.resourceVersion", True, "metadata.resourceVersion", "got a boolean"),
    ("apiVersion", "v1", "apiVersion", 'unknown field "apiVersion" (known: kind, metadata, spec)'),
    ("spec.service", _DEL, "spec.service", "required"),
    ("spec.service", "orders|v1", "spec.service", "invalid name"),
    ("spec.service", 5, "spec.service", "expected a string, got a number (quote it)"),
    ("spec.timeout", "2", "spec.timeout", 'expected a duration like "500ms"'),
    ("spec.timeout", 2, "spec.timeout", "expected a duration string"),
    ("spec.timeout", "0s", "spec.timeout", "must be at least 1ms"),
    ("spec.timeout", "25h", "spec.timeout", "must be at most 24h"),
    ("spec.timeout", "-1s", "spec.timeout", "expected a duration"),
    ("spec.loadBalancer.algorithm", "RANDOM", "spec.loadBalancer.algorithm", "one of ROUND_ROBIN"),
    ("spec.loadBalancer.algorithm", "round_robin", "spec.loadBalancer.algorithm",
     'did you mean "ROUND_ROBIN"?'),
    ("spec.loadBalancer.hashHeader", _DEL, "spec.loadBalancer.hashHeader",
     "required with algorithm RING_HASH"),
    ("spec.loadBalancer.hashHeader", "X-User", "spec.loadBalancer.hashHeader",
     'header names are lower case (did you mean "x-user"?)'),
    ("spec.loadBalancer.hashHeader", ":authority", "spec.loadBalancer.hashHeader",
     "pseudo-header"),
    ("spec.retry.maxAttempts", 1, "spec.retry.maxAttempts", "between 2 and 5"),
    ("spec.retry.maxAttempts", 2.5, "spec.retry.maxAttempts", "expected a whole number, got 2.5"),
    ("spec.retry.maxAttempts", "3", "spec.retry.maxAttempts", "expected a whole number"),
    ("spec.retry.retryOn", [], "spec.retry.retryOn", "must not be empty"),
    ("spec.retry.retryOn", ["UNAVAILABLE", "UNAVAILABLE"], "spec.retry.retryOn[1]",
     "UNAVAILABLE listed twice"),
    ("spec.retry.backoff.maxInterval", "10ms", "spec.retry.backoff.maxInterval",
     "must be at least baseInterval (25ms), got 10ms"),
    ("spec.retry.budget.retryRatio", 1.5, "spec.retry.budget.retryRatio", "at most 1"),
    ("spec.retry.budget.retryRatio", math.nan, "spec.retry.budget.retryRatio", "finite"),
    ("spec.circuitBreaker.maxRequests", 0, "spec.circuitBreaker.maxRequests",
     "between 1 and 4294967295"),
    ("spec.circuitBreaker.maxPendingRequests", 2**32, "spec.circuitBreaker.maxPendingRequests",
     "between 0 and 4294967295"),
    ("spec.outlierDetection.maxEjectionPercent", 101, "spec.outlierDetection.maxEjectionPercent",
     "between 0 and 100"),
    ("spec.outlierDetection.failurePercentage.threshold", -5,
     "spec.outlierDetection.failurePercentage.threshold", "between 0 and 100"),
    ("spec.outlierDetection.interval", "10", "spec.outlierDetection.interval", "duration"),
    ("spec.subsets", {"v1": {}}, "spec.subsets", "expected a list, got a mapping"),
    ("spec.subsets[0].labels", {}, "spec.subsets[0].labels", "must not be empty"),
    ("spec.subsets[0].labels", _DEL, "spec.subsets[0].labels", "required"),
    ("spec.subsets[0].labels.version", 1, "spec.subsets[0].labels.version", "(quote it)"),
    ("spec.subsets[0].name", "v 1", "spec.subsets[0].name", "invalid name"),
    ("spec.routes[0].name", _DEL, "spec.routes[0].name", "required"),
    ("spec.routes[1].name", "canary", "spec.routes[1].name",
     'duplicate route name "canary" (also spec.routes[0])'),
    ("spec.routes[0].split", [], "spec.routes[0].split", "must not be empty"),
    ("spec.routes[0].split[0].weight", 0, "spec.routes[0].split",
     "weights add up to 0: at least one must be positive"),
    ("spec.routes[0].split[0].weight", _DEL, "spec.routes[0].split[0].weight", "required"),
    ("spec.routes[1].split[1].subset", "v1", "spec.routes[1].split[1].subset",
     'subset "v1" listed twice'),
    ("spec.routes[0].match.headers[0].exact", _DEL, "spec.routes[0].match.headers[0]",
     "needs exactly one of exact, prefix, suffix, regex, present"),
    ("spec.routes[0].match.headers[0].prefix", "t", "spec.routes[0].match.headers[0]",
     "(got exact, prefix)"),
    ("spec.routes[0].match.headers[0].exact", True, "spec.routes[0].match.headers[0].exact",
     "expected a string, got a boolean (quote it)"),
    ("spec.routes[0].match.headers[0].name", "grpc-timeout",
     "spec.routes[0].match.headers[0].name", "reserved by gRPC"),
    ("spec.routes[0].match.headers[0].name", "x-id-bin", "spec.routes[0].match.headers[0].name",
     "binary"),
    ("spec.routes[0].match.method", "/shop.Orders/Get/x", "spec.routes[0].match.method",
     "invalid method"),
    ("spec.routes[1].fault", {}, "spec.routes[1].fault", "needs delay, abort or both"),
    ("spec.routes[1].fault.abort.code", "OK", "spec.routes[1].fault.abort.code",
     'unknown value "OK"'),
    ("spec.routes[1].fault.delay.fixedDelay", _DEL, "spec.routes[1].fault.delay.fixedDelay",
     "required"),
    ("spec.routes[1].fault.delay.percent", -0.1, "spec.routes[1].fault.delay.percent",
     "must be at least 0 and at most 100, got -0.1"),
    ("spec.routes[1].retry", {"maxAttempts": 9}, "spec.routes[1].retry.maxAttempts",
     "between 2 and 5"),
    ("spec.routes[1].tiemout", "1s", "spec.routes[1].tiemout", 'did you mean "timeout"?'),
]


@pytest.mark.parametrize(("path", "value", "field", "reason"), BAD_CASES,
                         ids=[f"{c[0]}={c[1]!r}"[:60] for c in BAD_CASES])
def test_bad_traffic_policy_field(path: str, value: Any, field: str, reason: str) -> None:
    got = violations(_set(doc(), path, value))
    assert field in got, got
    assert reason in got[field]


def test_regex_must_be_re2_compatible_and_valid() -> None:
    base = doc()
    got = violations(_set(base, "spec.routes[0].match.headers[0]",
                          {"name": "x-a", "regex": "(a)\\1"}))
    assert "backreferences" in got["spec.routes[0].match.headers[0].regex"]
    got = violations(_set(base, "spec.routes[0].match.headers[0]", {"name": "x-a", "regex": "(a"}))
    assert "invalid regular expression" in got["spec.routes[0].match.headers[0].regex"]


def test_hash_header_needs_ring_hash() -> None:
    got = violations(_set(doc(), "spec.loadBalancer.algorithm", "ROUND_ROBIN"))
    assert got == {"spec.loadBalancer.hashHeader": "only applies to algorithm RING_HASH"}


def test_no_subsets_defined() -> None:
    got = violations(_set(doc(), "spec.subsets", _DEL))
    assert got["spec.routes[0].split[0].subset"] == 'unknown subset "v2" (defined: none)'


AUTHZ_BAD = [
    ("spec.rules", [], "spec.rules", "needs at least one rule"),
    ("spec.rules[0].action", "REJECT", "spec.rules[0].action", "one of ALLOW, DENY"),
    ("spec.rules[0].from[0]", {"service": "a", "spiffeId": "spiffe://x/y"}, "spec.rules[0].from[0]",
     "exactly one of service, spiffeId"),
    ("spec.rules[0].from[0].spiffeId", "https://x/y", "spec.rules[0].from[0].spiffeId",
     "invalid SPIFFE ID"),
    ("spec.rules[1].methods", [], "spec.rules[1].methods", "leave methods out"),
    ("spec.rules[1].methods[0]", "Charge", "spec.rules[1].methods[0]", "invalid method"),
    ("spec.rules[1].form", [], "spec.rules[1].form", 'did you mean "from"?'),
]
RATE_BAD = [
    ("spec.tokensPerSecond", 0, "spec.tokensPerSecond", "greater than 0"),
    ("spec.tokensPerSecond", _DEL, "spec.tokensPerSecond", "required"),
    ("spec.burst", 0, "spec.burst", "between 1 and"),
    ("spec.perCaller", "yes", "spec.perCaller", "expected true or false"),
    ("spec.overrides[0].method", _DEL, "spec.overrides[0]", "needs method, caller or both"),
    ("spec.overrides[1]", {"method": "/shop.Catalog/Search", "tokensPerSecond": 1},
     "spec.overrides[1]", "duplicate override"),
]
MESH_BAD = [
    ("metadata.name", "mesh", "metadata.name", 'a MeshConfig must be named "default"'),
    ("spec.mtls.mode", "ON", "spec.mtls.mode", "one of STRICT, PERMISSIVE, DISABLE"),
    ("spec.trustDomain", "Example.org", "spec.trustDomain", "invalid trust domain"),
    ("spec.tracing.samplingPercent", 200, "spec.tracing.samplingPercent", "at most 100"),
]


@pytest.mark.parametrize(("text", "path", "value", "field", "reason"),
                         [(AUTHZ_YAML, *c) for c in AUTHZ_BAD] + [(RATE_YAML, *c) for c in RATE_BAD]
                         + [(MESH_YAML, *c) for c in MESH_BAD])
def test_bad_field_of_other_kinds(text: str, path: str, value: Any, field: str,
                                  reason: str) -> None:
    got = violations(_set(doc(text), path, value))
    assert field in got, got
    assert reason in got[field]


def test_not_a_mapping_and_non_string_keys() -> None:
    assert violations([1, 2]) == {"": "expected a mapping, got a list"}
    got = violations({"kind": "MeshConfig", "metadata": {"name": "default"}, "spec": {1: "x"}})
    assert got == {"spec": 'field names must be strings, got a number "1"'}


# ---------------------------------------------------------------------------------------------
# YAML parsing


def test_several_documents_and_empty_ones() -> None:
    text = "---\n" + TRAFFIC_YAML + "---\n# only a comment\n---\n" + AUTHZ_YAML + "...\n"
    docs = parse_documents(text)
    assert [d["kind"] for d in docs] == ["TrafficPolicy", "AuthorizationPolicy"]
    assert parse_documents("") == []
    assert parse_documents(b"kind: MeshConfig\n") == [{"kind": "MeshConfig"}]


def test_json_input() -> None:
    d = doc()
    assert parse_documents(json.dumps(d)) == [d]


def test_malformed_yaml_says_where() -> None:
    with pytest.raises(ValidationError) as info:
        parse_documents("kind: TrafficPolicy\nmetadata:\n  name: a\n spec: [\n")
    (v,) = info.value.violations
    assert v.field == ""
    assert v.description.startswith("malformed YAML: line 4, column 2: ")


def test_yaml_duplicate_keys_and_aliases_are_refused() -> None:
    with pytest.raises(ValidationError) as info:
        parse_documents("kind: A\nmetadata: {name: a}\nkind: B\n")
    assert "line 3, column 1: found duplicate key 'kind'" in str(info.value)
    with pytest.raises(ValidationError) as info:
        parse_documents("a: &x [1]\nb: *x\n")
    assert "aliases" in str(info.value)


def test_documents_that_are_not_mappings() -> None:
    with pytest.raises(ValidationError) as info:
        parse_documents("kind: MeshConfig\n---\n- a\n---\njust text\n")
    assert [v.field for v in info.value.violations] == ["documents[1]", "documents[2]"]


@pytest.mark.parametrize("text", [
    "a: !!int x", "a: !!float x", "a: !!timestamp 2001-02-30T99:99:99", "a: 0x" + "f" * 5000,
    "a: !!python/name:os.system", "? [a]\n: b", "a: !!binary ???\n", "a: !!set {1, 2}",
    "a: [" * 5000, "{" * 200000])
def test_hostile_yaml_scalars_and_tags(text: str) -> None:
    try:
        docs = parse_documents(text)
    except ValidationError as e:
        assert e.violations[0].description.startswith("malformed YAML")
        return
    for d in docs:  # what parses (bytes, sets) is then rejected field by field
        with pytest.raises(ValidationError):
            validate(d)


def test_date_like_values_stay_strings() -> None:
    assert parse_documents("a: 2001-13-45\nb: 2024-01-01\n") == [
        {"a": "2001-13-45", "b": "2024-01-01"}]


def test_non_utf8_and_unsafe_tags() -> None:
    with pytest.raises(ValidationError, match="not UTF-8"):
        parse_documents(b"kind: \xff\n")
    with pytest.raises(ValidationError, match="malformed YAML"):
        parse_documents("!!python/object:os.system {}\n")


# ---------------------------------------------------------------------------------------------
# rules across resources


def _tp(name: str, service: str, version: str = "") -> s.Resource:
    return s.Resource("TrafficPolicy", name, s.TrafficPolicy(service), version)


def test_validate_documents_prefixes_paths_and_checks_the_set() -> None:
    bad = doc()
    bad["spec"]["timeout"] = "soon"
    with pytest.raises(ValidationError) as info:
        validate_documents([doc(AUTHZ_YAML), bad])
    assert [v.field for v in info.value.violations] == ["documents[1].spec.timeout"]
    with pytest.raises(ValidationError) as info:
        validate_documents([doc(), doc(AUTHZ_YAML), doc()])
    assert info.value.violations == [FieldViolation(
        "documents[2].metadata.name",
        'duplicate TrafficPolicy "orders" in one apply (also documents[0])')]
    assert [r.kind for r in validate_documents([doc(), doc(AUTHZ_YAML)])] == [
        "TrafficPolicy", "AuthorizationPolicy"]


def test_one_traffic_policy_per_service() -> None:
    with pytest.raises(ValidationError) as info:
        validate_set([_tp("a", "orders"), _tp("b", "orders")])
    assert info.value.violations == [FieldViolation(
        "documents[1].spec.service", 'service "orders" has two TrafficPolicys in this apply '
        "(also documents[0]); one TrafficPolicy per service")]
    with pytest.raises(ValidationError) as info:
        validate_set([_tp("b", "orders")], existing=[_tp("a", "orders", "3")])
    assert info.value.violations[0].description.startswith(
        'service "orders" already has TrafficPolicy "a"')
    # replacing the stored one under its own name, or moving it to another service, is fine
    validate_set([_tp("a", "orders")], existing=[_tp("a", "orders", "3")])
    validate_set([_tp("a", "cart"), _tp("b", "orders")], existing=[_tp("a", "orders", "3")])
    # different kinds for one service do not clash
    validate_set([_tp("a", "orders"), s.Resource("RateLimitPolicy", "a",
                                                 s.RateLimitPolicy("orders", 1.0, 1))])


def test_policy_set_lookups() -> None:
    rs = validate_documents([doc(t) for t in EXAMPLES])
    ps = s.PolicySet(tuple(rs), revision=4)
    assert [r.kind for r in ps.resources] == ["AuthorizationPolicy", "MeshConfig",
                                              "RateLimitPolicy", "TrafficPolicy"]
    assert ps.traffic_policy_for("orders") is rs[0].spec
    assert ps.traffic_policy_for("payments") is None
    assert ps.authorization_for("payments") is rs[1].spec
    assert ps.rate_limit_for("catalog") is rs[2].spec
    assert ps.mesh_config() == s.MeshConfig("STRICT", "example.org", 12.5)
    assert s.PolicySet().mesh_config() == s.MeshConfig()
    assert ps.get("TrafficPolicy", "orders") is rs[0]
    assert ps.traffic_policies() == {"orders": rs[0].spec}
    assert ps == s.PolicySet(tuple(reversed(rs)), revision=4)


# ---------------------------------------------------------------------------------------------
# durations and the canonical document


@pytest.mark.parametrize(("text", "seconds", "canonical"), [
    ("500ms", 0.5, "500ms"), ("1.5ms", 0.0015, "1.5ms"), ("2s", 2.0, "2s"), ("90s", 90.0, "90s"),
    ("1.5m", 90.0, "90s"), ("120s", 120.0, "2m"), ("1h", 3600.0, "1h"), ("0.1s", 0.1, "100ms"),
    ("1ms", 0.001, "1ms"), ("24h", 86400.0, "24h"), ("0.25h", 900.0, "15m"),
])
def test_durations(text: str, seconds: float, canonical: str) -> None:
    assert parse_duration(text) == seconds
    assert format_duration(seconds) == canonical
    assert parse_duration(canonical) == seconds


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.decimals(min_value="0.001", max_value="86400", places=3, allow_nan=False))
def test_duration_round_trip(value: Any) -> None:
    seconds = parse_duration(f"{value}s")
    assert parse_duration(format_duration(seconds)) == seconds


@pytest.mark.parametrize("text", EXAMPLES)
def test_canonical_document_round_trips(text: str) -> None:
    r = validate(doc(text))
    canonical = to_document(r)
    assert validate(canonical) == r
    assert validate(json.loads(json.dumps(canonical))) == r
    assert to_document(validate(canonical)) == canonical


def test_every_example_in_the_policy_reference_validates() -> None:
    """docs/policy.md promises that its YAML blocks can be pasted as they are."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "policy.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 8
    kinds = set()
    for block in blocks:
        for r in validate_documents(parse_documents(block)):
            kinds.add(r.kind)
            assert validate(to_document(r)) == r
    assert kinds == set(s.KINDS)


# ---------------------------------------------------------------------------------------------
# fuzzing: only ValidationError ever escapes, and whatever validates also round-trips

json_leaves = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
               | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20))
json_trees = st.recursive(
    json_leaves,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=30)

# values that are nearly right: the kind of thing a user types
plausible: st.SearchStrategy[Any] = st.sampled_from([
    "", "v1", "v2", "v3", "orders", "2s", "0ms", "500ms", "1h", "25h", "-1s", "/shop.Orders/*",
    "/shop.Orders/Get", "UNAVAILABLE", "RING_HASH", "ALLOW", "STRICT", "x-user", "X-User", ":path",
    "grpc-x", "spiffe://a/b", 0, 1, 2, 5, 6, 100, 101, -1, 0.5, 2.0, 1e20, True, False, None, [],
    {}, [{}], {"name": "v1"}, {"subset": "v1", "weight": 1}, {"exact": "1"},
])
known_keys = st.sampled_from([
    "kind", "metadata", "spec", "name", "service", "timeout", "retry", "maxAttempts", "retryOn",
    "routes", "split", "subset", "weight", "subsets", "labels", "match", "method", "headers",
    "fault", "delay", "abort", "percent", "code", "rules", "action", "from", "methods",
    "tokensPerSecond", "burst", "overrides", "mtls", "mode", "tracing", "loadBalancer",
    "hashHeader", "backoff", "budget", "exact", "present", "regex", "resourceVersion"])


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


def _mutate(d: Any, data: st.DataObject) -> Any:
    d = copy.deepcopy(d)
    for _ in range(data.draw(st.integers(1, 4))):
        paths = _paths(d)
        path = data.draw(st.sampled_from(paths))
        op = data.draw(st.sampled_from(["replace", "plausible", "delete", "add", "dup"]))
        if not path:
            if op in ("replace", "plausible"):
                d = copy.deepcopy(data.draw(json_trees if op == "replace" else plausible))
            continue
        parent = d
        for p in path[:-1]:
            parent = parent[p]
        last = path[-1]
        target = parent[last]
        if op == "replace":
            parent[last] = data.draw(json_trees)
        elif op == "plausible":
            parent[last] = copy.deepcopy(data.draw(plausible))
        elif op == "delete":
            del parent[last]
        elif op == "add" and isinstance(target, dict):
            key = data.draw(known_keys | st.text(max_size=8))
            target[key] = copy.deepcopy(data.draw(plausible | json_trees))
        elif op == "dup" and isinstance(target, list) and target:
            target.append(copy.deepcopy(target[data.draw(st.integers(0, len(target) - 1))]))
    return d


def _check_only_validation_errors(d: Any) -> None:
    try:
        r = validate(d)
    except ValidationError as e:
        assert e.violations, "a ValidationError always names at least one problem"
        for v in e.violations:
            assert isinstance(v.field, str) and isinstance(v.description, str) and v.description
        return
    # whatever validates is well-formed and survives the canonical round trip
    assert r.kind in s.KINDS
    assert validate(to_document(r)) == r


@settings(max_examples=400, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(json_trees)
def test_fuzz_arbitrary_trees(tree: Any) -> None:
    _check_only_validation_errors(tree)


@settings(max_examples=400, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(json_trees, st.sampled_from(["TrafficPolicy", "AuthorizationPolicy", "RateLimitPolicy",
                                    "MeshConfig"]))
def test_fuzz_arbitrary_specs(tree: Any, kind: str) -> None:
    _check_only_validation_errors({"kind": kind, "metadata": {"name": "default"}, "spec": tree})


@settings(max_examples=1500, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(EXAMPLES), st.data())
def test_fuzz_mutations_of_valid_documents(text: str, data: st.DataObject) -> None:
    _check_only_validation_errors(_mutate(doc(text), data))


YAML_TOKENS = [
    ":", ": ", " ", "  ", "\n", "- ", "? ", "[", "]", "{", "}", ",", "'", '"', "#", "|", ">",
    "\t", "---\n", "...\n", "&a ", "*a", "<<: ", "%YAML 1.1\n", "!!int ", "!!float ",
    "!!timestamp ", "!!binary ", "!!set ", "!!omap ", "!!pairs ", "!!str ", "!!null ",
    "!<tag:yaml.org,2002:int> ", "!local ", "2001-13-45", "12:30:00", "0x1f", "0o17", "1e400",
    ".nan", ".inf", "~", "yes", "on", "kind", "TrafficPolicy", "metadata", "name", "spec",
    "service", "routes", "split", "weight", "\u00e9", "\ufeff", "\x00", "\x85",
]
yaml_like = st.lists(st.sampled_from(YAML_TOKENS) | st.text(max_size=4), max_size=40).map("".join)


@settings(max_examples=600, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=200) | yaml_like | st.sampled_from(EXAMPLES).flatmap(
    lambda t: st.integers(0, len(t)).map(lambda n: t[:n])))
def test_fuzz_yaml_text(text: str) -> None:
    try:
        docs = parse_documents(text)
    except ValidationError:
        return
    for d in docs:
        _check_only_validation_errors(d)
    try:
        validate_documents(docs)
    except ValidationError:
        pass
