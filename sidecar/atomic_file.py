"""Replacing a file so that readers (and a crash) see the old content or the new, never a torn
one: temp file in the same directory, fsync, rename, fsync the directory.

One implementation for every file the mesh writes: ready files, the sidecar's persisted
snapshot, the control plane's policies, registry and CA state.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_atomically(path: str | os.PathLike[str], data: bytes | str, *,
                     mode: int = 0o644) -> None:
    """The temp file is created 0600 (mkstemp) and only widened to `mode` afterwards, so a
    private file (mode=0o600: keys, tokens) is never readable by others, not even briefly."""
    target = Path(path)
    directory = target.parent.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        if mode != 0o600:
            os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
