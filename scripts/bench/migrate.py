#!/usr/bin/env python3
"""Benchmark live migration in the namespace lab: freeze window and what the client sees.

A TLS client (Python ssl, on an asyncio loop) in the client namespace sends a line every
millisecond to the ticker app and timestamps every echo it gets back. Baseline: the same
run with no migration. Then ``--moves`` migrations A -> B -> A ..., asked of the agents
directly (no CLI start-up in the measurement), one every ``--every`` seconds.

Then a backed-up flow (``--backlog-mib``, default 16): a TLS client of the http app asks
for that many bytes and reads none, so they wait in the server's send queue (the hosts'
default send buffer is raised for the run to hold them); the flow moves
``--backlog-moves`` times, then the client reads and must get every byte exactly once.
The ordinary moves above are its same-run baseline.

Reported (JSON, and a summary on stdout):
- freeze window per migration (park sent -> replay done, from the agent's timeline),
  p50/p90/p99/max, and the time between consecutive steps of the timeline, per pair of
  step names found in the reports (``"park->parked"``...), p50/p90/p99/max;
- the client's largest gap between received lines around each migration, against the
  largest gaps in windows of the same length in the baseline run;
- client retransmissions and retransmission timeouts in each run;
- the backed-up flow's freeze window and steps, and whether its bytes came back exact.
Targets (``targets`` in the JSON, each met or not): freeze p50 <= 1 ms and p99 <= 2.5 ms;
client largest gap p99 <= the baseline's p99 + 1.5 ms; 0 retransmissions; backed-up flow
freeze p99 <= 30 ms, byte-exact.

``--workers N``: each host's agent runs N worker processes (``workers`` in the JSON).
``--steering N``: N steering nodes behind the client's ECMP route, with the shared store
in etcd (``--store`` uses the store with one steering node too); ``steering`` and
``store`` in the JSON. scripts/bench/steering.py compares 1 and 2 in one run.

Run as root: scripts/bench/migrate.py [--moves 50] [--backlog-mib 16] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import shutil
import socket
import ssl
import statistics
import tempfile
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from benchlib import (
    BackedUpClient,
    allow_send_queue,
    check_workers,
    flag,
    lab_cluster,
    steps_table,
    target,
    target_lines,
)

from pysteer.agent.control import ask
from pysteer.lab import Lab
from pysteer.lab.cluster import LabCluster, control_path_for
from pysteer.lab.plan import load
from pysteer.lab.pytest_plugin import unique_prefix
from pysteer.migration.timeline import spread, step_durations

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


def move(cluster: LabCluster, flow: str, source: str, target: str, timeout: float) -> dict:
    """One migration, asked of the source's agent directly: its report."""
    answer = ask(
        control_path_for(cluster, source),
        "migrate",
        timeout=timeout + 10,
        flow=flow,
        to=target,
        timeout_s=timeout,
    )
    if not answer.get("ok"):
        raise RuntimeError(f"migrate {flow} {source} -> {target}: {answer.get('error')}")
    return answer["migration"]


def backlog_case(
    cluster: LabCluster, size: int, moves: int, every: float, sndbuf: int
) -> dict[str, Any]:
    """A TLS flow whose client stopped reading, ``size`` bytes owed to it, moved ``moves``
    times; then the client reads everything and must get every byte exactly once."""
    lab = cluster.lab
    client = BackedUpClient(lab, cluster.client_ca, size)
    try:
        node, queued = client.wait_backed_up()
        reports = []
        for _ in range(moves):
            other = next(h for h in lab.plan.hosts if h != node)
            start = time.monotonic()
            reports.append(move(cluster, client.flow, node, other, 30.0))
            if reports[-1]["outcome"] == "moved":
                node = other
            time.sleep(max(0.0, every - (time.monotonic() - start)))
        problem = client.check()
    finally:
        client.close()
    moved = [r for r in reports if r["outcome"] == "moved"]
    return {
        "mib": size / (1 << 20),
        "moves": moves,
        "host_sndbuf_bytes": sndbuf,
        "server_send_queue_bytes": queued,
        "outcomes": [r["outcome"] for r in reports],
        "errors": [r["error"] for r in reports if r["error"]],
        "blob_bytes": [r["blob_bytes"] for r in reports],
        "freeze_ms": spread(r["freeze_ms"] for r in moved),
        "steps_ms": step_durations(r["timeline"] for r in moved),
        "target_steps_ms": target_steps(moved),
        "byte_exact": problem is None,
        "problem": problem,
        "raw_freeze_ms": [r["freeze_ms"] for r in moved],
    }


def no_migration(lab: Lab, ca: Path, moves: int, every: float) -> tuple[list[float], dict]:
    """The baseline: the same traffic for as long, no migration. The client's largest gap
    in each window a migration would have had, and its retransmissions."""
    before = counters(lab)
    client = Client(lab, ca)
    time.sleep(0.5)
    t0 = time.monotonic()
    time.sleep(moves * every)
    t1 = time.monotonic()
    client.stop()
    after = counters(lab)
    windows = [t0 + i * every for i in range(moves)]
    gaps = [largest_gap(client.arrivals, t, t + WINDOW) * 1000 for t in windows]
    return gaps, {
        "retrans": after["retrans"] - before["retrans"],
        "timeouts": after["timeouts"] - before["timeouts"],
        "lines": len([t for t in client.arrivals if t0 <= t <= t1]),
    }


def migrations(cluster: LabCluster, moves: int, every: float) -> tuple[list, list[float], dict]:
    """``moves`` migrations of a busy flow, a -> b -> a ...: the reports, the client's
    largest gap around each, and its retransmissions."""
    before = counters(cluster.lab)
    client = Client(cluster.lab, cluster.client_ca)
    time.sleep(0.5)
    reports, gaps, node = [], [], "a"
    for _ in range(moves):
        node = "b" if node == "a" else "a"
        source = "a" if node == "b" else "b"
        start = time.monotonic()
        report = move(cluster, client.flow, source, node, 5.0)
        if report["outcome"] != "moved":
            raise RuntimeError(f"migration failed: {report['error']}")
        reports.append(report)
        time.sleep(max(0.0, every - (time.monotonic() - start)))
        gaps.append(largest_gap(client.arrivals, start, start + WINDOW) * 1000)
    client.stop()
    after = counters(cluster.lab)
    return reports, gaps, {k: after[k] - before[k] for k in after}


def run(args: argparse.Namespace) -> dict[str, Any]:
    moves, every = args.moves, args.every
    lab = Lab(prefix=unique_prefix(), plan=load(steering=args.steering)).up()
    directory = Path(tempfile.mkdtemp(prefix="pysteer-bench-"))
    cluster: LabCluster | None = None
    backlog = None
    try:
        size = int(args.backlog_mib * (1 << 20))
        sndbuf = allow_send_queue(lab, size) if size else 0  # before the agents' listeners
        cluster = lab_cluster(lab, directory, args.workers, store=args.store or None)
        cluster.start()
        base_gaps, baseline = no_migration(lab, cluster.client_ca, moves, every)
        reports, gaps, seen = migrations(cluster, moves, every)
        # The backed-up client, with the moves above as its baseline.
        if size and args.backlog_moves:
            backlog = backlog_case(cluster, size, args.backlog_moves, every, sndbuf)
    except BaseException:
        for name in (*lab.plan.hosts, *lab.plan.steers) if cluster else ():
            with contextlib.suppress(KeyError, OSError):
                print(f"--- {name} log ---\n{cluster.log(name)[-3000:]}")
        raise
    finally:
        if cluster:
            cluster.close()
        lab.down()
        shutil.rmtree(directory, ignore_errors=True)  # its keys and logs (printed on failure)
    result = summarize(
        args,
        reports=reports,
        gaps=gaps,
        seen=seen,
        base_gaps=base_gaps,
        baseline=baseline,
        backlog=backlog,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    return result


def target_steps(reports: list[dict]) -> dict[str, dict[str, Any]]:
    """B's own steps inside the move (open, restore, build, thaw, claim, serve), in ms."""
    per: dict[str, list[float]] = {}
    for r in reports:
        for step in r["timeline"]:
            for name, ms in step.get("target_ms") or []:
                per.setdefault(name, []).append(ms)
    return {name: spread(values) for name, values in per.items()}


def summarize(
    args: argparse.Namespace,
    *,
    reports: list[dict],
    gaps: list[float],
    seen: dict[str, int],
    base_gaps: list[float],
    baseline: dict,
    backlog: dict | None,
) -> dict[str, Any]:
    freeze = [r["freeze_ms"] for r in reports]
    gap, base_gap = spread(gaps), spread(base_gaps)
    targets = [
        target("freeze p50", spread(freeze)["p50"], "<=", 1.0),
        target("freeze p99", spread(freeze)["p99"], "<=", 2.5),
        target(
            "client largest gap p99 over the baseline's", gap["p99"] - base_gap["p99"], "<=", 1.5
        ),
        target("client retransmissions", seen["retrans"], "<=", 0, ""),
    ]
    if backlog:
        targets += [
            target(
                f"backed-up flow ({backlog['mib']:g} MiB) freeze p99",
                backlog["freeze_ms"]["p99"],
                "<=",
                30.0,
            ),
            flag("backed-up flow byte-exact after the moves", backlog["byte_exact"]),
        ]
    result = {
        "workers": args.workers,
        "steering": args.steering,
        "store": bool(args.store or args.steering > 1),
        "moves": args.moves,
        "every_s": args.every,
        "freeze_ms": spread(freeze),
        # The steering node's own measure: park to the end of the claim's replay.
        "parked_ms": spread(r["parked_ms"] for r in reports if r.get("parked_ms") is not None),
        "steps_ms": step_durations(r["timeline"] for r in reports),
        "target_steps_ms": target_steps(reports),
        "client_gap_ms": {"window_s": WINDOW, **gap},
        "baseline_gap_ms": base_gap,
        "client_retransmissions": seen["retrans"],
        "client_timeouts": seen["timeouts"],
        "baseline": baseline,
        "replayed_packets": sum(r["replayed"] for r in reports),
        "blob_bytes_median": statistics.median(r["blob_bytes"] for r in reports),
        "backlog": backlog,
        "targets": targets,
        "raw": {"freeze_ms": freeze, "client_gap_ms": gaps, "baseline_gap_ms": base_gaps},
    }
    return result


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=1, help="agent worker processes (1)")
    p.add_argument("--steering", type=int, default=1, help="steering nodes, ECMP (1)")
    p.add_argument("--store", action="store_true", help="the shared store with one node too")
    p.add_argument("--out", type=Path, default=Path("results/bench/migrate.json"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--moves", type=int, default=50)
    p.add_argument("--every", type=float, default=0.2, help="seconds between migrations")
    p.add_argument(
        "--backlog-mib",
        type=float,
        default=16,
        help="MiB queued to a client that stopped reading, for the backed-up case (0: skip)",
    )
    p.add_argument("--backlog-moves", type=int, default=5, help="moves of the backed-up flow")
    add_options(p)
    args = p.parse_args()
    check_workers(args.workers, p.prog)
    if args.moves < 1 or args.backlog_mib < 0 or args.backlog_moves < 0:
        p.error("--moves must be at least 1, --backlog-mib and --backlog-moves at least 0")
    r = run(args)
    f, g, b = r["freeze_ms"], r["client_gap_ms"], r["baseline_gap_ms"]
    print(
        f"{r['moves']} migrations ({r['workers']} worker, {r['steering']} steering node"
        f"{', store' if r['store'] else ''}): freeze p50 {f['p50']:.2f} ms, "
        f"p99 {f['p99']:.2f} ms"
    )
    print(
        f"client largest gap per migration: p50 {g['p50']:.2f} ms, p99 {g['p99']:.2f} ms"
        f" (baseline, no migration: p50 {b['p50']:.2f}, p99 {b['p99']:.2f})"
    )
    print(
        f"client retransmissions {r['client_retransmissions']} (baseline "
        f"{r['baseline']['retrans']}), timeouts {r['client_timeouts']}"
    )
    p = r["parked_ms"]
    print(f"parked at the steering node (its own clock): p50 {p['p50']} ms, p99 {p['p99']} ms")
    print("steps (ms between consecutive steps):")
    print("\n".join(steps_table(r["steps_ms"])))
    print("the target's steps inside the move:")
    print("\n".join(steps_table(r["target_steps_ms"])))
    if k := r["backlog"]:
        bf = k["freeze_ms"]
        print(
            f"backed-up flow, {k['server_send_queue_bytes'] / (1 << 20):.1f} MiB queued at the"
            f" server, {k['moves']} moves ({', '.join(k['outcomes'])}): freeze p50 {bf['p50']} ms,"
            f" max {bf['max']} ms (ordinary moves: p50 {f['p50']:.2f} ms); byte-exact: "
            + ("yes" if k["byte_exact"] else f"NO ({k['problem']})")
        )
        print("\n".join(steps_table(k["steps_ms"])))
        print("\n".join(steps_table(k["target_steps_ms"])))
    print("targets:")
    print("\n".join(target_lines(r["targets"], "  ")))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
