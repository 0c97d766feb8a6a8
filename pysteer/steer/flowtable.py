"""``FlowTable``: the pinned flow maps as typed Python, keyed by ``Flow``.

Userspace owns the actions (``flows``); the BPF programs own the counters
(``flow_stats``). Writing an action never touches the counters, so a park sequence
number cannot be rewound by a read-modify-write.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pysteer.steer.flow import Flow
from pysteer.steer.maps import Action, FlowAction, flow_key, key_flow


class FlowTableError(RuntimeError):
    """The table refused a change; the message names the flow."""


@dataclass(frozen=True)
class FlowView:
    """A flow's action (set by userspace) and counters (kept by the programs)."""

    action: Action
    host: int
    park_seq: int
    packets: tuple[int, int, int]  # per action: pass, park, to
    bytes: tuple[int, int, int]


class FlowTable:
    def __init__(self, actions: Any, stats: Any) -> None:
        self._actions, self._stats = actions, stats

    def _view(self, key: Any, action: FlowAction) -> FlowView:
        try:
            c = self._stats[key]
            counts = (c.park_seq, tuple(c.packets), tuple(c.bytes))
        except KeyError:
            counts = (0, (0, 0, 0), (0, 0, 0))
        return FlowView(Action(action.action), action.host, *counts)

    def get(self, flow: Flow) -> FlowView | None:
        key = flow_key(flow)
        try:
            return self._view(key, self._actions[key])
        except KeyError:
            return None

    def __contains__(self, flow: Flow) -> bool:
        return self.get(flow) is not None

    def set(self, flow: Flow, action: Action, host: int = 0) -> None:
        try:
            self._actions[flow_key(flow)] = FlowAction(action=action, host=host)
        except Exception as exc:  # BCC raises a bare Exception (E2BIG when full)
            if "Argument list too long" in str(exc) or "E2BIG" in str(exc):
                raise FlowTableError(f"flow table is full: cannot add {flow}") from None
            raise FlowTableError(f"cannot set {flow}: {exc}") from None

    def delete(self, flow: Flow) -> None:
        key = flow_key(flow)
        try:
            del self._actions[key]
        except KeyError:
            raise FlowTableError(f"flow {flow} is not in the table") from None
        with contextlib.suppress(KeyError):
            del self._stats[key]

    def __iter__(self) -> Iterator[tuple[Flow, FlowView]]:
        for key, action in self._actions.items():
            yield key_flow(key), self._view(key, action)

    def __len__(self) -> int:
        return sum(1 for _ in self._actions.items())
