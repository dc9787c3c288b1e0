"""Authorization at the inbound sidecar: may this caller call this method?

The caller is the SPIFFE ID its verified client certificate proves (sidecar/tls.py
`peer_identity`), or None for a caller without one (a plaintext PERMISSIVE port): such a caller
matches only rules that name no caller. Semantics (docs/policy.md, AuthorizationPolicy):
a DENY rule that matches wins; otherwise, when the service has any ALLOW rule, the call needs
a matching one; a service without ALLOW rules allows everything not denied.

Two inputs compile into the same frozen `Authorizer`: AuthorizationPolicy-like rules
(`compile_rules`, anything shaped like control_plane.policy.schema.AuthorizationRule), and the
xDS the control plane sends (`compile_rbac_filters`: the inbound HttpConnectionManager's
`envoy.extensions.filters.http.rbac.v3.RBAC` filters, DENY then ALLOW; see
control_plane/translate_listeners.py). The RBAC subset understood is what gRFC A41 and our
translation use; anything else is an `AuthzConfigError` naming the field, so the sidecar NACKs
a config it would otherwise enforce wrongly.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from envoy.config.rbac.v3 import rbac_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as rbac_filter_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.type.matcher.v3 import string_pb2
from google.protobuf.message import DecodeError

from sidecar.identity import spiffe_id

RBAC_TYPE_URL = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
ALLOW = "ALLOW"
DENY = "DENY"


class AuthzConfigError(ValueError):
    """An authorization config the sidecar cannot enforce exactly; the message names the field."""


# --- the compiled form ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Matcher:
    """A set of strings: anything, or exact values and prefixes. `authenticated` (callers only)
    matches any caller with a verified identity."""

    any: bool = False
    authenticated: bool = False
    exact: frozenset[str] = frozenset()
    prefixes: tuple[str, ...] = ()

    def matches(self, value: str | None) -> bool:
        if self.any:
            return True
        if value is None:
            return False
        return (self.authenticated or value in self.exact
                or any(value.startswith(p) for p in self.prefixes))

    def __or__(self, other: Matcher) -> Matcher:
        return Matcher(self.any or other.any, self.authenticated or other.authenticated,
                       self.exact | other.exact, self.prefixes + other.prefixes)


NOTHING = Matcher()
ANYTHING = Matcher(any=True)


@dataclass(frozen=True, slots=True)
class Rule:
    name: str  # as the policy calls it, e.g. rules[0]
    action: str  # ALLOW | DENY
    callers: Matcher
    methods: Matcher

    def matches(self, caller: str | None, method: str) -> bool:
        return self.callers.matches(caller) and self.methods.matches(method)


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    rule: str | None = None  # the deciding rule (None: allowed by default / no ALLOW rule)
    message: str = ""  # for PERMISSION_DENIED; names the policy, the rule, caller and method


@dataclass(frozen=True, slots=True)
class Authorizer:
    policy: str  # how messages name the policy, e.g. "AuthorizationPolicy 'payments'"
    deny: tuple[Rule, ...] = ()
    allow: tuple[Rule, ...] | None = None  # None: no ALLOW rules, allow what is not denied

    @property
    def allows_everything(self) -> bool:
        return not self.deny and self.allow is None

    def check(self, caller: str | None, method: str) -> Decision:
        for rule in self.deny:
            if rule.matches(caller, method):
                return Decision(False, rule.name,
                                f"{self.policy} denies {_who(caller)} calling {method} "
                                f"(DENY rule {rule.name})")
        if self.allow is None:
            return Decision(True)
        for rule in self.allow:
            if rule.matches(caller, method):
                return Decision(True, rule.name)
        return Decision(False, None, f"{self.policy} allows only the callers and methods of "
                                     f"its ALLOW rules, and none matches {_who(caller)} "
                                     f"calling {method}")


ALLOW_ALL = Authorizer(policy="no AuthorizationPolicy")


def _who(caller: str | None) -> str:
    return caller if caller is not None else "a caller without a client certificate"


def policy_label(name: str) -> str:
    return f"AuthorizationPolicy {name!r}"


# --- from AuthorizationPolicy rules -----------------------------------------------------------


class SourceLike(Protocol):
    @property
    def service(self) -> str: ...

    @property
    def spiffe_id(self) -> str: ...


class RuleLike(Protocol):
    @property
    def action(self) -> str: ...

    @property
    def sources(self) -> Sequence[SourceLike]: ...

    @property
    def methods(self) -> Sequence[str]: ...


def compile_rules(policy_name: str, rules: Iterable[RuleLike], trust_domain: str) -> Authorizer:
    """Rules named `rules[i]` after their place, as the control plane names its RBAC policies."""
    deny: list[Rule] = []
    allow: list[Rule] = []
    for index, spec in enumerate(rules):
        callers = (Matcher(exact=frozenset(s.spiffe_id or spiffe_id(trust_domain, s.service)
                                           for s in spec.sources))
                   if spec.sources else ANYTHING)
        rule = Rule(f"rules[{index}]", spec.action, callers, _methods(spec.methods))
        if spec.action == DENY:
            deny.append(rule)
        elif spec.action == ALLOW:
            allow.append(rule)
        else:
            raise AuthzConfigError(f"rules[{index}].action: must be ALLOW or DENY, "
                                   f"not {spec.action!r}")
    return Authorizer(policy_label(policy_name), tuple(deny), tuple(allow) if allow else None)


def _methods(patterns: Sequence[str]) -> Matcher:
    if not patterns:
        return ANYTHING
    exact = frozenset(p for p in patterns if not p.endswith("/*"))
    prefixes = tuple(p[:-1] for p in patterns if p.endswith("/*"))
    return Matcher(exact=exact, prefixes=prefixes)


# --- from xDS RBAC filters --------------------------------------------------------------------


def rbac_configs(http_filters: Sequence[hcm_pb2.HttpFilter], where: str = "http_filters"
                 ) -> list[rbac_filter_pb2.RBAC]:
    """The RBAC filter configs among an HttpConnectionManager's filters, in order (disabled
    filters skipped)."""
    out = []
    for i, f in enumerate(http_filters):
        if f.disabled or f.typed_config.type_url != RBAC_TYPE_URL:
            continue
        config = rbac_filter_pb2.RBAC()
        try:
            f.typed_config.Unpack(config)
        except DecodeError:
            raise AuthzConfigError(f"{where}[{i}] ({f.name}): not a valid RBAC config") from None
        out.append(config)
    return out



def compile_rbac_filters(configs: Sequence[rbac_filter_pb2.RBAC], policy_name: str,
                         where: str = "rbac") -> Authorizer:
    """The HCM's RBAC filters in their order. DENY filters add up; one ALLOW filter makes
    everything it does not allow denied (a second one is refused: not what we translate).

    The policy name for messages: the filter's `rules_stat_prefix` when the control plane set
    one (trailing '.' dropped), else `policy_name`."""
    deny: list[Rule] = []
    allow: tuple[Rule, ...] | None = None
    name = policy_name
    for i, config in enumerate(configs):
        at = f"{where}[{i}]"
        if config.rules_stat_prefix:
            name = config.rules_stat_prefix.rstrip(".")
        if config.HasField("matcher"):
            raise AuthzConfigError(f"{at}.matcher: not supported (use rules)")
        if not config.HasField("rules"):
            continue  # Envoy: no rules, the filter does nothing (shadow rules only log)
        if config.rules.action == rbac_pb2.RBAC.DENY:
            deny.extend(_rbac_rules(config.rules, DENY, at))
        elif config.rules.action == rbac_pb2.RBAC.ALLOW:
            if allow is not None:
                raise AuthzConfigError(f"{at}: more than one ALLOW RBAC filter is not supported")
            allow = _rbac_rules(config.rules, ALLOW, at)
        else:
            raise AuthzConfigError(f"{at}.rules.action: "
                                   f"{rbac_pb2.RBAC.Action.Name(config.rules.action)} is not "
                                   "supported (ALLOW or DENY)")
    return Authorizer(policy_label(name), tuple(deny), allow)


def _rbac_rules(rules: rbac_pb2.RBAC, action: str, at: str) -> tuple[Rule, ...]:
    out = []
    for key in sorted(rules.policies, key=_natural):
        policy = rules.policies[key]
        where = f"{at}.rules.policies[{key!r}]"
        if policy.HasField("condition") or policy.HasField("checked_condition"):
            raise AuthzConfigError(f"{where}.condition: CEL conditions are not supported")
        callers = NOTHING
        for j, principal in enumerate(policy.principals):
            callers = callers | _principal(principal, f"{where}.principals[{j}]")
        methods = NOTHING
        for j, permission in enumerate(policy.permissions):
            methods = methods | _permission(permission, f"{where}.permissions[{j}]")
        out.append(Rule(key, action, callers, methods))
    return tuple(out)


def _natural(key: str) -> tuple[int, str]:
    """rules[2] before rules[10]: the order the policy wrote them (only messages depend on it)."""
    digits = "".join(c for c in key if c.isdigit())
    return (int(digits) if digits else -1, key)


def _principal(principal: rbac_pb2.Principal, where: str) -> Matcher:
    kind = principal.WhichOneof("identifier")
    if kind == "any":
        return ANYTHING if principal.any else NOTHING
    if kind == "authenticated":
        if not principal.authenticated.HasField("principal_name"):
            return Matcher(authenticated=True)
        return _string(principal.authenticated.principal_name,
                       f"{where}.authenticated.principal_name")
    if kind == "or_ids":
        out = NOTHING
        for k, inner in enumerate(principal.or_ids.ids):
            out = out | _principal(inner, f"{where}.or_ids.ids[{k}]")
        return out
    raise AuthzConfigError(f"{where}: principal {kind or '(empty)'} is not supported "
                           "(any, authenticated, or_ids)")


def _permission(permission: rbac_pb2.Permission, where: str) -> Matcher:
    kind = permission.WhichOneof("rule")
    if kind == "any":
        return ANYTHING if permission.any else NOTHING
    if kind == "url_path":
        path = permission.url_path
        if path.WhichOneof("rule") != "path":
            raise AuthzConfigError(f"{where}.url_path: only path matchers are supported")
        return _string(path.path, f"{where}.url_path.path")
    if kind == "or_rules":
        out = NOTHING
        for k, inner in enumerate(permission.or_rules.rules):
            out = out | _permission(inner, f"{where}.or_rules.rules[{k}]")
        return out
    raise AuthzConfigError(f"{where}: permission {kind or '(empty)'} is not supported "
                           "(any, url_path, or_rules)")


def _string(matcher: string_pb2.StringMatcher, where: str) -> Matcher:
    if matcher.ignore_case:
        raise AuthzConfigError(f"{where}.ignore_case: not supported")
    kind = matcher.WhichOneof("match_pattern")
    if kind == "exact":
        return Matcher(exact=frozenset((matcher.exact,)))
    if kind == "prefix":
        return Matcher(prefixes=(matcher.prefix,))
    raise AuthzConfigError(f"{where}: {kind or '(empty)'} is not supported (exact, prefix)")
