"""On the demo's client VM: what the client saw, judged as scripts/demo judges it.

    check_client.py counters              the TCP counters now (JSON), before the run
    check_client.py verify OUT SENT BEFORE

``verify`` checks the s_client output OUT against the lines SENT: the greeting once, ticks
in sequence with none lost or repeated, every line echoed once and in order (a reconnect
would restart the echo counter), and no connection reset since the counters in BEFORE. It
prints PASS or FAIL with the reason, and exits 0 only on PASS.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pysteer.lab.clients import StreamError, check_ticker_stream


def counters() -> dict[str, int]:
    lines = Path("/proc/net/snmp").read_text().splitlines()
    names, values = (ln.split()[1:] for ln in lines if ln.startswith("Tcp:"))
    tcp = dict(zip(names, map(int, values), strict=True))
    return {k: tcp[k] for k in ("EstabResets", "RetransSegs", "ActiveOpens")}


def verify(out: Path, sent: Path, before: Path) -> int:
    lines = [ln + b"\n" for ln in sent.read_bytes().splitlines()]
    problems = []
    try:
        ticks = check_ticker_stream(out.read_text(errors="replace"), lines)
    except StreamError as exc:
        problems.append(f"the stream: {exc}")
        ticks = 0
    then, now = json.loads(before.read_text()), counters()
    resets = now["EstabResets"] - then["EstabResets"]
    if resets:
        problems.append(f"{resets} connection reset(s) on the client")
    if not lines:
        problems.append("the client sent nothing")
    summary = f"{ticks} ticks in sequence, {len(lines)} lines echoed in order, {resets} resets"
    if problems:
        print(f"FAIL: {'; '.join(problems)} ({summary})")
        return 1
    print(f"PASS: {summary}; retransmitted segments: {now['RetransSegs'] - then['RetransSegs']}")
    return 0


def main() -> int:
    if sys.argv[1:2] == ["counters"]:
        print(json.dumps(counters()))
        return 0
    if sys.argv[1:2] == ["verify"] and len(sys.argv) == 5:
        return verify(*map(Path, sys.argv[2:]))
    print(__doc__.strip(), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
