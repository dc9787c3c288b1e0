"""Start the project's programs as real processes on 127.0.0.1 with port 0.

Every program of ours that listens takes `--ready-file PATH`: once all its ports are bound it
writes a JSON object naming them ({"outbound": "127.0.0.1:40123", ...}) atomically. Tests wait
on that file instead of sleeping or guessing free ports.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal as _signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.01, what: str = "condition"):
    """Poll `predicate` until it returns a truthy value; fail the test on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class ManagedProcess:
    """A child process that reports its bound ports through a ready file."""

    def __init__(self, argv: Sequence[str], name: str, env: dict[str, str] | None = None,
                 ready_timeout: float = 20.0) -> None:
        self.name = name
        self._dir = tempfile.mkdtemp(prefix=f"{name}-")
        self.ready_file = os.path.join(self._dir, "ready.json")
        self.log_path = os.path.join(self._dir, "output.log")
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "gen"),
                                                  full_env.get("PYTHONPATH", "")])
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        if env:
            full_env.update(env)
        self._log = open(self.log_path, "wb")  # closed in stop()
        self.proc = subprocess.Popen([*argv, "--ready-file", self.ready_file],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=full_env,
                                     cwd=str(ROOT))
        self.ports: dict[str, str] = {}
        try:
            wait_for(self._read_ready, timeout=ready_timeout, what=f"{name} to become ready")
        except Exception:
            self.stop()
            raise RuntimeError(f"{name} did not start:\n{self.output()}") from None

    def _read_ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.output()}")
        try:
            with open(self.ready_file) as f:
                self.ports = json.load(f)
            return True
        except (FileNotFoundError, json.JSONDecodeError):
            return False

    def addr(self, port_name: str) -> str:
        return self.ports[port_name]

    def output(self) -> str:
        with contextlib.suppress(OSError):
            return Path(self.log_path).read_text(errors="replace")
        return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            self.proc.send_signal(sig)

    def stop(self, sig: int = _signal.SIGTERM, timeout: float = 15.0) -> int:
        """Stop the process (SIGTERM, then SIGKILL after `timeout`) and return its exit code."""
        if self.alive():
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode


def start_sidecar(*, service: str, app: str | None = None,
                  upstreams: dict[str, Sequence[str]] | None = None,
                  routes: dict[str, str] | None = None, config: str | None = None,
                  extra: Sequence[str] = (), name: str | None = None,
                  env: dict[str, str] | None = None) -> ManagedProcess:
    """Run `mesh-sidecar` on ephemeral loopback ports.

    upstreams: mesh service name -> addresses of its instances (their inbound sidecars, or the
    servers themselves); routes: gRPC service name (or "*") -> mesh service name.
    """
    argv = [sys.executable, "-m", "sidecar", "--service", service,
            "--outbound", "127.0.0.1:0", "--inbound", "127.0.0.1:0", "--admin", "127.0.0.1:0"]
    if app:
        argv += ["--app", app]
    for svc, addrs in (upstreams or {}).items():
        argv += ["--upstream", f"{svc}={','.join(addrs)}"]
    for grpc_service, svc in (routes or {}).items():
        argv += ["--route", f"{grpc_service}={svc}"]
    if config:
        argv += ["--config", config]
    argv += list(extra)
    return ManagedProcess(argv, name or f"sidecar-{service}", env=env)


@contextlib.contextmanager
def running(proc: ManagedProcess) -> Iterator[ManagedProcess]:
    try:
        yield proc
    finally:
        proc.stop()
