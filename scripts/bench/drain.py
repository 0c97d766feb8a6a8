#!/usr/bin/env python3
"""Benchmark a drain in the namespace lab: connections per second and the freeze window.

``--idle`` keep-alive TLS connections (the http app) and ``--active`` TLS ticker clients
sending a line every 200 ms are opened to host a; ``pysteer drain --from a --to b`` then
moves them all. Afterwards every active stream is checked line by line and every idle
connection answers a request byte-exact from b: the result says how many survived.
``--active 0`` drains idle connections only (the 2,000-idle case of run_all).

Reported (JSON, and a summary on stdout): connections/s, the freeze window p50/p90/p99/max
(the drain's summary), the time between consecutive steps of the migrations' timelines
per pair of step names found in them (``"park->parked"``...), and the survivors.
The drain's summary carries no per-migration timeline today: the steps come from the
source agent's recent history (``pysteer migrations``: its last 50 migrations, the end
of the drain; ``steps_from`` in the JSON says which and how many).

Targets (``targets`` in the JSON, each met or not): at least ``--target-rate``
connections/s (2,000) with a freeze p99 of at most ``--target-freeze-p99`` ms (10; the
2,000-idle case uses 15), every connection surviving.

``--workers N``: each host's agent runs N worker processes (``workers`` in the JSON; the
cluster file's ``workers``). With N > 1 the freeze percentiles are the worst worker's.

Run as root: scripts/bench/drain.py [--idle 1000] [--active 200] [--batch 64]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import (
    check_workers,
    flag,
    lab_cluster,
    steps_table,
    target,
    target_lines,
)

from pysteer.agent.control import ask
from pysteer.app.handlers import http_body
from pysteer.lab import Lab
from pysteer.lab.clients import LineClient, StreamError, check_ticker_stream
from pysteer.lab.cluster import LabCluster, control_path_for
from pysteer.lab.plan import load
from pysteer.lab.pytest_plugin import unique_prefix
from pysteer.migration.timeline import step_durations


def idle_answers(sock: ssl.SSLSocket, size: int) -> bool:
    """One request on an idle connection: the answer must be exactly the response, the
    head then the ``size`` bytes of the body, and nothing else (see ``BackedUpClient``)."""
    sock.settimeout(10)
    sock.sendall(b"GET /bytes/%d HTTP/1.1\r\nHost: vip\r\n\r\n" % size)
    data = b""
    while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + size:
        chunk = sock.recv(65536)
        if not chunk or len(data) > size + 1000:
            return False
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    return (
        head.startswith(b"HTTP/1.1 200 ")
        and f"content-length: {size}".encode() in head.lower()
        and body == http_body(size)
    )


def drain_timelines(cluster: LabCluster, summary: dict[str, Any]) -> tuple[list, str]:
    """The drain's migrations' timelines, and where they came from.

    From the drain's summary if it ever carries them (``timelines``); else the source
    agent's recent history, which holds only its last 50 migrations."""
    if isinstance(summary.get("timelines"), list):
        return summary["timelines"], "drain summary"
    answer = ask(control_path_for(cluster, "a"), "migrations")
    recent = [m for m in answer.get("recent", []) if m.get("to") == "b" and "timeline" in m]
    return [m["timeline"] for m in recent], "agent history (the drain's last migrations)"


def processes(cluster: LabCluster) -> dict[str, int]:
    """Each of the cluster's processes by name: a daemon, and an agent's workers under its
    supervisor as ``a/1``, ``a/2``... (children of the daemon's process)."""
    out = {}
    for name, proc in cluster.procs.items():
        out[name] = proc.pid
        with contextlib.suppress(OSError):
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
            out |= {f"{name}/{i}": int(pid) for i, pid in enumerate(children, 1)}
    return out


def cpu_seconds(cluster: LabCluster) -> dict[str, float]:
    """User + system CPU seconds of each of the cluster's processes so far (a profile of
    where a drain's time goes: source agent, target agent, steering daemon)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for name, pid in processes(cluster).items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[name] = (int(fields[11]) + int(fields[12])) / tick
    return out


def rss_mib(cluster: LabCluster) -> dict[str, float]:
    """Resident memory of each of the cluster's processes, MiB."""
    out = {}
    for name, pid in processes(cluster).items():
        with contextlib.suppress(OSError, StopIteration):
            status = Path(f"/proc/{pid}/status").read_text().splitlines()
            kib = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
            out[name] = round(kib / 1024, 1)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    idle, active, batch = args.idle, args.active, args.batch
    lab = Lab(prefix=unique_prefix(), plan=load()).up()
    directory = Path(tempfile.mkdtemp(prefix="pysteer-bench-drain-"))
    cluster: LabCluster | None = None
    try:
        cluster = lab_cluster(lab, directory, args.workers)
        cluster.start()
        vip = str(lab.plan.vip(4))
        ctx = ssl.create_default_context(cafile=str(cluster.client_ca))
        t0 = time.monotonic()
        # Blocking ssl sockets, each only ever used by this thread; the active clients'
        # connections belong to LineClient's asyncio loop.
        idles = [
            ctx.wrap_socket(
                lab.call("client", socket.create_connection, (vip, 8443)), server_hostname="vip"
            )
            for _ in range(idle)
        ]
        actives = [
            LineClient(
                lab.call("client", socket.create_connection, (vip, 443)),
                ssl=ctx,
                server_hostname="vip",
            )
            for _ in range(active)
        ]
        for c in actives:
            c.start()
        setup_s = time.monotonic() - t0
        time.sleep(1.0)
        cpu_before = cpu_seconds(cluster)
        drained = subprocess.run(
            [
                sys.executable,
                "-m",
                "pysteer",
                "drain",
                "--from",
                "a",
                "--to",
                "b",
                "--batch",
                str(batch),
                "--json",
                "--config",
                str(cluster.config),
            ],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        # 1: the drain ran, but some flows did not move (the summary says which).
        if drained.returncode not in (0, 1) or not drained.stdout.startswith("{"):
            raise RuntimeError(f"drain failed: {drained.stderr}\n{drained.stdout[-2000:]}")
        summary = json.loads(drained.stdout)
        cpu = {k: round(v - cpu_before.get(k, 0.0), 3) for k, v in cpu_seconds(cluster).items()}
        rss = rss_mib(cluster)
        timelines, steps_from = drain_timelines(cluster, summary)
        time.sleep(0.5)
        survived_active = 0
        for c in actives:
            try:
                check_ticker_stream(c.finish(), c.sent)
                survived_active += 1
            except StreamError:
                pass
        survived_idle = sum(idle_answers(s, 100 + i % 900) for i, s in enumerate(idles))
        for s in idles:
            s.close()
        for c in actives:
            c.close()
    finally:
        if cluster:
            cluster.close()
        lab.down()
        shutil.rmtree(directory, ignore_errors=True)  # the cluster's keys and logs
    total = idle + active
    survived = survived_active + survived_idle
    freeze = summary["freeze_ms"]
    total_moves = summary["moved"] + summary["rolled_back"] + summary["failed"]
    result = {
        "workers": args.workers,
        "idle": idle,
        "active": active,
        "batch": batch,
        "connect_seconds": round(setup_s, 2),
        "drain_seconds": summary["seconds"],
        "connections_per_second": summary["per_second"],
        "moved": summary["moved"],
        "rolled_back": summary["rolled_back"],
        "failed": summary["failed"],
        "not_moved": summary["not_moved"][:20],
        "freeze_ms": freeze,
        "cpu_seconds": cpu,  # each daemon's CPU time (user + system) during the drain
        "rss_mib": rss,  # each daemon's resident memory after it
        "steps_ms": summary.get("steps_ms") or step_durations(timelines),
        "steps_from": {
            "source": "drain summary (every migration)" if "steps_ms" in summary else steps_from,
            "migrations": total_moves if "steps_ms" in summary else len(timelines),
            "of": total_moves,
        },
        "survived": survived,
        "survived_active": survived_active,
        "survived_idle": survived_idle,
        "all_survived": survived == total,
        "targets": [
            target("connections/s", summary["per_second"], ">=", args.target_rate, "conn/s"),
            target("freeze p99", freeze["p99"], "<=", args.target_freeze_p99),
            flag(f"all {total} connections survive, byte-exact", survived == total),
        ],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--idle", type=int, default=1000)
    p.add_argument("--active", type=int, default=200)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=1, help="agent worker processes (1)")
    p.add_argument("--target-rate", type=float, default=2000, help="connections/s (2000)")
    p.add_argument("--target-freeze-p99", type=float, default=10, help="ms (10)")
    p.add_argument("--out", type=Path, default=Path("results/bench/drain.json"))
    args = p.parse_args()
    check_workers(args.workers, p.prog)
    if args.idle < 0 or args.active < 0 or args.idle + args.active == 0:
        p.error("--idle and --active must be at least 0, and not both 0")
    r = run(args)
    f = r["freeze_ms"]
    print(
        f"drain of {r['idle']} idle + {r['active']} active TLS connections "
        f"({r['workers']} worker): {r['connections_per_second']}/s ({r['drain_seconds']} s), "
        f"freeze p50 {f['p50']} ms, p90 {f['p90']} ms, p99 {f['p99']} ms, max {f['max']} ms; "
        f"survived {r['survived']}/{r['idle'] + r['active']}"
    )
    src = r["steps_from"]
    print(f"steps (ms between consecutive steps; {src['migrations']} migrations, {src['source']}):")
    print("\n".join(steps_table(r["steps_ms"])))
    print(f"CPU seconds during the drain: {r['cpu_seconds']}; RSS after, MiB: {r['rss_mib']}")
    print("targets:")
    print("\n".join(target_lines(r["targets"], "  ")))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
