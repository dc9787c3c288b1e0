"""One JSON line per call, written off the event loop.

The proxy calls `record()` at the end of each call; it samples, appends a tuple to a bounded
in-memory queue and returns (well under a microsecond, no lock, no I/O, no formatting). A writer
thread wakes every `flush_interval_s` (or sooner when the queue is half full), formats the
lines and writes them in one buffered write. If the destination is slow or stuck the queue
fills and further lines are dropped and counted (`dropped`), never waited for: a call is never
delayed by its log line. Errors can be kept whatever the sampling ratio (`always_log_errors`),
since those are the lines an operator looks for.

Line fields: time (call start, UTC, ms), service (this sidecar), direction, method, status,
grpc_code, duration_ms, attempts, trace_id, caller (peer identity or address), upstream
(instance that served the call). Absent values are null so every line has the same keys.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

import grpc

log = logging.getLogger(__name__)

OFF = "off"
STDOUT = "stdout"
STDERR = "stderr"

_CODE_NAMES: dict[Any, str] = {}
_CODE_INTS: dict[Any, int] = {}
for _code in grpc.StatusCode:
    _CODE_NAMES[_code] = _CODE_NAMES[_code.value[0]] = _code.name
    _CODE_INTS[_code] = _CODE_INTS[_code.value[0]] = _code.value[0]


@dataclass(frozen=True)
class AccessLogConfig:
    """`destination`: "off", "stdout", "stderr" or a file path (appended to)."""

    destination: str = OFF
    sample_ratio: float = 1.0
    always_log_errors: bool = True
    queue_size: int = 8192
    flush_interval_s: float = 0.2

    def __post_init__(self) -> None:
        if not isinstance(self.destination, str) or not self.destination:
            raise ValueError("access_log.destination: must be 'off', 'stdout', 'stderr' or a "
                             "file path")
        if not 0.0 <= self.sample_ratio <= 1.0:  # also rejects NaN
            raise ValueError(f"access_log.sample_ratio: must be between 0 and 1, got "
                             f"{self.sample_ratio}")
        if self.queue_size < 1:
            raise ValueError(f"access_log.queue_size: must be at least 1, got {self.queue_size}")
        if not 0.0 < self.flush_interval_s <= 60.0:
            raise ValueError(f"access_log.flush_interval_s: must be in (0, 60], got "
                             f"{self.flush_interval_s}")

    @property
    def enabled(self) -> bool:
        return self.destination != OFF


def format_time(epoch: float) -> str:
    """RFC 3339 UTC with milliseconds: 2024-05-01T12:00:00.123Z."""
    whole = int(epoch)
    ms = int((epoch - whole) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{ms:03d}Z"


def format_line(service: str, entry: tuple[Any, ...]) -> str:
    (start, direction, method, code, duration_ms, attempts, trace_id, caller, upstream) = entry
    return json.dumps({
        "time": format_time(start),
        "service": service,
        "direction": direction,
        "method": method,
        "status": _CODE_NAMES.get(code, str(code)),
        "grpc_code": _CODE_INTS.get(code, code if isinstance(code, int) else None),
        "duration_ms": round(duration_ms, 3),
        "attempts": attempts,
        "trace_id": trace_id,
        "caller": caller,
        "upstream": upstream,
    }, separators=(",", ":"), ensure_ascii=False) + "\n"


class AccessLog:
    """The access log of one sidecar. Thread-safe to record from one event loop; one writer."""

    def __init__(self, config: AccessLogConfig, service: str = "", *,
                 stream: TextIO | None = None, rng: Callable[[], float] | None = None) -> None:
        """`stream` overrides the destination (tests); `rng` returns floats in [0, 1)."""
        self.config = config
        self.service = service
        self._ratio = config.sample_ratio
        self._always_errors = config.always_log_errors
        self._rng = rng or random.random
        self._limit = config.queue_size
        self._wake_at = max(1, config.queue_size // 2)
        self._queue: deque[tuple[Any, ...]] = deque()
        self._wake = threading.Event()
        self._closing = False
        self._reopen = False
        self._stream = stream
        self._owns_stream = False
        self._dropped_full = 0  # counted on the recording thread
        self._dropped_write = 0  # counted on the writer thread (no shared read-modify-write)
        self.written = 0
        self.write_errors = 0
        self._open_failures = 0
        self._enabled = config.enabled or stream is not None
        self._thread: threading.Thread | None = None
        if self._enabled:
            self._thread = threading.Thread(target=self._run, name="access-log", daemon=True)
            self._thread.start()

    @property
    def enabled(self) -> bool:
        return self._enabled and not self._closing

    @property
    def dropped(self) -> int:
        """Lines lost: queue full, unwritable destination, or a value that would not format."""
        return self._dropped_full + self._dropped_write

    def set_sample_ratio(self, ratio: float) -> None:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"access_log.sample_ratio: must be between 0 and 1, got {ratio}")
        self._ratio = ratio

    def record(self, start_time: float, direction: str, method: str,
               code: grpc.StatusCode | int, duration_ms: float, attempts: int = 1,
               trace_id: str | None = None, caller: str | None = None,
               upstream: str | None = None) -> bool:
        """Queue one call's line; False if it was sampled out, dropped, or logging is off.

        `start_time`: Unix time the call started; `code`: its final status.
        """
        if not self._enabled or self._closing:
            return False
        ratio = self._ratio
        if ratio < 1.0 and not (self._always_errors and code is not grpc.StatusCode.OK
                                and code != 0) and self._rng() >= ratio:
            return False
        queue = self._queue
        if len(queue) >= self._limit:
            self._dropped_full += 1
            return False
        queue.append((start_time, direction, method, code, duration_ms, attempts, trace_id,
                      caller, upstream))
        if len(queue) >= self._wake_at and not self._wake.is_set():
            self._wake.set()
        return True

    def reopen(self) -> None:
        """Reopen a file destination (after log rotation), on the writer's next wake-up."""
        self._reopen = True
        self._wake.set()

    def close(self, timeout_s: float = 2.0) -> None:
        """Write what is queued (up to `timeout_s`), then stop."""
        if self._closing:
            return
        self._closing = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    # --- writer thread --------------------------------------------------------------------
    def _open(self) -> TextIO | None:
        dest = self.config.destination
        if dest == STDOUT:
            return sys.stdout
        if dest == STDERR:
            return sys.stderr
        try:
            self._owns_stream = True
            stream = open(dest, "a", encoding="utf-8", buffering=1 << 16)
        except OSError as err:
            self._open_failures += 1
            if self._open_failures == 1 or self._open_failures % 1000 == 0:
                log.error("access log: cannot open %s (lines are lost until it can): %s",
                          dest, err)
            return None
        self._open_failures = 0
        return stream

    def _close_stream(self) -> None:
        if self._stream is not None and self._owns_stream:
            with contextlib.suppress(OSError):
                self._stream.close()
        self._stream = None
        self._owns_stream = False

    def _run(self) -> None:
        if self._stream is None:
            self._stream = self._open()
        interval = self.config.flush_interval_s
        while True:
            self._wake.wait(interval)
            self._wake.clear()
            if self._reopen and self._owns_stream:
                self._reopen = False
                self._close_stream()
                self._stream = self._open()
            self._drain()
            if self._closing:
                self._drain()
                if self._owns_stream:
                    self._close_stream()
                return

    def _drain(self) -> None:
        queue = self._queue
        if not queue:
            return
        lines = []
        service = self.service
        popleft = queue.popleft
        while queue:
            try:
                lines.append(format_line(service, popleft()))
            except Exception:  # a bad value must not stop the log
                self._dropped_write += 1
        if self._stream is None and self.config.enabled:  # could not be opened: try again
            self._stream = self._open()
        stream = self._stream
        if stream is None:
            self._dropped_write += len(lines)
            return
        try:
            stream.write("".join(lines))
            stream.flush()
            self.written += len(lines)
        except (OSError, ValueError) as err:  # disk full, closed pipe, closed file
            self.write_errors += 1
            self._dropped_write += len(lines)
            if self.write_errors == 1 or self.write_errors % 1000 == 0:
                log.error("access log: write failed (%d lines lost): %s", len(lines), err)
