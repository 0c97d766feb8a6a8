"""The shipped systemd units (packaging/systemd) pass ``systemd-analyze verify`` (which
needs no running systemd) and run what they say: the agent and the steering daemon, with
only the capabilities each needs."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pysteer.paths import repo_root

UNITS = repo_root() / "packaging" / "systemd"
INSTALLED = "/opt/pysteer/bin/pysteer"  # where deployment.md installs it


def unit(name: str) -> str:
    return (UNITS / name).read_text()


def directives(text: str) -> dict[str, str]:
    return dict(
        line.split("=", 1) for line in text.splitlines() if re.match(r"^[A-Z][A-Za-z]+=", line)
    )


@pytest.mark.parametrize(
    ("template", "instance"),
    [
        ("pysteer-agent@.service", "pysteer-agent@a.service"),
        ("pysteer-steer@.service", "pysteer-steer@lb.service"),
    ],
)
def test_units_verify(tmp_path: Path, template: str, instance: str) -> None:
    """As installed, with the executable where this test's pysteer is."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "scripts/setup installs systemd (systemd-analyze)"
    here = Path(sys.executable).with_name("pysteer")
    assert here.exists()
    (tmp_path / instance).write_text(unit(template).replace(INSTALLED, str(here)))
    out = subprocess.run(
        [analyze, "verify", "--man=no", str(tmp_path / instance)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert (out.returncode, out.stderr, out.stdout) == (0, "", "")


def test_agent_unit() -> None:
    d = directives(unit("pysteer-agent@.service"))
    assert d["ExecStart"] == f"{INSTALLED} agent run --node %i $PYSTEER_AGENT_ARGS"
    assert d["ExecReload"] == "/bin/kill -HUP $MAINPID"  # certificates reloaded, no drop
    assert d["Restart"] == "on-failure"
    assert d["Environment"] == "PYSTEER_CONFIG=/etc/pysteer/cluster.toml"
    caps = "CAP_NET_ADMIN CAP_NET_RAW CAP_NET_BIND_SERVICE"
    assert d["CapabilityBoundingSet"] == d["AmbientCapabilities"] == caps
    # The ledger and socket (/run/pysteer, kept at a stop), the drained state (/var/lib):
    assert (d["RuntimeDirectory"], d["RuntimeDirectoryPreserve"]) == ("pysteer", "yes")
    assert d["StateDirectory"] == "pysteer" and "ReadWritePaths" not in d
    assert d["ProtectSystem"] == "strict" and d["NoNewPrivileges"] == "yes"
    # Stopping drains first (drain_timeout, 60 s by default): systemd must wait for it.
    assert int(d["TimeoutStopSec"]) >= 90


def test_steer_unit() -> None:
    d = directives(unit("pysteer-steer@.service"))
    assert d["ExecStart"] == f"{INSTALLED} steer run --name %i $PYSTEER_STEER_ARGS"
    assert d["EnvironmentFile"] == "/etc/pysteer/steer-%i.env"
    assert d["Restart"] == "on-failure"
    assert "CAP_BPF" in d["CapabilityBoundingSet"].split()
    assert d["CapabilityBoundingSet"] == d["AmbientCapabilities"]
    assert d["ReadWritePaths"] == "/sys/fs/bpf"
    assert (d["RuntimeDirectory"], d["RuntimeDirectoryPreserve"]) == ("pysteer", "yes")
    assert "ProtectKernelModules" not in d  # BCC reads the headers under /lib/modules


@pytest.mark.parametrize(("command", "option"), [("agent", "--node"), ("steer", "--name")])
def test_the_units_options_exist(command: str, option: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pysteer", command, "run", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert option in out.stdout
