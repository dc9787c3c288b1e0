"""The four policy kinds as frozen values, compiled once by validate.py.

Everything downstream (translation, the API, the stores) reads these instead of raw YAML so a
field is interpreted in exactly one place: durations are float seconds, enums are upper-case
strings, maps are sorted tuples of pairs (hashable, deterministic), and every default is filled
in. The user-facing reference of each field is docs/policy.md.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Protocol

TRAFFIC_POLICY = "TrafficPolicy"
AUTHORIZATION_POLICY = "AuthorizationPolicy"
RATE_LIMIT_POLICY = "RateLimitPolicy"
MESH_CONFIG = "MeshConfig"
KINDS: tuple[str, ...] = (TRAFFIC_POLICY, AUTHORIZATION_POLICY, RATE_LIMIT_POLICY, MESH_CONFIG)

MESH_CONFIG_NAME = "default"  # the only name a MeshConfig may have

LB_ALGORITHMS = ("ROUND_ROBIN", "LEAST_REQUEST", "RING_HASH")
# The codes gRPC's xDS retry support (gRFC A44) understands in retry_on; anything else would be
# NACKed by proxyless clients, so we accept only these.
RETRYABLE_CODES = ("CANCELLED", "DEADLINE_EXCEEDED", "INTERNAL", "RESOURCE_EXHAUSTED",
                   "UNAVAILABLE")
# gRPC status codes by name (an abort fault may use any but OK).
STATUS_CODES: dict[str, int] = {
    "OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5, "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9, "ABORTED": 10, "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12,
    "INTERNAL": 13, "UNAVAILABLE": 14, "DATA_LOSS": 15, "UNAUTHENTICATED": 16,
}
AUTHZ_ACTIONS = ("ALLOW", "DENY")
MTLS_MODES = ("STRICT", "PERMISSIVE", "DISABLE")


class Labelled(Protocol):
    """What subset selection needs of an instance (registry.model.Instance fits)."""

    def label(self, key: str) -> str | None: ...


def method_prefix(pattern: str) -> tuple[str, bool]:
    """'/pkg.Svc/*' -> ('/pkg.Svc/', True) (a prefix); '/pkg.Svc/M' -> ('/pkg.Svc/M', False)."""
    if pattern.endswith("/*"):
        return pattern[:-1], True
    return pattern, False


def method_matches(pattern: str, path: str) -> bool:
    """Whether a gRPC :path ('/pkg.Svc/Method') matches a validated method pattern."""
    target, is_prefix = method_prefix(pattern)
    return path.startswith(target) if is_prefix else path == target


# ---------------------------------------------------------------------------------------------
# TrafficPolicy


@dataclass(frozen=True, slots=True)
class LoadBalancer:
    algorithm: str = "ROUND_ROBIN"  # one of LB_ALGORITHMS
    hash_header: str = ""  # RING_HASH only (required there): request header hashed


@dataclass(frozen=True, slots=True)
class RetryBackoff:
    base_interval: float = 0.025
    max_interval: float = 0.25  # defaults to 10 x base_interval


@dataclass(frozen=True, slots=True)
class RetryBudget:
    """Retries allowed on top of requests: ratio of recent requests plus a floor per second."""

    retry_ratio: float = 0.2
    min_retries_per_second: float = 10.0


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 2  # total attempts including the first (2..5, gRFC A6)
    retry_on: tuple[str, ...] = ("UNAVAILABLE",)  # subset of RETRYABLE_CODES
    per_try_timeout: float | None = None
    backoff: RetryBackoff = field(default_factory=RetryBackoff)
    budget: RetryBudget = field(default_factory=RetryBudget)


@dataclass(frozen=True, slots=True)
class CircuitBreaker:
    max_requests: int = 1024  # concurrent requests to the destination cluster
    max_pending_requests: int = 1024  # requests waiting for a connection/stream


@dataclass(frozen=True, slots=True)
class FailurePercentage:
    threshold: int = 85  # percent of failed requests that ejects a host
    minimum_hosts: int = 5
    request_volume: int = 50


@dataclass(frozen=True, slots=True)
class OutlierDetection:
    consecutive_errors: int = 5
    interval: float = 10.0
    base_ejection_time: float = 30.0
    max_ejection_percent: int = 10
    failure_percentage: FailurePercentage | None = None


@dataclass(frozen=True, slots=True)
class Subset:
    name: str
    labels: tuple[tuple[str, str], ...]  # sorted by key; an instance needs all of them

    def selects(self, instance: Labelled) -> bool:
        return all(instance.label(k) == v for k, v in self.labels)


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    """Exactly one of exact/prefix/suffix/regex/present is set (validated)."""

    name: str  # lower-case header name
    exact: str | None = None
    prefix: str | None = None
    suffix: str | None = None
    regex: str | None = None  # RE2 syntax (no backreferences or lookaround)
    present: bool | None = None

    def matches(self, value: str | None) -> bool:
        if self.present is not None:
            return (value is not None) == self.present
        if value is None:
            return False
        if self.exact is not None:
            return value == self.exact
        if self.prefix is not None:
            return value.startswith(self.prefix)
        if self.suffix is not None:
            return value.endswith(self.suffix)
        if self.regex is not None:
            return re.fullmatch(self.regex, value) is not None
        return False


@dataclass(frozen=True, slots=True)
class RouteMatch:
    method: str = ""  # "" = any; "/pkg.Svc/Method" or "/pkg.Svc/*"
    headers: tuple[HeaderMatch, ...] = ()  # all must match


@dataclass(frozen=True, slots=True)
class WeightedSubset:
    subset: str
    weight: int


@dataclass(frozen=True, slots=True)
class FaultDelay:
    fixed_delay: float
    percent: float = 100.0


@dataclass(frozen=True, slots=True)
class FaultAbort:
    code: str  # gRPC status name, not OK
    percent: float = 100.0

    @property
    def code_number(self) -> int:
        return STATUS_CODES[self.code]


@dataclass(frozen=True, slots=True)
class Fault:
    delay: FaultDelay | None = None
    abort: FaultAbort | None = None


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    match: RouteMatch = field(default_factory=RouteMatch)
    split: tuple[WeightedSubset, ...] = ()  # () = the whole service, no subset
    timeout: float | None = None  # None = the policy's
    retry: RetryPolicy | None = None  # None = the policy's
    fault: Fault | None = None


@dataclass(frozen=True, slots=True)
class TrafficPolicy:
    service: str
    load_balancer: LoadBalancer = field(default_factory=LoadBalancer)
    timeout: float | None = None
    retry: RetryPolicy | None = None
    circuit_breaker: CircuitBreaker | None = None
    outlier_detection: OutlierDetection | None = None
    subsets: tuple[Subset, ...] = ()
    routes: tuple[Route, ...] = ()

    def subset(self, name: str) -> Subset | None:
        for s in self.subsets:
            if s.name == name:
                return s
        return None


# ---------------------------------------------------------------------------------------------
# AuthorizationPolicy


@dataclass(frozen=True, slots=True)
class Source:
    """A caller: exactly one of service (its mesh identity) or spiffe_id is set."""

    service: str = ""
    spiffe_id: str = ""


@dataclass(frozen=True, slots=True)
class AuthorizationRule:
    action: str  # ALLOW | DENY
    sources: tuple[Source, ...] = ()  # "from:"; () = any caller
    methods: tuple[str, ...] = ()  # () = any method


@dataclass(frozen=True, slots=True)
class AuthorizationPolicy:
    service: str
    rules: tuple[AuthorizationRule, ...] = ()


# ---------------------------------------------------------------------------------------------
# RateLimitPolicy


@dataclass(frozen=True, slots=True)
class RateLimitOverride:
    tokens_per_second: float
    burst: int
    method: str = ""  # "" = any
    caller: str = ""  # "" = any (a mesh service name)


@dataclass(frozen=True, slots=True)
class RateLimitPolicy:
    service: str
    tokens_per_second: float
    burst: int
    per_method: bool = False  # one bucket per method instead of one for the service
    per_caller: bool = False  # one bucket per calling service
    overrides: tuple[RateLimitOverride, ...] = ()


# ---------------------------------------------------------------------------------------------
# MeshConfig


@dataclass(frozen=True, slots=True)
class MeshConfig:
    mtls_mode: str = "PERMISSIVE"  # STRICT | PERMISSIVE | DISABLE
    trust_domain: str = "pymesh.local"
    sampling_percent: float = 1.0


Spec = TrafficPolicy | AuthorizationPolicy | RateLimitPolicy | MeshConfig


# ---------------------------------------------------------------------------------------------
# Envelope and the whole stored set


@dataclass(frozen=True, slots=True)
class Resource:
    kind: str
    name: str
    spec: Spec
    resource_version: str = ""  # "" = not stored yet / no concurrency check on apply
    create_time: float | None = None  # unix seconds, set by the store
    update_time: float | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.kind, self.name)

    @property
    def service(self) -> str:
        """The destination service a per-service policy is about ("" for MeshConfig)."""
        return getattr(self.spec, "service", "")

    def with_version(self, version: str, *, create_time: float | None = None,
                     update_time: float | None = None) -> Resource:
        return replace(self, resource_version=version,
                       create_time=self.create_time if create_time is None else create_time,
                       update_time=self.update_time if update_time is None else update_time)


@dataclass(frozen=True, slots=True)
class PolicySet:
    """Every stored resource, with the lookups translation needs.

    validate_set guarantees at most one policy of each per-service kind per service and only
    one MeshConfig, so the lookups return a single value.
    """

    resources: tuple[Resource, ...] = ()
    revision: int = 0  # the store's revision this set was read at (0 = unknown)
    _index: dict[tuple[str, str], Resource] = field(default_factory=dict, compare=False,
                                                    repr=False)

    def __post_init__(self) -> None:
        ordered = tuple(sorted(self.resources, key=lambda r: (r.kind, r.name)))
        object.__setattr__(self, "resources", ordered)
        index: dict[tuple[str, str], Resource] = {}
        for r in ordered:
            index[(r.kind, r.name)] = r
            if r.kind != MESH_CONFIG:
                index.setdefault((r.kind + "@service", r.service), r)
        object.__setattr__(self, "_index", index)

    def get(self, kind: str, name: str) -> Resource | None:
        return self._index.get((kind, name))

    def of_kind(self, kind: str) -> tuple[Resource, ...]:
        return tuple(r for r in self.resources if r.kind == kind)

    def _for(self, kind: str, service: str) -> Spec | None:
        r = self._index.get((kind + "@service", service))
        return r.spec if r is not None else None

    def resource_for(self, kind: str, service: str) -> Resource | None:
        """The stored resource of `kind` for `service` (its name, for messages that name it)."""
        return self._index.get((kind + "@service", service))

    def traffic_policy_for(self, service: str) -> TrafficPolicy | None:
        spec = self._for(TRAFFIC_POLICY, service)
        return spec if isinstance(spec, TrafficPolicy) else None

    def authorization_for(self, service: str) -> AuthorizationPolicy | None:
        spec = self._for(AUTHORIZATION_POLICY, service)
        return spec if isinstance(spec, AuthorizationPolicy) else None

    def rate_limit_for(self, service: str) -> RateLimitPolicy | None:
        spec = self._for(RATE_LIMIT_POLICY, service)
        return spec if isinstance(spec, RateLimitPolicy) else None

    def mesh_config(self) -> MeshConfig:
        r = self._index.get((MESH_CONFIG, MESH_CONFIG_NAME))
        return r.spec if r is not None and isinstance(r.spec, MeshConfig) else MeshConfig()

    def traffic_policies(self) -> dict[str, TrafficPolicy]:
        """Destination service -> its TrafficPolicy."""
        return {r.service: r.spec for r in self.resources
                if r.kind == TRAFFIC_POLICY and isinstance(r.spec, TrafficPolicy)}
