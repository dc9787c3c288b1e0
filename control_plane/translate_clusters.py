"""CDS and EDS: a cluster per destination service and per subset; endpoints grouped by zone.

TrafficPolicy -> Cluster mapping (every field also read by gRPC's proxyless xDS client unless
noted):
- loadBalancer ROUND_ROBIN -> lb_policy ROUND_ROBIN.
- RING_HASH -> lb_policy RING_HASH with ring_hash_lb_config (XX_HASH, the only hash gRPC takes,
  gRFC A42); the hashed header is a RouteAction.hash_policy (translate_routes).
- LEAST_REQUEST -> lb_policy LEAST_REQUEST for our sidecar (and Envoy), plus
  load_balancing_policy [least_request, wrr_locality(round_robin)]: gRPC reads only
  load_balancing_policy when set and takes the first policy it supports (gRFC A52). grpc-java
  and grpc-go use least_request (A48); grpcio (C-core) has no least_request and falls back to
  round robin, where lb_policy LEAST_REQUEST alone would make it NACK every cluster.
- circuitBreaker -> circuit_breakers.thresholds[DEFAULT].max_requests (gRPC: gRFC A32) and
  max_pending_requests (sidecar/Envoy only).
- retry.budget (the policy-level retry) -> the same threshold's retry_budget: budget_percent =
  retryRatio x 100, min_retry_concurrency = minRetriesPerSecond (rounded up). Envoy's budget
  counts active retries against active requests, ours is per second: the sidecar reads the two
  numbers with our meaning. gRPC ignores retry_budget.
- outlierDetection -> outlier_detection: consecutiveErrors -> consecutive_5xx with
  enforcing_consecutive_5xx 100 (sidecar/Envoy; gRPC does not implement consecutive errors);
  interval, base_ejection_time, max_ejection_percent as is; failurePercentage ->
  failure_percentage_* with enforcing_failure_percentage 100 (gRPC: gRFC A50);
  enforcing_success_rate is set to 0 and consecutive_gateway_failure enforcement left at 0, so
  no detector runs that the policy did not ask for (Envoy enables success rate ejection by
  default).

mTLS (the mode x node-variant table is in translate_tls): the sidecar variant's clusters get
transport_socket_matches (mtls / plaintext) unless the mode is DISABLE; the proxyless-mtls
variant's clusters of a service with mtls instances get one TLS transport_socket; an EDS
endpoint's port and metadata follow translate_tls.endpoint_plan.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.extensions.load_balancing_policies.least_request.v3 import least_request_pb2
from envoy.extensions.load_balancing_policies.round_robin.v3 import round_robin_pb2
from envoy.extensions.load_balancing_policies.wrr_locality.v3 import wrr_locality_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2

from control_plane.policy.schema import PolicySet, Subset, TrafficPolicy
from control_plane.registry.model import Instance, RegistryView
from control_plane.translate_common import (
    HTTP_PROTOCOL_OPTIONS,
    ads_source,
    destinations,
    duration,
    pack,
    subset_cluster,
)
from control_plane.translate_tls import (
    DISABLE,
    PROXYLESS_MTLS_VARIANT,
    SIDECAR_VARIANT,
    EndpointPlan,
    endpoint_metadata,
    endpoint_plan,
    in_mesh_mode,
    proxyless_transport_socket,
    sidecar_socket_matches,
)


def cluster_plan(view: RegistryView, policies: PolicySet
                 ) -> list[tuple[str, str, Subset | None, TrafficPolicy | None]]:
    """(cluster name, service, subset or None, policy) for every cluster, sorted by name."""
    traffic = policies.traffic_policies()
    plan: list[tuple[str, str, Subset | None, TrafficPolicy | None]] = []
    for service in destinations(view, traffic):
        policy = traffic.get(service)
        plan.append((service, service, None, policy))
        if policy is not None:
            seen: set[str] = set()
            for subset in policy.subsets:
                if subset.name and subset.name not in seen:
                    seen.add(subset.name)
                    plan.append((subset_cluster(service, subset.name), service, subset, policy))
    plan.sort(key=lambda entry: entry[0])
    return plan


def clusters(view: RegistryView, policies: PolicySet, variant: str = SIDECAR_VARIANT,
             trust_bundle: Sequence[str] = ()) -> dict[str, cluster_pb2.Cluster]:
    mesh = policies.mesh_config()
    out: dict[str, cluster_pb2.Cluster] = {}
    for name, service, _subset, policy in cluster_plan(view, policies):
        cluster = build_cluster(name, policy)
        if mesh.mtls_mode != DISABLE:
            if variant == SIDECAR_VARIANT:
                cluster.transport_socket_matches.extend(
                    sidecar_socket_matches(service, mesh.trust_domain, trust_bundle))
            elif variant == PROXYLESS_MTLS_VARIANT and any(
                    i.mtls for i in view.instances_of(service)):
                cluster.transport_socket.CopyFrom(
                    proxyless_transport_socket(service, mesh.trust_domain))
        out[name] = cluster
    return out


def load_assignments(view: RegistryView, policies: PolicySet, variant: str = SIDECAR_VARIANT
                     ) -> dict[str, endpoint_pb2.ClusterLoadAssignment]:
    mode = policies.mesh_config().mtls_mode
    out: dict[str, endpoint_pb2.ClusterLoadAssignment] = {}
    for name, service, subset, _policy in cluster_plan(view, policies):
        members = [i for i in view.instances_of(service)
                   if subset is None or subset.selects(i)]
        out[name] = build_load_assignment(name, members, mode, variant)
    return out


def build_cluster(name: str, policy: TrafficPolicy | None) -> cluster_pb2.Cluster:
    cluster = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.EDS)
    cluster.eds_cluster_config.eds_config.CopyFrom(ads_source())
    cluster.eds_cluster_config.service_name = name
    # gRPC upstreams speak HTTP/2 only; Envoy would otherwise default to HTTP/1.1.
    options = http_protocol_options_pb2.HttpProtocolOptions()
    options.explicit_http_config.http2_protocol_options.SetInParent()
    cluster.typed_extension_protocol_options[HTTP_PROTOCOL_OPTIONS].CopyFrom(pack(options))
    cluster.lb_policy = cluster_pb2.Cluster.ROUND_ROBIN
    if policy is None:
        return cluster
    _load_balancer(cluster, policy)
    _circuit_breakers(cluster, policy)
    _outlier_detection(cluster, policy)
    return cluster


def _load_balancer(cluster: cluster_pb2.Cluster, policy: TrafficPolicy) -> None:
    algorithm = policy.load_balancer.algorithm
    if algorithm == "RING_HASH":
        cluster.lb_policy = cluster_pb2.Cluster.RING_HASH
        cluster.ring_hash_lb_config.hash_function = (
            cluster_pb2.Cluster.RingHashLbConfig.XX_HASH)
    elif algorithm == "LEAST_REQUEST":
        cluster.lb_policy = cluster_pb2.Cluster.LEAST_REQUEST
        policies = cluster.load_balancing_policy.policies
        least = policies.add().typed_extension_config
        least.name = "envoy.load_balancing_policies.least_request"
        least.typed_config.CopyFrom(pack(least_request_pb2.LeastRequest()))
        wrr = wrr_locality_pb2.WrrLocality()
        rr = wrr.endpoint_picking_policy.policies.add().typed_extension_config
        rr.name = "envoy.load_balancing_policies.round_robin"
        rr.typed_config.CopyFrom(pack(round_robin_pb2.RoundRobin()))
        fallback = policies.add().typed_extension_config
        fallback.name = "envoy.load_balancing_policies.wrr_locality"
        fallback.typed_config.CopyFrom(pack(wrr))


def _circuit_breakers(cluster: cluster_pb2.Cluster, policy: TrafficPolicy) -> None:
    breaker = policy.circuit_breaker
    budget = policy.retry.budget if policy.retry is not None else None
    if breaker is None and budget is None:
        return
    threshold = cluster.circuit_breakers.thresholds.add(priority=base_pb2.DEFAULT)
    if breaker is not None:
        threshold.max_requests.value = _uint32(breaker.max_requests)
        threshold.max_pending_requests.value = _uint32(breaker.max_pending_requests)
    if budget is not None:
        threshold.retry_budget.budget_percent.value = min(100.0, max(0.0,
                                                                     budget.retry_ratio * 100))
        threshold.retry_budget.min_retry_concurrency.value = _uint32(
            math.ceil(budget.min_retries_per_second))


def _outlier_detection(cluster: cluster_pb2.Cluster, policy: TrafficPolicy) -> None:
    od = policy.outlier_detection
    if od is None:
        return
    out = cluster.outlier_detection
    if od.consecutive_errors > 0:
        out.consecutive_5xx.value = _uint32(od.consecutive_errors)
        out.enforcing_consecutive_5xx.value = 100
    else:
        out.enforcing_consecutive_5xx.value = 0
    if od.interval > 0:  # Envoy requires both > 0; unset means its defaults (10 s, 30 s)
        out.interval.CopyFrom(duration(od.interval))
    if od.base_ejection_time > 0:
        out.base_ejection_time.CopyFrom(duration(od.base_ejection_time))
    out.max_ejection_percent.value = min(100, max(0, od.max_ejection_percent))
    out.enforcing_success_rate.value = 0
    fp = od.failure_percentage
    if fp is not None:
        out.enforcing_failure_percentage.value = 100
        out.failure_percentage_threshold.value = min(100, max(0, fp.threshold))
        out.failure_percentage_minimum_hosts.value = _uint32(fp.minimum_hosts)
        out.failure_percentage_request_volume.value = _uint32(fp.request_volume)


def build_load_assignment(name: str, instances: Iterable[Instance], mode: str = DISABLE,
                          variant: str = SIDECAR_VARIANT) -> endpoint_pb2.ClusterLoadAssignment:
    """Healthy instances only, one locality per zone, each weighted by its endpoint count.

    Weighting a locality by how many endpoints it has keeps every endpoint's share equal under
    gRPC's weighted locality picking, and gRPC drops localities that have no weight at all.
    An address seen twice (two registrations of one sidecar) is kept once: gRPC rejects an
    EDS resource with duplicate addresses. The port (and metadata) of an mtls instance depend
    on the mesh mode and the node variant (translate_tls.endpoint_plan); in STRICT, instances
    announced by sidecars without mTLS are left out (translate_tls.in_mesh_mode).
    """
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    by_zone: dict[str, list[tuple[Instance, EndpointPlan]]] = {}
    seen: set[tuple[str, int]] = set()
    for inst in sorted(instances, key=lambda i: (i.instance_id, i.address, i.port)):
        if not in_mesh_mode(inst, mode):
            continue
        plan = endpoint_plan(inst, mode, variant)
        key = (inst.address, plan.port)
        if not inst.healthy or not inst.address or not 0 < plan.port < 65536 or key in seen:
            continue
        seen.add(key)
        by_zone.setdefault(inst.zone, []).append((inst, plan))
    for zone in sorted(by_zone):
        members = by_zone[zone]
        locality = cla.endpoints.add()
        locality.locality.zone = zone
        locality.load_balancing_weight.value = len(members)
        for inst, plan in members:
            lb_endpoint = locality.lb_endpoints.add(health_status=health_check_pb2.HEALTHY)
            lb_endpoint.endpoint.hostname = inst.instance_id
            sock = lb_endpoint.endpoint.address.socket_address
            sock.address = inst.address
            sock.port_value = plan.port
            metadata = endpoint_metadata(plan)
            if metadata is not None:
                lb_endpoint.metadata.CopyFrom(metadata)
    return cla


def _uint32(value: float) -> int:
    return int(min(max(value, 0), 2**32 - 1))
