"""A running pysteer cluster on a lab: steering daemon, two agents, and the CLI around them.

Clients are unmodified programs run in the client namespace. ``Session`` drives one of
them over its stdin/stdout (s_client, gnutls-cli, the Python line client) while the test
migrates its flow with the real CLI.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from helpers.migration import netstat
from pysteer.lab import Lab
from pysteer.lab.cluster import LabCluster

PYSTEER = [sys.executable, "-m", "pysteer"]
HELPERS = Path(__file__).parent


class Cluster(LabCluster):
    # --- the CLI ------------------------------------------------------------------------
    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*PYSTEER, *args, "--config", str(self.config)],
                              capture_output=True, text=True, timeout=timeout,
                              check=False)  # fmt: skip

    def flows(self) -> list[dict[str, Any]]:
        out = self.cli("flows", "--json")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)["flows"]

    def owner(self, flow: str) -> str | None:
        return next((f["node"] for f in self.flows() if f["flow"] == flow), None)

    def wait_new_flow(self, before: set[str], port: int, timeout: float = 20) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            new = [f for f in self.flows()
                   if f["flow"] not in before and f["flow"].endswith(f":{port}")]  # fmt: skip
            if new:
                assert len(new) == 1, new
                return new[0]
            time.sleep(0.05)
        raise AssertionError(f"no new flow to port {port}")

    def migrate(self, flow: str, to: str, *extra: str) -> dict[str, Any]:
        out = self.cli("migrate", "--flow", flow, "--to", to, "--json", *extra)
        assert out.stdout, out.stderr
        report = json.loads(out.stdout)
        report["exit"] = out.returncode
        return report

    def steer_row(self, flow: str) -> dict[str, Any] | None:
        out = subprocess.run([*PYSTEER, "steer", "flows", "--json", "--name", self.lab.prefix],
                             capture_output=True, text=True, check=True)  # fmt: skip
        return next((r for r in json.loads(out.stdout) if r["flow"] == flow), None)

    def client_counters(self) -> dict[str, int]:
        ext = self.lab.call("client", netstat, "TcpExt")
        tcp = self.lab.call("client", netstat, "Tcp")
        return {"TCPTimeouts": ext["TCPTimeouts"], "RetransSegs": tcp["RetransSegs"],
                "EstabResets": tcp["EstabResets"], "ActiveOpens": tcp["ActiveOpens"]}  # fmt: skip


class Session:
    """An interactive client: lines go to its stdin, everything it prints is kept."""

    def __init__(self, lab: Lab, argv: list[str], interval: float = 0.02) -> None:
        self.proc = lab.popen("client", argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)  # fmt: skip
        self.out = bytearray()
        self.sent: list[bytes] = []
        self.interval = interval
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._writer: threading.Thread | None = None

    def _read(self) -> None:
        while chunk := self.proc.stdout.read1(65536):
            with self._lock:
                self.out += chunk

    def text(self) -> str:
        with self._lock:
            return self.out.decode(errors="replace")

    def wait_for(self, needle: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.text():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"{needle!r} not seen; got {self.text()[-500:]!r}")
            time.sleep(0.02)

    def send(self, line: bytes) -> None:
        self.proc.stdin.write(line)
        self.proc.stdin.flush()
        self.sent.append(line)

    def command(self, line: bytes) -> None:
        """Input the client itself acts on (s_client's K): not sent as data."""
        self.proc.stdin.write(line)
        self.proc.stdin.flush()

    def start_writing(self) -> None:
        def write() -> None:
            n = 0
            while not self._stop.wait(self.interval):
                n += 1
                self.send(b"line-%d-%s\n" % (n, b"x" * (n % 37)))

        self._writer = threading.Thread(target=write, daemon=True)
        self._writer.start()

    def stop_writing(self) -> None:
        self._stop.set()
        if self._writer:
            self._writer.join()

    def drain(self, timeout: float = 20) -> None:
        """Wait for the echo of every line sent, and a few more ticks."""
        self.wait_for(f"echo {len(self.sent)} ", timeout)
        time.sleep(0.3)

    def finish(self) -> str:
        """End the client (its kernel may answer the ticks still coming with a RST)."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5)
        self.proc.stdin.close()
        self.proc.stderr.close()
        return self.text()


TICK = re.compile(r"^tick (\d+)$")
ECHO = re.compile(r"^echo (\d+) (.*)$")


def check_ticker_stream(text: str, sent: list[bytes]) -> int:
    """The ticker's output, line by line: one greeting, consecutive ticks, one echo per line
    sent in order with a counter that never restarts (a reconnect would start it again).
    Returns the number of ticks."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    lines = lines[lines.index("ticker ready") :]
    assert lines.count("ticker ready") == 1, "the app greeted twice: a reconnect"
    ticks, echoes = [], []
    for line in lines[1:]:
        if m := TICK.match(line):
            ticks.append(int(m.group(1)))
        elif m := ECHO.match(line):
            echoes.append((int(m.group(1)), m.group(2)))
        else:
            raise AssertionError(f"unexpected line {line!r}")
    assert ticks == list(range(1, len(ticks) + 1)), "ticks lost, repeated or restarted"
    expected = [(i + 1, s.decode().rstrip("\n")) for i, s in enumerate(sent)]
    assert echoes == expected, "echoes lost, repeated or out of order"
    return len(ticks)
