"""The control plane's Prometheus metrics, read at scrape time from the live objects.

A collector (not counters bumped on the hot path) keeps the ADS server and registries free of
metrics code: the numbers they already keep are exported as they are when /metrics is read.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector


class _Collector(Collector):
    def __init__(self, ads: Any, registries: Mapping[str, Any], store: Any) -> None:
        self._ads = ads
        self._registries = registries
        self._store = store

    def collect(self) -> Iterator[Any]:
        c = self._ads.counters
        yield GaugeMetricFamily("mesh_cp_connected_proxies",
                                "ADS streams open now (sidecars and proxyless clients)",
                                value=self._ads.connected)
        for name, value, text in (
                ("streams", c.streams_opened, "ADS streams opened"),
                ("pushes", c.pushes, "xDS responses sent"),
                ("acks", c.acks, "xDS responses ACKed"),
                ("nacks", c.nacks, "xDS responses NACKed (rejected by the proxy)"),
                ("protocol_errors", c.protocol_errors, "malformed ADS requests"),
                ("translations", c.translations, "translations computed (cache misses)")):
            yield CounterMetricFamily(f"mesh_cp_xds_{name}", text, value=value)
        healthy = GaugeMetricFamily("mesh_cp_registry_healthy",
                                    "1 when the registry source answers (Consul reachable)",
                                    labels=["source"])
        instances = GaugeMetricFamily("mesh_cp_registry_instances",
                                      "instances in the registry view", labels=["source"])
        for source, registry in self._registries.items():
            healthy.add_metric([source], 1.0 if registry.healthy else 0.0)
            instances.add_metric([source], len(registry.view().instances))
        yield healthy
        yield instances
        policies = self._store.policy_set()
        yield GaugeMetricFamily("mesh_cp_policy_revision", "revision of the stored policy set",
                                value=policies.revision)
        yield GaugeMetricFamily("mesh_cp_policies", "stored policy resources",
                                value=len(policies.resources))


class ControlPlaneMetrics:
    def __init__(self, ads: Any, registries: Mapping[str, Any], store: Any) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_Collector(ads, registries, store))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
