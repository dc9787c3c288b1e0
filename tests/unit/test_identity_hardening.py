"""Holes a review of the identity wiring found, each pinned by the behaviour that closes it.

- STRICT sends no caller to an instance announced by a sidecar without mTLS (anyone can announce
  over ADS: dialling it in plaintext would hand requests to an unverified server).
- An inbound listener whose filter chains carry different connection managers is refused (RBAC
  enforced for one transport and not the other).
- A sidecar with an identity on a listener that does not state transport protocols (flags, a
  static file, a snapshot saved before mTLS) assumes STRICT: it fails closed.
- The trust bundle of the config wins over a renewal's (a Sign answer may predate a rotation).
- A trust bundle that is not certificates is refused (every handshake would fail).
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from envoy.config.rbac.v3 import rbac_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as rbac_filter_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2

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
from sidecar import config
from sidecar.model import MtlsMode
from sidecar.runtime import Sidecar
from sidecar.static_config import XdsResources, base_pb2, listener, route_entry, static_cluster
from sidecar.xds_translate import ConfigError, compile_snapshot
from tests.pki import TestCA
from tests.unit.test_translate_support import policies

TD = "shop.example"
ROOT_1, ROOT_2 = TestCA("root 1", TD), TestCA("root 2", TD)
SIDECAR = NodeInfo("cart~cart-1", sidecar=True, service="cart", instance_id="cart-1", mtls=True)
TYPES = (LISTENER_TYPE, ROUTE_TYPE, CLUSTER_TYPE, ENDPOINT_TYPE)


def _compile(view: RegistryView, mode: str, bundle: tuple[str, ...]):  # type: ignore[no-untyped-def]
    pol = policies(s.MeshConfig(mtls_mode=mode, trust_domain=TD))
    res = {t: translate(view, pol, SIDECAR, t, trust_bundle=bundle) for t in TYPES}
    return compile_snapshot("v1", res[LISTENER_TYPE].values(), res[ROUTE_TYPE],
                            [*res[CLUSTER_TYPE].values(),
                             static_cluster("inbound|app", ["127.0.0.1:9"])],
                            res[ENDPOINT_TYPE])


def test_strict_sends_no_caller_to_an_instance_announced_without_mtls() -> None:
    view = RegistryView((
        Instance("payments", "payments-1", "10.0.0.1", 7001, mtls=True, plaintext_port=7002),
        Instance("payments", "impostor", "10.6.6.6", 15006, sidecar=True),  # any ADS client
    ))
    strict = _compile(view, "STRICT", (ROOT_1.pem.decode(),)).clusters["payments"]
    assert [e.address for e in strict.endpoints] == ["10.0.0.1:7001"]
    permissive = _compile(view, "PERMISSIVE", (ROOT_1.pem.decode(),)).clusters["payments"]
    assert {e.address for e in permissive.endpoints} == {"10.0.0.1:7001", "10.6.6.6:15006"}


def test_chains_with_different_connection_managers_are_refused() -> None:
    base = listener("inbound|cart", base_pb2.INBOUND, [route_entry("app", "", "inbound|app")])
    plain = base.filter_chains[0]
    plain.filter_chain_match.transport_protocol = "raw_buffer"
    hcm = hcm_pb2.HttpConnectionManager()
    plain.filters[0].typed_config.Unpack(hcm)
    deny_all = rbac_filter_pb2.RBAC(rules=rbac_pb2.RBAC(action=rbac_pb2.RBAC.DENY))
    deny_all.rules.policies["all"].principals.add(any=True)
    deny_all.rules.policies["all"].permissions.add(any=True)
    hcm.http_filters.insert(0, hcm_pb2.HttpFilter(name="envoy.filters.http.rbac"))
    hcm.http_filters[0].typed_config.Pack(deny_all)
    tls_chain = base.filter_chains.add()
    tls_chain.filter_chain_match.transport_protocol = "tls"
    tls_chain.filters.add(name="envoy.filters.network.http_connection_manager"
                          ).typed_config.Pack(hcm)
    context = tls_pb2.DownstreamTlsContext()
    context.require_client_certificate.value = True
    tls_chain.transport_socket.name = "envoy.transport_sockets.tls"
    tls_chain.transport_socket.typed_config.Pack(context)
    with pytest.raises(ConfigError, match="different http_connection_manager"):
        compile_snapshot("v1", [base], {}, [static_cluster("inbound|app", ["127.0.0.1:9"])], {})


def test_a_bundle_of_non_certificates_is_refused() -> None:
    fake = "-----BEGIN CERTIFICATE-----\nQUFB\n-----END CERTIFICATE-----\n"
    view = RegistryView((Instance("payments", "p-1", "10.0.0.1", 7001, mtls=True),))
    with pytest.raises(ConfigError, match="not a certificate"):
        _compile(view, "STRICT", (fake,))


def _identity_sidecar() -> Sidecar:
    return Sidecar(config.parse(["--service", "cart", "--app", "127.0.0.1:9", "--token",
                                 "pmt_x", "--control-plane", "127.0.0.1:1",
                                 "--inbound", "127.0.0.1:0"]))


def test_a_sidecar_with_an_identity_on_a_listener_without_transport_protocols_fails_closed(
        ) -> None:
    async def main() -> None:
        sidecar = _identity_sidecar()
        legacy = XdsResources(listeners=[listener("inbound|cart", base_pb2.INBOUND,
                                                  [route_entry("app", "", "inbound|app")])],
                              clusters=[static_cluster("inbound|app", ["127.0.0.1:9"])],
                              dynamic=True)  # e.g. a snapshot saved before mTLS
        snapshot = sidecar.apply("persisted-v7", legacy)
        assert snapshot.inbound_tls.mode is MtlsMode.STRICT and snapshot.inbound_tls.assumed
        await sidecar.pool.close(0)

    asyncio.run(main())


def test_the_config_bundle_wins_over_a_renewals() -> None:
    async def main() -> None:
        sidecar = _identity_sidecar()
        assert sidecar.identity is not None
        sidecar.identity.start(sidecar._identity_changed)
        source = sidecar.identity.source
        assert source is not None
        try:
            first = ROOT_1.issue("cart")
            source._publish(first)  # the first certificate, with the one root it came with
            view = RegistryView((Instance("payments", "p-1", "10.0.0.1", 7001, mtls=True),))
            pol = policies(s.MeshConfig(mtls_mode="STRICT", trust_domain=TD))
            bundle = (ROOT_1.pem.decode(), ROOT_2.pem.decode())  # a rotation, pushed
            res = {t: translate(view, pol, SIDECAR, t, trust_bundle=bundle) for t in TYPES}
            sidecar.apply("v2", XdsResources(
                listeners=list(res[LISTENER_TYPE].values()), route_configs=res[ROUTE_TYPE],
                clusters=[*res[CLUSTER_TYPE].values(),
                          static_cluster("inbound|app", ["127.0.0.1:9"])],
                load_assignments=res[ENDPOINT_TYPE], dynamic=True))
            current = source.current()
            assert current is not None and len(current.trust_bundle_pem) == 2
            # a renewal answered with the bundle from before the rotation
            source._publish(dataclasses.replace(ROOT_1.issue("cart"),
                                                trust_bundle_pem=(ROOT_1.pem,)))
            current = source.current()
            assert current is not None and len(current.trust_bundle_pem) == 2
            assert current.serial != first.serial  # the renewal itself is kept
        finally:
            await sidecar.identity.close()
            await sidecar.pool.close(0)

    asyncio.run(main())
