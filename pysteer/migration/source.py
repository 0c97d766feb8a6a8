"""The source side (A) of one move, as a pure state machine.

The sequence: check the target (``hello``, or the drain's answer) and that it can take
this connection, open the links, take a freeze slot, PARK at the steering node, freeze and
dump, seal, then one ``move`` to B. B restores, thaws and *claims* the flow at the
steering node, which replays the parked packets to B only if the flow is still parked by
this migration: that claim is the commit point, and B answers once it has it. So the
freeze holds two steering round trips (park, claim) and one message to B and back.

Rollback follows the undo table: each step that changed something pushes the step that
undoes it (park → give the flow back here, freeze → resume the socket, move → decide
"aborted" at the steering node, which B's claim then cannot beat), and a rollback runs
them newest first. Once the move is sent only the steering node knows who won: a lost
or undecided answer is resolved by asking it (or B), with a bounded back-off, and if
neither answers within ``AFTER_COMMIT`` the migration is in-doubt: the socket stays
frozen and ``settle`` keeps asking until the outcome is known.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pysteer.migration.events import (
    PEER,
    STEER,
    Action,
    Answered,
    Call,
    Do,
    Event,
    Finish,
    Refused,
    Sleep,
    Unreachable,
    Woke,
)
from pysteer.migration.timeline import Timeline

AFTER_COMMIT = 5.0  # seconds allowed to learn a move's outcome before it is in-doubt
# The park's lease: the timeout plus this. If the source dies, its parked flow goes back
# when the lease ends; a live migration that outlasts it loses its claim (B's claim is
# refused, A resumes): the timeout bounds the move either way.
LEASE_MARGIN = 2.0
RETRY_MAX = 5.0  # the in-doubt resolver's longest wait between questions
DECIDE_TIMEOUT = 2.0  # for each question to the steering node after the move was sent

# The local steps an adapter carries out (Do.what), and what they answer.
CONNECT = "connect"  # args: to; opens the link now (its handshake out of the freeze)
CHECK = "check"  # args: hello; can the target continue this connection? (before parking)
QUIESCE = "quiesce"  # args: timeout; wait for a point where it may freeze (a proxy's
# request boundary), holding it there. Refused with code "busy" (not in time) or
# "not-movable" (never): nothing is held then. Answers waited_ms, or nothing when
# the connection pauses anywhere (an app): then nothing is held and nothing is undone.
UNQUIESCE = "unquiesce"  # let a held connection go on
LOOKUP = "lookup"  # the flow's version in the shared store: answers version (None: no
# store). Refused when the store cannot answer: the move is refused, nothing frozen.
RECORD = "record"  # args: host, version; after the commit, write the override (compared
# against that version) before the frozen socket goes. Answers how; refused: no answer.
SLOT = "slot"  # take a freeze slot (held until Finish): few flows are frozen at once
FREEZE = "freeze"  # pause and dump: answers tcp_state, tls, pending
SEAL = "seal"  # answers blob (the sealed bytes)
RELEASE = "release"  # B serves it: close the frozen socket silently
RESUME = "resume"  # thaw the frozen socket and serve it here again
DISCARD = "discard"  # it cannot be thawed: close it silently


@dataclass
class Outcome:
    """What the move came to, for the report."""

    outcome: str = "failed"  # moved | rolled-back | failed | in-doubt | lost | not-movable
    error: str | None = None
    freeze_ms: float | None = None  # park sent -> commit known, at A
    parked_ms: float | None = None  # park -> claim, at the steering node (the client's gap)
    replayed: int | None = None
    blob_bytes: int | None = None
    stored: str | None = None  # the override's write: written | already | superseded |
    # unanswered (the target keeps writing it); None: no shared store


def token_of(mid: bytes) -> int:
    """The steering node's name for a migration: 64 bits of its id (never 0)."""
    return int.from_bytes(mid[:8], "big") or 1


Handler = Callable[[Event, float], Action]


class Source:
    """A's side of moving ``flow`` to ``target``. ``start`` gives the first action; each
    event then gives the next, until a ``Finish``."""

    def __init__(
        self,
        *,
        mid: bytes,
        flow: str,
        dport: int,
        me: str,
        target: str,
        timeout: float,
        hello: dict[str, Any] | None = None,
        timeline: Timeline | None = None,
    ) -> None:
        """``hello``: the target's answer to a hello just asked (a drain asks once for
        all its flows); without it the move asks its own."""
        self.mid, self.flow, self.dport, self.me, self.target = mid, flow, dport, me, target
        self.token = token_of(mid)
        self.timeout = timeout
        self.hello = hello
        self.tl = timeline if timeline is not None else Timeline()
        self.result = Outcome()
        self.state = "starting"
        self.undo: list[str] = []  # to undo, oldest first: quiesce, park, freeze, move
        self._next: Handler | None = None
        self._deadline = 0.0
        self._why = ""
        self._final = "rolled-back"
        self._resolving = False
        self._settling = False
        self._delay = 0.05
        self._end = 0.0
        self._steer_error = ""
        self._unpark_end: float | None = None
        self._target_steps: Any = None
        self.version: int | None = None  # the flow's version in the store (None: no store)

    # --- driving ------------------------------------------------------------------------------
    def start(self, now: float) -> Action:
        self._deadline = now + self.timeout
        self.tl.step("start")
        if self.hello is not None:
            return self._expect(Do(CONNECT, {"to": PEER}), self._on_peer_connected)
        return self._expect(Call(PEER, {"op": "hello"}, self._left(now)), self._on_hello)

    def on(self, event: Event, now: float) -> Action:
        """The result of the last action; returns the next one."""
        handler, self._next = self._next, None
        if handler is None:
            raise RuntimeError("the migration has finished, or its action is still out")
        return handler(event, now)

    @property
    def moving(self) -> bool:
        """Whether the flow may be frozen or parked now (a crash must undo that)."""
        return bool(self.undo)

    def crashed(self, why: str, now: float) -> Action:
        """The adapter hit a bug: undo what was done (never leave it frozen or parked)."""
        self._next = None
        if self._resolving or "move" in self.undo:
            return self._resolve(why, now)
        return self._rollback(why, now, outcome="failed")

    def settle(self, now: float) -> Action:
        """An in-doubt move: ask again, with a back-off up to RETRY_MAX, until it is known."""
        self._settling, self._resolving = True, True
        self._delay = 0.2
        return self._decide(now)

    def force(self, keep: str) -> tuple[Action, str, str]:
        """The operator's decision for an in-doubt move: ``keep`` the flow on the ``source``
        (resume here) or the ``target`` (release here). The action, its outcome and why."""
        self._next = None
        if keep == "target":
            self.tl.step("released", how="operator")
            return Do(RELEASE), "moved", "resolved by the operator: the target keeps it"
        self.tl.step("resumed", how="operator")
        return Do(RESUME), "rolled-back", "resolved by the operator: the source keeps it"

    def _expect(self, action: Action, handler: Handler) -> Action:
        self._next = handler
        return action

    def _left(self, now: float) -> float:
        return max(self._deadline - now, 0.001)

    def _finish(self, outcome: str, reason: str | None) -> Finish:
        self.result.outcome, self.result.error = outcome, reason
        self.state = outcome
        return Finish(outcome, reason)

    # --- before the freeze ----------------------------------------------------------------------
    def _on_hello(self, event: Event, now: float) -> Action:
        if not isinstance(event, Answered):
            return self._finish("failed", f"node {self.target} is unreachable: {_text(event)}")
        self.hello = event.value
        return self._checked_hello(now)

    def _on_peer_connected(self, event: Event, now: float) -> Action:
        if not isinstance(event, Answered):
            return self._finish("failed", f"node {self.target} is unreachable: {_text(event)}")
        return self._checked_hello(now)

    def _checked_hello(self, now: float) -> Action:
        hello = self.hello or {}
        if not hello.get("accepting", False):
            return self._finish("failed", f"node {self.target} refuses imports (cordoned)")
        if self.dport not in hello.get("services", []):
            return self._finish("failed", f"node {self.target} does not serve port {self.dport}")
        return self._expect(Do(CHECK, {"hello": hello}), self._on_check)

    def _on_check(self, event: Event, now: float) -> Action:
        if isinstance(event, Refused):  # the target could not continue it: nothing frozen
            return self._finish("failed", event.message)
        return self._expect(Do(LOOKUP), self._on_looked_up)

    def _on_looked_up(self, event: Event, now: float) -> Action:
        if not isinstance(event, Answered):  # no store: no record of the move, no move
            return self._finish("failed", f"{_text(event)}; nothing was frozen")
        version = event.value.get("version")
        self.version = version if isinstance(version, int) else None
        return self._expect(Do(CONNECT, {"to": STEER}), self._on_steer_connected)

    def _on_steer_connected(self, event: Event, now: float) -> Action:
        if not isinstance(event, Answered):
            return self._finish("failed", f"steering node: {_text(event)}; nothing was frozen")
        self.tl.step("peer-ready")
        return self._expect(Do(QUIESCE, {"timeout": self._left(now)}), self._on_quiesced)

    def _on_quiesced(self, event: Event, now: float) -> Action:
        if isinstance(event, Refused):
            if event.code == "not-movable":
                return self._finish("not-movable", event.message)
            if event.code == "busy":  # it was never frozen, and it goes on as before
                return self._finish("rolled-back", f"{event.message}; nothing was frozen")
            return self._finish("failed", event.message)
        if not isinstance(event, Answered):
            return self._finish("failed", _text(event))
        if "waited_ms" in event.value:  # held at a boundary (a proxy)
            self.undo.append("quiesce")
            waited = event.value["waited_ms"]
            self.tl.step("quiesced", waited_ms=waited)
            if waited:  # the wait was not the move's: the move gets its whole timeout
                self._deadline = now + self.timeout
        return self._expect(Do(SLOT), self._on_slot)

    def _on_slot(self, event: Event, now: float) -> Action:
        if not isinstance(event, Answered):  # the connection closed meanwhile
            return self._finish("failed", _text(event))
        self.tl.step("park")
        lease = round(self.timeout + LEASE_MARGIN, 3)
        request = {
            "cmd": "park",
            "flow": self.flow,
            "token": self.token,
            "owner": self.me,
            "lease": lease,
        }
        return self._expect(Call(STEER, request, self._left(now)), self._on_parked)

    # --- the freeze -------------------------------------------------------------------------
    def _on_parked(self, event: Event, now: float) -> Action:
        if isinstance(event, Refused):
            return self._finish(
                "failed", f"steering node refused: {event.message}; nothing was frozen"
            )
        self.undo.append("park")  # unanswered, it may have parked all the same
        if isinstance(event, Unreachable):
            why = f"steering node: {event.message}; nothing was frozen"
            return self._rollback(why, now, outcome="failed")
        self.state = "parked"
        self.tl.step("parked", was=event.value.get("was"))
        return self._expect(Do(FREEZE), self._on_frozen)

    def _on_frozen(self, event: Event, now: float) -> Action:
        if not isinstance(event, Answered):  # a failed export thaws itself
            return self._rollback(f"freeze failed here: {_text(event)}", now)
        self.undo.append("freeze")
        self.state = "frozen"
        v = event.value
        self.tl.step(
            "frozen", tcp_state=v.get("tcp_state"), tls=v.get("tls"), pending=v.get("pending")
        )
        return self._expect(Do(SEAL), self._on_sealed)

    def _on_sealed(self, event: Event, now: float) -> Action:
        if not isinstance(event, Answered):
            return self._rollback(_text(event), now)
        blob = event.value["blob"]
        self.result.blob_bytes = len(blob)
        self.tl.step("sealed", bytes=len(blob))
        self.undo.append("move")  # from now on B may claim it: a rollback must win at steering
        self.state = "moving"
        self.tl.step("move")
        request: dict[str, Any] = {"op": "move", "id": self.mid, "blob": blob}
        if self.version is not None:  # the target writes the override against it too
            request["version"] = self.version
        # Within the move's timeout: past it, the steering node decides (a revert wins
        # over a claim that comes later), so the timeout bounds the freeze either way.
        return self._expect(Call(PEER, request, self._left(now)), self._on_moved)

    def _on_moved(self, event: Event, now: float) -> Action:
        if isinstance(event, Answered):
            v = event.value
            parked = v.get("parked_ms")
            self.result.parked_ms = float(parked) if isinstance(parked, int | float) else None
            self._target_steps = v.get("steps")
            return self._moved(int(v.get("replayed", 0)), None, now)
        if isinstance(event, Refused):
            if event.code == "pending":  # B waits on the steering node: ask who won
                return self._resolve(f"{self.target} has not heard from the steering node", now)
            return self._rollback(f"node {self.target}: {event.message}", now)
        return self._resolve(f"node {self.target}: no answer to the move ({_text(event)})", now)

    # --- the end ----------------------------------------------------------------------------
    def _moved(self, replayed: int | None, how: str | None, now: float) -> Action:
        """B serves the flow: close the frozen socket here silently."""
        detail: dict[str, Any] = {"how": how} if how else {}
        if self._target_steps:  # B's own steps, in ms: where the move's time went there
            detail["target_ms"] = self._target_steps
        if self.result.parked_ms is not None:
            detail["parked_ms"] = self.result.parked_ms
        self.tl.step("committed" if how is None else "resolved", replayed=replayed, **detail)
        self.result.replayed = replayed
        self.result.freeze_ms = self.tl.span("park", "committed" if how is None else "resolved")
        self.undo.clear()
        if self.version is not None:  # recorded before the frozen socket goes
            args = {"host": self.target, "version": self.version}
            return self._expect(Do(RECORD, args), self._on_recorded)
        return self._expect(Do(RELEASE), self._on_released)

    def _on_recorded(self, event: Event, now: float) -> Action:
        if isinstance(event, Answered):
            self.result.stored = str(event.value.get("how", "written"))
            self.tl.step("recorded", how=self.result.stored)
        else:  # committed all the same: the target keeps writing it until it lands
            self.result.stored = "unanswered"
            self.tl.step("unrecorded", error=_text(event))
        return self._expect(Do(RELEASE), self._on_released)

    def _on_released(self, event: Event, now: float) -> Action:
        self.tl.step("released")
        return self._finish("moved", None)

    # --- learning who won -------------------------------------------------------------------
    def _resolve(self, why: str, now: float) -> Action:
        """After a lost or undecided move: learn the outcome, or decide it (revert) while the
        flow is still ours to take back."""
        if self._resolving:
            return self._unreachable(why, now)
        self._resolving = True
        self._why = f"{self._why}; {why}" if self._why else why  # a rollback's reason first
        self.tl.step("resolving", why=self._why)
        self._end = now + AFTER_COMMIT
        self._delay = 0.05
        return self._decide(now)

    def _decide(self, now: float) -> Action:
        request = {"cmd": "decision", "flow": self.flow, "token": self.token}
        return self._expect(Call(STEER, request, DECIDE_TIMEOUT), self._on_decision)

    def _on_decision(self, event: Event, now: float) -> Action:
        if not isinstance(event, Answered):
            self._steer_error = _text(event)
            request = {"op": "outcome", "id": self.mid}
            return self._expect(Call(PEER, request, 1.0), self._on_target_outcome)
        decision = event.value.get("decision")
        if decision == "committed":
            return self._moved(
                None, f"the steering node: {event.value.get('host')} claimed it", now
            )
        if decision == "aborted":  # decided already: nothing can claim it now
            self._drop_undo("move")
        return self._rollback(self._why, now)

    def _on_target_outcome(self, event: Event, now: float) -> Action:
        outcome = event.value.get("outcome") if isinstance(event, Answered) else None
        if outcome == "committed":
            return self._moved(None, "the target committed", now)
        if outcome == "aborted":  # its claim was refused: the steering node decided so
            self._drop_undo("move")
            return self._rollback(f"{self._why}; {self.target} aborted", now)
        return self._unreachable(f"steering node: {self._steer_error}", now)

    def _unreachable(self, error: str, now: float) -> Action:
        """Nobody could say or decide: ask again after a back-off, or give up: in-doubt."""
        if not self._settling and now + self._delay > self._end:
            self.state = "in-doubt"
            return self._finish(
                "in-doubt",
                f"{self._why}; {error}; the socket stays frozen here and the outcome is "
                "asked again until known",
            )
        delay = self._delay
        self._delay = min(delay * 2, RETRY_MAX if self._settling else 1.0)
        return self._expect(Sleep(delay), self._after_sleep)

    def _after_sleep(self, event: Event, now: float) -> Action:
        return self._decide(now)

    # --- rollback: the undo table, newest first --------------------------------------------------
    def _drop_undo(self, step: str) -> None:
        if step in self.undo:
            self.undo.remove(step)

    def _rollback(self, why: str, now: float, *, outcome: str = "rolled-back") -> Action:
        self._why = why
        self._final = outcome
        return self._undo_next(now)

    def _undo_next(self, now: float) -> Action:
        if not self.undo:
            return self._finish(self._final, self._why)
        step = self.undo[-1]
        if step == "move":  # decide "aborted" first: B's claim can no longer win
            request = {"cmd": "revert", "flow": self.flow, "token": self.token, "hold": True}
            return self._expect(Call(STEER, request, DECIDE_TIMEOUT), self._on_reverted)
        if step == "freeze":
            self.tl.step("decided", outcome="aborted")
            return self._expect(Do(RESUME), self._on_resumed)
        if step == "quiesce":
            return self._expect(Do(UNQUIESCE), self._on_unquiesced)
        return self._unpark(now)

    def _on_unquiesced(self, event: Event, now: float) -> Action:
        self.undo.pop()
        return self._undo_next(now)

    def _on_reverted(self, event: Event, now: float) -> Action:
        if isinstance(event, Answered):
            self.undo.pop()
            return self._undo_next(now)
        if isinstance(event, Refused) and event.code == "committed":
            return self._moved(None, "the target claimed it first", now)
        if isinstance(event, Refused):
            return self._resolve(f"steering node refused the rollback: {event.message}", now)
        return self._resolve(f"steering node: {event.message}", now)

    def _on_resumed(self, event: Event, now: float) -> Action:
        self.undo.pop()
        if isinstance(event, Answered):
            self.tl.step("resumed")
            return self._undo_next(now)
        self._why = f"{self._why}; and the socket could not be thawed: {_text(event)}"
        self._final = "lost"
        return self._expect(Do(DISCARD), self._on_discarded)

    def _on_discarded(self, event: Event, now: float) -> Action:
        self.tl.step("lost")
        return self._undo_next(now)

    def _unpark(self, now: float) -> Action:
        """Give the parked flow back here (replaying what was parked). If the steering node
        cannot be reached, the park's lease does the same later."""
        if self._unpark_end is None:
            self._unpark_end = now + AFTER_COMMIT
        request = {"cmd": "revert", "flow": self.flow, "token": self.token, "host": self.me}
        return self._expect(Call(STEER, request, DECIDE_TIMEOUT), self._on_unparked)

    def _on_unparked(self, event: Event, now: float) -> Action:
        if isinstance(event, Answered):
            self.tl.step("unparked")
        elif isinstance(event, Refused) or now > (self._unpark_end or 0.0):
            self.tl.step("unpark-failed", error=_text(event))
        else:
            return self._expect(Sleep(0.1), lambda _e, t: self._unpark(t))
        self.undo.pop()
        return self._undo_next(now)


def _text(event: Event) -> str:
    if isinstance(event, Refused | Unreachable):
        return event.message
    if isinstance(event, Woke):
        return "woke"
    return "unexpected answer"
