#!/usr/bin/env python3
"""Benchmark live migration in the namespace lab: freeze window and what the client sees.

A TLS client (Python ssl, on an asyncio loop) in the client namespace sends a line every
millisecond to the ticker app and timestamps every echo it gets back. Baseline: the same
run with no migration. Then ``--moves`` migrations A -> B -> A ..., asked of the agents
directly (no CLI start-up in the measurement), one every ``--every`` seconds.

Reported (JSON, and a summary on stdout):
- freeze window per migration (park sent -> replay done, from the agent's timeline),
  median and p99, and the steps' medians;
- the client's largest gap between received lines around each migration, p99, against
  the largest gaps in windows of the same length in the baseline run;
- client retransmissions and retransmission timeouts in each run.
Targets: freeze median <= 1 ms, client gap p99 <= 5 ms, 0 retransmissions.

Run as root: scripts/bench/migrate.py [--moves 50] [--out results/bench/migrate.json]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import socket
import ssl
import statistics
import tempfile
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from pysteer.agent.control import ask
from pysteer.lab import Lab
from pysteer.lab.cluster import LabCluster, control_path_for
from pysteer.lab.plan import load
from pysteer.lab.pytest_plugin import unique_prefix

T = TypeVar("T")
WINDOW = 0.05  # seconds of client traffic examined around each migration


def counters(lab: Lab) -> dict[str, int]:
    def read() -> dict[str, int]:
        rows = [ln.split() for ln in Path("/proc/thread-self/net/snmp").read_text().splitlines()]
        tcp = [r for r in rows if r[0] == "Tcp:"]
        snmp = dict(zip(tcp[0][1:], map(int, tcp[1][1:]), strict=True))
        rows = [ln.split() for ln in Path("/proc/thread-self/net/netstat").read_text().splitlines()]
        ext = [r for r in rows if r[0] == "TcpExt:"]
        netstat = dict(zip(ext[0][1:], map(int, ext[1][1:]), strict=True))
        return {"retrans": snmp["RetransSegs"], "timeouts": netstat["TCPTimeouts"]}

    return lab.call("client", read)


class _Echoes(asyncio.Protocol):
    """Timestamps every echo line as the loop reads it (data_received, no stream hop)."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.lost: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        if lines := data.count(b"\n"):
            self.client.arrivals += [time.monotonic()] * lines

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


class Client:
    """Lines out every ``interval``; the arrival time of every echo line kept.

    A private asyncio loop in one thread owns the TLS connection: OpenSSL must never see a
    read and a write of one connection from two threads at once (that once crashed this
    benchmark and once gave the client a bad record MAC).
    """

    def __init__(self, lab: Lab, ca: Path, interval: float = 0.001) -> None:
        vip = str(lab.plan.vip(4))
        raw = lab.call("client", socket.create_connection, (vip, 443))
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.local = raw.getsockname()
        self.flow = f"{self.local[0]}:{self.local[1]}-{vip}:443"
        self.arrivals: list[float] = []
        self.interval = interval
        self.sent = 0
        self._stopping = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        ctx = ssl.create_default_context(cafile=str(ca))
        self._call(self._open(raw, ctx))

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _open(self, raw: socket.socket, ctx: ssl.SSLContext) -> None:
        self._transport, self._echoes = await self._loop.create_connection(
            lambda: _Echoes(self), sock=raw, ssl=ctx, server_hostname="vip"
        )
        self._writer = asyncio.create_task(self._write())

    async def _write(self) -> None:
        while not self._stopping and not self._transport.is_closing():
            self.sent += 1
            self._transport.write(b"%d\n" % self.sent)
            await asyncio.sleep(self.interval)

    async def _stop(self) -> None:
        self._stopping = True
        await self._writer
        if self._echoes.lost.done():
            raise RuntimeError(f"the client lost its connection: {self._echoes.lost.result()!r}")
        await asyncio.sleep(0.2)  # the last echoes
        self._transport.close()  # close_notify, then the socket
        try:
            await asyncio.wait_for(asyncio.shield(self._echoes.lost), 5)
        except TimeoutError:
            self._transport.abort()

    def stop(self) -> None:
        try:
            self._call(self._stop())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            self._loop.close()


def largest_gap(arrivals: list[float], start: float, end: float) -> float:
    times = [t for t in arrivals if start <= t <= end]
    if len(times) < 2:
        return end - start
    return max(b - a for a, b in itertools.pairwise(times))


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def run(moves: int, every: float, out: Path) -> dict[str, Any]:
    lab = Lab(prefix=unique_prefix(), plan=load()).up()
    directory = Path(tempfile.mkdtemp(prefix="pysteer-bench-"))
    cluster = LabCluster(lab, directory)
    try:
        cluster.start()
        ca = cluster.client_ca
        # Baseline: the same traffic, no migration.
        before = counters(lab)
        client = Client(lab, ca)
        time.sleep(0.5)
        t0 = time.monotonic()
        time.sleep(moves * every)
        t1 = time.monotonic()
        client.stop()
        after = counters(lab)
        windows = [t0 + i * every for i in range(moves)]
        base_gaps = [largest_gap(client.arrivals, t, t + WINDOW) * 1000 for t in windows]
        baseline = {
            "retrans": after["retrans"] - before["retrans"],
            "timeouts": after["timeouts"] - before["timeouts"],
            "lines": len([t for t in client.arrivals if t0 <= t <= t1]),
        }
        # Migrations.
        before = counters(lab)
        client = Client(lab, ca)
        time.sleep(0.5)
        reports, gaps, node = [], [], "a"
        for _ in range(moves):
            node = "b" if node == "a" else "a"
            source = "a" if node == "b" else "b"
            start = time.monotonic()
            answer = ask(
                control_path_for(cluster, source),
                "migrate",
                flow=client.flow,
                to=node,
                timeout_s=5.0,
            )
            report = answer["migration"]
            if report["outcome"] != "moved":
                raise RuntimeError(f"migration failed: {report['error']}")
            reports.append(report)
            time.sleep(max(0.0, every - (time.monotonic() - start)))
            gaps.append(largest_gap(client.arrivals, start, start + WINDOW) * 1000)
        client.stop()
        after = counters(lab)
    except BaseException:
        for name in ("a", "b", "steer"):
            print(f"--- {name} log ---\n{cluster.log(name)[-3000:]}")
        raise
    finally:
        cluster.close()
        lab.down()
    freeze = [r["freeze_ms"] for r in reports]
    steps: dict[str, list[float]] = {}
    for r in reports:
        tl = r["timeline"]
        for a, b in itertools.pairwise(tl):
            steps.setdefault(f"{a['step']}->{b['step']}", []).append(b["ms"] - a["ms"])
    result = {
        "moves": moves,
        "every_s": every,
        "freeze_ms": {
            "median": statistics.median(freeze),
            "p99": pct(freeze, 0.99),
            "max": max(freeze),
        },
        "steps_median_ms": {k: round(statistics.median(v), 3) for k, v in steps.items()},
        "client_gap_ms": {
            "window_s": WINDOW,
            "median": statistics.median(gaps),
            "p99": pct(gaps, 0.99),
            "max": max(gaps),
        },
        "baseline_gap_ms": {
            "median": statistics.median(base_gaps),
            "p99": pct(base_gaps, 0.99),
            "max": max(base_gaps),
        },
        "client_retransmissions": after["retrans"] - before["retrans"],
        "client_timeouts": after["timeouts"] - before["timeouts"],
        "baseline": baseline,
        "replayed_packets": sum(r["replayed"] for r in reports),
        "blob_bytes_median": statistics.median(r["blob_bytes"] for r in reports),
        "targets": {"freeze_median_ms": 1.0, "client_gap_p99_ms": 5.0, "retransmissions": 0},
        "raw": {"freeze_ms": freeze, "client_gap_ms": gaps, "baseline_gap_ms": base_gaps},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--moves", type=int, default=50)
    p.add_argument("--every", type=float, default=0.2, help="seconds between migrations")
    p.add_argument("--out", type=Path, default=Path("results/bench/migrate.json"))
    args = p.parse_args()
    r = run(args.moves, args.every, args.out)
    f, g, b = r["freeze_ms"], r["client_gap_ms"], r["baseline_gap_ms"]
    print(f"{r['moves']} migrations: freeze median {f['median']:.2f} ms, p99 {f['p99']:.2f} ms")
    print(
        f"client largest gap per migration: median {g['median']:.2f} ms, p99 {g['p99']:.2f} ms"
        f" (baseline, no migration: median {b['median']:.2f}, p99 {b['p99']:.2f})"
    )
    print(
        f"client retransmissions {r['client_retransmissions']} (baseline "
        f"{r['baseline']['retrans']}), timeouts {r['client_timeouts']}"
    )
    print("steps (median ms): " + ", ".join(f"{k} {v}" for k, v in r["steps_median_ms"].items()))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
