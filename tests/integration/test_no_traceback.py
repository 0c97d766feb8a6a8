"""Every command, given bad input, and again with its standard output closed (``| head
-0``): one line on stderr and an exit code from the map, never a traceback.

Each leaf command of the parser has its bad inputs here; a command added without any
fails ``test_every_command_is_covered``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pysteer.cli import ROOT
from pysteer.clitable import walk
from pysteer.steer.pins import PIN_ROOT

MISSING = "/nonexistent/cluster.toml"
GARBAGE = "garbage.toml"  # written into the test's directory: not TOML
FLOW = "10.0.0.2:40000-10.0.0.100:443"

CASES: dict[str, list[list[str]]] = {
    "doctor": [["doctor", "--bogus"]],
    "lab up": [["lab", "up", "--prefix", "Bad-Name"], ["lab", "up", "--variant", "nope"]],
    "lab down": [["lab", "down", "--prefix", "Bad-Name"]],
    "lab cluster": [
        ["lab", "cluster", "--prefix", "nolab0"],
        ["lab", "cluster", "--dir", "/proc/x"],
    ],
    "lab plan": [["lab", "plan", "--variant", "nope"]],
    "lab vm-setup": [
        ["lab", "vm-setup", "--node", "zz"],
        ["lab", "vm-setup", "--node", "a", "--variant", "nope"],
    ],
    "lab status": [["lab", "status", "--prefix", "Bad-Name"]],
    "steer run": [
        ["steer", "run", "--name", "tnotb", "--ifname", "nosuch"],
        ["steer", "run", "--name", "tnotb", "--netns", "nosuch", "--ifname", "x"],
        [
            "steer",
            "run",
            "--name",
            "tnotb",
            "--ifname",
            "lo",
            "--host",
            "a=to-a,zz:zz",
            "--mode",
            "tc",
        ],
        ["steer", "run", "--name", "Bad Name", "--ifname", "lo"],
        ["steer", "run", "--name", "tnotb", "--ifname", "lo", "--max-flows", "-1"],
    ],
    "steer flows": [
        ["steer", "flows", "--name", "nosuchdaemon"],
        ["steer", "flows", "--socket", "/proc/x"],
    ],
    "steer hosts": [["steer", "hosts", "--name", "nosuchdaemon"]],
    "steer stats": [["steer", "stats", "--name", "nosuchdaemon", "--json"]],
    "steer diversions": [["steer", "diversions", "--name", "nosuchdaemon"]],
    "steer park": [
        ["steer", "park", "garbage", "--name", "nosuchdaemon"],
        ["steer", "park", "[10.0.0.2]:1-10.0.0.1:2"],
    ],
    "steer pass": [["steer", "pass", "fd00::1:1-fd00::2:2", "--name", "nosuchdaemon"]],
    "steer to": [["steer", "to", FLOW, "b", "--name", "nosuchdaemon"], ["steer", "to", "x", "b"]],
    "steer forget": [["steer", "forget", FLOW + "9" * 50, "--name", "nosuchdaemon"]],
    "steer gc": [["steer", "gc", "--name", "nosuchdaemon", "--dry-run"]],
    "steer destroy": [
        ["steer", "destroy", "--name", "Bad Name!"],
        ["steer", "destroy", "--name", "x", "--netns", "nosuch", "--ifname", "x"],
    ],
    "steer divert": [
        ["steer", "divert", "not-an-ip", "b", "--name", "nosuchdaemon"],
        ["steer", "divert", "10.0.0.1", "--name", "nosuchdaemon"],
    ],
    "certs init": [
        ["certs", "init", "--dir", "/proc/nope", "--node", "a=10.0.0.1"],
        ["certs", "init", "--dir", "keys", "--node", "a=not an address!!"],
        ["certs", "init", "--dir", "keys", "--node", "=10.0.0.1"],
    ],
    "certs issue": [["certs", "issue", "--dir", "/nonexistent", "--node", "c=10.0.0.3"]],
    "certs bundle": [["certs", "bundle", "--dir", "/nonexistent", "--node", "a", "--out", "out"]],
    "agent run": [
        ["agent", "run", "--config", MISSING, "--node", "a"],
        ["agent", "run", "--config", GARBAGE, "--node", "a"],
    ],
    "agent cordon": [["agent", "cordon", "--config", MISSING, "a"]],
    "agent uncordon": [["agent", "uncordon", "--config", GARBAGE, "a"]],
    "migrate": [
        ["migrate", "--config", MISSING, "--flow", FLOW, "--to", "b"],
        ["migrate", "--config", GARBAGE, "--flow", "garbage", "--to", "b", "--timeout", "0"],
    ],
    "drain": [
        ["drain", "--config", MISSING, "--from", "a", "--to", "b"],
        ["drain", "--config", GARBAGE, "--from", "a", "--to", "b", "--batch", "0", "--json"],
    ],
    "undrain": [["undrain", "--config", MISSING, "a"]],
    "flows": [["flows", "--config", GARBAGE], ["flows", "--config", MISSING, "--json"]],
    "migrations": [["migrations", "--config", GARBAGE]],
    "migrations resolve": [
        ["migrations", "resolve", "--config", MISSING, "--keep", "source", "abc"]
    ],
    "status": [["status", "--config", GARBAGE, "--json"], ["status", "--config", "/proc"]],
    "completion": [["completion", "nosh"], ["completion"]],
    "manpage": [["manpage", "--bogus"]],
}


def leaves() -> list[str]:
    """Every command that runs something: "steer park", "lab up"... (the CLI's own walk
    of its command table, which loads the lab's subtree too)."""
    return [" ".join(path) for path, cmd in walk(ROOT) if cmd.run is not None]


def test_every_command_is_covered() -> None:
    assert ROOT.name == "pysteer"
    assert sorted(leaves()) == sorted(CASES)


def run(argv: list[str], cwd: Path, *, closed_stdout: bool) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYSTEER_CONFIG", "PYSTEER_DEBUG")}
    if not closed_stdout:
        out = subprocess.run(
            [sys.executable, "-m", "pysteer", *argv],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        return out.returncode, out.stdout, out.stderr
    read, write = os.pipe()
    os.close(read)  # as `| head -0` once head has gone: every write fails
    try:
        out = subprocess.run(
            [sys.executable, "-m", "pysteer", *argv],
            cwd=cwd,
            env=env,
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write)
    return out.returncode, "", out.stderr


@pytest.mark.parametrize(
    "argv",
    [argv for cases in CASES.values() for argv in cases],
    ids=lambda argv: " ".join(argv)[:60],
)
@pytest.mark.parametrize("closed_stdout", [False, True], ids=["stdout", "closed-stdout"])
def test_bad_input_is_one_line(argv: list[str], closed_stdout: bool, tmp_path: Path) -> None:
    (tmp_path / GARBAGE).write_text("this is [not toml")
    pinned = sorted(PIN_ROOT.iterdir()) if PIN_ROOT.is_dir() else []
    code, stdout, stderr = run(argv, tmp_path, closed_stdout=closed_stdout)
    # Bad input changes nothing: not even an empty pin directory for a bad instance.
    assert (sorted(PIN_ROOT.iterdir()) if PIN_ROOT.is_dir() else []) == pinned
    assert "Traceback" not in stderr + stdout, stderr
    assert code in (1, 2, 3, 141), (code, stderr)  # failed, bad input, down, closed pipe
    lines = stderr.strip().splitlines()
    assert lines and lines[-1].startswith(("pysteer: error:", "pysteer ")), stderr
    assert not Path("/run/pysteer/steer-tnotb.lock").exists()  # no daemon was left


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["lab", "plan"], ["doctor", "--json"], ["manpage"], ["completion", "bash"]]
    + [[*leaf.split(), "--help"] for leaf in CASES],
    ids=lambda argv: " ".join(argv)[:60],
)
def test_a_closed_stdout_is_quiet(argv: list[str], tmp_path: Path) -> None:
    code, _, stderr = run(argv, tmp_path, closed_stdout=True)
    assert (code, stderr) in ((141, ""), (0, "")), (code, stderr)
