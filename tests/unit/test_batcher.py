"""The drain's request coalescing: calls made together leave as one batch, and each caller
gets its own answer, refusal or link error. The far side is a recording stand-in for a
LinkPool (the real links and the steering daemon's batch are in the integration tests)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from pysteer.agent import batcher
from pysteer.agent.batcher import Batcher
from pysteer.agent.links import LinkError, Refused


class Far:
    """Answers like the steering daemon: each request in a batch on its own."""

    name = "steer"

    def __init__(self, fail: Exception | None = None, short: bool = False) -> None:
        self.calls: list[dict[str, Any]] = []
        self.fail, self.short = fail, short

    async def call(self, timeout: float, **request: Any) -> dict[str, Any]:
        self.calls.append(request)
        await asyncio.sleep(0)
        if self.fail:
            raise self.fail
        if "batch" in (request.get("cmd"), request.get("op")):
            answers = [self.one(r) for r in request["requests"]]
            return {"ok": True, "answers": answers[:-1] if self.short else answers}
        answer = self.one(request)
        if not answer["ok"]:
            raise Refused(f"steer: {answer['error']}", answer.get("code"))
        return answer

    def one(self, r: dict[str, Any]) -> dict[str, Any]:
        if r.get("flow") == "bad":
            return {"ok": False, "error": "no such flow", "code": "absent"}
        return {"ok": True, "echo": r["flow"]}


async def together(b: Batcher, flows: list[str]) -> list[Any]:
    calls = [b.call(1.0, cmd="park", flow=f) for f in flows]
    return await asyncio.gather(*calls, return_exceptions=True)


def test_calls_made_together_leave_as_one_batch() -> None:
    far = Far()
    b = Batcher(far, "cmd")  # type: ignore[arg-type]
    got = asyncio.run(together(b, ["f1", "bad", "f3"]))
    assert len(far.calls) == 1 and far.calls[0]["cmd"] == "batch"
    assert [r["flow"] for r in far.calls[0]["requests"]] == ["f1", "bad", "f3"]
    assert got[0] == {"ok": True, "echo": "f1"} and got[2]["echo"] == "f3"
    assert isinstance(got[1], Refused) and got[1].code == "absent"
    assert str(got[1]) == "steer: no such flow"


def test_a_call_alone_is_sent_as_itself() -> None:
    far = Far()
    b = Batcher(far, "cmd")  # type: ignore[arg-type]
    assert asyncio.run(together(b, ["f1"])) == [{"ok": True, "echo": "f1"}]
    assert far.calls == [{"cmd": "park", "flow": "f1"}]


@pytest.mark.parametrize("far", [Far(fail=LinkError("down")), Far(short=True)])
def test_a_lost_batch_is_a_link_error_for_each(far: Far) -> None:
    b = Batcher(far, "cmd")  # type: ignore[arg-type]
    got = asyncio.run(together(b, ["f1", "f2"]))
    assert all(isinstance(g, LinkError) for g in got), got


def test_batches_are_bounded_by_count_and_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    far = Far()
    b = Batcher(far, "op")  # type: ignore[arg-type]
    got = asyncio.run(together(b, [f"f{i}" for i in range(300)]))
    assert [len(c["requests"]) for c in far.calls] == [256, 44] and len(got) == 300
    assert not b._pending and not b._tasks and not b._scheduled  # nothing kept afterwards
    monkeypatch.setattr(batcher, "MAX_BYTES", 1000)
    far2 = Far()
    b2 = Batcher(far2, "op")  # type: ignore[arg-type]

    async def moves() -> list[Any]:
        return await asyncio.gather(
            *(b2.call(1.0, op="move", flow=f"m{i}", blob=b"x" * 400) for i in range(5))
        )

    assert len(asyncio.run(moves())) == 5
    assert [len(c.get("requests", [c])) for c in far2.calls] == [3, 2]


def test_a_failure_of_the_far_side_still_answers_every_caller() -> None:
    far = Far(fail=KeyError("a bug"))
    b = Batcher(far, "cmd")  # type: ignore[arg-type]
    got = asyncio.run(asyncio.wait_for(together(b, ["f1", "f2", "f3"]), 5))
    assert all(isinstance(g, LinkError) and "internal error (KeyError)" in str(g) for g in got)


def test_a_caller_after_the_batch_left_starts_a_new_one() -> None:
    far = Far()
    b = Batcher(far, "cmd")  # type: ignore[arg-type]

    async def go() -> None:
        first = asyncio.ensure_future(b.call(1.0, cmd="park", flow="a"))
        second = asyncio.ensure_future(b.call(1.0, cmd="park", flow="b"))
        await asyncio.gather(first, second)
        await b.call(1.0, cmd="park", flow="c")

    asyncio.run(go())
    assert [c.get("requests") and len(c["requests"]) for c in far.calls] == [2, None]
