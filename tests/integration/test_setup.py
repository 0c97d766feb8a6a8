"""scripts/setup is idempotent: run again, it installs nothing and changes nothing."""

import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _snapshot() -> dict[str, object]:
    dpkg = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Package} ${Version} ${Status}\n"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--all"], capture_output=True, text=True, check=True
    ).stdout
    modules = Path("/lib/modules") / platform.release()
    links = {
        name: os.readlink(modules / name)
        for name in ("build", "source")
        if (modules / name).is_symlink()
    }
    venv = ROOT / ".venv"
    return {
        "dpkg": dpkg,
        "pip": pip,
        "links": links,
        "venv": (venv / "pyvenv.cfg").stat().st_mtime_ns,
        "stamp": (venv / ".pysteer-setup").read_text(),
    }


def test_second_setup_installs_nothing() -> None:
    subprocess.run([str(ROOT / "scripts" / "setup")], capture_output=True, check=True)  # settle
    before = _snapshot()
    out = subprocess.run(
        [str(ROOT / "scripts" / "setup")], capture_output=True, text=True, check=True
    )
    assert out.stdout.splitlines() == ["setup: nothing to install: everything is already in place"]
    assert "apt-get" not in out.stdout + out.stderr
    assert _snapshot() == before
