"""Notices from an agent to every steering node, in batches: the connections that ended
here (their entries go), and, with several steering nodes, those that began here (a
drain's diversion entered them at one steering node only, the one their SYN reached; the
others must steer them here too before the router may send them there).

A queue per steering node: one that is down delays only its own notices, which are kept
(bounded, oldest dropped first) and sent when it answers again; the periodic sync
repairs whatever was dropped.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from pysteer.agent.links import LinkError, Refused

log = logging.getLogger("pysteer.agent")

BATCH = 2000  # flows per notice
GATHER = 0.2  # seconds to gather a batch
RETRY = 1.0  # seconds before a steering node that did not answer is tried again


class Notifier:
    """``cmd`` (``closed`` or ``opened``) for ``host``, to ``members()`` (steering node
    name -> its link pool, asked each round: the list can change on SIGHUP)."""

    def __init__(
        self, cmd: str, host: str, members: Callable[[], dict[str, Any]], maxlen: int
    ) -> None:
        self.cmd, self.host, self.members, self.maxlen = cmd, host, members, maxlen
        self._intake: deque[str] = deque(maxlen=maxlen)
        self._queues: dict[str, deque[str]] = {}
        self._event = asyncio.Event()
        self.dropped = 0

    def add(self, flow: str) -> None:
        if len(self._intake) == self.maxlen:
            self.dropped += 1
        self._intake.append(flow)
        self._event.set()

    def pending(self) -> dict[str, int]:
        return {name: len(q) for name, q in self._queues.items()}

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self._event.wait()
            self._event.clear()
            await asyncio.sleep(GATHER)
            members = self.members()
            for name in list(self._queues):
                if name not in members:  # it left the cluster file
                    del self._queues[name]
            fresh = list(self._intake)
            self._intake.clear()
            for name in members:
                queue = self._queues.setdefault(name, deque(maxlen=self.maxlen))
                if len(queue) + len(fresh) > self.maxlen:
                    self.dropped += len(queue) + len(fresh) - self.maxlen
                queue.extend(fresh)
            results = await asyncio.gather(
                *(self._send(name, pool) for name, pool in members.items())
            )
            if not all(results):
                await asyncio.sleep(RETRY)
                self._event.set()

    async def _send(self, name: str, pool: Any) -> bool:
        """Everything queued for steering node ``name``; False if it did not answer."""
        queue = self._queues.get(name)
        while queue:
            batch = [queue.popleft() for _ in range(min(BATCH, len(queue)))]
            try:
                await pool.call(5.0, cmd=self.cmd, host=self.host, flows=batch)
            except Refused as exc:
                log.warning(
                    "steering node %s refused %d %s notice(s): %s", name, len(batch), self.cmd, exc
                )
            except LinkError:
                queue.extendleft(reversed(batch))  # kept (bounded) for later
                return False
        return True
