"""The CLI's help and its bad-input errors (exit 2, a clear message, nothing changed)."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pysteer.cli import main


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pysteer", *args], capture_output=True, text=True, check=False
    )


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ((), ["doctor", "lab"]),
        (("doctor",), ["--json", "TCP_REPAIR"]),
        (("lab",), ["up", "down", "status"]),
        (("lab", "up"), ["--prefix", "--plan", "--v4", "--v6"]),
        (("lab", "status"), ["--prefix", "--json"]),
    ],
)
def test_help(args: tuple[str, ...], words: list[str]) -> None:
    out = run(*args, "--help")
    assert out.returncode == 0
    for word in words:
        assert word in out.stdout


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(flag: str) -> None:
    out = run(flag)
    assert (out.returncode, out.stdout, out.stderr) == (0, "pysteer 0.1.0\n", "")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["lab", "up", "--prefix", "Bad-Name"], "invalid lab prefix 'Bad-Name'"),
        (["lab", "up", "--prefix", "x", "--v4", "8.8.0.0/16"], "is not private"),
        (["lab", "up", "--prefix", "x", "--v6", "2001:db8::/48"], "is not a ULA"),
        (["lab", "up", "--prefix", "x", "--variant", "nope"], "no plan variant 'nope'"),
        (["lab", "status", "--prefix", "neverbuilt"], "no lab named 'neverbuilt'"),
        (["lab", "down", "--prefix", "a/b"], "invalid lab prefix 'a/b'"),
    ],
)
def test_bad_input_exits_2(args: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("pysteer: error: ")
    assert message in err


def test_unknown_command_is_argparse_error() -> None:
    out = run("migrate-everything")
    assert out.returncode == 2
    assert "invalid choice" in out.stderr


@pytest.mark.parametrize("args", [["lab", "plan"], ["--help"], ["certs", "init", "--help"]])
def test_a_closed_pipe_is_no_traceback(args: list[str]) -> None:
    """`pysteer lab plan | head -c1`: the reader goes away; pysteer says nothing and ends
    as a shell reports SIGPIPE (it printed a BrokenPipeError traceback before)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pysteer", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    proc.stdout.close()  # type: ignore[union-attr]
    err = proc.stderr.read()  # type: ignore[union-attr]
    proc.stderr.close()  # type: ignore[union-attr]
    assert (proc.wait(30), err) == (141, b"")


def _leaves() -> dict[str, argparse.ArgumentParser]:
    from pysteer.cli import build_parser  # noqa: PLC0415

    found: dict[str, argparse.ArgumentParser] = {}

    def walk(parser: argparse.ArgumentParser, path: list[str]) -> None:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if path and (not subs or parser.get_default("func") is not None):
            found[" ".join(path)] = parser
        for sub in subs:
            for name, child in sub.choices.items():
                walk(child, [*path, name])

    walk(build_parser("lab"), [])
    return found


def test_every_command_but_the_daemons_takes_json() -> None:
    """One convention: --json everywhere (the daemons log JSON with --log-json; completion
    and manpage print shell code and roff, no data)."""
    without = {
        name
        for name, parser in _leaves().items()
        if not any("--json" in a.option_strings for a in parser._actions)
    }
    assert without == {"agent run", "steer run", "completion", "manpage"}
    for daemon in ("agent run", "steer run"):
        parser = _leaves()[daemon]
        assert any("--log-json" in a.option_strings for a in parser._actions)


def test_json_output_is_one_object(tmp_path: Path) -> None:
    """A map, never a bare list: the same shape for every command."""
    ca = tmp_path / "ca"
    outputs = [
        run("lab", "plan", "--json"),
        run("certs", "init", "--dir", str(ca), "--node", "a=10.0.0.1", "--json"),
        run("certs", "issue", "--dir", str(ca), "--node", "a=10.0.0.1", "--json"),
        run(
            "certs",
            "bundle",
            "--dir",
            str(ca),
            "--node",
            "a",
            "--out",
            str(tmp_path / "b"),
            "--role",
            "host",
            "--json",
        ),
    ]
    for out in outputs:
        assert out.returncode == 0, out.stderr
        assert isinstance(json.loads(out.stdout), dict), out.stdout
    assert json.loads(outputs[1].stdout)["nodes"] == ["a"]
    assert json.loads(outputs[2].stdout)["files"] == ["a.pem", "a.key"]


def test_every_command_describes_itself_without_markup() -> None:
    for name, parser in _leaves().items():
        assert parser.description, name
        assert "``" not in parser.format_help(), name


def test_a_table_fits_its_widest_cell(capsys: pytest.CaptureFixture[str]) -> None:
    """An IPv6 flow is longer than any fixed column: the columns follow it."""
    from pysteer.clitable import print_table  # noqa: PLC0415

    v6 = "[fd70:7374:6565:1::2]:51090-[fd70:7374:6565:64::1]:443"
    print_table([("FLOW", "ACTION"), (v6, "TO"), ("10.0.0.2:1-10.0.0.100:443", "PASS")])
    lines = capsys.readouterr().out.splitlines()
    assert [line.index(line.split()[1]) for line in lines] == [len(v6) + 2] * 3
