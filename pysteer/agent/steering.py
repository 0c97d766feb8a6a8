"""The steering nodes an agent talks to, as its cluster file lists them.

One link pool per steering node; the group that asks them all at once (and its batching
twin, for drains); and, where this process keeps the steering nodes' tables true (an
agent alone, or a supervisor for its workers), one reconciler each. ``update`` takes the
list again (SIGHUP after the file changed: a steering node joins or leaves): a node
added is dialled from then on, a removed one's links close, the rest stay as they are.
A migration keeps the group it started with.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pysteer.agent.batcher import Batcher
from pysteer.agent.links import LinkPool
from pysteer.agent.reconcile import Reconciler
from pysteer.agent.steer_group import SteerGroup
from pysteer.cluster.config import NodeConfig

log = logging.getLogger("pysteer.agent")


@dataclass
class _Member:
    control: tuple[str, int]
    pool: LinkPool
    stop: asyncio.Event | None = None


class Steering:
    def __init__(
        self,
        steers: tuple[NodeConfig, ...],
        make_pool: Callable[[NodeConfig], LinkPool],
        *,
        host: str,
        served: Callable[[], Awaitable[list[str]]],
        interval: float,
    ) -> None:
        self._make_pool, self.host, self.served, self.interval = make_pool, host, served, interval
        self.members: dict[str, _Member] = {}
        self._spawn: Callable[[Any], Any] | None = None
        self.group = self.batch = SteerGroup({"-": _Nobody()})
        self.update(steers)

    def update(self, steers: tuple[NodeConfig, ...]) -> list[str]:
        """Take the list of steering nodes; what changed, in words (empty: nothing)."""
        wanted = {s.name: s for s in steers}
        changes = []
        for name in list(self.members):
            if name not in wanted or wanted[name].control != self.members[name].control:
                self._drop(name)
                changes.append(f"{name} left")
        for name, spec in wanted.items():
            if name not in self.members:
                self.members[name] = _Member(spec.control, self._make_pool(spec))
                changes.append(f"{name} joined")
                if self._spawn is not None:
                    self._reconcile(name)
        order = [s.name for s in steers]
        pools = {n: self.members[n].pool for n in order}
        self.group = SteerGroup(dict(pools))
        self.batch = SteerGroup({n: Batcher(p, "cmd") for n, p in pools.items()})
        return changes

    def reconcile(self, spawn: Callable[[Any], Any]) -> None:
        """Keep every steering node's table true to what this node serves (a task each)."""
        self._spawn = spawn
        for name in self.members:
            self._reconcile(name)

    def _reconcile(self, name: str) -> None:
        assert self._spawn is not None  # noqa: S101
        member = self.members[name]
        member.stop = asyncio.Event()
        reconciler = Reconciler(member.pool, self.host, self.served, self.interval)
        self._spawn(reconciler.run(member.stop))

    def stop(self) -> None:
        for member in self.members.values():
            if member.stop is not None:
                member.stop.set()

    def _drop(self, name: str) -> None:
        member = self.members.pop(name)
        if member.stop is not None:
            member.stop.set()
        member.pool.close()


class _Nobody:
    """Before the first update: never asked."""

    async def call(self, timeout: float, **request: Any) -> dict[str, Any]:
        raise RuntimeError("no steering node yet")

    async def connect(self, timeout: float) -> None:
        raise RuntimeError("no steering node yet")
