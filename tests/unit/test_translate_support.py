"""Helpers for the translation tests, and tests of the shared builders (versions, durations,
percentages, deterministic packing).

The helpers check what a real consumer would: each resource survives Any packing and parsing
back byte for byte, and every nested Any names a message type that exists and parses.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.type.v3 import percent_pb2
from google.protobuf import any_pb2, duration_pb2, symbol_database
from google.protobuf.message import Message
from validate import validate_pb2

from control_plane.policy import schema as s
from control_plane.registry.model import Instance, RegistryView
from control_plane.translate import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    LISTENER_TYPE,
    ROUTE_TYPE,
    NodeInfo,
    pack,
    serialize,
    translate,
    version_of,
)
from control_plane.translate_common import duration
from control_plane.translate_routes import fractional_percent

MESSAGE_FOR_TYPE = {LISTENER_TYPE: listener_pb2.Listener, ROUTE_TYPE: route_pb2.RouteConfiguration,
                    CLUSTER_TYPE: cluster_pb2.Cluster,
                    ENDPOINT_TYPE: endpoint_pb2.ClusterLoadAssignment}

SIDECAR = NodeInfo("cart~cart-1", sidecar=True, service="cart", instance_id="cart-1")
PROXYLESS = NodeInfo("client-1")


def inst(service: str, iid: str, port: int, version: str = "", zone: str = "",
         grpc: tuple[str, ...] = (), healthy: bool = True, address: str = "10.0.0.1",
         meta: tuple[tuple[str, str], ...] = ()) -> Instance:
    return Instance(service, iid, address, port, version=version, zone=zone,
                    grpc_services=grpc, healthy=healthy, meta=meta)


def shop_view() -> RegistryView:
    return RegistryView((
        inst("orders", "orders-1", 7001, "v1", "z1", ("shop.Orders",)),
        inst("orders", "orders-2", 7002, "v1", "z2", ("shop.Orders",)),
        inst("orders", "orders-3", 7003, "v2", "z2", ("shop.Orders",)),
        inst("cart", "cart-1", 7101, "v1", "z1", ("shop.Cart",)),
    ))


def policies(*specs: s.Spec) -> s.PolicySet:
    kinds = {s.TrafficPolicy: s.TRAFFIC_POLICY, s.AuthorizationPolicy: s.AUTHORIZATION_POLICY,
             s.RateLimitPolicy: s.RATE_LIMIT_POLICY, s.MeshConfig: s.MESH_CONFIG}
    return s.PolicySet(tuple(
        s.Resource(kinds[type(spec)], getattr(spec, "service", s.MESH_CONFIG_NAME), spec)
        for spec in specs))


def parsed_back(resources: Mapping[str, Message], type_url: str) -> dict[str, Message]:
    """Pack each resource as ADS would, parse the bytes back with the type's real class, check
    nothing was lost, and check every nested Any."""
    out: dict[str, Message] = {}
    for name, msg in resources.items():
        packed = any_pb2.Any.FromString(serialize(pack(msg)))
        assert packed.type_url == type_url
        again = MESSAGE_FOR_TYPE[type_url]()
        assert packed.Unpack(again)
        assert again == msg
        assert serialize(again) == serialize(msg)
        assert getattr(again, "name", None) or getattr(again, "cluster_name", None) == name
        for nested in nested_anys(again):
            unpack_any(nested)
        assert pgv_violations(again) == [], name
        out[name] = again
    return out


def unpack_any(value: any_pb2.Any) -> Message:
    type_name = value.type_url.split("/", 1)[1]
    cls = symbol_database.Default().GetSymbol(type_name)
    msg = cls()
    assert value.Unpack(msg), value.type_url
    return msg


def nested_anys(msg: Message) -> Iterator[any_pb2.Any]:
    """Every Any inside msg, at any depth, including those inside other Anys."""
    for field, value in msg.ListFields():
        values = value if field.is_repeated else [value]
        if field.message_type is None:
            continue
        if field.message_type.GetOptions().map_entry:
            values = list(value.values())
            if not values or not isinstance(values[0], Message):
                continue
        for item in values:
            if isinstance(item, any_pb2.Any):
                yield item
                yield from nested_anys(unpack_any(item))
            else:
                yield from nested_anys(item)


_NUMERIC_RULES = ("float", "double", "int32", "int64", "uint32", "uint64", "sint32", "sint64",
                  "fixed32", "fixed64", "sfixed32", "sfixed64")


def pgv_violations(msg: Message, path: str = "") -> list[str]:
    """The protoc-gen-validate rules in the xDS protos that Envoy enforces on load (required
    fields and oneofs, string lengths, item counts, numeric and duration bounds), checked
    through every nested message and Any. (Enums need no check: Python messages only hold
    defined values for the closed enums we set.)"""
    out: list[str] = []
    desc = msg.DESCRIPTOR
    for oneof in desc.oneofs:
        opts = oneof.GetOptions()
        if (opts.HasExtension(validate_pb2.required) and opts.Extensions[validate_pb2.required]
                and msg.WhichOneof(oneof.name) is None):
            out.append(f"{path}.{oneof.name}: one of it is required")
    for field in desc.fields:
        fpath = f"{path}.{field.name}"
        opts = field.GetOptions()
        oneof = field.containing_oneof
        if oneof is not None and msg.WhichOneof(oneof.name) != field.name:
            continue  # only the member that is set is validated
        if opts.HasExtension(validate_pb2.rules):
            out.extend(_field_violations(msg, field, opts.Extensions[validate_pb2.rules], fpath))
        if field.message_type is None:
            continue
        value = getattr(msg, field.name)
        if field.message_type.GetOptions().map_entry:
            items = [v for v in value.values() if isinstance(v, Message)]
        elif field.is_repeated:
            items = list(value)
        else:
            items = [value] if msg.HasField(field.name) else []
        for i, item in enumerate(items):
            where = f"{fpath}[{i}]" if field.is_repeated else fpath
            out.extend(pgv_violations(unpack_any(item) if isinstance(item, any_pb2.Any)
                                      else item, where))
    return out


def _field_violations(msg: Message, field, rules: validate_pb2.FieldRules, path: str
                      ) -> list[str]:
    kind = rules.WhichOneof("type")
    if kind is None:
        return []
    value = getattr(msg, field.name)
    if kind == "message":
        if rules.message.required and not msg.HasField(field.name):
            return [f"{path}: required"]
        return []
    if kind == "repeated":
        n = len(value)
        out = []
        if rules.repeated.HasField("min_items") and n < rules.repeated.min_items:
            out.append(f"{path}: needs at least {rules.repeated.min_items} items")
        if rules.repeated.HasField("max_items") and n > rules.repeated.max_items:
            out.append(f"{path}: at most {rules.repeated.max_items} items")
        if rules.repeated.HasField("items") and field.message_type is None:
            for i, item in enumerate(value):
                out.extend(_value_violations(item, rules.repeated.items, f"{path}[{i}]"))
        return out
    if kind == "map":
        if rules.map.HasField("min_pairs") and len(value) < rules.map.min_pairs:
            return [f"{path}: needs at least {rules.map.min_pairs} entries"]
        return []
    if kind == "duration":
        if not msg.HasField(field.name):
            return [f"{path}: required"] if rules.duration.required else []
        return _value_violations(value, rules, path)
    if kind == "any":
        return [f"{path}: required"] if rules.any.required and not msg.HasField(field.name) \
            else []
    if field.message_type is not None:  # a wrapper (UInt32Value...): checked when set
        assert field.message_type.full_name.startswith("google.protobuf."), (path, kind)
        if not msg.HasField(field.name):
            return []
        value = value.value
    return _value_violations(value, rules, path)


def _value_violations(value, rules: validate_pb2.FieldRules, path: str) -> list[str]:
    kind = rules.WhichOneof("type")
    out = []
    if kind == "string":
        r = rules.string
        if r.HasField("min_len") and len(value) < r.min_len:
            out.append(f"{path}: at least {r.min_len} characters")
        if r.HasField("max_len") and len(value) > r.max_len:
            out.append(f"{path}: at most {r.max_len} characters")
        if r.HasField("min_bytes") and len(value.encode()) < r.min_bytes:
            out.append(f"{path}: at least {r.min_bytes} bytes")
    elif kind in _NUMERIC_RULES or kind == "duration":
        r = getattr(rules, kind)
        if kind == "duration":
            assert isinstance(value, duration_pb2.Duration)
            number = value.ToNanoseconds()

            def bound(name: str) -> float:
                return getattr(r, name).ToNanoseconds()
        else:
            number = value

            def bound(name: str) -> float:
                return getattr(r, name)
        checks = (("gt", lambda b: number > b), ("gte", lambda b: number >= b),
                  ("lt", lambda b: number < b), ("lte", lambda b: number <= b))
        for name, ok in checks:
            if r.HasField(name) and not ok(bound(name)):
                out.append(f"{path}: {number} violates {name} {bound(name)}")
    return out


def all_types(view: RegistryView, pol: s.PolicySet | None, node: NodeInfo,
              trust_bundle: tuple[str, ...] = ()) -> dict[str, dict[str, Message]]:
    return {t: parsed_back(translate(view, pol, node, t, trust_bundle=trust_bundle), t)
            for t in MESSAGE_FOR_TYPE}


def hcm_of(listener: listener_pb2.Listener) -> hcm_pb2.HttpConnectionManager:
    hcm = hcm_pb2.HttpConnectionManager()
    if listener.HasField("api_listener"):
        assert listener.api_listener.api_listener.Unpack(hcm)
    else:  # one chain per transport the mTLS mode accepts, each with the same HCM
        assert listener.filter_chains
        for chain in listener.filter_chains:
            [network_filter] = chain.filters
            assert network_filter.name == "envoy.filters.network.http_connection_manager"
            assert network_filter.typed_config == listener.filter_chains[0].filters[0].typed_config
        assert listener.filter_chains[0].filters[0].typed_config.Unpack(hcm)
    return hcm


# --- the shared builders ----------------------------------------------------------------------


def test_duration_is_exact_for_decimal_seconds():
    assert duration(0.1).seconds == 0 and duration(0.1).nanos == 100_000_000
    assert (duration(2.5).seconds, duration(2.5).nanos) == (2, 500_000_000)
    assert (duration(0.025).seconds, duration(0.025).nanos) == (0, 25_000_000)
    assert (duration(3600).seconds, duration(3600).nanos) == (3600, 0)
    assert duration(0).ToTimedelta().total_seconds() == 0


def test_fractional_percent_uses_the_coarsest_exact_denominator():
    frac = percent_pb2.FractionalPercent
    assert fractional_percent(10) == frac(numerator=10, denominator=frac.HUNDRED)
    assert fractional_percent(0.5) == frac(numerator=50, denominator=frac.TEN_THOUSAND)
    assert fractional_percent(0.125) == frac(numerator=1250, denominator=frac.MILLION)
    assert fractional_percent(100) == frac(numerator=100, denominator=frac.HUNDRED)
    assert fractional_percent(250) == frac(numerator=100, denominator=frac.HUNDRED)  # clamped
    assert fractional_percent(-1) == frac(numerator=0, denominator=frac.HUNDRED)


def test_version_changes_with_content_and_names_but_not_with_order():
    view = shop_view()
    clusters = translate(view, None, SIDECAR, CLUSTER_TYPE)
    reordered = dict(reversed(list(clusters.items())))
    assert version_of(clusters) == version_of(reordered)
    fewer = dict(list(clusters.items())[1:])
    assert version_of(fewer) != version_of(clusters)
    renamed = {f"x{k}": v for k, v in clusters.items()}
    assert version_of(renamed) != version_of(clusters)
    assert version_of({}) == version_of({})


def test_pack_is_byte_identical_for_equal_messages_with_maps():
    # typed_per_filter_config and RBAC policies are maps: deterministic packing must not depend
    # on insertion order.
    a, b = route_pb2.RouteConfiguration(name="r"), route_pb2.RouteConfiguration(name="r")
    route_a = a.virtual_hosts.add(name="v").routes.add(name="x")
    route_b = b.virtual_hosts.add(name="v").routes.add(name="x")
    keys = [f"k{i}" for i in range(20)]
    for key in keys:
        route_a.typed_per_filter_config[key].CopyFrom(pack(route_pb2.RouteConfiguration(name=key)))
    for key in reversed(keys):
        route_b.typed_per_filter_config[key].CopyFrom(pack(route_pb2.RouteConfiguration(name=key)))
    assert a == b
    assert serialize(a) == serialize(b)
    assert serialize(pack(a)) == serialize(pack(b))
    assert version_of({"r": a}) == version_of({"r": b})


def test_parsed_back_checks_nested_anys():
    listeners = translate(shop_view(), None, SIDECAR, LISTENER_TYPE)
    found = [a.type_url for a in nested_anys(listeners["outbound|cart"])]
    assert ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
            "HttpConnectionManager") in found
    assert "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router" in found
    assert parsed_back(listeners, LISTENER_TYPE).keys() == listeners.keys()


def test_pgv_checker_finds_what_envoy_would_reject():
    from envoy.extensions.filters.http.fault.v3 import fault_pb2

    bad = fault_pb2.HTTPFault()
    bad.delay.fixed_delay.CopyFrom(duration(0))
    bad.delay.percentage.numerator = 1
    assert pgv_violations(bad) == [".delay.fixed_delay: 0 violates gt 0"]
    cluster = cluster_pb2.Cluster()
    assert ".name: at least 1 characters" in pgv_violations(cluster)
    cluster.outlier_detection.max_ejection_percent.value = 101
    assert any("max_ejection_percent" in v for v in pgv_violations(cluster))
    listener = listener_pb2.Listener(name="l")
    chain = listener.filter_chains.add()
    chain.filters.add(name="hcm").typed_config.CopyFrom(pack(hcm_pb2.HttpConnectionManager()))
    assert any("stat_prefix" in v for v in pgv_violations(listener))  # inside an Any
