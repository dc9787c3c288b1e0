"""The sidecar's compiled configuration: immutable values built once per snapshot.

xDS resources (from a static file today, from ADS later) and command-line flags are both
compiled into these frozen dataclasses. The per-call path only reads them, so a new snapshot
is swapped in by replacing one reference, and calls in flight keep the values they started with.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum

from sidecar.authz import ALLOW_ALL, Authorizer
from sidecar.stages.fault import FaultPolicy
from sidecar.stages.outlier import OutlierConfig
from sidecar.stages.rate_limit import RateLimitConfig
from sidecar.stages.retry import RetryPolicy

# Envoy's defaults for a cluster's circuit breaker (documented in docs/policy.md, shown in
# /config_dump): high enough not to bite a normal service, low enough to stop a pile-up.
DEFAULT_MAX_REQUESTS = 1024
DEFAULT_MAX_PENDING = 1024


class Direction(Enum):
    OUTBOUND = "outbound"
    INBOUND = "inbound"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One instance of a cluster: the address a channel dials."""

    address: str  # "host:port"
    weight: int = 1
    zone: str = ""
    mtls: bool = False  # the instance takes mTLS at `address` (EDS tlsMode: mtls)
    plaintext_address: str = ""  # where it takes plaintext too (PERMISSIVE), "" if nowhere


class LbPolicy(Enum):
    ROUND_ROBIN = "round_robin"
    LEAST_REQUEST = "least_request"
    RING_HASH = "ring_hash"


@dataclass(frozen=True, slots=True)
class RetryBudgetConfig:
    """Retries allowed: ratio x requests over a window, plus a floor per second."""

    retry_ratio: float = 0.2
    min_retries_per_second: float = 10.0


@dataclass(frozen=True, slots=True)
class UpstreamTlsSpec:
    """How to dial the cluster's mTLS endpoints: the name the server's certificate must carry
    (checked in the handshake as the DNS SAN) and its SPIFFE ID, from the CDS
    transport_socket_matches entry `mtls` (docs/identity.md)."""

    server_name: str  # "<service>.svc.<trust domain>"
    spiffe_id: str
    trust_bundle: tuple[bytes, ...] = ()


class MtlsMode(Enum):
    STRICT = "STRICT"  # mTLS only
    PERMISSIVE = "PERMISSIVE"  # mTLS and plaintext
    DISABLE = "DISABLE"  # plaintext only


@dataclass(frozen=True, slots=True)
class InboundTls:
    """What the inbound listener takes, from its filter chains (tls / raw_buffer), and the
    roots its DownstreamTlsContext trusts."""

    mode: MtlsMode = MtlsMode.DISABLE
    trust_bundle: tuple[bytes, ...] = ()
    # The chains name their transport protocol (what the control plane sends). A listener that
    # does not (flags, a static file, a snapshot saved before mTLS) says nothing about mTLS: a
    # sidecar with an identity then assumes STRICT (fails closed).
    explicit: bool = False
    assumed: bool = False  # STRICT assumed for that reason (the refusal says so)

    @property
    def plaintext_allowed(self) -> bool:
        return self.mode is not MtlsMode.STRICT


@dataclass(frozen=True, slots=True)
class Cluster:
    name: str
    endpoints: tuple[Endpoint, ...]
    lb_policy: LbPolicy = LbPolicy.ROUND_ROBIN
    max_requests: int = DEFAULT_MAX_REQUESTS
    max_pending: int = DEFAULT_MAX_PENDING
    outlier: OutlierConfig | None = None
    retry_budget: RetryBudgetConfig | None = None
    tls: UpstreamTlsSpec | None = None  # None: every endpoint is dialled in plaintext


class HeaderMatchKind(Enum):
    EXACT = "exact"
    PREFIX = "prefix"
    SUFFIX = "suffix"
    CONTAINS = "contains"
    REGEX = "regex"
    PRESENT = "present"


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    """A condition on one request header (gRPC metadata key), as Envoy's HeaderMatcher."""

    name: str
    kind: HeaderMatchKind
    value: str = ""
    invert: bool = False
    regex: re.Pattern[str] | None = field(default=None, compare=False)

    def matches(self, values: list[str] | None) -> bool:
        if values is None:
            result = False
        else:
            joined = ",".join(values)  # Envoy matches multiple values as one joined string
            kind = self.kind
            if kind is HeaderMatchKind.EXACT:
                result = joined == self.value
            elif kind is HeaderMatchKind.PREFIX:
                result = joined.startswith(self.value)
            elif kind is HeaderMatchKind.SUFFIX:
                result = joined.endswith(self.value)
            elif kind is HeaderMatchKind.CONTAINS:
                result = self.value in joined
            elif kind is HeaderMatchKind.REGEX:
                assert self.regex is not None
                result = self.regex.fullmatch(joined) is not None
            else:
                result = True
        return result != self.invert


@dataclass(frozen=True, slots=True)
class PathMatch:
    """Which :path values a route covers: exact path, prefix, or a full regex."""

    exact: str | None = None
    prefix: str | None = None
    regex: re.Pattern[str] | None = None

    def matches(self, path: str) -> bool:
        if self.exact is not None:
            return path == self.exact
        if self.prefix is not None:
            return path.startswith(self.prefix)
        if self.regex is not None:
            return self.regex.fullmatch(path) is not None
        return True


@dataclass(frozen=True, slots=True)
class WeightedCluster:
    name: str
    weight: int


@dataclass(frozen=True, slots=True)
class Route:
    """One route: which calls it takes and where they go."""

    name: str
    path: PathMatch
    headers: tuple[HeaderMatch, ...]
    clusters: tuple[WeightedCluster, ...]
    timeout: float | None = None  # seconds; None = only the caller's deadline
    retry: RetryPolicy | None = None
    fault: FaultPolicy | None = None
    hash_header: str | None = None  # ring hash key: this request header's value

    @property
    def total_weight(self) -> int:
        return sum(c.weight for c in self.clusters)


@dataclass(frozen=True, slots=True)
class RouteTable:
    """Routes in order: the first whose path and headers match takes the call."""

    name: str
    routes: tuple[Route, ...]


@dataclass(frozen=True, slots=True)
class Limits:
    """Transport limits applied to both listeners and every upstream channel."""

    max_message_bytes: int = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything the data path needs, at one version."""

    version: str
    outbound: RouteTable
    inbound: RouteTable
    clusters: dict[str, Cluster]
    inbound_rate_limit: RateLimitConfig | None = None
    trace_sampling_percent: float | None = None  # from the outbound HCM's tracing
    inbound_tls: InboundTls = InboundTls()
    authorizer: Authorizer = ALLOW_ALL  # inbound RBAC

    def __hash__(self) -> int:  # dict field: identity is the snapshot's version
        return hash(self.version)


EMPTY_SNAPSHOT = Snapshot(version="", outbound=RouteTable("outbound", ()),
                          inbound=RouteTable("inbound", ()), clusters={})
