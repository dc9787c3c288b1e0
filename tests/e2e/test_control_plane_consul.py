"""The control plane with Consul as registry and policy store (issue 3, "Show").

Consul is tests/consul_double.py: a real HTTP server speaking the part of Consul's API the mesh
uses (blocking queries, health filtering, agent registration with TTL checks, KV with CAS). The
control plane runs with `--consul URL` of the double; the test looks at Consul the way other
Consul tooling would (its HTTP API), and at the mesh the way a user does (meshctl, calls through
a client sidecar).

Module mesh: orders-1 (v1) and orders-2 (v2) behind sidecars, a client sidecar "frontend-1".
"""

from __future__ import annotations

import base64
import collections
import json
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
import yaml

from tests.consul_double import ConsulDouble
from tests.e2e.cp_fixtures import (
    CDS,
    EDS,
    ORDERS,
    ORDERS_GRPC,
    RDS,
    ControlPlane,
    Load,
    Mesh,
    apply,
    child_env,
    cluster_endpoints,
    consul,
    meshctl,
    proxy_status_rows,
    served_by,
    split_policy,
    start_instance,
    start_mesh,
    wait_synced,
)
from tests.harness import start_sidecar, wait_for
from tests.servers import IdentityServer

GRACE = 1.0  # --grace: how long an announced instance outlives its sidecar's stream
PAY = "/shop.Payments/Pay"
POLICY_KEY = "pymesh/policies/TrafficPolicy/orders"


@pytest.fixture(scope="module")
def double() -> Iterator[ConsulDouble]:
    with ConsulDouble() as d:
        yield d


@pytest.fixture(scope="module")
def mesh(double: ConsulDouble, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    root = tmp_path_factory.mktemp("cp-consul")
    cp = ControlPlane(root / "control-plane", consul=double.url, grace=GRACE)
    mesh = start_mesh(root, cp, versions=(("orders-1", "v1"), ("orders-2", "v2")))
    try:
        yield mesh
    finally:
        mesh.close()


def passing(double: ConsulDouble, service: str) -> dict[str, dict]:
    """Consul's answer to "which instances of `service` can take calls": ID -> entry."""
    status, entries = consul(double.url, f"/v1/health/service/{service}?passing=1")
    assert status == 200, (status, entries)
    return {e["Service"]["ID"]: e for e in entries}


def registered_ids(double: ConsulDouble) -> set[str]:
    status, services = consul(double.url, "/v1/agent/services")
    assert status == 200, (status, services)
    return set(services)


def answer(channel: grpc.Channel, method: str) -> str | None:
    """Who answered one call, or None if it failed (the caller is waiting for a route)."""
    try:
        return channel.unary_unary(method)(b"", timeout=2).decode()
    except grpc.RpcError:
        return None


def register_direct(double: ConsulDouble, app: IdentityServer, service: str,
                    service_id: str, grpc_service: str) -> None:
    """Register an app in Consul directly (as a deploy tool would): no sidecar, no TTL check."""
    status, body = consul(double.url, "/v1/agent/service/register", "PUT", {
        "Name": service, "ID": service_id, "Address": "127.0.0.1", "Port": app.port,
        "Meta": {"grpc_services": grpc_service, "sidecar": "false", "version": "v1"}})
    assert status == 200, (status, body)


def registry_healthy(mesh: Mesh) -> bool | None:
    response = mesh.api.endpoints(ORDERS)
    if response is None or not response.registries:
        return None
    return all(r.healthy for r in response.registries)


def test_announced_instances_are_registered_in_consul_with_passing_ttl_checks(
        mesh: Mesh, double: ConsulDouble) -> None:
    entries = wait_for(lambda: (e := passing(double, ORDERS)) and len(e) == 2 and e,
                       timeout=5, what="both orders instances passing in Consul")
    assert set(entries) == mesh.instance_ids()
    for instance in mesh.instances:
        service = entries[instance.instance_id]["Service"]
        assert f"{service['Address']}:{service['Port']}" == instance.inbound, service
        assert service["Meta"]["version"] == instance.version, service
        assert service["Meta"]["grpc_services"] == ORDERS_GRPC, service
        assert service["Meta"]["sidecar"] == "true", service
        checks = [c for c in entries[instance.instance_id]["Checks"]
                  if c["ServiceID"] == instance.instance_id]
        assert checks and all(c["Type"] == "ttl" and c["Status"] == "passing"
                              for c in checks), checks
    # the client sidecar is registered too, as an instance of its own service
    assert mesh.client_id in passing(double, "frontend")

    shown = meshctl(mesh.cp.address, "endpoints", ORDERS)
    assert shown.code == 0, shown
    for instance in mesh.instances:
        row = next((line.split() for line in shown.out.splitlines()
                    if line.startswith(instance.instance_id + " ")), None)
        assert row is not None and row[1] == instance.inbound, shown
        assert row[2] == instance.version and row[4:6] == ["yes", "consul"], shown
    assert "consul" in shown.out.split("REGISTRY", 1)[1] and " yes" in shown.out, shown


def test_a_stopped_sidecar_is_deregistered_from_consul_after_the_grace_period(
        mesh: Mesh, double: ConsulDouble) -> None:
    extra = start_instance(mesh.cp.address, mesh.root, "orders-3", "v2")
    mesh.extra += [extra.sidecar, extra.app]
    wait_for(lambda: "orders-3" in passing(double, ORDERS), timeout=5,
             what="orders-3 to be registered and passing in Consul")
    wait_for(lambda: extra.inbound in cluster_endpoints(mesh.client)[ORDERS], timeout=5,
             what="the client sidecar to route to orders-3")

    assert extra.sidecar.stop() == 0, extra.sidecar.output()
    stopped = time.monotonic()
    wait_for(lambda: "orders-3" not in registered_ids(double), timeout=GRACE + 5,
             what="orders-3 to be deregistered from Consul")
    assert time.monotonic() - stopped <= GRACE + 5
    wait_for(lambda: extra.inbound not in cluster_endpoints(mesh.client)[ORDERS], timeout=2,
             what="the client sidecar to stop routing to orders-3")
    assert set(passing(double, ORDERS)) == mesh.instance_ids()


def test_a_service_registered_directly_in_consul_is_reachable_within_a_second(
        mesh: Mesh, double: ConsulDouble) -> None:
    app = IdentityServer("payments-1")
    mesh.extra.append(app)
    with grpc.insecure_channel(mesh.client.addr("outbound")) as channel:
        with pytest.raises(grpc.RpcError) as before:
            channel.unary_unary(PAY)(b"", timeout=2)
        assert before.value.code() == grpc.StatusCode.UNIMPLEMENTED  # no route to it yet

        registered = time.monotonic()
        register_direct(double, app, "payments", "payments-1", "shop.Payments")
        wait_for(lambda: answer(channel, PAY) == "payments-1", timeout=1.0, interval=0.02,
                 what="the directly registered payments app to answer through the mesh")
        assert time.monotonic() - registered <= 1.0

        shown = meshctl(mesh.cp.address, "endpoints", "payments", "-o", "json")
        assert shown.code == 0, shown
        [endpoint] = json.loads(shown.out)["endpoints"]
        assert (endpoint["instanceId"], f"{endpoint['address']}:{endpoint['port']}",
                endpoint["source"]) == ("payments-1", app.address, "consul"), shown
        assert not endpoint.get("sidecar", False), shown  # reached directly, not via a sidecar

        # and when it leaves Consul, it leaves the mesh
        status, _ = consul(double.url, "/v1/agent/service/deregister/payments-1", "PUT")
        assert status == 200
        wait_for(lambda: answer(channel, PAY) is None, timeout=1.0, interval=0.02,
                 what="calls to payments to stop reaching the deregistered app")


def test_policies_live_in_consul_kv_and_survive_a_control_plane_restart(
        mesh: Mesh, double: ConsulDouble) -> None:
    load = Load(mesh.client.addr("outbound"))
    try:
        load.wait_calls(0, 50)
        apply(mesh.cp.address, split_policy(0, 100))  # everything to v2
        revision = mesh.api.revision("TrafficPolicy", ORDERS)
        wait_synced(mesh.api, [mesh.client_node], revision, changed=(RDS, CDS, EDS))
        mark = load.mark()
        assert set(load.wait_calls(mark, 100)) == mesh.instance_ids("v2")

        # in Consul's KV, under the mesh's prefix, where every control plane can read it
        status, items = consul(double.url, "/v1/kv/pymesh/policies/?recurse")
        assert status == 200, (status, items)
        stored = {item["Key"]: item for item in items}
        assert POLICY_KEY in stored, sorted(stored)
        value = base64.b64decode(stored[POLICY_KEY]["Value"]).decode()
        stored_doc = json.loads(value)["document"]  # the resource as applied, plus timestamps
        assert (stored_doc["kind"], stored_doc["metadata"]["name"]) == ("TrafficPolicy", ORDERS)
        assert stored_doc["spec"]["routes"][0]["split"] == [
            {"subset": "v1", "weight": 0}, {"subset": "v2", "weight": 100}], value
        before = yaml.safe_load(meshctl(mesh.cp.address, "get", "tp", ORDERS, "-o", "yaml").out)

        # restart with an empty state dir: the policies can only come from Consul
        mesh.cp.restart(state_dir=mesh.root / "control-plane-2")
        wait_synced(mesh.api, mesh.node_ids, timeout=20)
        got = meshctl(mesh.cp.address, "get", "tp", ORDERS, "-o", "yaml")
        assert got.code == 0, got
        after = yaml.safe_load(got.out)
        assert after["spec"] == before["spec"], got
        assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
        # the restarted control plane serves it: calls still all go to v2
        mark = load.mark()
        assert set(load.wait_calls(mark, 200)) == mesh.instance_ids("v2")
    finally:
        load.stop()
    assert not load.failures, (f"{len(load.failures)} of {len(load.served)} calls failed: "
                               f"{load.describe_failures()}\n{mesh.cp.output()}")


def test_consul_down_keeps_the_last_view_and_recovers(mesh: Mesh, double: ConsulDouble) -> None:
    apply(mesh.cp.address, split_policy(50, 50))
    revision = mesh.api.revision("TrafficPolicy", ORDERS)
    wait_synced(mesh.api, mesh.node_ids, revision)
    routed = cluster_endpoints(mesh.client)
    eds_version = {t.type_url: t.sent_version
                   for t in mesh.api.proxies()[mesh.client_node].types}[EDS]

    # watch the client sidecar's endpoints for the whole outage: they must never change
    seen: list[dict[str, list[str]]] = []
    watching = threading.Event()

    def watch() -> None:
        end = time.monotonic() + 60
        while not watching.is_set() and time.monotonic() < end:
            seen.append(cluster_endpoints(mesh.client))
            watching.wait(0.05)

    watcher = threading.Thread(target=watch, name="endpoint-watch", daemon=True)
    load = Load(mesh.client.addr("outbound"))
    try:
        watcher.start()
        load.wait_calls(0, 50)
        double.set_unavailable("refuse")

        wait_for(lambda: registry_healthy(mesh) is False, timeout=10,
                 what="the control plane to report Consul unhealthy")
        shown = meshctl(mesh.cp.address, "endpoints", ORDERS)
        assert shown.code == 0, shown
        registry_row = shown.out.split("REGISTRY", 1)[1].splitlines()[1].split()
        assert registry_row[:2] == ["consul", "no"] and len(registry_row) > 2, shown
        assert all(i.instance_id in shown.out for i in mesh.instances), shown  # last view kept
        # a policy write cannot reach the store: refused clearly, nothing half-done
        refused = meshctl(mesh.cp.address, "apply", "-f", "-", stdin=split_policy(90, 10))
        assert refused.code == 1 and "policy store unavailable" in refused.err, refused
        assert "Traceback" not in refused.err, refused

        mark = load.mark()
        during = collections.Counter(load.wait_calls(mark, 300))
        assert set(during) == mesh.instance_ids(), during  # still both instances
        pushed = {t.type_url: t.sent_version for t in mesh.api.proxies()[mesh.client_node].types}
        assert pushed[EDS] == eds_version, "an endpoint update was pushed during the outage"

        double.set_available()
        wait_for(lambda: registry_healthy(mesh) is True, timeout=15,
                 what="the control plane to see Consul again")
        watching.set()
        watcher.join(5)
        shown = meshctl(mesh.cp.address, "endpoints", ORDERS)
        assert shown.code == 0, shown
        registry_row = shown.out.split("REGISTRY", 1)[1].splitlines()[1].split()
        assert registry_row[:3] == ["consul", "yes", "-"], shown

        # converged: the instances' checks are passing again, and a change in Consul reaches
        # the mesh within a second again
        wait_for(lambda: set(passing(double, ORDERS)) == mesh.instance_ids(), timeout=10,
                 what="the orders instances' TTL checks to pass again")
        app = IdentityServer("payments-2")
        mesh.extra.append(app)
        with grpc.insecure_channel(mesh.client.addr("outbound")) as channel:
            registered = time.monotonic()
            register_direct(double, app, "payments", "payments-2", "shop.Payments")
            wait_for(lambda: answer(channel, PAY) == "payments-2", timeout=1.0, interval=0.02,
                     what="a service registered after the outage to be reachable")
            assert time.monotonic() - registered <= 1.0
            assert set(served_by(channel, 20)) == mesh.instance_ids()  # orders as before
    finally:
        watching.set()
        load.stop()
        double.set_available()
    changed = [s for s in seen if s.get(ORDERS) != routed[ORDERS]
               or s.get("orders|v2") != routed["orders|v2"]]
    assert len(seen) > 10 and not changed, f"endpoints changed during the outage: {changed[:3]}"
    assert not load.failures, (f"{len(load.failures)} of {len(load.served)} calls failed: "
                               f"{load.describe_failures()}")
    status = meshctl(mesh.cp.address, "proxy-status")
    rows = proxy_status_rows(status.out)
    assert all(cells[2:6] == ["SYNCED"] * 4 for cells in rows.values()), status


def test_mtls_sidecars_on_consul_register_their_ports_and_talk_mtls(
        mesh: Mesh, double: ConsulDouble) -> None:
    """Identity on a Consul-backed control plane: the CA state lives in Consul KV, the mTLS
    instance is registered with its mTLS port and Meta pymesh-mtls / pymesh-plaintext-port, a
    caller with a certificate reaches it over mTLS (its app sees the caller's identity) and a
    caller without one reaches its plaintext port (PERMISSIVE, the default)."""
    created = meshctl(mesh.cp.address, "token", "create", "--service", "billing",
                      "--service", "reports")
    assert created.code == 0, created
    status, keys = consul(double.url, "/v1/kv/pymesh/ca/?keys")
    assert status == 200 and "pymesh/ca/tokens" in keys and "pymesh/ca/root" in keys, keys
    env = {"MESH_TOKEN": created.out.strip()}
    app = IdentityServer("billing-1")
    mesh.extra.append(app)
    billing = start_sidecar(service="billing", app=app.address, name="sidecar-billing-1",
                            env=child_env(env),
                            extra=["--control-plane", mesh.cp.address, "--instance-id",
                                   "billing-1", "--grpc-service", "shop.Billing",
                                   "--state-dir", str(mesh.root / "billing-1"),
                                   "--no-learn-method-shapes"])
    mesh.extra.append(billing)
    reports = start_sidecar(service="reports", name="sidecar-reports-1", env=child_env(env),
                            extra=["--control-plane", mesh.cp.address, "--instance-id",
                                   "reports-1", "--state-dir", str(mesh.root / "reports-1"),
                                   "--no-learn-method-shapes"])
    mesh.extra.append(reports)

    entry = wait_for(lambda: passing(double, "billing").get("billing-1"), timeout=10,
                     what="billing-1 registered and passing in Consul")
    service = entry["Service"]
    assert f"{service['Address']}:{service['Port']}" == billing.addr("inbound"), service
    assert service["Meta"]["pymesh-mtls"] == "true", service
    assert service["Meta"]["pymesh-plaintext-port"] == \
        billing.addr("inbound_plaintext").rsplit(":", 1)[1], service

    with grpc.insecure_channel(reports.addr("outbound")) as channel:
        wait_for(lambda: answer(channel, "/shop.Billing/Charge") == "billing-1", timeout=15,
                 interval=0.1, what="reports -> billing over mTLS")
    assert app.last_metadata.get("x-forwarded-client-cert") == \
        "URI=spiffe://pymesh.local/service/reports"
    with grpc.insecure_channel(mesh.client.addr("outbound")) as channel:  # no certificate
        wait_for(lambda: answer(channel, "/shop.Billing/Charge") == "billing-1", timeout=15,
                 interval=0.1, what="frontend (plaintext) -> billing's plaintext port")
    assert "x-forwarded-client-cert" not in app.last_metadata
