"""The JSON access log (sidecar/telemetry/access_log.py): what a line holds, sampling with a
seeded random source, a slow or broken destination never holding up a caller, rotation."""

from __future__ import annotations

import io
import json
import os
import random
import threading
import time
from pathlib import Path

import grpc
import pytest

from sidecar.telemetry.access_log import AccessLog, AccessLogConfig, format_time
from tests.harness import wait_for

OK = grpc.StatusCode.OK


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_one_json_line_per_call(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(AccessLogConfig(destination=str(path)), "frontend")
    start = 1714564800.25
    assert log.record(start, "outbound", "/demo.Orders/Get", OK, 1.23456, 1,
                      "0af7651916cd43dd8448eb211c80319c", "spiffe://mesh/ns/default/sa/web",
                      "127.0.0.1:7001")
    assert log.record(start + 1, "inbound", "/demo.Orders/Get", grpc.StatusCode.UNAVAILABLE,
                      30.0, 3)
    log.close()
    first, second = read_lines(path)
    assert first == {
        "time": "2024-05-01T12:00:00.250Z", "service": "frontend", "direction": "outbound",
        "method": "/demo.Orders/Get", "status": "OK", "grpc_code": 0, "duration_ms": 1.235,
        "attempts": 1, "trace_id": "0af7651916cd43dd8448eb211c80319c",
        "caller": "spiffe://mesh/ns/default/sa/web", "upstream": "127.0.0.1:7001"}
    assert second["status"] == "UNAVAILABLE" and second["grpc_code"] == 14
    assert second["attempts"] == 3
    assert second["trace_id"] is None and second["caller"] is None and second["upstream"] is None
    assert log.written == 2 and log.dropped == 0


def test_int_codes_and_unknown_codes(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    log = AccessLog(AccessLogConfig(destination=str(path)))
    log.record(0.0, "inbound", "/x.Y/Z", 5, 1.0)
    log.record(0.0, "inbound", "/x.Y/Z", 99, 1.0)
    log.close()
    a, b = read_lines(path)
    assert (a["status"], a["grpc_code"]) == ("NOT_FOUND", 5)
    assert (b["status"], b["grpc_code"]) == ("99", 99)


def test_lines_are_written_without_close(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    log = AccessLog(AccessLogConfig(destination=str(path), flush_interval_s=0.01))
    log.record(1.0, "inbound", "/x.Y/Z", OK, 1.0)
    wait_for(lambda: path.exists() and path.read_text().count("\n") == 1, timeout=5,
             what="the line to reach the file")
    log.close()


def test_sampling_follows_the_ratio_and_keeps_errors() -> None:
    out = io.StringIO()
    log = AccessLog(AccessLogConfig(destination="stdout", sample_ratio=0.25,
                                    queue_size=100_000), stream=out,
                    rng=random.Random(11).random)
    kept_ok = sum(log.record(0.0, "inbound", "/x.Y/Z", OK, 1.0) for _ in range(4000))
    kept_err = sum(log.record(0.0, "inbound", "/x.Y/Z", grpc.StatusCode.INTERNAL, 1.0)
                   for _ in range(100))
    log.close()
    reference = random.Random(11)
    assert kept_ok == sum(reference.random() < 0.25 for _ in range(4000))
    assert 850 < kept_ok < 1150
    assert kept_err == 100  # errors are kept whatever the ratio
    assert len(out.getvalue().splitlines()) == kept_ok + kept_err


def test_sampling_can_include_errors_and_change_at_runtime() -> None:
    log = AccessLog(AccessLogConfig(destination="stdout", sample_ratio=0.0,
                                    always_log_errors=False), stream=io.StringIO())
    assert not log.record(0.0, "inbound", "/x.Y/Z", grpc.StatusCode.INTERNAL, 1.0)
    assert not log.record(0.0, "inbound", "/x.Y/Z", 13, 1.0)
    log.set_sample_ratio(1.0)
    assert log.record(0.0, "inbound", "/x.Y/Z", OK, 1.0)
    with pytest.raises(ValueError, match="sample_ratio"):
        log.set_sample_ratio(1.5)
    log.close()


def test_off_records_nothing_and_starts_no_thread() -> None:
    before = threading.active_count()
    log = AccessLog(AccessLogConfig())
    assert not log.enabled
    assert not log.record(0.0, "inbound", "/x.Y/Z", OK, 1.0)
    assert threading.active_count() == before
    log.close()


class Gate(io.StringIO):
    """A destination whose writes block until the test opens the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.open = threading.Event()
        self.entered = threading.Event()

    def write(self, s: str) -> int:
        self.entered.set()
        self.open.wait(10)
        return super().write(s)


def test_a_stuck_destination_never_holds_up_a_caller() -> None:
    gate = Gate()
    log = AccessLog(AccessLogConfig(destination="stdout", queue_size=100,
                                    flush_interval_s=0.01), stream=gate)
    log.record(0.0, "inbound", "/x.Y/Z", OK, 1.0)
    assert gate.entered.wait(5)  # the writer is now stuck in write()
    slowest = 0.0
    started = time.perf_counter()
    for _ in range(5000):
        t0 = time.perf_counter()
        log.record(0.0, "inbound", "/x.Y/Z", OK, 1.0)
        slowest = max(slowest, time.perf_counter() - t0)
    elapsed = time.perf_counter() - started
    assert log.dropped == 5000 - 100  # the queue holds 100, the rest are counted as lost
    assert elapsed < 1.0 and slowest < 0.05, (elapsed, slowest)
    gate.open.set()
    log.close(5)
    assert log.written == 101 and len(gate.getvalue().splitlines()) == 101


class Broken(io.StringIO):
    def write(self, s: str) -> int:
        raise OSError(28, "No space left on device")


def test_write_errors_are_counted_not_raised() -> None:
    log = AccessLog(AccessLogConfig(destination="stdout", flush_interval_s=0.01),
                    stream=Broken())
    for _ in range(3):
        assert log.record(0.0, "inbound", "/x.Y/Z", OK, 1.0)
    wait_for(lambda: log.dropped == 3, timeout=5, what="the failed write to be counted")
    assert log.write_errors >= 1 and log.written == 0
    assert log.record(0.0, "inbound", "/x.Y/Z", OK, 1.0)  # still accepting
    log.close()


def test_unopenable_file_loses_lines_and_keeps_trying(tmp_path: Path) -> None:
    path = tmp_path / "missing-dir" / "a.log"
    log = AccessLog(AccessLogConfig(destination=str(path), flush_interval_s=0.01))
    log.record(0.0, "inbound", "/x.Y/Z", OK, 1.0)
    wait_for(lambda: log.dropped == 1, timeout=5, what="the line to be counted as lost")
    path.parent.mkdir()
    log.record(0.0, "inbound", "/x.Y/Z", OK, 1.0)
    wait_for(lambda: log.written == 1, timeout=5, what="the file to be opened on a retry")
    log.close()
    assert len(read_lines(path)) == 1


def test_reopen_after_rotation(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    log = AccessLog(AccessLogConfig(destination=str(path), flush_interval_s=0.01))
    log.record(0.0, "inbound", "/x.Y/Z", OK, 1.0)
    wait_for(lambda: log.written == 1, timeout=5, what="first line")
    os.rename(path, tmp_path / "a.log.1")
    log.reopen()
    wait_for(lambda: path.exists(), timeout=5, what="the file to be reopened")
    log.record(0.0, "inbound", "/x.Y/W", OK, 1.0)
    log.close()
    assert [x["method"] for x in read_lines(tmp_path / "a.log.1")] == ["/x.Y/Z"]
    assert [x["method"] for x in read_lines(path)] == ["/x.Y/W"]


def test_record_after_close_is_refused(tmp_path: Path) -> None:
    log = AccessLog(AccessLogConfig(destination=str(tmp_path / "a.log")))
    log.close()
    assert not log.record(0.0, "inbound", "/x.Y/Z", OK, 1.0)
    log.close()  # twice is fine


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"destination": ""}, "destination"),
    ({"sample_ratio": -0.1}, "sample_ratio"),
    ({"sample_ratio": float("nan")}, "sample_ratio"),
    ({"queue_size": 0}, "queue_size"),
    ({"flush_interval_s": 0.0}, "flush_interval_s"),
])
def test_config_errors_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"access_log.{field}"):
        AccessLogConfig(**kwargs)


def test_format_time() -> None:
    assert format_time(0.0) == "1970-01-01T00:00:00.000Z"
    assert format_time(1714564800.999) == "2024-05-01T12:00:00.999Z"
