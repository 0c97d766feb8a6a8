"""What migrate.py and drain.py share: percentiles, the step timeline, targets, workers,
and the backed-up TLS client.

Not a benchmark itself (run_all does not run it). It starts no thread: the backed-up
client's ``SSLSocket`` is only ever used by the thread that made it.
"""

from __future__ import annotations

import hashlib
import socket
import ssl
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pysteer.app.handlers import http_body
from pysteer.cluster.config import MAX_WORKERS
from pysteer.lab import Lab
from pysteer.lab.cluster import LabCluster
from pysteer.provision import set_sysctls

HTTP_PORT = 8443  # the lab's TLS http service (GET /bytes/N)


# --- numbers ------------------------------------------------------------------------------
def pct(values: Iterable[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def steps_table(steps: dict[str, dict[str, Any]], indent: str = "  ") -> list[str]:
    """The per-step durations as aligned text lines."""
    if not steps:
        return [f"{indent}(no timelines)"]
    width = max(len(k) for k in steps)
    return [
        f"{indent}{k:<{width}}  p50 {s['p50']:8.3f}  p90 {s['p90']:8.3f}  p99 {s['p99']:8.3f}"
        f"  max {s['max']:8.3f} ms  (n={s['n']})"
        for k, s in steps.items()
    ]


# --- targets ------------------------------------------------------------------------------
def target(name: str, value: float | None, op: str, limit: float, unit: str = "ms") -> dict:
    """One target and whether this run met it (a missing value never meets it)."""
    if op not in ("<=", ">="):
        raise ValueError(f"unknown comparison {op!r}")
    if value is not None:
        value = round(value, 3)
    met = value is not None and (value <= limit if op == "<=" else value >= limit)
    return {"name": name, "value": value, "op": op, "limit": limit, "unit": unit, "met": met}


def flag(name: str, ok: bool) -> dict:
    """A yes/no target (every byte came back, every connection survived)."""
    return {"name": name, "value": ok, "op": "==", "limit": True, "unit": "", "met": ok}


def target_lines(targets: list[dict[str, Any]], indent: str = "") -> list[str]:
    out = []
    for t in targets:
        verdict = "met" if t["met"] else "NOT MET"
        if t["op"] == "==":
            out.append(f"{indent}{t['name']}: {'yes' if t['value'] else 'no'}: {verdict}")
            continue
        unit = f" {t['unit']}" if t["unit"] else ""
        value = "n/a" if t["value"] is None else f"{t['value']:g}{unit}"
        sign = {"<=": "≤", ">=": "≥"}[t["op"]]
        out.append(f"{indent}{t['name']}: {value} (target {sign} {t['limit']:g}{unit}): {verdict}")
    return out


# --- workers ------------------------------------------------------------------------------
def check_workers(workers: int, prog: str) -> None:
    """Exit with one line unless an agent can run ``workers`` worker processes."""
    if not 1 <= workers <= MAX_WORKERS:
        sys.exit(f"{prog}: --workers {workers}: an agent runs 1..{MAX_WORKERS} worker processes")


def lab_cluster(
    lab: Lab, directory: Path, workers: int, *, store: bool | None = None
) -> LabCluster:
    """The lab's steering daemons and agents, each host's agent with ``workers`` processes
    (the cluster file's ``workers``); ``store``: with the shared store (by default only
    with several steering nodes)."""
    return LabCluster(lab, directory, workers={h: workers for h in lab.plan.hosts}, store=store)


# --- a backed-up client -------------------------------------------------------------------
def allow_send_queue(lab: Lab, size: int) -> int:
    """Let the hosts' sockets queue ``size`` bytes to send: the default send buffer of
    every socket made from now on in the lab's hosts (an accepted socket takes its
    listener's, so call this before the agents start). Returns the buffer in bytes."""
    buf = max(4 << 20, 2 * size + (4 << 20))  # room for the skbs' overhead
    for host in lab.plan.hosts:
        lab.call(host, set_sysctls, {"net.ipv4.tcp_wmem": f"4096 {buf} {buf}"})
    return buf


def _small_window(address: tuple[str, int]) -> socket.socket:
    """A client socket whose receive window shuts after a few hundred KiB unread."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 128 << 10)  # before the handshake
    sock.settimeout(20)
    sock.connect(address)
    return sock


def _send_queue(peer: tuple[str, int]) -> int | None:
    """Bytes in the send queue of this namespace's TCP socket connected to ``peer``."""
    for line in Path("/proc/thread-self/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        addr, port = fields[2].split(":")
        if (
            fields[3] == "01"
            and (
                socket.inet_ntoa(bytes.fromhex(addr)[::-1]),
                int(port, 16),
            )
            == peer
        ):
            return int(fields[4].split(":")[0], 16)
    return None


class BackedUpClient:
    """A TLS client of the http app that asks for ``size`` bytes and reads none of them
    (until ``check``): the server's send queue fills with them."""

    def __init__(self, lab: Lab, ca: Path, size: int) -> None:
        self.lab, self.size = lab, size
        vip = str(lab.plan.vip(4))
        raw = lab.call("client", _small_window, (vip, HTTP_PORT))
        self.local = raw.getsockname()
        self.flow = f"{self.local[0]}:{self.local[1]}-{vip}:{HTTP_PORT}"
        ctx = ssl.create_default_context(cafile=str(ca))
        self.sock = ctx.wrap_socket(raw, server_hostname="vip")
        self.sock.sendall(b"GET /bytes/%d HTTP/1.1\r\nHost: vip\r\n\r\n" % size)

    def send_queue(self) -> tuple[str, int]:
        """The host serving the flow, and the bytes in its send queue (("", 0) if none)."""
        for host in self.lab.plan.hosts:
            queued = self.lab.call(host, _send_queue, self.local)
            if queued is not None:
                return host, queued
        return "", 0

    def wait_backed_up(self, timeout: float = 30) -> tuple[str, int]:
        """Wait until the server's send queue stops growing: where it is, and its size."""
        deadline = time.monotonic() + timeout
        last, same = ("", -1), 0
        while same < 4:  # unchanged for 0.2 s
            if time.monotonic() > deadline:
                raise RuntimeError(f"the send queue never settled (last {last[1]} bytes)")
            time.sleep(0.05)
            now = self.send_queue()
            same = same + 1 if now == last and now[1] > 0 else 0
            last = now
        return last

    def _read(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(min(n - len(out), 1 << 20))
            if not chunk:
                raise RuntimeError(f"EOF with {n - len(out)} bytes still to come")
            out += chunk
        return bytes(out)

    def _response(self, size: int) -> str | None:
        """Read one response to GET /bytes/size; None if byte-exact, else what is wrong."""
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            head += self._read(1)
            if len(head) > 4096:
                return f"no response head in the first 4 KiB: {head[:60]!r}"
        if not head.startswith(b"HTTP/1.1 200 "):
            return f"the response starts {head[:40]!r}"
        if f"content-length: {size}\r\n".encode() not in head.lower():
            return f"the response head does not announce {size} bytes: {head!r}"
        body = hashlib.sha256()
        left = size
        while left:
            chunk = self._read(min(left, 1 << 20))
            body.update(chunk)
            left -= len(chunk)
        if body.digest() != hashlib.sha256(http_body(size)).digest():
            return "the body differs from what the server sent"
        return None

    def check(self) -> str | None:
        """Read the whole response, then a second one: None if every byte came exactly
        once, in order (the second response starts right after the first), else why not."""
        self.sock.settimeout(30)
        try:
            if problem := self._response(self.size):
                return problem
            self.sock.sendall(b"GET /bytes/1000 HTTP/1.1\r\nHost: vip\r\n\r\n")
            if problem := self._response(1000):
                return f"after the backlog: {problem}"
        except (OSError, RuntimeError) as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    def close(self) -> None:
        self.sock.close()
