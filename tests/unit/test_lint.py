"""The tree stays clean: ruff, bash -n and shellcheck on every script, the Vagrantfile
validates, and the Vagrant plan is the one pysteer derives."""

import json
import os
import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_ruff_check() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--output-format", "concise", str(ROOT)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_ruff_format() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", str(ROOT)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def shell_scripts() -> list[Path]:
    candidates = [
        *(ROOT / "scripts").glob("*"),
        *(ROOT / "vagrant").glob("*.sh"),
        ROOT / ".ci" / "run",
    ]
    found = [
        p for p in candidates if p.is_file() and p.read_text().startswith("#!/usr/bin/env bash")
    ]
    assert len(found) >= 5
    return found


def test_shell_scripts_parse() -> None:
    for script in shell_scripts():
        out = subprocess.run(
            ["bash", "-n", str(script)], capture_output=True, text=True, check=False
        )
        assert out.returncode == 0, f"{script}: {out.stderr}"


def test_shellcheck() -> None:
    out = subprocess.run(
        ["shellcheck", *map(str, shell_scripts())], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_vagrant_validate() -> None:
    """What CI can do without booting VMs: the Vagrantfile parses and validates.

    ``--ignore-provider``: a CI machine has no VirtualBox or libvirt, and plain ``vagrant
    validate`` then fails with "No usable default provider could be found"."""
    out = subprocess.run(
        ["vagrant", "validate", "--ignore-provider"],
        cwd=ROOT / "vagrant",
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "validated successfully" in out.stdout
    out = subprocess.run(  # and the five-VM plan with two steering nodes
        ["vagrant", "validate", "--ignore-provider"],
        cwd=ROOT / "vagrant",
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env=os.environ | {"PYSTEER_STEERING": "2"},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "steer2" in out.stdout and "validated successfully" in out.stdout


def test_vagrant_plan_is_derived_from_plan_json() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pysteer", "lab", "plan", "--variant", "vm"],
        capture_output=True,
        text=True,
        check=True,
    )
    committed = json.loads((ROOT / "vagrant" / "plan-vm.json").read_text())
    assert committed == json.loads(out.stdout), "regenerate: pysteer lab plan --variant vm"
    out = subprocess.run(
        [sys.executable, "-m", "pysteer", "lab", "plan", "--variant", "vm", "--steering", "2"],
        capture_output=True,
        text=True,
        check=True,
    )
    committed = json.loads((ROOT / "vagrant" / "plan-vm-steering2.json").read_text())
    assert committed == json.loads(out.stdout), "regenerate it with --steering 2"
    assert committed["steers"] == ["steer", "steer2"]  # what the Vagrantfile defines


def test_dependency_floors_are_the_tested_versions() -> None:
    """Floors that admit versions with published advisories are a vulnerability: the
    crypto stack's floors are the versions this suite runs on (see docs/security.md)."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    floors = dict(d.replace(" ", "").split(">=", 1) for d in deps if ">=" in d)
    pinned = [d for d in deps if ">=" not in d]
    assert all("==" in d for d in pinned), pinned  # every dependency has a floor or a pin
    for d in pinned:
        name, _, pin = d.partition("==")
        assert version(name) == pin, (name, version(name), pin)
    assert floors["cryptography"] == "50" and floors["pyOpenSSL"] == "26", floors
    for name, floor in floors.items():
        installed = tuple(int(p) for p in version(name).split(".")[:2] if p.isdigit())
        wanted = tuple(int(p) for p in floor.split(".")[:2])
        assert installed >= wanted, (name, version(name), floor)
