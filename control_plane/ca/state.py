"""Where the CA keeps its roots and tokens: files in the state dir, or Consul KV.

Both are small JSON documents under two names, "root" and "tokens", read on use and written
with check-and-set, so control-plane replicas sharing Consul never overwrite each other's
rotation or token: a writer that lost the race re-reads and re-applies its change.

Files: `<state dir>/ca/roots.json` and `<state dir>/ca/tokens.json`, mode 0600 (the roots
document holds the private key of every generated root), written atomically (a temporary
file in the same directory, fsync, rename, fsync of the directory), the directory mode 0700.
Consul: keys `pymesh/ca/root` and `pymesh/ca/tokens` (protect that prefix with an ACL: it
holds the root key).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import threading
from pathlib import Path
from typing import Any, Protocol

from control_plane.ca.errors import Unavailable
from sidecar.atomic_file import write_atomically

ROOT = "root"
TOKENS = "tokens"
_FILES = {ROOT: "roots.json", TOKENS: "tokens.json"}

Version = str  # opaque: what read() returned, handed back to write()


class StateBackend(Protocol):
    source: str  # shown by `meshctl ca show`: "state-dir" or "consul"

    def read(self, name: str) -> tuple[bytes | None, Version]:
        """The document (None if there is none yet) and its version. Raises Unavailable."""
        ...

    def write(self, name: str, data: bytes, version: Version) -> bool:
        """Store `data` if the document is still at `version` (True), else change nothing
        (False). Raises Unavailable."""
        ...


def write_private(path: Path, data: bytes) -> None:
    """Atomically replace `path` with `data`, never readable by anyone else (mode 0600 from
    creation, not chmod-ed afterwards, which would leave a window)."""
    write_atomically(path, data, mode=0o600)


class FileState:
    """The documents as files in `<state_dir>/ca/`. A file's version is the SHA-256 of its
    bytes; an exclusive flock on `ca/.lock` makes the compare-and-replace atomic across
    processes too."""

    source = "state-dir"

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(state_dir) / "ca"
        self._lock = threading.Lock()

    def path(self, name: str) -> Path:
        return self.dir / _FILES[name]

    def _ensure_dir(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.dir.stat().st_mode & 0o077:
            os.chmod(self.dir, 0o700)

    def read(self, name: str) -> tuple[bytes | None, Version]:
        try:
            data = self.path(name).read_bytes()
        except FileNotFoundError:
            return None, ""
        except OSError as e:
            raise Unavailable(f"cannot read {self.path(name)}: {e.strerror or e}") from None
        return data, hashlib.sha256(data).hexdigest()

    def write(self, name: str, data: bytes, version: Version) -> bool:
        try:
            self._ensure_dir()
            with self._lock, open(self.dir / ".lock", "a") as lock:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
                _, current = self.read(name)
                if current != version:
                    return False
                write_private(self.path(name), data)
                return True
        except OSError as e:
            raise Unavailable(f"cannot write {self.path(name)}: {e.strerror or e}") from None


def _consul_errors() -> tuple[type[BaseException], ...]:
    import consul
    import requests

    return (consul.ConsulException, requests.RequestException, OSError, ValueError)


class ConsulState:
    """The documents as Consul KV entries `<prefix><name>`; the version is the entry's
    ModifyIndex (0: absent), and a write is a `?cas=` put, Consul's own check-and-set."""

    source = "consul"

    def __init__(self, client: Any, prefix: str = "pymesh/ca/") -> None:
        self._client = client
        self._prefix = prefix.lstrip("/") if prefix.endswith("/") else prefix.lstrip("/") + "/"
        self._errors = _consul_errors()

    def key(self, name: str) -> str:
        return self._prefix + name

    def read(self, name: str) -> tuple[bytes | None, Version]:
        try:
            _index, item = self._client.kv.get(self.key(name))
        except self._errors as e:
            raise Unavailable(f"Consul did not answer: {e}") from None
        if not item:
            return None, "0"
        value = item.get("Value")
        return (value if isinstance(value, bytes) else (value or "").encode()), \
            str(item.get("ModifyIndex", 0))

    def write(self, name: str, data: bytes, version: Version) -> bool:
        try:
            return bool(self._client.kv.put(self.key(name), data, cas=int(version or 0)))
        except self._errors as e:
            raise Unavailable(f"Consul did not answer: {e}") from None
