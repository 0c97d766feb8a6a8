"""The man page and the shell completion are generated from the command tree: the
checked-in page is what the tree makes now, and completion answers from the same tree."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pysteer.manual import manpage
from pysteer.paths import repo_root


def test_the_checked_in_man_page_is_current() -> None:
    """Regenerate it with `pysteer manpage > docs/pysteer.1` after changing a command."""
    page = manpage()
    assert (repo_root() / "docs" / "pysteer.1").read_text() == page
    for command in ("migrate", "drain", "steer park", "certs init", "lab up", "completion"):
        assert f"'pysteer {command}'" in page, command
    assert "\\-\\-flow" in page and "exit codes: 0 done" in page


def complete(line: str, tmp_path: Path) -> list[str]:
    """What the shell gets back for ``line`` (argcomplete's protocol, through a file)."""
    out = tmp_path / "completions"
    env = dict(
        os.environ,
        _ARGCOMPLETE="1",
        COMP_LINE=line,
        COMP_POINT=str(len(line)),
        _ARGCOMPLETE_IFS="\n",
        ARGCOMPLETE_USE_TEMPFILES="1",
        _ARGCOMPLETE_STDOUT_FILENAME=str(out),
    )
    run = subprocess.run(
        [sys.executable, "-m", "pysteer"], env=env, capture_output=True, text=True, check=False
    )
    assert run.returncode == 0, run.stderr
    return out.read_text().split()


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("pysteer st", ["status", "steer"]),
        ("pysteer lab u", ["up"]),
        ("pysteer steer pa", ["park", "pass"]),
        ("pysteer migrate --f", ["--flow"]),
        ("pysteer completion ", ["--help", "-h", "bash", "fish", "zsh"]),
    ],
)
def test_completion(line: str, expected: list[str], tmp_path: Path) -> None:
    assert sorted(complete(line, tmp_path)) == expected


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_code_for_each_shell(shell: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pysteer", "completion", shell],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "pysteer" in out.stdout and "_ARGCOMPLETE" in out.stdout
