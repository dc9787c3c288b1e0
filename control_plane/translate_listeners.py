"""LDS: a sidecar's outbound and inbound listeners, and proxyless clients' API listeners.

Inbound policy rides on `inbound|S`'s HttpConnectionManager, in this order: RBAC deny, RBAC
allow, local rate limit, router (authorization before rate limiting, so a denied caller does not
spend tokens).

AuthorizationPolicy -> envoy.extensions.filters.http.rbac.v3.RBAC (gRFC A41 subset): the DENY
rules in one filter with action DENY, the ALLOW rules in a second filter with action ALLOW (only
when there are ALLOW rules: with none, everything not denied is allowed). One RBAC policy per
rule, named `rules[i]` after its place in the AuthorizationPolicy. from.service -> principal
authenticated.principal_name exact `spiffe://TRUST_DOMAIN/service/NAME`, from.spiffeId -> that
URI exactly, no from -> any; methods `/pkg.Svc/*` -> url_path prefix `/pkg.Svc/`, exact methods ->
url_path exact, none -> any. Principals need the caller's certificate: with mTLS DISABLE no
`from` rule can match.

RateLimitPolicy -> envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit, enabled and
enforced for 100% of requests, rate_limited_as_resource_exhausted (gRPC sees RESOURCE_EXHAUSTED),
always_consume_default_token_bucket false (a call spends tokens from one bucket only):
- token_bucket: tokensPerSecond / burst (max_tokens = burst; tokens_per_fill / fill_interval
  the rate as an exact fraction per whole seconds, e.g. 2.5/s -> 5 per 2 s).
- descriptors, first match wins: every override in order, with entries `method` = its method
  pattern and/or `source_cluster` = its caller's service, then, when perMethod or perCaller,
  one wildcard descriptor whose entries have empty values (Envoy's dynamic descriptors: one
  bucket per distinct value) with the policy's rate.
- rate_limits, one per descriptor in the same order, with the actions that produce it: an
  override's method -> header_value_match on `:path` (exact, or prefix for `/pkg.Svc/*`) giving
  `method` = the pattern; the wildcard's method -> request_headers `:path` -> `method`; a caller
  -> source_cluster (the caller's mesh service; the sidecar takes it from the caller's SPIFFE
  ID) -> `source_cluster`.

MeshConfig tracing.samplingPercent -> the outbound HCM's tracing.random_sampling (the caller's
sidecar starts traces); trustDomain -> the RBAC principals above.

MeshConfig mtls.mode -> `inbound|S`'s filter chains, each with the same HCM (translate_tls):
STRICT one chain, transport_protocol "tls" with a DownstreamTlsContext (client certificate
required, the "mesh-identity" certificate provider instance, the trust bundle as trusted_ca);
PERMISSIVE that chain and then a "raw_buffer" chain without transport socket; DISABLE only the
"raw_buffer" chain. `outbound|S` keeps one plain chain (the sidecar's local listener).
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from fractions import Fraction

from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as rbac_filter_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.type.matcher.v3 import string_pb2
from envoy.type.v3 import percent_pb2, token_bucket_pb2
from google.protobuf.message import Message

from control_plane.policy.schema import (
    AUTHORIZATION_POLICY,
    AuthorizationRule,
    MeshConfig,
    PolicySet,
    RateLimitPolicy,
    method_prefix,
)
from control_plane.translate_common import (
    FAULT_FILTER,
    HCM_FILTER,
    INBOUND_APP_CLUSTER,
    RATE_LIMIT_FILTER,
    RBAC_ALLOW_FILTER,
    RBAC_DENY_FILTER,
    ROUTER_FILTER,
    ads_source,
    duration,
    inbound_name,
    outbound_name,
    pack,
)
from control_plane.translate_tls import (
    TLS_PROTOCOL,
    downstream_transport_socket,
    inbound_chain_protocols,
    spiffe_id,
)

METHOD_KEY = "method"
CALLER_KEY = "source_cluster"



def sidecar_listeners(service: str, policies: PolicySet, trust_bundle: Sequence[str] = ()
                      ) -> dict[str, listener_pb2.Listener]:
    mesh = policies.mesh_config()
    outbound = _hcm(outbound_name(service), rds=outbound_name(service),
                    filters=[_filter(FAULT_FILTER, fault_pb2.HTTPFault())])
    outbound.tracing.random_sampling.value = min(100.0, max(0.0, mesh.sampling_percent))

    filters: list[hcm_pb2.HttpFilter] = []
    authz = policies.authorization_for(service)
    if authz is not None:
        resource = policies.resource_for(AUTHORIZATION_POLICY, service)
        filters.extend(_rbac_filters(authz.rules, mesh,
                                     resource.name if resource is not None else service))
    limit = policies.rate_limit_for(service)
    if limit is not None:
        filters.append(_filter(RATE_LIMIT_FILTER, local_rate_limit(service, limit)))
    inbound = _hcm(inbound_name(service), rds=None, filters=filters)
    route_config = inbound.route_config
    route_config.name = inbound_name(service)
    route = route_config.virtual_hosts.add(name="inbound", domains=["*"]).routes.add(name="app")
    route.match.prefix = ""
    route.route.cluster = INBOUND_APP_CLUSTER
    route.route.timeout.CopyFrom(duration(0))  # the caller's deadline governs

    inbound_listener = _socket_listener(inbound_name(service), base_pb2.INBOUND, inbound)
    _mode_chains(inbound_listener, mesh.mtls_mode, trust_bundle)
    return {
        inbound_name(service): inbound_listener,
        outbound_name(service): _socket_listener(outbound_name(service), base_pb2.OUTBOUND,
                                                 outbound),
    }


def _mode_chains(listener: listener_pb2.Listener, mode: str, trust_bundle: Sequence[str]
                 ) -> None:
    """Replace the listener's one chain by one per transport the mode accepts."""
    [template] = listener.filter_chains
    chains = []
    for protocol in inbound_chain_protocols(mode):
        chain = listener_components_pb2.FilterChain()
        chain.CopyFrom(template)
        chain.filter_chain_match.transport_protocol = protocol
        if protocol == TLS_PROTOCOL:
            chain.transport_socket.CopyFrom(downstream_transport_socket(trust_bundle))
        chains.append(chain)
    del listener.filter_chains[:]
    listener.filter_chains.extend(chains)


def api_listener(name: str) -> listener_pb2.Listener:
    """What gRPC's xDS resolver asks for when a client dials xds:///name (gRFC A27)."""
    hcm = _hcm(name, rds=name, filters=[_filter(FAULT_FILTER, fault_pb2.HTTPFault())])
    out = listener_pb2.Listener(name=name)
    out.api_listener.api_listener.CopyFrom(pack(hcm))
    return out


def _socket_listener(name: str, direction: int, hcm: hcm_pb2.HttpConnectionManager
                     ) -> listener_pb2.Listener:
    # No address: the sidecar binds the ports it was started with, so one LDS answer serves
    # every instance of a service.
    out = listener_pb2.Listener(name=name, stat_prefix=name,
                                traffic_direction=direction)  # type: ignore[arg-type]
    out.filter_chains.add().filters.add(name=HCM_FILTER).typed_config.CopyFrom(pack(hcm))
    return out


def _hcm(stat_prefix: str, rds: str | None, filters: Sequence[hcm_pb2.HttpFilter]
         ) -> hcm_pb2.HttpConnectionManager:
    hcm = hcm_pb2.HttpConnectionManager(stat_prefix=stat_prefix)
    if rds is not None:
        hcm.rds.config_source.CopyFrom(ads_source())
        hcm.rds.route_config_name = rds
    hcm.http_filters.extend(filters)
    hcm.http_filters.append(_filter(ROUTER_FILTER, router_pb2.Router()))  # terminal: last
    return hcm


def _filter(name: str, config: Message) -> hcm_pb2.HttpFilter:
    out = hcm_pb2.HttpFilter(name=name)
    out.typed_config.CopyFrom(pack(config))
    return out


# --- AuthorizationPolicy ----------------------------------------------------------------------


def _rbac_filters(rules: Sequence[AuthorizationRule], mesh: MeshConfig, policy_name: str
                  ) -> list[hcm_pb2.HttpFilter]:
    """rules_stat_prefix `<policy name>.`: the sidecar's PERMISSION_DENIED message names the
    AuthorizationPolicy from it."""
    out: list[hcm_pb2.HttpFilter] = []
    for action, filter_name in (("DENY", RBAC_DENY_FILTER), ("ALLOW", RBAC_ALLOW_FILTER)):
        chosen = [(i, r) for i, r in enumerate(rules) if r.action == action]
        if not chosen:
            continue
        config = rbac_filter_pb2.RBAC(rules_stat_prefix=f"{policy_name}.")
        config.rules.action = getattr(rbac_pb2.RBAC, action)
        for index, rule in chosen:
            _rbac_policy(config.rules.policies[f"rules[{index}]"], rule, mesh)
        out.append(_filter(filter_name, config))
    return out


def _rbac_policy(policy: rbac_pb2.Policy, rule: AuthorizationRule, mesh: MeshConfig) -> None:
    for source in rule.sources:
        principal = policy.principals.add()
        uri = source.spiffe_id or spiffe_id(mesh.trust_domain, source.service)
        principal.authenticated.principal_name.exact = uri
    if not rule.sources:
        policy.principals.add(any=True)
    for method in rule.methods:
        target, is_prefix = method_prefix(method)
        matcher = string_pb2.StringMatcher()
        if is_prefix:
            matcher.prefix = target
        else:
            matcher.exact = target
        policy.permissions.add().url_path.path.CopyFrom(matcher)
    if not rule.methods:
        policy.permissions.add(any=True)


# --- RateLimitPolicy --------------------------------------------------------------------------


def local_rate_limit(service: str, policy: RateLimitPolicy
                     ) -> local_rate_limit_pb2.LocalRateLimit:
    config = local_rate_limit_pb2.LocalRateLimit(stat_prefix=f"{inbound_name(service)}.ratelimit")
    config.token_bucket.CopyFrom(token_bucket(policy.tokens_per_second, policy.burst))
    for field in (config.filter_enabled, config.filter_enforced):
        field.default_value.numerator = 100
        field.default_value.denominator = percent_pb2.FractionalPercent.HUNDRED
    config.always_consume_default_token_bucket.value = False
    config.rate_limited_as_resource_exhausted = True

    for override in policy.overrides:
        if not override.method and not override.caller:
            continue  # validation requires method, caller or both
        descriptor = config.descriptors.add()
        actions = config.rate_limits.add().actions
        if override.method:
            descriptor.entries.add(key=METHOD_KEY, value=override.method)
            match = actions.add().header_value_match
            match.descriptor_key = METHOD_KEY
            match.descriptor_value = override.method
            match.expect_match.value = True
            header = match.headers.add(name=":path")
            target, is_prefix = method_prefix(override.method)
            if is_prefix:
                header.string_match.prefix = target
            else:
                header.string_match.exact = target
        if override.caller:
            descriptor.entries.add(key=CALLER_KEY, value=override.caller)
            actions.add().source_cluster.SetInParent()
        descriptor.token_bucket.CopyFrom(token_bucket(override.tokens_per_second,
                                                      override.burst))
    if policy.per_method or policy.per_caller:
        wildcard = config.descriptors.add()
        actions = config.rate_limits.add().actions
        if policy.per_method:
            wildcard.entries.add(key=METHOD_KEY, value="")
            action = actions.add()
            action.request_headers.header_name = ":path"
            action.request_headers.descriptor_key = METHOD_KEY
        if policy.per_caller:
            wildcard.entries.add(key=CALLER_KEY, value="")
            actions.add().source_cluster.SetInParent()
        wildcard.token_bucket.CopyFrom(token_bucket(policy.tokens_per_second, policy.burst))
    return config


def token_bucket(tokens_per_second: float, burst: int) -> token_bucket_pb2.TokenBucket:
    """tokens_per_fill / fill_interval as an exact fraction with a whole-second interval (both
    must be positive integers / durations >= 50 ms in Envoy)."""
    rate = Fraction(Decimal(str(max(tokens_per_second, 0.0)))).limit_denominator(3600)
    if rate <= 0:
        rate = Fraction(1, 3600)
    bucket = token_bucket_pb2.TokenBucket()
    bucket.max_tokens = int(min(max(burst, 1), 2**32 - 1))
    bucket.tokens_per_fill.value = int(min(rate.numerator, 2**32 - 1))
    bucket.fill_interval.CopyFrom(duration(rate.denominator))
    return bucket
