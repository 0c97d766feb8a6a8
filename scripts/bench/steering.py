#!/usr/bin/env python3
"""The freeze with one and with two steering nodes, in one run.

Runs migrate.py's measurement twice (each in a lab of its own): one steering node with
the shared store (etcd), then two behind the client's ECMP route. A migration then parks
and claims on both in parallel; the override's write to etcd comes after the commit,
outside the freeze. Reported (JSON, and a line each on stdout): each run's freeze
p50/p99, parked time at the steering nodes, and client gaps; the ratio of 2 to 1. The
targets are the core issue's, for the run with two: freeze p50 <= 1 ms, p99 <= 2.5 ms.

Run as root: scripts/bench/steering.py [--moves 50] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import migrate
from benchlib import target, target_lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--moves", type=int, default=50)
    p.add_argument("--every", type=float, default=0.2, help="seconds between migrations")
    p.add_argument("--out", type=Path, default=Path("results/bench/steering.json"))
    args = p.parse_args()
    if args.moves < 1:
        p.error("--moves must be at least 1")
    runs = {}
    for n in (1, 2):
        one = argparse.Namespace(
            moves=args.moves,
            every=args.every,
            backlog_mib=0,
            backlog_moves=0,
            workers=1,
            steering=n,
            store=True,
            out=args.out.with_name(f"{args.out.stem}-{n}.json"),
        )
        runs[n] = migrate.run(one)
    f1, f2 = runs[1]["freeze_ms"], runs[2]["freeze_ms"]
    result = {
        "moves": args.moves,
        "one": {k: runs[1][k] for k in ("freeze_ms", "parked_ms", "client_gap_ms", "steps_ms")},
        "two": {k: runs[2][k] for k in ("freeze_ms", "parked_ms", "client_gap_ms", "steps_ms")},
        "ratio_p50": round(f2["p50"] / f1["p50"], 3) if f1["p50"] else None,
        "ratio_p99": round(f2["p99"] / f1["p99"], 3) if f1["p99"] else None,
        "targets": [
            target("freeze p50 with 2 steering nodes", f2["p50"], "<=", 1.0),
            target("freeze p99 with 2 steering nodes", f2["p99"], "<=", 2.5),
            *[t | {"name": f"{t['name']} (2 nodes)"} for t in runs[2]["targets"][2:]],
        ],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    for n, f in ((1, f1), (2, f2)):
        print(f"{n} steering node(s): freeze p50 {f['p50']:.2f} ms, p99 {f['p99']:.2f} ms")
    print(f"2 / 1: p50 x{result['ratio_p50']}, p99 x{result['ratio_p99']}")
    print("targets:")
    print("\n".join(target_lines(result["targets"], "  ")))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
