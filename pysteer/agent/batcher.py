"""Coalescing the requests that many migrations make at the same moment into one.

A drain runs its flows' migrations side by side; each machine asks for its own park,
move, claim or revert. Sent one by one, every request costs a round trip and the
other side's per-request work (a TLS record, a parse, a thread wake-up), which is most of
a drain's CPU. ``Batcher.call`` looks like ``LinkPool.call``, but the requests made in
the same few event-loop turns leave as one ``batch`` request, and each caller gets its
own answer (or refusal) back. The machines stay one per flow; only the transport batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

from pysteer.agent.links import LinkError, LinkPool, Refused

log = logging.getLogger("pysteer.agent")

MAX_ITEMS = 256  # per batch (the steering daemon takes at most this many)
MAX_BYTES = 8 << 20  # of blobs per batch: a backed-up flow's blob goes nearly alone
MAX_WAIT = 0.001  # seconds the first request waits for others to join it


@dataclass
class _Waiting:
    request: dict[str, Any]
    timeout: float
    answer: asyncio.Future[dict[str, Any]] = field(repr=False)
    size: int = 0


class Batcher:
    """Requests to one peer (``key``: ``cmd`` for the steering node, ``op`` for agents)."""

    def __init__(self, pool: LinkPool, key: str) -> None:
        self.pool, self.key = pool, key
        self.name = pool.name
        self._pending: list[_Waiting] = []
        self._size = 0
        self._seen = 0
        self._first = 0.0
        self._scheduled = False
        self._tasks: set[asyncio.Task] = set()
        self.sent = 0  # batches sent (for tests and stats)

    async def connect(self, timeout: float) -> None:
        await self.pool.connect(timeout)

    async def call(self, timeout: float, **request: Any) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        waiting = _Waiting(request, timeout, loop.create_future(), len(request.get("blob") or b""))
        self._pending.append(waiting)
        self._size += waiting.size
        if self._size >= MAX_BYTES or len(self._pending) >= MAX_ITEMS:
            self._flush()
        elif not self._scheduled:
            self._scheduled = True
            self._first = loop.time()
            self._seen = len(self._pending)
            loop.call_soon(self._tick)
        return await waiting.answer

    def _tick(self) -> None:
        """Once per loop turn: send when a turn passed with nobody joining, or MAX_WAIT."""
        if not self._pending:
            self._scheduled = False
            return
        loop = asyncio.get_running_loop()
        if len(self._pending) > self._seen and loop.time() - self._first < MAX_WAIT:
            self._seen = len(self._pending)
            loop.call_soon(self._tick)
            return
        self._flush()

    def _flush(self) -> None:
        batch, self._pending, self._size = self._pending, [], 0
        self._scheduled = False
        if batch:
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[_Waiting]) -> None:
        """Send, and settle every caller whatever happens: none may wait forever."""
        try:
            await self._exchange(batch)
        except Exception as exc:  # a bug: each caller gets a link error, then decides
            log.exception("a batch of %d request(s) to %s failed", len(batch), self.name)
            for w in batch:
                _fail(w, LinkError(f"{self.name}: internal error ({type(exc).__name__})"))
        except BaseException:  # cancelled (the agent stops): nobody is left waiting
            for w in batch:
                _fail(w, LinkError(f"{self.name}: the agent is stopping"))
            raise

    async def _exchange(self, batch: list[_Waiting]) -> None:
        self.sent += 1
        if len(batch) == 1:
            one = batch[0]
            try:
                _settle(one, await self.pool.call(one.timeout, **one.request))
            except (LinkError, Refused) as exc:
                _fail(one, exc)
            return
        timeout = max(w.timeout for w in batch)
        try:
            answer = await self.pool.call(
                timeout, **{self.key: "batch", "requests": [w.request for w in batch]}
            )
            answers = answer.get("answers")
            if not isinstance(answers, list) or len(answers) != len(batch):
                raise LinkError(f"{self.name}: a batch answer that does not match its requests")
        except (LinkError, Refused) as exc:  # the whole batch: each caller decides alone
            for w in batch:
                _fail(w, exc if isinstance(exc, LinkError) else LinkError(str(exc)))
            return
        for w, a in zip(batch, answers, strict=True):
            if isinstance(a, dict) and a.get("ok"):
                _settle(w, a)
            else:
                error = a.get("error", "refused") if isinstance(a, dict) else "refused"
                code = a.get("code") if isinstance(a, dict) else None
                _fail(w, Refused(f"{self.name}: {error}", code if isinstance(code, str) else None))


def _settle(w: _Waiting, answer: dict[str, Any]) -> None:
    with contextlib.suppress(asyncio.InvalidStateError):  # its caller was cancelled
        w.answer.set_result(answer)


def _fail(w: _Waiting, exc: Exception) -> None:
    with contextlib.suppress(asyncio.InvalidStateError):
        w.answer.set_exception(exc)
