"""The 16 gRPC interop cases, each run direct, through one sidecar and through a sidecar pair.

A proxy must not change what the caller sees, so every case's observation (status code, details,
payload sizes, echoed metadata, compression flags) must be the same record on all three paths,
and the direct record must match the interop description.

One known, explained exception (docs/conformance.md): per-message compression is a property of
one HTTP/2 hop. A grpcio-based proxy receives messages already decompressed and re-sends them
uncompressed, so behind a sidecar the server sees the client's compressed request as uncompressed
(expect_compressed fails with INVALID_ARGUMENT) and the client sees the server's compressed
response as uncompressed. PROXY_COMPRESSION pins exactly that difference, so any other change
(or the sidecar starting to preserve compression) fails the test and gets looked at.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest

from tests.conformance import interop_client
from tests.harness import ROOT

PROXY_PATHS = ("one_sidecar", "sidecar_pair")

_EXPECT_COMPRESSED_REJECTED = {
    "code": "INVALID_ARGUMENT",
    "details": "expected a compressed request message, got an uncompressed one",
}

# case -> {step: fields that differ behind a proxy}; everything else must equal direct.
PROXY_COMPRESSION: dict[str, dict[str, dict]] = {
    "client_compressed_unary": {"compressed": _EXPECT_COMPRESSED_REJECTED},
    "server_compressed_unary": {"compressed": {"compressed": False}},
}


def expected_behind_proxy(case: str, direct: dict) -> dict:
    """The direct observation with the documented compression difference applied."""
    expected = copy.deepcopy(direct)
    for step, fields in PROXY_COMPRESSION.get(case, {}).items():
        if "code" in fields:  # a failed step has only code and details
            expected[step] = dict(fields)
        else:
            expected[step].update(fields)
    return expected


def _show(observations: dict[str, dict]) -> str:
    return "\n".join(f"  {path}: {json.dumps(obs, ensure_ascii=False)}"
                     for path, obs in observations.items())


@pytest.mark.parametrize("case", list(interop_client.CASES))
def test_case_same_on_every_path(case: str, paths: dict[str, str]) -> None:
    run = interop_client.CASES[case]
    observations = {path: run(target) for path, target in paths.items()}
    direct = observations["direct"]
    interop_client.check(case, direct)
    expected = expected_behind_proxy(case, direct)
    differing = [p for p in PROXY_PATHS if observations[p] != expected]
    assert not differing, (
        f"{case}: {', '.join(differing)} differ from the expected record\n"
        f"  expected behind a proxy: {json.dumps(expected, ensure_ascii=False)}\n"
        + _show(observations))


def test_compressed_calls_succeed_through_proxies(paths: dict[str, str]) -> None:
    """Whatever happens to the compressed flag, compressed calls must work end to end."""
    for path in PROXY_PATHS:
        client = interop_client.client_compressed_unary(paths[path])
        assert client["compressed_unchecked"] == interop_client.EXPECTED[
            "client_compressed_unary"]["compressed_unchecked"], path
        server = interop_client.server_compressed_unary(paths[path])
        assert server["compressed"]["code"] == "OK", path
        assert server["compressed"]["body_len"] == 314159, path


def _cli(target: str, *cases: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "tests.conformance.interop_client", "--target", target]
    for case in cases:
        argv += ["--case", case]
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=30)


def test_cli_passes_direct_and_reports_failures(paths: dict[str, str]) -> None:
    ok = _cli(paths["direct"], "all")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "16 passed, 0 failed" in ok.stdout
    # Behind a proxy the strict client_compressed_unary check fails (see module docstring),
    # which also shows the CLI does fail.
    bad = _cli(paths["one_sidecar"], "client_compressed_unary")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "FAIL client_compressed_unary" in bad.stdout
    assert ".compressed.code: expected 'OK', observed 'INVALID_ARGUMENT'" in bad.stdout
