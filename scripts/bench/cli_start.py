#!/usr/bin/env python3
"""Benchmark how long `pysteer` commands take to start, against the bare interpreter.

Runs each command N times as a fresh process (the console script next to the interpreter,
as an operator runs it) and reports min, p50 and max wall time. The same run times
`python -c pass` and `python -c "import argparse"` with the same interpreter: the floor no
lazy import can go below, so a slow machine shows as a slow baseline, not a regression.
The failing commands (no cluster file, no daemon) must fail fast with their clear error
(exit 2); a command that exits otherwise is reported, since a crash is fast too.
Target: every command's p50 at most 0.15 s. No root needed. With PYTHONDONTWRITEBYTECODE
set and no __pycache__, pysteer's own modules are compiled at every start (about 10 ms
here); the JSON records both variables.

    scripts/bench/cli_start.py [--runs 10] [--out results/bench/cli_start.json] [--check]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TARGET_S = 0.15
# (arguments, expected exit code): --help exits 0; the others fail fast with exit 2.
COMMANDS: list[tuple[list[str], int]] = [
    (["--help"], 0),
    (["flows", "--help"], 0),
    (["status"], 2),  # no cluster file: "give --config or set PYSTEER_CONFIG"
    (["steer", "flows", "--name", "nonexistent"], 3),  # no steering daemon (down)
    (["certs", "--help"], 0),
    (["lab", "--help"], 0),
    (["migrate", "--help"], 0),
    (["agent", "--help"], 0),
    (["doctor", "--help"], 0),
]


def default_python() -> Path:
    """The repo's venv interpreter, so the run does not depend on an activated venv."""
    venv = REPO / ".venv" / "bin" / "python"
    return venv if venv.exists() else Path(sys.executable)


def entry(python: Path) -> list[str]:
    """The installed console script beside ``python``, else ``python -m pysteer``."""
    script = python.parent / "pysteer"
    return [str(script)] if script.exists() else [str(python), "-m", "pysteer"]


def timed(argv: list[str], runs: int, env: dict[str, str]) -> tuple[dict[str, float], int, str]:
    """Wall times of ``runs`` runs (after one warm-up run for the page cache), the last
    run's exit code and the last line of its stderr."""
    times = []
    for i in range(runs + 1):
        start = time.perf_counter()
        done = subprocess.run(
            argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False
        )
        if i:
            times.append(time.perf_counter() - start)
    lines = done.stderr.decode(errors="replace").strip().splitlines()
    stats = {
        "min_s": round(min(times), 4),
        "p50_s": round(statistics.median(times), 4),
        "max_s": round(max(times), 4),
    }
    return stats, done.returncode, lines[-1] if lines else ""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=10, help="runs per command (10)")
    p.add_argument(
        "--python",
        type=Path,
        default=default_python(),
        help="interpreter to run pysteer with (default: the repo's .venv)",
    )
    p.add_argument("--out", type=Path, default=Path("results/bench/cli_start.json"))
    p.add_argument(
        "--check",
        action="store_true",
        help="exit 1 if a command misses the target or exits unexpectedly",
    )
    args = p.parse_args()
    if args.runs < 1:
        p.error("--runs must be at least 1")
    env = {k: v for k, v in os.environ.items() if k != "PYSTEER_CONFIG"}
    python, pysteer = str(args.python), entry(args.python)
    baseline = {
        "python -c pass": timed([python, "-c", "pass"], args.runs, env)[0],
        "python -c 'import argparse'": timed([python, "-c", "import argparse"], args.runs, env)[0],
    }
    floor = baseline["python -c pass"]["p50_s"]
    commands = {}
    for extra, expected in COMMANDS:
        stats, code, last = timed(pysteer + extra, args.runs, env)
        commands[" ".join(["pysteer", *extra])] = stats | {
            "over_floor_s": round(stats["p50_s"] - floor, 4),
            "exit": code,
            "expected_exit": expected,
            "stderr_tail": last if code else "",
            "meets_target": stats["p50_s"] <= TARGET_S and code == expected,
        }
    report = {
        "benchmark": "cli_start",
        "runs": args.runs,
        "python": platform.python_version(),
        "interpreter": python,
        "entry": pysteer,
        "cpus": os.cpu_count(),
        "env": {k: os.environ.get(k) for k in ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")},
        "targets": {"p50_s": TARGET_S},
        "baseline": baseline,
        "commands": commands,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'command':<44} {'min s':>7} {'p50 s':>7} {'max s':>7}  exit")
    for name, s in [*baseline.items(), *commands.items()]:
        mark = "" if s.get("meets_target", True) else "  MISSES TARGET"
        print(
            f"{name:<44} {s['min_s']:>7.3f} {s['p50_s']:>7.3f} {s['max_s']:>7.3f}  "
            f"{s.get('exit', '')}{mark}"
        )
    print(f"wrote {args.out}")
    missed = [n for n, s in commands.items() if not s["meets_target"]]
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
