"""Authorization decisions at the inbound sidecar: the AuthorizationPolicy semantics, and the
same decisions from the RBAC filters the control plane really emits for that policy."""

from __future__ import annotations

import pytest
from envoy.config.rbac.v3 import rbac_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as rbac_filter_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from control_plane.policy import schema as s
from control_plane.translate_listeners import sidecar_listeners
from sidecar.authz import (
    ALLOW_ALL,
    RBAC_TYPE_URL,
    Authorizer,
    AuthzConfigError,
    compile_rbac_filters,
    compile_rules,
    rbac_configs,
)

TD = "corp.example"
ORDERS = f"spiffe://{TD}/service/orders"
WEB = f"spiffe://{TD}/service/web"
EVIL = f"spiffe://{TD}/service/evil"
FOREIGN = "spiffe://other.org/ns/x"


def rule(action: str, services: tuple[str, ...] = (), ids: tuple[str, ...] = (),
         methods: tuple[str, ...] = ()) -> s.AuthorizationRule:
    sources = tuple(s.Source(service=n) for n in services) + tuple(
        s.Source(spiffe_id=i) for i in ids)
    return s.AuthorizationRule(action, sources, methods)


def from_control_plane(rules: tuple[s.AuthorizationRule, ...], service: str = "cart",
                       trust_domain: str = TD) -> Authorizer:
    """What the sidecar of `service` compiles from the listener the control plane sends."""
    policies = s.PolicySet((
        s.Resource(s.AUTHORIZATION_POLICY, f"{service}-authz",
                   s.AuthorizationPolicy(service, rules)),
        s.Resource(s.MESH_CONFIG, s.MESH_CONFIG_NAME, s.MeshConfig(trust_domain=trust_domain)),
    ))
    listener = sidecar_listeners(service, policies)[f"inbound|{service}"]
    hcm = hcm_pb2.HttpConnectionManager()
    listener.filter_chains[0].filters[0].typed_config.Unpack(hcm)
    return compile_rbac_filters(rbac_configs(hcm.http_filters), f"{service}-authz")


# --- the semantics ------------------------------------------------------------------------------


def test_no_policy_allows_everyone_even_without_a_certificate() -> None:
    assert ALLOW_ALL.check(None, "/shop.Cart/Get").allowed
    assert ALLOW_ALL.allows_everything
    empty = compile_rules("cart", (), TD)
    assert empty.check(ORDERS, "/x.Y/Z").allowed and empty.allows_everything


def test_deny_wins_over_allow() -> None:
    authz = compile_rules("cart", (rule("ALLOW", ("orders",)),
                                   rule("DENY", ("orders",), methods=("/shop.Cart/Drop",))), TD)
    assert authz.check(ORDERS, "/shop.Cart/Get").allowed
    decision = authz.check(ORDERS, "/shop.Cart/Drop")
    assert not decision.allowed and decision.rule == "rules[1]"
    assert decision.message == (f"AuthorizationPolicy 'cart' denies {ORDERS} calling "
                                "/shop.Cart/Drop (DENY rule rules[1])")


def test_any_allow_rule_denies_what_no_rule_allows() -> None:
    authz = compile_rules("cart-authz", (rule("ALLOW", ("orders",), methods=("/shop.Cart/*",)),),
                          TD)
    assert authz.check(ORDERS, "/shop.Cart/Get").allowed
    assert authz.check(ORDERS, "/shop.Cart/Get").rule == "rules[0]"
    for caller, method in ((WEB, "/shop.Cart/Get"), (ORDERS, "/shop.Admin/Get"),
                           (None, "/shop.Cart/Get")):
        decision = authz.check(caller, method)
        assert not decision.allowed and decision.rule is None
        assert "AuthorizationPolicy 'cart-authz'" in decision.message
        assert method in decision.message
    assert "a caller without a client certificate" in authz.check(None, "/shop.Cart/Get").message


def test_deny_only_policy_allows_the_rest() -> None:
    authz = compile_rules("cart", (rule("DENY", ("evil",)),), TD)
    assert not authz.check(EVIL, "/any.Thing/At").allowed
    assert authz.check(ORDERS, "/any.Thing/At").allowed
    assert authz.check(None, "/any.Thing/At").allowed


def test_methods_exact_and_service_wildcard() -> None:
    authz = compile_rules("cart", (rule("ALLOW", methods=("/shop.Cart/*", "/shop.Admin/Get")),),
                          TD)
    assert authz.check(WEB, "/shop.Cart/Anything").allowed
    assert authz.check(WEB, "/shop.Admin/Get").allowed
    assert not authz.check(WEB, "/shop.Admin/GetAll").allowed
    assert not authz.check(WEB, "/shop.CartX/Get").allowed  # a prefix of the service name only
    assert not authz.check(WEB, "/shop.Cart").allowed


def test_callers_by_service_or_spiffe_id_and_unauthenticated_matches_only_no_from() -> None:
    authz = compile_rules("cart", (rule("ALLOW", ("orders",), (FOREIGN,)),
                                   rule("ALLOW", methods=("/grpc.health.v1.Health/Check",))), TD)
    assert authz.check(ORDERS, "/shop.Cart/Get").allowed
    assert authz.check(FOREIGN, "/shop.Cart/Get").allowed
    assert not authz.check("spiffe://other.org/service/orders", "/shop.Cart/Get").allowed
    assert not authz.check(None, "/shop.Cart/Get").allowed
    assert authz.check(None, "/grpc.health.v1.Health/Check").allowed


def test_a_rule_with_neither_allow_nor_deny_is_refused() -> None:
    with pytest.raises(AuthzConfigError, match=r"rules\[0\].action"):
        compile_rules("cart", (rule("AUDIT"),), TD)


# --- from the control plane's RBAC filters ------------------------------------------------------


def test_rbac_from_the_control_plane_decides_like_the_policy() -> None:
    rules = (rule("ALLOW", ("orders",), (FOREIGN,), ("/shop.Cart/*", "/shop.Admin/Get")),
             rule("DENY", ("evil",)),
             rule("ALLOW", (), (), ("/grpc.health.v1.Health/Check",)),
             rule("DENY", ("orders",), (), ("/shop.Cart/Drop",)))
    direct = compile_rules("cart-authz", rules, TD)
    via_xds = from_control_plane(rules)
    assert via_xds.policy == direct.policy == "AuthorizationPolicy 'cart-authz'"
    for caller in (ORDERS, WEB, EVIL, FOREIGN, None):
        for method in ("/shop.Cart/Get", "/shop.Cart/Drop", "/shop.Admin/Get",
                       "/shop.Admin/Put", "/grpc.health.v1.Health/Check"):
            assert via_xds.check(caller, method) == direct.check(caller, method), (caller, method)


def test_rbac_rules_keep_the_policys_order_in_messages() -> None:
    rules = tuple(rule("DENY", ("orders",), methods=(f"/p.S/M{i}",)) for i in range(12))
    via_xds = from_control_plane(rules)
    assert [r.name for r in via_xds.deny] == [f"rules[{i}]" for i in range(12)]
    assert via_xds.check(ORDERS, "/p.S/M10").rule == "rules[10]"


SERVICES = ("orders", "web", "evil")
METHODS = ("/p.A/X", "/p.A/Y", "/p.B/X", "/p.A/*", "/p.B/*")
CALLERS = (*(f"spiffe://{TD}/service/{n}" for n in SERVICES), FOREIGN, None)
CALLS = ("/p.A/X", "/p.A/Y", "/p.B/X", "/p.C/X")

rules_strategy = st.lists(st.builds(
    rule,
    st.sampled_from(("ALLOW", "DENY")),
    st.lists(st.sampled_from(SERVICES), max_size=2, unique=True).map(tuple),
    st.lists(st.just(FOREIGN), max_size=1).map(tuple),
    st.lists(st.sampled_from(METHODS), max_size=2, unique=True).map(tuple),
), max_size=5).map(tuple)


def reference(rules: tuple[s.AuthorizationRule, ...], caller: str | None, method: str) -> bool:
    """The policy's semantics, written out plainly."""
    def matches(r: s.AuthorizationRule) -> bool:
        ids = {src.spiffe_id or f"spiffe://{TD}/service/{src.service}" for src in r.sources}
        caller_ok = not r.sources or caller in ids
        method_ok = not r.methods or any(
            method.startswith(m[:-1]) if m.endswith("/*") else method == m for m in r.methods)
        return caller_ok and method_ok

    if any(matches(r) for r in rules if r.action == "DENY"):
        return False
    allows = [r for r in rules if r.action == "ALLOW"]
    return not allows or any(matches(r) for r in allows)


@settings(max_examples=150, deadline=None)
@given(rules_strategy)
def test_property_policy_rbac_and_reference_agree(rules: tuple[s.AuthorizationRule, ...]) -> None:
    direct = compile_rules("p", rules, TD)
    via_xds = from_control_plane(rules) if rules else ALLOW_ALL
    for caller in CALLERS:
        for method in CALLS:
            expected = reference(rules, caller, method)
            assert direct.check(caller, method).allowed is expected
            assert via_xds.check(caller, method).allowed is expected


# --- RBAC this sidecar cannot enforce exactly: refused, naming the field ------------------------


def rbac(action: int, **policies: rbac_pb2.Policy) -> rbac_filter_pb2.RBAC:
    config = rbac_filter_pb2.RBAC()
    config.rules.action = action  # type: ignore[assignment]
    for name, policy in policies.items():
        config.rules.policies[name].CopyFrom(policy)
    return config


def any_policy() -> rbac_pb2.Policy:
    policy = rbac_pb2.Policy()
    policy.principals.add(any=True)
    policy.permissions.add(any=True)
    return policy


def test_unsupported_principal_permission_and_action_name_the_field() -> None:
    bad_principal = any_policy()
    bad_principal.principals.add().source_ip.address_prefix = "10.0.0.0"
    with pytest.raises(AuthzConfigError,
                       match=r"rbac\[0\].rules.policies\['p'\].principals\[1\]: principal "
                             "source_ip is not supported"):
        compile_rbac_filters([rbac(rbac_pb2.RBAC.DENY, p=bad_principal)], "cart")
    bad_permission = any_policy()
    bad_permission.permissions.add().header.name = ":path"
    with pytest.raises(AuthzConfigError, match=r"permissions\[1\]: permission header"):
        compile_rbac_filters([rbac(rbac_pb2.RBAC.ALLOW, p=bad_permission)], "cart")
    regex = any_policy()
    regex.permissions.add().url_path.path.safe_regex.regex = ".*"
    with pytest.raises(AuthzConfigError, match=r"url_path.path: safe_regex is not supported"):
        compile_rbac_filters([rbac(rbac_pb2.RBAC.ALLOW, p=regex)], "cart")
    with pytest.raises(AuthzConfigError, match="LOG is not supported"):
        compile_rbac_filters([rbac(rbac_pb2.RBAC.LOG, p=any_policy())], "cart")
    with pytest.raises(AuthzConfigError, match="more than one ALLOW"):
        compile_rbac_filters([rbac(rbac_pb2.RBAC.ALLOW), rbac(rbac_pb2.RBAC.ALLOW)], "cart")
    matcher = rbac_filter_pb2.RBAC()
    matcher.matcher.SetInParent()
    with pytest.raises(AuthzConfigError, match=r"rbac\[0\].matcher"):
        compile_rbac_filters([matcher], "cart")


def test_rbac_forms_beyond_our_translation_that_are_enforced() -> None:
    policy = rbac_pb2.Policy()
    ors = policy.principals.add().or_ids
    ors.ids.add().authenticated.principal_name.prefix = f"spiffe://{TD}/service/"
    ors.ids.add().authenticated.principal_name.exact = FOREIGN
    rules = policy.permissions.add().or_rules
    rules.rules.add().url_path.path.exact = "/p.A/X"
    authenticated_only = rbac_pb2.Policy()
    authenticated_only.principals.add().authenticated.SetInParent()
    authenticated_only.permissions.add().url_path.path.prefix = "/p.B/"
    authz = compile_rbac_filters([rbac(rbac_pb2.RBAC.ALLOW, a=policy, b=authenticated_only),
                                  rbac_filter_pb2.RBAC()], "cart")  # an empty filter: no-op
    assert authz.check(ORDERS, "/p.A/X").allowed and authz.check(FOREIGN, "/p.A/X").allowed
    assert not authz.check("spiffe://x.org/service/a", "/p.A/X").allowed
    assert authz.check("spiffe://x.org/service/a", "/p.B/Y").allowed
    assert not authz.check(None, "/p.B/Y").allowed


def test_an_empty_allow_filter_denies_everything() -> None:
    authz = compile_rbac_filters([rbac(rbac_pb2.RBAC.ALLOW)], "cart")
    assert not authz.check(ORDERS, "/p.A/X").allowed


def test_policy_name_from_rules_stat_prefix_and_filter_extraction() -> None:
    config = rbac(rbac_pb2.RBAC.DENY, **{"rules[0]": any_policy()})
    config.rules_stat_prefix = "payments-authz."
    hcm = hcm_pb2.HttpConnectionManager()
    hcm.http_filters.add(name="envoy.filters.http.fault")
    f = hcm.http_filters.add(name="envoy.filters.http.rbac.deny")
    f.typed_config.Pack(config)
    skipped = hcm.http_filters.add(name="off", disabled=True)
    skipped.typed_config.Pack(rbac(rbac_pb2.RBAC.ALLOW))
    configs = rbac_configs(hcm.http_filters)
    assert len(configs) == 1
    decision = compile_rbac_filters(configs, "fallback").check(ORDERS, "/p.A/X")
    assert decision.message.startswith("AuthorizationPolicy 'payments-authz' denies")
    broken = hcm.http_filters.add(name="broken")
    broken.typed_config.type_url = RBAC_TYPE_URL
    broken.typed_config.value = b"\xff\xff"
    with pytest.raises(AuthzConfigError, match=r"http_filters\[3\] \(broken\)"):
        rbac_configs(hcm.http_filters)
