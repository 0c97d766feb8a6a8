"""The benchmarks' shared helpers (scripts/bench/benchlib.py): step durations derived from
whatever steps the timelines hold, targets, the worker-count refusal, and the backed-up
client's byte-exact check."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from pysteer.app.handlers import http_body
from pysteer.migration.timeline import spread, step_durations

ROOT = Path(__file__).resolve().parents[2]


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("benchlib", ROOT / "scripts/bench/benchlib.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load()


def tl(*steps: tuple[str, float]) -> list[dict]:
    return [{"step": name, "ms": ms, "t": 0.0} for name, ms in steps]


def test_step_durations_come_from_the_data_in_timeline_order() -> None:
    timelines = [
        tl(("park", 0), ("parked", 1), ("frozen", 1.5), ("done", 4)),
        tl(("park", 0), ("parked", 3), ("frozen", 3.25), ("done", 5)),
    ]
    steps = step_durations(timelines)
    assert list(steps) == ["park->parked", "parked->frozen", "frozen->done"]
    assert steps["park->parked"] == {"n": 2, "p50": 3, "p90": 3, "p99": 3, "max": 3}
    assert steps["parked->frozen"]["max"] == 0.5
    assert steps["frozen->done"]["n"] == 2


def test_step_durations_follow_renamed_and_merged_steps() -> None:
    old = tl(("park", 0), ("sealed", 1), ("prepared", 2), ("commit", 2.1), ("committed", 3))
    new = tl(("park", 0), ("sealed", 1), ("moved", 2.5))  # prepare and commit as one step
    rolled_back = tl(("park", 0), ("decided", 0.5), ("resumed", 0.7))
    steps = step_durations([old, new, rolled_back, "not a timeline", [{"x": 1}]])
    assert steps["sealed->moved"]["n"] == 1
    assert steps["sealed->prepared"]["n"] == 1
    assert steps["park->sealed"]["n"] == 2
    assert steps["decided->resumed"]["p50"] == 0.2
    assert step_durations([]) == {}


def test_spread_of_nothing_is_empty_not_an_error() -> None:
    assert spread([]) == {"n": 0, "p50": None, "p90": None, "p99": None, "max": None}
    assert bench.steps_table({}) == ["  (no timelines)"]


def test_targets_say_met_or_not() -> None:
    assert bench.target("rate", 2100.0, ">=", 2000, "conn/s")["met"]
    assert not bench.target("freeze p99", 10.5, "<=", 10)["met"]
    assert not bench.target("freeze p99", None, "<=", 10)["met"]
    lines = bench.target_lines(
        [bench.target("freeze p99", 9.25, "<=", 10), bench.flag("byte-exact", False)]
    )
    assert lines == ["freeze p99: 9.25 ms (target ≤ 10 ms): met", "byte-exact: no: NOT MET"]


def test_a_worker_count_out_of_range_is_refused_in_one_line() -> None:
    bench.check_workers(1, "drain.py")
    bench.check_workers(4, "drain.py")
    for bad in (0, 65):
        with pytest.raises(SystemExit) as exit_:
            bench.check_workers(bad, "drain.py")
        message = str(exit_.value.code)
        assert "\n" not in message
        assert message == f"drain.py: --workers {bad}: an agent runs 1..64 worker processes"


class _Stream:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def recv(self, n: int) -> bytes:
        chunk, self.data = self.data[: min(n, 7000)], self.data[min(n, 7000) :]
        return chunk

    def settimeout(self, _t: float) -> None:
        pass

    def sendall(self, _data: bytes) -> None:
        pass


def _client(data: bytes, size: int) -> object:
    client = object.__new__(bench.BackedUpClient)
    client.sock, client.size = _Stream(data), size
    return client


def _response(size: int) -> bytes:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size
    return head + http_body(size)


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (_response(50_000) + _response(1000), None),
        (_response(50_000)[:-1] + b"x" + _response(1000), "the body differs"),
        (_response(50_000) + http_body(50_000)[-1000:] + _response(1000), "after the backlog"),
        (_response(50_000)[:-10], "EOF with"),
    ],
    ids=["exact", "corrupt", "duplicated", "short"],
)
def test_the_backed_up_client_finds_lost_or_repeated_bytes(data: bytes, problem: str) -> None:
    found = _client(data, 50_000).check()
    assert (found is None) if problem is None else (problem in found)
