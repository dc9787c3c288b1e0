"""Local rate limiting at the inbound sidecar: token buckets per service, method and caller.

The semantics of a RateLimitPolicy (docs/policy.md), as the control plane writes them into
Envoy's local_ratelimit filter:

- A call spends one token from exactly one bucket: the first override it matches (an override
  names a method, `/pkg.Svc/M` or `/pkg.Svc/*`, a caller service, or both, and has one bucket
  of its own), else the default bucket: one per method when per_method, one per caller when
  per_caller (one per pair when both), else the single bucket of the service.
- A bucket holds at most `burst` tokens and gains tokens_per_second; it starts full.
- A call with no token is refused: the shell answers RESOURCE_EXHAUSTED with the message.

Method and caller come from the network, so the number of dynamic buckets is bounded
(max_keys). A bucket that has refilled completely is the same as a new one and is dropped
first; if the table is still full, new keys share one overflow bucket, so a flood of distinct
names is limited together rather than growing memory or resetting anyone's bucket.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BucketSpec:
    tokens_per_second: float
    burst: int

    def __post_init__(self) -> None:
        if self.tokens_per_second <= 0:
            raise ValueError("tokens_per_second must be > 0")
        if self.burst < 1:
            raise ValueError("burst must be >= 1")


@dataclass(frozen=True, slots=True)
class RateLimitOverride:
    bucket: BucketSpec
    method: str | None = None  # "/pkg.Svc/M" or "/pkg.Svc/*"
    caller: str | None = None

    def __post_init__(self) -> None:
        if not self.method and not self.caller:
            raise ValueError("a rate limit override needs a method, a caller or both")

    def matches_method(self, method: str) -> bool:
        pattern = self.method
        if not pattern:
            return True
        if pattern.endswith("/*"):
            return method.startswith(pattern[:-1])
        return method == pattern


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    service: str
    default: BucketSpec
    per_method: bool = False
    per_caller: bool = False
    overrides: tuple[RateLimitOverride, ...] = ()


class TokenBucket:
    __slots__ = ("burst", "last", "rate", "tokens")

    def __init__(self, spec: BucketSpec, now: float) -> None:
        self.rate = spec.tokens_per_second
        self.burst = float(spec.burst)
        self.tokens = self.burst
        self.last = now

    def try_take(self, now: float) -> bool:
        elapsed = now - self.last
        if elapsed > 0:
            tokens = self.tokens + elapsed * self.rate
            self.tokens = tokens if tokens < self.burst else self.burst
            self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def full_at(self, now: float) -> bool:
        return self.tokens + (now - self.last) * self.rate >= self.burst


_METHOD_CACHE_LIMIT = 4096
_OVERFLOW = ("", "\x00overflow")


class RateLimiter:
    def __init__(self, config: RateLimitConfig, *, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = 10_000) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be >= 1")
        self._config = config
        self._clock = clock
        self._max_keys = max_keys
        now = clock()
        self._override_buckets = [TokenBucket(o.bucket, now) for o in config.overrides]
        self._dynamic = config.per_method or config.per_caller
        self._single = TokenBucket(config.default, now)
        self._buckets: dict[tuple[str, str], TokenBucket] = {}
        self._method_overrides: dict[str, tuple[int, ...]] = {}
        self._last_prune = now
        # a bucket can only be full again burst / rate after its last use; sweep at most once
        # a second (a sweep is O(max_keys))
        self._prune_every = min(config.default.burst / config.default.tokens_per_second, 1.0)
        self.allowed = 0
        self.limited = 0

    @property
    def config(self) -> RateLimitConfig:
        return self._config

    @property
    def key_count(self) -> int:
        return len(self._buckets)

    def check(self, method: str, caller: str | None) -> str | None:
        """Spend a token for a call: None if it may proceed, else the RESOURCE_EXHAUSTED
        message naming the limit."""
        now = self._clock()
        candidates = self._method_overrides.get(method)
        if candidates is None:
            candidates = tuple(i for i, o in enumerate(self._config.overrides)
                               if o.matches_method(method))
            if len(self._method_overrides) >= _METHOD_CACHE_LIMIT:
                self._method_overrides.clear()
            self._method_overrides[method] = candidates
        overrides = self._config.overrides
        for i in candidates:
            want = overrides[i].caller
            if not want or want == caller:
                if self._override_buckets[i].try_take(now):
                    self.allowed += 1
                    return None
                self.limited += 1
                return self._message(overrides[i].bucket, overrides[i].method,
                                     overrides[i].caller)
        if not self._dynamic:
            bucket = self._single
        else:
            config = self._config
            key = (method if config.per_method else "", (caller or "") if config.per_caller
                   else "")
            found = self._buckets.get(key)
            if found is None:
                found = self._new_bucket(key, now)
            bucket = found
        if bucket.try_take(now):
            self.allowed += 1
            return None
        self.limited += 1
        config = self._config
        return self._message(config.default,
                             method if config.per_method else None,
                             (caller or "(unknown)") if config.per_caller else None)

    def _new_bucket(self, key: tuple[str, str], now: float) -> TokenBucket:
        buckets = self._buckets
        if len(buckets) >= self._max_keys and now - self._last_prune >= self._prune_every:
            self._last_prune = now
            for k in [k for k, b in buckets.items() if k != _OVERFLOW and b.full_at(now)]:
                del buckets[k]
        if len(buckets) >= self._max_keys:
            overflow = buckets.get(_OVERFLOW)
            if overflow is None:  # the table can hold max_keys + 1 buckets
                overflow = buckets[_OVERFLOW] = TokenBucket(self._config.default, now)
            return overflow
        bucket = buckets[key] = TokenBucket(self._config.default, now)
        return bucket

    def _message(self, spec: BucketSpec, method: str | None, caller: str | None) -> str:
        scope = f"service '{self._config.service}'"
        if method:
            scope += f" method '{method}'"
        if caller:
            scope += f" caller '{caller}'"
        return (f"rate limit of {scope} exceeded: {spec.tokens_per_second:g} calls/s, "
                f"burst {spec.burst}")
