#!/usr/bin/env python3
"""Benchmark the shared store (etcd, Debian's etcd-server) with many flow overrides.

A one-member etcd runs TLS-only in the lab (as ``LabCluster(store=True)`` runs it). A
client in host a's namespace (as the agents would be) writes ``--overrides`` overrides in
transactions of 128 and reads them all back at once. Then a steering daemon starts with
``--store``: it loads every override into its flow table before its programs attach;
its start (until it serves) and its memory, with its store reader's, are measured, with
the same start on an empty store as the baseline of the same run. Then the client
removes them all, compacts and defragments, and soaks: ``--soak`` short-lived overrides,
each written and removed, as many short moved connections would leave them, and the
database size after compaction again, to show that the store does not grow without bound.

Reported (JSON and stdout): write rate, the full read's time and the client's RSS growth
while holding the result; the steering daemon's start with and without the overrides,
its peak RSS and its reader's; the database size with all overrides, after their
removal, after compaction and defragmentation, and after the soak.

Run as root: scripts/bench/store.py [--overrides 100000] [--soak 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pysteer.lab import Lab
from pysteer.lab.cluster import LabCluster
from pysteer.lab.pytest_plugin import unique_prefix
from pysteer.steer import pins


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kb / 1024


def flow(i: int) -> str:
    return (
        f"10.{64 + i // 65536 % 64}.{i // 256 % 256}.{i % 256}:{1024 + i % 60000}-10.77.100.1:443"
    )


def open_store(args: argparse.Namespace) -> Any:
    """The store as host a's agent opens it (run inside host a's namespace)."""
    from pysteer.store import Store  # noqa: PLC0415 - only in the inner process

    certs = Path(args.certs)
    return Store(
        [(args.endpoint, 2379)],
        args.cluster,
        ca=(certs / "ca.pem").read_bytes(),
        cert=(certs / "a.pem").read_bytes(),
        key=(certs / "a.key").read_bytes(),
        timeout=30,
    )


async def settled_size(store: Any) -> int:
    """The database size once etcd's backend has committed (it batches for 100 ms)."""
    await asyncio.sleep(0.3)
    return await store.db_size()


async def inner(args: argparse.Namespace) -> dict[str, Any]:
    """Runs inside the lab (host a's namespace): every gRPC socket is opened there."""
    from pysteer.store import Override  # noqa: PLC0415 - only in the inner process

    store = open_store(args)
    out: dict[str, Any] = {"overrides": args.overrides}
    out["db_bytes_empty"] = await settled_size(store)
    started = time.perf_counter()
    batch = []
    for i in range(args.overrides):
        batch.append(Override(flow(i), "ab"[i % 2], "a"))
        if len(batch) == 128:
            await store.put_many(batch)
            batch = []
    if batch:
        await store.put_many(batch)
    seconds = time.perf_counter() - started
    out["write_s"] = round(seconds, 3)
    out["write_per_s"] = round(args.overrides / seconds, 1)
    out["db_bytes_full"] = await settled_size(store)
    before = rss_mb()
    started = time.perf_counter()
    found, _ = await store.overrides()
    out["read_all_s"] = round(time.perf_counter() - started, 3)
    out["read_all_rss_growth_mb"] = round(rss_mb() - before, 1)
    out["read_all_count"] = len(found)
    del found
    await store.close()
    return out


async def rest(args: argparse.Namespace) -> dict[str, Any]:
    """After the steering daemon loaded them: remove, compact, soak (in host a)."""
    from pysteer.store import Override  # noqa: PLC0415 - only in the inner process

    store = open_store(args)
    out: dict[str, Any] = {}
    deleted = await store.delete_all_overrides()
    out["deleted"] = deleted
    out["db_bytes_after_delete"] = await settled_size(store)
    _, revision = await store.overrides()
    await store.compact(revision)
    await store.defragment()
    out["db_bytes_after_compact_defrag"] = await settled_size(store)
    started = time.perf_counter()
    for i in range(args.soak):  # a short moved connection: its override comes and goes
        o = Override(flow(i), "b", "a")
        version = await store.put_override(o, expect=0)
        await store.delete_override(o.flow, expect=version)
        if i and i % 5000 == 0:  # what the lifecycle's garbage collection would do
            _, revision = await store.overrides()
            await store.compact(revision)
    out["soak"] = args.soak
    out["soak_per_s"] = round(args.soak / (time.perf_counter() - started), 1) if args.soak else None
    out["db_bytes_after_soak"] = await settled_size(store)
    _, revision = await store.overrides()
    await store.compact(revision)
    await store.defragment()
    out["db_bytes_after_soak_compact_defrag"] = await settled_size(store)
    out["client_max_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    await store.close()
    return out


def steer_start(cluster: LabCluster, expect: int) -> dict[str, Any]:
    """Start the steering daemon, wait until it serves; its start and memory."""
    started = time.perf_counter()
    cluster.start_steer()
    took = time.perf_counter() - started
    log = cluster.log("steer")
    if expect and f"store: {expect} overrides loaded before attaching" not in log:
        raise SystemExit(f"the steering daemon did not load {expect} overrides:\n{log[-2000:]}")
    proc = cluster.procs["steer"]
    child = next(iter(psutil_children(proc.pid)), None)
    out = {
        "start_s": round(took, 3),
        "daemon_peak_rss_mb": peak_rss_mb(proc.pid),
        "reader_peak_rss_mb": peak_rss_mb(child) if child else None,
    }
    cluster.stop("steer")
    pins.remove(cluster.lab.prefix)
    return out


def psutil_children(pid: int) -> list[int]:
    """Child processes of ``pid`` (the store reader, under ``ip netns exec``'s exec)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        kb = next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:"))
    return round(kb / 1024, 1)


def outer(args: argparse.Namespace) -> dict[str, Any]:
    lab = Lab(prefix=unique_prefix()).up()
    work = Path(tempfile.mkdtemp(prefix="pysteer-bench-store-"))
    # The flow table must hold every override (and the live flows): sizing, see the docs.
    steer_args = ["--max-flows", str(max(65536, 2 * args.overrides))]
    cluster = LabCluster(lab, work, store=True, steer_args=steer_args)
    assert cluster.etcd is not None  # noqa: S101
    etcd = cluster.etcd
    try:
        etcd.start()
        base = [sys.executable, __file__, "--certs", str(work), "--cluster", lab.prefix]
        base += ["--endpoint", etcd.endpoints[0][0]]
        result: dict[str, Any] = {"steer_empty": steer_start(cluster, 0)}

        def inner_run(*more: str) -> dict[str, Any]:
            proc = lab.popen("a", [*base, *more], stdout=subprocess.PIPE, text=True)
            text, _ = proc.communicate(timeout=3600)
            if proc.returncode != 0:
                raise SystemExit(f"the store client failed ({proc.returncode})")
            return json.loads(text)

        result |= inner_run("--inner", "--overrides", str(args.overrides))
        result["steer_full"] = steer_start(cluster, args.overrides)
        result |= inner_run("--rest", "--soak", str(args.soak))
        pid = etcd.procs[etcd.nodes[0]].pid
        result["etcd_peak_rss_mb"] = peak_rss_mb(pid)
        return result
    finally:
        cluster.close()
        lab.down()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--overrides", type=int, default=100_000)
    p.add_argument("--soak", type=int, default=20_000)
    p.add_argument("--out", type=Path, default=Path("results/bench/store.json"))
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rest", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--certs", help=argparse.SUPPRESS)
    p.add_argument("--cluster", help=argparse.SUPPRESS)
    p.add_argument("--endpoint", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.inner or args.rest:
        print(json.dumps(asyncio.run(inner(args) if args.inner else rest(args))))
        return
    result = outer(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    for k, v in result.items():
        print(f"{k:36} {v}")
    full, empty = result["steer_full"], result["steer_empty"]
    print(
        f"steering daemon start with {args.overrides} overrides: {full['start_s']} s "
        f"(empty store: {empty['start_s']} s), peak RSS {full['daemon_peak_rss_mb']} MiB "
        f"(empty: {empty['daemon_peak_rss_mb']}) + reader {full['reader_peak_rss_mb']} MiB"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
