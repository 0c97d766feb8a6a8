"""`scripts/demo`, the README's first command, runs and reports that no client noticed."""

import re
import subprocess
import tempfile
from pathlib import Path

from pysteer.lab.pytest_plugin import require_root, unique_prefix

ROOT = Path(__file__).resolve().parents[2]


def test_demo_passes_and_reports_nothing_lost() -> None:
    require_root()
    before = set(Path(tempfile.gettempdir()).glob("pysteer-demo-*"))
    out = subprocess.run(
        [str(ROOT / "scripts" / "demo"), "--prefix", unique_prefix()],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    report = out.stdout[out.stdout.index("pysteer demo report") :]
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "RESULT: PASS" in report
    # A passing demo leaves none of its cluster's files (23 MB of logs, private keys).
    assert set(Path(tempfile.gettempdir()).glob("pysteer-demo-*")) == before
    assert re.search(r"client link: 0 RST to the clients", report)
    assert "retransmission timeouts 0" in report
    assert "24000000 bytes over TLS, sha256 verified" in report
    assert len(re.findall(r"migration \d: \w -> \w: moved", report)) == 4
    assert re.search(r"drain a -> b: 4 moved, 0 rolled back, 0 failed", report)
    assert re.search(
        r"curl loop 80 requests to nginx behind pysteer on 1 keep-alive connection, all 200, "
        r"sha256 verified; nginx on a served [1-9]\d*, on b [1-9]\d*",
        report,
    )
    for client in ("s_client", "plain"):
        line = next(ln for ln in report.splitlines() if ln.strip().startswith(client))
        assert re.search(r"\d+ ticks in sequence, \d+ lines echoed in order, \d+ bytes exact", line)
