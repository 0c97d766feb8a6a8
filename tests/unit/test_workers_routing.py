"""The pure parts of an agent with workers: which worker takes a migration, and how the
supervisor makes one drain's answers out of its workers'."""

from __future__ import annotations

import os

from pysteer.agent.supervisor import _merge_summaries, _sum, _worst
from pysteer.transfer.blob import worker_of


def test_a_migration_id_routes_to_one_worker_and_ids_spread_evenly() -> None:
    ids = [os.urandom(16) for _ in range(20_000)]
    for n in (1, 2, 3, 16, 64):
        counts = [0] * n
        for mid in ids:
            w = worker_of(mid, n)
            assert w == worker_of(bytes(mid), n)  # the id alone decides
            counts[w] += 1
        assert min(counts) > 0.8 * len(ids) / n, counts
    assert worker_of(b"\x00\x00\x00\x05" + bytes(12), 4) == 1
    assert worker_of(b"\xff" * 16, 1) == 0


def spread(n: int, p50: float | None, p99: float | None) -> dict:
    return {"n": n, "p50": p50, "p90": p50, "p99": p99, "max": p99}


def summary(moved: int, seconds: float, p99: float, remaining: list[str]) -> dict:
    return {
        "moved": moved,
        "rolled_back": 1,
        "failed": 0,
        "from": "a",
        "to": "b",
        "interrupted": False,
        "seconds": seconds,
        "per_second": round(moved / seconds, 1),
        "freeze_ms": {"p50": 1.0, "p90": 2.0, "p99": p99, "max": p99},
        "steps_ms": {"park->parked": spread(moved, 0.5, p99)},
        "remaining": remaining,
        "not_moved": [{"flow": f"f{moved}", "outcome": "rolled-back", "error": "x"}],
    }


def test_one_drain_from_its_workers_drains() -> None:
    merged = _merge_summaries([summary(30, 1.5, 9.0, ["z"]), summary(10, 2.0, 4.0, ["y"])])
    assert (merged["moved"], merged["rolled_back"], merged["failed"]) == (40, 2, 0)
    assert merged["seconds"] == 2.0 and merged["per_second"] == 20.0  # side by side
    assert merged["freeze_ms"] == {"p50": 1.0, "p90": 2.0, "p99": 9.0, "max": 9.0}
    assert merged["steps_ms"] == {"park->parked": spread(40, 0.5, 9.0)}
    assert merged["remaining"] == ["y", "z"]
    assert [n["flow"] for n in merged["not_moved"]] == ["f30", "f10"]
    assert [w["moved"] for w in merged["workers"]] == [30, 10]
    assert not merged["interrupted"]
    stopped = summary(0, 0.0 + 1, 3.0, []) | {"interrupted": True}
    assert _merge_summaries([summary(1, 1.0, 1.0, []), stopped])["interrupted"]


def test_worst_and_sum() -> None:
    assert _worst([spread(0, None, None), spread(3, 1.0, 2.0)]) == spread(3, 1.0, 2.0)
    assert _worst([spread(0, None, None)]) == spread(0, None, None)
    progress = [{"moved": 2, "rolled_back": 0, "failed": 1, "total": 9}, {"moved": 5, "total": 4}]
    assert _sum(progress) == {
        "moved": 7,
        "rolled_back": 0,
        "not_movable": 0,
        "failed": 1,
        "total": 13,
    }
