#!/usr/bin/env python3
"""Benchmark pysteer.tcp: dump, release and restore time per socket.

For each queue size (empty, 4 KiB, 64 KiB) it opens N loopback connections in a scratch
network namespace, puts the size in the server's receive queue and as much again,
unacknowledged, in its send queue (client->server packets dropped by nftables, which
is also the lock that keeps the client from drawing a RST between release and restore).
It then times dump, release and restore of every server socket, and as a baseline in the
same run, a fresh connect()+accept() and one TCP_INFO read. Results: median and p99 in
microseconds, as JSON. Run as root: scripts/bench/tcp_repair.py [--sockets N] [--out F].
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns

from pysteer import netns, tcp

SIZES = {"empty": 0, "4KiB": 4096, "64KiB": 65536}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(values: list[float]) -> dict[str, float]:
    us = [v * 1e6 for v in values]
    return {"median_us": round(statistics.median(us), 2), "p99_us": round(pct(us, 0.99), 2)}


def nft(ns: str, script: str) -> None:
    subprocess.run(netns.exec_argv(ns, ["nft", "-f", "-"]), input=script, text=True, check=True)


def run_size(ns: str, count: int, size: int) -> dict[str, object]:
    listener = socket.create_server(("127.0.0.1", 0), backlog=count)
    port = listener.getsockname()[1]
    payload = os.urandom(size)
    pairs, connect_times = [], []
    for _ in range(count):
        t0 = time.perf_counter()
        client = socket.create_connection(("127.0.0.1", port))
        server, _ = listener.accept()
        connect_times.append(time.perf_counter() - t0)
        if size:
            client.sendall(payload)
        pairs.append((client, server))
    # Drop client->server (but not our injected segments): unacked data, and the lock.
    nft(
        ns,
        f"""table inet bench {{
  chain out {{
    type filter hook output priority 0;
    tcp dport {port} meta mark != 0x70737472 drop
  }}
}}""",
    )
    info_times, dumps, releases, restores, restored = [], [], [], [], []
    for _client, server in pairs:
        if size:
            server.sendall(payload)
        deadline = time.monotonic() + 5
        while size and len(server.recv(size + 1, socket.MSG_PEEK)) < size:
            if time.monotonic() > deadline:
                raise RuntimeError("receive queue never filled")
    time.sleep(0.05)
    for _client, server in pairs:
        t0 = time.perf_counter()
        tcp.tcp_info(server)
        t1 = time.perf_counter()
        state = tcp.dump(server)
        t2 = time.perf_counter()
        tcp.release(server)
        t3 = time.perf_counter()
        new = tcp.restore(state)
        t4 = time.perf_counter()
        if len(state.recv_queue) != size:
            raise RuntimeError(f"dumped {len(state.recv_queue)} queued bytes, expected {size}")
        info_times.append(t1 - t0)
        dumps.append(t2 - t1)
        releases.append(t3 - t2)
        restores.append(t4 - t3)
        restored.append(new)
    nft(ns, "delete table inet bench")
    # Every connection still works after its move.
    for (client, _), server in zip(pairs, restored, strict=True):
        server.sendall(b"k")
        client.settimeout(5)
        got = b""
        while not got.endswith(b"k"):
            got += client.recv(size + 1)
        client.close()
        server.close()
    listener.close()
    return {
        "queue_bytes_each": size,
        "dump": summary(dumps),
        "release": summary(releases),
        "restore": summary(restores),
        "baseline_connect_accept": summary(connect_times),
        "baseline_tcp_info": summary(info_times),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sockets", type=int, default=1000, help="sockets per size (1000)")
    parser.add_argument("--out", type=Path, default=Path("results/bench/tcp_repair.json"))
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("tcp_repair benchmark: run as root", file=sys.stderr)
        return 2
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * args.sockets + 100)), hard))
    ns = f"pysteer-bench-{os.getpid()}"
    pr_netns.create(ns)
    try:

        def lo_up() -> None:
            with IPRoute() as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")

        netns.call_in(ns, lo_up)
        results = {
            name: netns.call_in(ns, run_size, ns, args.sockets, size)
            for name, size in SIZES.items()
        }
    finally:
        pr_netns.remove(ns)
    report = {
        "benchmark": "tcp_repair",
        "sockets": args.sockets,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "anchor_libsoccr_us": {"dump": "3-10", "restore": "6-12"},
        "targets_us": {"dump_median_empty": 50, "restore_median_empty": 100},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'queues':<7} {'op':<24} {'median µs':>10} {'p99 µs':>10}")
    for name, r in results.items():
        for op in ("dump", "release", "restore", "baseline_connect_accept", "baseline_tcp_info"):
            s = r[op]
            print(f"{name:<7} {op:<24} {s['median_us']:>10.1f} {s['p99_us']:>10.1f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
