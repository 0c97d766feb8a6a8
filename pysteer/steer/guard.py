"""The guard on a host: drop (and count) packets of flows frozen here, so no RST leaves.

A host whose socket for a flow is frozen, released or not yet restored would answer a
stray packet of that flow with a RST. The guard's tc program drops them instead.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any, TypeVar

from pysteer import netns
from pysteer.flow import Flow
from pysteer.steer import loader, pins
from pysteer.steer.maps import Stat, flow_key
from pysteer.steer.pins import pin_dir

T = TypeVar("T")


class Guard:
    def __init__(self, name: str, ifname: str, *, namespace: str | None = None) -> None:
        self.ifname, self.namespace = ifname, namespace
        self.pin = pin_dir(name)
        self.bpf, fn = loader.load_guard(self.pin)
        self.frozen_table = self.bpf[b"frozen"]
        self.stats_table = self.bpf[b"guard_stats"]
        self._in_ns(loader.attach, ifname, "tc", fn.fd, "pysteer_guard")

    def _in_ns(self, fn: Callable[..., T], *args: Any) -> T:
        return netns.call_in(self.namespace, fn, *args) if self.namespace else fn(*args)

    def freeze(self, flow: Flow) -> None:
        self.frozen_table[flow_key(flow)] = ctypes.c_uint64(0)

    def thaw(self, flow: Flow) -> int:
        """Stop guarding ``flow``; returns how many of its packets were dropped."""
        key = flow_key(flow)
        try:
            dropped = self.frozen_table[key].value
        except KeyError:
            return 0
        del self.frozen_table[key]
        return dropped

    def dropped(self) -> int:
        return sum(self.stats_table[ctypes.c_uint32(Stat.GUARD_DROPPED)])

    def destroy(self) -> None:
        self._in_ns(loader.detach, self.ifname, "tc")
        self.bpf.cleanup()
        pins.remove(self.pin.name)
