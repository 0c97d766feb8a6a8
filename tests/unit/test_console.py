"""A Ctrl-C while the CLI is still importing ends it quietly (130, one line), as the exit
map does once ``main`` runs: the ``pysteer`` command starts in ``pysteer.console``."""

from __future__ import annotations

import subprocess
import sys
import tomllib

from pysteer.paths import repo_root

EARLY = """
import os, signal
import pysteer.console
os.kill(os.getpid(), signal.SIGINT)  # as if Ctrl-C came while the CLI imports
import pysteer.cli
print("not reached")
"""

LATER = """
import os, signal, sys
from pysteer.console import main
sys.argv = ["pysteer", "lab", "plan"]
import pysteer.cli
real = pysteer.cli.build_parser
def interrupted(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGINT)  # inside main: the exit map's turn
    return real(*args, **kwargs)
pysteer.cli.build_parser = interrupted
sys.exit(main())
"""


def run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )


def test_a_ctrl_c_while_importing_is_quiet() -> None:
    out = run(EARLY)
    assert (out.returncode, out.stdout, out.stderr) == (130, "", "pysteer: interrupted\n")


def test_a_ctrl_c_in_main_goes_through_the_exit_map() -> None:
    out = run(LATER)
    assert (out.returncode, out.stderr) == (130, "pysteer: interrupted\n"), out.stderr
    assert "Traceback" not in out.stderr


def test_the_command_starts_in_console() -> None:
    project = tomllib.loads((repo_root() / "pyproject.toml").read_text())["project"]
    assert project["scripts"] == {"pysteer": "pysteer.console:main"}
    assert "from pysteer.console import main" in (repo_root() / "pysteer/__main__.py").read_text()
