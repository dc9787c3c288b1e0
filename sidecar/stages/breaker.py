"""Circuit breaking per cluster: bounded calls in flight and bounded calls waiting.

Past a limit, a call fails at once with UNAVAILABLE instead of queueing behind a struggling
service (Envoy's circuit_breakers thresholds; gRPC applies max_requests too, gRFC A32).

- max_requests: calls in flight to the cluster from this sidecar. try_acquire() when an
  attempt starts, release() exactly once when it ends.
- max_pending: calls waiting for an upstream connection to become ready.
  try_enter_pending() before waiting, leave_pending() exactly once after.

A new config changes the limits with update_limits(); the counts of calls in flight carry
over, so a config push neither forgets calls nor lets a burst through. Single-threaded use
(the sidecar's event loop): the counts need no lock.
"""

from __future__ import annotations


class CircuitBreaker:
    __slots__ = ("active", "cluster", "max_pending", "max_requests", "pending",
                 "rejected_pending", "rejected_requests")

    def __init__(self, cluster: str, max_requests: int = 1024, max_pending: int = 1024) -> None:
        self.cluster = cluster
        self.max_requests = 0
        self.max_pending = 0
        self.update_limits(max_requests, max_pending)
        self.active = 0
        self.pending = 0
        self.rejected_requests = 0
        self.rejected_pending = 0

    def update_limits(self, max_requests: int, max_pending: int) -> None:
        if max_requests < 1:
            raise ValueError("max_requests must be >= 1")
        if max_pending < 0:
            raise ValueError("max_pending must be >= 0")
        self.max_requests = max_requests
        self.max_pending = max_pending

    def try_acquire(self) -> bool:
        """Count a call in flight, or refuse (then send UNAVAILABLE with request_message())."""
        if self.active >= self.max_requests:
            self.rejected_requests += 1
            return False
        self.active += 1
        return True

    def release(self) -> None:
        if self.active > 0:
            self.active -= 1

    def try_enter_pending(self) -> bool:
        """Count a call waiting for a connection, or refuse (pending_message())."""
        if self.pending >= self.max_pending:
            self.rejected_pending += 1
            return False
        self.pending += 1
        return True

    def leave_pending(self) -> None:
        if self.pending > 0:
            self.pending -= 1

    def request_message(self) -> str:
        return (f"circuit breaker max_requests of cluster '{self.cluster}' is open: "
                f"{self.active} calls in flight, limit {self.max_requests}")

    def pending_message(self) -> str:
        return (f"circuit breaker max_pending_requests of cluster '{self.cluster}' is open: "
                f"{self.pending} calls waiting for a connection, limit {self.max_pending}")
