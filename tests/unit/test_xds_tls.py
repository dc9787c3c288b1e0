"""The mTLS parts of xDS as the sidecar reads them (sidecar/xds_tls.py), and the contract between
the two sides: what control_plane.translate really emits for each mesh mode, compiled by the
sidecar's compile_snapshot, must give the model the data path dials and admits with
(Endpoint.mtls / plaintext_address, Cluster.tls, Snapshot.inbound_tls, Snapshot.authorizer)."""

from __future__ import annotations

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2
from envoy.type.matcher.v3 import string_pb2

from control_plane.policy import schema as s
from control_plane.registry.model import Instance, RegistryView
from control_plane.translate import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    LISTENER_TYPE,
    ROUTE_TYPE,
    NodeInfo,
    translate,
)
from sidecar.model import Endpoint, InboundTls, MtlsMode, Snapshot, UpstreamTlsSpec
from sidecar.xds_tls import (
    TlsConfigError,
    cluster_tls,
    endpoint_transport,
    inbound_tls,
    same_roots,
    split_bundle,
)
from sidecar.xds_translate import ConfigError, compile_snapshot
from tests.pki import TestCA
from tests.unit.test_translate_support import policies

TLS_SOCKET = "envoy.transport_sockets.tls"
RAW_SOCKET = "envoy.transport_sockets.raw_buffer"
TD = "shop.example"
ROOT_1, ROOT_2 = TestCA("root 1", TD).pem, TestCA("root 2", TD).pem
ROOTS = (ROOT_1, ROOT_2)
ORDERS_ID = f"spiffe://{TD}/service/orders"


# --- building blocks -----------------------------------------------------------------------------


def downstream_socket(require: bool | None = True, bundle: bytes = ROOT_1 + ROOT_2
                      ) -> base_pb2.TransportSocket:
    context = tls_pb2.DownstreamTlsContext()
    if require is not None:
        context.require_client_certificate.value = require
    context.common_tls_context.tls_certificate_provider_instance.instance_name = "mesh-identity"
    if bundle:
        context.common_tls_context.validation_context.trusted_ca.inline_bytes = bundle
    socket = base_pb2.TransportSocket(name=TLS_SOCKET)
    socket.typed_config.Pack(context)
    return socket


def chain(protocol: str = "", socket: base_pb2.TransportSocket | None = None
          ) -> listener_components_pb2.FilterChain:
    out = listener_components_pb2.FilterChain()
    if protocol:
        out.filter_chain_match.transport_protocol = protocol
    if socket is not None:
        out.transport_socket.CopyFrom(socket)
    return out


def listener(*chains: listener_components_pb2.FilterChain) -> listener_pb2.Listener:
    return listener_pb2.Listener(name="inbound|cart", filter_chains=list(chains))


def upstream_context(sni: str = f"orders.svc.{TD}", uris: tuple[str, ...] = (ORDERS_ID,),
                     bundle: bytes = ROOT_1 + ROOT_2) -> tls_pb2.UpstreamTlsContext:
    context = tls_pb2.UpstreamTlsContext(sni=sni)
    common = context.common_tls_context
    common.tls_certificate_provider_instance.instance_name = "mesh-identity"
    if bundle:
        common.validation_context.trusted_ca.inline_bytes = bundle
    for uri in uris:
        common.validation_context.match_typed_subject_alt_names.add(
            san_type=common_pb2.SubjectAltNameMatcher.URI,
            matcher=string_pb2.StringMatcher(exact=uri))
    return context


def tls_match(context: object = None, name: str = TLS_SOCKET, mode: str = "mtls"
              ) -> cluster_pb2.Cluster.TransportSocketMatch:
    match = cluster_pb2.Cluster.TransportSocketMatch(name="mtls")
    match.match.update({"tlsMode": mode})
    match.transport_socket.name = name
    match.transport_socket.typed_config.Pack(context if context is not None
                                             else upstream_context())
    return match


def plaintext_match() -> cluster_pb2.Cluster.TransportSocketMatch:
    match = cluster_pb2.Cluster.TransportSocketMatch(name="plaintext")
    match.match.SetInParent()
    match.transport_socket.name = RAW_SOCKET
    return match


def cluster(*matches: cluster_pb2.Cluster.TransportSocketMatch) -> cluster_pb2.Cluster:
    return cluster_pb2.Cluster(name="orders|v1", transport_socket_matches=list(matches))


# --- inbound listener ----------------------------------------------------------------------------


@pytest.mark.parametrize(("chains", "mode"), [
    ([chain("tls", downstream_socket())], MtlsMode.STRICT),
    ([chain("tls", downstream_socket()), chain("raw_buffer")], MtlsMode.PERMISSIVE),
    ([chain("raw_buffer"), chain("tls", downstream_socket())], MtlsMode.PERMISSIVE),
    ([chain("raw_buffer")], MtlsMode.DISABLE),
], ids=["strict", "permissive", "permissive-plaintext-first", "disable"])
def test_the_inbound_mode_comes_from_the_filter_chains(chains: list, mode: MtlsMode) -> None:
    got = inbound_tls(listener(*chains))
    assert got.mode is mode
    assert got.plaintext_allowed is (mode is not MtlsMode.STRICT)
    assert got.trust_bundle == (() if mode is MtlsMode.DISABLE else ROOTS)


def test_a_legacy_single_chain_is_plaintext_only() -> None:
    assert inbound_tls(listener(chain())) == InboundTls(MtlsMode.DISABLE, ())
    raw = base_pb2.TransportSocket(name=RAW_SOCKET)
    assert inbound_tls(listener(chain("", raw))) == InboundTls(MtlsMode.DISABLE, ())


def test_the_bundle_may_come_as_an_inline_string() -> None:
    socket = downstream_socket(bundle=b"")
    context = tls_pb2.DownstreamTlsContext()
    socket.typed_config.Unpack(context)
    context.common_tls_context.validation_context.trusted_ca.inline_string = \
        (ROOT_1 + ROOT_2).decode()
    socket.typed_config.Pack(context)
    assert inbound_tls(listener(chain("tls", socket))).trust_bundle == ROOTS


def test_a_tls_chain_without_a_validation_context_has_no_roots() -> None:
    got = inbound_tls(listener(chain("tls", downstream_socket(bundle=b""))))
    assert got == InboundTls(MtlsMode.STRICT, (), explicit=True)


def _refused(chains: list[listener_components_pb2.FilterChain]) -> str:
    with pytest.raises(TlsConfigError) as info:
        inbound_tls(listener(*chains))
    return str(info.value)


def test_a_tls_chain_without_a_downstream_tls_context_is_refused() -> None:
    assert _refused([chain("tls")]) == ("listener 'inbound|cart'.filter_chains[0]: "
                                        "transport_protocol 'tls' needs a "
                                        "envoy.transport_sockets.tls transport_socket")
    raw = base_pb2.TransportSocket(name=RAW_SOCKET)
    assert "needs a envoy.transport_sockets.tls" in _refused([chain("raw_buffer"),
                                                               chain("tls", raw)])
    wrong = base_pb2.TransportSocket(name=TLS_SOCKET)
    wrong.typed_config.Pack(upstream_context())  # the other side's context
    assert _refused([chain("tls", wrong)]) == (
        "listener 'inbound|cart'.filter_chains[0].transport_socket: expected "
        "DownstreamTlsContext")


@pytest.mark.parametrize("require", [False, None], ids=["false", "unset"])
def test_tls_without_a_required_client_certificate_is_refused(require: bool | None) -> None:
    message = _refused([chain("tls", downstream_socket(require=require))])
    assert message == ("listener 'inbound|cart'.filter_chains[0].transport_socket: "
                       "require_client_certificate must be true (the mesh only does mutual TLS)")


def test_an_unknown_transport_protocol_is_refused() -> None:
    message = _refused([chain("tls", downstream_socket()), chain("quic")])
    assert message == ("listener 'inbound|cart'.filter_chains[1]: transport_protocol 'quic' "
                       "with transport socket '' is not supported")
    alts = base_pb2.TransportSocket(name="envoy.transport_sockets.alts")
    assert "transport socket 'envoy.transport_sockets.alts' is not supported" in \
        _refused([chain("", alts)])


def test_compile_snapshot_names_the_listener_of_a_refused_chain() -> None:
    res = _translated("STRICT")
    bad = listener_pb2.Listener()
    bad.CopyFrom(res[LISTENER_TYPE]["inbound|cart"])
    context = tls_pb2.DownstreamTlsContext()
    bad.filter_chains[0].transport_socket.typed_config.Unpack(context)
    context.require_client_certificate.value = False
    bad.filter_chains[0].transport_socket.typed_config.Pack(context)
    with pytest.raises(ConfigError, match=r"listener 'inbound\|cart'.filter_chains\[0\]"
                                          r".transport_socket: require_client_certificate"):
        compile_snapshot("v2", [res[LISTENER_TYPE]["outbound|cart"], bad], res[ROUTE_TYPE],
                         res[CLUSTER_TYPE].values(), res[ENDPOINT_TYPE], require_clusters=False)


# --- clusters ------------------------------------------------------------------------------------


def test_the_mtls_match_gives_server_name_identity_and_roots() -> None:
    expected = UpstreamTlsSpec(f"orders.svc.{TD}", ORDERS_ID, ROOTS)
    assert cluster_tls(cluster(tls_match(), plaintext_match())) == expected
    assert cluster_tls(cluster(plaintext_match(), tls_match())) == expected  # order irrelevant


def test_a_legacy_spiffe_subject_alt_name_matcher_counts_too() -> None:
    context = upstream_context(uris=())
    context.common_tls_context.validation_context.match_subject_alt_names.add(exact=ORDERS_ID)
    assert cluster_tls(cluster(tls_match(context))) == UpstreamTlsSpec(
        f"orders.svc.{TD}", ORDERS_ID, ROOTS)


def test_no_mtls_match_means_plaintext() -> None:
    assert cluster_tls(cluster()) is None
    assert cluster_tls(cluster(plaintext_match())) is None
    # matches for other labels are not ours, whatever they hold
    odd = tls_match(upstream_context(sni=""), mode="istio")
    no_label = cluster_pb2.Cluster.TransportSocketMatch(name="x")
    no_label.match.update({"other": "mtls"})
    no_label.transport_socket.name = "envoy.transport_sockets.alts"
    assert cluster_tls(cluster(odd, no_label, plaintext_match())) is None


def _cluster_refused(c: cluster_pb2.Cluster) -> str:
    with pytest.raises(TlsConfigError) as info:
        cluster_tls(c)
    return str(info.value)


def test_the_server_name_is_required() -> None:
    assert _cluster_refused(cluster(tls_match(upstream_context(sni="")))) == (
        "cluster 'orders|v1'.transport_socket_matches[0]: UpstreamTlsContext.sni (the server's "
        "DNS SAN) is required")


@pytest.mark.parametrize("uris", [(), (ORDERS_ID, f"spiffe://{TD}/service/cart")],
                         ids=["none", "two"])
def test_exactly_one_spiffe_id_is_required(uris: tuple[str, ...]) -> None:
    assert _cluster_refused(cluster(plaintext_match(), tls_match(upstream_context(uris=uris)))) \
        == ("cluster 'orders|v1'.transport_socket_matches[1]: exactly one URI SAN matcher (the "
            f"server's SPIFFE ID) is required, found {len(uris)}")


def test_dns_san_matchers_are_not_the_spiffe_id() -> None:
    context = upstream_context(uris=())
    context.common_tls_context.validation_context.match_typed_subject_alt_names.add(
        san_type=common_pb2.SubjectAltNameMatcher.DNS,
        matcher=string_pb2.StringMatcher(exact=f"orders.svc.{TD}"))
    assert "found 0" in _cluster_refused(cluster(tls_match(context)))


def test_an_mtls_match_with_another_socket_or_context_is_refused() -> None:
    assert _cluster_refused(cluster(tls_match(name=RAW_SOCKET))) == (
        "cluster 'orders|v1'.transport_socket_matches[0].transport_socket: expected "
        "envoy.transport_sockets.tls")
    assert _cluster_refused(cluster(tls_match(tls_pb2.DownstreamTlsContext()))) == (
        "cluster 'orders|v1'.transport_socket_matches[0].transport_socket: expected "
        "UpstreamTlsContext")


def test_a_cluster_level_tls_transport_socket_is_refused() -> None:
    c = cluster(tls_match())
    c.transport_socket.name = TLS_SOCKET
    c.transport_socket.typed_config.Pack(upstream_context())
    assert _cluster_refused(c) == ("cluster 'orders|v1'.transport_socket: only "
                                   "transport_socket_matches (tlsMode: mtls) carry mTLS for the "
                                   "sidecar")
    raw = cluster(tls_match())
    raw.transport_socket.name = RAW_SOCKET  # explicit plaintext is fine
    assert cluster_tls(raw) == UpstreamTlsSpec(f"orders.svc.{TD}", ORDERS_ID, ROOTS)


# --- endpoints -----------------------------------------------------------------------------------


def lb_endpoint(meta: dict) -> endpoint_components_pb2.LbEndpoint:
    out = endpoint_components_pb2.LbEndpoint()
    for key, value in meta.items():
        out.metadata.filter_metadata[key].update(value)
    return out


MTLS = {"envoy.transport_socket_match": {"tlsMode": "mtls"}}


@pytest.mark.parametrize(("meta", "expected"), [
    ({}, (False, "")),
    (MTLS, (True, "")),
    (MTLS | {"pymesh": {"plaintext_port": 7002}}, (True, "10.0.0.1:7002")),
    ({"envoy.transport_socket_match": {"tlsMode": "istio"}}, (False, "")),
    ({"envoy.transport_socket_match": {}}, (False, "")),
    (MTLS | {"pymesh": {"plaintext_port": 0}}, (True, "")),
    (MTLS | {"pymesh": {"plaintext_port": 65536}}, (True, "")),
    (MTLS | {"pymesh": {"plaintext_port": "7002"}}, (True, "")),  # must be a number
    (MTLS | {"pymesh": {}}, (True, "")),
], ids=["none", "mtls", "mtls+plaintext", "other-mode", "empty-match", "port-0",
        "port-too-big", "port-string", "pymesh-empty"])
def test_endpoint_transport(meta: dict, expected: tuple[bool, str]) -> None:
    assert endpoint_transport(lb_endpoint(meta), "10.0.0.1") == expected


def test_endpoint_plaintext_address_keeps_the_bracketed_ipv6_host() -> None:
    got = endpoint_transport(lb_endpoint(MTLS | {"pymesh": {"plaintext_port": 7002}}), "[::1]")
    assert got == (True, "[::1]:7002")


# --- bundles -------------------------------------------------------------------------------------


def test_split_bundle_gives_one_pem_per_root_in_order() -> None:
    assert split_bundle(ROOT_1 + ROOT_2) == ROOTS
    assert split_bundle(ROOT_2 + ROOT_1.rstrip(b"\n")) == (ROOT_2, ROOT_1)  # no final newline
    assert split_bundle(b"") == ()
    assert split_bundle(b"\n  \n") == ()
    assert all(root.endswith(b"-----END CERTIFICATE-----\n") for root in split_bundle(
        ROOT_1 + b"\n\n" + ROOT_2))


@pytest.mark.parametrize(("pem", "message"), [
    (ROOT_1 + b"garbage", "trust bundle: trailing data after the last certificate"),
    (ROOT_1 + ROOT_2[:40], "trust bundle: trailing data after the last certificate"),
    (b"QUFB\n-----END CERTIFICATE-----\n", "trust bundle: malformed PEM"),
])
def test_split_bundle_refuses_what_is_not_a_bundle(pem: bytes, message: str) -> None:
    with pytest.raises(TlsConfigError) as info:
        split_bundle(pem)
    assert str(info.value) == message


def test_same_roots_ignores_surrounding_whitespace_only() -> None:
    assert same_roots(ROOTS, (ROOT_1.rstrip(), b"\n" + ROOT_2))
    assert not same_roots(ROOTS, (ROOT_2, ROOT_1))
    assert not same_roots(ROOTS, (ROOT_1,))


# --- the contract: the control plane's translation, compiled by the sidecar ---------------------


SIDECAR = NodeInfo("cart~cart-1", sidecar=True, service="cart", instance_id="cart-1", mtls=True)
BUNDLE = tuple(pem.decode() for pem in ROOTS)
AUTHZ = s.AuthorizationPolicy("cart", (s.AuthorizationRule("ALLOW", (s.Source(service="orders"),),
                                                           ()),))


def registry() -> RegistryView:
    """orders: mtls with a plaintext port (v1), plaintext only (v1), mtls without a plaintext
    port (v2); cart: plaintext."""
    return RegistryView((
        Instance("orders", "orders-1", "10.0.0.1", 7001, version="v1", mtls=True,
                 plaintext_port=7002),
        Instance("orders", "orders-2", "10.0.0.2", 7011, version="v1"),
        Instance("orders", "orders-3", "10.0.0.3", 7021, version="v2", mtls=True),
        Instance("cart", "cart-1", "10.0.0.4", 7101),
    ))


def _translated(mode: str | None, *specs: s.Spec) -> dict:
    config = () if mode is None else (s.MeshConfig(mtls_mode=mode, trust_domain=TD),)
    pol = policies(*config, s.TrafficPolicy("orders", subsets=(
        s.Subset("v1", (("version", "v1"),)), s.Subset("v2", (("version", "v2"),)))), *specs)
    return {t: translate(registry(), pol, SIDECAR, t, trust_bundle=BUNDLE)
            for t in (LISTENER_TYPE, ROUTE_TYPE, CLUSTER_TYPE, ENDPOINT_TYPE)}


def compiled(mode: str | None, *specs: s.Spec) -> Snapshot:
    res = _translated(mode, *specs)
    # as the ADS client does: resources of a control plane may name clusters not yet sent
    return compile_snapshot("v1", res[LISTENER_TYPE].values(), res[ROUTE_TYPE],
                            res[CLUSTER_TYPE].values(), res[ENDPOINT_TYPE],
                            require_clusters=False)


def _endpoints(snap: Snapshot, name: str) -> dict[str, Endpoint]:
    return {e.address.split(":")[0]: e for e in snap.clusters[name].endpoints}


ORDERS_TLS = UpstreamTlsSpec(f"orders.svc.{TD}", ORDERS_ID, ROOTS)
CART_TLS = UpstreamTlsSpec(f"cart.svc.{TD}", f"spiffe://{TD}/service/cart", ROOTS)
EXPECTED = {
    # STRICT leaves out orders-2 (a sidecar without mTLS: unverified, and it would refuse)
    "STRICT": {"10.0.0.1": Endpoint("10.0.0.1:7001", mtls=True),
               "10.0.0.3": Endpoint("10.0.0.3:7021", mtls=True)},
    "PERMISSIVE": {"10.0.0.1": Endpoint("10.0.0.1:7001", mtls=True,
                                        plaintext_address="10.0.0.1:7002"),
                   "10.0.0.2": Endpoint("10.0.0.2:7011"),
                   "10.0.0.3": Endpoint("10.0.0.3:7021", mtls=True)},
    "DISABLE": {"10.0.0.1": Endpoint("10.0.0.1:7002"),
                "10.0.0.2": Endpoint("10.0.0.2:7011"),
                "10.0.0.3": Endpoint("10.0.0.3:7021")},
}


@pytest.mark.parametrize("mode", ["STRICT", "PERMISSIVE", "DISABLE"])
def test_the_sidecar_model_of_the_control_planes_translation(mode: str) -> None:
    snap = compiled(mode)
    expected = EXPECTED[mode]
    assert _endpoints(snap, "orders") == expected
    assert _endpoints(snap, "orders|v1") == {k: v for k, v in expected.items() if k != "10.0.0.3"}
    assert _endpoints(snap, "orders|v2") == {"10.0.0.3": expected["10.0.0.3"]}
    assert _endpoints(snap, "cart") == (
        {} if mode == "STRICT" else {"10.0.0.4": Endpoint("10.0.0.4:7101")})
    tls = mode != "DISABLE"
    # subset clusters check the service's identity, not the cluster name
    for name in ("orders", "orders|v1", "orders|v2"):
        assert snap.clusters[name].tls == (ORDERS_TLS if tls else None), name
    assert snap.clusters["cart"].tls == (CART_TLS if tls else None)
    assert snap.inbound_tls == InboundTls(MtlsMode[mode], ROOTS if tls else (), explicit=True)
    # no AuthorizationPolicy: everyone, even a plaintext caller
    assert snap.authorizer.allows_everything
    assert snap.authorizer.check(None, "/shop.Cart/Get").allowed


def test_the_default_mode_is_permissive() -> None:
    snap = compiled(None)
    assert snap.inbound_tls.mode is MtlsMode.PERMISSIVE and snap.inbound_tls.plaintext_allowed
    assert _endpoints(snap, "orders")["10.0.0.1"].plaintext_address == "10.0.0.1:7002"
    # the default trust domain, not the one the other tests configure
    assert snap.clusters["orders"].tls == UpstreamTlsSpec(
        "orders.svc.pymesh.local", "spiffe://pymesh.local/service/orders", ROOTS)


@pytest.mark.parametrize("mode", ["STRICT", "PERMISSIVE", "DISABLE"])
def test_the_authorization_policy_reaches_the_sidecar_in_every_mode(mode: str) -> None:
    authorizer = compiled(mode, AUTHZ).authorizer
    assert not authorizer.allows_everything
    assert authorizer.check(ORDERS_ID, "/shop.Cart/Get").allowed
    web = authorizer.check(f"spiffe://{TD}/service/web", "/shop.Cart/Get")
    assert not web.allowed and "AuthorizationPolicy 'cart'" in web.message
    # a plaintext caller proves nothing: an allow list refuses it
    assert not authorizer.check(None, "/shop.Cart/Get").allowed
    # another trust domain's "orders" is not ours
    assert not authorizer.check("spiffe://other.example/service/orders", "/shop.Cart/Get").allowed


def test_the_trust_bundle_in_the_config_is_the_one_the_control_plane_has() -> None:
    res = _translated("PERMISSIVE")
    one_root = {t: translate(registry(), policies(s.MeshConfig(trust_domain=TD)), SIDECAR, t,
                             trust_bundle=(ROOT_2.decode(),))
                for t in (LISTENER_TYPE, CLUSTER_TYPE)}
    snap = compile_snapshot("v2", one_root[LISTENER_TYPE].values(), res[ROUTE_TYPE],
                            one_root[CLUSTER_TYPE].values(), res[ENDPOINT_TYPE],
                            require_clusters=False)
    assert snap.inbound_tls.trust_bundle == (ROOT_2,)
    assert {c.tls.trust_bundle for c in snap.clusters.values() if c.tls} == {(ROOT_2,)}
