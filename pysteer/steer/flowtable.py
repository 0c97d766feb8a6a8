"""``FlowTable``: the pinned flow maps as typed Python, keyed by ``Flow``.

Userspace owns the actions (``flows``); the BPF programs own the counters and the
connection tracking (``flow_stats``). Writing an action never touches the counters, so a
park sequence number cannot be rewound by a read-modify-write.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pysteer.flow import Flow
from pysteer.steer.maps import F_FIN, Action, FlowAction, FlowKey, flow_key, key_flow


class FlowTableError(RuntimeError):
    """The table refused a change; the message names the flow."""


class FlowTableFull(FlowTableError):
    """No room for another flow: every entry is in use."""


@dataclass(frozen=True)
class FlowView:
    """A flow's action (set by userspace) and counters (kept by the programs)."""

    action: Action
    host: int
    park_seq: int
    packets: tuple[int, int, int]  # per action: pass, park, to
    bytes: tuple[int, int, int]
    token: int = 0  # the migration that parked (PARK) or moved (TO) it
    prev_action: Action = Action.NONE  # PARK: what a rollback restores
    prev_host: int = 0
    lease_ns: int = 0  # PARK: CLOCK_MONOTONIC deadline of its migration
    last_ns: int = 0  # CLOCK_MONOTONIC time of its last packet (0: none seen)
    fins: tuple[bool, bool] = (False, False)  # a FIN seen from the client, from the service


def _view(action: FlowAction, c: Any | None) -> FlowView:
    counts: tuple[Any, ...] = (0, (0, 0, 0), (0, 0, 0))
    last, fins = 0, (False, False)
    if c is not None:
        counts = (c.park_seq, tuple(c.packets), tuple(c.bytes))
        last, fins = c.last_ns, (bool(c.flags[0] & F_FIN), bool(c.flags[1] & F_FIN))
    return FlowView(
        Action(action.action),
        action.host,
        *counts,
        token=action.token,
        prev_action=Action(action.prev_action),
        prev_host=action.prev_host,
        lease_ns=action.lease_ns,
        last_ns=last,
        fins=fins,
    )


class FlowTable:
    def __init__(self, actions: Any, stats: Any) -> None:
        self._actions, self._stats = actions, stats

    @property
    def capacity(self) -> int:
        return int(self._actions.max_entries)

    def get(self, flow: Flow) -> FlowView | None:
        key = flow_key(flow)
        try:
            action = self._actions[key]
        except KeyError:
            return None
        try:
            c = self._stats[key]
        except KeyError:
            c = None
        return _view(action, c)

    def __contains__(self, flow: Flow) -> bool:
        return self.get(flow) is not None

    def set(
        self,
        flow: Flow,
        action: Action,
        host: int = 0,
        *,
        token: int = 0,
        prev: tuple[Action, int] = (Action.NONE, 0),
        lease_ns: int = 0,
    ) -> None:
        value = FlowAction(
            action=action,
            host=host,
            prev_action=prev[0],
            prev_host=prev[1],
            token=token,
            lease_ns=lease_ns,
        )
        try:
            self._actions[flow_key(flow)] = value
        except Exception as exc:  # BCC raises a bare Exception (E2BIG when full)
            if "Argument list too long" in str(exc) or "E2BIG" in str(exc):
                raise FlowTableFull(f"flow table is full: cannot add {flow}") from None
            raise FlowTableError(f"cannot set {flow}: {exc}") from None

    def delete(self, flow: Flow, *, stats: bool = True) -> None:
        """Remove the flow's entry (and, unless ``stats`` is False, its counters)."""
        key = flow_key(flow)
        try:
            del self._actions[key]
        except KeyError:
            raise FlowTableError(f"flow {flow} is not in the table") from None
        if stats:
            self.delete_stats(flow)

    def delete_stats(self, flow: Flow) -> None:
        with contextlib.suppress(KeyError):
            del self._stats[flow_key(flow)]

    def _items(self, table: Any) -> list[tuple[bytes, Any]]:
        """Every (key bytes, value) pair, in one batch syscall where the kernel has it."""
        try:
            return [(bytes(k), v) for k, v in table.items_lookup_batch()]
        except Exception:  # no batch support (older kernels): one lookup per entry
            return [(bytes(k), v) for k, v in table.items()]

    def __iter__(self) -> Iterator[tuple[Flow, FlowView]]:
        stats = dict(self._items(self._stats))
        for key, action in self._items(self._actions):
            yield key_flow(FlowKey.from_buffer_copy(key)), _view(action, stats.get(key))

    def orphan_stats(self) -> list[Flow]:
        """Flows with counters but no entry (left by a race): safe to delete."""
        actions = {k for k, _ in self._items(self._actions)}
        return [
            key_flow(FlowKey.from_buffer_copy(k))
            for k, _ in self._items(self._stats)
            if k not in actions
        ]

    def __len__(self) -> int:
        return len(self._items(self._actions))
