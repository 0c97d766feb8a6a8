#!/usr/bin/env python3
"""Benchmark a drain in the namespace lab: connections per second and the freeze window.

``--idle`` keep-alive TLS connections (the http app) and ``--active`` TLS ticker clients
sending a line every 200 ms are opened to host a; ``pysteer drain --from a --to b`` then
moves them all. Afterwards every active stream is checked line by line and every idle
connection answers a request byte-exact from b: the result says how many survived.
Target: at least 1,000 connections/s with every connection surviving.

Run as root: scripts/bench/drain.py [--idle 1000] [--active 200] [--batch 64]
"""

from __future__ import annotations

import argparse
import json
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pysteer.app.handlers import http_body
from pysteer.lab import Lab
from pysteer.lab.clients import LineClient, StreamError, check_ticker_stream
from pysteer.lab.cluster import LabCluster
from pysteer.lab.plan import load
from pysteer.lab.pytest_plugin import unique_prefix


def idle_answers(sock: ssl.SSLSocket, size: int) -> bool:
    sock.settimeout(10)
    sock.sendall(b"GET /bytes/%d HTTP/1.1\r\nHost: vip\r\n\r\n" % size)
    data = b""
    want = http_body(size)
    while not data.endswith(want):
        chunk = sock.recv(65536)
        if not chunk:
            return False
        data += chunk
        if len(data) > size + 1000:
            return False
    return data.startswith(b"HTTP/1.1 200")


def run(idle: int, active: int, batch: int, out: Path) -> dict[str, Any]:
    lab = Lab(prefix=unique_prefix(), plan=load()).up()
    directory = Path(tempfile.mkdtemp(prefix="pysteer-bench-drain-"))
    cluster = LabCluster(lab, directory)
    try:
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
        if drained.returncode != 0:
            raise RuntimeError(f"drain failed: {drained.stderr}\n{drained.stdout[-2000:]}")
        summary = json.loads(drained.stdout)
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
        cluster.close()
        lab.down()
    total = idle + active
    result = {
        "idle": idle,
        "active": active,
        "batch": batch,
        "connect_seconds": round(setup_s, 2),
        "drain_seconds": summary["seconds"],
        "connections_per_second": summary["per_second"],
        "moved": summary["moved"],
        "rolled_back": summary["rolled_back"],
        "failed": summary["failed"],
        "freeze_ms": summary["freeze_ms"],
        "survived": survived_active + survived_idle,
        "survived_active": survived_active,
        "survived_idle": survived_idle,
        "all_survived": survived_active + survived_idle == total,
        "targets": {"connections_per_second": 1000, "all_survive": True},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--idle", type=int, default=1000)
    p.add_argument("--active", type=int, default=200)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--out", type=Path, default=Path("results/bench/drain.json"))
    args = p.parse_args()
    r = run(args.idle, args.active, args.batch, args.out)
    f = r["freeze_ms"]
    print(
        f"drain of {r['idle']} idle + {r['active']} active TLS connections: "
        f"{r['connections_per_second']}/s ({r['drain_seconds']} s), freeze p50 {f['p50']} ms, "
        f"p99 {f['p99']} ms; survived {r['survived']}/{r['idle'] + r['active']}"
    )
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
