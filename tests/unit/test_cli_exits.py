"""The exit-code map: each expected exception ends a command with its code and one line
(no traceback); anything else is a bug, reported by type and place, never its message."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from pysteer import cli, exitcodes
from pysteer.agent.control import AgentDown, AgentRefused
from pysteer.exitcodes import EXIT_CODES
from pysteer.harden import HardenError

# What each class ends a command with: the codes the integration tests and the docs rely on.
EXPECTED = {
    ("pysteer.errors", "UsageError"): 2,
    ("pysteer.cluster.config", "ConfigError"): 2,
    ("pysteer.flow", "FlowSyntaxError"): 2,
    ("pysteer.lab.plan", "PlanError"): 2,
    ("pysteer.lab.topology", "LabError"): 2,
    ("pysteer.steer.pins", "PinError"): 2,
    ("pysteer.agent.agent", "AgentError"): 2,
    ("pysteer.steer.daemon", "DaemonError"): 2,
    ("pysteer.agent.control", "AgentRefused"): 2,
    ("pysteer.steer.control", "ControlError"): 2,
    ("pysteer.agent.control", "AgentDown"): 3,
    ("pysteer.steer.control", "SteerDown"): 3,
    ("builtins", "OSError"): 1,
    ("builtins", "BrokenPipeError"): 141,
    ("builtins", "KeyboardInterrupt"): 130,
}
# Raise CLASS(ARGS) in a fresh interpreter and let exitcodes report it, as main does.
RAISE = """
import importlib, sys
from pysteer import exitcodes
cls = getattr(importlib.import_module(sys.argv[1]), sys.argv[2])
before = set(sys.modules)
try:
    raise cls(*sys.argv[3:])
except BaseException as exc:
    code = exitcodes.report(exc)
print(sorted(set(sys.modules) - before))  # what reporting imported
sys.exit(code)
"""


def test_the_map_is_the_expected_one() -> None:
    assert {key: entry.code for key, entry in EXIT_CODES.items()} == EXPECTED


@pytest.mark.parametrize(("module", "name"), list(EXIT_CODES))
def test_each_entry_names_an_exception_defined_there(module: str, name: str) -> None:
    """A class moved or renamed would silently leave the map: its errors would become
    internal errors."""
    cls = getattr(importlib.import_module(module), name)
    assert issubclass(cls, BaseException)
    assert (cls.__module__, cls.__qualname__) == (module, name)


def raised(module: str, name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", RAISE, module, name, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("module", "name"), [k for k in EXIT_CODES if k[1] not in ("OSError", "BrokenPipeError")]
)
def test_each_mapped_exception_gives_its_code_and_one_line(module: str, name: str) -> None:
    out = raised(module, name, "the reason")
    assert out.returncode == EXPECTED[module, name]
    want = "pysteer: interrupted" if name == "KeyboardInterrupt" else "pysteer: error: the reason"
    assert out.stderr == want + "\n"
    # Looking the class up imported nothing (the steering daemon's module needs BCC).
    assert out.stdout == "[]\n"


def test_an_os_error_is_one_line_with_its_file() -> None:
    out = raised("builtins", "PermissionError", "13", "Permission denied", "/sys/fs/bpf/x")
    assert (out.returncode, out.stderr) == (1, "pysteer: error: /sys/fs/bpf/x: Permission denied\n")


def test_a_closed_pipe_is_quiet() -> None:
    out = raised("builtins", "BrokenPipeError")
    assert (out.returncode, out.stderr) == (141, "")


@pytest.mark.parametrize(
    ("exc", "code", "line"),
    [
        # AgentDown is a ConnectionError, an OSError: its own entry wins.
        (AgentDown("node b is down: x"), 3, "pysteer: error: node b is down: x"),
        (BrokenPipeError(), 141, None),
        (
            ConnectionResetError(104, "Connection reset by peer"),
            1,
            "pysteer: error: Connection reset by peer",
        ),
        (HardenError("cannot x"), 2, "pysteer: error: cannot x"),  # a UsageError
    ],
)
def test_the_most_specific_class_wins(exc: BaseException, code: int, line: str | None) -> None:
    entry = exitcodes.exit_for(exc)
    assert entry is not None and entry.code == code
    if line is not None:
        assert entry.say(exc) == line


def run_main(handler: Callable[[argparse.Namespace], int], monkeypatch: pytest.MonkeyPatch) -> int:
    """``main`` with a tree of one handler."""

    def build(_command: str | None = None) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(prog="pysteer")
        parser.set_defaults(func=handler)
        return parser

    monkeypatch.setattr(cli, "build_parser", build)
    monkeypatch.delenv(exitcodes.DEBUG_ENV, raising=False)
    return cli.main([])


def test_main_reports_what_a_handler_raises(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def handler(_args: argparse.Namespace) -> int:
        raise AgentRefused("node b: cordoned")

    assert run_main(handler, monkeypatch) == 2
    assert capsys.readouterr().err == "pysteer: error: node b: cordoned\n"


def secret_bug(_args: argparse.Namespace) -> int:
    key = {"k": 1}
    return key["s3cret-key-material"]


def test_an_unexpected_exception_is_an_internal_error_without_its_message(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_main(secret_bug, monkeypatch) == exitcodes.INTERNAL == 70
    err = capsys.readouterr().err
    assert err.startswith("pysteer: internal error: KeyError at pysteer/cli.py:"), err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "s3cret" not in err


def test_debug_shows_the_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def handler(args: argparse.Namespace) -> int:
        monkeypatch.setenv(exitcodes.DEBUG_ENV, "1")
        return secret_bug(args)

    assert run_main(handler, monkeypatch) == 70
    err = capsys.readouterr().err
    assert "Traceback" in err and "secret_bug" in err


def test_system_exit_goes_through(monkeypatch: pytest.MonkeyPatch) -> None:
    """argparse's own exits (--help, its usage errors) keep their codes."""

    def handler(_args: argparse.Namespace) -> int:
        raise SystemExit(3)

    with pytest.raises(SystemExit) as exc:
        run_main(handler, monkeypatch)
    assert exc.value.code == 3


CLUSTER = """
[cluster]
name = "{name}"
vip = ["10.0.0.100"]
ca = "ca.pem"
key = "cluster.key"

[services.7000]
app = "echo"
tls = false

[steer]
name = "steer"
control = "127.0.0.1:7700"
cert = "steer.pem"
key = "steer.key"

[nodes.a]
control = "127.0.0.1:7701"
cert = "a.pem"
key = "a.key"

[nodes.b]
control = "127.0.0.1:7702"
cert = "b.pem"
key = "b.key"
"""


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (
            ["agent", "cordon", "a"],
            3,
            "node a is down: no agent at {sock}a.sock; not asked over TCP",
        ),
        (["undrain", "b"], 3, "node b is down: no agent at {sock}b.sock; not asked over TCP"),
        (
            ["flows", "--node", "b"],
            3,
            "node b is down: no agent at {sock}b.sock; not asked over TCP",
        ),
        (["flows", "--node", "c"], 2, "unknown node 'c' (nodes: a, b)"),
        (["migrate", "--flow", "x", "--to", "b"], 2, "malformed flow 'x'"),
        (
            ["migrate", "--flow", "10.0.0.2:5-10.0.0.100:443", "--to", "b"],
            3,
            "flow 10.0.0.2:5-10.0.0.100:443 not found on any node that answers (down: a, b)",
        ),
        (["status", "--config", "/nonexistent.toml"], 2, "cannot read /nonexistent.toml"),
    ],
)
def test_agent_commands_report_through_the_map(
    args: list[str], code: int, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A cluster whose agents are all down (and never asked over TCP: neither netns nor
    remote): each command ends with its code (3: down, 2: bad input) and its one line,
    nothing on stdout."""
    name = f"t{os.getpid()}"
    (tmp_path / "cluster.toml").write_text(CLUSTER.format(name=name))
    if "--config" not in args:
        args = [*args, "--config", str(tmp_path / "cluster.toml")]
    assert cli.main(args) == code
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.startswith(
        "pysteer: error: " + message.format(sock=f"/run/pysteer/{name}/agent-")
    )
    assert out.err.count("\n") == 1


def test_naming_puts_the_node_before_the_message() -> None:
    from pysteer.agent.cli import _naming  # noqa: PLC0415

    with pytest.raises(AgentRefused, match=r"^node a: cordoned$"), _naming(refused="node a: "):
        raise AgentRefused("cordoned")
    with (
        pytest.raises(AgentDown, match=r"^node a is down: gone$"),
        _naming(down="node a is down: "),
    ):
        raise AgentDown("gone")


def test_a_namespace_error_is_its_message_alone() -> None:
    """No "[Errno 2]" in front of what the operator reads."""
    from pysteer.netns import NetnsError  # noqa: PLC0415

    exc = NetnsError(2, "no network namespace named 'x'")
    assert str(exc) == "no network namespace named 'x'" and exc.errno == 2
    assert exitcodes.report(exc) == 1


def test_status_fails_when_anything_is_down(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Both agents down (so no steering daemon was asked either): 3, each said."""
    name = f"t{os.getpid()}"
    (tmp_path / "cluster.toml").write_text(CLUSTER.format(name=name))
    assert cli.main(["status", "--config", str(tmp_path / "cluster.toml")]) == 3
    out = capsys.readouterr().out
    assert "PROBLEM: node a is down (no agent at" in out
    assert "PROBLEM: the steering daemon is unreachable (no agent is up to ask)" in out
    assert cli.main(["status", "--json", "--config", str(tmp_path / "cluster.toml")]) == 3
    problems = json.loads(capsys.readouterr().out)["problems"]
    assert [p["kind"] for p in problems] == ["down", "down", "down"]


def test_status_problems() -> None:
    """In doubt or a certificate about to expire: 1 (a check found a problem)."""
    from pysteer.agent.cli import _problems  # noqa: PLC0415

    up = {"up": True, "in_doubt": []}
    steer = {"reachable": True}
    fine = {"days_left": 30.5}
    assert _problems({"a": up}, steer, {"ca": fine, "b": {"here": False}}) == []
    doubt = {"up": True, "in_doubt": ["0123456789abcdef"]}
    found = _problems({"a": doubt}, steer, {"ca": {"days_left": 29.9}})
    assert found == [
        {
            "kind": "in-doubt",
            "what": "migration 0123456789ab on a is in doubt (pysteer migrations)",
        },
        {"kind": "certificate", "what": "certificate ca expires in 29.9 days"},
    ]


def test_an_agent_that_answers_nothing_is_not_answering(tmp_path: Path) -> None:
    """A stopped agent (SIGSTOP) still takes connections on its socket: "not answering",
    not "no agent at" (which is for a socket nobody listens on); both exit 3."""
    import socket  # noqa: PLC0415

    from pysteer.agent.cli import _naming  # noqa: PLC0415
    from pysteer.agent.control import AgentSilent, Stream  # noqa: PLC0415

    path = tmp_path / "agent-a.sock"
    with socket.socket(socket.AF_UNIX) as silent:
        silent.bind(str(path))
        silent.listen()
        with (
            pytest.raises(AgentSilent) as info,
            _naming(down="node a is down: "),
        ):
            Stream(path, "status", timeout=0.2).next()
    assert str(info.value) == (
        f"node a is not answering: the agent at {path} took the connection but answered "
        "nothing within 0.2 s (stopped, or overloaded?)"
    )
    assert exitcodes.report(info.value) == 3
    with (
        pytest.raises(AgentDown, match=r"^node a is down: no agent at "),
        _naming(down="node a is down: "),
    ):
        Stream(path, "status", timeout=0.2).next()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["migrate", "--flow", "10.0.0.2:5-10.0.0.100:443", "--to", "b", "--timeout", "0.001"],
            "--timeout must be in [0.1, 600] seconds, not 0.001",
        ),
        (["drain", "--from", "a", "--to", "b", "--batch", "0"], "--batch must be 1..4096, not 0"),
        (["steer", "divert", "10.0.0.1"], "give --to NODE (where new connections go), or --clear"),
        (
            ["steer", "divert", "10.0.0.1", "--to", "b", "--clear"],
            "give --to NODE or --clear, not both",
        ),
        (["steer", "divert", "10.0.0.1", "b", "--to", "b"], "give --to once"),
        (["steer", "to", "--to", "b"], "--flow FLOW is required"),
        (
            ["steer", "park", "--flow", "10.0.0.2:1-10.0.0.1:2", "10.0.0.2:1-10.0.0.1:2"],
            "give --flow FLOW once",
        ),
        (["agent", "cordon"], "--node NODE is required"),
        (["undrain", "--node", "a", "b"], "give --node NODE once"),
    ],
)
def test_each_bad_option_is_blamed_alone(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "cluster.toml").write_text(CLUSTER.format(name=f"t{os.getpid()}"))
    if args[0] != "steer":
        args = [*args, "--config", str(tmp_path / "cluster.toml")]
    assert cli.main(args) == 2
    assert capsys.readouterr().err.startswith(f"pysteer: error: {message}")
