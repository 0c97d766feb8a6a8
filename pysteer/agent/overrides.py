"""The agent's side of the shared store (etcd): which host serves each moved flow.

A move reads the flow's version before anything is frozen (no store, no move: nothing
to undo), and after the commit both sides write the same override with a transaction
that compares that version: the source before it lets its frozen socket go, the target
in the background until it lands (it covers a source that died after the switch). The
host that serves a moved flow removes its override when the connection ends, comparing
the value it wrote, so it never removes a newer one.

No etcd round trip sits inside the freeze: the steering nodes are switched directly, and
each mirrors the store into its own maps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from pysteer.store.errors import Conflict, StoreError, StoreUnavailable
from pysteer.store.keys import Override

if TYPE_CHECKING:
    from pysteer.store.etcd import Store

log = logging.getLogger("pysteer.agent")

MAX_PENDING = 100_000  # writes and removals kept while the store is unreachable
RETRY_MIN, RETRY_MAX = 0.2, 5.0
PARALLEL = 16  # store calls in flight at once from the background tasks


class StoreRefused(RuntimeError):
    """A move cannot start: the store cannot say (or is about to change) where it is."""


def by_of(token: int) -> str:
    """A migration's name in an override: its steering token as 16 hex digits."""
    return f"{token:016x}"


class OverrideKeeper:
    """The overrides this node writes and removes. ``store`` None: no shared store (one
    steering node); every call is then a no-op that says so."""

    def __init__(self, store: Store | None, me: str) -> None:
        self.store, self.me = store, me
        self._pending: dict[str, tuple[Override, int]] = {}  # flow -> (override, expect)
        self._mine: dict[str, Override] = {}  # flows served here since a move: their value
        self._gone: deque[Override] = deque(maxlen=MAX_PENDING)  # to remove
        self._admission: tuple[bool, str | None] | None = None  # to record
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._slots = asyncio.Semaphore(PARALLEL)
        self.counts: dict[str, int] = {"written": 0, "already": 0, "superseded": 0}
        self.counts |= {"removed": 0, "remove_skipped": 0, "dropped": 0, "unavailable": 0}

    @property
    def enabled(self) -> bool:
        return self.store is not None

    def start(self) -> None:
        if self.store is not None and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._background())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.store is not None:
            await self.store.close()

    # --- a move -------------------------------------------------------------------------
    async def lookup(self, flow: str) -> int:
        """The flow's version now (0: no override). StoreRefused if the store cannot
        answer, or this node still owes it the flow's last move."""
        assert self.store is not None  # noqa: S101
        if flow in self._pending:
            raise StoreRefused(
                f"the shared store has not yet recorded the last move of {flow} here "
                "(it is retried): try again"
            )
        try:
            found = await self.store.get_override(flow)
        except StoreError as exc:
            self.counts["unavailable"] += 1
            raise StoreRefused(f"the shared store cannot be read ({exc})") from None
        return found.revision if found is not None else 0

    async def record(self, override: Override, expect: int) -> str:
        """Write ``override`` if the flow is still at version ``expect``: ``written``,
        ``already`` (the other side of the move wrote it) or ``superseded`` (a later move
        of the flow did: nothing to write). StoreUnavailable if there was no answer."""
        assert self.store is not None  # noqa: S101
        try:
            await self.store.put_override(override, expect=expect)
            how = "written"
        except Conflict as exc:
            cur = exc.current
            mine = cur is not None and (cur.host, cur.by) == (override.host, override.by)
            how = "already" if mine else "superseded"
        self.counts[how] += 1
        return how

    def keep(self, override: Override, expect: int) -> None:
        """Write it in the background until it lands (the target's copy of the write)."""
        if self.store is None:
            return
        if len(self._pending) >= MAX_PENDING and override.flow not in self._pending:
            self.counts["dropped"] += 1
            log.error("store: %d writes pending; %s is not kept", MAX_PENDING, override.flow)
            return
        self._pending[override.flow] = (override, expect)
        self._wake.set()

    # --- a drain's diversion ----------------------------------------------------------------
    async def divert(self, address: str, host: str | None) -> None:
        """Record (or, with None, remove) that new connections to VIP ``address`` go to
        ``host``: a steering node that restarts or joins during a drain learns it there.
        StoreRefused if the store cannot answer."""
        if self.store is None:
            return
        try:
            if host is None:
                await self.store.delete_diversion(address)
            else:
                await self.store.put_diversion(address, host)
        except StoreError as exc:
            raise StoreRefused(f"the shared store cannot record it ({exc})") from None

    # --- the node's admission (cordon, drain) -----------------------------------------------
    def keep_admission(self, accepting: bool, drained_to: str | None) -> None:
        """Record this node's admission in the background until it lands (the latest
        one wins): the local file stays the node's own record."""
        if self.store is not None:
            self._admission = (accepting, drained_to)
            self._wake.set()

    async def stored_admission(self) -> tuple[bool, str | None] | None:
        """This node's admission as the store has it (None: none, or no answer)."""
        if self.store is None:
            return None
        try:
            return await self.store.get_admission(self.me)
        except StoreError as exc:
            log.warning("store: cannot read this node's admission (%s)", exc)
            return None

    # --- a connection's life ----------------------------------------------------------------
    def served(self, override: Override) -> None:
        """This node serves ``override.flow`` since that move: remove it at the end."""
        if self.store is not None:
            self._mine[override.flow] = override

    def moved_away(self, flow: str) -> None:
        """The flow left: its new host owns the override now."""
        self._mine.pop(flow, None)

    def closed(self, flow: str) -> None:
        """The connection ended here: its override goes (if still the one written)."""
        override = self._mine.pop(flow, None)
        if override is None:
            return
        self._pending.pop(flow, None)
        if len(self._gone) == self._gone.maxlen:
            self.counts["dropped"] += 1
        self._gone.append(override)
        self._wake.set()

    async def sweep(self, served: Callable[[], set[str]]) -> int:
        """Remove the overrides that name this node for flows it does not serve: those of
        connections that ended while it was down (a restart ends them all), or whose
        removal was lost. ``served`` is asked after the read, and each removal compares
        the value read, so an override written meanwhile is never removed. How many went."""
        assert self.store is not None  # noqa: S101
        found, _ = await self.store.overrides(bad=lambda _exc: None)
        mine = [o for o in found.values() if o.host == self.me]
        now = served()
        stale = [o for o in mine if o.flow not in now and o.flow not in self._pending]
        removed = 0
        for o in stale:
            async with self._slots:
                removed += await self.store.delete_override(o.flow, value=o)
        self.counts["swept"] = self.counts.get("swept", 0) + removed
        return removed

    def owed(self) -> int:
        return len(self._pending) + len(self._gone)

    # --- the background: pending writes and removals, retried --------------------------------
    async def _background(self) -> None:
        delay = RETRY_MIN
        while True:
            await self._wake.wait()
            self._wake.clear()
            failed = await self._flush()
            if failed:
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                self._wake.set()
            else:
                delay = RETRY_MIN

    async def _flush(self) -> bool:
        """One pass over what is owed; whether anything failed (to be retried)."""
        writes = list(self._pending.items())
        gone = [self._gone.popleft() for _ in range(len(self._gone))]
        admission = [self._admission] if self._admission is not None else []
        results = await asyncio.gather(
            *(self._guarded(self._write_one, flow, o, e) for flow, (o, e) in writes),
            *(self._guarded(self._remove_one, o) for o in gone),
            *(self._guarded(self._write_admission, a) for a in admission),
        )
        return not all(results)

    async def _write_admission(self, admission: tuple[bool, str | None]) -> None:
        assert self.store is not None  # noqa: S101
        await self.store.put_admission(self.me, *admission)
        if self._admission == admission:  # not changed meanwhile
            self._admission = None

    async def _guarded(self, fn: Callable[..., object], *args: object) -> bool:
        async with self._slots:
            try:
                await fn(*args)  # type: ignore[misc]
            except StoreError as exc:
                self.counts["unavailable"] += 1
                log.debug("store: %s", exc)
                return False
            return True

    async def _write_one(self, flow: str, override: Override, expect: int) -> None:
        how = await self.record(override, expect)  # unanswered: stays pending
        if self._pending.get(flow) == (override, expect):
            del self._pending[flow]
        if how == "superseded":
            log.info("store: %s moved on before this node's write landed", flow)

    async def _remove_one(self, override: Override) -> None:
        assert self.store is not None  # noqa: S101
        try:
            removed = await self.store.delete_override(override.flow, value=override)
        except StoreUnavailable:
            if override.flow not in self._mine:  # not served here again meanwhile
                self._gone.append(override)
            raise
        self.counts["removed" if removed else "remove_skipped"] += 1
