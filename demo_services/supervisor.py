"""Child processes of the demo: started with a log file and a ready file, stopped for sure.

Each child gets its own session, so a Ctrl-C in the terminal reaches only run.py, which then
stops the children in call-graph order (callers first) instead of all at once. On Linux each
child also asks the kernel for SIGTERM if run.py dies without cleaning up (PR_SET_PDEATHSIG),
so not even a SIGKILLed demo leaves orphans behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

PR_SET_PDEATHSIG = 1
# Loaded before any fork: the child between fork and exec should do as little as possible.
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _die_with_parent(parent_pid: int) -> None:
    """Runs in the child between fork and exec."""
    if _LIBC is not None:
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)


class Child:
    """One process of the demo and its ready file (JSON of the addresses it bound)."""

    def __init__(self, name: str, argv: Sequence[str], *, workdir: Path, ready_file: Path,
                 env: Mapping[str, str], cwd: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.ready_file = ready_file
        self.log_path = workdir / "logs" / f"{name}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            ready_file.unlink()
        parent = os.getpid()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=dict(env), cwd=str(cwd), start_new_session=True,
                preexec_fn=lambda: _die_with_parent(parent))
        self.addresses: dict[str, str] = {}

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def read_ready(self) -> bool:
        try:
            with open(self.ready_file) as f:
                self.addresses = {str(k): str(v) for k, v in json.load(f).items()}
            return True
        except (FileNotFoundError, json.JSONDecodeError):
            return False

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class StartupError(Exception):
    pass


async def wait_ready(children: Iterable[Child], stop: asyncio.Event,
                     timeout: float = 30.0) -> bool:
    """True once every child wrote its ready file; False if `stop` was set first."""
    pending = list(children)
    deadline = time.monotonic() + timeout
    while pending:
        if stop.is_set():
            return False
        for child in pending:
            if not child.alive():
                raise StartupError(f"{child.name} exited with {child.proc.returncode} before "
                                   f"it was ready:\n{child.log_tail()}")
        pending = [c for c in pending if not c.read_ready()]
        if pending and time.monotonic() > deadline:
            names = ", ".join(c.name for c in pending)
            raise StartupError(f"not ready after {timeout:.0f}s: {names}")
        if pending:
            await asyncio.sleep(0.05)
    return True


async def _wait_exit(child: Child, timeout: float) -> bool:
    try:
        await asyncio.to_thread(child.proc.wait, timeout)
        return True
    except subprocess.TimeoutExpired:
        return False


async def stop_group(children: Sequence[Child], timeout: float = 10.0) -> list[str]:
    """SIGTERM a group at once, SIGKILL what is left after `timeout`; returns what was killed."""
    for child in children:
        if child.alive():
            child.proc.send_signal(signal.SIGTERM)
    exited = await asyncio.gather(*(_wait_exit(c, timeout) for c in children))
    killed = []
    for child, gone in zip(children, exited, strict=True):
        if not gone:
            child.proc.kill()
            child.proc.wait()
            killed.append(child.name)
    return killed
