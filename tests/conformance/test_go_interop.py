"""The interop cases against an independent implementation: grpc-go (Debian's 1.33 sources).

Our TestService and our interop client are written from the same description as the sidecar,
so a misreading could hide in all three at once. Here one side of every call is grpc-go
(bench/go, built by `make go-tools`):

- the Go client (bench/go/bin/interop_client) against our Python TestService;
- our Python interop client (its CLI) against the Go server (bench/go/bin/interop_server);

each direct and through a sidecar pair (client -> sidecar A outbound -> sidecar B inbound ->
server). Every case must pass direct. Through the pair every case must pass too, except the
two compression cases, where the known difference of a grpcio proxy applies (see
test_interop.py and docs/conformance.md: the proxy re-sends messages uncompressed). Those are
pinned to exactly that failure, so a sidecar that starts preserving compression, or breaks a
compressed call some other way, fails here and gets looked at.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.harness import ROOT, ManagedProcess, start_sidecar

GO_BIN = ROOT / "bench" / "go" / "bin"
ROUTES = {"grpc.testing.TestService": "test", "grpc.testing.UnimplementedService": "test"}
CASES = (
    "empty_unary", "large_unary", "client_compressed_unary", "server_compressed_unary",
    "client_streaming", "server_streaming", "ping_pong", "empty_stream", "custom_metadata",
    "status_code_and_message", "special_status_message", "unimplemented_method",
    "unimplemented_service", "cancel_after_begin", "cancel_after_first_response",
    "timeout_on_sleeping_server",
)
PATHS = ("direct", "sidecar_pair")
CLIENT_TIMEOUT = 60.0

# Behind the pair, case -> text that must appear in the client's FAIL report: the server sees
# the compressed request uncompressed, and the client sees the compressed response uncompressed.
GO_CLIENT_BEHIND_PROXY = {
    "client_compressed_unary": "UnaryCall (request compressed=true): rpc error: "
                               "code = InvalidArgument",
    "server_compressed_unary": "UnaryCall (response_compressed=true): "
                               "response message compressed flags [false], want [true]",
}
PY_CLIENT_BEHIND_PROXY = {
    "client_compressed_unary": ".compressed.code: expected 'OK', observed 'INVALID_ARGUMENT'",
    "server_compressed_unary": ".compressed.compressed: expected True, observed False",
}


def go_binary(name: str) -> str:
    """The path of a built Go program; a missing one fails (never skips) the test."""
    path = GO_BIN / name
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} is missing: run `make go-tools` (builds bench/go; `make test` "
                    "does it first)", pytrace=False)
    return str(path)


def start_pair(app: str, name: str) -> tuple[ManagedProcess, ManagedProcess]:
    """Sidecar B in front of app, sidecar A routing the test services to B; (A, B)."""
    inbound = start_sidecar(service="test", app=app, name=f"{name}-inbound")
    try:
        outbound = start_sidecar(service="client", upstreams={"test": [inbound.addr("inbound")]},
                                 routes=ROUTES, name=f"{name}-outbound")
    except BaseException:
        inbound.stop()
        raise
    return outbound, inbound


@pytest.fixture(scope="module")
def go_paths() -> Iterator[dict[str, str]]:
    """The Go server direct and behind a sidecar pair: path name -> address to dial."""
    server = ManagedProcess([go_binary("interop_server"), "--port", "0"], "go-interop-server")
    try:
        outbound, inbound = start_pair(server.addr("server"), "go-pair")
        try:
            yield {"direct": server.addr("server"), "sidecar_pair": outbound.addr("outbound")}
        finally:
            outbound.stop()
            inbound.stop()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def python_paths(test_server: str, sidecar_pair: str) -> dict[str, str]:
    """Our Python TestService direct and behind a sidecar pair (fixtures from conftest.py)."""
    return {"direct": test_server, "sidecar_pair": sidecar_pair}


def python_env() -> dict[str, str]:
    paths = [str(ROOT), str(ROOT / "gen"), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def run_go_client(target: str, case: str) -> subprocess.CompletedProcess:
    return subprocess.run([go_binary("interop_client"), "--server", target, "--test_case", case],
                          capture_output=True, text=True, timeout=CLIENT_TIMEOUT)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", CASES)
def test_go_client_against_python_server(case: str, path: str,
                                         python_paths: dict[str, str]) -> None:
    result = run_go_client(python_paths[path], case)
    report = result.stdout + result.stderr
    expected_failure = GO_CLIENT_BEHIND_PROXY.get(case) if path != "direct" else None
    if expected_failure is None:
        assert result.returncode == 0, f"Go client, {case}, {path}:\n{report}"
        assert f"PASS {case}" in result.stdout, report
    else:
        assert result.returncode == 1, f"expected the known compression difference:\n{report}"
        assert f"FAIL {case}" in result.stdout and expected_failure in result.stdout, (
            f"Go client, {case}, {path}: expected a failure containing {expected_failure!r}, "
            f"got:\n{report}")


def parse_python_client(stdout: str) -> dict[str, tuple[bool, str]]:
    """CLI lines `PASS case {json}` / `FAIL case: reason` -> case -> (passed, rest of line)."""
    outcomes: dict[str, tuple[bool, str]] = {}
    for line in stdout.splitlines():
        verdict, _, rest = line.partition(" ")
        if verdict not in ("PASS", "FAIL"):
            continue
        case, _, detail = rest.partition(" ")
        outcomes[case.rstrip(":")] = (verdict == "PASS", detail)
    return outcomes


@pytest.fixture(scope="module")
def python_client_runs(go_paths: dict[str, str]) -> dict[str, tuple[dict, str]]:
    """One CLI run per path with every case: path -> (case -> outcome, full output)."""
    runs = {}
    for path, target in go_paths.items():
        argv = [sys.executable, "-m", "tests.conformance.interop_client", "--target", target]
        for case in CASES:
            argv += ["--case", case]
        result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True,
                                timeout=CLIENT_TIMEOUT, env=python_env())
        runs[path] = (parse_python_client(result.stdout), result.stdout + result.stderr)
    return runs


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", CASES)
def test_python_client_against_go_server(case: str, path: str,
                                         python_client_runs: dict[str, tuple[dict, str]]) -> None:
    outcomes, report = python_client_runs[path]
    assert case in outcomes, f"Python client did not report {case} ({path}):\n{report}"
    passed, detail = outcomes[case]
    expected_failure = PY_CLIENT_BEHIND_PROXY.get(case) if path != "direct" else None
    if expected_failure is None:
        assert passed, f"Python client, {case}, {path}: {detail}"
    else:
        assert not passed and expected_failure in detail, (
            f"Python client, {case}, {path}: expected a failure containing "
            f"{expected_failure!r}, got {'PASS' if passed else 'FAIL'} {detail}")
    if path != "direct" and passed:
        # What the caller sees must not depend on the path: same observation as direct.
        direct_passed, direct_detail = python_client_runs["direct"][0].get(case, (False, ""))
        if direct_passed:
            assert json.loads(detail) == json.loads(direct_detail), (
                f"{case}: behind the pair {detail}\n direct {direct_detail}")


def test_go_client_reports_failure(python_paths: dict[str, str]) -> None:
    """The Go client can fail, and says why: an unknown case, then a server that is not there."""
    result = run_go_client(python_paths["direct"], "no_such_case")
    assert result.returncode == 2 and "unknown test case" in result.stderr, result.stderr
    # An address with no server: a real case fails with a message, not a hang or a crash.
    closed = subprocess.run([go_binary("interop_client"), "--server", "127.0.0.1:1",
                             "--test_case", "empty_unary", "--timeout", "2s"],
                            capture_output=True, text=True, timeout=CLIENT_TIMEOUT)
    assert closed.returncode == 1, closed.stdout + closed.stderr
    assert "FAIL empty_unary" in closed.stdout and "Unavailable" in closed.stdout, closed.stdout


def test_go_tools_are_fresh() -> None:
    """The binaries are built from the current sources: `make -C bench/go` has nothing to do."""
    go_binary("interop_server")
    result = subprocess.run(["make", "-q", "-C", str(GO_BIN.parent)],
                            capture_output=True, text=True, timeout=CLIENT_TIMEOUT)
    assert result.returncode == 0, (
        "bench/go binaries are older than their sources: run `make go-tools`\n"
        + result.stdout + result.stderr)


def run_loadgen(target: str, *args: str) -> dict:
    argv = [go_binary("loadgen"), "--target", target, "--warmup", "0", "--concurrency", "4",
            *args]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=CLIENT_TIMEOUT)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def test_loadgen_checks_every_status(go_paths: dict[str, str]) -> None:
    """The benchmark's generator counts OK calls and failed ones by their gRPC code."""
    ok = run_loadgen(go_paths["direct"], "--duration", "0.3")
    assert ok["mode"] == "closed_loop" and ok["ok"] > 0 and ok["errors"] == {}, ok
    assert ok["requests"] == ok["ok"] and ok["latency_ms"]["p50"] > 0, ok
    # The Go server refuses responses above 4 MiB with INVALID_ARGUMENT.
    failing = run_loadgen(go_paths["direct"], "--duration", "0.3", "--response-size", "5000000")
    assert failing["ok"] == 0 and failing["requests"] > 0, failing
    assert failing["errors"] == {"INVALID_ARGUMENT": failing["requests"]}, failing


def test_loadgen_fixed_rate_accounts_for_every_scheduled_call(go_paths: dict[str, str]) -> None:
    """At 200/s for 0.5 s, 100 calls are scheduled: each completes in the window, is still in
    flight at its end (at most --concurrency), or is reported unsent."""
    result = run_loadgen(go_paths["sidecar_pair"], "--duration", "0.5", "--rate", "200")
    assert result["mode"] == "fixed_rate" and result["errors"] == {}, result
    assert 100 - 4 <= result["requests"] + result["unsent"] <= 100, result
