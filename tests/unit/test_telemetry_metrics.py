"""The sidecar's Prometheus metrics (sidecar/telemetry/metrics.py): known traffic in, the
scraped text format out, read back with prometheus-client's own parser as Prometheus would."""

from __future__ import annotations

import grpc
from prometheus_client.parser import text_string_to_metric_families

from sidecar.telemetry.metrics import LATENCY_BUCKETS, SidecarMetrics

OK = grpc.StatusCode.OK


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def scrape(metrics: SidecarMetrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def test_requests_by_status_latency_and_in_flight() -> None:
    m = SidecarMetrics("frontend")
    get = m.call("outbound", "/demo.Orders/Get")
    for _ in range(7):
        get.start()
        get.finish(OK, 0.002)
    for _ in range(2):
        get.start()
        get.finish(grpc.StatusCode.UNAVAILABLE, 0.040)
    get.start()
    get.finish(5, 0.0001)  # an int code counts under its name (NOT_FOUND)
    held = m.call("inbound", "/demo.Payments/Pay")
    held.start()
    held.start()
    s = scrape(m)
    labels = {"direction": "outbound", "service": "demo.Orders", "method": "Get"}
    assert value(s, "mesh_sidecar_requests_total", **labels, grpc_status="OK") == 7
    assert value(s, "mesh_sidecar_requests_total", **labels, grpc_status="UNAVAILABLE") == 2
    assert value(s, "mesh_sidecar_requests_total", **labels, grpc_status="NOT_FOUND") == 1
    assert value(s, "mesh_sidecar_request_duration_seconds_count", **labels) == 10
    assert abs(value(s, "mesh_sidecar_request_duration_seconds_sum", **labels)  # type: ignore
               - (7 * 0.002 + 2 * 0.040 + 0.0001)) < 1e-9
    assert value(s, "mesh_sidecar_request_duration_seconds_bucket", **labels, le="0.0005") == 1
    assert value(s, "mesh_sidecar_request_duration_seconds_bucket", **labels, le="0.0025") == 8
    assert value(s, "mesh_sidecar_request_duration_seconds_bucket", **labels, le="+Inf") == 10
    assert value(s, "mesh_sidecar_requests_in_flight", **labels) == 0
    assert value(s, "mesh_sidecar_requests_in_flight", direction="inbound",
                 service="demo.Payments", method="Pay") == 2
    held.finish(OK, 0.1)
    assert value(scrape(m), "mesh_sidecar_requests_in_flight", direction="inbound",
                 service="demo.Payments", method="Pay") == 1


def test_label_children_are_bound_once_per_method_and_status() -> None:
    """The per-call path does no label lookups after the first call of a (method, status)."""
    m = SidecarMetrics("frontend")
    calls = {"requests": 0, "latency": 0}
    for name in calls:
        family = getattr(m, name)
        original = family.labels

        def counting(*args: str, _name: str = name, _orig=original):  # type: ignore[no-untyped-def]
            calls[_name] += 1
            return _orig(*args)
        family.labels = counting  # type: ignore[method-assign]
    for _ in range(500):
        c = m.call("outbound", "/demo.Orders/Get")
        c.start()
        c.finish(OK, 0.001)
    assert m.call("outbound", "/demo.Orders/Get") is m.call("outbound", "/demo.Orders/Get")
    assert calls == {"requests": 1, "latency": 1}
    c = m.call("outbound", "/demo.Orders/Get")
    c.start()
    c.finish(grpc.StatusCode.INTERNAL, 0.001)
    assert calls == {"requests": 2, "latency": 1}


def test_method_count_is_capped() -> None:
    m = SidecarMetrics("frontend", max_methods=3)
    for i in range(10):
        c = m.call("outbound", f"/svc.S/M{i}")
        c.start()
        c.finish(OK, 0.001)
    s = scrape(m)
    series = [k for k in s if k[0] == "mesh_sidecar_requests_total"]
    assert len(series) == 4  # three real methods and "other"
    assert value(s, "mesh_sidecar_requests_total", direction="outbound", service="other",
                 method="other", grpc_status="OK") == 7
    # the cap is per direction
    assert m.call("inbound", "/svc.S/M9").labels == ("inbound", "svc.S", "M9")


def test_retries_rate_limits_ejections_breakers() -> None:
    m = SidecarMetrics("frontend")
    c = m.call("outbound", "/demo.Orders/Get")
    c.retried()
    c.retried(2)
    c.rate_limited()
    m.ejection("orders", ejected_now=1)
    m.ejection("orders", ejected_now=2)
    m.set_ejected("orders", 1)
    m.breaker_trip("orders")
    m.breaker_trip("orders", "max_pending")
    s = scrape(m)
    labels = {"direction": "outbound", "service": "demo.Orders", "method": "Get"}
    assert value(s, "mesh_sidecar_retries_total", **labels) == 3
    assert value(s, "mesh_sidecar_rate_limited_total", **labels) == 1
    assert value(s, "mesh_sidecar_outlier_ejections_total", cluster="orders") == 2
    assert value(s, "mesh_sidecar_endpoints_ejected", cluster="orders") == 1
    assert value(s, "mesh_sidecar_circuit_breaker_trips_total", cluster="orders",
                 limit="max_requests") == 1
    assert value(s, "mesh_sidecar_circuit_breaker_trips_total", cluster="orders",
                 limit="max_pending") == 1


def test_config_version_and_age() -> None:
    clock = FakeClock(1000.0)
    m = SidecarMetrics("frontend", version="1.2.3", clock=clock)
    s = scrape(m)
    assert value(s, "mesh_sidecar_info", service="frontend", version="1.2.3") == 1
    assert not [k for k in s if k[0].startswith("mesh_sidecar_config_info")]  # none yet
    assert value(s, "mesh_sidecar_config_updates_total") == 0
    m.config_applied("v7")
    clock.now = 1012.5
    s = scrape(m)
    assert value(s, "mesh_sidecar_config_info", version="v7") == 1
    assert value(s, "mesh_sidecar_config_age_seconds") == 12.5
    assert value(s, "mesh_sidecar_config_last_applied_timestamp_seconds") == 1000.0
    m.config_applied("v8", applied_at=1012.0)
    m.config_rejected()
    clock.now = 1013.0
    s = scrape(m)
    infos = [k for k in s if k[0] == "mesh_sidecar_config_info"]
    assert infos == [("mesh_sidecar_config_info", frozenset({("version", "v8")}))]
    assert value(s, "mesh_sidecar_config_age_seconds") == 1.0
    assert value(s, "mesh_sidecar_config_updates_total") == 2
    assert value(s, "mesh_sidecar_config_rejections_total") == 1


def test_access_log_drops_exported_when_watched() -> None:
    m = SidecarMetrics("frontend")
    assert not [k for k in scrape(m) if "access_log" in k[0]]
    dropped = [0]
    m.watch_access_log(lambda: dropped[0])
    dropped[0] = 42
    assert value(scrape(m), "mesh_sidecar_access_log_dropped_total") == 42


def test_registries_are_separate() -> None:
    a, b = SidecarMetrics("a"), SidecarMetrics("b")
    a.call("outbound", "/x.Y/Z").rate_limited()
    assert value(scrape(b), "mesh_sidecar_rate_limited_total", direction="outbound",
                 service="x.Y", method="Z") is None
    assert LATENCY_BUCKETS[0] == 0.0005  # sub-millisecond resolution for a proxy hop


def test_grafana_dashboard_uses_only_metrics_we_export() -> None:
    """docs/grafana-dashboard.json stays in step with the metric names (its queries were also
    evaluated by a real Prometheus against these metrics: docs/observability.md)."""
    import json
    import re
    from pathlib import Path

    dashboard = Path(__file__).resolve().parents[2] / "docs" / "grafana-dashboard.json"
    text = dashboard.read_text()
    json.loads(text)
    used = set(re.findall(r"mesh_sidecar_[a-z_]+", text))
    m = SidecarMetrics("frontend")
    c = m.call("outbound", "/x.Y/Z")
    c.start()
    c.finish(OK, 0.001)
    c.retried()
    c.rate_limited()
    m.ejection("c", 1)
    m.breaker_trip("c")
    m.config_applied("v1")
    m.config_rejected()
    m.watch_access_log(lambda: 0)
    exported = {name for name, _labels in scrape(m)}
    assert used, "the dashboard queries no sidecar metric"
    assert used <= exported, used - exported
