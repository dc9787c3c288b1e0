"""Retry decisions for one call, following gRPC's retry design (gRFC A6).

A call is retried only when every one of these holds, checked in this order (the first that
fails is the reason reported to stats):

1. the attempt ended with one of the policy's retryable status codes;
2. the call is not committed: the upstream has not sent response headers, and the request
   messages buffered for replay fit in the buffer limit (A6 "When Retries are Valid");
3. fewer than max_attempts attempts were made (max_attempts is capped at 5, as in gRPC);
4. the server did not push back with "don't retry": `grpc-retry-pushback-ms` negative or not a
   valid int32 means stop; a valid value means retry after exactly that many milliseconds, and
   the backoff restarts from the initial value after it;
5. the delay does not reach the call's deadline (a retry that cannot start in time is useless);
6. the retry budget or throttle, if any, allows one more retry (asked last, so only real
   retries spend it).

Backoff before the n-th retry since the last pushback: uniform random in
[0, min(initial_backoff * multiplier^(n-1), max_backoff)] ("full jitter").

The server sees `grpc-previous-rpc-attempts` on every retried attempt (A6 "Exposed Retry
Metadata"). If the caller's own gRPC client had already retried (it set the header), the values
add up, so the upstream always sees at least the number of attempts made before.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import grpc

MAX_ATTEMPTS_CAP = 5
PREVIOUS_ATTEMPTS_KEY = "grpc-previous-rpc-attempts"
PUSHBACK_KEY = "grpc-retry-pushback-ms"
PUSHBACK_STOP = -1.0  # parse_pushback: the server asked not to retry
DEFAULT_MAX_BUFFER_BYTES = 256 * 1024

_INT32 = re.compile(r"-?(?:0|[1-9][0-9]{0,9})")

Metadata = Iterable[tuple[str, str | bytes]]


class Budget(Protocol):
    """What a retry asks before it goes (RetryBudget, RetryThrottle)."""

    def try_retry(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """A route's retry policy, validated and precomputed once per config."""

    max_attempts: int
    retryable_codes: frozenset[grpc.StatusCode]
    initial_backoff: float  # seconds
    max_backoff: float  # seconds
    backoff_multiplier: float = 2.0
    per_try_timeout: float | None = None  # seconds; None: only the call's deadline
    max_buffer_bytes: int = DEFAULT_MAX_BUFFER_BYTES  # request bytes kept for replay
    caps: tuple[float, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.initial_backoff <= 0 or self.max_backoff <= 0:
            raise ValueError("initial_backoff and max_backoff must be > 0")
        if self.backoff_multiplier <= 0:
            raise ValueError("backoff_multiplier must be > 0")
        if self.per_try_timeout is not None and self.per_try_timeout <= 0:
            raise ValueError("per_try_timeout must be > 0")
        if self.max_buffer_bytes < 0:
            raise ValueError("max_buffer_bytes must be >= 0")
        if grpc.StatusCode.OK in self.retryable_codes:
            raise ValueError("OK is not a retryable status code")
        object.__setattr__(self, "max_attempts", min(self.max_attempts, MAX_ATTEMPTS_CAP))
        object.__setattr__(self, "retryable_codes", frozenset(self.retryable_codes))
        caps = []
        for n in range(1, MAX_ATTEMPTS_CAP):
            caps.append(min(self.initial_backoff * self.backoff_multiplier ** (n - 1),
                            self.max_backoff))
        object.__setattr__(self, "caps", tuple(caps))

    def backoff_cap(self, n: int) -> float:
        """Upper bound of the delay before the n-th retry since the last pushback (n >= 1)."""
        return self.caps[min(n, len(self.caps)) - 1]


@dataclass(frozen=True, slots=True)
class RetryDecision:
    """delay: seconds to wait before the next attempt, or None: return this failure."""

    delay: float | None
    reason: str

    @property
    def retry(self) -> bool:
        return self.delay is not None


RETRY = "retry"
NOT_RETRYABLE = RetryDecision(None, "not_retryable")
COMMITTED = RetryDecision(None, "committed")
EXHAUSTED = RetryDecision(None, "attempts_exhausted")
PUSHED_BACK = RetryDecision(None, "pushback_stop")
DEADLINE = RetryDecision(None, "deadline")
BUDGET = RetryDecision(None, "budget_exhausted")


def is_committed(headers_received: bool, buffered_bytes: int, policy: RetryPolicy) -> bool:
    """A6 commit rules: once the upstream sent response headers, or the request stream no
    longer fits in the replay buffer, the call sticks with its current attempt."""
    return headers_received or buffered_bytes > policy.max_buffer_bytes


def pushback_delay(value: str | bytes) -> float:
    """Seconds to wait, or PUSHBACK_STOP for a negative or unparsable value (A6)."""
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return PUSHBACK_STOP
    if _INT32.fullmatch(value) is None:
        return PUSHBACK_STOP
    ms = int(value)
    if ms < 0 or ms > 2**31 - 1:
        return PUSHBACK_STOP
    return ms / 1000.0


def parse_pushback(metadata: Metadata | None) -> float | None:
    """The pushback in trailing metadata: None if absent, else pushback_delay of the first
    value."""
    for key, value in metadata or ():
        if key == PUSHBACK_KEY:
            return pushback_delay(value)
    return None


def counts_as_throttle_failure(policy: RetryPolicy, code: grpc.StatusCode,
                               metadata: Metadata | None) -> bool:
    """A6 throttling counts an attempt as failed only if its code is retryable or the server
    said not to retry: a malformed request (INVALID_ARGUMENT) says nothing about the server."""
    return code in policy.retryable_codes or parse_pushback(metadata) == PUSHBACK_STOP


def with_previous_attempts(metadata: Sequence[tuple[str, str | bytes]],
                           previous: int) -> Sequence[tuple[str, str | bytes]]:
    """Request metadata for an attempt after `previous` attempts of this hop (unchanged for
    the first attempt). A value the caller set is added to ours and replaced."""
    if previous <= 0:
        return metadata
    theirs = 0
    kept: list[tuple[str, str | bytes]] = []
    seen = False
    for key, value in metadata:
        if key == PREVIOUS_ATTEMPTS_KEY:
            if not seen and isinstance(value, str) and value.isdigit():
                theirs = int(value)
            seen = True
        else:
            kept.append((key, value))
    kept.append((PREVIOUS_ATTEMPTS_KEY, str(theirs + previous)))
    return tuple(kept)


class RetryState:
    """One call's attempts. Create it when the call starts (the first attempt counts)."""

    __slots__ = ("_random", "_since_pushback", "attempts", "policy")

    def __init__(self, policy: RetryPolicy, rng: random.Random) -> None:
        self.policy = policy
        self._random = rng
        self.attempts = 1
        self._since_pushback = 0

    @property
    def previous_attempts(self) -> int:
        """Attempts made before the current one: the grpc-previous-rpc-attempts value."""
        return self.attempts - 1

    def attempt_deadline(self, now: float, call_deadline: float | None) -> float | None:
        """When the current attempt must end: the per-try timeout or the call's deadline,
        whichever is sooner (None: no deadline)."""
        per_try = self.policy.per_try_timeout
        if per_try is None:
            return call_deadline
        mine = now + per_try
        return mine if call_deadline is None or mine < call_deadline else call_deadline

    def on_failure(self, code: grpc.StatusCode, trailing_metadata: Metadata | None, *,
                   committed: bool, now: float, deadline: float | None,
                   budget: Budget | None = None) -> RetryDecision:
        """Whether to retry after the current attempt ended with `code` (not OK). On a retry,
        `attempts` already counts the next attempt when this returns."""
        policy = self.policy
        if code not in policy.retryable_codes:
            return NOT_RETRYABLE
        if committed:
            return COMMITTED
        if self.attempts >= policy.max_attempts:
            return EXHAUSTED
        pushback = parse_pushback(trailing_metadata)
        if pushback == PUSHBACK_STOP:
            return PUSHED_BACK
        if pushback is not None:
            delay = pushback
            since = 0
        else:
            since = self._since_pushback + 1
            delay = self._random.uniform(0.0, policy.backoff_cap(since))
        if deadline is not None and now + delay >= deadline:
            return DEADLINE
        if budget is not None and not budget.try_retry():
            return BUDGET
        self._since_pushback = since
        self.attempts += 1
        return RetryDecision(delay, RETRY)
