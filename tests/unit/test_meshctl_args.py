"""meshctl argument handling: usage errors exit 2 with a message and never reach the network.

The address given is one nobody listens on: had meshctl tried to call it, the exit code would
be 3 (unreachable), not 2.
"""

from __future__ import annotations

import io

import pytest

from control_plane import cli

NOBODY = "127.0.0.1:9"


def run(*argv: str, stdin: str = "") -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.run(list(argv), cli.Io(out, err, io.StringIO(stdin), now=lambda: 0.0))
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("argv", [
    [],  # no command
    ["frobnicate"],
    ["get"],  # no KIND
    ["delete", "tp"],  # no NAME
    ["describe", "tp"],
    ["apply"],  # no -f
    ["get", "tp", "-o", "xml"],
    ["proxy-status", "extra"],
    ["--timeout", "soon", "get", "tp"],
])
def test_usage_errors(argv: list[str]) -> None:
    code, out, err = run("--control-plane", NOBODY, *argv)
    assert code == cli.EXIT_USAGE
    assert out == ""
    assert err.startswith("error: ") and "usage: meshctl" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv", [
    ["get", "deployments"], ["get", "pods", "x"], ["delete", "svc", "x"],
    ["describe", "nothing", "x"],
])
def test_unknown_kind_is_a_usage_error(argv: list[str]) -> None:
    code, _, err = run("--control-plane", NOBODY, *argv)
    assert code == cli.EXIT_USAGE
    assert "unknown kind" in err and "TrafficPolicy (tp)" in err


def test_get_all_takes_no_name() -> None:
    code, _, err = run("--control-plane", NOBODY, "get", "all", "orders")
    assert code == cli.EXIT_USAGE and "takes no NAME" in err


@pytest.mark.parametrize("address", ["localhost", "host:port", "1.2.3.4:70000"])
def test_bad_control_plane_address(address: str) -> None:
    code, _, err = run("--control-plane", address, "get", "tp")
    assert code == cli.EXIT_USAGE
    assert f"invalid control plane address {address!r}" in err


def test_control_plane_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cli.ENV_CONTROL_PLANE, "cp.example:1234")
    assert cli.build_parser().parse_args(["get", "tp"]).control_plane == "cp.example:1234"
    flag = cli.build_parser().parse_args(["--control-plane", "x:1", "get", "tp"])
    assert flag.control_plane == "x:1"
    monkeypatch.delenv(cli.ENV_CONTROL_PLANE)
    assert cli.build_parser().parse_args(["get", "tp"]).control_plane == "127.0.0.1:15010"


def test_nonpositive_timeout() -> None:
    code, _, err = run("--control-plane", NOBODY, "--timeout", "0", "get", "tp")
    assert code == cli.EXIT_USAGE and "--timeout must be positive" in err


def test_apply_missing_file(tmp_path) -> None:
    missing = tmp_path / "nope.yaml"
    code, _, err = run("--control-plane", NOBODY, "apply", "-f", str(missing))
    assert code == cli.EXIT_USAGE
    assert err == f"error: cannot read {missing}: No such file or directory\n"


def test_apply_malformed_stdin_is_reported_before_sending() -> None:
    code, out, err = run("--control-plane", NOBODY, "apply", "-f", "-",
                         stdin="kind: TrafficPolicy\nmetadata: {name: a\n")
    assert code == cli.EXIT_USAGE and out == ""
    assert err.startswith("error: malformed YAML at <stdin>:3:1: ")


def test_apply_checks_every_file_before_sending(tmp_path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("kind: MeshConfig\nmetadata: {name: default}\nspec: {}\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: MeshConfig\nmetadata: {name: default}\nspec: {}\n---\n"
                   "kind: TrafficPolicy\nstatus: {}\nspec: []\n")
    code, _, err = run("--control-plane", NOBODY, "apply", "-f", str(good), "-f", str(bad))
    assert code == cli.EXIT_USAGE
    assert err.splitlines() == [
        f"error: {bad}: document 2 (line 5) is not a valid resource:",
        "  status: unknown field (a resource has kind, metadata, spec)",
        "  spec: must be a mapping, got a list",
    ]


def test_apply_of_nothing(tmp_path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here\n---\n")
    code, _, err = run("--control-plane", NOBODY, "apply", "-f", str(empty))
    assert code == cli.EXIT_USAGE and err == f"error: no resources in {empty}\n"


def test_help_lists_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    assert "3 control plane unreachable" in capsys.readouterr().out
