"""Resource -> the document a user writes (camelCase, duration strings), and back.

The stores persist this form and the API returns it, so what `meshctl get -o yaml` prints can
be edited and applied again. It is canonical: every default is spelled out and optional blocks
that are not set are left out, and validate(to_document(r)) gives back r (property-tested).
"""

from __future__ import annotations

from typing import Any

from control_plane.policy import schema as s
from control_plane.policy.validate import format_duration, validate


def _num(value: float) -> int | float:
    """Whole floats as ints, so YAML/JSON show 10 rather than 10.0."""
    return int(value) if float(value).is_integer() and abs(value) < 2**53 else value


def _retry(r: s.RetryPolicy) -> dict[str, Any]:
    out: dict[str, Any] = {"maxAttempts": r.max_attempts, "retryOn": list(r.retry_on)}
    if r.per_try_timeout is not None:
        out["perTryTimeout"] = format_duration(r.per_try_timeout)
    out["backoff"] = {"baseInterval": format_duration(r.backoff.base_interval),
                      "maxInterval": format_duration(r.backoff.max_interval)}
    out["budget"] = {"retryRatio": _num(r.budget.retry_ratio),
                     "minRetriesPerSecond": _num(r.budget.min_retries_per_second)}
    return out


def _header(h: s.HeaderMatch) -> dict[str, Any]:
    out: dict[str, Any] = {"name": h.name}
    for op in ("exact", "prefix", "suffix", "regex", "present"):
        value = getattr(h, op)
        if value is not None:
            out[op] = value
    return out


def _route(r: s.Route) -> dict[str, Any]:
    out: dict[str, Any] = {"name": r.name}
    match: dict[str, Any] = {}
    if r.match.method:
        match["method"] = r.match.method
    if r.match.headers:
        match["headers"] = [_header(h) for h in r.match.headers]
    if match:
        out["match"] = match
    if r.split:
        out["split"] = [{"subset": w.subset, "weight": w.weight} for w in r.split]
    if r.timeout is not None:
        out["timeout"] = format_duration(r.timeout)
    if r.retry is not None:
        out["retry"] = _retry(r.retry)
    if r.fault is not None:
        fault: dict[str, Any] = {}
        if r.fault.delay is not None:
            fault["delay"] = {"percent": _num(r.fault.delay.percent),
                              "fixedDelay": format_duration(r.fault.delay.fixed_delay)}
        if r.fault.abort is not None:
            fault["abort"] = {"percent": _num(r.fault.abort.percent), "code": r.fault.abort.code}
        out["fault"] = fault
    return out


def _traffic(p: s.TrafficPolicy) -> dict[str, Any]:
    lb: dict[str, Any] = {"algorithm": p.load_balancer.algorithm}
    if p.load_balancer.hash_header:
        lb["hashHeader"] = p.load_balancer.hash_header
    out: dict[str, Any] = {"service": p.service, "loadBalancer": lb}
    if p.timeout is not None:
        out["timeout"] = format_duration(p.timeout)
    if p.retry is not None:
        out["retry"] = _retry(p.retry)
    if p.circuit_breaker is not None:
        out["circuitBreaker"] = {"maxRequests": p.circuit_breaker.max_requests,
                                 "maxPendingRequests": p.circuit_breaker.max_pending_requests}
    if p.outlier_detection is not None:
        o = p.outlier_detection
        od: dict[str, Any] = {"consecutiveErrors": o.consecutive_errors,
                              "interval": format_duration(o.interval),
                              "baseEjectionTime": format_duration(o.base_ejection_time),
                              "maxEjectionPercent": o.max_ejection_percent}
        if o.failure_percentage is not None:
            f = o.failure_percentage
            od["failurePercentage"] = {"threshold": f.threshold, "minimumHosts": f.minimum_hosts,
                                       "requestVolume": f.request_volume}
        out["outlierDetection"] = od
    if p.subsets:
        out["subsets"] = [{"name": x.name, "labels": dict(x.labels)} for x in p.subsets]
    if p.routes:
        out["routes"] = [_route(r) for r in p.routes]
    return out


def _authz(p: s.AuthorizationPolicy) -> dict[str, Any]:
    rules = []
    for r in p.rules:
        rule: dict[str, Any] = {"action": r.action}
        if r.sources:
            rule["from"] = [{"service": x.service} if x.service else {"spiffeId": x.spiffe_id}
                            for x in r.sources]
        if r.methods:
            rule["methods"] = list(r.methods)
        rules.append(rule)
    return {"service": p.service, "rules": rules}


def _rate_limit(p: s.RateLimitPolicy) -> dict[str, Any]:
    out: dict[str, Any] = {"service": p.service, "tokensPerSecond": _num(p.tokens_per_second),
                           "burst": p.burst, "perMethod": p.per_method,
                           "perCaller": p.per_caller}
    if p.overrides:
        overrides = []
        for o in p.overrides:
            item: dict[str, Any] = {}
            if o.method:
                item["method"] = o.method
            if o.caller:
                item["caller"] = o.caller
            item["tokensPerSecond"] = _num(o.tokens_per_second)
            item["burst"] = o.burst
            overrides.append(item)
        out["overrides"] = overrides
    return out


def _mesh(p: s.MeshConfig) -> dict[str, Any]:
    return {"mtls": {"mode": p.mtls_mode}, "trustDomain": p.trust_domain,
            "tracing": {"samplingPercent": _num(p.sampling_percent)}}


def spec_to_dict(spec: s.Spec) -> dict[str, Any]:
    if isinstance(spec, s.TrafficPolicy):
        return _traffic(spec)
    if isinstance(spec, s.AuthorizationPolicy):
        return _authz(spec)
    if isinstance(spec, s.RateLimitPolicy):
        return _rate_limit(spec)
    return _mesh(spec)


def to_document(resource: s.Resource) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": resource.name}
    if resource.resource_version:
        metadata["resourceVersion"] = resource.resource_version
    return {"kind": resource.kind, "metadata": metadata, "spec": spec_to_dict(resource.spec)}


def from_document(doc: Any) -> s.Resource:
    """The inverse of to_document (a validating parse; raises ValidationError)."""
    return validate(doc)
