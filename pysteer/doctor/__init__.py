"""``pysteer doctor``: one line per check of what pysteer needs, with a fix for each failure."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from pysteer.clitable import Command, arg

if TYPE_CHECKING:
    from pysteer.doctor.checks import Check

_MARK = {"ok": "  ok", "warn": "warn", "fail": "FAIL"}


def format_line(check: Check) -> str:
    line = f"{_MARK[check.status]}  {check.name:<15} {check.detail}"
    if check.status != "ok" and check.hint:
        line += f"  -> fix: {check.hint}"
    return line


def cmd_doctor(args: argparse.Namespace) -> int:
    # The checks import pyroute2 and pyOpenSSL: not for the other commands' start.
    from pysteer.doctor.checks import run_all  # noqa: PLC0415

    checks = run_all()
    ok = not any(c.failed for c in checks)
    if args.json:
        print(json.dumps({"ok": ok, "checks": [c.to_dict() for c in checks]}, indent=2))
    else:
        for check in checks:
            print(format_line(check))
        failed = [c.name for c in checks if c.failed]
        print("all required checks passed" if ok else f"failed: {', '.join(failed)}")
    return 0 if ok else 1


DOCTOR = Command(
    "doctor",
    help="check that this machine can run pysteer",
    description=(
        "Check privileges, bpf(), BCC and kernel headers, TCP_REPAIR, network namespaces, "
        "clsact and XDP attach, and the TLS libraries. Exits 1 if a required check fails."
    ),
    args=(arg("--json", action="store_true", help="machine-readable output"),),
    run=cmd_doctor,
)
