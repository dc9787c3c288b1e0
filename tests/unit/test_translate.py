"""Translation without policies: node identity, listener shapes for sidecars and proxyless
clients, default routes per gRPC service, clusters, endpoints by zone, names and sharing, and
what our own sidecar's compiler makes of the result."""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2, config_source_pb2, health_check_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from google.protobuf import struct_pb2

from control_plane.registry.model import RegistryView
from control_plane.translate import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    LISTENER_TYPE,
    ROUTE_TYPE,
    TYPE_URLS,
    NodeInfo,
    node_info,
    serialize,
    share_key,
    snapshot,
    translate,
)
from sidecar.router import Router
from sidecar.static_config import static_cluster
from sidecar.xds_translate import compile_snapshot
from tests.unit.test_translate_support import (
    PROXYLESS,
    SIDECAR,
    all_types,
    hcm_of,
    inst,
    parsed_back,
    shop_view,
    unpack_any,
)

ROUTER_URL = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
FAULT_URL = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"


def _node(metadata: dict, node_id: str = "", cluster: str = "", user_agent: str = ""
          ) -> base_pb2.Node:
    node = base_pb2.Node(id=node_id, cluster=cluster, user_agent_name=user_agent)
    node.metadata.update(metadata)
    return node


# --- node identity ----------------------------------------------------------------------------


def test_sidecar_node_metadata_is_read():
    info = node_info(_node({"service": "cart", "instance_id": "cart-1",
                            "inbound_address": "10.0.0.5:15006", "version": "v2", "zone": "z1",
                            "grpc_services": ["shop.Cart", "shop.Admin"], "mesh_sidecar": True},
                           node_id="cart~cart-1", cluster="cart"))
    assert info == NodeInfo(node_id="cart~cart-1", sidecar=True, service="cart",
                            instance_id="cart-1", inbound_address="10.0.0.5:15006",
                            version="v2", zone="z1", grpc_services=("shop.Admin", "shop.Cart"))


def test_node_without_mesh_sidecar_is_proxyless_and_id_fills_gaps():
    plain = node_info(_node({}, node_id="client-7"))
    assert not plain.sidecar and plain.service == "" and plain.instance_id == ""
    from_id = node_info(_node({"mesh_sidecar": "true"}, node_id="cart~cart-9"))
    assert from_id.sidecar and from_id.service == "cart" and from_id.instance_id == "cart-9"
    off = node_info(_node({"mesh_sidecar": False, "service": "cart"}, node_id="x"))
    assert not off.sidecar


def test_malformed_metadata_is_empty_not_an_error():
    info = node_info(_node({"service": 3, "zone": {"a": 1}, "grpc_services": 5,
                            "mesh_sidecar": [1]}, node_id="n", cluster="c"))
    assert info.service == "3" and info.zone == "" and info.grpc_services == ()
    assert not info.sidecar
    zone_from_locality = _node({}, node_id="n")
    zone_from_locality.locality.zone = "z9"
    assert node_info(zone_from_locality).zone == "z9"
    assert node_info(_node({"grpc_services": "a.B, c.D,"})).grpc_services == ("a.B", "c.D")


def test_grpcio_is_recognised_by_its_user_agent():
    assert node_info(_node({}, user_agent="gRPC C-core linux Python")).grpcio
    assert not node_info(_node({}, user_agent="gRPC Go")).grpcio
    assert not node_info(_node({}, user_agent="envoy")).grpcio


# --- sidecar listeners ------------------------------------------------------------------------


def test_sidecar_wildcard_lds_gives_outbound_and_inbound_of_its_service():
    listeners = parsed_back(translate(shop_view(), None, SIDECAR, LISTENER_TYPE), LISTENER_TYPE)
    assert list(listeners) == ["inbound|cart", "outbound|cart"]
    outbound, inbound = listeners["outbound|cart"], listeners["inbound|cart"]
    assert outbound.traffic_direction == base_pb2.OUTBOUND
    assert inbound.traffic_direction == base_pb2.INBOUND
    assert not outbound.HasField("address") and not inbound.HasField("address")

    out_hcm = hcm_of(outbound)
    assert out_hcm.rds.route_config_name == "outbound|cart"
    assert out_hcm.rds.config_source.HasField("ads")
    assert out_hcm.rds.config_source.resource_api_version == config_source_pb2.V3
    assert [f.name for f in out_hcm.http_filters] == ["envoy.filters.http.fault",
                                                      "envoy.filters.http.router"]
    assert out_hcm.http_filters[-1].typed_config.type_url == ROUTER_URL
    assert out_hcm.stat_prefix == "outbound|cart"

    in_hcm = hcm_of(inbound)
    assert not in_hcm.HasField("rds")
    [vhost] = in_hcm.route_config.virtual_hosts
    [route] = vhost.routes
    assert route.match.prefix == "" and route.route.cluster == "inbound|app"
    assert route.route.HasField("timeout")
    assert route.route.timeout.ToTimedelta().total_seconds() == 0
    assert [f.name for f in in_hcm.http_filters] == ["envoy.filters.http.router"]


def test_sidecar_named_lds_and_unknown_names():
    got = translate(shop_view(), None, SIDECAR, LISTENER_TYPE, ["outbound|cart", "nope"])
    assert list(got) == ["outbound|cart"]
    assert translate(shop_view(), None, SIDECAR, LISTENER_TYPE, ["inbound|orders"]) == {}


def test_sidecar_of_a_service_without_instances_still_gets_its_listeners():
    node = NodeInfo("new~1", sidecar=True, service="new")
    assert list(translate(RegistryView(), None, node, LISTENER_TYPE)) == ["inbound|new",
                                                                          "outbound|new"]


# --- outbound routes --------------------------------------------------------------------------


def test_outbound_route_config_has_a_vhost_per_destination_and_a_route_per_grpc_service():
    view = RegistryView((
        inst("orders", "o-1", 7001, grpc=("shop.Orders", "shop.OrdersAdmin")),
        inst("orders", "o-2", 7002, grpc=("shop.Orders",), healthy=False),
        inst("cart", "c-1", 7101, grpc=("shop.Cart",)),
        inst("legacy", "l-1", 7201),  # declares no gRPC service: nothing routes to it
    ))
    [(name, config)] = parsed_back(translate(view, None, SIDECAR, ROUTE_TYPE),
                                   ROUTE_TYPE).items()
    assert name == config.name == "outbound|cart"
    assert [(v.name, list(v.domains)) for v in config.virtual_hosts] == [
        ("cart", ["cart"]), ("legacy", ["legacy"]), ("orders", ["orders"])]
    orders = config.virtual_hosts[2]
    assert [(r.match.prefix, r.route.cluster) for r in orders.routes] == [
        ("/shop.Orders/", "orders"), ("/shop.OrdersAdmin/", "orders")]
    assert not config.virtual_hosts[1].routes
    for route in orders.routes:
        assert route.route.HasField("timeout")  # 0s: no Envoy-default 15 s cut-off
        assert route.route.timeout.ToTimedelta().total_seconds() == 0
        assert not route.route.HasField("retry_policy")
        assert not route.route.HasField("max_stream_duration")


def test_route_config_for_another_service_is_not_served_to_a_sidecar():
    assert translate(shop_view(), None, SIDECAR, ROUTE_TYPE, ["outbound|orders"]) == {}
    assert list(translate(shop_view(), None, SIDECAR, ROUTE_TYPE, ["outbound|cart"])) == [
        "outbound|cart"]


# --- clusters and endpoints -------------------------------------------------------------------


def test_a_cluster_per_service_with_eds_over_ads():
    clusters = parsed_back(translate(shop_view(), None, SIDECAR, CLUSTER_TYPE), CLUSTER_TYPE)
    assert list(clusters) == ["cart", "orders"]
    for name, cluster in clusters.items():
        assert cluster.type == cluster_pb2.Cluster.EDS
        assert cluster.eds_cluster_config.service_name == name
        assert cluster.eds_cluster_config.eds_config.HasField("ads")
        assert cluster.lb_policy == cluster_pb2.Cluster.ROUND_ROBIN
        assert not cluster.HasField("circuit_breakers")
        assert not cluster.HasField("outlier_detection")
        options = unpack_any(cluster.typed_extension_protocol_options[
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"])
        assert options.explicit_http_config.HasField("http2_protocol_options")


def test_endpoints_grouped_by_zone_with_weights_and_only_healthy():
    view = RegistryView((
        inst("orders", "o-1", 7001, zone="z1", address="10.0.0.1"),
        inst("orders", "o-2", 7002, zone="z2", address="10.0.0.2"),
        inst("orders", "o-3", 7003, zone="z2", address="10.0.0.3"),
        inst("orders", "o-4", 7004, zone="z1", address="10.0.0.4", healthy=False),
        inst("orders", "o-5", 7005, zone="", address="10.0.0.5"),
    ))
    [(name, cla)] = parsed_back(translate(view, None, SIDECAR, ENDPOINT_TYPE),
                                ENDPOINT_TYPE).items()
    assert name == cla.cluster_name == "orders"
    got = [(loc.locality.zone, loc.load_balancing_weight.value,
            [(e.endpoint.address.socket_address.address,
              e.endpoint.address.socket_address.port_value, e.endpoint.hostname)
             for e in loc.lb_endpoints])
           for loc in cla.endpoints]
    assert got == [("", 1, [("10.0.0.5", 7005, "o-5")]),
                   ("z1", 1, [("10.0.0.1", 7001, "o-1")]),
                   ("z2", 2, [("10.0.0.2", 7002, "o-2"), ("10.0.0.3", 7003, "o-3")])]
    for loc in cla.endpoints:
        assert loc.load_balancing_weight.value > 0  # gRPC ignores localities without one
        for e in loc.lb_endpoints:
            assert e.health_status == health_check_pb2.HEALTHY


def test_duplicate_and_invalid_addresses_are_left_out():
    view = RegistryView((
        inst("orders", "o-1", 7001, address="10.0.0.1"),
        inst("orders", "o-1-again", 7001, address="10.0.0.1"),  # same sidecar twice
        inst("orders", "o-bad-port", 0, address="10.0.0.2"),
        inst("orders", "o-no-address", 7003, address=""),
    ))
    cla = translate(view, None, SIDECAR, ENDPOINT_TYPE)["orders"]
    endpoints = [e for loc in cla.endpoints for e in loc.lb_endpoints]
    assert [e.endpoint.hostname for e in endpoints] == ["o-1"]


def test_service_whose_instances_are_all_unhealthy_has_an_empty_assignment():
    view = RegistryView((inst("orders", "o-1", 7001, healthy=False),))
    cla = translate(view, None, SIDECAR, ENDPOINT_TYPE)["orders"]
    assert cla.cluster_name == "orders" and not cla.endpoints
    assert list(translate(view, None, SIDECAR, CLUSTER_TYPE)) == ["orders"]


def test_empty_registry_gives_empty_sets_not_errors():
    empty = RegistryView()
    for node in (SIDECAR, PROXYLESS):
        assert translate(empty, None, node, CLUSTER_TYPE) == {}
        assert translate(empty, None, node, ENDPOINT_TYPE) == {}
    assert translate(empty, None, PROXYLESS, LISTENER_TYPE, ["orders"]) == {}
    [config] = translate(empty, None, SIDECAR, ROUTE_TYPE).values()
    assert not config.virtual_hosts


def test_named_cds_and_eds_requests():
    view = shop_view()
    assert list(translate(view, None, PROXYLESS, CLUSTER_TYPE, ["orders", "ghost"])) == ["orders"]
    assert list(translate(view, None, PROXYLESS, ENDPOINT_TYPE, ["cart"])) == ["cart"]
    assert translate(view, None, PROXYLESS, "type.googleapis.com/unknown.Type") == {}


# --- proxyless clients ------------------------------------------------------------------------


def test_proxyless_api_listener_shape():
    listeners = parsed_back(translate(shop_view(), None, PROXYLESS, LISTENER_TYPE, ["orders"]),
                            LISTENER_TYPE)
    listener = listeners["orders"]
    assert listener.HasField("api_listener") and not listener.filter_chains
    hcm = hcm_of(listener)
    assert hcm.rds.route_config_name == "orders"
    assert hcm.rds.config_source.HasField("ads")
    assert [f.typed_config.type_url for f in hcm.http_filters] == [FAULT_URL, ROUTER_URL]
    assert len({f.name for f in hcm.http_filters}) == len(hcm.http_filters)  # gRPC requires it
    assert unpack_any(hcm.http_filters[-1].typed_config) == router_pb2.Router()


def test_proxyless_route_config_sends_everything_to_the_service():
    routes = parsed_back(translate(shop_view(), None, PROXYLESS, ROUTE_TYPE, ["orders"]),
                         ROUTE_TYPE)
    [vhost] = routes["orders"].virtual_hosts
    assert list(vhost.domains) == ["orders"]
    [route] = vhost.routes
    # its virtual host is the service's own, so even services the registry does not list
    # (health, reflection) reach it
    assert route.match.WhichOneof("path_specifier") == "prefix" and route.match.prefix == ""
    assert route.route.cluster == "orders"


def test_proxyless_unknown_names_are_absent_and_host_port_targets_work():
    view = shop_view()
    assert translate(view, None, PROXYLESS, LISTENER_TYPE, ["ghost", "ghost:80"]) == {}
    got = translate(view, None, PROXYLESS, LISTENER_TYPE, ["orders:50051", "orders"])
    assert list(got) == ["orders", "orders:50051"]
    assert hcm_of(got["orders:50051"]).rds.route_config_name == "orders:50051"
    routes = translate(view, None, PROXYLESS, ROUTE_TYPE, ["orders:50051"])
    [vhost] = routes["orders:50051"].virtual_hosts
    assert list(vhost.domains) == ["orders:50051", "orders"]
    assert vhost.routes[-1].route.cluster == "orders"


def test_proxyless_wildcard_lds_lists_every_destination():
    assert list(translate(shop_view(), None, PROXYLESS, LISTENER_TYPE)) == ["cart", "orders"]


# --- sharing and determinism -----------------------------------------------------------------


def test_share_key_groups_nodes_that_get_the_same_answer():
    a1 = NodeInfo("cart~1", sidecar=True, service="cart", zone="z1", instance_id="1")
    a2 = NodeInfo("cart~2", sidecar=True, service="cart", zone="z2", instance_id="2")
    b = NodeInfo("orders~1", sidecar=True, service="orders")
    p1, p2 = NodeInfo("p1"), NodeInfo("p2", zone="z3")
    py = NodeInfo("p3", grpcio=True)
    for t in TYPE_URLS:
        assert share_key(a1, t) == share_key(a2, t)
        assert share_key(p1, t) == share_key(p2, t)
    for t in (LISTENER_TYPE, ROUTE_TYPE):
        assert share_key(a1, t) != share_key(b, t) != share_key(p1, t)
    for t in (CLUSTER_TYPE, ENDPOINT_TYPE):  # one answer per variant (sidecar / proxyless)
        assert share_key(a1, t) == share_key(b, t) != share_key(p1, t) == share_key(py, t)
    assert share_key(py, ROUTE_TYPE) != share_key(p1, ROUTE_TYPE)
    assert share_key(py, LISTENER_TYPE) == share_key(p1, LISTENER_TYPE)

    view = shop_view()
    for t in TYPE_URLS:
        for x, y in ((a1, a2), (p1, p2)):
            left, right = translate(view, None, x, t), translate(view, None, y, t)
            assert {k: serialize(v) for k, v in left.items()} == {
                k: serialize(v) for k, v in right.items()}


def test_same_input_gives_byte_identical_output_and_versions():
    first = snapshot(shop_view(), None, SIDECAR)
    rebuilt_view = RegistryView(tuple(reversed(shop_view().instances)))
    second = snapshot(rebuilt_view, None, SIDECAR)
    assert first.versions == second.versions
    for t in TYPE_URLS:
        assert {k: serialize(v) for k, v in first.resources[t].items()} == {
            k: serialize(v) for k, v in second.resources[t].items()}


def test_version_follows_a_registry_change_only_in_the_affected_types():
    before = snapshot(shop_view(), None, SIDECAR)
    moved = RegistryView((*shop_view().instances[:-1],
                          inst("cart", "cart-1", 7999, "v1", "z1", ("shop.Cart",))))
    after = snapshot(moved, None, SIDECAR)
    assert before.versions[ENDPOINT_TYPE] != after.versions[ENDPOINT_TYPE]
    for t in (LISTENER_TYPE, ROUTE_TYPE, CLUSTER_TYPE):
        assert before.versions[t] == after.versions[t]


# --- what our sidecar's compiler accepts today ------------------------------------------------


def test_sidecar_compiler_accepts_the_registry_only_snapshot_and_routes_by_service():
    res = all_types(shop_view(), None, SIDECAR)
    snap = compile_snapshot("v1", res[LISTENER_TYPE].values(), res[ROUTE_TYPE],
                            [*res[CLUSTER_TYPE].values(),
                             static_cluster("inbound|app", ["127.0.0.1:9"])],
                            res[ENDPOINT_TYPE])
    outbound = Router(snap.outbound)
    assert outbound.match("/shop.Orders/Get", ()).clusters[0].name == "orders"
    assert outbound.match("/shop.Cart/Add", ()).clusters[0].name == "cart"
    assert outbound.match("/other.Svc/M", ()) is None
    assert Router(snap.inbound).match("/shop.Cart/Add", ()).clusters[0].name == "inbound|app"
    assert sorted(e.address for e in snap.clusters["orders"].endpoints) == [
        "10.0.0.1:7001", "10.0.0.1:7002", "10.0.0.1:7003"]
    assert {e.zone for e in snap.clusters["orders"].endpoints} == {"z1", "z2"}
    assert snap.outbound.name == "outbound|cart"


def test_struct_metadata_round_trip_of_a_real_node():
    # the shape sidecar/xds_client sends: a Struct built from a dict
    meta = struct_pb2.Struct()
    meta.update({"service": "cart", "mesh_sidecar": True, "grpc_services": ["shop.Cart"]})
    node = base_pb2.Node(id="cart~c1", cluster="cart")
    node.metadata.CopyFrom(meta)
    info = node_info(base_pb2.Node.FromString(node.SerializeToString()))
    assert info.sidecar and info.grpc_services == ("shop.Cart",)


def test_an_empty_subscription_is_not_a_wildcard():
    for t in TYPE_URLS:
        assert translate(shop_view(), None, SIDECAR, t, []) == {}
        assert translate(shop_view(), None, SIDECAR, t, None)


def test_provider_for_the_ads_server_takes_raw_nodes():
    from control_plane.policy.schema import PolicySet
    from control_plane.translate import TranslationProvider

    state = {"view": shop_view(), "policies": PolicySet(revision=7)}
    provider = TranslationProvider(lambda: state["view"], lambda: state["policies"])
    raw = _node({"service": "cart", "mesh_sidecar": True}, node_id="cart~1")
    assert list(provider.resources_for(raw, LISTENER_TYPE, None)) == ["inbound|cart",
                                                                       "outbound|cart"]
    assert list(provider.resources_for(raw, CLUSTER_TYPE, frozenset({"orders"}))) == ["orders"]
    assert provider.share_key(raw, ROUTE_TYPE) == share_key(SIDECAR, ROUTE_TYPE)
    assert provider.revision() == 7
    state["view"] = RegistryView()
    assert provider.resources_for(raw, CLUSTER_TYPE, None) == {}
