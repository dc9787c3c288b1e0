"""mTLS in translation (issue 5): every mesh mode x node variant for EDS, CDS and the inbound
listener; the trust bundle as an input; share keys; and the registry side (node metadata,
Consul Meta, the saved registry file) that tells translation which instances serve mTLS."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2
from google.protobuf import json_format

from control_plane.policy import schema as s
from control_plane.registry import persist
from control_plane.registry.consul_mapping import (
    instance_from_health_entry,
    register_kwargs,
    registration_meta,
)
from control_plane.registry.embedded import EmbeddedRegistry, NodeMetadataError, instance_from_node
from control_plane.registry.model import Instance, RegistryView
from control_plane.translate import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    LISTENER_TYPE,
    ROUTE_TYPE,
    TYPE_URLS,
    NodeInfo,
    TranslationProvider,
    node_info,
    serialize,
    share_key,
    snapshot,
    translate,
)
from sidecar.static_config import static_cluster
from sidecar.xds_translate import compile_snapshot
from tests.pki import TestCA
from tests.unit.test_translate_support import all_types as _all_types
from tests.unit.test_translate_support import hcm_of, policies

TD = "shop.example"
# real roots: the sidecar's compiler parses them (a bundle of non-certificates is NACKed)
ROOT_A = TestCA("root a").pem.decode()
ROOT_B = TestCA("root b").pem.decode().rstrip("\n")  # no final newline
BUNDLE = (ROOT_A, ROOT_B)
BUNDLE_BYTES = (ROOT_A + ROOT_B + "\n").encode()
MODES = ("STRICT", "PERMISSIVE", "DISABLE")

SIDECAR = NodeInfo("cart~cart-1", sidecar=True, service="cart", instance_id="cart-1")
PROXYLESS = NodeInfo("client-1", grpcio=True)
PROXYLESS_MTLS = NodeInfo("client-2", mtls=True)
VARIANTS = {"sidecar": SIDECAR, "proxyless": PROXYLESS, "proxyless-mtls": PROXYLESS_MTLS}
GRPCIO_AGENT = "gRPC C-core linux Python"


def all_types(v: RegistryView, pol: s.PolicySet, node: NodeInfo) -> dict:
    """Every resource with the two-root bundle, checked as a real consumer would."""
    return _all_types(v, pol, node, BUNDLE)


def view() -> RegistryView:
    """orders: an mtls instance with a plaintext port, a plaintext-only one (no identity), an
    mtls one that announced no plaintext port; cart: plaintext only."""
    return RegistryView((
        Instance("orders", "orders-1", "10.0.0.1", 7001, version="v1", mtls=True,
                 plaintext_port=7002),
        Instance("orders", "orders-2", "10.0.0.2", 7011, version="v1"),
        Instance("orders", "orders-3", "10.0.0.3", 7021, version="v2", mtls=True),
        Instance("cart", "cart-1", "10.0.0.4", 7101),
    ))


def mesh(mode: str | None, *specs: s.Spec) -> s.PolicySet:
    config = () if mode is None else (s.MeshConfig(mtls_mode=mode, trust_domain=TD),)
    return policies(*config, *specs)


def with_subsets(mode: str) -> s.PolicySet:
    return mesh(mode, s.TrafficPolicy("orders", subsets=(
        s.Subset("v1", (("version", "v1"),)), s.Subset("v2", (("version", "v2"),)))))


def endpoints(cla: endpoint_pb2.ClusterLoadAssignment) -> dict[str, tuple[int, dict]]:
    """hostname -> (port, filter_metadata as plain dicts)."""
    return {e.endpoint.hostname: (e.endpoint.address.socket_address.port_value,
                                  {k: json_format.MessageToDict(v)
                                   for k, v in e.metadata.filter_metadata.items()})
            for loc in cla.endpoints for e in loc.lb_endpoints}


TLS = {"envoy.transport_socket_match": {"tlsMode": "mtls"}}
PLAIN_7002 = {"pymesh": {"plaintext_port": 7002}}


# --- EDS ---------------------------------------------------------------------------------------


EXPECTED_EDS = {
    # (mode, variant-class) -> {instance: (port, metadata)}; in STRICT orders-2, announced by a
    # sidecar without mTLS, is left out: it would refuse every call, and it is unverified
    ("STRICT", "mtls-aware"): {"orders-1": (7001, TLS), "orders-3": (7021, TLS)},
    ("PERMISSIVE", "mtls-aware"): {"orders-1": (7001, TLS | PLAIN_7002), "orders-2": (7011, {}),
                                   "orders-3": (7021, TLS)},
    ("DISABLE", "mtls-aware"): {"orders-1": (7002, {}), "orders-2": (7011, {}),
                                "orders-3": (7021, {})},
    ("STRICT", "proxyless"): {"orders-1": (7001, {}), "orders-3": (7021, {})},
    ("PERMISSIVE", "proxyless"): {"orders-1": (7002, {}), "orders-2": (7011, {}),
                                  "orders-3": (7021, {})},
    ("DISABLE", "proxyless"): {"orders-1": (7002, {}), "orders-2": (7011, {}),
                               "orders-3": (7021, {})},
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_eds_port_and_metadata_by_mode_and_variant(mode: str, variant: str) -> None:
    res = all_types(view(), with_subsets(mode), VARIANTS[variant])[ENDPOINT_TYPE]
    expected = EXPECTED_EDS[(mode, "proxyless" if variant == "proxyless" else "mtls-aware")]
    assert endpoints(res["orders"]) == expected
    assert endpoints(res["orders|v1"]) == {k: v for k, v in expected.items() if k != "orders-3"}
    assert endpoints(res["orders|v2"]) == {"orders-3": expected["orders-3"]}
    # cart-1: a sidecar without mTLS, left out in STRICT
    assert endpoints(res["cart"]) == ({} if mode == "STRICT" else {"cart-1": (7101, {})})


def test_strict_keeps_instances_reached_without_a_sidecar() -> None:
    direct = RegistryView((Instance("cart", "cart-9", "10.0.0.9", 7109, sidecar=False),))
    for variant in VARIANTS.values():
        cla = all_types(direct, mesh("STRICT"), variant)[ENDPOINT_TYPE]["cart"]
        assert endpoints(cla) == {"cart-9": (7109, {})}


def test_the_plaintext_port_in_metadata_is_a_number() -> None:
    cla = translate(view(), mesh("PERMISSIVE"), SIDECAR, ENDPOINT_TYPE, ["orders"])["orders"]
    [lb] = [e for loc in cla.endpoints for e in loc.lb_endpoints
            if e.endpoint.hostname == "orders-1"]
    value = lb.metadata.filter_metadata["pymesh"].fields["plaintext_port"]
    assert value.WhichOneof("kind") == "number_value" and value.number_value == 7002


def test_two_instances_ending_on_one_address_are_kept_once() -> None:
    # DISABLE sends orders-1 to its plaintext port; an old registration there is a duplicate.
    dup = RegistryView((*view().instances,
                        Instance("orders", "orders-0", "10.0.0.1", 7002)))
    cla = translate(dup, mesh("DISABLE"), SIDECAR, ENDPOINT_TYPE, ["orders"])["orders"]
    socks = [e.endpoint.address.socket_address for loc in cla.endpoints for e in loc.lb_endpoints]
    ports = [(sock.address, sock.port_value) for sock in socks]
    assert ports.count(("10.0.0.1", 7002)) == 1 and len(ports) == 3


# --- CDS ---------------------------------------------------------------------------------------


def upstream_context(socket: base_pb2.TransportSocket) -> tls_pb2.UpstreamTlsContext:
    assert socket.name == "envoy.transport_sockets.tls"
    context = tls_pb2.UpstreamTlsContext()
    assert socket.typed_config.Unpack(context)
    return context


@pytest.mark.parametrize("mode", ["STRICT", "PERMISSIVE"])
def test_sidecar_clusters_get_mtls_and_plaintext_socket_matches(mode: str) -> None:
    found = all_types(view(), with_subsets(mode), SIDECAR)[CLUSTER_TYPE]
    assert sorted(found) == ["cart", "orders", "orders|v1", "orders|v2"]
    for name, cluster in found.items():
        service = name.split("|")[0]  # subset clusters verify their service's identity
        assert isinstance(cluster, cluster_pb2.Cluster)
        mtls, plaintext = cluster.transport_socket_matches
        assert (mtls.name, json_format.MessageToDict(mtls.match)) == ("mtls", {"tlsMode": "mtls"})
        context = upstream_context(mtls.transport_socket)
        assert context.sni == f"{service}.svc.{TD}"
        common = context.common_tls_context
        assert common.tls_certificate_provider_instance.instance_name == "mesh-identity"
        assert common.validation_context.trusted_ca.inline_bytes == BUNDLE_BYTES
        [san] = common.validation_context.match_typed_subject_alt_names
        assert san.san_type == common_pb2.SubjectAltNameMatcher.URI
        assert san.matcher.exact == f"spiffe://{TD}/service/{service}"
        assert not common.validation_context.match_subject_alt_names
        assert (plaintext.name, json_format.MessageToDict(plaintext.match)) == ("plaintext", {})
        assert plaintext.HasField("match")
        assert plaintext.transport_socket.name == "envoy.transport_sockets.raw_buffer"
        assert not plaintext.transport_socket.HasField("typed_config")
        assert not cluster.HasField("transport_socket")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_disable_means_no_tls_in_any_cluster(variant: str) -> None:
    found = all_types(view(), with_subsets("DISABLE"), VARIANTS[variant])[CLUSTER_TYPE]
    no_tls = all_types(RegistryView(), with_subsets("DISABLE"), VARIANTS[variant])[CLUSTER_TYPE]
    for cluster in [*found.values(), *no_tls.values()]:
        assert not cluster.transport_socket_matches and not cluster.HasField("transport_socket")


@pytest.mark.parametrize("mode", MODES)
def test_proxyless_clusters_without_mtls_never_get_tls(mode: str) -> None:
    found = all_types(view(), with_subsets(mode), PROXYLESS)[CLUSTER_TYPE]
    for cluster in found.values():
        assert not cluster.transport_socket_matches and not cluster.HasField("transport_socket")


@pytest.mark.parametrize("mode", ["STRICT", "PERMISSIVE"])
def test_proxyless_mtls_clusters_of_a_service_with_mtls_instances_use_the_provider(
        mode: str) -> None:
    found = all_types(view(), with_subsets(mode), PROXYLESS_MTLS)[CLUSTER_TYPE]
    for name in ("orders", "orders|v1", "orders|v2"):
        cluster = found[name]
        assert not cluster.transport_socket_matches
        # What tests/component/test_ca_proxyless.py's tls_cluster gives grpcio (gRFC A29).
        expected = tls_pb2.UpstreamTlsContext()
        common = expected.common_tls_context
        common.tls_certificate_provider_instance.instance_name = "mesh-identity"
        common.validation_context.ca_certificate_provider_instance.instance_name = \
            "mesh-identity"
        common.validation_context.match_subject_alt_names.add().exact = \
            f"spiffe://{TD}/service/orders"
        assert upstream_context(cluster.transport_socket) == expected
    cart = found["cart"]  # no instance of cart serves mTLS
    assert not cart.HasField("transport_socket") and not cart.transport_socket_matches


def test_without_mtls_instances_proxyless_mtls_clusters_match_plain_proxyless_ones() -> None:
    plain = RegistryView(tuple(i for i in view().instances if not i.mtls))
    a = translate(plain, mesh("STRICT"), PROXYLESS_MTLS, CLUSTER_TYPE)
    b = translate(plain, mesh("STRICT"), PROXYLESS, CLUSTER_TYPE)
    assert {k: serialize(v) for k, v in a.items()} == {k: serialize(v) for k, v in b.items()}


# --- LDS ---------------------------------------------------------------------------------------


def downstream_context(chain: listener_pb2.FilterChain) -> tls_pb2.DownstreamTlsContext:
    assert chain.transport_socket.name == "envoy.transport_sockets.tls"
    context = tls_pb2.DownstreamTlsContext()
    assert chain.transport_socket.typed_config.Unpack(context)
    return context


AUTHZ = s.AuthorizationPolicy("cart", (s.AuthorizationRule("ALLOW", (s.Source(service="orders"),),
                                                           ()),))


@pytest.mark.parametrize(("mode", "protocols"), [("STRICT", ["tls"]),
                                                 ("PERMISSIVE", ["tls", "raw_buffer"]),
                                                 ("DISABLE", ["raw_buffer"])])
def test_inbound_filter_chains_by_mode(mode: str, protocols: list[str]) -> None:
    found = all_types(view(), mesh(mode, AUTHZ), SIDECAR)[LISTENER_TYPE]
    inbound = found["inbound|cart"]
    assert isinstance(inbound, listener_pb2.Listener)
    assert [c.filter_chain_match.transport_protocol for c in inbound.filter_chains] == protocols
    for chain in inbound.filter_chains:
        if chain.filter_chain_match.transport_protocol == "tls":
            context = downstream_context(chain)
            assert context.require_client_certificate.value is True
            common = context.common_tls_context
            assert common.tls_certificate_provider_instance.instance_name == "mesh-identity"
            assert common.validation_context.trusted_ca.inline_bytes == BUNDLE_BYTES
        else:
            assert not chain.HasField("transport_socket")
    # Every chain has the same HCM, with the policy's RBAC, as before issue 5.
    hcm = hcm_of(inbound)
    assert [f.name for f in hcm.http_filters] == ["envoy.filters.http.rbac.allow",
                                                  "envoy.filters.http.router"]
    outbound = found["outbound|cart"]
    [chain] = outbound.filter_chains
    assert not chain.HasField("filter_chain_match") and not chain.HasField("transport_socket")


def test_only_the_inbound_chains_differ_between_modes() -> None:
    listeners = {m: translate(view(), mesh(m, AUTHZ), SIDECAR, LISTENER_TYPE, trust_bundle=BUNDLE)
                 for m in MODES}
    hcms = {m: hcm_of(found["inbound|cart"]) for m, found in listeners.items()}
    assert hcms["STRICT"] == hcms["PERMISSIVE"] == hcms["DISABLE"]
    outbound = {serialize(found["outbound|cart"]) for found in listeners.values()}
    assert len(outbound) == 1


def test_an_empty_bundle_leaves_trusted_ca_out() -> None:
    listener = translate(view(), mesh("PERMISSIVE"), SIDECAR, LISTENER_TYPE,
                         ["inbound|cart"])["inbound|cart"]
    assert not downstream_context(listener.filter_chains[0]).common_tls_context \
        .validation_context.HasField("trusted_ca")
    cluster = translate(view(), mesh("PERMISSIVE"), SIDECAR, CLUSTER_TYPE, ["orders"])["orders"]
    validation = upstream_context(cluster.transport_socket_matches[0].transport_socket) \
        .common_tls_context.validation_context
    assert not validation.HasField("trusted_ca")
    assert validation.match_typed_subject_alt_names  # the identity check stays


# --- the bundle, sharing, determinism ----------------------------------------------------------


def test_the_bundle_changes_cds_and_lds_only() -> None:
    node = SIDECAR
    before = snapshot(view(), mesh("PERMISSIVE"), node, trust_bundle=(ROOT_A,))
    after = snapshot(view(), mesh("PERMISSIVE"), node, trust_bundle=BUNDLE)
    again = snapshot(view(), mesh("PERMISSIVE"), node, trust_bundle=BUNDLE)
    assert after.versions == again.versions
    changed = {t for t in TYPE_URLS if before.versions[t] != after.versions[t]}
    assert changed == {CLUSTER_TYPE, LISTENER_TYPE}


def test_share_keys_give_each_variant_its_own_cds_and_eds() -> None:
    other_sidecar = NodeInfo("orders~orders-1", sidecar=True, service="orders", mtls=True)
    for t in (CLUSTER_TYPE, ENDPOINT_TYPE):
        keys = {v: share_key(n, t) for v, n in VARIANTS.items()}
        assert len(set(keys.values())) == 3
        assert all(key.endswith(f"|{v}") for v, key in keys.items())
        assert share_key(other_sidecar, t) == keys["sidecar"]  # mtls does not split sidecars
        assert share_key(NodeInfo("x"), t) == keys["proxyless"]
    # LDS/RDS of proxyless nodes do not depend on mtls.
    for t in (LISTENER_TYPE, ROUTE_TYPE):
        assert share_key(NodeInfo("x", mtls=True), t) == share_key(NodeInfo("x"), t)


@pytest.mark.parametrize(("value", "mtls"), [(True, True), ("true", True), ("TRUE", True),
                                             (False, False), ("yes", False), (1, False)])
def test_node_info_reads_the_mtls_flag(value: object, mtls: bool) -> None:
    node = base_pb2.Node(id="client-1")
    node.metadata.update({"mtls": value})
    assert node_info(node).mtls is mtls
    assert node_info(base_pb2.Node(id="c")).mtls is False


def test_a_grpcio_client_without_mtls_gets_plaintext_ports_by_default() -> None:
    """The default mode (no MeshConfig) is PERMISSIVE: a plain grpcio client keeps working
    against services whose sidecars have identities."""
    node = base_pb2.Node(id="client-9", user_agent_name=GRPCIO_AGENT)
    state = {"bundle": BUNDLE}
    provider = TranslationProvider(view, lambda: s.PolicySet(revision=3),
                                   lambda: state["bundle"])
    cla = provider.resources_for(node, ENDPOINT_TYPE, frozenset({"orders"}))["orders"]
    assert isinstance(cla, endpoint_pb2.ClusterLoadAssignment)
    assert endpoints(cla) == EXPECTED_EDS[("PERMISSIVE", "proxyless")]
    cluster = provider.resources_for(node, CLUSTER_TYPE, frozenset({"orders"}))["orders"]
    assert isinstance(cluster, cluster_pb2.Cluster)
    assert not cluster.HasField("transport_socket") and not cluster.transport_socket_matches
    assert provider.share_key(node, ENDPOINT_TYPE).endswith("|proxyless")


def test_the_provider_reads_the_bundle_on_every_translation() -> None:
    state = {"bundle": (ROOT_A,)}
    provider = TranslationProvider(view, lambda: s.PolicySet(revision=3),
                                   lambda: state["bundle"])
    sidecar = base_pb2.Node(id="cart~cart-1")
    sidecar.metadata.update({"mesh_sidecar": True, "service": "cart"})

    def trusted() -> bytes:
        cluster = provider.resources_for(sidecar, CLUSTER_TYPE, frozenset({"cart"}))["cart"]
        assert isinstance(cluster, cluster_pb2.Cluster)
        return upstream_context(cluster.transport_socket_matches[0].transport_socket) \
            .common_tls_context.validation_context.trusted_ca.inline_bytes

    assert trusted() == ROOT_A.encode()
    state["bundle"] = BUNDLE
    assert trusted() == BUNDLE_BYTES
    assert provider.revision() == 3  # the policy revision meshctl compares resource versions to


@pytest.mark.parametrize("mode", MODES)
def test_the_sidecar_compiler_accepts_every_mode(mode: str) -> None:
    res = all_types(view(), with_subsets(mode), SIDECAR)
    snap = compile_snapshot("v1", res[LISTENER_TYPE].values(), res[ROUTE_TYPE],
                            [*res[CLUSTER_TYPE].values(),
                             static_cluster("inbound|app", ["127.0.0.1:9"])],
                            res[ENDPOINT_TYPE])
    ports = {port for port, _ in EXPECTED_EDS[(mode, "mtls-aware")].values()}
    assert {int(e.address.rsplit(":", 1)[1]) for e in snap.clusters["orders"].endpoints} == ports


# --- registry: node metadata, Consul, the saved file ---------------------------------------------


SIDECAR_META = {"mesh_sidecar": True, "service": "orders", "instance_id": "orders-1",
                "inbound_address": "10.0.0.1:15006"}


def _node(meta: dict) -> base_pb2.Node:
    node = base_pb2.Node(id="orders~orders-1")
    node.metadata.update(meta)
    return node


@pytest.mark.parametrize("flag", [True, "true"])
def test_an_identity_sidecar_announces_mtls_and_its_plaintext_port(flag: object) -> None:
    got = instance_from_node(_node({**SIDECAR_META, "mtls": flag,
                                    "plaintext_address": "10.0.0.1:15007", "team": "a"}))
    assert got == Instance("orders", "orders-1", "10.0.0.1", 15006, meta=(("team", "a"),),
                           sidecar=True, mtls=True, plaintext_port=15007)


def test_a_sidecar_without_identity_is_plaintext() -> None:
    got = instance_from_node(_node(SIDECAR_META))
    assert got is not None and (got.mtls, got.plaintext_port, got.meta) == (False, 0, ())
    ipv6 = instance_from_node(_node({**SIDECAR_META, "inbound_address": "[::1]:15006",
                                     "plaintext_address": "[::1]:15007", "mtls": True}))
    assert ipv6 is not None and (ipv6.address, ipv6.plaintext_port) == ("::1", 15007)


@pytest.mark.parametrize("bad", ["10.0.0.1", "10.0.0.1:0", "10.0.0.1:http", "10.0.0.1:70000",
                                 "0.0.0.0:15007", "10.0.0.2:15007", 15007])
def test_a_bad_plaintext_address_is_refused_naming_the_field(bad: object) -> None:
    with pytest.raises(NodeMetadataError, match=re.escape("metadata.plaintext_address:")):
        instance_from_node(_node({**SIDECAR_META, "mtls": True, "plaintext_address": bad}))


def test_consul_meta_round_trips_mtls_and_the_plaintext_port() -> None:
    inst = Instance("orders", "orders-1", "10.0.0.1", 15006, version="v1", sidecar=True,
                    mtls=True, plaintext_port=15007,
                    meta=(("pymesh-mtls", "false"), ("team", "a")))  # cannot spoof the key
    meta = registration_meta(inst)
    assert meta["pymesh-mtls"] == "true" and meta["pymesh-plaintext-port"] == "15007"
    kw = register_kwargs(inst, ttl=10, deregister_after=None)
    echoed = {"ID": kw["service_id"], "Service": kw["name"], "Address": kw["address"],
              "Port": kw["port"], "Tags": kw["tags"], "Meta": kw["meta"]}
    back = instance_from_health_entry({"Node": {"Address": "10.0.0.9"}, "Service": echoed})
    assert back == Instance("orders", "orders-1", "10.0.0.1", 15006, version="v1",
                            sidecar=True, mtls=True, plaintext_port=15007,
                            meta=(("team", "a"),))
    plain = Instance("pay", "pay-1", "10.0.0.5", 80, sidecar=False)
    assert "pymesh-mtls" not in registration_meta(plain)
    assert "pymesh-plaintext-port" not in registration_meta(plain)


@pytest.mark.parametrize(("meta", "mtls", "plaintext_port"), [
    ({}, False, 0),  # registered directly in Consul: plaintext
    ({"pymesh-mtls": "TRUE", "pymesh-plaintext-port": "81"}, True, 81),
    ({"pymesh-mtls": "1", "pymesh-plaintext-port": "x"}, False, 0),
    ({"pymesh-mtls": "true", "pymesh-plaintext-port": "70000"}, True, 0),
])
def test_consul_meta_is_read_leniently(meta: dict, mtls: bool, plaintext_port: int) -> None:
    got = instance_from_health_entry({"Node": {"Address": "10.0.0.9"}, "Service": {
        "ID": "pay-1", "Service": "pay", "Port": 80, "Meta": meta}})
    assert got is not None
    assert (got.mtls, got.plaintext_port, got.meta) == (mtls, plaintext_port, ())


def test_the_saved_registry_keeps_mtls_and_old_files_still_load(tmp_path: Path) -> None:
    path = str(tmp_path / "registry.json")
    saved = view()
    persist.save(saved, path)
    registry = EmbeddedRegistry(clock=lambda: 0.0)
    assert persist.restore(registry, path) == len(saved.instances)
    assert registry.view().instances == saved.instances

    old = {"instances": [{"service": "cart", "instance_id": "cart-1", "address": "10.0.0.4",
                          "port": 7101, "version": "", "zone": "", "grpc_services": [],
                          "tags": [], "meta": [], "sidecar": True, "healthy": True}]}
    Path(path).write_text(json.dumps(old))
    registry = EmbeddedRegistry(clock=lambda: 0.0)
    assert persist.restore(registry, path) == 1
    [cart] = registry.view().instances
    assert (cart.mtls, cart.plaintext_port) == (False, 0)

    old["instances"][0]["mtls"] = "yes"
    Path(path).write_text(json.dumps(old))
    assert persist.restore(EmbeddedRegistry(clock=lambda: 0.0), path) == 0  # ignored, logged
