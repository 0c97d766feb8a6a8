"""The steering node's controller: flow table, hosts, parking and loss-free replay.

``Steerer`` owns the compiled programs and their pinned maps. PARK makes the BPF program
hand each of the flow's packets to userspace (perf buffer, numbered per flow) and drop
it; a poller thread queues them in order, within bounds. TO(host) replays the queue to
the host first and only then switches the flow to in-kernel redirect, then replays any
packet parked in between, so none is lost and none overtakes the replay.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pyroute2 import IPRoute

from pysteer import netns
from pysteer.steer import loader, pins
from pysteer.steer.flow import Flow
from pysteer.steer.flowtable import FlowTable, FlowTableError, FlowView
from pysteer.steer.maps import (
    MAX_HOSTS,
    Action,
    HostEntry,
    ParkMeta,
    Stat,
    flow_key,
    key_service,
    service_key,
)
from pysteer.steer.packet import PacketError, forward
from pysteer.steer.pins import pin_dir

T = TypeVar("T")


class SteerError(RuntimeError):
    """A steering request that cannot be carried out; the message says why."""


@dataclass
class Host:
    id: int
    name: str
    ifname: str
    ifindex: int
    mac: bytes  # the host's MAC on the link
    our_mac: bytes  # the steering node's MAC on that link
    mtu: int


@dataclass
class ParkCounters:
    parked: int = 0  # received by userspace
    replayed: int = 0
    dropped: int = 0  # over the queue bound
    lost: int = 0  # numbered by the kernel but never received


@dataclass
class _Queue:
    packets: dict[int, bytes] = field(default_factory=dict)  # seq -> frame
    dropped: set[int] = field(default_factory=set)  # seqs dropped over the bound
    bytes: int = 0
    next_replay: int = 0


class Steerer:
    def __init__(
        self,
        name: str,
        ifname: str,
        *,
        namespace: str | None = None,
        mode: str = "auto",
        max_per_flow: int = 8192,
        max_total_bytes: int = 256 << 20,
        max_flows: int | None = None,
    ) -> None:
        self.name, self.ifname, self.namespace = name, ifname, namespace
        self.pin = pin_dir(name)
        self.mode = self._in_ns(loader.resolve_mode, ifname, mode)
        # Native XDP only where the driver has it: auto tries a scratch program first.
        if (mode == "auto" and self.mode == "xdp-native"
                and not self._in_ns(loader.native_xdp_supported, ifname)):  # fmt: skip
            self.mode = "tc"
        self.bpf, tc_fn, xdp_fn = loader.load_steer(self.pin, self.mode, max_flows)
        self._tc_fd = tc_fn.fd
        self._xdp_fd = xdp_fn.fd if xdp_fn is not None else None
        self.table = FlowTable(self.bpf[b"flows"], self.bpf[b"flow_stats"])
        self.host_table = self.bpf[b"hosts"]
        self.stats_table = self.bpf[b"stats"]
        self.hosts: dict[str, Host] = {}
        self.max_per_flow, self.max_total_bytes = max_per_flow, max_total_bytes
        self._queues: dict[bytes, _Queue] = defaultdict(_Queue)
        self.counters: dict[bytes, ParkCounters] = defaultdict(ParkCounters)
        self._total_bytes = 0
        self._lock = threading.RLock()
        self._arrived = threading.Condition(self._lock)
        self._control = threading.Lock()  # one park/to/pass at a time
        self.bpf[b"parked"].open_perf_buffer(self._on_parked, page_cnt=1024)
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, name=f"steer:{name}", daemon=True)
        self._poller.start()
        self._in_ns(loader.attach, ifname, "tc", self._tc_fd, "pysteer_steer")
        if self._xdp_fd is not None:  # XDP first, tc as its fallback
            self._in_ns(loader.attach, ifname, self.mode, self._xdp_fd, "pysteer_steer")
        self._packet_sockets: dict[str, socket.socket] = {}

    def _in_ns(self, fn: Callable[..., T], *args: Any) -> T:
        return netns.call_in(self.namespace, fn, *args) if self.namespace else fn(*args)

    # --- hosts ------------------------------------------------------------------------------
    def items_by_host(self) -> dict[int, str]:
        return {h.id: h.name for h in self.hosts.values()}

    def add_host(self, name: str, ifname: str, mac: str | bytes) -> Host:
        """Make ``name`` a redirect target: reached on ``ifname`` at MAC ``mac``."""
        if name in self.hosts:
            raise SteerError(f"host {name!r} is already configured")
        if len(self.hosts) >= MAX_HOSTS:
            raise SteerError(f"at most {MAX_HOSTS} hosts")

        def lookup() -> tuple[int, bytes, int]:
            with IPRoute() as ipr:
                found = ipr.link_lookup(ifname=ifname)
                if not found:
                    raise SteerError(f"no interface {ifname!r} for host {name!r}")
                link = ipr.get_links(found[0])[0]
                ours = bytes.fromhex(link.get_attr("IFLA_ADDRESS").replace(":", ""))
                return found[0], ours, link.get_attr("IFLA_MTU")

        ifindex, ours, mtu = self._in_ns(lookup)
        raw_mac = mac if isinstance(mac, bytes) else bytes.fromhex(mac.replace(":", ""))
        host = Host(len(self.hosts), name, ifname, ifindex, raw_mac, ours, mtu)
        entry = HostEntry(ifindex=ifindex, mtu=mtu)
        ctypes.memmove(entry.dmac, host.mac, 6)
        ctypes.memmove(entry.smac, host.our_mac, 6)
        self.host_table[ctypes.c_uint32(host.id)] = entry
        self.hosts[name] = host
        sock = self._in_ns(socket.socket, socket.AF_PACKET, socket.SOCK_RAW)
        sock.bind((ifname, 0))
        self._packet_sockets[name] = sock
        return host

    def resolve(self, address: str, timeout: float = 3.0) -> tuple[str, str]:
        """The interface and MAC address that reach ``address`` (a host's link address):
        what ``add_host`` needs, found from the routing and neighbour tables."""

        def lookup() -> tuple[str, str]:
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            with IPRoute() as ipr:
                try:
                    route = ipr.route("get", dst=address)[0]
                except Exception as exc:
                    raise SteerError(f"no route to host address {address}: {exc}") from None
                if route.get_attr("RTA_GATEWAY"):
                    raise SteerError(f"{address} is not on a link of the steering node")
                ifname = ipr.get_links(route.get_attr("RTA_OIF"))[0].get_attr("IFLA_IFNAME")
                with socket.socket(family, socket.SOCK_DGRAM) as probe:
                    probe.sendto(b"", (address, 9))  # makes the kernel resolve its MAC
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    for n in ipr.get_neighbours(dst=address):
                        if n.get_attr("NDA_LLADDR") and n["state"] not in (0x20, 0x01):
                            return ifname, n.get_attr("NDA_LLADDR")  # not FAILED/INCOMPLETE
                    time.sleep(0.05)
            raise SteerError(f"{address} does not answer ARP/ND on {ifname}")

        return self._in_ns(lookup)

    def _host(self, name: str) -> Host:
        try:
            return self.hosts[name]
        except KeyError:
            known = ", ".join(self.hosts) or "none"
            raise SteerError(f"unknown host {name!r} (known: {known})") from None

    # --- new connections ---------------------------------------------------------------------
    def divert(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address,
               host: str | None) -> None:  # fmt: skip
        """Send new connections to ``address`` (a VIP) to ``host`` (None: route them again).

        Only a connection's first SYN is diverted, and it enters the flow table as TO(host);
        established flows keep going where they go. This is what a drain needs.
        """
        table = self.bpf[b"new_flows"]
        key = service_key(address)
        if host is None:
            with contextlib.suppress(KeyError):
                del table[key]
            return
        table[key] = ctypes.c_uint32(self._host(host).id)

    def diversions(self) -> dict[str, str]:
        names = self.items_by_host()
        return {str(key_service(k)): names.get(v.value, f"#{v.value}")
                for k, v in self.bpf[b"new_flows"].items()}  # fmt: skip

    # --- the flow table -------------------------------------------------------------------------
    def get(self, flow: Flow) -> FlowView | None:
        return self.table.get(flow)

    def _set(self, flow: Flow, action: Action, host: int = 0) -> None:
        try:
            self.table.set(flow, action, host)
        except FlowTableError as exc:
            raise SteerError(str(exc)) from None

    def park(self, flow: Flow) -> tuple[Action | None, str | None]:
        """Hold every packet of ``flow`` from now on, in order, until ``to`` or ``pass_``.

        Returns what the flow did before (action and host), so a rollback can restore it.
        """
        with self._control:
            before = self.get(flow)
            self._set(flow, Action.PARK)
        if before is None:
            return None, None
        action = Action(before.action)
        host = self.items_by_host().get(before.host) if action == Action.TO else None
        return action, host

    def to(self, flow: Flow, host: str, *, timeout: float = 2.0) -> int:
        """Send ``flow`` to ``host``: replay its parked packets, then redirect in the kernel.

        Returns how many parked packets were replayed.
        """
        target = self._host(host)
        return self._unpark(flow, Action.TO, target, target, timeout)

    def pass_(self, flow: Flow, *, replay_to: str | None = None, timeout: float = 2.0) -> int:
        """Back to normal routing (the default host).

        A parked flow's packets are replayed to ``replay_to`` (the host it is routed to),
        or dropped without it. Returns how many were replayed.
        """
        target = self._host(replay_to) if replay_to is not None else None
        return self._unpark(flow, Action.PASS, None, target, timeout)

    def _unpark(self, flow: Flow, action: Action, host: Host | None, replay_to: Host | None,
                timeout: float) -> int:  # fmt: skip
        """Switch ``flow`` to ``action``; if it was parked, replay (or drop) what was parked
        before the switch and what arrived during it, so nothing overtakes the replay."""
        with self._control:
            current = self.get(flow)
            parked = current is not None and current.action == Action.PARK
            replayed = 0
            if parked and replay_to is not None:
                replayed += self._replay(flow, replay_to, current.park_seq, timeout)
            self._set(flow, action, host.id if host is not None else 0)
            if parked:
                final = self.get(flow)
                assert final is not None  # noqa: S101
                if replay_to is not None:
                    replayed += self._replay(flow, replay_to, final.park_seq, timeout)
                self._skip_queue(flow, final.park_seq)
            return replayed

    def forget(self, flow: Flow) -> None:
        with self._control:
            try:
                self.table.delete(flow)
            except FlowTableError as exc:
                raise SteerError(str(exc)) from None
            self._drop_queue(flow)

    def items(self) -> list[tuple[Flow, FlowView]]:
        return list(self.table)

    def park_counters(self, flow: Flow) -> ParkCounters:
        return self.counters.get(bytes(flow_key(flow)), ParkCounters())

    def stats(self) -> dict[str, int]:
        out = {}
        for stat in Stat:
            if stat == Stat.GUARD_DROPPED:
                continue
            values = self.stats_table[ctypes.c_uint32(stat)]
            out[stat.name.lower()] = sum(values)
        return out

    # --- parking ------------------------------------------------------------------------------
    def _poll(self) -> None:
        while not self._stop.is_set():
            self.bpf.perf_buffer_poll(timeout=20)

    def _on_parked(self, _cpu: int, data: Any, size: int) -> None:
        meta = ctypes.cast(data, ctypes.POINTER(ParkMeta)).contents
        frame = ctypes.string_at(data + ctypes.sizeof(ParkMeta), meta.len)
        key = bytes(meta.key)
        with self._arrived:
            queue, counters = self._queues[key], self.counters[key]
            if meta.seq < queue.next_replay:  # arrived after its flow was unparked
                counters.dropped += 1
            elif (len(queue.packets) >= self.max_per_flow
                    or self._total_bytes + len(frame) > self.max_total_bytes):  # fmt: skip
                counters.dropped += 1
                queue.dropped.add(meta.seq)
            else:
                queue.packets[meta.seq] = frame
                queue.bytes += len(frame)
                self._total_bytes += len(frame)
                counters.parked += 1
            self._arrived.notify_all()

    def _replay(self, flow: Flow, host: Host, upto: int, timeout: float) -> int:
        """Send the parked packets numbered below ``upto``, in order, to ``host``."""
        key = bytes(flow_key(flow))
        sock = self._packet_sockets[host.name]
        deadline = time.monotonic() + timeout
        sent = 0
        with self._arrived:
            queue, counters = self._queues[key], self.counters[key]
            while queue.next_replay < upto:
                seq = queue.next_replay
                if seq in queue.dropped:  # over the bound: dropped and counted on arrival
                    queue.dropped.discard(seq)
                    queue.next_replay += 1
                    continue
                if seq not in queue.packets:
                    if not self._arrived.wait(max(0.0, deadline - time.monotonic())):
                        counters.lost += upto - queue.next_replay
                        queue.next_replay = upto
                        break
                    continue
                frame = queue.packets.pop(seq)
                queue.bytes -= len(frame)
                self._total_bytes -= len(frame)
                queue.next_replay += 1
                try:
                    for out in forward(frame, host.mac, host.our_mac, host.mtu):
                        sock.send(out)
                    counters.replayed += 1
                    sent += 1
                except (PacketError, OSError):
                    counters.dropped += 1
        return sent

    def _skip_queue(self, flow: Flow, upto: int) -> None:
        """Drop what is parked below ``upto``; the kernel keeps numbering from there."""
        key = bytes(flow_key(flow))
        with self._arrived:
            queue = self._queues[key]
            for seq in [s for s in queue.packets if s < upto]:
                self._total_bytes -= len(queue.packets[seq])
                queue.bytes -= len(queue.packets.pop(seq))
            queue.dropped = {s for s in queue.dropped if s >= upto}
            queue.next_replay = max(queue.next_replay, upto)

    def _drop_queue(self, flow: Flow) -> None:
        key = bytes(flow_key(flow))
        with self._arrived:
            queue = self._queues.pop(key, _Queue())
            self._total_bytes -= queue.bytes

    def destroy(self) -> None:
        """Detach, and remove the pinned maps: every flow of this instance is forgotten."""
        self.close(detach=True)
        pins.remove(self.pin.name)

    def close(self, *, detach: bool = False) -> None:
        """Stop the poller. The pinned maps and (unless ``detach``) the program stay."""
        self._stop.set()
        self._poller.join(2)
        for sock in self._packet_sockets.values():
            sock.close()
        if detach:
            self._in_ns(loader.detach, self.ifname, self.mode)
        self.bpf.cleanup()
