"""`make demo`: the shop on the control plane, one sidecar per instance, and a load generator
showing live progress.

    python -m demo_services.run [--duration S] [--rps N] [--payments-fail-rate F] ...

Starts the control plane, then every app instance and its sidecar (following the control plane
over ADS) on 127.0.0.1 with kernel-chosen ports (the order is explained in topology.py), waits
until every calling sidecar has endpoints for all the instances it calls, prints the control
plane's address and meshctl commands to try (a 90/10 split of payments between v1 and v2), then
drives the frontend through a "client" sidecar. Ctrl-C or SIGTERM (or --duration) stops the
load, then the processes, callers before callees and the control plane last, and exits 0. Logs,
ready files and state (policies, sidecar snapshots; wiped at start) go to --workdir (default
.demo/).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import os
import shlex
import shutil
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from demo_services import loadgen, topology
from demo_services.stats import format_summary
from demo_services.supervisor import Child, StartupError, stop_group, wait_ready

ROOT = Path(__file__).resolve().parent.parent
CONTROL_PLANE = "control-plane"  # its process name (logs/, ready/, state/)
SPLIT_POLICY = ROOT / "demo_services" / "policies" / "payments-split.yaml"
STRICT_POLICY = ROOT / "demo_services" / "policies" / "mtls-strict.yaml"
AUTHZ_POLICY = ROOT / "demo_services" / "policies" / "payments-authz.yaml"


def fetch_clusters(admin: str) -> dict[str, Any]:
    """A sidecar's /clusters (cluster -> lb policy and endpoints); {} while it cannot answer."""
    try:
        with urllib.request.urlopen(f"http://{admin}/clusters", timeout=2) as response:
            doc = json.load(response)
    except (OSError, urllib.error.URLError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m demo_services.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    loadgen.add_load_flags(p)
    p.add_argument("--payments-instances", type=int, default=2)
    p.add_argument("--catalog-instances", type=int, default=2)
    p.add_argument("--payments-fail-rate", type=float, default=0.0,
                   help="fraction of charges each payments instance fails with UNAVAILABLE")
    p.add_argument("--payments-delay-ms", type=int, default=0,
                   help="latency each payments instance adds to a charge")
    p.add_argument("--workdir", default=str(ROOT / ".demo"),
                   help="logs/ and ready/ of every process go here")
    p.add_argument("--sidecar-cmd", default=f"{shlex.quote(sys.executable)} -m sidecar",
                   help="command that runs the sidecar (the demo adds its flags)")
    p.add_argument("--sidecar-arg", action="append", default=[], metavar="ARG",
                   help="extra flag for every sidecar (repeatable), e.g. --sidecar-arg="
                        "--log-level=WARNING")
    p.add_argument("--control-plane-arg", action="append", default=[], metavar="ARG",
                   help="extra flag for the control plane (repeatable), e.g. "
                        "--control-plane-arg=--log-level=DEBUG")
    p.add_argument("--plaintext", action="store_true",
                   help="run the sidecars without workload identities (no mTLS between them)")
    p.add_argument("--summary-json", help="write the run's totals and processes here at exit")
    p.add_argument("--ready-timeout", type=float, default=60.0,
                   help="seconds each start-up step may take")
    args = p.parse_args(argv)
    if args.rps <= 0 or args.users <= 0:
        p.error("--rps and --users must be positive")
    if args.payments_instances < 1 or args.catalog_instances < 1:
        p.error("every service needs at least one instance")
    if not 0.0 <= args.payments_fail_rate <= 1.0:
        p.error("--payments-fail-rate must be within [0, 1]")
    return args


def child_env() -> dict[str, str]:
    """The children's environment: our code importable, no stray MESH_* settings inherited
    (the sidecar reads every flag from MESH_* too, and the demo must be reproducible)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), str(ROOT / "gen"), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Demo:
    """Starts the processes in dependency order and stops them in the reverse order."""

    def __init__(self, args: argparse.Namespace, stop: asyncio.Event) -> None:
        self.args = args
        self.stop = stop
        self.workdir = Path(args.workdir).resolve()
        self.shop = topology.shop(payments=args.payments_instances,
                                  catalog=args.catalog_instances,
                                  payments_fail_rate=args.payments_fail_rate,
                                  payments_delay_ms=args.payments_delay_ms)
        self.sidecar_cmd = shlex.split(args.sidecar_cmd)
        self.env = child_env()
        # Start groups, in start order; stopped in reverse.
        self.groups: list[list[Child]] = []
        self.inbound: dict[str, list[str]] = {}  # mesh service -> its sidecars' inbound
        self.control_plane = ""  # its gRPC address (ADS, policy and status APIs)
        self.control_plane_admin = ""
        self.token_files: dict[str, Path] = {}  # mesh service -> its bootstrap token file

    def _ready_path(self, name: str) -> Path:
        return self.workdir / "ready" / f"{name}.json"

    def _state_path(self, name: str) -> Path:
        return self.workdir / "state" / name

    def _spawn(self, name: str, argv: list[str]) -> Child:
        return Child(name, argv, workdir=self.workdir, ready_file=self._ready_path(name),
                     env=self.env, cwd=ROOT)

    def _spawn_group(self, specs: list[tuple[str, list[str]]]) -> list[Child]:
        group = [self._spawn(name, argv) for name, argv in specs]
        self.groups.append(group)
        return group

    async def _start_group(self, specs: list[tuple[str, list[str]]]) -> list[Child] | None:
        group = self._spawn_group(specs)
        ok = await wait_ready(group, self.stop, timeout=self.args.ready_timeout)
        return group if ok else None

    def children(self) -> list[Child]:
        return [c for g in self.groups for c in g]

    async def start(self) -> str | None:
        """Start everything; returns the client sidecar's outbound address (None: interrupted)."""
        (self.workdir / "ready").mkdir(parents=True, exist_ok=True)
        # Every run starts from a clean mesh: no policy applied in an earlier run, no sidecar
        # snapshot naming the ports of processes long gone.
        await asyncio.to_thread(shutil.rmtree, self.workdir / "state", True)
        group = await self._start_group([(CONTROL_PLANE, topology.control_plane_argv(
            state_dir=str(self._state_path(CONTROL_PLANE)),
            ready_file=str(self._ready_path(CONTROL_PLANE)),
            extra=self.args.control_plane_arg))])
        if group is None:
            return None
        self.control_plane = group[0].addresses["grpc"]
        self.control_plane_admin = group[0].addresses["admin"]
        if not self.args.plaintext:
            # One bootstrap token per service, as an operator would create with `meshctl token
            # create --service NAME`: a sidecar can claim only its own service. Each sidecar
            # then gets its own certificate from the control plane's CA and talks mTLS.
            names = [spec.name for spec in self.shop.services] + [topology.CLIENT_SERVICE]
            for name in names:
                path = self._state_path(f"token-{name}")
                token = await create_token(self.control_plane, [name])
                await asyncio.to_thread(_write_secret, path, token)
                self.token_files[name] = path

        app_specs = []
        for spec in self.shop.services:
            for inst in spec.instance_ids():
                argv = topology.app_argv(spec, inst, str(self._ready_path(inst)),
                                         str(self._ready_path(f"sidecar-{inst}")))
                app_specs.append((inst, argv))
        group = await self._start_group(app_specs)
        if group is None:
            return None
        apps = {c.name: c for c in group}

        # All sidecars at once: none needs another's address any more. One group per tier,
        # callees first, so that shutdown (reverse order) stops callers before callees.
        sidecars: list[Child] = []
        for tier in self.shop.tiers():
            specs = []
            for spec in tier:
                for inst, version in spec.instances_with_versions():
                    name = f"sidecar-{inst}"
                    specs.append((name, self._sidecar_argv(
                        name, service=spec.name, instance_id=inst, version=version,
                        app=apps[inst].addresses["server"], grpc_services=[spec.grpc_service])))
            sidecars += self._spawn_group(specs)
        client = f"sidecar-{topology.CLIENT_SERVICE}"
        sidecars += self._spawn_group([(client, self._sidecar_argv(
            client, service=topology.CLIENT_SERVICE, instance_id=f"{topology.CLIENT_SERVICE}-1",
            app=None))])
        if not await wait_ready(sidecars, self.stop, timeout=self.args.ready_timeout):
            return None
        for spec in self.shop.services:
            self.inbound[spec.name] = [
                c.addresses["inbound"] for c in sidecars
                if c.name.startswith(f"sidecar-{spec.name}-")]
        if not await self._wait_converged(sidecars):
            return None
        addresses = {c.name: c.addresses for c in self.children()}
        await asyncio.to_thread((self.workdir / "addresses.json").write_text,
                                json.dumps(addresses, indent=2))
        return sidecars[-1].addresses["outbound"]

    def _sidecar_argv(self, name: str, *, service: str, instance_id: str, app: str | None,
                      version: str = "", grpc_services: Sequence[str] = ()) -> list[str]:
        return topology.sidecar_argv(
            self.sidecar_cmd, service=service, app=app, control_plane=self.control_plane,
            instance_id=instance_id, version=version, grpc_services=grpc_services,
            ready_file=str(self._ready_path(name)), state_dir=str(self._state_path(name)),
            extra=([*(["--token-file", str(self.token_files[service])]
                      if service in self.token_files else []),
                    *self.args.sidecar_arg]))

    async def _wait_converged(self, sidecars: list[Child]) -> bool:
        """Wait until every calling sidecar has endpoints for every instance of the services its
        app calls (its /clusters), so the load starts on a complete mesh. A sidecar is ready
        with its first config, which may predate instances that announced themselves later."""
        expected: dict[str, dict[str, set[str]]] = {}  # admin address -> cluster -> endpoints
        by_name = {c.name: c for c in sidecars}
        callers = [(spec.name, spec.calls, spec.instance_ids()) for spec in self.shop.services]
        callers.append((topology.CLIENT_SERVICE, self.shop.client_calls,
                        [topology.CLIENT_SERVICE]))
        for _service, calls, instances in callers:
            for inst in instances:
                if not calls:
                    continue
                admin = by_name[f"sidecar-{inst}"].addresses["admin"]
                expected[admin] = {c: set(self.inbound[c]) for c in calls}
        deadline = time.monotonic() + self.args.ready_timeout
        pending = dict(expected)
        while pending:
            if self.stop.is_set():
                return False
            for child in sidecars:
                if not child.alive():
                    raise StartupError(f"{child.name} exited with {child.proc.returncode} "
                                       f"while the mesh converged:\n{child.log_tail()}")
            done = []
            for admin, want in pending.items():
                clusters = await asyncio.to_thread(fetch_clusters, admin)
                if all({e["address"] for e in clusters.get(name, {}).get("endpoints", [])}
                       == addresses for name, addresses in want.items()):
                    done.append(admin)
            for admin in done:
                del pending[admin]
            if pending and time.monotonic() > deadline:
                raise StartupError(
                    f"the mesh did not converge within {self.args.ready_timeout:.0f}s: "
                    f"sidecars with admin {', '.join(pending)} lack endpoints (see "
                    f"{self.workdir / 'logs'})")
            if pending:
                await asyncio.sleep(0.1)
        return True

    def dead_children(self) -> list[Child]:
        return [c for c in self.children() if not c.alive()]

    async def shutdown(self) -> list[str]:
        """Callers first: the load is already stopped, so nothing is cut off mid-call."""
        killed: list[str] = []
        for group in reversed(self.groups):
            killed += await stop_group(group)
        return killed

    def describe(self, target: str) -> str:
        lines = [f"demo shop is up (logs in {self.workdir / 'logs'}):"]
        for tier in reversed(self.shop.tiers()):
            for spec in tier:
                calls = f" -> {', '.join(spec.calls)}" if spec.calls else ""
                versions = {v for _, v in spec.instances_with_versions()}
                labels = (" (" + ", ".join(f"{i} {v}" for i, v in spec.instances_with_versions())
                          + ")") if len(versions) > 1 else ""
                lines.append(f"  {spec.name:9} {spec.instances} instance(s){labels}, sidecar "
                             f"inbound {', '.join(self.inbound[spec.name])}{calls}")
        lines.append(f"  load generator -> client sidecar {target} -> frontend")
        admin = self.children()[-1].addresses.get("admin")
        lines.append(f"every process's addresses: {self.workdir / 'addresses.json'} "
                     f"(e.g. curl http://{admin}/clusters)")
        lines.append(f"control plane: {self.control_plane} (ADS, policy and status APIs; "
                     f"metrics http://{self.control_plane_admin}/metrics)")
        meshctl = meshctl_command(self.control_plane)
        lines.append("try, from another terminal (the payments counts below then move to about "
                     "90/10):")
        lines.append(f"  {meshctl} apply -f {_shown(SPLIT_POLICY)}")
        lines.append(f"  {meshctl} proxy-status")
        lines.append(f"  {meshctl} delete TrafficPolicy payments")
        if self.token_files:
            lines.append("mTLS: each sidecar has its own certificate from the control plane's CA "
                         "(spiffe://pymesh.local/service/NAME; mode PERMISSIVE). Try:")
            lines.append(f"  {meshctl} apply -f {_shown(STRICT_POLICY)}   # plaintext refused")
            lines.append(f"  {meshctl} apply -f {_shown(AUTHZ_POLICY)}  # only orders may "
                         "call payments")
            lines.append(f"  {meshctl} ca show")
        return "\n".join(lines)


async def create_token(control_plane: str, services: Sequence[str]) -> str:
    import grpc
    from mesh.v1 import ca_pb2, ca_pb2_grpc  # generated (make protos)

    async with grpc.aio.insecure_channel(control_plane) as channel:
        response = await ca_pb2_grpc.TokenServiceStub(channel).Create(
            ca_pb2.CreateTokenRequest(services=list(services), description="make demo"),
            timeout=10)
    return str(response.secret)


def _write_secret(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # also when the file was there before with wider permissions
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")


def meshctl_command(control_plane: str) -> str:
    """How to run meshctl from this checkout: the venv's console script when installed."""
    script = Path(sys.executable).parent / "meshctl"
    if script.exists():
        base = _shown(script)
    else:
        base = f"{_shown(Path(sys.executable))} -m control_plane.cli"
    return f"{base} --control-plane {control_plane}"


def _shown(path: Path) -> str:
    """A path relative to the checkout when it is inside it (shorter to copy)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return shlex.quote(str(path))


async def watch_children(demo: Demo, failed: list[str],
                         notice: loadgen.ProgressPrinter) -> None:
    """Say at once when a process dies during the run, with the end of its log, rather than
    leave a stream of UNAVAILABLE errors unexplained. The demo goes on (the mesh should route
    around a dead instance), but the run will exit 1."""
    reported: set[str] = set()
    while True:
        for child in demo.dead_children():
            if child.name not in reported:
                reported.add(child.name)
                message = (f"{child.name} exited with {child.proc.returncode} during the run:\n"
                           f"{child.log_tail(5)}")
                failed.append(message)
                notice.say(message)
        await asyncio.sleep(0.2)


async def run(args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # SIGHUP too: closing the terminal should stop the demo as cleanly as Ctrl-C does.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    demo = Demo(args, stop)
    failed: list[str] = []
    summary: dict[str, Any] = {}
    printer = loadgen.ProgressPrinter()
    try:
        target = await demo.start()
        if target is not None:
            printer.say(demo.describe(target))
            printer.say("load: Ctrl-C to stop" if args.duration is None
                        else f"load: {args.duration:g}s")
            watcher = asyncio.create_task(watch_children(demo, failed, printer))
            stats = await loadgen.run_load(target, rps=args.rps, duration=args.duration,
                                           users=args.users, stop=stop, on_progress=printer,
                                           seed=args.seed)
            watcher.cancel()
            printer.finish()
            summary = stats.summary(time.monotonic())
            printer.say(format_summary(summary))
    except StartupError as exc:
        failed.append(str(exc))
    finally:
        printer.finish()
        printer.say("stopping...")
        killed = await demo.shutdown()
        if killed:
            printer.say(f"had to SIGKILL: {', '.join(killed)}")
    for message in failed:
        printer.say(f"demo failed: {message}")
    summary["failed"] = failed
    summary["processes"] = [{"name": c.name, "pid": c.pid, "returncode": c.proc.returncode}
                            for c in demo.children()]
    printer.say("stopped.")
    return (1 if failed else 0), summary


@contextlib.contextmanager
def workdir_lock(workdir: Path):
    """Two demos sharing a workdir would read each other's ready files."""
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / "lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"another demo is running in {workdir}; pass --workdir") from None
        yield


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with workdir_lock(Path(args.workdir)):
        code, summary = asyncio.run(run(args))
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary, indent=2))
    return code


if __name__ == "__main__":
    sys.exit(main())
