"""Keeping the steering node's table true to what a node serves.

A node lists every flow it serves (``sync``, in parts): the steering node steers to it what
it lists and drops stale entries that point at it. That happens on start, when the
steering daemon restarted (a new boot id in its hello), after it was unreachable, and every
``interval``. The agent runs one; an agent with workers runs one in its supervisor, for the
union of its workers' flows (a worker's list alone would have the others' entries dropped).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from pysteer.agent.links import LinkError, Refused

if TYPE_CHECKING:
    from pysteer.agent.links import LinkPool

log = logging.getLogger("pysteer.agent")

HEARTBEAT = 1.0  # seconds between hellos to the steering node (a restart shows as a new boot)
SYNC_PART = 8000  # flows per sync request (the steering daemon takes at most 1 MiB)


class NotNow(Exception):
    """The node cannot list its flows this round (a worker did not answer): no sync, so
    nothing of what it serves is taken for stale."""


class Reconciler:
    def __init__(
        self,
        steer: LinkPool,
        host: str,
        served: Callable[[], Awaitable[list[str]]],
        interval: float,
    ) -> None:
        self.steer, self.host, self.served, self.interval = steer, host, served, interval
        self.boot: str | None = None  # the steering daemon's boot id, last seen

    async def sync(self) -> tuple[int, dict[str, Any]]:
        """One full sync: how many flows were listed, and the steering node's answer. Each
        part says how old the list is, so the steering node leaves alone what changed
        since (a move that committed while the list was on its way)."""
        loop = asyncio.get_running_loop()
        listed = loop.time()  # before asking: a list gathered from workers is older still
        flows = await self.served()
        parts = [flows[i : i + SYNC_PART] for i in range(0, len(flows), SYNC_PART)] or [[]]
        answer: dict[str, Any] = {}
        for i, part in enumerate(parts):
            answer = await self.steer.call(
                10.0,
                cmd="sync",
                host=self.host,
                flows=part,
                interval=self.interval,
                part=i,
                done=i == len(parts) - 1,
                age=round(loop.time() - listed, 3),
            )
        return len(flows), answer

    async def run(self, stop: asyncio.Event) -> None:
        """Hello every second, and a full sync when one is due, until ``stop``."""
        loop = asyncio.get_running_loop()
        next_full, failing = 0.0, False
        while not stop.is_set():
            try:
                hello = await self.steer.call(2.0, cmd="hello")
                boot = hello.get("boot")
                restarted = self.boot is not None and boot != self.boot
                if restarted or failing or loop.time() >= next_full:
                    listed, result = await self.sync()
                    next_full = loop.time() + self.interval
                    steered, removed = result.get("steered", []), result.get("removed", [])
                    if restarted or failing or steered or removed:
                        log.info(
                            "reconciled with the steering node%s: %d flow(s) served here, "
                            "%d steered to us, %d stale entr(ies) removed",
                            " (it restarted)" if restarted else "",
                            listed,
                            len(steered),
                            len(removed),
                        )
                self.boot, failing = boot, False
            except (LinkError, Refused) as exc:
                if not failing:
                    log.warning("steering node unreachable: %s", exc)
                failing = True
            except NotNow as exc:
                log.warning("no sync with the steering node this round: %s", exc)
            await asyncio.sleep(HEARTBEAT)
