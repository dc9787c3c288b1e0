"""meshctl's pure parts: reading documents, the wire form, tables and sync states."""

from __future__ import annotations

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from mesh.v1 import policy_pb2, status_pb2

from control_plane import cli
from control_plane.cli import CDS, EDS, LDS, RDS, CliError

NOW = 1_700_000_000.0


def ts(seconds: float) -> Timestamp:
    t = Timestamp()
    t.FromNanoseconds(int(seconds * 1e9))
    return t


# --- documents -----------------------------------------------------------------------------
MULTI = """\
kind: TrafficPolicy
metadata: {name: orders}
spec:
  service: orders
  timeout: 2s
---
# a comment-only document is skipped
---

kind: MeshConfig
metadata:
  name: default
  resourceVersion: 7
spec: {mtls: {mode: STRICT}}
"""


def test_parse_documents_keeps_order_and_start_lines() -> None:
    docs = cli.parse_documents(MULTI, "mesh.yaml")
    assert [(d.index, d.line, d.data["kind"]) for d in docs] == [
        (1, 1, "TrafficPolicy"), (2, 10, "MeshConfig")]
    assert docs[1].where == "mesh.yaml: document 2 (line 10)"


@pytest.mark.parametrize(("text", "where"), [
    ("kind: TrafficPolicy\nspec: {service: orders\n", "p.yaml:3:1"),
    ("kind: A\n  bad: indent\n", "p.yaml:2:6"),
    ("kind: A\n---\n- [unclosed\n", "p.yaml:4:1"),
])
def test_malformed_yaml_names_line_and_column(text: str, where: str) -> None:
    with pytest.raises(CliError) as info:
        cli.parse_documents(text, "p.yaml")
    assert info.value.code == cli.EXIT_USAGE
    assert f"malformed YAML at {where}:" in info.value.message


def test_to_resource_builds_the_wire_form() -> None:
    doc = cli.parse_documents(MULTI, "m.yaml")[1]
    resource = cli.to_resource(doc)
    assert (resource.kind, resource.name, resource.resource_version) == ("MeshConfig", "default",
                                                                         "7")
    assert cli.spec_dict(resource.spec) == {"mtls": {"mode": "STRICT"}}


def test_to_resource_leaves_missing_parts_to_the_server() -> None:
    resource = cli.to_resource(cli.Document("x", 1, 1, {"kind": "TrafficPolicy"}))
    assert resource.name == "" and not resource.HasField("spec")


def test_to_resource_lists_every_shape_problem() -> None:
    doc = cli.Document("bad.yaml", 2, 5, {"apiVersion": "v1", "kind": 3,
                                          "metadata": {"name": ["x"], "labels": {}},
                                          "spec": [1, 2]})
    with pytest.raises(CliError) as info:
        cli.to_resource(doc)
    err = info.value
    assert err.code == cli.EXIT_USAGE
    assert "bad.yaml: document 2 (line 5)" in err.message
    assert err.details == [
        "apiVersion: unknown field (a resource has kind, metadata, spec)",
        "kind: must be a string, got a number",
        "metadata.labels: unknown field (metadata has name, resourceVersion)",
        "metadata.name: must be a string, got a list",
        "spec: must be a mapping, got a list",
    ]


def test_to_resource_rejects_a_document_that_is_not_a_mapping() -> None:
    with pytest.raises(CliError) as info:
        cli.to_resource(cli.Document("s.yaml", 1, 3, ["a", "b"]))
    assert "s.yaml: document 1 (line 3): expected a resource" in info.value.message


def test_to_resource_turns_yaml_only_values_into_json_values() -> None:
    docs = cli.parse_documents("kind: MeshConfig\nmetadata: {name: default}\n"
                               "spec: {since: 2024-01-02, 1: one, bad: .nan}\n", "d.yaml")
    with pytest.raises(CliError) as info:
        cli.to_resource(docs[0])
    assert info.value.details == ["spec.bad: nan is not a finite number"]
    docs = cli.parse_documents("kind: MeshConfig\nmetadata: {name: default}\n"
                               "spec: {since: 2024-01-02, 1: one}\n", "d.yaml")
    assert cli.spec_dict(cli.to_resource(docs[0]).spec) == {"since": "2024-01-02", "1": "one"}


def test_get_yaml_output_applies_back_unchanged() -> None:
    stored = policy_pb2.Resource(kind="TrafficPolicy", name="orders", resource_version="12",
                                 create_time=ts(NOW - 60), update_time=ts(NOW - 5))
    stored.spec.update({"service": "orders", "retry": {"maxAttempts": 3},
                        "routes": [{"name": "r", "split": [{"subset": "v1", "weight": 90}]}]})
    text = cli._dump(cli.resource_doc(stored), "yaml")
    assert "maxAttempts: 3\n" in text and "weight: 90\n" in text  # not 3.0
    assert "createTime: '2023-11-14T22:12:20Z'" in text
    again = cli.to_resource(cli.parse_documents(text, "-")[0])
    assert (again.kind, again.name, again.resource_version) == ("TrafficPolicy", "orders", "12")
    assert again.spec == stored.spec


# --- kinds, addresses ----------------------------------------------------------------------
@pytest.mark.parametrize(("text", "kind"), [
    ("trafficpolicy", "TrafficPolicy"), ("TrafficPolicy", "TrafficPolicy"), ("TP", "TrafficPolicy"),
    ("trafficpolicies", "TrafficPolicy"), ("authz", "AuthorizationPolicy"),
    ("AuthorizationPolicy", "AuthorizationPolicy"), ("rl", "RateLimitPolicy"),
    ("RATELIMITPOLICY", "RateLimitPolicy"), ("meshconfig", "MeshConfig"),
])
def test_kind_aliases(text: str, kind: str) -> None:
    assert cli.resolve_kind(text) == kind


def test_unknown_kind_lists_the_known_ones() -> None:
    with pytest.raises(CliError) as info:
        cli.resolve_kind("deployment")
    assert info.value.code == cli.EXIT_USAGE
    assert "TrafficPolicy (tp)" in info.value.message and "MeshConfig" in info.value.message


@pytest.mark.parametrize("address", ["127.0.0.1:15010", "cp.mesh.local:1", "[::1]:15010"])
def test_good_addresses(address: str) -> None:
    assert cli.check_address(address) == address


@pytest.mark.parametrize("address", ["127.0.0.1", "host:0", "host:99999", ":15010", "a b:1", ""])
def test_bad_addresses(address: str) -> None:
    with pytest.raises(CliError) as info:
        cli.check_address(address)
    assert info.value.code == cli.EXIT_USAGE and "HOST:PORT" in info.value.message


# --- tables ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("ago", "text"), [
    (-3, "0s"), (0, "0s"), (45, "45s"), (119, "119s"), (200, "3m20s"), (240, "4m"),
    (25 * 60, "25m"), (5 * 3600 + 600, "5h10m"), (5 * 3600, "5h"), (20 * 3600, "20h"),
    (3 * 86400 + 5, "3d"),
])
def test_age(ago: float, text: str) -> None:
    assert cli.age(NOW - ago, NOW) == text


def test_age_unknown() -> None:
    assert cli.age(None, NOW) == "-"


def test_table_pads_columns() -> None:
    assert cli.table(("NAME", "KIND"), [("orders", "TrafficPolicy"), ("x", "")]) == (
        "NAME     KIND\n"
        "orders   TrafficPolicy\n"
        "x\n")


def test_resources_table() -> None:
    tp = policy_pb2.Resource(kind="TrafficPolicy", name="orders", resource_version="3",
                             create_time=ts(NOW - 90))
    tp.spec.update({"service": "orders", "loadBalancer": {"algorithm": "RING_HASH"},
                    "subsets": [{"name": "v1"}, {"name": "v2"}], "routes": [{}, {}]})
    rl = policy_pb2.Resource(kind="RateLimitPolicy", name="orders-rl", resource_version="4")
    rl.spec.update({"service": "orders", "tokensPerSecond": 100, "burst": 20})
    mc = policy_pb2.Resource(kind="MeshConfig", name="default", resource_version="5")
    mc.spec.update({"mtls": {"mode": "STRICT"}, "tracing": {"samplingPercent": 2.5}})
    assert cli.resources_table([tp, rl, mc], NOW).splitlines() == [
        "NAME        KIND              VERSION   AGE   SUMMARY",
        "orders      TrafficPolicy     3         90s   service=orders lb=RING_HASH subsets=v1,v2 "
        "routes=2",
        "orders-rl   RateLimitPolicy   4         -     service=orders 100/s burst=20",
        "default     MeshConfig        5         -     mtls=STRICT sampling=2.5%",
    ]


def xds(type_url: str, **kw: object) -> status_pb2.XdsTypeStatus:
    return status_pb2.XdsTypeStatus(type_url=type_url, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(("t", "state"), [
    (None, cli.NOT_SENT),
    (xds(LDS), cli.NOT_SENT),
    (xds(LDS, sent_version="a", sent_nonce="1", acked_version="a"), cli.SYNCED),
    (xds(LDS, sent_version="b", sent_nonce="2", acked_version="a"), cli.STALE),
    (xds(LDS, sent_version="a", sent_nonce="1"), cli.STALE),
    (xds(LDS, sent_version="b", sent_nonce="2", acked_version="a", nack_nonce="2",
         nack_error="bad"), cli.NACKED),
    # an old NACK, then a push that was ACKed
    (xds(LDS, sent_version="c", sent_nonce="3", acked_version="c", nack_nonce="2",
         nack_error="bad"), cli.SYNCED),
    # no nonces reported: the NACK's time decides
    (xds(LDS, sent_version="b", acked_version="a", sent_at=ts(NOW - 5), nack_error="bad",
         nacked_at=ts(NOW - 4)), cli.NACKED),
    (xds(LDS, sent_version="b", acked_version="a", sent_at=ts(NOW - 5), nack_error="bad",
         nacked_at=ts(NOW - 9)), cli.STALE),
])
def test_sync_state(t: status_pb2.XdsTypeStatus | None, state: str) -> None:
    assert cli.sync_state(t) == state


def proxies() -> list[status_pb2.ProxyStatus]:
    synced = {"sent_version": "v1", "sent_nonce": "n1", "acked_version": "v1"}
    a = status_pb2.ProxyStatus(
        node_id="orders~orders-1", service="orders", instance_id="orders-1", sidecar=True,
        connected_since=ts(NOW - 300),
        types=[xds(LDS, **synced, acked_at=ts(NOW - 20)), xds(RDS, **synced),
               xds(CDS, sent_version="v2", sent_nonce="n2", acked_version="v1",
                   nack_nonce="n2", nack_error="cluster orders|v3:\n unknown subset",
                   nacked_at=ts(NOW - 10)),
               xds(EDS, **synced, acked_at=ts(NOW - 12))])
    b = status_pb2.ProxyStatus(node_id="client-1", sidecar=False,
                               types=[xds(LDS, sent_version="v9", sent_nonce="n9")])
    return [a, b]


def test_proxy_status_table() -> None:
    assert cli.proxy_status_table(proxies(), NOW).splitlines() == [
        "NAME              SERVICE   LDS      RDS        CDS        EDS        LAST ACK",
        "orders~orders-1   orders    SYNCED   SYNCED     NACKED     SYNCED     12s",
        "client-1          -         STALE    NOT SENT   NOT SENT   NOT SENT   -",
    ]


def test_proxy_status_wide_shows_the_nack_error() -> None:
    lines = cli.proxy_status_table(proxies(), NOW, wide=True).splitlines()
    assert lines[0].split()[-4:] == ["INSTANCE", "TYPE", "CONNECTED", "ERRORS"]
    assert lines[1].endswith("12s        orders-1   sidecar     5m          "
                             "CDS: cluster orders|v3: unknown subset")
    assert "proxyless" in lines[2]


def test_describe_proxy() -> None:
    text = cli.describe_proxy(proxies()[0], NOW)
    assert "CDS:               NACKED\n" in text
    assert "last NACK at 2023-11-14T22:13:10Z (10s ago): cluster orders|v3: unknown subset" in text


def test_endpoints_and_registries_tables() -> None:
    response = status_pb2.EndpointsResponse(
        endpoints=[status_pb2.Endpoint(service="orders", instance_id="orders-1",
                                       address="127.0.0.1", port=4001, version="v1",
                                       zone="a", healthy=True, source="consul"),
                   status_pb2.Endpoint(service="orders", instance_id="orders-2", address="::1",
                                       port=4002, healthy=False, source="embedded")],
        registries=[status_pb2.RegistryHealth(source="consul", healthy=False,
                                              last_error="connection refused",
                                              last_error_at=ts(NOW - 7))])
    assert cli.endpoints_table(response, with_service=False).splitlines() == [
        "INSTANCE   ADDRESS          VERSION   ZONE   HEALTHY   SOURCE",
        "orders-1   127.0.0.1:4001   v1        a      yes       consul",
        "orders-2   [::1]:4002       -         -      no        embedded",
    ]
    assert cli.endpoints_table(response, with_service=True).splitlines()[1].startswith(
        "orders    orders-1")
    assert cli.registries_table(response.registries, NOW).splitlines() == [
        "REGISTRY   HEALTHY   LAST ERROR",
        "consul     no        connection refused (7s ago)",
    ]


# --- describe ------------------------------------------------------------------------------
def tracked(node: str, acked: int, sent: int, nack: str = "") -> status_pb2.ProxyStatus:
    types = []
    for url in (RDS, CDS, LDS):
        nonce = "n2" if nack and url == CDS else "n1"
        types.append(xds(url, sent_version="x", sent_nonce=nonce, acked_version="x",
                         acked_at=ts(NOW - 3), sent_policy_revision=sent,
                         acked_policy_revision=acked,
                         nack_nonce=nonce if nack and url == CDS else "",
                         nack_error=nack if url == CDS else ""))
    return status_pb2.ProxyStatus(node_id=node, service="svc", types=types)


def test_describe_tells_which_proxies_run_the_version() -> None:
    resource = policy_pb2.Resource(kind="TrafficPolicy", name="orders", resource_version="7")
    resource.spec.update({"service": "orders"})
    text = cli.describe_resource(resource, [tracked("a", 7, 7), tracked("b", 5, 7),
                                            tracked("c", 5, 5), tracked("d", 5, 8, "bad lb")],
                                 "", NOW)
    assert "Spec:\n  service: orders\n" in text
    assert "Proxies running version 7:" in text
    rows = {line.split()[0]: line for line in text.splitlines()[-4:]}
    assert "yes (ACKed at 2023-11-14T22:13:17Z)" in rows["a"]
    assert "pending" in rows["b"]
    assert "no (not sent yet)" in rows["c"]
    assert "NACKED (bad lb)" in rows["d"]


def test_describe_without_revisions_shows_the_sync_summary() -> None:
    resource = policy_pb2.Resource(kind="TrafficPolicy", name="orders", resource_version="7")
    text = cli.describe_resource(resource, proxies(), "", NOW)
    assert "does not say which config holds this version" in text
    assert "orders~orders-1   orders    SYNCED" in text
    text = cli.describe_resource(resource, None, "cannot reach it", NOW)
    assert text.endswith("Proxies:           unknown (cannot reach it)\n")


def test_violations_name_their_document() -> None:
    docs = cli.parse_documents(MULTI, "m.yaml")
    lines = cli.explain_violations([("documents[1].spec.mtls.mode", "must be one of STRICT"),
                                    ("resources[0]", "duplicate"), ("name", "required"),
                                    ("", "whole request")], docs)
    assert lines == [
        "m.yaml: document 2 (line 10) [MeshConfig/default]: spec.mtls.mode: must be one of STRICT",
        "m.yaml: document 1 (line 1) [TrafficPolicy/orders]: duplicate",
        "name: required",
        "whole request",
    ]


def test_plain_orders_keys_and_shows_whole_numbers_as_integers() -> None:
    value = cli.plain({"weight": 90.0, "subset": "v1", "service": "s", "name": "n",
                       "ratio": 0.5, "list": [{"b": 1.0, "a": 2}]})
    assert list(value) == ["name", "service", "list", "ratio", "subset", "weight"]
    assert value["weight"] == 90 and isinstance(value["weight"], int)
    assert value["ratio"] == 0.5 and value["list"] == [{"a": 2, "b": 1}]
    assert list(value["list"][0]) == ["a", "b"]


def test_hostile_yaml_is_a_clear_error_not_a_hang_or_traceback() -> None:
    bomb = "kind: MeshConfig\nmetadata: {name: default}\nspec:\n  a: &a [x, x, x, x, x, x, x, x]\n"
    for level in "bcdefgh":
        prev = chr(ord(level) - 1)
        bomb += f"  {level}: &{level} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"
    with pytest.raises(CliError) as info:
        cli.to_resource(cli.parse_documents(bomb, "bomb.yaml")[0])
    assert info.value.code == cli.EXIT_USAGE and "too large" in info.value.message
    for levels, why in ((100, "too deeply nested"), (5000, "nested too deeply")):
        deep = "kind: MeshConfig\nspec: {a: " + "[" * levels + "]" * levels + "}\n"
        with pytest.raises(CliError) as info:
            cli.to_resource(cli.parse_documents(deep, "deep.yaml")[0])
        assert info.value.code == cli.EXIT_USAGE and why in info.value.message
