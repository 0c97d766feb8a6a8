"""Moving one connection from this agent (A) to a peer (B), with rollback and recovery.

The sequence (docs/how-it-works.md): hello to B, PARK at the steering node (with the
migration's token and a lease), freeze and dump (runtime.export), seal, ``prepare`` on B
(restored and checked, still frozen), ``commit``: B thaws the socket and *claims* the flow
at the steering node, which replays the parked packets to B and redirects the flow only
if it is still parked by this migration. That claim is the commit point; A then releases
its frozen socket.

A rolls back by *reverting* at the steering node on the same condition: it records the
migration as aborted (so B's claim can no longer win), resumes its socket, and the
steering node replays the parked packets to A. Exactly one of the two wins, so a lost
answer never leaves the flow served twice: A asks the steering node (or B) what was
decided, and if neither answers, the migration is in-doubt and a background task keeps
asking, with a bounded back-off, until it knows. An in-doubt socket stays frozen here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pysteer import tcp
from pysteer.agent.links import LinkError, LinkPool, Refused
from pysteer.agent.timeline import Timeline
from pysteer.flow import Flow
from pysteer.transfer.blob import BlobError, MigrationBlob, new_migration_id, seal

if TYPE_CHECKING:
    from pysteer.agent.agent import Agent
    from pysteer.app.runtime import Exported

log = logging.getLogger("pysteer.agent")

AFTER_COMMIT = 5.0  # seconds allowed to learn a commit's outcome before it is in-doubt
# The park's lease: the timeout plus this. If the source dies, its parked flow goes back
# when the lease ends; a live migration that outlasts it loses its claim (B's claim is
# refused, A resumes): the timeout bounds the move either way.
LEASE_MARGIN = 2.0
RETRY_MAX = 5.0  # the in-doubt resolver's longest wait between questions


def token_of(mid: bytes) -> int:
    """The steering node's name for a migration: 64 bits of its id (never 0)."""
    return int.from_bytes(mid[:8], "big") or 1


@dataclass
class Report:
    """The outcome of one migration, as shown by ``pysteer migrate --json``."""

    id: str
    flow: str
    source: str
    target: str
    outcome: str = "failed"  # moved | rolled-back | failed | in-doubt | lost
    error: str | None = None
    freeze_ms: float | None = None
    replayed: int | None = None
    blob_bytes: int | None = None
    timeline: Timeline = field(default_factory=Timeline)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "flow": self.flow,
            "from": self.source,
            "to": self.target,
            "outcome": self.outcome,
            "error": self.error,
            "freeze_ms": self.freeze_ms,
            "replayed": self.replayed,
            "blob_bytes": self.blob_bytes,
            "timeline": self.timeline.to_json(),
        }


class _Unreachable(Exception):
    """Neither the steering node nor B could say what was decided (yet)."""


class Migration:
    """One move of ``flow`` to ``target``; ``run`` never raises once it has started."""

    def __init__(
        self, agent: Agent, flow: Flow, target: str, timeout: float, *, checked: bool = False
    ) -> None:
        """``checked``: the target was just asked (a drain); skip the per-move hello."""
        self.agent, self.flow, self.target, self.timeout = agent, flow, target, timeout
        self.checked = checked
        self.mid = new_migration_id()
        self.token = token_of(self.mid)
        self.report = Report(self.mid.hex(), str(flow), agent.name, target)
        self.tl = self.report.timeline
        self.peer: LinkPool = agent.peers[target]
        self.steer: LinkPool = agent.steer
        self.state = "starting"
        self.started = time.time()
        self.exported: Exported | None = None
        self.commit_sent = False  # from then on B may claim: a rollback must win at steering
        self._deadline = 0.0

    def _left(self) -> float:
        return max(self._deadline - asyncio.get_running_loop().time(), 0.0)

    def describe(self) -> dict[str, Any]:
        """For ``pysteer migrations``: where it stands (no secrets)."""
        return {
            "id": self.report.id,
            "flow": self.report.flow,
            "from": self.report.source,
            "to": self.target,
            "role": "source",
            "state": self.state,
            "age_s": round(time.time() - self.started, 3),
            "error": self.report.error,
        }

    async def run(self) -> Report:
        self._deadline = asyncio.get_running_loop().time() + self.timeout
        self.tl.step("start")
        try:
            await self._run()
        except _Stop as stop:
            self.report.outcome, self.report.error = stop.outcome, stop.reason
        except Exception as exc:  # a bug must not leave the flow frozen or parked
            log.exception("migration %s of %s failed unexpectedly", self.report.id[:12], self.flow)
            self.report.outcome, self.report.error = "failed", f"internal error: {exc!r:.200}"
            await self._recover_from_bug()
        self.state = self.report.outcome
        self._log()
        return self.report

    def _log(self) -> None:
        r = self.report
        level = logging.INFO if r.outcome == "moved" else logging.WARNING
        log.log(
            level,
            "migration %s %s -> %s: %s%s%s",
            r.id[:12],
            r.flow,
            r.target,
            r.outcome,
            f", freeze {r.freeze_ms:.3f} ms" if r.freeze_ms is not None else "",
            f" ({r.error})" if r.error else "",
        )

    async def _run(self) -> None:
        agent = self.agent
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
        # Only a few flows are frozen at once: in a drain the rest of the batch waits here,
        # unfrozen, so no flow's freeze spans the whole batch's work (on 2 cores a freeze
        # that long outlasts a client's retransmission timer).
        async with agent.freeze_slots:
            await self._moving()

    async def _moving(self) -> None:
        """Park, freeze, prepare, commit: the part of the move inside the freeze window."""
        agent, flow = self.agent, self.flow
        conn = agent.runtime.find(flow)
        if conn is None:
            raise _Stop("failed", f"flow {flow} closed before it could move")
        await self._park()
        try:
            exported = await agent.runtime.export(conn.id)
        except Exception as exc:  # not frozen (a failed export thaws itself): give it back
            await self._unpark_live()
            raise _Stop("rolled-back", f"freeze failed here: {exc}") from None
        self.exported = exported
        self.state = "frozen"
        self.tl.step(
            "frozen",
            tcp_state=exported.tcp.state.name,
            tls=bool(exported.tls),
            pending=len(exported.pending),
        )
        try:
            sealed = seal(
                MigrationBlob(
                    self.mid, flow, exported.tcp, exported.tls, exported.app, exported.pending
                ),
                agent.cluster_key,
                source=agent.name,
                target=self.target,
            )
        except BlobError as exc:
            await self._rollback(str(exc))
        self.report.blob_bytes = len(sealed)
        self.tl.step("sealed", bytes=len(sealed))
        try:
            await self.peer.call(self._left(), op="prepare", id=self.mid, blob=sealed)
        except (LinkError, Refused) as exc:
            await self._abort_on_peer()
            await self._rollback(f"node {self.target}: {exc}")
        self.state = "prepared"
        self.tl.step("prepared")
        await self._commit()

    async def _park(self) -> None:
        self.tl.step("park")
        try:
            answer = await self.steer.call(
                self._left(),
                cmd="park",
                flow=str(self.flow),
                token=self.token,
                owner=self.agent.name,
                lease=round(self.timeout + LEASE_MARGIN, 3),
            )
        except Refused as exc:
            raise _Stop("failed", f"steering node refused: {exc}; nothing was frozen") from None
        except LinkError as exc:
            await self._unpark_live()  # it may have parked without our hearing
            raise _Stop("failed", f"steering node: {exc}; nothing was frozen") from None
        self.state = "parked"
        self.tl.step("parked", was=answer.get("was"))

    async def _hello(self) -> None:
        try:
            hello = await self.peer.call(self._left(), op="hello")
        except (LinkError, Refused) as exc:
            raise _Stop("failed", f"node {self.target} is unreachable: {exc}") from None
        if not hello.get("accepting", False):
            raise _Stop("failed", f"node {self.target} refuses imports (cordoned)")
        if self.flow.dport not in hello.get("services", []):
            raise _Stop("failed", f"node {self.target} does not serve port {self.flow.dport}")

    async def _commit(self) -> None:
        """Ask B to take the flow; B's claim at the steering node is the commit point."""
        self.state = "committing"
        self.commit_sent = True
        self.tl.step("commit")
        try:
            answer = await self.peer.call(max(self._left(), AFTER_COMMIT), op="commit", id=self.mid)
        except Refused as exc:
            if exc.code == "pending":  # B waits on the steering node: ask who won
                await self._resolve(f"{self.target} has not heard from the steering node")
            # B did not and will not claim it (its refusal, or the revert below, sees to it)
            why = f"node {self.target} did not commit: {exc}"
            try:
                await self._rollback(why)
            except _Unreachable as unreachable:
                await self._resolve(f"{why}; {unreachable}")
        except LinkError as exc:
            await self._resolve(f"commit sent, no answer from {self.target} ({exc})")
        else:
            self._moved(int(answer.get("replayed", 0)))

    def _moved(self, replayed: int | None, how: str | None = None) -> None:
        """B serves the flow: close our frozen socket silently."""
        assert self.exported is not None  # noqa: S101
        self.tl.step(
            "committed" if how is None else "resolved",
            replayed=replayed,
            **({"how": how} if how else {}),
        )
        tcp.release(self.exported.sock)
        self.tl.step("released")
        self.report.replayed = replayed
        self.report.freeze_ms = self.tl.span("park", "committed" if how is None else "resolved")
        raise _Stop("moved", None)

    async def _resolve(self, why: str) -> None:
        """After a lost or undecided commit: learn the outcome, or decide it (revert) while
        the flow is still ours to take back. Raises _Stop with the outcome."""
        self.tl.step("resolving", why=why)
        loop = asyncio.get_running_loop()
        end = loop.time() + AFTER_COMMIT
        delay = 0.05
        while True:
            try:
                await self._decide(why)
            except _Unreachable as exc:
                if loop.time() + delay > end:
                    self.agent.hold_in_doubt(self, f"{why}; {exc}")
                    raise _Stop(
                        "in-doubt",
                        f"{why}; {exc}; the socket stays frozen here "
                        "and the outcome is asked again until known",
                    ) from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def _decide(self, why: str) -> None:
        """One attempt at learning or making the decision; _Stop if done, else _Unreachable."""
        try:
            answer = await self.steer.call(
                2.0, cmd="decision", flow=str(self.flow), token=self.token
            )
        except (LinkError, Refused) as exc:
            outcome = await self._ask_target()
            if outcome == "committed":
                self._moved(None, "the target committed")
            if outcome == "aborted":  # its claim was refused: the steering node decided so
                await self._rollback(f"{why}; {self.target} aborted", decided=True)
            raise _Unreachable(f"steering node: {exc}") from None
        decision = answer.get("decision")
        if decision == "committed":
            self._moved(None, f"the steering node: {answer.get('host')} claimed it")
        await self._rollback(why, decided=decision == "aborted")

    async def _ask_target(self) -> str | None:
        with contextlib.suppress(LinkError, Refused):
            answer = await self.peer.call(1.0, op="outcome", id=self.mid)
            return answer.get("outcome")
        return None

    async def _rollback(self, why: str, *, decided: bool = False) -> None:
        """Take the flow back: decide (revert, held), resume the socket, then unpark to
        here. If the target claimed it first, it is moved instead. Raises _Stop."""
        assert self.exported is not None  # noqa: S101
        if self.commit_sent and not decided:  # before the commit, B cannot claim it
            try:
                await self.steer.call(
                    2.0, cmd="revert", flow=str(self.flow), token=self.token, hold=True
                )
            except Refused as exc:
                if exc.code == "committed":
                    self._moved(None, "the target claimed it first")
                raise _Unreachable(f"steering node refused the rollback: {exc}") from None
            except LinkError as exc:
                raise _Unreachable(f"steering node: {exc}") from None
        self.tl.step("decided", outcome="aborted")
        try:
            self.agent.runtime.resume(self.exported)
        except tcp.RepairError as exc:
            log.error("rollback of %s: cannot thaw the socket: %s", self.flow, exc)
            tcp.discard(self.exported.sock)
            self.tl.step("lost")
            await self._unpark_live()
            raise _Stop("lost", f"{why}; and the socket could not be thawed: {exc}") from None
        self.tl.step("resumed")
        await self._unpark_live()
        raise _Stop("rolled-back", why)

    async def _unpark_live(self) -> None:
        """Give the parked flow back to this node (revert, replaying what was parked). If
        the steering node cannot be reached, the park's lease does the same later."""
        loop = asyncio.get_running_loop()
        end = loop.time() + AFTER_COMMIT
        while True:
            try:
                await self.steer.call(
                    2.0, cmd="revert", flow=str(self.flow), token=self.token, host=self.agent.name
                )
                self.tl.step("unparked")
                return
            except Refused as exc:
                log.error("rollback of %s: steering node: %s", self.flow, exc)
                self.tl.step("unpark-failed", error=str(exc))
                return
            except LinkError as exc:
                if loop.time() > end:
                    log.error(
                        "rollback of %s: steering node unreachable (%s); the park's "
                        "lease will give it back",
                        self.flow,
                        exc,
                    )
                    self.tl.step("unpark-failed", error=str(exc))
                    return
                await asyncio.sleep(0.1)

    async def _abort_on_peer(self) -> None:
        """Best effort; B also aborts whatever its connection from A left prepared."""
        with contextlib.suppress(LinkError, Refused):
            await self.peer.call(1.0, op="abort", id=self.mid)

    async def _recover_from_bug(self) -> None:
        """After an unexpected error: never leave the flow frozen or parked here."""
        with contextlib.suppress(_Stop, _Unreachable, Exception):
            if self.exported is not None and self.state in ("frozen", "prepared"):
                await self._rollback("internal error")
            elif self.state == "parked":
                await self._unpark_live()

    # --- in-doubt: asked again until known ---------------------------------------------------
    async def settle(self) -> Report:
        """Keep asking, with a bounded back-off, until the outcome is known; then finish
        (release or resume) and return the final report."""
        delay = 0.2
        while True:
            try:
                await self._decide("in-doubt")
            except _Unreachable:
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            except _Stop as stop:
                self.report.outcome, self.report.error = stop.outcome, stop.reason
                self.state = stop.outcome
                self._log()
                return self.report

    def force(self, keep: str) -> Report:
        """The operator's decision for an in-doubt migration: ``keep`` the flow on the
        ``source`` (resume here) or the ``target`` (release here)."""
        assert self.exported is not None  # noqa: S101
        if keep == "target":
            tcp.release(self.exported.sock)
            self.tl.step("released", how="operator")
            outcome, error = "moved", "resolved by the operator: the target keeps it"
        else:
            self.agent.runtime.resume(self.exported)
            self.tl.step("resumed", how="operator")
            outcome, error = "rolled-back", "resolved by the operator: the source keeps it"
        self.report.outcome, self.report.error, self.state = outcome, error, outcome
        self._log()
        return self.report


class _Stop(Exception):
    def __init__(self, outcome: str, reason: str | None) -> None:
        super().__init__(reason)
        self.outcome, self.reason = outcome, reason
