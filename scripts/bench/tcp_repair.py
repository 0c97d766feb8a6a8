#!/usr/bin/env python3
"""Benchmark pysteer.tcp: dump, release and restore time per socket, and backed-up flows.

For each queue size (empty, 4 KiB, 64 KiB) it opens N loopback connections in a scratch
network namespace, puts the size in the server's receive queue and as much again,
unacknowledged, in its send queue (client->server packets dropped by nftables, which
is also the lock that keeps the client from drawing a RST between release and restore).
It then times dump, release and restore of every server socket, and as a baseline in the
same run, a fresh connect()+accept() and one TCP_INFO read. Results: median and p99 in
microseconds.

Backed-up flows (``--repeat`` runs each): a client that stopped reading (its receive
buffer fixed small, so its window closes) while the server kept writing, until exactly
1 MiB or 16 MiB wait in the server's send queue. ``in flight``: the lock (the client's
packets dropped) goes on before the server writes, so part of the queue was sent and
never acknowledged, as when a flow is parked mid-transfer; ``each way`` also leaves 16 MiB
unread in the server's receive queue. Timed per step, in milliseconds (median, max, and
the first run's): dump, encode (to_wire + msgpack.packb, as the migration blob does it),
decode (unpackb + from_wire), restore; ``freeze`` is the four together (the flow is
frozen from the dump until the restored socket is live; seal and transfer not counted),
``dump_restore`` the socket work alone. Same-run baselines: one copy of the queued bytes
into fresh memory, and msgpack with a packer sized up front. The kernel's granted buffer
sizes are recorded. Every run checks both streams byte for byte after the restore.

Results as JSON. Run as root: scripts/bench/tcp_repair.py [--sockets N] [--repeat R] [--out F].
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import platform
import resource
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import msgpack
from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns

from pysteer import netns, tcp
from pysteer.tcp import constants as k

SIZES = {"empty": 0, "4KiB": 4096, "64KiB": 65536}
# name -> (bytes in the server's send queue, bytes in its receive queue, some in flight)
BACKLOGS = {
    "send 1MiB": (1 << 20, 0, False),
    "send 16MiB": (16 << 20, 0, False),
    "send 16MiB, in flight": (16 << 20, 0, True),
    "16MiB each way": (16 << 20, 16 << 20, False),
}
CLIENT_RCVBUF = 256 << 10  # fixed (no autotuning): the window closes soon after it stops reading
STEPS = ("dump", "encode", "decode", "restore", "freeze", "dump_restore")


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


def _queued(sock: socket.socket, request: int) -> int:
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), request, b"\0" * 4))[0]


def _settle(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.002)


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    got = hashlib.sha256()
    while n:
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            raise RuntimeError(f"EOF with {n} bytes still to come")
        got.update(chunk)
        n -= len(chunk)
    return got.digest()


class BackedUp:
    """A connection whose client stopped reading: the server writes until exactly ``send``
    bytes wait in its send queue; ``recv`` bytes wait unread in its receive queue."""

    def __init__(self, listener: socket.socket, send: int, recv: int) -> None:
        self.send, self.recv = send, recv
        self.client = socket.socket()
        # Before connect, so the window scale fits it; SO_RCVBUF also stops autotuning.
        self.client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CLIENT_RCVBUF // 2)
        self.client.connect(listener.getsockname())
        self.server, _ = listener.accept()
        up = os.urandom(recv)
        self.up_digest = hashlib.sha256(up).digest()
        if recv:
            self.client.sendall(up)
            _settle(lambda: _queued(self.server, k.SIOCINQ) == recv, "the receive queue")
        self.data = memoryview(os.urandom(send + (4 << 20)))  # the client takes some first
        self.sent = hashlib.sha256()
        self.total = 0  # bytes the server wrote: the client holds some, the rest is queued

    def fill(self) -> None:
        """Write until exactly ``send`` bytes are queued and the client's window stays
        shut (it holds what it got in its receive buffer, unread)."""
        self.server.setblocking(False)

        def full() -> bool:
            want = self.send - _queued(self.server, k.SIOCOUTQ)
            if want > 0:
                with contextlib.suppress(BlockingIOError):
                    n = self.server.send(self.data[self.total : self.total + want])
                    self.sent.update(self.data[self.total : self.total + n])
                    self.total += n
                return False
            before = _queued(self.client, k.SIOCINQ)
            time.sleep(0.02)
            return (
                _queued(self.client, k.SIOCINQ) == before
                and _queued(self.server, k.SIOCOUTQ) == self.send
            )

        _settle(full, "the send queue to fill")
        self.server.setblocking(True)

    def kernel_allowed(self) -> dict[str, int]:
        """The buffer sizes the kernel granted (it doubles what FORCE asks for)."""
        sol, snd, rcv = socket.SOL_SOCKET, socket.SO_SNDBUF, socket.SO_RCVBUF
        return {
            "server_sndbuf": self.server.getsockopt(sol, snd),
            "server_rcvbuf": self.server.getsockopt(sol, rcv),
            "client_rcvbuf": self.client.getsockopt(sol, rcv),
        }


LOCK = """table inet backlog {{
  chain out {{
    type filter hook output priority 0;
    tcp dport {port} meta mark != 0x70737472 drop
  }}
}}"""


def move_once(ns: str, flow: BackedUp, port: int, in_flight: bool) -> dict[str, float]:
    """Lock, dump, encode, decode, release, restore, unlock; check both streams after.
    Returns each step's seconds, and the queue split under ``queue_*``."""
    if not in_flight:
        flow.fill()
    nft(ns, LOCK.format(port=port))  # the client's packets never reach a socket meanwhile
    flow.fill()  # anything the client took in meanwhile: the queue is exact again
    t0 = time.perf_counter()
    state = tcp.dump(flow.server)
    t1 = time.perf_counter()
    blob = msgpack.packb(state.to_wire(), use_bin_type=True)
    t2 = time.perf_counter()
    decoded = tcp.TcpState.from_wire(msgpack.unpackb(blob, raw=False))
    t3 = time.perf_counter()
    tcp.release(flow.server)
    t4 = time.perf_counter()
    new = tcp.restore(decoded)
    t5 = time.perf_counter()
    split = (len(state.recv_queue), len(state.send_unacked), len(state.send_unsent))
    if split[1] + split[2] != flow.send or split[0] != flow.recv:
        raise RuntimeError(f"dumped queues of {split} bytes, expected {flow.send} + {flow.recv}")
    # Baselines on the same bytes: one copy into fresh memory; a packer sized up front
    # (TcpState.queued, spelled out so that this runs on older trees too).
    b0 = time.perf_counter()
    copy = b"".join((state.recv_queue, state.send_unacked, state.send_unsent))
    b1 = time.perf_counter()
    packer = msgpack.Packer(use_bin_type=True, autoreset=False, buf_size=sum(split) + 4096)
    packer.pack(state.to_wire())
    view = packer.getbuffer()
    b2 = time.perf_counter()
    if view != blob:
        raise RuntimeError("the pre-sized packer wrote other bytes")
    view.release()
    del copy, view, packer, blob, state, decoded
    nft(ns, "delete table inet backlog")
    # Both streams byte for byte: the client reads all it was sent (what it held unread,
    # then the moved send queue); the new socket reads the moved receive queue.
    flow.client.settimeout(20)
    new.settimeout(20)
    if _read_exactly(flow.client, flow.total) != flow.sent.digest():
        raise RuntimeError("the client's stream differs after the move")
    if flow.recv and _read_exactly(new, flow.recv) != flow.up_digest:
        raise RuntimeError("the server's stream differs after the move")
    flow.client.close()
    new.close()
    return {
        "dump": t1 - t0,
        "encode": t2 - t1,
        "decode": t3 - t2,
        "restore": t5 - t4,
        "freeze": (t3 - t0) + (t5 - t4),
        "dump_restore": (t1 - t0) + (t5 - t4),
        "baseline_copy": b1 - b0,
        "baseline_encode_sized": b2 - b1,
        "queue_recv": split[0],
        "queue_unacked": split[1],
        "queue_unsent": split[2],
    }


def run_backlog(ns: str, send: int, recv: int, in_flight: bool, repeat: int) -> dict[str, object]:
    """``repeat`` moves of a backed-up connection, timed step by step. ``in_flight``: the
    lock goes on before the server writes, so its send queue holds data both sent (never
    acknowledged: the client's ACKs are dropped) and unsent, as when a flow is parked
    mid-transfer; otherwise nearly all of it is unsent behind a shut window."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    # Room for the whole backlog; the accepted sockets inherit it. FORCE ignores
    # net.core.[rw]mem_max; the kernel doubles the value (bookkeeping overhead).
    listener.setsockopt(socket.SOL_SOCKET, k.SO_SNDBUFFORCE, send + (1 << 20))
    listener.setsockopt(socket.SOL_SOCKET, k.SO_RCVBUFFORCE, recv + (1 << 20))
    runs, allowed = [], {}
    for _ in range(repeat):
        flow = BackedUp(listener, send, recv)
        allowed = flow.kernel_allowed()
        runs.append(move_once(ns, flow, port, in_flight))
    listener.close()
    steps = (*STEPS, "baseline_copy", "baseline_encode_sized")
    return {
        "send_queue_bytes": send,
        "recv_queue_bytes": recv,
        "runs": repeat,
        "queues": {q: runs[-1][f"queue_{q}"] for q in ("recv", "unacked", "unsent")},
        "kernel_allowed": allowed,
        **{step: summary_ms([run[step] for run in runs]) for step in steps},
    }


def summary_ms(values: list[float]) -> dict[str, float]:
    ms = [v * 1e3 for v in values]
    return {
        "median_ms": round(statistics.median(ms), 3),
        "max_ms": round(max(ms), 3),
        "first_ms": round(ms[0], 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sockets", type=int, default=1000, help="sockets per size (1000)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per backed-up flow (5)")
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
        backlog = {
            name: netns.call_in(ns, run_backlog, ns, send, recv, in_flight, args.repeat)
            for name, (send, recv, in_flight) in BACKLOGS.items()
        }
    finally:
        pr_netns.remove(ns)
    report = {
        "benchmark": "tcp_repair",
        "sockets": args.sockets,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "anchor_libsoccr_us": {"dump": "3-10", "restore": "6-12"},
        "targets_us": {
            "dump_median_empty": 50,
            "restore_median_empty": 100,
            "restore_median_64KiB": 150,
        },
        "targets_ms": {"freeze_16MiB": 30},
        "results": results,
        "backlog": backlog,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'queues':<7} {'op':<24} {'median µs':>10} {'p99 µs':>10}")
    for name, r in results.items():
        for op in ("dump", "release", "restore", "baseline_connect_accept", "baseline_tcp_info"):
            s = r[op]
            print(f"{name:<7} {op:<24} {s['median_us']:>10.1f} {s['p99_us']:>10.1f}")
    columns = {
        **{step: step for step in STEPS},
        "baseline_copy": "copy (base)",
        "baseline_encode_sized": "sized enc (base)",
    }
    print(f"\n{'backed up: median ms':<22}" + "".join(f"{c:>17}" for c in columns.values()))
    for name, r in backlog.items():
        print(f"{name:<22}" + "".join(f"{r[step]['median_ms']:>17.2f}" for step in columns))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
