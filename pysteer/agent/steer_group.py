"""Every steering node as one: a request goes to all of them at once, and their answers
make one.

Behind a router's ECMP a flow's packets may reach any steering node (the one its hash
picks, another once that one is gone), so a migration parks, claims and reverts on all of
them, in parallel: the freeze holds one round trip however many there are. Each node
decides a migration's outcome on its own (claimed, or rolled back); the rule that makes
one outcome of those is *any commit wins*:

- ``claim``: the target serves the flow if one node gave it the flow. A node that
  refused (its lease ran out first) or did not answer learns it from the shared store,
  whose override every node mirrors;
- ``decision``: committed if any node says so; aborted only when every node says so;
- ``revert``: a node that says ``committed`` wins over the others' rollback, so the
  source releases (and does not resume) whenever the target may be serving.

Anything else (``park``, ``sync``, ``closed``, ``divert``...) needs every node: a refusal
or a node that does not answer fails the whole request, so a migration is refused before
anything is frozen when one steering node is unreachable. With one steering node the
group is that node, unchanged.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from pysteer.agent.links import LinkError, Refused


class Caller(Protocol):
    async def call(self, timeout: float, **request: Any) -> dict[str, Any]: ...

    async def connect(self, timeout: float) -> None: ...


class SteerGroup:
    """``members``: steering node name -> its link pool (or batcher), first one first."""

    def __init__(self, members: dict[str, Caller]) -> None:
        if not members:
            raise ValueError("no steering node")
        self.members = members
        self._only = next(iter(members.values())) if len(members) == 1 else None
        self._late: set[asyncio.Future] = set()  # claims still out after one won

    async def connect(self, timeout: float) -> None:
        if self._only is not None:
            return await self._only.connect(timeout)
        results = await asyncio.gather(
            *(m.connect(timeout) for m in self.members.values()), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return None

    async def call(self, timeout: float, **request: Any) -> dict[str, Any]:
        if self._only is not None:
            return await self._only.call(timeout, **request)
        cmd = str(request.get("cmd"))
        tasks = {
            asyncio.ensure_future(m.call(timeout, **request)): n for n, m in self.members.items()
        }
        if cmd == "claim":  # the first node that gives it commits: answer then
            pending = set(tasks)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                won = [t for t in done if not t.cancelled() and t.exception() is None]
                if won:
                    for task in pending:  # the rest still claim, unwaited
                        self._late.add(task)
                        task.add_done_callback(self._settled)
                    return _combined({tasks[won[0]]: won[0].result()})
        await asyncio.wait(tasks)
        results = {n: (t.exception() or t.result()) for t, n in tasks.items()}
        return merge(cmd, results)

    def _settled(self, task: asyncio.Future) -> None:
        self._late.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a late claim's refusal is no error here


def merge(cmd: str, results: dict[str, Any]) -> dict[str, Any]:
    """One answer from each node's (an answer, or the Refused or LinkError it raised)."""
    oks = {n: r for n, r in results.items() if isinstance(r, dict)}
    refused = [r for r in results.values() if isinstance(r, Refused)]
    lost = [r for r in results.values() if isinstance(r, LinkError)]
    for r in results.values():
        if isinstance(r, BaseException) and not isinstance(r, Refused | LinkError):
            raise r  # a bug, not an answer
    decided = _RULES.get(cmd, _all)(oks, refused, lost)
    if decided is not None:
        return decided
    if refused:
        raise refused[0]
    if lost:
        raise lost[0]
    return _combined(oks)


Rule = Any  # (oks, refused, lost) -> an answer, or None for the common rule


def _all(oks: dict[str, Any], refused: list[Refused], lost: list[LinkError]) -> None:
    """Every node must say yes: any refusal, then any silence, fails the request."""
    return None


def _claim(oks: dict[str, Any], refused: list[Refused], lost: list[LinkError]) -> Any:
    if oks:
        return _combined(oks)
    if lost:  # a silent node may have given it: ask again (a claim is idempotent)
        raise lost[0]
    return None


def _decision(oks: dict[str, Any], refused: list[Refused], lost: list[LinkError]) -> Any:
    committed = [r for r in oks.values() if r.get("decision") == "committed"]
    if committed:
        return committed[0]
    if lost or refused:
        return None
    if all(r.get("decision") == "aborted" for r in oks.values()):
        return _combined(oks)
    return {"ok": True, "decision": "pending"}


def _revert(oks: dict[str, Any], refused: list[Refused], lost: list[LinkError]) -> None:
    won = [r for r in refused if r.code == "committed"]
    if won:
        raise won[0]
    if lost:
        raise lost[0]


_RULES: dict[str, Rule] = {"claim": _claim, "decision": _decision, "revert": _revert}


def _combined(oks: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The first node's answer, with what adds up added up: packets replayed, the
    longest park, and every node's boot id (so that a restart of any one shows)."""
    answers = list(oks.values())
    out = dict(answers[0])
    if len(answers) > 1:
        if any("replayed" in a for a in answers):
            out["replayed"] = sum(int(a.get("replayed") or 0) for a in answers)
        parked = [a["parked_ms"] for a in answers if isinstance(a.get("parked_ms"), int | float)]
        if parked:
            out["parked_ms"] = max(parked)
        if "boot" in out:
            out["boot"] = "+".join(f"{n}:{a.get('boot')}" for n, a in oks.items())
    return out
