"""Moving one connection from this agent (A) to a peer (B), with rollback.

The sequence (docs/how-it-works.md): hello to B, PARK at the steering node, freeze
and dump (runtime.export), seal, ``prepare`` on B (restored, still frozen), **commit**,
TO(B) with replay, release here. Before the commit point every failure rolls back: A
thaws its own socket and the steering node replays the parked packets to A. After it, A
never resumes unless B says it aborted (then B has certainly not served the flow).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pysteer import tcp
from pysteer.agent.links import LinkError, LinkPool, Refused
from pysteer.agent.timeline import Timeline
from pysteer.steer.flow import Flow
from pysteer.transfer.blob import BlobError, MigrationBlob, new_migration_id, seal

if TYPE_CHECKING:
    from pysteer.agent.agent import Agent
    from pysteer.app.runtime import Exported

log = logging.getLogger("pysteer.agent")

AFTER_COMMIT = 5.0  # seconds allowed to finish a committed move (steering, outcome)


class MigrationError(RuntimeError):
    """A migration that could not start: nothing was frozen or changed."""


@dataclass
class Report:
    """The outcome of one migration, as shown by ``pysteer migrate --json``."""

    id: str
    flow: str
    source: str
    target: str
    outcome: str = "failed"  # moved | rolled-back | failed | in-doubt | moved-unsteered
    error: str | None = None
    freeze_ms: float | None = None
    replayed: int | None = None
    blob_bytes: int | None = None
    timeline: Timeline = field(default_factory=Timeline)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "flow": self.flow, "from": self.source, "to": self.target,
            "outcome": self.outcome, "error": self.error, "freeze_ms": self.freeze_ms,
            "replayed": self.replayed, "blob_bytes": self.blob_bytes,
            "timeline": self.timeline.to_json(),
        }  # fmt: skip


class Migration:
    """One move of ``flow`` to ``target``; ``run`` never raises once it has started."""

    def __init__(self, agent: Agent, flow: Flow, target: str, timeout: float, *,
                 checked: bool = False) -> None:  # fmt: skip
        """``checked``: the target was just asked (a drain); skip the per-move hello."""
        self.agent, self.flow, self.target, self.timeout = agent, flow, target, timeout
        self.checked = checked
        self.mid = new_migration_id()
        self.report = Report(self.mid.hex(), str(flow), agent.name, target)
        self.tl = self.report.timeline
        self.peer: LinkPool = agent.peers[target]
        self.steer: LinkPool = agent.steer
        self._deadline = 0.0
        self._was: tuple[str | None, str | None] = (None, None)

    def _left(self) -> float:
        return max(self._deadline - asyncio.get_running_loop().time(), 0.0)

    async def run(self) -> Report:
        self._deadline = asyncio.get_running_loop().time() + self.timeout
        self.tl.step("start")
        try:
            await self._run()
        except _Stop as stop:
            self.report.outcome, self.report.error = stop.outcome, stop.reason
        r = self.report
        level = logging.INFO if r.outcome == "moved" else logging.WARNING
        log.log(level, "migration %s %s -> %s: %s%s%s", r.id[:12], r.flow, r.target, r.outcome,
                f", freeze {r.freeze_ms:.3f} ms" if r.freeze_ms is not None else "",
                f" ({r.error})" if r.error else "")  # fmt: skip
        return r

    async def _run(self) -> None:
        agent, flow = self.agent, self.flow
        if self.checked:
            try:  # B's answer to prepare still decides; this only opens the link
                await self.peer.connect(self._left())
            except LinkError as exc:
                raise _Stop("failed", f"node {self.target} is unreachable: {exc}") from None
        else:
            await self._hello()
        try:  # a handshake now, not inside the freeze
            await self.steer.connect(self._left())
        except LinkError as exc:
            raise _Stop("failed", f"steering node: {exc}; nothing was frozen") from None
        self.tl.step("peer-ready")
        conn = agent.runtime.find(flow)
        if conn is None:
            raise _Stop("failed", f"flow {flow} closed before it could move")
        await self._park()
        try:
            exported = await agent.runtime.export(conn.id)
        except (tcp.RepairError, OSError) as exc:
            await self._unpark()
            raise _Stop("rolled-back", f"freeze failed here: {exc}") from None
        self.tl.step("frozen", tcp_state=exported.tcp.state.name,
                     tls=bool(exported.tls), pending=len(exported.pending))  # fmt: skip
        try:
            sealed = seal(MigrationBlob(self.mid, flow, exported.tcp, exported.tls, exported.app,
                                        exported.pending), agent.cluster_key)  # fmt: skip
        except BlobError as exc:
            await self._rollback(exported)
            raise _Stop("rolled-back", str(exc)) from None
        self.report.blob_bytes = len(sealed)
        self.tl.step("sealed", bytes=len(sealed))
        try:
            await self.peer.call(self._left(), op="prepare", id=self.mid, blob=sealed)
        except (LinkError, Refused) as exc:
            await self._abort_on_peer()
            await self._rollback(exported)
            raise _Stop("rolled-back", f"node {self.target}: {exc}") from None
        self.tl.step("prepared")
        await self._commit(exported)

    async def _park(self) -> None:
        self.tl.step("park")
        try:
            answer = await self.steer.call(self._left(), cmd="park", flow=str(self.flow))
        except Refused as exc:
            raise _Stop("failed", f"steering node refused: {exc}; nothing was frozen") from None
        except LinkError as exc:
            await self._unpark_after_failed_park()
            raise _Stop("failed", f"steering node: {exc}; nothing was frozen") from None
        self._was = (answer.get("was"), answer.get("host"))
        self.tl.step("parked")

    async def _hello(self) -> None:
        try:
            hello = await self.peer.call(self._left(), op="hello")
        except (LinkError, Refused) as exc:
            raise _Stop("failed", f"node {self.target} is unreachable: {exc}") from None
        if not hello.get("accepting", False):
            raise _Stop("failed", f"node {self.target} refuses imports (cordoned)")
        if self.flow.dport not in hello.get("services", []):
            raise _Stop("failed", f"node {self.target} does not serve port {self.flow.dport}")

    async def _commit(self, exported: Exported) -> None:
        # The commit point: from here A resumes only if B certainly aborted.
        self.tl.step("commit")
        try:
            await self.peer.call(max(self._left(), AFTER_COMMIT), op="commit", id=self.mid)
        except Refused as exc:  # B answered: it did not commit, and never will
            await self._rollback(exported)
            raise _Stop("rolled-back", f"node {self.target} did not commit: {exc}") from None
        except LinkError as exc:
            outcome = await self._ask_outcome()
            if outcome != "committed":
                if outcome == "aborted":
                    await self._rollback(exported)
                    raise _Stop(
                        "rolled-back", f"commit lost ({exc}); {self.target} aborted"
                    ) from None
                self.agent.in_doubt[self.mid.hex()] = exported
                raise _Stop("in-doubt", f"commit sent, no answer from {self.target} ({exc}); "
                            "the socket stays frozen here") from None  # fmt: skip
        self.tl.step("committed")
        try:
            answer = await self._steer_retry("to", host=self.target)
            self.report.replayed = int(answer.get("replayed", 0))
            self.tl.step("steered", replayed=self.report.replayed)
        except (LinkError, Refused) as exc:
            self.report.outcome = "moved-unsteered"
            self.report.error = f"{self.target} serves the flow, but steering failed: {exc}"
        tcp.release(exported.sock)
        self.tl.step("released")
        self.report.freeze_ms = self.tl.span("park", "steered")
        if self.report.outcome != "moved-unsteered":
            self.report.outcome = "moved"

    async def _steer_retry(self, cmd: str, **args: Any) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        end = loop.time() + AFTER_COMMIT
        while True:
            try:
                return await self.steer.call(max(end - loop.time(), 0.5), cmd=cmd,
                                                   flow=str(self.flow), **args)  # fmt: skip
            except LinkError:
                if loop.time() > end:
                    raise
                await asyncio.sleep(0.1)

    async def _ask_outcome(self) -> str | None:
        """After a lost commit answer: what did B do? Asks over a fresh connection."""
        loop = asyncio.get_running_loop()
        end = loop.time() + AFTER_COMMIT
        while loop.time() < end:
            try:
                answer = await self.peer.call(1.0, op="outcome", id=self.mid)
            except (LinkError, Refused):
                await asyncio.sleep(0.1)
                continue
            outcome = answer.get("outcome")
            if outcome == "prepared":  # B has not seen the commit: stop it there
                try:
                    await self.peer.call(1.0, op="abort", id=self.mid)
                    return "aborted"
                except Refused:
                    continue  # it committed in between: ask again
                except LinkError:
                    await asyncio.sleep(0.1)
                    continue
            return outcome
        return None

    async def _abort_on_peer(self) -> None:
        """Best effort; B also aborts whatever its connection from A left prepared."""
        with contextlib.suppress(LinkError, Refused):
            await self.peer.call(1.0, op="abort", id=self.mid)

    async def _rollback(self, exported: Exported) -> None:
        try:
            self.agent.runtime.resume(exported)
        except tcp.RepairError as exc:
            log.error("rollback of %s: cannot thaw the socket: %s", self.flow, exc)
        self.tl.step("resumed")
        await self._unpark()

    async def _unpark(self) -> None:
        """Give the flow back to this node, replaying what was parked meanwhile."""
        was, host = self._was
        try:
            if was == "TO" and host:
                await self._steer_retry("to", host=host)
            else:
                await self._steer_retry("pass", host=self.agent.name)
            self.tl.step("unparked")
        except (LinkError, Refused) as exc:
            log.error("rollback of %s: steering node: %s", self.flow, exc)
            self.tl.step("unpark-failed")

    async def _unpark_after_failed_park(self) -> None:
        """A park request without an answer may still have parked: undo it if we can.

        The flow is served here, so redirecting it here is right whatever it did before.
        """
        with contextlib.suppress(LinkError, Refused):
            await self.steer.call(1.0, cmd="to", flow=str(self.flow), host=self.agent.name)


class _Stop(Exception):
    def __init__(self, outcome: str, reason: str) -> None:
        super().__init__(reason)
        self.outcome, self.reason = outcome, reason
