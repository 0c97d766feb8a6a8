"""A node's drained or cordoned state on disk: kept whole, and a file that cannot be read
starts the node cordoned (the safe side), with the reason logged."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from pysteer.agent.admission import Admission, load, save


def test_saved_state_comes_back(tmp_path: Path) -> None:
    path = tmp_path / "c" / "node-a.json"
    assert load(path) == Admission(accepting=True, drained_to=None)  # never saved
    for state in (Admission(False, "b"), Admission(False, None), Admission(True, None)):
        assert save(path, state)
        assert load(path) == state
    assert oct(os.stat(path.parent).st_mode & 0o777) == "0o700"
    assert [p.name for p in path.parent.iterdir()] == ["node-a.json"]  # no temporary left


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"", "Expecting value"),
        (b"[1]", "not a JSON object"),
        (b'{"accepting": "yes", "drained_to": null}', "accepting must be true or false"),
        (b'{"accepting": false, "drained_to": 7}', "drained_to a name or null"),
        (b'{"accepting": false}', "'drained_to'"),
        (b"\xff\xfe", "Expecting value"),
    ],
)
def test_an_unreadable_state_starts_cordoned(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes, why: str
) -> None:
    path = tmp_path / "node-a.json"
    path.write_bytes(content)
    with caplog.at_level(logging.ERROR, logger="pysteer.agent"):
        assert load(path) == Admission(accepting=False, drained_to=None)
    assert f"cannot read the node's state {path} (" in caplog.text
    assert why in caplog.text
    assert "starting cordoned" in caplog.text


def test_a_state_that_cannot_be_written_is_said(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with caplog.at_level(logging.ERROR, logger="pysteer.agent"):
        assert not save(blocker / "node-a.json", Admission(False, "b"))
    assert "the node is drained to b, but" in caplog.text
    assert "a restart forgets it" in caplog.text


def test_describe() -> None:
    assert Admission().describe() == "accepting"
    assert Admission(False).describe() == "cordoned"
    assert Admission(False, "b").describe() == "drained to b"
