"""vagrant/check_client.py, the Vagrant demo's judge, on transcripts made here: it passes
a clean stream and fails each way a client could notice a move (run on the client VM, it
cannot be tested there by CI: no VMs boot here)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from pysteer.paths import repo_root

spec = importlib.util.spec_from_file_location(
    "check_client", repo_root() / "vagrant" / "check_client.py"
)
assert spec and spec.loader
check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check)

SENT = [f"line {i}" for i in range(1, 6)]


def transcript(ticks: list[int], echoes: list[int]) -> str:
    out = ["ticker ready"] + [f"tick {t}" for t in ticks]
    out += [f"echo {n} line {n}" for n in echoes]
    return "\n".join(out) + "\ntick 9"  # the last line cut: left out, not judged


def judge(tmp_path: Path, text: str, resets: int = 0) -> tuple[int, str]:
    (tmp_path / "out").write_text(text)
    (tmp_path / "sent").write_text("".join(f"{s}\n" for s in SENT))
    before = check.counters()
    before["EstabResets"] -= resets
    (tmp_path / "before.json").write_text(json.dumps(before))
    code = check.verify(tmp_path / "out", tmp_path / "sent", tmp_path / "before.json")
    return code, ""


def test_a_clean_stream_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert judge(tmp_path, transcript([1, 2, 3], [1, 2, 3, 4, 5]))[0] == 0
    assert capsys.readouterr().out.startswith("PASS: 3 ticks in sequence, 5 lines echoed")


@pytest.mark.parametrize(
    ("case", "why"),
    [
        (([1, 3], [1, 2, 3, 4, 5], 0), "ticks lost, repeated or restarted"),
        (([1, 2], [1, 2, 4, 5], 0), "echoes lost, repeated or out of order"),
        (([1, 2], [1, 2, 3, 4, 5, 1], 0), "echoes lost"),
        (([1, 2], [1, 2, 3, 4, 5], 1), "1 connection reset(s) on the client"),
    ],
)
def test_what_a_client_would_notice_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: tuple, why: str
) -> None:
    ticks, echoes, resets = case
    assert judge(tmp_path, transcript(ticks, echoes), resets)[0] == 1
    out = capsys.readouterr().out
    assert out.startswith("FAIL: ") and why in out
