"""Consul JSON <-> Instance, the blocking-query index rules, and the --consul URL."""

from __future__ import annotations

import pytest

from control_plane.registry.consul_mapping import (
    check_id_for,
    format_duration,
    instance_from_health_entry,
    instances_from_health,
    next_index,
    parse_consul_url,
    parse_index,
    register_kwargs,
    registration_meta,
)
from control_plane.registry.model import Instance


def _entry(service: dict, node_address: str = "10.0.0.9") -> dict:
    return {"Node": {"Node": "n1", "Address": node_address},
            "Service": service,
            "Checks": [{"CheckID": "serfHealth", "Status": "passing"}]}


def test_health_entry_maps_every_field():
    inst = instance_from_health_entry(_entry({
        "ID": "orders-1", "Service": "orders", "Address": "10.0.0.1", "Port": 15001,
        "Tags": ["blue", "canary"],
        "Meta": {"version": "v2", "zone": "eu-1", "grpc_services": "shop.Orders, shop.Admin",
                 "sidecar": "true", "team": "checkout", "build": "42"}}))
    assert inst == Instance(service="orders", instance_id="orders-1", address="10.0.0.1",
                            port=15001, version="v2", zone="eu-1",
                            grpc_services=("shop.Admin", "shop.Orders"),
                            tags=("blue", "canary"), meta=(("build", "42"), ("team", "checkout")),
                            sidecar=True, healthy=True)


def test_service_without_address_is_reached_at_its_node_and_without_meta_has_no_sidecar():
    inst = instance_from_health_entry(_entry({"ID": "redis", "Service": "redis", "Address": "",
                                              "Port": 6379, "Tags": None, "Meta": None}))
    assert inst is not None
    assert (inst.address, inst.port, inst.sidecar, inst.tags, inst.meta) == (
        "10.0.0.9", 6379, False, (), ())
    assert inst.grpc_services == ()


@pytest.mark.parametrize("service", [
    {"ID": "x", "Service": "x", "Address": "10.0.0.1", "Port": 0},
    {"ID": "x", "Service": "x", "Address": "10.0.0.1"},
    {"ID": "x", "Service": "x", "Address": "10.0.0.1", "Port": "nope"},
    {"ID": "x", "Service": "", "Address": "10.0.0.1", "Port": 80},
])
def test_undialable_entries_are_skipped(service):
    assert instance_from_health_entry(_entry(service)) is None


def test_answers_are_ordered_so_consul_reordering_is_not_a_change():
    a = {"ID": "a", "Service": "s", "Address": "10.0.0.1", "Port": 1}
    b = {"ID": "b", "Service": "s", "Address": "10.0.0.2", "Port": 1}
    bad = {"ID": "c", "Service": "s", "Address": "10.0.0.3", "Port": 0}
    assert instances_from_health([_entry(b), _entry(a), _entry(bad)]) == \
        instances_from_health([_entry(a), _entry(b)])
    assert instances_from_health(None) == ()


def test_registration_round_trips_through_the_health_answer():
    inst = Instance(service="orders", instance_id="orders-7", address="127.0.0.1", port=15006,
                    version="v1", zone="z1", grpc_services=("shop.Orders",), tags=("mesh",),
                    meta=(("owner", "team-a"),), sidecar=True)
    kw = register_kwargs(inst, ttl=10, deregister_after=60)
    assert kw["name"] == "orders" and kw["service_id"] == "orders-7"
    assert kw["check"]["CheckID"] == check_id_for("orders-7") == "service:orders-7"
    assert kw["check"]["TTL"] == "10s" and kw["check"]["Status"] == "passing"
    assert kw["check"]["DeregisterCriticalServiceAfter"] == "60s"
    assert kw["replace_existing_checks"] is True
    echoed = {"ID": kw["service_id"], "Service": kw["name"], "Address": kw["address"],
              "Port": kw["port"], "Tags": kw["tags"], "Meta": kw["meta"]}
    assert instance_from_health_entry(_entry(echoed)) == inst


def test_registration_meta_drops_what_consul_would_refuse():
    inst = Instance(service="s", instance_id="s-1", address="h", port=1, sidecar=False,
                    meta=(("bad key", "x"), ("consul-reserved", "x"), ("long", "x" * 600),
                          ("ok_key", "y"), ("version", "sneaky")))
    meta = registration_meta(inst)
    assert meta == {"ok_key": "y", "sidecar": "false"}
    many = Instance(service="s", instance_id="s-1", address="h", port=1, version="v1",
                    meta=tuple((f"k{i:03}", "v") for i in range(100)))
    meta = registration_meta(many)
    assert len(meta) == 64
    assert meta["version"] == "v1" and meta["sidecar"] == "true"


def test_no_deregister_after_when_disabled():
    inst = Instance(service="s", instance_id="s-1", address="h", port=1)
    assert "DeregisterCriticalServiceAfter" not in register_kwargs(inst, 2.5, None)["check"]
    assert register_kwargs(inst, 2.5, None)["check"]["TTL"] == "2500ms"


@pytest.mark.parametrize(("seconds", "text"), [(10, "10s"), (1.0, "1s"), (0.25, "250ms"),
                                               (1.5, "1500ms"), (300, "300s")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_index_grows_normally():
    assert next_index(0, 17) == 17
    assert next_index(17, 17) == 17  # timed out without change: block again on the same
    assert next_index(17, 20) == 20


def test_index_going_backwards_resets_to_zero_for_a_plain_read():
    assert next_index(500, 12) == 0
    assert next_index(0, 12) == 12  # then the read's index is used again


def test_index_below_one_is_raised_to_one():
    assert next_index(0, 0) == 1


@pytest.mark.parametrize(("header", "value"), [("42", 42), (42, 42), (None, 0), ("x", 0),
                                               ("-3", 0)])
def test_parse_index(header, value):
    assert parse_index(header) == value


@pytest.mark.parametrize(("url", "parsed"), [
    ("http://127.0.0.1:8500", ("http", "127.0.0.1", 8500)),
    ("127.0.0.1:8600", ("http", "127.0.0.1", 8600)),
    ("http://consul.local", ("http", "consul.local", 8500)),
    ("https://consul.local/", ("https", "consul.local", 443)),
])
def test_parse_consul_url(url, parsed):
    assert parse_consul_url(url) == parsed


@pytest.mark.parametrize("url", ["ftp://h:1", "http://:8500", "http://h:99999", "http://h/v1"])
def test_bad_consul_urls_say_why(url):
    with pytest.raises(ValueError, match="--consul"):
        parse_consul_url(url)
