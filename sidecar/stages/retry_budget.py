"""Retry budgets: retries must not multiply an outage.

Two interchangeable policies, both answering try_retry() for retry.RetryState.on_failure:

RetryBudget (the default; Linkerd's / Finagle's budget). Over a sliding window (10 s by
default, kept as `buckets` slices so a slice expires as a whole), at every moment:

    retries  <=  retry_ratio * requests  +  min_retries_per_second * window

`requests` are original calls (record_request, once per call); retries do not earn budget.
The floor lets a quiet service still retry; the ratio caps the extra load a failing service
gets at retry_ratio (20%: an outage costs at most 1.2x the calls, not max_attempts x).
The window covered is between window * (buckets-1)/buckets and window long.

RetryThrottle (gRPC's retryThrottling, gRFC A6). A token count starts at max_tokens; every
failed attempt (retryable code, or pushback "stop") takes 1, every success gives token_ratio
back; retries are allowed only while the count is above max_tokens / 2. Counted in thousandths
of a token, as A6 keeps three decimals of token_ratio, so the sums are exact.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from decimal import ROUND_DOWN, Decimal


class RetryBudget:
    __slots__ = ("_clock", "_current", "_floor", "_ratio", "_req", "_ret", "_total_req",
                 "_total_ret", "_width", "granted", "refused")

    def __init__(self, retry_ratio: float = 0.2, min_retries_per_second: float = 10.0, *,
                 window: float = 10.0, buckets: int = 10,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not 0.0 <= retry_ratio <= 1000.0:
            raise ValueError("retry_ratio must be between 0 and 1000")
        if min_retries_per_second < 0:
            raise ValueError("min_retries_per_second must be >= 0")
        if window <= 0 or buckets < 1:
            raise ValueError("window must be > 0 and buckets >= 1")
        self._ratio = retry_ratio
        self._floor = min_retries_per_second * window
        self._width = window / buckets
        self._clock = clock
        self._req = [0] * buckets
        self._ret = [0] * buckets
        self._total_req = 0
        self._total_ret = 0
        self._current = int(clock() // self._width)
        self.granted = 0
        self.refused = 0

    def _advance(self) -> int:
        """Index of the current slice, after expiring the slices the clock moved past."""
        epoch = int(self._clock() // self._width)
        current = self._current
        n = len(self._req)
        if epoch > current:
            for e in range(current + 1, min(epoch, current + n) + 1):
                i = e % n
                self._total_req -= self._req[i]
                self._total_ret -= self._ret[i]
                self._req[i] = 0
                self._ret[i] = 0
            self._current = current = epoch
        return current % n

    def record_request(self) -> None:
        """An original call was made (not a retry)."""
        self._req[self._advance()] += 1
        self._total_req += 1

    def allowance(self) -> float:
        """Retries the window allows in all (spent or not)."""
        self._advance()
        return self._ratio * self._total_req + self._floor

    def try_retry(self) -> bool:
        """Spend one retry if the budget has it."""
        i = self._advance()
        if self._total_ret + 1 > self._ratio * self._total_req + self._floor:
            self.refused += 1
            return False
        self._ret[i] += 1
        self._total_ret += 1
        self.granted += 1
        return True

    @property
    def window_counts(self) -> tuple[int, int]:
        """(requests, retries) in the current window."""
        self._advance()
        return self._total_req, self._total_ret


class RetryThrottle:
    __slots__ = ("_max", "_ratio", "_threshold", "_tokens", "granted", "refused")

    def __init__(self, max_tokens: float, token_ratio: float) -> None:
        if not 0 < max_tokens <= 1000:
            raise ValueError("max_tokens must be in (0, 1000]")
        if token_ratio <= 0:
            raise ValueError("token_ratio must be > 0")
        self._max = int(Decimal(str(max_tokens)) * 1000)
        ratio = Decimal(str(token_ratio)).quantize(Decimal("0.001"), rounding=ROUND_DOWN)
        self._ratio = int(ratio * 1000)
        if self._ratio <= 0:
            raise ValueError("token_ratio must be at least 0.001")
        self._threshold = self._max / 2
        self._tokens = self._max
        self.granted = 0
        self.refused = 0

    @property
    def tokens(self) -> float:
        return self._tokens / 1000

    def record_success(self) -> None:
        self._tokens = min(self._max, self._tokens + self._ratio)

    def record_failure(self) -> None:
        """An attempt failed with a retryable code or was pushed back (A6)."""
        self._tokens = max(0, self._tokens - 1000)

    def try_retry(self) -> bool:
        if self._tokens > self._threshold:
            self.granted += 1
            return True
        self.refused += 1
        return False
