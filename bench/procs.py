"""Start and stop the benchmark's long-running processes (upstream, sidecars, nginx).

Every process is waited on by a condition (a ready file, a port that accepts), never by a
sleep, and every one is stopped by its own pid when the run ends, even after a failure.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parent.parent
GO_BIN = ROOT / "bench" / "go" / "bin"

T = TypeVar("T")


def wait_for(predicate: Callable[[], T | None], timeout: float, what: str,
             interval: float = 0.01) -> T:
    """Poll until `predicate` returns something truthy; raise TimeoutError otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def port_accepts(address: str) -> bool:
    host, _, port = address.rpartition(":")
    with contextlib.suppress(OSError), socket.create_connection((host, int(port)), timeout=0.5):
        return True
    return False


def die_with_parent() -> None:
    """In the child: get SIGTERM if the harness dies, so no proxy outlives a killed run."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    """A port that was free a moment ago (for nginx, which cannot listen on port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Child:
    """One child process with its output in a log file.

    With `ready=True` the program gets `--ready-file PATH` and the constructor returns once the
    file holds the program's JSON object of bound addresses (available as `ports`).
    """

    def __init__(self, name: str, argv: Sequence[str], *, ready: bool = True,
                 env: dict[str, str] | None = None, timeout: float = 30.0) -> None:
        self.name = name
        self.dir = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
        self.log_path = self.dir / "output.log"
        self.ready_file = self.dir / "ready.json"
        self.ports: dict[str, str] = {}
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(ROOT), str(ROOT / "gen"), full_env.get("PYTHONPATH", "")) if p)
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        full_env.update(env or {})
        args = list(argv) + (["--ready-file", str(self.ready_file)] if ready else [])
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=full_env, cwd=str(ROOT), start_new_session=True,
                                     preexec_fn=die_with_parent)
        if ready:
            try:
                wait_for(self._read_ready, timeout, f"{name} to become ready")
            except BaseException:
                self.stop()
                raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read_ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n"
                               f"{self.output()[-3000:]}")
        try:
            self.ports = json.loads(self.ready_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return False
        return True

    def output(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")
        return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        """Stop the process; its log is kept (and its path printed) only if it ended badly."""
        stopping = self.alive()
        if stopping:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if not self._log.closed:
            self._log.close()
            if self.proc.returncode == 0 or (stopping and self.proc.returncode == -sig):
                shutil.rmtree(self.dir, ignore_errors=True)
            else:
                print(f"{self.name} exited with {self.proc.returncode}; log kept: "
                      f"{self.log_path}", file=sys.stderr)
        return self.proc.returncode


def go_binary(name: str) -> Path:
    path = GO_BIN / name
    if not os.access(path, os.X_OK):
        raise FileNotFoundError(f"{path} is missing: run `make go-tools` first")
    return path


def start_upstream() -> Child:
    """The grpc-go TestService: cheap, so the proxies' cost stands out."""
    return Child("upstream", [str(go_binary("interop_server")), "--port", "0"])


UNARY_METHOD = "/grpc.testing.TestService/UnaryCall"


def start_sidecar(name: str, *, upstream: str | None = None, app: str | None = None,
                  unary: bool = True, trace_sampling: float = 0.0, config: str | None = None,
                  env: dict[str, str] | None = None, extra: Sequence[str] = ()) -> Child:
    """A sidecar on ephemeral ports.

    `upstream`: where its outbound listener sends grpc.testing calls; `app`: where its inbound
    listener forwards. With `unary`, UnaryCall is declared unary because the Go upstream has no
    reflection service to learn it from; without, the sidecar takes the stream-stream shape.
    `trace_sampling` is always passed (`--trace-sampling`, percent): the sidecar's own default
    is 1%, and a path that is not about tracing must not pay for it, so it is 0 unless asked.
    `config`: a static_resources file (`--config`), for the policy paths.
    """
    argv = [sys.executable, "-m", "sidecar", "--service", name,
            "--outbound", "127.0.0.1:0", "--inbound", "127.0.0.1:0", "--admin", "127.0.0.1:0",
            "--log-level", "WARNING", "--trace-sampling", f"{trace_sampling:g}"]
    argv += ["--unary-method", UNARY_METHOD] if unary else ["--no-learn-method-shapes"]
    if upstream:
        argv += ["--upstream", f"bench-upstream={upstream}",
                 "--route", "grpc.testing.TestService=bench-upstream"]
    if app:
        argv += ["--app", app]
    if config:
        argv += ["--config", config]
    argv += list(extra)
    return Child(name, argv, env=env)


class OtlpSink:
    """bench/otlp_sink.py in its own process: where the tracing paths' sidecars export spans.

    `stop()` returns what it received ({"spans": N, "requests": M}); stop it after the sidecars,
    whose drain flushes their queued spans.
    """

    def __init__(self) -> None:
        fd, stats = tempfile.mkstemp(prefix="bench-otlp-", suffix=".json")
        os.close(fd)
        self._stats = Path(stats)
        self.child = Child("otlp-sink", [sys.executable, "-m", "bench.otlp_sink",
                                         "--stats-file", str(self._stats)])
        self.endpoint = f"http://{self.child.ports['otlp']}"

    def stop(self) -> dict[str, int]:
        code = self.child.stop()
        try:
            stats: dict[str, int] = json.loads(self._stats.read_text() or "{}")
        except (OSError, json.JSONDecodeError):
            stats = {}
        self._stats.unlink(missing_ok=True)
        if code != 0 or "spans" not in stats:
            raise RuntimeError(f"OTLP sink exited with {code} without its span count")
        return stats
