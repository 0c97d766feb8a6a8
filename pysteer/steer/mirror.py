"""A steering node's copy of the shared store's overrides, as a pure state machine.

The store feed (``pysteer.steer.store_feed``) gives it what etcd says: a full read in
parts (at start and after every watch gap), then each change in order. It answers with
what the steering node must do to its own maps: steer a flow to a host (``set``) or
drop an entry the store no longer backs (``unset``); divert a VIP's new connections to
a host for a drain (``divert``), or stop (``undivert``). A change at or below the revision
already applied is a duplicate from before a resync and changes nothing.

The data path never waits on it: packets are steered from the maps, and a migration
switches every steering node directly; the mirror only makes a node that restarted,
joined, or missed a switch agree with the store.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SET, UNSET = "set", "unset"
DIVERT, UNDIVERT = "divert", "undivert"


@dataclass(frozen=True)
class Op:
    """What the steering node must do: ``set`` flow -> host, or ``unset`` flow (if it
    still goes to host); ``divert`` the VIP ``flow`` to host, or ``undivert`` it."""

    what: str
    flow: str  # a flow, or for a diversion its VIP
    host: str


@dataclass
class Mirror:
    known: dict[str, str] = field(default_factory=dict)  # flow -> host, as last applied
    diversions: dict[str, str] = field(default_factory=dict)  # VIP -> host
    revision: int = 0  # the store revision everything applied is at
    state: str = "loading"  # loading | synced | resyncing | down
    why: str = ""  # the last gap or outage
    counts: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            (
                "loads",
                "changes",
                "duplicates",
                "gaps",
                "outages",
                "bad",
                "set",
                "unset",
                "divert",
                "undivert",
            ),
            0,
        )
    )
    _incoming: dict[str, str] | None = None

    @property
    def loaded(self) -> bool:
        """Whether one full read has been applied (a node attaches only after it)."""
        return self.counts["loads"] > 0

    def part(
        self,
        items: list[tuple[str, str]],
        *,
        last: bool,
        revision: int,
        diversions: dict[str, str] | None = None,
    ) -> list[Op]:
        """Part of a full read (flow, host pairs; the diversions with the last part); the
        ops once the last part is in."""
        if self._incoming is None:
            self._incoming = {}
        self._incoming.update(items)
        if not last:
            return []
        fresh, self._incoming = self._incoming, None
        ops = [Op(SET, f, h) for f, h in fresh.items() if self.known.get(f) != h]
        ops += [Op(UNSET, f, h) for f, h in self.known.items() if f not in fresh]
        routes = diversions or {}
        ops += [Op(DIVERT, a, h) for a, h in routes.items() if self.diversions.get(a) != h]
        ops += [Op(UNDIVERT, a, h) for a, h in self.diversions.items() if a not in routes]
        self.known, self.diversions, self.revision = fresh, dict(routes), revision
        self.state = "synced"
        self.counts["loads"] += 1
        self._count(ops)
        return ops

    def change(
        self, flow: str, host: str | None, revision: int, *, kind: str = "override"
    ) -> list[Op]:
        """One change from the watch (host None: removed); ``kind`` override, or
        diversion (``flow`` is then the VIP)."""
        if revision <= self.revision:
            self.counts["duplicates"] += 1
            return []
        self.revision = revision
        self.counts["changes"] += 1
        if kind == "diversion":
            return self._diversion(flow, host)
        before = self.known.get(flow)
        if host is None:
            if before is None:
                return []
            del self.known[flow]
            ops = [Op(UNSET, flow, before)]
        else:
            self.known[flow] = host
            ops = [] if before == host else [Op(SET, flow, host)]
        self._count(ops)
        return ops

    def _diversion(self, address: str, host: str | None) -> list[Op]:
        before = self.diversions.get(address)
        if host is None:
            if before is None:
                return []
            del self.diversions[address]
            ops = [Op(UNDIVERT, address, before)]
        else:
            self.diversions[address] = host
            ops = [] if before == host else [Op(DIVERT, address, host)]
        self._count(ops)
        return ops

    def gap(self, why: str) -> None:
        """The watch broke or its history is gone: a full read follows."""
        self.state, self.why = "resyncing", why
        self._incoming = None
        self.counts["gaps"] += 1

    def down(self, why: str) -> None:
        """The store does not answer: the maps stay as they are until it does."""
        if self.state != "down":
            self.counts["outages"] += 1
        self.state, self.why = "down", why
        self._incoming = None

    def bad(self) -> None:
        self.counts["bad"] += 1

    def report(self) -> dict[str, object]:
        return {
            "state": self.state,
            "revision": self.revision,
            "overrides": len(self.known),
            "diversions": dict(self.diversions),
            "why": self.why,
            **self.counts,
        }

    def _count(self, ops: list[Op]) -> None:
        for op in ops:
            self.counts[op.what] += 1
