#!/usr/bin/env python3
"""Benchmark the shared store (etcd, Debian's etcd-server) with many flow overrides.

A one-member etcd runs TLS-only in the lab's steering namespace. A client in host a's
namespace (as the agents would be) writes ``--overrides`` overrides in transactions of
128, reads them all back at once (the load a steering node does at its start), removes
them all, compacts and defragments. Then a soak: ``--soak`` short-lived overrides, each
written and removed, as many short moved connections would leave them, and the database
size after compaction again, to show that the store does not grow without bound.

Reported (JSON and stdout): write rate, the full read's time and the client's RSS growth
while holding the result, the database size with all overrides, after their removal,
after compaction and defragmentation, and after the soak.

What this does not measure yet: a steering node loading the overrides into its BPF maps
(the daemon does not read the store yet).

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

from pysteer.certs_cli import write_cluster
from pysteer.lab import Lab
from pysteer.lab.etcd import Etcd, node_address
from pysteer.lab.pytest_plugin import unique_prefix


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kb / 1024


def flow(i: int) -> str:
    return (
        f"10.{64 + i // 65536 % 64}.{i // 256 % 256}.{i % 256}:{1024 + i % 60000}-10.77.100.1:443"
    )


async def settled_size(store: Any) -> int:
    """The database size once etcd's backend has committed (it batches for 100 ms)."""
    await asyncio.sleep(0.3)
    return await store.db_size()


async def inner(args: argparse.Namespace) -> dict[str, Any]:
    """Runs inside the lab (host a's namespace): every gRPC socket is opened there."""
    from pysteer.store import Override, Store  # noqa: PLC0415 - only in the inner process

    certs = Path(args.certs)
    store = Store(
        [(args.endpoint, 2379)],
        "lab",
        ca=(certs / "ca.pem").read_bytes(),
        cert=(certs / "a.pem").read_bytes(),
        key=(certs / "a.key").read_bytes(),
        timeout=30,
    )
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
    found, revision = await store.overrides()
    out["read_all_s"] = round(time.perf_counter() - started, 3)
    out["read_all_rss_growth_mb"] = round(rss_mb() - before, 1)
    out["read_all_count"] = len(found)
    del found
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


def outer(args: argparse.Namespace) -> dict[str, Any]:
    lab = Lab(prefix=unique_prefix()).up()
    work = Path(tempfile.mkdtemp(prefix="pysteer-bench-store-"))
    nodes = {n: [node_address(lab, n)] for n in (lab.plan.steer, *lab.plan.hosts)}
    write_cluster(work / "certs", nodes)
    etcd = Etcd(lab, work / "etcd", work / "certs", [lab.plan.steer])
    try:
        etcd.start()
        argv = [sys.executable, __file__, "--inner", "--certs", str(work / "certs")]
        argv += ["--endpoint", etcd.endpoints[0][0], "--overrides", str(args.overrides)]
        argv += ["--soak", str(args.soak)]
        proc = lab.popen("a", argv, stdout=subprocess.PIPE, text=True)
        text, _ = proc.communicate(timeout=3600)
        if proc.returncode != 0:
            raise SystemExit(f"the store client failed ({proc.returncode})")
        result = json.loads(text)
        etcd_rss = 0.0
        pid = etcd.procs[lab.plan.steer].pid
        with open(f"/proc/{pid}/status") as f:
            etcd_rss = next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:")) / 1024
        result["etcd_peak_rss_mb"] = round(etcd_rss, 1)
        return result
    finally:
        etcd.close()
        lab.down()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--overrides", type=int, default=100_000)
    p.add_argument("--soak", type=int, default=20_000)
    p.add_argument("--out", type=Path, default=Path("results/bench/store.json"))
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--certs", help=argparse.SUPPRESS)
    p.add_argument("--endpoint", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.inner:
        print(json.dumps(asyncio.run(inner(args))))
        return
    result = outer(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    for k, v in result.items():
        print(f"{k:36} {v}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
