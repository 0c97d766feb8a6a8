#!/usr/bin/env python3
"""Benchmark the steering node in the namespace lab, against plain routing in the same run.

- Bulk: one TCP flow client -> VIP for a few seconds, received on host b. Baseline: no
  program, the steering node routes the VIP to b. Steered: the VIP routes to a and the
  program redirects the flow to b. Ratio = steered / baseline throughput, per mode (tc
  and XDP generic with offloads on, XDP generic's GSO packets going to the tc fallback;
  XDP native with what veth needs for it, its baseline likewise).
- Small packets: 64-byte writes with TCP_NODELAY, messages per second, same comparison.
- Park to replay: time of to() for a flow with N parked packets.
Run as root: scripts/bench/steer.py [--seconds 3] [--out results/bench/steer.json]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

from pysteer.flow import Flow
from pysteer.lab import Lab
from pysteer.lab.pytest_plugin import unique_prefix
from pysteer.steer.steerer import Steerer

PORT = 9000


def route_vip(lab: Lab, host: str) -> None:
    gw = lab.plan.link(host).peer_end.v4.ip
    lab.run("steer", ["ip", "route", "replace", f"{lab.plan.vip_v4}/32", "via", str(gw)])


def transfer(lab: Lab, cport: int, seconds: float, size: int, nodelay: bool = False) -> float:
    """Bytes per second from the client (port ``cport``) to a receiver on host b."""
    vip = str(lab.plan.vip_v4)

    def listen() -> socket.socket:
        s = socket.create_server((vip, PORT), reuse_port=True)
        s.settimeout(10)
        return s

    def make() -> socket.socket:
        c = socket.socket()
        c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        c.bind((str(lab.plan.address("client")), cport))
        return c

    server = lab.call("b", listen)
    client = lab.call("client", make)
    client.connect((vip, PORT))
    if nodelay:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn, _ = server.accept()
    got = [0]

    def receive() -> None:
        while data := conn.recv(1 << 20):
            got[0] += len(data)

    reader = threading.Thread(target=receive)
    reader.start()
    block = b"x" * size
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        client.sendall(block)
    client.shutdown(socket.SHUT_WR)
    reader.join(30)
    elapsed = time.perf_counter() - start
    for s in (client, conn, server):
        s.close()
    return got[0] / elapsed


def offloads(lab: Lab, mode: str) -> None:
    """tc and XDP generic: everything on (XDP passes GSO packets up to the tc fallback).
    XDP native on veth: GRO on the hosts' ends, no TX checksum (so no TSO) at the sender."""
    gso = "on"
    tx = "off" if mode == "xdp-native" else "on"
    lab.run("client", ["ethtool", "-K", "to-steer", "tso", gso, "gso", gso, "tx", tx], check=False)
    for host in lab.plan.hosts:
        gro = "on" if mode == "xdp-native" else "off"
        lab.run(host, ["ethtool", "-K", "to-steer", "gro", gro], check=False)


def measure(lab: Lab, mode: str, seconds: float) -> dict[str, float]:
    offloads(lab, mode)
    cport = 50000 + int(time.time()) % 1000
    route_vip(lab, "b")
    base_bulk = transfer(lab, cport, seconds, 1 << 20)
    base_small = transfer(lab, cport + 1, seconds, 64, nodelay=True) / 64
    route_vip(lab, "a")
    st = Steerer(unique_prefix(), "to-client", namespace=lab.netns("steer"), mode=mode)
    try:
        for host in lab.plan.hosts:
            st.add_host(host, f"to-{host}", lab.mac(host, "to-steer"))
        vip = lab.plan.vip_v4
        for port in (cport + 2, cport + 3):
            st.to(Flow.parse(f"{lab.plan.address('client')}:{port}-{vip}:{PORT}"), "b")
        bulk = transfer(lab, cport + 2, seconds, 1 << 20)
        small = transfer(lab, cport + 3, seconds, 64, nodelay=True) / 64
    finally:
        st.destroy()
        offloads(lab, "tc")
    return {
        "baseline_gbit_s": round(base_bulk * 8 / 1e9, 2),
        "steered_gbit_s": round(bulk * 8 / 1e9, 2),
        "bulk_ratio": round(bulk / base_bulk, 3),
        "baseline_small_msgs_s": round(base_small),
        "steered_small_msgs_s": round(small),
        "small_ratio": round(small / base_small, 3),
    }


def park_replay(lab: Lab, parked: int, rounds: int = 20) -> dict[str, float]:
    """Time of to() with ``parked`` small packets waiting (a flow with no socket: its
    packets are retransmitted SYNs from a client that keeps trying)."""
    st = Steerer(unique_prefix(), "to-client", namespace=lab.netns("steer"), mode="tc")
    times = []
    try:
        for host in lab.plan.hosts:
            st.add_host(host, f"to-{host}", lab.mac(host, "to-steer"))
        vip = str(lab.plan.vip_v4)
        for n in range(rounds):
            port = 52000 + n
            flow = Flow.parse(f"{lab.plan.address('client')}:{port}-{vip}:{PORT + 1}")
            st.park(flow)

            def send_many(port: int = port) -> None:
                s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
                hdr = port.to_bytes(2, "big") + (PORT + 1).to_bytes(2, "big") + bytes(8)
                hdr += bytes([0x50, 0x10]) + b"\xff\xff" + bytes(4)  # an ACK, bad checksum
                for _ in range(parked):
                    s.sendto(hdr, (vip, 0))
                s.close()

            lab.call("client", send_many)
            deadline = time.monotonic() + 2
            while (view := st.get(flow)) is None or view.park_seq < parked:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.001)
            t0 = time.perf_counter()
            st.to(flow, "b")
            times.append(time.perf_counter() - t0)
    finally:
        st.destroy()
    us = sorted(t * 1e6 for t in times)
    return {
        "parked_packets": parked,
        "median_us": round(statistics.median(us), 1),
        "max_us": round(us[-1], 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--out", type=Path, default=Path("results/bench/steer.json"))
    args = parser.parse_args()
    with Lab(prefix=unique_prefix()) as lab:
        modes = ("tc", "xdp-generic", "xdp-native")
        results = {mode: measure(lab, mode, args.seconds) for mode in modes}
        results["park_replay"] = [park_replay(lab, n) for n in (1, 10, 100)]
    report = {
        "benchmark": "steer",
        "bar": "tc bulk ratio >= 0.9 with offloads on",
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
