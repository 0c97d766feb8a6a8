"""What the migration machines ask for (actions) and what they are told (events).

An action is carried out by an adapter, which answers it with exactly one event. The
machines hold no sockets and read no clock: the adapter passes ``now`` with each event.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

STEER = "steer"  # the steering node
PEER = "peer"  # the other agent


# --- actions ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Call:
    """One request to the steering node or the peer, answered within ``timeout`` seconds."""

    to: str  # STEER or PEER
    request: dict[str, Any]
    timeout: float


@dataclass(frozen=True)
class Do:
    """A local step: its name says which (the adapter knows how), ``args`` what with."""

    what: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Sleep:
    """Wait, then ask again (a bounded back-off)."""

    seconds: float


@dataclass(frozen=True)
class Finish:
    """The machine is done: ``outcome`` and why. Nothing more will be asked."""

    outcome: str
    reason: str | None = None
    answer: dict[str, Any] | None = None  # the target's answer to its source


Action = Call | Do | Sleep | Finish


# --- events -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Answered:
    """The call was answered yes (its answer), or a local step succeeded (its value)."""

    value: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Refused:
    """The other side answered no: ``code`` (``committed``, ``aborted``, ``pending``...)
    is for logic, ``message`` for people. A local step that failed is a refusal too."""

    message: str
    code: str | None = None


@dataclass(frozen=True)
class Unreachable:
    """No answer: the link is down or the call timed out. It may have been carried out."""

    message: str


@dataclass(frozen=True)
class Woke:
    """A Sleep ended."""


Event = Answered | Refused | Unreachable | Woke
