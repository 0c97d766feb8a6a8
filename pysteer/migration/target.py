"""The target side (B) of one move, as a pure state machine.

On ``move`` B opens the sealed blob (bound to this migration, from this source, for this
node; recorded in the ledger so a replay is refused), restores the socket frozen, builds
the connection (everything that could refuse it does so here), thaws the socket and then
*claims* the flow at the steering node. The claim is the commit point: if the flow is
still parked by this migration, the steering node replays its packets here and steers it
here, and B serves it. If the source decided "aborted" first, the claim is refused and B
drops its copy silently (repair mode: no FIN, no RST). Silence is never taken for a no:
B asks again until the steering node answers, since it may have said yes.

Undo table: open → record "aborted" in the ledger; restore → discard the socket.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pysteer.migration.events import (
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
)
from pysteer.migration.source import token_of

CLAIM_TIMEOUT = 2.0  # per claim request; B asks again on silence
CLAIM_RETRY_MAX = 2.0

# The local steps an adapter carries out (Do.what).
OPEN = "open"  # check and open the blob, record it in the ledger: answers flow, dport
RESTORE = "restore"  # the socket, frozen
BUILD = "build"  # the connection, checked, not yet served
THAW = "thaw"  # leave repair mode (the first ACK goes out); ledger: claiming
SERVE = "serve"  # serve it; ledger: committed
ABORTED = "aborted"  # ledger: aborted
DISCARD = "discard"  # close the restored socket silently

Handler = Callable[[Event, float], Action]


class Target:
    """B's side of one move: ``start`` gives the first action, each event the next, until
    a ``Finish`` whose ``answer`` goes back to the source."""

    def __init__(self, *, mid: bytes, source: str, me: str) -> None:
        self.mid, self.source, self.me = mid, source, me
        self.short = mid.hex()[:12]
        self.flow: str | None = None
        self.state = "opening"
        self.undo: list[str] = []  # "ledger", "socket": what a refusal must undo
        self.claimed = False
        self.reason: str | None = None  # why it was refused
        self.refused_in: str | None = None  # the state it was refused in
        self._next: Handler | None = None
        self._answer: dict[str, Any] = {}
        self._delay = 0.05

    def start(self, now: float) -> Action:
        return self._expect(Do(OPEN), self._on_open)

    def on(self, event: Event, now: float) -> Action:
        handler, self._next = self._next, None
        if handler is None:
            raise RuntimeError("the import has finished, or its action is still out")
        return handler(event, now)

    def force(self, keep: str) -> tuple[list[Action], str]:
        """The operator decides a claiming import: serve it here (``target``) or drop it."""
        self._next = None
        if keep == "target":
            return [Do(SERVE)], "moved"
        self.undo = ["ledger", "socket"]
        return [Do(DISCARD), Do(ABORTED)], "rolled-back"

    def crashed(self, why: str, now: float) -> Action:
        """The adapter hit a bug: drop the copy unless the steering node gave it to us."""
        self._next = None
        if self.claimed:
            return Finish("failed", why, {"ok": False, "error": why})
        return self._refuse(why, None, now)

    def _expect(self, action: Action, handler: Handler) -> Action:
        self._next = handler
        return action

    def _refuse(self, error: str, code: str | None, now: float) -> Action:
        """Undo what was done, newest first, then answer no."""
        self._answer = {"ok": False, "error": error, **({"code": code} if code else {})}
        self.reason, self.refused_in = error, self.state
        self.state = "aborted"
        return self._undo_next(now)

    def _undo_next(self, now: float) -> Action:
        if not self.undo:
            return Finish("refused", self._answer["error"], self._answer)
        step = self.undo.pop()
        return self._expect(
            Do(DISCARD if step == "socket" else ABORTED), lambda _e, t: self._undo_next(t)
        )

    def _on_open(self, event: Event, now: float) -> Action:
        if not isinstance(event, Answered):
            return Finish("refused", _text(event), {"ok": False, "error": _text(event)})
        self.flow = str(event.value["flow"])
        self.undo.append("ledger")
        self.state = "restoring"
        return self._expect(Do(RESTORE), self._on_restored)

    def _on_restored(self, event: Event, now: float) -> Action:
        if not isinstance(event, Answered):
            return self._refuse(f"restore failed on {self.me}: {_text(event)}", None, now)
        self.undo.append("socket")
        return self._expect(Do(BUILD), self._on_built)

    def _on_built(self, event: Event, now: float) -> Action:
        if not isinstance(event, Answered):
            return self._refuse(
                f"{self.me} cannot continue the connection: {_text(event)}", None, now
            )
        self.state = "thawing"
        return self._expect(Do(THAW), self._on_thawed)

    def _on_thawed(self, event: Event, now: float) -> Action:
        if not isinstance(event, Answered):  # thaw froze it again: discarding is silent
            return self._refuse(f"thaw failed on {self.me}: {_text(event)}", "aborted", now)
        self.state = "claiming"
        return self._claim()

    def _claim(self) -> Action:
        request = {"cmd": "claim", "flow": self.flow, "host": self.me, "token": token_of(self.mid)}
        return self._expect(Call(STEER, request, CLAIM_TIMEOUT), self._on_claimed)

    def _on_claimed(self, event: Event, now: float) -> Action:
        if isinstance(event, Refused):
            return self._refuse(f"steering node: {event.message}", "aborted", now)
        if isinstance(event, Unreachable):  # it may have said yes: ask until it answers
            delay = self._delay
            self._delay = min(delay * 2, CLAIM_RETRY_MAX)
            return self._expect(Sleep(delay), lambda _e, _t: self._claim())
        self.claimed = True
        self.undo.clear()
        v = event.value
        self._answer = {"ok": True, "replayed": int(v.get("replayed", 0))}
        if isinstance(v.get("parked_ms"), int | float):
            self._answer["parked_ms"] = v["parked_ms"]
        return self._expect(Do(SERVE), self._on_served)

    def _on_served(self, event: Event, now: float) -> Action:
        self.state = "committed"
        return Finish("committed", None, self._answer)


def _text(event: Event) -> str:
    if isinstance(event, Refused | Unreachable):
        return event.message
    return "unexpected answer"
