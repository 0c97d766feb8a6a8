"""Several steering nodes asked as one (pysteer.agent.steer_group): every node gets each
request at once, and the answers make one by the rule "any commit wins"."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from pysteer.agent.links import LinkError, Refused
from pysteer.agent.steer_group import SteerGroup, merge

OK = {"ok": True}


class Node:
    """A steering node that answers each command as told, and records what it got."""

    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers, self.got = answers, []

    async def call(self, timeout: float, **request: Any) -> dict[str, Any]:
        self.got.append(request["cmd"])
        await asyncio.sleep(0.01)
        answer = self.answers.get(request["cmd"], OK)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    async def connect(self, timeout: float) -> None:
        if isinstance(self.answers.get("connect"), BaseException):
            raise self.answers["connect"]


def test_every_node_gets_the_request_at_once() -> None:
    nodes = {"s1": Node({}), "s2": Node({})}
    group = SteerGroup(nodes)

    async def go() -> float:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await group.call(1.0, cmd="park", flow="f")
        return loop.time() - t0

    took = asyncio.run(go())
    assert nodes["s1"].got == nodes["s2"].got == ["park"]
    assert took < 0.018  # in parallel: one node's 10 ms, not two


def test_one_node_is_asked_as_it_is() -> None:
    refusal = Refused("no", "aborted")
    group = SteerGroup({"s1": Node({"claim": refusal})})
    with pytest.raises(Refused) as caught:
        asyncio.run(group.call(1.0, cmd="claim"))
    assert caught.value is refusal


def test_a_park_needs_every_node() -> None:
    lost = LinkError("steering node s2 at 10.0.0.2:7700: no answer within 1 s")
    with pytest.raises(LinkError, match="s2"):
        merge("park", {"s1": {"ok": True, "was": None}, "s2": lost})
    with pytest.raises(Refused, match="conflict"):
        merge("park", {"s1": OK, "s2": Refused("conflict", "conflict"), "s3": lost})


def test_a_claim_any_node_gave_commits() -> None:
    answer = merge(
        "claim",
        {
            "s1": {"ok": True, "replayed": 2, "parked_ms": 0.8},
            "s2": Refused("rolled back", "aborted"),
            "s3": {"ok": True, "replayed": 1, "parked_ms": 1.1},
        },
    )
    assert answer["replayed"] == 3 and answer["parked_ms"] == 1.1
    with pytest.raises(LinkError):  # nobody gave it, somebody silent: ask again
        merge("claim", {"s1": Refused("x", "aborted"), "s2": LinkError("lost")})
    with pytest.raises(Refused):
        merge("claim", {"s1": Refused("x", "aborted"), "s2": Refused("y", "absent")})


def test_a_revert_loses_to_any_commit() -> None:
    won = Refused("committed: b serves it", "committed")
    with pytest.raises(Refused) as caught:
        merge("revert", {"s1": OK, "s2": won})
    assert caught.value.code == "committed"
    with pytest.raises(LinkError):
        merge("revert", {"s1": OK, "s2": LinkError("lost")})
    assert merge("revert", {"s1": {"ok": True, "replayed": 1}, "s2": {"ok": True}})["replayed"] == 1


@pytest.mark.parametrize(
    ("answers", "decision"),
    [
        ({"s1": "aborted", "s2": "committed"}, "committed"),
        ({"s1": "aborted", "s2": "aborted"}, "aborted"),
        ({"s1": "aborted", "s2": "pending"}, "pending"),
        ({"s1": "unknown", "s2": "aborted"}, "pending"),
    ],
)
def test_a_decision_is_committed_if_any_aborted_only_if_all(
    answers: dict[str, str], decision: str
) -> None:
    results = {n: {"ok": True, "decision": d, "host": "b"} for n, d in answers.items()}
    assert merge("decision", results)["decision"] == decision


def test_a_decision_with_a_silent_node_is_not_aborted() -> None:
    results: dict[str, Any] = {"s1": {"ok": True, "decision": "aborted"}, "s2": LinkError("x")}
    with pytest.raises(LinkError):
        merge("decision", results)
    results["s2"] = {"ok": True, "decision": "committed", "host": "b"}
    assert merge("decision", results)["decision"] == "committed"


def test_every_boot_shows_so_a_restart_of_any_node_is_seen() -> None:
    answer = merge("hello", {"s1": {"ok": True, "boot": "x1"}, "s2": {"ok": True, "boot": "y2"}})
    assert answer["boot"] == "s1:x1+s2:y2"


def test_a_bug_is_raised_not_merged() -> None:
    with pytest.raises(ZeroDivisionError):
        merge("park", {"s1": OK, "s2": ZeroDivisionError()})


def test_connect_fails_with_the_node_that_cannot_be_reached() -> None:
    group = SteerGroup({"s1": Node({}), "s2": Node({"connect": LinkError("s2 down")})})
    with pytest.raises(LinkError, match="s2 down"):
        asyncio.run(group.connect(1.0))


def test_a_claim_answers_at_the_first_node_that_gives_it() -> None:
    """A slow or dead steering node does not hold the freeze: the claim still reaches it,
    unwaited (the store tells it the outcome anyway)."""

    class Slow(Node):
        async def call(self, timeout: float, **request: Any) -> dict[str, Any]:
            self.got.append(request["cmd"])
            await asyncio.sleep(0.5)
            raise LinkError("s2: no answer")

    slow = Slow({})
    group = SteerGroup({"s1": Node({"claim": {"ok": True, "replayed": 1}}), "s2": slow})

    async def go() -> tuple[dict[str, Any], float]:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        answer = await group.call(1.0, cmd="claim")
        took = loop.time() - t0
        await asyncio.sleep(0.6)  # the late claim ends, its error retrieved
        return answer, took

    answer, took = asyncio.run(go())
    assert answer["replayed"] == 1 and took < 0.1
    assert slow.got == ["claim"] and not group._late
