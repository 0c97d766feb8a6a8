"""Draining a host: every flow moves to another node, and new connections go there too.

The agent that drains first makes the steering node divert new connections (their SYN)
for every VIP to the target, and refuses imports itself; then it moves its flows in
batches, each batch's migrations running concurrently. A stop request (the CLI's Ctrl-C,
or the CLI going away) ends it after the batch in flight: every migration ends with its
flow on exactly one node, and the summary lists the flows still here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from pysteer.agent.links import LinkError, Refused
from pysteer.agent.overrides import StoreRefused
from pysteer.migration.timeline import step_durations

if TYPE_CHECKING:
    from pysteer.agent.migrate import Node

# Moves one flow: (flow, target, timeout, hello=the target's hello) -> its report.
MoveOne = Callable[..., Awaitable[dict[str, Any]]]

MAX_ROUNDS = 5  # connections that arrived just before the divert get this many passes


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 3)


class DrainError(RuntimeError):
    """The drain could not start; nothing was changed."""


class Drain:
    def __init__(
        self,
        node: Node,
        move: MoveOne,
        target: str,
        batch: int,
        timeout: float,
        *,
        stop: asyncio.Event,
        progress: Callable[[dict[str, Any]], Awaitable[None]],
    ) -> None:
        self.node, self.move = node, move
        self.target, self.batch, self.timeout = target, batch, timeout
        self.stop, self.progress = stop, progress
        self.results: list[dict[str, Any]] = []
        self.hello: dict[str, Any] = {}
        self.unmovable: dict[str, str] = {}  # flow -> why it can never move (a tunnel)

    async def start(self) -> None:
        """Check the target, divert new connections to it and stop taking imports."""
        node = self.node
        try:
            hello = await node.peers[self.target][0].call(self.timeout, op="hello")
        except (LinkError, Refused) as exc:
            raise DrainError(f"node {self.target} is unreachable: {exc}") from None
        if not hello.get("accepting"):
            raise DrainError(f"node {self.target} refuses imports (cordoned)")
        self.hello = hello
        keeper = node.overrides
        try:  # first in the store, which steering nodes that restart or join read
            for vip in node.runtime.addresses:
                if keeper is not None:
                    await keeper.divert(vip, self.target)
        except StoreRefused as exc:
            raise DrainError(f"{exc}; nothing was changed") from None
        node.accepting = False
        try:
            for vip in node.runtime.addresses:
                await node.steer.call(self.timeout, cmd="divert", address=vip, host=self.target)
        except (LinkError, Refused) as exc:
            node.accepting = True
            raise DrainError(f"steering node: {exc}") from None
        node.admit(accepting=False, drained_to=self.target)

    async def run(self) -> dict[str, Any]:
        started = time.perf_counter()
        total = len(self.node.runtime.connections)
        for _ in range(MAX_ROUNDS):
            flows = [
                c.flow
                for c in list(self.node.runtime.connections.values())
                if c.flow and str(c.flow) not in self.unmovable
            ]
            if not flows or self.stop.is_set():
                break
            total = max(total, len(self.results) + len(flows))
            for i in range(0, len(flows), self.batch):
                if self.stop.is_set():
                    break
                batch = flows[i : i + self.batch]
                reports = await asyncio.gather(
                    *(
                        self.move(f, self.target, self.timeout, hello=self.hello, batch=True)
                        for f in batch
                    )
                )
                self.results += reports
                for r in reports:  # asked once: not again in the next rounds
                    if r["outcome"] == "not-movable":
                        self.unmovable[r["flow"]] = r["error"] or "not movable"
                await self.progress(self._counts() | {"total": total})
        return self._summary(time.perf_counter() - started)

    def _counts(self) -> dict[str, int]:
        outcomes = [r["outcome"] for r in self.results]
        moved, back = outcomes.count("moved"), outcomes.count("rolled-back")
        unmovable = outcomes.count("not-movable")
        return {
            "moved": moved,
            "rolled_back": back,
            "not_movable": unmovable,
            "failed": len(outcomes) - moved - back - unmovable,
        }

    def _summary(self, seconds: float) -> dict[str, Any]:
        freeze = [r["freeze_ms"] for r in self.results if r["freeze_ms"] is not None]
        remaining = sorted(str(c.flow) for c in self.node.runtime.connections.values())
        counts = self._counts()
        return counts | {
            "from": self.node.name,
            "to": self.target,
            "interrupted": self.stop.is_set(),
            "seconds": round(seconds, 3),
            "per_second": round(counts["moved"] / seconds, 1) if seconds > 0 else None,
            "freeze_ms": {
                "p50": percentile(freeze, 0.5),
                "p90": percentile(freeze, 0.9),
                "p99": percentile(freeze, 0.99),
                "max": round(max(freeze), 3) if freeze else None,
            },
            "steps_ms": step_durations(r["timeline"] for r in self.results),
            "remaining": remaining,
            "not_movable_flows": [
                {"flow": flow, "reason": why}
                for flow, why in sorted(self.unmovable.items())
                if flow in remaining
            ],
            "not_moved": [
                {"flow": r["flow"], "outcome": r["outcome"], "error": r["error"]}
                for r in self.results
                if r["outcome"] not in ("moved", "not-movable")
            ],
        }
