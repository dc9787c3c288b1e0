"""Traffic-management stages of the sidecar's call path, as pure synchronous cores.

Each module decides one thing and does no I/O: time comes from an injected clock (a callable
returning seconds) and chance from an injected random.Random, so the asyncio shell in
sidecar/proxy.py owns all waiting and every core is unit-tested with a fake clock and a seeded
random source.

| module | decides |
|---|---|
| retry.py | whether and when a failed attempt is retried (gRFC A6) |
| retry_budget.py | whether the cluster can afford another retry (Linkerd budget, A6 throttling) |
| breaker.py | whether a call may start (max requests / max pending per cluster) |
| outlier.py | which instances are ejected (consecutive errors, failure percentage, A50) |
| rate_limit.py | whether an inbound call gets a token (per service / method / caller) |
| fault.py | whether a call is delayed or aborted on purpose (A33) |
"""
