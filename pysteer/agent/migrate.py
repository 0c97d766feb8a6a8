"""The asyncio adapter of a move's source side: carries out what ``migration.source.Source``
asks for (links, the runtime's freeze, seal, release, resume) and feeds back the result.

The protocol, its rollback table and its in-doubt rules live in the machine; this module
only does I/O, so a migration needs the pieces of its node listed in ``Node``, not the
whole agent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pysteer import tcp
from pysteer.agent.admission import Admission, save
from pysteer.agent.batcher import Batcher
from pysteer.agent.links import LinkError, LinkPool, Refused
from pysteer.agent.overrides import OverrideKeeper, StoreRefused, by_of
from pysteer.agent.steer_group import SteerGroup
from pysteer.app.proxy_io import QuiesceError
from pysteer.app.runtime import signature
from pysteer.migration import source as src
from pysteer.migration.events import (
    PEER,
    Action,
    Answered,
    Call,
    Do,
    Event,
    Finish,
    Sleep,
    Unreachable,
    Woke,
)
from pysteer.migration.events import Refused as No
from pysteer.migration.source import Source
from pysteer.migration.timeline import Timeline
from pysteer.store.errors import StoreError
from pysteer.store.keys import Override
from pysteer.transfer.blob import BlobError, MigrationBlob, new_migration_id, seal, worker_of

if TYPE_CHECKING:
    from pathlib import Path

    from pysteer.app.runtime import Exported, Runtime
    from pysteer.flow import Flow

log = logging.getLogger("pysteer.agent")


@dataclass
class Node:
    """What a migration needs from the node it runs on."""

    name: str
    runtime: Runtime
    cluster_key: bytes
    steer: SteerGroup  # every steering node (pysteer.agent.steer_group)
    peers: dict[str, list[LinkPool]]  # per node, a pool per worker (transfer.worker_of)
    freeze_slots: asyncio.Semaphore
    steer_batch: SteerGroup  # the same, with requests made together sent together
    peer_batch: dict[str, list[Batcher]]
    accepting: bool = True  # imports are taken (a drain or cordon turns it off)
    drained_to: str | None = None
    worker: int = 0  # which of this node's agent processes this is
    workers: int = 1
    admission_file: Path | None = None  # where accepting and drained_to are kept
    overrides: OverrideKeeper | None = None  # the shared store (None: there is none)

    def admit(self, *, accepting: bool, drained_to: str | None) -> None:
        """Change whether imports are taken (and where the node was drained to), and keep
        it on disk: an agent restarted, or the host rebooted, after a drain stays drained."""
        self.accepting, self.drained_to = accepting, drained_to
        if self.admission_file is not None:
            save(self.admission_file, Admission(accepting, drained_to))
        if self.overrides is not None:  # and in the shared store, in the background
            self.overrides.keep_admission(accepting, drained_to)


async def wait_for_event(pool: LinkPool | Batcher | SteerGroup, action: Call | Sleep) -> Event:
    """A call's answer as the machines' event (a yes, a refusal with its code, or silence),
    or a sleep's end: what both sides' adapters do alike."""
    if isinstance(action, Sleep):
        await asyncio.sleep(action.seconds)
        return Woke()
    try:
        return Answered(await pool.call(action.timeout, **action.request))
    except Refused as exc:
        return No(str(exc), exc.code)
    except LinkError as exc:
        return Unreachable(str(exc))


@dataclass
class Report:
    """The outcome of one migration, as shown by ``pysteer migrate --json``."""

    id: str
    flow: str
    source: str
    target: str
    outcome: str = "failed"  # moved | rolled-back | failed | in-doubt | lost | not-movable
    error: str | None = None
    freeze_ms: float | None = None
    parked_ms: float | None = None
    replayed: int | None = None
    blob_bytes: int | None = None
    stored: str | None = None  # the override's write in the shared store (None: none)
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
            "parked_ms": self.parked_ms,
            "replayed": self.replayed,
            "blob_bytes": self.blob_bytes,
            "stored": self.stored,
            "timeline": self.timeline.to_json(),
        }


class Migration:
    """One move of ``flow`` to ``target``; ``run`` never raises once it has started."""

    def __init__(
        self,
        node: Node,
        flow: Flow,
        target: str,
        timeout: float,
        *,
        hello: dict[str, Any] | None = None,
        batch: bool = False,
    ) -> None:
        """``hello``: the target's answer to a hello just asked (a drain): not asked again.
        ``batch``: send its requests with other migrations' made at the same moment."""
        self.node, self.flow, self.target, self.timeout = node, flow, target, timeout
        self.mid = new_migration_id()
        self.report = Report(self.mid.hex(), str(flow), node.name, target)
        self.machine = Source(
            mid=self.mid,
            flow=str(flow),
            dport=flow.dport,
            me=node.name,
            target=target,
            timeout=timeout,
            hello=hello,
            timeline=self.report.timeline,
        )
        pools: list[LinkPool] | list[Batcher] = (
            node.peer_batch[target] if batch else node.peers[target]
        )
        self.peer: LinkPool | Batcher = pools[worker_of(self.mid, len(pools))]
        self.steer: SteerGroup = node.steer_batch if batch else node.steer
        self.started = time.time()
        self.exported: Exported | None = None
        self._slot = False
        self._steps: dict[str, Callable[[dict[str, Any]], Awaitable[Event]]] = {
            src.CONNECT: self._connect,
            src.CHECK: self._check,
            src.LOOKUP: self._lookup,
            src.RECORD: self._record,
            src.SLOT: self._take_slot,
            src.QUIESCE: self._quiesce,
            src.UNQUIESCE: self._unquiesce,
            src.FREEZE: self._freeze,
            src.SEAL: self._seal,
            src.RELEASE: self._release,
            src.RESUME: self._resume,
            src.DISCARD: self._discard,
        }

    @property
    def state(self) -> str:
        return self.machine.state

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

    # --- driving the machine -------------------------------------------------------------------
    async def run(self) -> Report:
        loop = asyncio.get_running_loop()
        try:
            await self._drive(self.machine.start(loop.time()))
        finally:
            self._free_slot()
        self._log()
        return self.report

    async def settle(self) -> Report:
        """In-doubt: ask with a back-off until the outcome is known, then finish."""
        await self._drive(self.machine.settle(asyncio.get_running_loop().time()))
        self._log()
        return self.report

    def force(self, keep: str) -> Report:
        """The operator's decision for an in-doubt migration (``source`` or ``target``)."""
        action, outcome, why = self.machine.force(keep)
        assert isinstance(action, Do) and self.exported is not None  # noqa: S101
        if action.what == src.RELEASE:
            self.node.runtime.release(self.exported)
        else:
            self.node.runtime.resume(self.exported)
        self.machine.state = outcome
        self.report.outcome, self.report.error = outcome, why
        self._log()
        return self.report

    async def _drive(self, action: Action) -> None:
        loop = asyncio.get_running_loop()
        crashed = False
        while not isinstance(action, Finish):
            try:
                event = await self._carry_out(action)
                action = self.machine.on(event, loop.time())
            except Exception as exc:  # a bug must not leave the flow frozen or parked
                if crashed:
                    log.exception("migration %s: its rollback failed too", self.report.id[:12])
                    action = Finish("failed", f"internal error: {exc!r:.200}")
                    break
                crashed = True
                log.exception(
                    "migration %s of %s failed unexpectedly", self.report.id[:12], self.flow
                )
                action = self.machine.crashed(f"internal error: {exc!r:.200}", loop.time())
        r, result = self.report, self.machine.result
        r.outcome, r.error = action.outcome, action.reason
        r.freeze_ms, r.parked_ms = result.freeze_ms, result.parked_ms
        r.replayed, r.blob_bytes = result.replayed, result.blob_bytes
        r.stored = result.stored

    async def _carry_out(self, action: Action) -> Event:
        if isinstance(action, Call | Sleep):
            to_peer = isinstance(action, Call) and action.to == PEER
            return await wait_for_event(self.peer if to_peer else self.steer, action)
        assert isinstance(action, Do)  # noqa: S101
        return await self._steps[action.what](action.args)

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
        for step in r.timeline.steps:
            if step["step"] == "unpark-failed":
                log.error(
                    "rollback of %s: could not give the flow back (%s); the park's lease will",
                    r.flow,
                    step.get("error"),
                )

    # --- the steps -----------------------------------------------------------------------------
    async def _connect(self, args: dict[str, Any]) -> Event:
        pool = self.peer if args["to"] == PEER else self.steer
        try:
            await pool.connect(self.timeout)
        except LinkError as exc:
            return Unreachable(str(exc))
        return Answered()

    async def _check(self, args: dict[str, Any]) -> Event:
        """Refuse now, with nothing frozen, what the target would refuse inside the freeze."""
        conn = self.node.runtime.find(self.flow)
        if conn is None:
            return No(f"flow {self.flow} closed before it could move")
        if conn.tls is not None and conn.tls.phase != "open":
            return No(f"flow {self.flow}: its TLS handshake is still running")
        mine = signature(conn.service, type(conn.handler))
        theirs = next((a for a in args["hello"].get("apps", []) if a[:1] == mine[:1]), None)
        if theirs is None:  # an older node says less: it checks inside the move
            return Answered()
        why = None
        if theirs[1] != mine[1]:
            why = f"port {mine[0]} runs {str(theirs[1])[:60]!r} there, not {mine[1]!r}"
        elif theirs[2] != mine[2]:
            why = f"{mine[1]} reads snapshot version {str(theirs[2])[:20]} there, not {mine[2]}"
        elif theirs[3] != mine[3]:
            why = f"port {mine[0]} is {'TLS' if theirs[3] else 'plain TCP'} there"
        if why:
            return No(
                f"node {self.target} cannot continue the connection: {why}; nothing was frozen"
            )
        return Answered()

    async def _lookup(self, _args: dict[str, Any]) -> Event:
        keeper = self.node.overrides
        if keeper is None or not keeper.enabled:
            return Answered({"version": None})
        try:
            return Answered({"version": await keeper.lookup(str(self.flow))})
        except StoreRefused as exc:
            return No(f"{exc}: a move is not started without it")

    async def _record(self, args: dict[str, Any]) -> Event:
        keeper = self.node.overrides
        assert keeper is not None  # noqa: S101
        override = Override(str(self.flow), str(args["host"]), by_of(self.machine.token))
        try:
            how = await keeper.record(override, int(args["version"]))
        except StoreError as exc:
            return Unreachable(str(exc))
        keeper.moved_away(str(self.flow))
        return Answered({"how": how})

    async def _take_slot(self, _args: dict[str, Any]) -> Event:
        # Only a few flows are frozen at once: in a drain the rest wait here, unfrozen, so
        # no flow's freeze spans the whole batch's work.
        await self.node.freeze_slots.acquire()
        self._slot = True
        if self.node.runtime.find(self.flow) is None:
            return No(f"flow {self.flow} closed before it could move")
        return Answered()

    def _free_slot(self) -> None:
        if self._slot:
            self._slot = False
            self.node.freeze_slots.release()

    async def _quiesce(self, args: dict[str, Any]) -> Event:
        """A proxy connection waits for its request boundary (others answer at once)."""
        try:
            waited = await self.node.runtime.quiesce(self.flow, float(args["timeout"]))
        except QuiesceError as exc:
            return No(str(exc), exc.code)
        return Answered({} if waited is None else {"waited_ms": waited})

    async def _unquiesce(self, _args: dict[str, Any]) -> Event:
        self.node.runtime.unquiesce(self.flow)
        return Answered()

    async def _freeze(self, _args: dict[str, Any]) -> Event:
        conn = self.node.runtime.find(self.flow)
        if conn is None:
            return No(f"flow {self.flow} closed before it could move")
        try:
            exported = await self.node.runtime.export(conn.id)
        except Exception as exc:  # not frozen: a failed export thaws itself
            return No(str(exc))
        self.exported = exported
        return Answered(
            {
                "tcp_state": exported.tcp.state.name,
                "tls": bool(exported.tls),
                "pending": len(exported.pending),
            }
        )

    async def _seal(self, _args: dict[str, Any]) -> Event:
        e = self.exported
        assert e is not None  # noqa: S101
        blob = MigrationBlob(self.mid, self.flow, e.tcp, e.tls, e.app, e.pending)
        try:
            sealed = seal(blob, self.node.cluster_key, source=self.node.name, target=self.target)
        except BlobError as exc:
            return No(str(exc))
        return Answered({"blob": sealed})

    async def _release(self, _args: dict[str, Any]) -> Event:
        assert self.exported is not None  # noqa: S101
        self.node.runtime.release(self.exported)
        self._free_slot()
        return Answered()

    async def _resume(self, _args: dict[str, Any]) -> Event:
        assert self.exported is not None  # noqa: S101
        try:
            self.node.runtime.resume(self.exported)
        except tcp.RepairError as exc:
            log.error("rollback of %s: cannot thaw the socket: %s", self.flow, exc)
            return No(str(exc))
        return Answered()

    async def _discard(self, _args: dict[str, Any]) -> Event:
        assert self.exported is not None  # noqa: S101
        self.node.runtime.discard(self.exported)
        return Answered()
