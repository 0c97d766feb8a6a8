"""Notices to every steering node (pysteer.agent.notices): a queue per node, so one that
is down delays only its own, kept until it answers."""

from __future__ import annotations

import asyncio
from typing import Any

from pysteer.agent import notices
from pysteer.agent.links import LinkError
from pysteer.agent.notices import Notifier


class Pool:
    def __init__(self) -> None:
        self.down = False
        self.got: list[list[str]] = []

    async def call(self, timeout: float, **request: Any) -> dict[str, Any]:
        if self.down:
            raise LinkError("down")
        self.got.append(request["flows"])
        return {"ok": True}


def test_a_steering_node_that_is_down_gets_its_notices_later(monkeypatch: Any) -> None:
    monkeypatch.setattr(notices, "GATHER", 0.01)
    monkeypatch.setattr(notices, "RETRY", 0.05)
    up, down = Pool(), Pool()
    down.down = True
    n = Notifier("closed", "a", lambda: {"s1": up, "s2": down}, 100)

    async def go() -> None:
        stop = asyncio.Event()
        task = asyncio.ensure_future(n.run(stop))
        n.add("f1")
        n.add("f2")
        await asyncio.sleep(0.1)
        assert up.got == [["f1", "f2"]] and down.got == []
        assert n.pending() == {"s1": 0, "s2": 2}
        n.add("f3")
        await asyncio.sleep(0.1)
        assert up.got == [["f1", "f2"], ["f3"]]
        down.down = False
        await asyncio.sleep(0.2)
        assert down.got == [["f1", "f2", "f3"]] and n.pending() == {"s1": 0, "s2": 0}
        stop.set()
        n.add("f4")  # wakes it to see the stop
        await asyncio.wait_for(task, 1)

    asyncio.run(go())


def test_the_queues_are_bounded(monkeypatch: Any) -> None:
    monkeypatch.setattr(notices, "GATHER", 0.01)
    monkeypatch.setattr(notices, "RETRY", 0.02)
    down = Pool()
    down.down = True
    n = Notifier("closed", "a", lambda: {"s1": down}, 5)

    async def go() -> None:
        task = asyncio.ensure_future(n.run(asyncio.Event()))
        for i in range(3):
            n.add(f"f{i}")
        await asyncio.sleep(0.05)
        for i in range(3, 9):
            n.add(f"f{i}")
        await asyncio.sleep(0.1)
        task.cancel()

    asyncio.run(go())
    assert n.pending()["s1"] == 5 and n.dropped == 4  # the oldest went first
