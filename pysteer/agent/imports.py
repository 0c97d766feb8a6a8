"""The asyncio adapter of a move's target side: carries out what ``migration.target.Target``
asks for (open the blob, restore, build, thaw, claim, serve, discard) and answers the
source. Its pieces are explicit (the node, the ledger, a counter), not the whole agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pysteer import tcp
from pysteer.agent.migrate import wait_for_event
from pysteer.agent.overrides import by_of
from pysteer.app.runtime import AdoptError, Connection, Exported
from pysteer.migration import target as tgt
from pysteer.migration.events import (
    Action,
    Answered,
    Call,
    Do,
    Event,
    Finish,
    Sleep,
    Unreachable,
)
from pysteer.migration.events import Refused as No
from pysteer.migration.source import token_of
from pysteer.migration.target import Target
from pysteer.store.keys import Override
from pysteer.transfer.blob import BlobError, MigrationBlob, open_sealed

if TYPE_CHECKING:
    from pysteer.agent.ledger import Ledger
    from pysteer.agent.migrate import Node

log = logging.getLogger("pysteer.agent")

CLAIM_PATIENCE = 4.0  # seconds a move waits on the steering node before answering "pending"
MAX_ACTIVE = 1024  # imports in progress at once: a peer's flood (a bug) cannot take it all
# A restored socket's timestamp clock starts this far past the source's at its dump, plus
# the time the blob took to arrive (up to MAX_CLOCK_GAP s): past the last delayed ACK the
# source's frozen socket can send (tcp.advance_clock), with room for the hosts' clocks
# disagreeing by a few hundred milliseconds.
TS_ADVANCE_MS = 1000.0
MAX_CLOCK_GAP = 10.0


@dataclass
class Import:
    """One move arriving here: its machine, and what it has built so far."""

    machine: Target
    data: bytes = field(repr=False)
    since: float = field(default_factory=time.time)
    batched: bool = False  # it came in a drain's batch: its claim leaves with the others'
    version: int | None = None  # the flow's version in the shared store (None: no store)
    blob: MigrationBlob | None = None
    sock: socket.socket | None = None
    conn: Connection | None = None
    task: asyncio.Task | None = None

    def describe(self, me: str) -> dict[str, Any]:
        return {
            "id": self.machine.mid.hex(),
            "flow": self.machine.flow,
            "from": self.machine.source,
            "to": me,
            "role": "target",
            "state": self.machine.state,
            "age_s": round(time.time() - self.since, 3),
            "error": None,
        }


class Imports:
    """Every move arriving at this node."""

    def __init__(self, node: Node, ledger: Ledger, count: Callable[[str], None]) -> None:
        self.node, self.ledger, self.count = node, ledger, count
        self.active: dict[bytes, Import] = {}
        self._steps = {
            tgt.OPEN: self._open,
            tgt.RESTORE: self._restore,
            tgt.BUILD: self._build,
            tgt.THAW: self._thaw,
            tgt.SERVE: self._serve,
            tgt.ABORTED: self._aborted,
            tgt.DISCARD: self._discard,
        }

    async def move(
        self,
        who: str,
        mid: bytes,
        data: Any,
        *,
        batched: bool = False,
        version: int | None = None,
    ) -> dict[str, Any]:
        """A source's ``move``: the answer once B serves the flow or has refused it, or
        ``pending`` if the steering node has not answered the claim within CLAIM_PATIENCE
        (the claim goes on; the source then asks the steering node who won)."""
        if not self.node.accepting:
            return {"ok": False, "error": "not accepting imports (cordoned)", "code": "aborted"}
        if not isinstance(data, bytes):
            return {"ok": False, "error": "move needs a sealed blob"}
        if mid in self.active:
            return {"ok": False, "error": "this migration is already arriving"}
        if len(self.active) >= MAX_ACTIVE:  # refused before anything is opened or recorded
            error = f"{self.node.name} is busy: {len(self.active)} imports in progress"
            return {"ok": False, "error": error, "code": "aborted"}
        entry = Import(Target(mid=mid, source=who, me=self.node.name), data, batched=batched)
        entry.version = version
        self.active[mid] = entry
        entry.task = asyncio.get_running_loop().create_task(self._drive(entry))
        try:
            return await asyncio.wait_for(asyncio.shield(entry.task), CLAIM_PATIENCE)
        except TimeoutError:
            return {
                "ok": False,
                "code": "pending",
                "error": "the steering node has not answered the claim yet",
            }

    def outcome(self, mid: bytes) -> dict[str, Any]:
        return {"ok": True, "outcome": self.ledger.outcome(mid)}

    def describe(self) -> list[dict[str, Any]]:
        return [e.describe(self.node.name) for e in self.active.values()]

    def force(self, prefix: str, keep: str) -> dict[str, Any] | None:
        """The operator decides a claiming import (its id starts with ``prefix``)."""
        for mid, entry in list(self.active.items()):
            if not mid.hex().startswith(prefix) or entry.machine.state != "claiming":
                continue
            if entry.task is not None:
                entry.task.cancel()
            self.active.pop(mid, None)
            actions, outcome = entry.machine.force(keep)
            for action in actions:
                assert isinstance(action, Do)  # noqa: S101
                self._steps[action.what](entry)
            log.warning(
                "import %s of %s resolved by the operator: %s",
                mid.hex()[:12],
                entry.machine.flow,
                outcome,
            )
            return {"ok": True, "resolved": mid.hex(), "outcome": outcome}
        return None

    def close(self) -> None:
        """Stopping: an import not yet served dies silently with its socket."""
        for entry in list(self.active.values()):
            if entry.task is not None:
                entry.task.cancel()
            if entry.machine.state != "committed":
                self._discard(entry)  # once: close() runs at the stop and again at the end

    # --- driving --------------------------------------------------------------------------------
    async def _drive(self, entry: Import) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        machine = entry.machine
        action: Action = machine.start(loop.time())
        took: list[list[Any]] = []  # each step's ms, for the source's timeline
        crashed = False
        try:
            while not isinstance(action, Finish):
                t0 = time.perf_counter()
                try:
                    event = await self._carry_out(entry, action)
                    took.append([_step_name(action), round((time.perf_counter() - t0) * 1000, 3)])
                    action = machine.on(event, loop.time())
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # a bug: never serve half an import
                    log.exception("import %s failed unexpectedly", machine.short)
                    why = f"internal error on {self.node.name} ({type(exc).__name__})"
                    if crashed:  # its undo failed too: drop the copy and stop
                        self._discard(entry)
                        action = Finish("failed", why, {"ok": False, "error": why})
                        break
                    crashed = True
                    action = machine.crashed(why, loop.time())
        finally:
            if self.active.get(machine.mid) is entry:
                del self.active[machine.mid]
        answer = action.answer or {"ok": False, "error": action.reason or "refused"}
        return answer | {"steps": took} if answer.get("ok") else answer

    async def _carry_out(self, entry: Import, action: Action) -> Event:
        if isinstance(action, Call | Sleep):
            # A drain's batch arriving claims together; a single move asks at once.
            pool = self.node.steer_batch if entry.batched else self.node.steer
            event = await wait_for_event(pool, action)
            if isinstance(event, Unreachable):
                log.warning(
                    "import %s: claim unanswered (%s); asking again",
                    entry.machine.short,
                    event.message,
                )
            return event
        assert isinstance(action, Do)  # noqa: S101
        return self._steps[action.what](entry)

    # --- the steps -----------------------------------------------------------------------------
    def _open(self, entry: Import) -> Event:
        m = entry.machine
        try:
            # Bound to this move: sealed by the peer this mTLS link authenticated, for us.
            blob = open_sealed(
                entry.data, self.node.cluster_key, expect_id=m.mid, source=m.source, target=m.me
            )
            self.ledger.claim(m.mid, sealed_at=blob.t)
        except (BlobError, ValueError) as exc:
            log.warning("import %s from %s refused: %s", m.short, m.source, exc)
            self.count("refused")
            return No(str(exc))
        entry.data = b""
        entry.blob = blob
        if blob.flow.dport not in self.node.runtime.services:
            self.ledger.decide(m.mid, "aborted")
            return No(f"port {blob.flow.dport} is not served here")
        return Answered({"flow": str(blob.flow), "dport": blob.flow.dport})

    def _restore(self, entry: Import) -> Event:
        assert entry.blob is not None  # noqa: S101
        try:
            # The source's frozen socket may still send a delayed ACK after its dump:
            # our timestamps start past anything it can have sent (tcp.advance_clock).
            since = min(max(time.time() - entry.blob.t, 0.0), MAX_CLOCK_GAP)
            advance = TS_ADVANCE_MS + since * 1000
            entry.sock = tcp.restore(entry.blob.tcp, frozen=True, advance_ms=advance)
        except tcp.RepairError as exc:
            log.warning(
                "import %s from %s: restore failed: %s",
                entry.machine.short,
                entry.machine.source,
                exc,
            )
            return No(str(exc))
        return Answered()

    def _build(self, entry: Import) -> Event:
        b, m = entry.blob, entry.machine
        assert b is not None and entry.sock is not None  # noqa: S101
        exported = Exported(entry.sock, b.tcp, b.tls, b.app, b.out, b.flow.dport, {})
        try:  # everything the thaw and the claim would need, checked first
            entry.conn = self.node.runtime.build(entry.sock, exported)
        except AdoptError as exc:
            self.count("refused")
            log.warning("import %s of %s from %s refused: %s", m.short, b.flow, m.source, exc)
            return No(str(exc))
        return Answered()

    def _thaw(self, entry: Import) -> Event:
        assert entry.blob is not None and entry.sock is not None  # noqa: S101
        try:
            tcp.thaw(entry.sock, entry.blob.tcp)
        except (tcp.RepairError, OSError) as exc:  # frozen again by thaw: silent
            return No(str(exc))
        self.ledger.decide(entry.machine.mid, "claiming")
        return Answered()

    def _serve(self, entry: Import) -> Event:
        assert entry.conn is not None  # noqa: S101
        self.node.runtime.serve_built(entry.conn)
        self.ledger.decide(entry.machine.mid, "committed")
        keeper = self.node.overrides
        if keeper is not None and keeper.enabled and entry.version is not None:
            m = entry.machine
            override = Override(m.flow or "", self.node.name, by_of(token_of(m.mid)))
            keeper.served(override)
            keeper.keep(override, entry.version)  # the source writes it too (it may die)
        self.count("committed")
        log.info("import %s: %s now served here", entry.machine.short, entry.machine.flow)
        return Answered()

    def _aborted(self, entry: Import) -> Event:
        m = entry.machine
        self.ledger.decide(m.mid, "aborted")
        if m.refused_in in ("thawing", "claiming", None):  # a refused blob counts as such
            self.count("aborted")
        why = m.reason or "resolved by the operator"
        log.warning("import %s of %s aborted: %s", m.short, m.flow, why)
        return Answered()

    def _discard(self, entry: Import) -> Event:
        if entry.conn is not None and entry.conn.id not in self.node.runtime.connections:
            self.node.runtime.unbuild(entry.conn)  # built, never served: its backend too
        if entry.sock is not None:
            with contextlib.suppress(OSError):
                tcp.discard(entry.sock)  # repair mode first: no FIN, no RST, whatever its state
            entry.sock = None
        return Answered()


def _step_name(action: Action) -> str:
    if isinstance(action, Call):
        return str(action.request.get("cmd"))
    return action.what if isinstance(action, Do) else "sleep"
