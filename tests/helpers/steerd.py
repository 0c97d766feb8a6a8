"""A steering daemon on a lab (``pysteer steer run`` in the root namespace, steering the
steering node's namespace), and its CLI: what the steering tests drive."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pysteer.lab import Lab

PYSTEER = [sys.executable, "-m", "pysteer"]


class DaemonProc:
    def __init__(self, lab: Lab, name: str, *extra: str, mode: str | None = "tc") -> None:
        """``mode``: the steering mode (None: the daemon's choice, or one in ``extra``)."""
        self.lab, self.name = lab, name
        self.argv = [*PYSTEER, "steer", "run", "--name", name, "--ifname", "to-client"]
        self.argv += ["--netns", lab.netns("steer"), *(["--mode", mode] if mode else [])]
        for host in ("a", "b"):
            self.argv += ["--host", f"{host}=to-{host},{lab.mac(host, 'to-steer')}"]
        self.argv += extra
        self.proc: subprocess.Popen | None = None
        # Removed with this object (or at exit): hundreds of test daemons left their logs.
        self._logs = tempfile.TemporaryDirectory(prefix="pysteer-steerd-")
        self.log_path = Path(self._logs.name) / "steer.log"

    def start(self, *more: str) -> None:
        """Start it (with ``more`` options this time) and wait until it serves."""
        start = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("a") as out:
            self.proc = subprocess.Popen(
                [*self.argv, *more], stdout=out, stderr=subprocess.STDOUT, text=True
            )
        deadline = time.monotonic() + 60
        while "control at" not in self.log()[start:]:
            assert self.proc.poll() is None, self.log()[start:]
            assert time.monotonic() < deadline, "the steering daemon did not start"
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def wait_for(self, text: str, timeout: float) -> None:
        """Until the log holds ``text``; the daemon must stay up meanwhile."""
        deadline = time.monotonic() + timeout
        while text not in self.log():
            assert self.proc is not None and self.proc.poll() is None, self.log()
            assert time.monotonic() < deadline, f"{text!r} not logged:\n{self.log()}"
            time.sleep(0.05)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return cli(self.name, *args)

    def rows(self) -> list[dict[str, Any]]:
        out = self.cli("flows", "--json")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)["flows"]

    def stats(self) -> dict[str, Any]:
        out = self.cli("stats", "--json")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)["stats"]


def cli(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PYSTEER, "steer", *args, "--name", name],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
