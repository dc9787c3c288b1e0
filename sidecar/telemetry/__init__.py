"""Observability building blocks for the sidecar: trace context on the wire (trace_context),
spans exported over OTLP (tracing), Prometheus metrics (metrics), JSON access log (access_log).

Each module has one job and no dependency on the proxy; the proxy wires them in.
"""
