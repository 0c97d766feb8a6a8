"""The CLI starts without the heavy stacks: building the argparse tree, printing help and
failing fast on bad input import no TLS, BPF, netlink or asyncio code.

Those imports cost most of a command's start (``scripts/bench/cli_start.py`` times it);
this test checks what is imported, not how long it takes, so it holds on any machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Third-party and standard modules only the handlers that use them may import...
HEAVY = [
    "cryptography",
    "OpenSSL",
    "bcc",
    "pyroute2",
    "prometheus_client",
    "msgpack",
    "ssl",
    "_ssl",
    "asyncio",
    "tomllib",
    "ctypes",
]
# ...and pysteer's own modules that import them.
HEAVY += [
    "pysteer.tls",
    "pysteer.tcp",
    "pysteer.transfer",
    "pysteer.identity",
    "pysteer.certs",
    "pysteer.metrics",
    "pysteer.doctor.checks",
    "pysteer.steer.loader",
    "pysteer.steer.daemon",
    "pysteer.agent.agent",
    "pysteer.rpc.codec",  # msgpack: a command loads it once it reaches a daemon
    "pysteer.rpc.aio",
    "pysteer.rpc.blocking",
]


def imported(*args: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Run ``python -X importtime -m pysteer ARGS`` on this tree; the modules it imported."""
    env = {k: v for k, v in os.environ.items() if k != "PYSTEER_CONFIG"}
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "pysteer", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    modules = [
        line.rsplit("|", 1)[1].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    ]
    assert "pysteer.cli" in modules  # the run did import the CLI: not a vacuous pass
    return done, modules


def heavy(modules: list[str]) -> list[str]:
    return sorted(m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY))


@pytest.mark.parametrize(
    ("command", "code", "says"),
    [
        ("--help", 0, "COMMAND"),
        ("flows --help", 0, "--node"),
        ("migrate --help", 0, "--flow"),
        ("agent --help", 0, "cordon"),
        ("certs --help", 0, "bundle"),
        ("doctor --help", 0, "--json"),
        ("steer --help", 0, "divert"),
        ("steer flows --name nonexistent", 3, "no steering daemon"),
        ("status", 2, "no cluster file"),
        ("migrate --flow 1.2.3.4:5-6.7.8.9:10 --to b", 2, "no cluster file"),
        ("lab --help", 0, "status"),
        ("lab status --prefix neverbuilt", 2, "no lab named"),
    ],
)
def test_command_imports_nothing_heavy(command: str, code: int, says: str) -> None:
    done, modules = imported(*command.split())
    assert done.returncode == code, done.stderr[-2000:]
    assert says in done.stdout + done.stderr
    assert heavy(modules) == []


def test_lazy_choices_still_load() -> None:
    """A choice defined next to heavy code is still checked, and then loads that code."""
    done, modules = imported(
        "certs", "init", "--dir", "/nonexistent", "--node", "a", "--kind", "dsa"
    )
    assert done.returncode == 2
    assert "invalid choice: 'dsa' (choose from 'rsa', 'ecdsa', 'ed25519')" in done.stderr
    assert "pysteer.certs" in modules
