"""Shared pieces of the control-plane end-to-end tests (issue 3, "Show").

Everything here drives real processes over real sockets on 127.0.0.1: the control plane
(`python -m control_plane`), sidecars following it, meshctl as a subprocess, IdentityServer apps
(each answers with its own name, so a call shows which instance served it). The test process
itself also reads the control plane's status and policy APIs over gRPC, but only to *wait* on
conditions cheaply; what a test asserts is what a user sees (meshctl output and exit codes,
which instance answered, whether a call failed).
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc
from mesh.v1 import policy_pb2, policy_pb2_grpc, status_pb2, status_pb2_grpc

from tests.harness import ROOT, ManagedProcess, start_sidecar, wait_for
from tests.servers import IdentityServer

ORDERS = "orders"
ORDERS_GRPC = "shop.Orders"
PLACE = "/shop.Orders/Place"
CALL_TIMEOUT = 5.0

LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
RDS = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
XDS_TYPES = (LDS, RDS, CDS, EDS)


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "gen"),
                                         env.get("PYTHONPATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("MESH_CONTROL_PLANE", None)  # every meshctl call names its control plane
    env.update(extra or {})
    return env


# --- the control plane ------------------------------------------------------------------------
class ControlPlane:
    """`mesh-control-plane` as a child process; can be killed and restarted on the same port."""

    def __init__(self, state_dir: Path, *, consul: str | None = None,
                 grace: float | None = None, listen: str = "127.0.0.1:0") -> None:
        self.state_dir = state_dir
        self.consul = consul
        self.grace = grace
        self.proc = self._spawn(listen)
        self.address = self.proc.addr("grpc")
        self.generations = [self.proc]

    def _spawn(self, listen: str) -> ManagedProcess:
        argv = [sys.executable, "-m", "control_plane", "--listen", listen,
                "--admin", "127.0.0.1:0", "--state-dir", str(self.state_dir)]
        if self.consul:
            argv += ["--consul", self.consul]
        if self.grace is not None:
            argv += ["--grace", str(self.grace)]
        return ManagedProcess(argv, "control-plane", env=child_env())

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def kill(self) -> int:
        """SIGKILL: no drain, no goodbye to anyone (streams just break)."""
        return self.proc.stop(signal.SIGKILL)

    def restart(self, state_dir: Path | None = None) -> None:
        """Start again on the same gRPC port (stopping it first with SIGTERM if still alive);
        optionally with a fresh --state-dir."""
        if self.proc.alive():
            self.proc.stop()
        if state_dir is not None:
            self.state_dir = state_dir
        self.proc = self._spawn(f"127.0.0.1:{self.port}")
        assert self.proc.addr("grpc") == self.address
        self.generations.append(self.proc)

    def stop(self) -> int:
        return self.proc.stop()

    def output(self) -> str:
        return "\n".join(f"--- control plane run {i + 1} ---\n{p.output()[-6000:]}"
                         for i, p in enumerate(self.generations))


@dataclass(frozen=True)
class Meshctl:
    code: int
    out: str
    err: str

    def __str__(self) -> str:
        return f"exit {self.code}\n--- stdout ---\n{self.out}--- stderr ---\n{self.err}"


def meshctl(control_plane: str, *args: str, stdin: str | None = None,
            timeout: float = 30.0, env: Mapping[str, str] | None = None) -> Meshctl:
    """Run meshctl exactly as a user would (a fresh process), against `control_plane`."""
    done = subprocess.run([sys.executable, "-m", "control_plane.cli", "--control-plane",
                           control_plane, *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, env=child_env(env), cwd=ROOT)
    return Meshctl(done.returncode, done.stdout, done.stderr)


def apply(control_plane: str, yaml_text: str) -> Meshctl:
    result = meshctl(control_plane, "apply", "-f", "-", stdin=yaml_text)
    assert result.code == 0, f"meshctl apply failed:\n{result}"
    return result


class MeshApi:
    """The control plane's status and policy APIs, read from the test to wait on conditions."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.status = status_pb2_grpc.StatusServiceStub(self.channel)  # type: ignore[no-untyped-call]
        self.policy = policy_pb2_grpc.PolicyServiceStub(self.channel)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        self.channel.close()

    def proxies(self) -> dict[str, status_pb2.ProxyStatus]:
        """Connected proxies by node id; empty while the control plane does not answer."""
        try:
            response = self.status.ProxyStatus(status_pb2.ProxyStatusRequest(), timeout=2)
        except grpc.RpcError:
            return {}
        return {p.node_id: p for p in response.proxies}

    def endpoints(self, service: str) -> status_pb2.EndpointsResponse | None:
        try:
            return self.status.Endpoints(status_pb2.EndpointsRequest(service=service), timeout=2)
        except grpc.RpcError:
            return None

    def revision(self, kind: str, name: str) -> int:
        resource = self.policy.Get(policy_pb2.GetRequest(kind=kind, name=name), timeout=5)
        return int(resource.resource_version)


def synced(proxy: status_pb2.ProxyStatus, min_policy_revision: int = 0,
           changed: Sequence[str] = (RDS,)) -> bool:
    """All four types pushed and ACKed at the version sent, none NACKed, and the `changed` types
    ACKed at config computed from at least `min_policy_revision` of the policy store.

    The control plane pushes a type only when its content changes, so only the types a policy
    change touches carry its revision: a route-only change moves RDS alone, a policy that adds
    subset clusters moves RDS, CDS and EDS (a sidecar ACKs clusters before their endpoints
    arrive and applies the set once complete, so such a policy is in force once EDS is ACKed at
    the new revision too)."""
    by_url = {t.type_url: t for t in proxy.types}
    for url in XDS_TYPES:
        t = by_url.get(url)
        if t is None or not t.sent_version or t.acked_version != t.sent_version:
            return False
        if t.nack_error and t.nack_nonce == t.sent_nonce:
            return False
    return all(by_url[url].acked_policy_revision >= min_policy_revision for url in changed)


def wait_synced(api: MeshApi, node_ids: Iterable[str], min_policy_revision: int = 0,
                timeout: float = 15.0, changed: Sequence[str] = (RDS,),
                ) -> dict[str, status_pb2.ProxyStatus]:
    wanted = set(node_ids)

    def check() -> dict[str, status_pb2.ProxyStatus] | None:
        proxies = api.proxies()
        if all(n in proxies and synced(proxies[n], min_policy_revision, changed)
               for n in wanted):
            return proxies
        return None

    result: dict[str, status_pb2.ProxyStatus] = wait_for(
        check, timeout=timeout, interval=0.05,
        what=f"{sorted(wanted)} to be SYNCED at policy revision >= {min_policy_revision}")
    return result


def proxy_status_rows(text: str) -> dict[str, list[str]]:
    """`meshctl proxy-status` table -> {NAME: [cells...]}"""
    lines = [line.split() for line in text.splitlines() if line.strip()]
    assert lines and lines[0][:2] == ["NAME", "SERVICE"], text
    return {cells[0]: cells for cells in lines[1:]}


# --- sidecars and their apps ------------------------------------------------------------------
def node_id(service: str, instance_id: str) -> str:
    return f"{service}~{instance_id}"


class App(Protocol):
    """What an instance's app must offer (IdentityServer, tests/e2e/flaky_app.FlakyApp)."""

    name: str
    address: str

    def stop(self) -> None: ...


@dataclass
class MeshInstance:
    """One instance of a service: its app and the sidecar in front of it."""

    instance_id: str
    version: str
    app: Any  # an App: IdentityServer unless the test brought its own
    sidecar: ManagedProcess
    service: str = ORDERS

    @property
    def node_id(self) -> str:
        return node_id(self.service, self.instance_id)

    @property
    def inbound(self) -> str:
        return self.sidecar.addr("inbound")


def start_instance(control_plane: str, state_root: Path, instance_id: str, version: str, *,
                   service: str = ORDERS, grpc_service: str = ORDERS_GRPC,
                   app: App | None = None) -> MeshInstance:
    """An IdentityServer named `instance_id` (or `app`, already running) behind a sidecar that
    announces it. The app is stopped if the sidecar does not start."""
    app = IdentityServer(instance_id) if app is None else app
    try:
        sidecar = start_sidecar(service=service, app=app.address, name=f"sidecar-{instance_id}",
                                extra=["--control-plane", control_plane, "--version", version,
                                       "--grpc-service", grpc_service,
                                       "--instance-id", instance_id,
                                       "--state-dir", str(state_root / instance_id)])
    except BaseException:
        app.stop()
        raise
    return MeshInstance(instance_id, version, app, sidecar, service)


def start_client_sidecar(control_plane: str, state_dir: Path, instance_id: str,
                         service: str = "frontend") -> ManagedProcess:
    """A sidecar with no app of its own: a client's way into the mesh (its outbound port)."""
    return start_sidecar(service=service, name=f"sidecar-{instance_id}",
                         extra=["--control-plane", control_plane, "--instance-id", instance_id,
                                "--state-dir", str(state_dir)])


def http_get(address: str, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def ready(sidecar: ManagedProcess) -> bool:
    with contextlib.suppress(OSError):
        return http_get(sidecar.addr("admin"), "/ready")[0] == 200
    return False


def cluster_endpoints(sidecar: ManagedProcess) -> dict[str, list[str]]:
    """{cluster: [endpoint address]} as the sidecar routes right now (its /clusters)."""
    status, body = http_get(sidecar.addr("admin"), "/clusters")
    assert status == 200, body
    return {name: sorted(e["address"] for e in c["endpoints"])
            for name, c in json.loads(body).items()}


# --- calls ------------------------------------------------------------------------------------
@dataclass
class Failure:
    at: float
    code: str
    details: str


@dataclass
class Load:
    """Calls made back to back by one background thread, each recorded in order.

    Bounded: it stops after `max_calls` or `max_seconds`, whichever comes first, even if the test
    forgets to stop it."""

    target: str
    method: str = PLACE
    metadata: Sequence[tuple[str, str]] = ()
    max_calls: int = 40_000
    max_seconds: float = 90.0
    served: list[str] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._channel = grpc.insecure_channel(self.target)
        self._thread = threading.Thread(target=self._run, name="load", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        call = self._channel.unary_unary(self.method)
        deadline = time.monotonic() + self.max_seconds
        try:
            while (not self._stop.is_set() and time.monotonic() < deadline
                   and len(self.served) + len(self.failures) < self.max_calls):
                try:
                    answer = call(b"", metadata=self.metadata, timeout=CALL_TIMEOUT).decode()
                except grpc.RpcError as err:
                    failure = Failure(time.monotonic(), err.code().name,  # type: ignore[attr-defined]
                                      err.details() or "")  # type: ignore[attr-defined]
                    with self._cond:
                        self.failures.append(failure)
                        self._cond.notify_all()
                    continue
                with self._cond:
                    self.served.append(answer)
                    self._cond.notify_all()
        finally:
            with self._cond:
                self._stop.set()
                self._cond.notify_all()

    @property
    def running(self) -> bool:
        return not self._stop.is_set()

    def mark(self) -> int:
        with self._cond:
            return len(self.served)

    def wait_calls(self, since: int, count: int, timeout: float = 30.0) -> list[str]:
        """The `count` answers after mark `since`, once there (fails if the load stopped)."""
        end = time.monotonic() + timeout
        with self._cond:
            while len(self.served) < since + count:
                left = end - time.monotonic()
                if left <= 0 or self._stop.is_set():
                    raise TimeoutError(f"load made {len(self.served) - since} of {count} calls "
                                       f"since the mark (running={self.running}, failures="
                                       f"{len(self.failures)})")
                self._cond.wait(left)
            return self.served[since:since + count]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(CALL_TIMEOUT + 5)
        self._channel.close()

    def describe_failures(self, limit: int = 5) -> str:
        kinds = collections.Counter(f"{f.code}: {f.details}" for f in self.failures)
        return "; ".join(f"{n}x {what}" for what, n in kinds.most_common(limit))


def served_by(channel: grpc.Channel, count: int,
              metadata: Sequence[tuple[str, str]] = ()) -> collections.Counter[str]:
    call = channel.unary_unary(PLACE)
    return collections.Counter(call(b"", metadata=metadata, timeout=CALL_TIMEOUT).decode()
                               for _ in range(count))


# --- policies ---------------------------------------------------------------------------------
def split_policy(v1: int, v2: int, *, canary: bool = False, name: str = ORDERS) -> str:
    """The orders TrafficPolicy: subsets by version, a v1/v2 split, and optionally a canary
    route first (header `x-canary: true` -> all v2)."""
    canary_route = ("    - name: canary\n"
                    f"      match: {{method: /{ORDERS_GRPC}/*, headers: "
                    "[{name: x-canary, exact: \"true\"}]}\n"
                    "      split: [{subset: v2, weight: 100}]\n") if canary else ""
    return (f"kind: TrafficPolicy\n"
            f"metadata: {{name: {name}}}\n"
            f"spec:\n"
            f"  service: {ORDERS}\n"
            f"  subsets: [{{name: v1, labels: {{version: v1}}}}, "
            f"{{name: v2, labels: {{version: v2}}}}]\n"
            f"  routes:\n"
            f"{canary_route}"
            f"    - name: default\n"
            f"      split: [{{subset: v1, weight: {v1}}}, {{subset: v2, weight: {v2}}}]\n")


def stop_all(things: Iterable[Any]) -> None:
    """Stop sidecars / servers / control planes, whatever fails on the way."""
    for thing in things:
        with contextlib.suppress(Exception):
            thing.stop()


def consul(base_url: str, path: str, method: str = "GET",
           body: Any = None) -> tuple[int, Any]:
    """One request to a Consul HTTP API (here: the double), as other Consul tooling makes it:
    (status, parsed JSON body or None)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{base_url}{path}", data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            raw = response.read()
            status = response.status
    except urllib.error.HTTPError as err:
        return err.code, None
    try:
        return status, json.loads(raw or b"null")
    except json.JSONDecodeError:
        return status, raw.decode(errors="replace")


@dataclass
class Mesh:
    """A control plane, the orders instances behind their sidecars, and a client sidecar."""

    root: Path
    cp: ControlPlane
    instances: list[MeshInstance]
    client: ManagedProcess
    client_id: str
    api: MeshApi
    extra: list[Any] = field(default_factory=list)  # whatever a test adds, stopped at the end

    @property
    def client_node(self) -> str:
        return node_id("frontend", self.client_id)

    @property
    def node_ids(self) -> list[str]:
        return [i.node_id for i in self.instances] + [self.client_node]

    def instance_ids(self, version: str | None = None) -> set[str]:
        return {i.instance_id for i in self.instances if version in (None, i.version)}

    def close(self) -> None:
        self.api.close()
        stop_all([*self.extra, self.client, *(i.sidecar for i in self.instances),
                  *(i.app for i in self.instances), self.cp])


def start_mesh(root: Path, cp: ControlPlane,
               versions: Sequence[tuple[str, str]] = (("orders-1", "v1"), ("orders-2", "v1"),
                                                      ("orders-3", "v2")),
               client_id: str = "frontend-1",
               make_app: Callable[[str], App] | None = None) -> Mesh:
    """Sidecars for `versions` ((instance id, version) of orders) and one client sidecar, all
    following `cp`; returns once every one of them is SYNCED. `make_app(instance_id)` makes
    each instance's app (default: an IdentityServer)."""
    instances: list[MeshInstance] = []
    try:
        for instance_id, version in versions:
            app = make_app(instance_id) if make_app is not None else None
            instances.append(start_instance(cp.address, root, instance_id, version, app=app))
        client = start_client_sidecar(cp.address, root / client_id, client_id)
    except BaseException:
        stop_all([*(i.sidecar for i in instances), *(i.app for i in instances), cp])
        raise
    mesh = Mesh(root, cp, instances, client, client_id, MeshApi(cp.address))
    try:
        wait_synced(mesh.api, mesh.node_ids)
        wait_for(lambda: ready(client), timeout=10, what="the client sidecar's /ready")
        wait_for(lambda: len(cluster_endpoints(client).get(ORDERS, [])) == len(instances),
                 timeout=10, what="the client sidecar to route to every orders instance")
    except BaseException:
        mesh.close()
        raise
    return mesh
