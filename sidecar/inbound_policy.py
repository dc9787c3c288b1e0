"""Inbound policy carried on the inbound listener's HttpConnectionManager: local rate limiting
(envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit, as the control plane's
translate_listeners emits it) compiled into the sidecar's RateLimitConfig.

Descriptor entries the control plane uses: `method` (a method or `/pkg.Svc/*` pattern) and
`source_cluster` (the caller's mesh service); an entry with an empty value means "one bucket per
distinct value" (per method / per caller).
"""

from __future__ import annotations

from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.type.v3 import token_bucket_pb2

from sidecar.stages.rate_limit import BucketSpec, RateLimitConfig, RateLimitOverride

RATE_LIMIT_FILTER = "envoy.filters.http.local_ratelimit"
METHOD_KEY = "method"
CALLER_KEY = "source_cluster"


class InboundPolicyError(ValueError):
    pass


def rate_limit_of(hcm: hcm_pb2.HttpConnectionManager, service: str) -> RateLimitConfig | None:
    for http_filter in hcm.http_filters:
        if http_filter.name != RATE_LIMIT_FILTER:
            continue
        config = local_rate_limit_pb2.LocalRateLimit()
        if not http_filter.typed_config.Unpack(config):
            raise InboundPolicyError(f"http_filters[{RATE_LIMIT_FILTER}]: expected LocalRateLimit")
        return _compile(config, service)
    return None


def _bucket(tb: token_bucket_pb2.TokenBucket, where: str) -> BucketSpec:
    interval = tb.fill_interval.seconds + tb.fill_interval.nanos / 1e9
    per_fill = tb.tokens_per_fill.value if tb.HasField("tokens_per_fill") else 1
    if interval <= 0 or per_fill <= 0 or tb.max_tokens <= 0:
        raise InboundPolicyError(f"{where}: token bucket needs max_tokens, tokens_per_fill and "
                                 "fill_interval > 0")
    return BucketSpec(tokens_per_second=per_fill / interval, burst=tb.max_tokens)


def _compile(config: local_rate_limit_pb2.LocalRateLimit, service: str) -> RateLimitConfig:
    default = _bucket(config.token_bucket, "local_ratelimit.token_bucket")
    overrides = []
    per_method = per_caller = False
    for i, descriptor in enumerate(config.descriptors):
        entries = {e.key: e.value for e in descriptor.entries}
        where = f"local_ratelimit.descriptors[{i}]"
        unknown = set(entries) - {METHOD_KEY, CALLER_KEY}
        if unknown:
            raise InboundPolicyError(f"{where}: unsupported descriptor keys {sorted(unknown)}")
        if all(not v for v in entries.values()):
            per_method = METHOD_KEY in entries
            per_caller = CALLER_KEY in entries
            continue
        overrides.append(RateLimitOverride(
            bucket=_bucket(descriptor.token_bucket, f"{where}.token_bucket"),
            method=entries.get(METHOD_KEY) or None, caller=entries.get(CALLER_KEY) or None))
    return RateLimitConfig(service=service, default=default, per_method=per_method,
                           per_caller=per_caller, overrides=tuple(overrides))
