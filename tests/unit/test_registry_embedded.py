"""The embedded registry: announce, leave after a grace period, the change feed, node identity."""

from __future__ import annotations

import asyncio
import re

import pytest
from envoy.config.core.v3 import base_pb2

from control_plane.registry.announce import Announcements
from control_plane.registry.embedded import (
    EmbeddedRegistry,
    NodeMetadataError,
    instance_from_node,
)
from control_plane.registry.model import Instance
from control_plane.registry.source import RegistrySource


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _inst(iid: str = "orders-1", service: str = "orders", port: int = 15001, **kw) -> Instance:
    return Instance(service=service, instance_id=iid, address="127.0.0.1", port=port, **kw)


def _ids(registry: EmbeddedRegistry) -> list[str]:
    return [i.instance_id for i in registry.view().instances]


def test_it_is_a_registry_source():
    assert isinstance(EmbeddedRegistry(), RegistrySource)


def test_instance_leaves_only_after_the_grace_period():
    clock = FakeClock()
    reg = EmbeddedRegistry(grace=5.0, clock=clock)
    reg.add(_inst())
    reg.remove("orders-1")
    assert _ids(reg) == ["orders-1"]  # still there: it may reconnect
    clock.advance(4.9)
    assert reg.expire() == []
    assert _ids(reg) == ["orders-1"]
    clock.advance(0.1)
    assert [i.instance_id for i in reg.expire()] == ["orders-1"]
    assert _ids(reg) == []


def test_reannounce_within_the_grace_cancels_the_removal():
    clock = FakeClock()
    reg = EmbeddedRegistry(grace=5.0, clock=clock)
    reg.add(_inst(), owner="stream-1")
    reg.remove("orders-1", owner="stream-1")
    clock.advance(3)
    reg.add(_inst(), owner="stream-2")
    clock.advance(10)
    assert reg.expire() == []
    assert _ids(reg) == ["orders-1"]


def test_an_instance_held_by_two_streams_stays_until_both_end():
    clock = FakeClock()
    reg = EmbeddedRegistry(grace=1.0, clock=clock)
    reg.add(_inst(), owner="old")
    reg.add(_inst(), owner="new")  # reconnected before the old stream was noticed dead
    reg.remove("orders-1", owner="old")
    clock.advance(60)
    reg.expire()
    assert _ids(reg) == ["orders-1"]
    reg.remove("orders-1", owner="new")
    clock.advance(1)
    reg.expire()
    assert _ids(reg) == []


def test_zero_grace_and_explicit_grace():
    clock = FakeClock()
    reg = EmbeddedRegistry(grace=5.0, clock=clock)
    reg.add(_inst("a-1", "a"))
    reg.add(_inst("b-1", "b"))
    reg.remove("a-1", grace=0)
    assert _ids(reg) == ["b-1"]
    reg.remove("b-1", grace=30)
    clock.advance(29)
    reg.expire()
    assert _ids(reg) == ["b-1"]
    reg.remove("unknown-instance")  # harmless
    with pytest.raises(ValueError):
        EmbeddedRegistry(grace=-1)


def test_reannounce_with_new_data_updates_the_view():
    reg = EmbeddedRegistry()
    reg.add(_inst(version="v1"))
    reg.add(_inst(version="v2"))
    assert [i.version for i in reg.view().instances] == ["v2"]


def test_announcements_next_deadline_is_the_earliest():
    ann = Announcements(default_grace=5)
    ann.announce(_inst("a", "s"))
    ann.announce(_inst("b", "s"))
    assert ann.next_deadline() is None
    assert ann.withdraw("a", now=10) == 15
    assert ann.withdraw("b", now=11, grace=1) == 12
    assert ann.next_deadline() == 12
    assert ann.leaving("a") and not ann.leaving("zzz")
    assert [i.instance_id for i in ann.expire(12)] == ["b"]
    assert ann.next_deadline() == 15


def test_changes_yield_each_change_coalesced_and_not_unchanged_views():
    async def scenario() -> None:
        reg = EmbeddedRegistry()
        sub = reg.changes()  # subscribed now, before the first change
        await reg.announce(_inst("a-1", "a"))
        view = await asyncio.wait_for(anext(sub), 1)
        assert [i.instance_id for i in view.instances] == ["a-1"]
        await reg.announce(_inst("a-1", "a"))  # same data: no change
        await reg.announce(_inst("b-1", "b"))
        await reg.announce(_inst("c-1", "c"))
        view = await asyncio.wait_for(anext(sub), 1)  # one wake-up, the latest view
        assert [i.instance_id for i in view.instances] == ["a-1", "b-1", "c-1"]
        pending = asyncio.ensure_future(anext(sub))
        await asyncio.sleep(0)
        assert not pending.done()
        await reg.stop()
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(pending, 1)

    asyncio.run(scenario())


def test_withdraw_in_a_running_loop_removes_after_the_grace_by_itself():
    async def scenario() -> None:
        reg = EmbeddedRegistry(grace=0.05)
        await reg.announce(_inst(), owner=1)
        sub = reg.changes()
        await reg.withdraw("orders-1", owner=1)
        assert _ids(reg) == ["orders-1"]
        view = await asyncio.wait_for(anext(sub), 2)
        assert view.instances == ()
        await reg.stop()

    asyncio.run(scenario())


# --- node identity -------------------------------------------------------------------------
def _node(metadata: dict, node_id: str = "orders~orders-1", cluster: str = "orders"):
    node = base_pb2.Node(id=node_id, cluster=cluster)
    node.metadata.update(metadata)
    return node


SIDECAR_META = {"mesh_sidecar": True, "service": "orders", "instance_id": "orders-1",
                "inbound_address": "127.0.0.1:15006", "version": "v2", "zone": "eu-1",
                "grpc_services": ["shop.Orders", "shop.Admin"], "team": "checkout",
                "replicas": 3}


def test_sidecar_node_becomes_an_instance():
    assert instance_from_node(_node(SIDECAR_META)) == Instance(
        service="orders", instance_id="orders-1", address="127.0.0.1", port=15006,
        version="v2", zone="eu-1", grpc_services=("shop.Admin", "shop.Orders"),
        meta=(("team", "checkout"),), sidecar=True)


def test_proxyless_client_nodes_are_not_instances():
    assert instance_from_node(base_pb2.Node(id="client-1")) is None
    assert instance_from_node(_node({"mesh_sidecar": False, "service": "x"})) is None
    assert instance_from_node(_node({"service": "x"})) is None


def test_identity_falls_back_to_node_id_and_cluster():
    inst = instance_from_node(_node({"mesh_sidecar": "true", "inbound_address": "[::1]:9"},
                                    node_id="cart~cart-7", cluster="cart"))
    assert inst is not None
    assert (inst.service, inst.instance_id, inst.address, inst.port) == ("cart", "cart-7",
                                                                          "::1", 9)
    assert inst.endpoint == "[::1]:9"


@pytest.mark.parametrize(("change", "field"), [
    ({"inbound_address": None}, "inbound_address"),
    ({"inbound_address": "127.0.0.1"}, "inbound_address"),
    ({"inbound_address": "127.0.0.1:0"}, "inbound_address"),
    ({"inbound_address": "127.0.0.1:http"}, "inbound_address"),
    ({"inbound_address": "0.0.0.0:15006"}, "inbound_address"),
    ({"inbound_address": "::1:15006"}, "inbound_address"),
    ({"version": 2}, "version"),
    ({"grpc_services": [1]}, "grpc_services[0]"),
    ({"grpc_services": {"a": 1}}, "grpc_services"),
])
def test_bad_sidecar_metadata_is_refused_naming_the_field(change, field):
    meta = {**SIDECAR_META, **change}
    meta = {k: v for k, v in meta.items() if v is not None}
    with pytest.raises(NodeMetadataError, match=re.escape(f"metadata.{field}:")):
        instance_from_node(_node(meta))


def test_missing_service_everywhere_is_refused():
    meta = {k: v for k, v in SIDECAR_META.items() if k != "service"}
    with pytest.raises(NodeMetadataError, match=r"metadata\.service"):
        instance_from_node(_node(meta, cluster=""))
