"""The steering node's controller: flow table, hosts, parking, replay, and flow lifecycle.

``Steerer`` owns the compiled programs and their pinned maps. PARK makes the BPF program
hand each of the flow's packets to userspace (perf buffer, numbered per flow) and drop
it; a poller thread queues them in order, within bounds. TO(host) replays the queue to
the host first and only then switches the flow to in-kernel redirect, then replays any
packet parked in between, so none is lost and none overtakes the replay.

It is also the commit point of a migration. The source parks the flow with the
migration's token and a lease; the target *claims* it (replay, then TO(target)) only if
it is still parked by that token, and the source *reverts* it (replay, then what it was
before) on the same condition. Exactly one of the two can win, and the outcome is kept
in the pinned ``decisions`` map, so a side that lost an answer, or restarted, learns it.
A lease that runs out (its source died) is reverted here.

Entries end with their connections: the programs delete them at the last ACK or a RST,
agents report the connections they close and list those they serve (``sync``), and
``gc`` removes entries idle longer than ``idle_timeout`` that no agent claims.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import logging
import os
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pyroute2 import IPRoute

from pysteer import netns
from pysteer.flow import Flow, FlowSyntaxError
from pysteer.steer import loader, pins
from pysteer.steer.flowtable import FlowTable, FlowTableError, FlowTableFull, FlowView
from pysteer.steer.maps import (
    MAX_HOSTS,
    Action,
    Decision,
    DecisionEntry,
    FlowAction,
    FlowKey,
    FlowStats,
    HostEntry,
    ParkMeta,
    ServiceKey,
    Stat,
    flow_key,
    key_flow,
    key_service,
    mac_bytes,
    service_key,
)
from pysteer.steer.packet import PacketError, forward
from pysteer.steer.pins import pin_dir

T = TypeVar("T")
log = logging.getLogger("pysteer.steer")

DEFAULT_MAX_FLOWS = 65536
MAX_SERVICES = 64
MAX_DECISIONS = 65536
CLAIM_GRACE = 2.0  # seconds: an entry changed or seen this recently is never removed by sync
START_HOLD = 10.0  # seconds after start before idle entries go (agents re-claim theirs)
# Seconds a replay waits for a packet the kernel numbered but userspace has not received
# yet (normally well under a millisecond): after it, the packet counts as lost (the client
# retransmits it). The wait holds the table's lock, so it is kept short.
REPLAY_WAIT = 1.0


class SteerError(RuntimeError):
    """A steering request that cannot be carried out; the message says why."""


class Refusal(SteerError):
    """A conditional change that does not apply; ``code`` says why, for the caller's logic:
    ``committed`` / ``aborted`` (the migration is decided), ``conflict`` (another migration
    or an operator holds the flow), ``absent`` (not parked by this migration)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Host:
    id: int
    name: str
    ifname: str
    ifindex: int
    mac: bytes  # the host's MAC on the link
    our_mac: bytes  # the steering node's MAC on that link
    mtu: int


@dataclass(frozen=True)
class HostSpec:
    """A redirect target as the operator gives it: reached on ``ifname`` at ``mac``."""

    name: str
    ifname: str
    mac: str | bytes


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


@dataclass(frozen=True)
class Removal:
    """An entry gc removed (or would remove, on a dry run), and why."""

    flow: Flow
    action: str
    host: str | None
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {
            "flow": str(self.flow),
            "action": self.action,
            "host": self.host,
            "reason": self.reason,
        }


# --- pinned maps: what this version expects ----------------------------------------------
_BPF_HASH, _BPF_ARRAY, _BPF_PERCPU_ARRAY, _BPF_LRU_HASH = 1, 2, 6, 9


def expected_layout(max_flows: int) -> dict[str, pins.MapInfo]:
    key, size = ctypes.sizeof(FlowKey), ctypes.sizeof
    return {
        "flows": pins.MapInfo(_BPF_HASH, key, size(FlowAction), max_flows),
        "flow_stats": pins.MapInfo(_BPF_HASH, key, size(FlowStats), max_flows),
        "hosts": pins.MapInfo(_BPF_ARRAY, 4, size(HostEntry), MAX_HOSTS),
        "stats": pins.MapInfo(_BPF_PERCPU_ARRAY, 4, 8, len(Stat)),
        "new_flows": pins.MapInfo(_BPF_HASH, size(ServiceKey), 4, MAX_SERVICES),
        "decisions": pins.MapInfo(_BPF_LRU_HASH, 8, size(DecisionEntry), MAX_DECISIONS),
    }


def check_pins(name: str, max_flows: int | None) -> int:
    """The flow table size to use with instance ``name``'s pinned maps, or a SteerError.

    A table that is pinned keeps its size: ``max_flows`` must then be None or equal. Maps
    of another layout (another pysteer version) are refused, never silently reused.
    """
    if max_flows is not None and not 1 <= max_flows <= 1 << 24:
        raise SteerError(f"--max-flows must be 1..{1 << 24}, not {max_flows}")
    try:
        pinned = pins.pinned_maps(name)
    except OSError as exc:
        raise SteerError(f"cannot read the maps pinned for {name!r}: {exc}") from None
    if not pinned:
        return max_flows or DEFAULT_MAX_FLOWS
    where = pins.PIN_ROOT / name
    size = pinned["flows"].max_entries if "flows" in pinned else None
    if max_flows is not None and size is not None and size != max_flows:
        raise SteerError(
            f"the flow table pinned at {where} holds {size} flows, and --max-flows {max_flows} "
            f"differs: run without --max-flows to keep it, or remove it first with "
            f"`pysteer steer destroy --name {name}` (every steered flow is dropped)"
        )
    want = expected_layout(size or max_flows or DEFAULT_MAX_FLOWS)
    for map_name, expect in want.items():
        have = pinned.get(map_name)
        if have != expect:
            found = (
                "absent"
                if have is None
                else (
                    f"key {have.key_size} B, value {have.value_size} B, {have.max_entries} entries"
                )
            )
            raise SteerError(
                f"the maps pinned at {where} have another layout ({map_name}: {found}; "
                f"this version needs key {expect.key_size} B, value {expect.value_size} B, "
                f"{expect.max_entries} entries): they were made by another pysteer version. "
                f"Remove them with `pysteer steer destroy --name {name}` (every steered flow "
                "is dropped) and start again"
            )
    return want["flows"].max_entries


def _now_ns() -> int:
    return time.monotonic_ns()  # the clock of bpf_ktime_get_ns()


class Steerer:
    def __init__(  # noqa: PLR0915 - the daemon's state, set in one place
        self,
        name: str,
        ifname: str,
        *,
        namespace: str | None = None,
        mode: str = "auto",
        max_per_flow: int = 8192,
        max_total_bytes: int = 256 << 20,
        max_flows: int | None = None,
        hosts: Iterable[HostSpec] = (),
        idle_timeout: float = 300.0,
        preload: dict[str, str] | None = None,
        diversions: dict[str, str] | None = None,
    ) -> None:
        """Check everything first (interface, hosts, pinned maps, programs), then write the
        hosts and attach: a steerer that fails to start leaves what runs untouched.

        ``preload``: the shared store's overrides (flow -> host), written to the table
        before the programs attach: a steering node that restarts or joins never sends
        a moved flow's packet to its default host."""
        self.name, self.ifname, self.namespace = name, ifname, namespace
        self.idle_timeout = idle_timeout
        self.mode = self._in_ns(loader.resolve_mode, ifname, mode)
        # Native XDP only where the driver has it: auto tries a scratch program first.
        if (
            mode == "auto"
            and self.mode == "xdp-native"
            and not self._in_ns(loader.native_xdp_supported, ifname)
        ):
            self.mode = "tc"
        self._own_macs = self._in_ns(_link_macs)
        specs = [self._resolve_host(spec) for spec in hosts]
        if len({h.name for h in specs}) != len(specs):
            raise SteerError("a host is given twice")
        self.max_flows = check_pins(name, max_flows)
        self.pin = pin_dir(name)
        self.bpf, tc_fn, xdp_fn, egress_fn = loader.load_steer(self.pin, self.mode, self.max_flows)
        self.table = FlowTable(self.bpf[b"flows"], self.bpf[b"flow_stats"])
        self.host_table = self.bpf[b"hosts"]
        self.stats_table = self.bpf[b"stats"]
        self.decisions = self.bpf[b"decisions"]
        self.hosts: dict[str, Host] = {}
        self._packet_sockets: dict[str, socket.socket] = {}
        self.max_per_flow, self.max_total_bytes = max_per_flow, max_total_bytes
        self._queues: dict[bytes, _Queue] = defaultdict(_Queue)
        self.counters: dict[bytes, ParkCounters] = defaultdict(ParkCounters)
        self._total_bytes = 0
        self._lock = threading.RLock()
        self._arrived = threading.Condition(self._lock)
        self._control = threading.RLock()  # one change of the table at a time
        self.started = time.monotonic()
        self.boot = os.urandom(8).hex()  # agents see a restart as a new boot id
        self.events: dict[str, int] = defaultdict(int)  # userspace counters (metrics, stats)
        self._touched: dict[Flow, float] = {}  # flow -> when the control plane last set it
        self._claims: dict[Flow, tuple[str, float]] = {}  # flow -> (host, valid until)
        self._first_seen: dict[Flow, float] = {}  # entries that never saw a packet
        self._parked_at: dict[Flow, float] = {}  # monotonic time of each migration's park
        self._routes: dict[str, tuple[float, str | None]] = {}  # dst -> (when, default host)
        self._routes_lock = threading.Lock()
        self._divert_failed_seen = self._stat(Stat.DIVERT_FAILED)
        self._resume_parked()
        for host in specs:
            self._install_host(host)
        self.stored: dict[Flow, str] = {}  # flows the shared store backs -> their host
        if preload:
            results: dict[str, int] = defaultdict(int)
            for flow, host in preload.items():
                results[self.override(flow, host)] += 1
            log.info(
                "store: %d overrides loaded before attaching (%s)", len(preload), dict(results)
            )
        for address, host in (diversions or {}).items():
            how = self.store_divert(address, host, host)
            log.info("store: new connections to %s go to %s (a drain's): %s", address, host, how)
        self.bpf[b"parked"].open_perf_buffer(self._on_parked, page_cnt=1024)
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, name=f"steer:{name}", daemon=True)
        self._poller.start()
        from pysteer.steer import xdp_selftest  # noqa: PLC0415

        # Native XDP only where a frame redirected to each host's link leaves it (auto falls
        # back to tc); the watch counts the redirected packets the kernel loses.
        self.mode, self._xdp_watch = self._in_ns(
            xdp_selftest.start, ifname, self.mode, mode, list(self.hosts.values())
        )
        self._redirect_failed_seen = 0
        if self.mode == "tc":
            xdp_fn = None
        self._in_ns(loader.attach, ifname, "tc", tc_fn.fd, "pysteer_steer")
        self._in_ns(loader.attach_egress, ifname, egress_fn.fd, "pysteer_track")
        if xdp_fn is not None:  # XDP first, tc as its fallback
            self._in_ns(loader.attach, ifname, self.mode, xdp_fn.fd, "pysteer_steer")

    def _in_ns(self, fn: Callable[..., T], *args: Any) -> T:
        return netns.call_in(self.namespace, fn, *args) if self.namespace else fn(*args)

    def _resume_parked(self) -> None:
        """After a restart, parked packets numbered before now died with the old daemon
        (the client retransmits them): replay starts from the kernel's current number."""
        for flow, view in self.table:
            if view.action == Action.PARK:
                self._queues[bytes(flow_key(flow))].next_replay = view.park_seq

    # --- hosts ------------------------------------------------------------------------------
    def items_by_host(self) -> dict[int, str]:
        return {h.id: h.name for h in self.hosts.values()}

    def _resolve_host(self, spec: HostSpec) -> Host:
        """Look the host's link up (in the namespace) and check its MAC; nothing written."""
        if not spec.name or len(spec.name.encode()) > 15:
            raise SteerError(f"host name {spec.name!r} must be 1..15 bytes")
        try:
            raw_mac = spec.mac if isinstance(spec.mac, bytes) else mac_bytes(spec.mac)
        except ValueError:
            raise SteerError(f"host {spec.name!r}: not a MAC address: {spec.mac!r}") from None
        if len(raw_mac) != 6:
            raise SteerError(f"host {spec.name!r}: not a MAC address: {spec.mac!r}")

        def lookup() -> tuple[int, bytes, int]:
            with IPRoute() as ipr:
                found = ipr.link_lookup(ifname=spec.ifname)
                if not found:
                    raise SteerError(f"no interface {spec.ifname!r} for host {spec.name!r}")
                link = ipr.get_links(found[0])[0]
                ours = bytes.fromhex(link.get_attr("IFLA_ADDRESS").replace(":", ""))
                return found[0], ours, link.get_attr("IFLA_MTU")

        ifindex, ours, mtu = self._in_ns(lookup)
        mine = self._own_macs.get(raw_mac)
        if mine is not None:
            raise SteerError(
                f"host {spec.name!r}: {raw_mac.hex(':')} is the steering node's own MAC (of "
                f"{mine}), not the host's: every packet sent there would be lost"
            )
        return Host(-1, spec.name, spec.ifname, ifindex, raw_mac, ours, mtu)

    def _pinned_host_ids(self) -> dict[str, int]:
        ids = {}
        for index, entry in self.host_table.items():
            if entry.name:
                ids[entry.name.decode(errors="replace")] = index.value
        return ids

    def add_host(self, name: str, ifname: str, mac: str | bytes) -> Host:
        """Make ``name`` a redirect target: reached on ``ifname`` at MAC ``mac``."""
        if name in self.hosts:
            raise SteerError(f"host {name!r} is already configured")
        if len(self.hosts) >= MAX_HOSTS:
            raise SteerError(f"at most {MAX_HOSTS} hosts")
        return self._install_host(self._resolve_host(HostSpec(name, ifname, mac)))

    def _install_host(self, host: Host) -> Host:
        """Write ``host`` into the pinned table under the id it had before (flows point at
        ids: a restarted daemon with its hosts in another order must not move them)."""
        pinned = self._pinned_host_ids()
        taken = {h.id for h in self.hosts.values()} | {
            i for n, i in pinned.items() if n not in self.hosts and n != host.name
        }
        host.id = pinned.get(host.name, next(i for i in range(MAX_HOSTS) if i not in taken))
        entry = HostEntry(ifindex=host.ifindex, mtu=host.mtu, name=host.name.encode())
        ctypes.memmove(entry.dmac, host.mac, 6)
        ctypes.memmove(entry.smac, host.our_mac, 6)
        self.host_table[ctypes.c_uint32(host.id)] = entry
        self.hosts[host.name] = host
        sock = self._in_ns(socket.socket, socket.AF_PACKET, socket.SOCK_RAW)
        sock.bind((host.ifname, 0))
        self._packet_sockets[host.name] = sock
        if self.mode != "tc":  # XDP: a native link gets an XDP program; the watch counts losses
            from pysteer.steer import xdp_selftest  # noqa: PLC0415

            watch = getattr(self, "_xdp_watch", None)  # None while __init__ runs: start() does it
            self._in_ns(xdp_selftest.add_host, self.ifname, self.mode, host, watch)
        return host

    def resolve(self, address: str, timeout: float = 3.0) -> tuple[str, str]:
        return resolve(address, self.namespace, timeout)

    def _host(self, name: str) -> Host:
        try:
            return self.hosts[name]
        except (KeyError, TypeError):
            known = ", ".join(self.hosts) or "none"
            raise SteerError(f"unknown host {name!r} (known: {known})") from None

    def _host_name(self, host_id: int) -> str:
        return self.items_by_host().get(host_id, f"#{host_id}")

    def default_host(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
        """The host the steering node's routing sends ``address`` to (no entry needed)."""
        key = str(address)
        now = time.monotonic()
        cached = self._routes.get(key)
        if cached is not None and now - cached[0] < 5.0:
            return cached[1]

        def lookup() -> int | None:
            with IPRoute() as ipr:
                try:
                    return ipr.route("get", dst=key)[0].get_attr("RTA_OIF")
                except Exception:
                    return None

        oif = self._in_ns(lookup)
        name = next((h.name for h in self.hosts.values() if h.ifindex == oif), None)
        with self._routes_lock:
            self._routes[key] = (now, name)
        return name

    # --- new connections ---------------------------------------------------------------------
    def divert(
        self, address: ipaddress.IPv4Address | ipaddress.IPv6Address, host: str | None
    ) -> None:
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
        return {
            str(key_service(k)): names.get(v.value, f"#{v.value}")
            for k, v in self.bpf[b"new_flows"].items()
        }

    # --- the flow table -------------------------------------------------------------------------
    def get(self, flow: Flow) -> FlowView | None:
        return self.table.get(flow)

    def _set(self, flow: Flow, action: Action, host: int = 0, **extra: Any) -> None:
        try:
            self.table.set(flow, action, host, **extra)
        except FlowTableFull as exc:
            self.events["table_full"] += 1
            log.error(
                "%s (%d entries): a migration of this flow fails; see `pysteer steer "
                "gc` and --max-flows",
                exc,
                self.table.capacity,
            )
            raise SteerError(str(exc)) from None
        except FlowTableError as exc:
            raise SteerError(str(exc)) from None
        self._touched[flow] = time.monotonic()

    def park(
        self, flow: Flow, *, token: int = 0, lease: float | None = None, owner: str | None = None
    ) -> tuple[Action | None, str | None]:
        """Hold every packet of ``flow`` from now on, in order, until it is unparked.

        ``token`` names the migration that parks it (0: an operator), ``lease`` the seconds
        after which, if neither ``claim`` nor ``revert`` came, the flow is rolled back.
        Returns what the flow did before (action and host), so a rollback can restore it.
        """
        with self._control:
            before = self.get(flow)
            prev = (Action.NONE, 0) if before is None else (before.action, before.host)
            if before is not None and before.action == Action.PARK:
                if before.token == token:  # the same migration again (or an operator's re-park)
                    return self._was(before.prev_action, before.prev_host)
                if not before.token:
                    raise Refusal("conflict", f"flow {flow} is parked by an operator")
                if before.lease_ns > _now_ns():
                    raise Refusal(
                        "conflict", f"flow {flow} is being moved by migration {before.token:016x}"
                    )
                # That migration's lease ran out: it has lost, and this park takes over.
                self._decide(before.token, Decision.ABORTED, before.prev_host)
                prev = (before.prev_action, before.prev_host)
            lease_ns = _now_ns() + int(lease * 1e9) if lease else 0
            self._set(flow, Action.PARK, token=token, prev=prev, lease_ns=lease_ns)
            self._parked_at[flow] = time.monotonic()
        if token:
            log.debug("parked %s for %s (migration %016x)", flow, owner or "?", token)
        if before is None:
            return None, None
        return self._was(before.action, before.host)

    def _was(self, action: Action, host: int) -> tuple[Action | None, str | None]:
        if action == Action.NONE:
            return None, None
        return action, self._host_name(host) if action == Action.TO else None

    def to(self, flow: Flow, host: str, *, timeout: float = REPLAY_WAIT) -> int:
        """Send ``flow`` to ``host``: replay its parked packets, then redirect in the kernel.

        Returns how many parked packets were replayed.
        """
        target = self._host(host)
        with self._control:
            return self._unpark(flow, Action.TO, target, target, timeout)

    def pass_(
        self, flow: Flow, *, replay_to: str | None = None, timeout: float = REPLAY_WAIT
    ) -> int:
        """Back to normal routing (the default host).

        A parked flow's packets are replayed to ``replay_to`` (the host it is routed to),
        or dropped without it. Returns how many were replayed.
        """
        target = self._host(replay_to) if replay_to is not None else None
        with self._control:
            return self._unpark(flow, Action.PASS, None, target, timeout)

    def claim(
        self, flow: Flow, host: str, token: int, *, timeout: float = REPLAY_WAIT
    ) -> tuple[int, float | None]:
        """The commit point: ``host`` (the target) takes ``flow`` if it is still parked by
        migration ``token``: replay, TO(host), decision committed. Idempotent; a Refusal
        otherwise (its code: ``aborted``, or ``absent``). Returns the packets replayed and
        how long the flow was parked, in ms, up to the end of the replay (the gap the
        client saw; None for a repeated claim)."""
        target = self._host(host)
        with self._control:
            decided = self._decision(token)
            if decided is not None:
                if decided[0] == Decision.COMMITTED and decided[1] == target.id:
                    return 0, None  # claimed before: the answer was lost
                raise Refusal("aborted", f"migration {token:016x} of {flow} was rolled back")
            cur = self.get(flow)
            if cur is not None and cur.action == Action.PARK and cur.token == token and token:
                parked_at = self._parked_at.get(flow)
                replayed = self._unpark(flow, Action.TO, target, target, timeout, token=token)
                self._decide(token, Decision.COMMITTED, target.id)
                parked_ms = None
                if parked_at is not None:
                    parked_ms = round((time.monotonic() - parked_at) * 1000, 3)
                log.info(
                    "%s: claimed by %s (migration %016x, %d replayed)", flow, host, token, replayed
                )
                return replayed, parked_ms
            if (
                cur is not None
                and cur.action == Action.TO
                and cur.token == token
                and token
                and cur.host == target.id
            ):
                return 0, None  # claimed before, and its decision since forgotten
            raise Refusal("absent", f"flow {flow} is not parked by migration {token:016x}")

    def revert(
        self,
        flow: Flow,
        token: int,
        *,
        replay_to: str | None = None,
        hold: bool = False,
        timeout: float = REPLAY_WAIT,
        why: str = "rolled back",
    ) -> tuple[int, str | None]:
        """A migration's rollback: if ``flow`` is still parked by ``token``, decide it
        aborted (the target's claim now fails) and, unless ``hold``, replay its packets to
        where it went before and restore that. ``hold`` lets the source resume its socket
        before its packets come back. Idempotent; a Refusal with code ``committed`` if the
        target claimed it. Returns the packets replayed and the host the flow now goes to."""
        with self._control:
            decided = self._decision(token)
            cur = self.get(flow)
            ours = cur is not None and cur.action == Action.PARK and cur.token == token
            if decided is not None and decided[0] == Decision.COMMITTED:
                raise Refusal(
                    "committed",
                    f"migration {token:016x} of {flow} committed: "
                    f"{self._host_name(decided[1])} serves it",
                )
            if cur is not None and cur.action == Action.TO and cur.token == token and token:
                raise Refusal(
                    "committed",
                    f"migration {token:016x} of {flow} committed: "
                    f"{self._host_name(cur.host)} serves it",
                )
            if decided is None and token:  # from now on a claim fails
                self._decide(token, Decision.ABORTED, 0)
            if ours and token and not hold:
                return self._restore(flow, cur, replay_to, timeout, why)
            return 0, None

    def _restore(
        self, flow: Flow, cur: FlowView, replay_to: str | None, timeout: float, why: str
    ) -> tuple[int, str | None]:
        """Unpark ``flow`` to what it did before ``cur``'s park (under the control lock)."""
        prev = cur.prev_action
        if prev == Action.TO and self.items_by_host().get(cur.prev_host) is not None:
            target: Host | None = self._host(self._host_name(cur.prev_host))
            replayed = self._unpark(flow, Action.TO, target, target, timeout)
        else:
            name = replay_to if replay_to in self.hosts else self.default_host(flow.dst)
            target = self.hosts.get(name) if name else None
            final = Action.PASS if prev == Action.PASS else Action.NONE
            replayed = self._unpark(flow, final, None, target, timeout)
        if cur.token:
            self._decide(cur.token, Decision.ABORTED, target.id if target else 0)
        where = target.name if target else None
        log.info(
            "%s: %s (migration %016x) to %s, %d replayed",
            flow,
            why,
            cur.token,
            where or "its route",
            replayed,
        )
        return replayed, where

    def decision(self, flow: Flow, token: int) -> dict[str, Any]:
        """What became of migration ``token`` of ``flow``: committed (and where), aborted,
        pending (still parked by it), or unknown."""
        with self._control:
            decided = self._decision(token)
            if decided is not None:
                outcome = "committed" if decided[0] == Decision.COMMITTED else "aborted"
                return {"decision": outcome, "host": self.items_by_host().get(decided[1])}
            cur = self.get(flow)
            if cur is not None and cur.token == token and token:
                if cur.action == Action.PARK:
                    return {"decision": "pending", "host": None}
                if cur.action == Action.TO:
                    return {"decision": "committed", "host": self._host_name(cur.host)}
            return {"decision": "unknown", "host": None}

    def _decide(self, token: int, outcome: Decision, host: int) -> None:
        self.decisions[ctypes.c_uint64(token)] = DecisionEntry(outcome, host, _now_ns())

    def _decision(self, token: int) -> tuple[Decision, int] | None:
        if not token:
            return None
        try:
            d = self.decisions[ctypes.c_uint64(token)]
        except KeyError:
            return None
        return Decision(d.outcome), d.host

    def _unpark(
        self,
        flow: Flow,
        action: Action,
        host: Host | None,
        replay_to: Host | None,
        timeout: float,
        *,
        token: int = 0,
    ) -> int:
        """Switch ``flow`` to ``action`` (NONE: remove it); if it was parked, replay (or
        drop) what was parked before the switch and what arrived during it, so nothing
        overtakes the replay. Called with the control lock held."""
        current = self.get(flow)
        parked = current is not None and current.action == Action.PARK
        self._parked_at.pop(flow, None)
        replayed = 0
        if parked and replay_to is not None:
            replayed += self._replay(flow, replay_to, current.park_seq, timeout)
        if action == Action.NONE:
            if current is not None:
                with contextlib.suppress(FlowTableError):
                    self.table.delete(flow, stats=False)  # the counters hold the final number
        else:
            self._set(flow, action, host.id if host is not None else 0, token=token)
        if parked:
            final = self.table.get(flow) if action != Action.NONE else None
            upto = final.park_seq if final is not None else self._park_seq(flow)
            if replay_to is not None:
                replayed += self._replay(flow, replay_to, upto, timeout)
            self._skip_queue(flow, upto)
        if action == Action.NONE:
            self.table.delete_stats(flow)
            self._drop_state(flow)
        return replayed

    def _park_seq(self, flow: Flow) -> int:
        try:
            return int(self.bpf[b"flow_stats"][flow_key(flow)].park_seq)
        except KeyError:
            return self._queues[bytes(flow_key(flow))].next_replay

    # --- the shared store's overrides (pysteer.steer.mirror) ----------------------------------
    def override(self, flow_text: str, host: str) -> str:
        """The store says ``host`` serves the flow: steer it there, unless a migration holds
        it parked now (its claim or rollback decides). What was done, as a word."""
        try:
            flow = Flow.parse(flow_text)
        except FlowSyntaxError:
            return "bad-flow"
        target = self.hosts.get(host)
        if target is None:
            self.events["store_unknown_host"] += 1
            return "unknown-host"
        with self._control:
            self.stored[flow] = host
            cur = self.get(flow)
            if cur is not None and cur.action == Action.PARK:
                return "parked"
            if cur is not None and cur.action == Action.TO and cur.host == target.id:
                return "same"
            try:
                self._set(flow, Action.TO, target.id)
            except SteerError:
                return "failed"
        self.events["store_set"] += 1
        return "set"

    def store_divert(self, address: str, host: str | None, was: str) -> str:
        """The store's diversion of VIP ``address``: to ``host``, or (None) no longer to
        ``was`` (only if that is still where it goes)."""
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return "bad-address"
        if host is not None and host not in self.hosts:
            self.events["store_unknown_host"] += 1
            return "unknown-host"
        if host is None and self.diversions().get(str(ip)) != was:
            return "kept"
        self.divert(ip, host)
        return "diverted" if host else "undiverted"

    def unoverride(self, flow_text: str, host: str) -> str:
        """The store no longer backs the flow: its entry goes if it still steers to
        ``host`` (the connection ended; nothing newer set it)."""
        try:
            flow = Flow.parse(flow_text)
        except FlowSyntaxError:
            return "bad-flow"
        target = self.hosts.get(host)
        with self._control:
            self.stored.pop(flow, None)
            cur = self.get(flow)
            if target is None or cur is None or cur.action != Action.TO or cur.host != target.id:
                return "kept"
            self.forget(flow)
        self.events["store_unset"] += 1
        return "unset"

    def forget(self, flow: Flow) -> None:
        with self._control:
            try:
                self.table.delete(flow)
            except FlowTableError as exc:
                raise SteerError(str(exc)) from None
            self._drop_state(flow)

    def items(self) -> list[tuple[Flow, FlowView]]:
        return list(self.table)

    def park_counters(self, flow: Flow) -> ParkCounters:
        return self.counters.get(bytes(flow_key(flow)), ParkCounters())

    def _stat(self, stat: Stat) -> int:
        return sum(self.stats_table[ctypes.c_uint32(stat)])

    def stats(self) -> dict[str, int]:
        out = {}
        for stat in Stat:
            if stat == Stat.GUARD_DROPPED:
                continue
            out[stat.name.lower()] = self._stat(stat)
        for event in (
            "replayed",
            "park_dropped",
            "park_lost",
            "table_full",
            "gc_idle",
            "gc_stale",
            "closed_by_agents",
            "lease_expired",
            "reconciled",
            "store_set",
            "store_unset",
            "store_unknown_host",
            "opened_steered",
        ):
            out[event] = self.events[event]
        out["redirect_failed"] = self._xdp_watch.failed() if self._xdp_watch else 0
        return out

    def table_usage(self) -> dict[str, int]:
        return {"flows": len(self.table), "capacity": self.table.capacity}

    # --- lifecycle: what agents report, and the collector ------------------------------------
    def closed(self, host: str, flows: Iterable[Flow]) -> int:
        """``host``'s agent closed these connections: their entries go, unless parked (a
        migration owns those) or steered to another host. Returns how many went."""
        target = self._host(host)
        removed = 0
        with self._control:
            for flow in flows:
                cur = self.get(flow)
                if cur is None or cur.action == Action.PARK:
                    continue
                if cur.action == Action.TO and cur.host != target.id:
                    continue
                with contextlib.suppress(FlowTableError):
                    self.table.delete(flow)
                    removed += 1
                self._drop_state(flow)
        self.events["closed_by_agents"] += removed
        return removed

    def opened(self, host: str, flows: Iterable[Flow]) -> int:
        """Connections ``host`` accepted (a drain's diversion sent their SYN there, through
        another steering node): steered to it here too, when they would go elsewhere and
        nothing here says otherwise. The sync would, later. How many were steered."""
        target = self._host(host)
        steered = 0
        for flow in flows:
            if self.get(flow) is not None or self.default_host(flow.dst) == host:
                continue
            with self._control:
                if self.get(flow) is not None:
                    continue
                try:
                    self._set(flow, Action.TO, target.id)
                except SteerError as exc:
                    log.error("opened at %s: cannot steer %s to it: %s", host, flow, exc)
                    continue
            steered += 1
        self.events["opened_steered"] += steered
        return steered

    def sync(
        self, host: str, served: Iterable[Flow], interval: float, taken: float | None = None
    ) -> dict[str, Any]:
        """Reconcile the table with what ``host``'s agent really serves.

        A flow it serves that is steered elsewhere (or routed elsewhere, with no entry) is
        steered to it; an entry TO(host) for a flow it does not serve, quiet for
        ``CLAIM_GRACE`` s, is stale and goes. Parked flows are left to their migration
        (and its lease). Its flows are claimed for 3 intervals: gc keeps them.

        ``taken`` (this clock) is when the agent listed its flows. A flow the control plane
        changed since then (or ``CLAIM_GRACE`` s before: the age is measured by the agent)
        is left alone: the list is older than that change. A move that committed while the
        list travelled once had its flow steered back to its source, which answered the
        client with a RST.
        """
        target = self._host(host)
        now = time.monotonic()
        cutoff = (now if taken is None else min(taken, now)) - CLAIM_GRACE
        changed = lambda flow: self._touched.get(flow, 0.0) > cutoff  # noqa: E731
        served = set(served)
        until = now + 3 * max(interval, 1.0)
        steered, removed = [], []
        # Reads need no lock; each change takes it and checks again (the migrations' park,
        # claim and revert must never wait behind a sync of a large table).
        for flow in served:
            self._claims[flow] = (host, until)
            if not self._misrouted(flow, host, target) or changed(flow):
                continue
            with self._control:
                cur = self.get(flow)
                if not self._misrouted(flow, host, target):
                    continue
                try:
                    self._set(flow, Action.TO, target.id)
                except SteerError as exc:
                    log.error("sync from %s: cannot steer %s to it: %s", host, flow, exc)
                    continue
            steered.append(str(flow))
            log.warning(
                "sync: %s serves %s, which went %s: steered to %s",
                host,
                flow,
                _describe(cur, self._host_name),
                host,
            )
        quiet_ns = _now_ns() - int(CLAIM_GRACE * 1e9)
        for flow, view in self.items():
            if view.action != Action.TO or view.host != target.id or flow in served:
                continue
            if changed(flow) or view.last_ns > quiet_ns:
                continue
            if self._remove_if_unchanged(flow, view):
                removed.append(str(flow))
                log.warning("sync: %s does not serve %s: stale entry removed", host, flow)
        self.events["reconciled"] += len(steered)
        self.events["gc_stale"] += len(removed)
        return {"steered": steered, "removed": removed}

    def _misrouted(self, flow: Flow, host: str, target: Host) -> bool:
        """Whether ``flow``, served by ``host``, would go elsewhere (parked ones belong to
        their migration, and are never touched here)."""
        cur = self.get(flow)
        if cur is not None and cur.action == Action.PARK:
            return False
        if cur is not None and cur.action == Action.TO and cur.host == target.id:
            return False
        routed = cur is None or cur.action == Action.PASS
        return not (routed and self.default_host(flow.dst) == host)

    def _remove_if_unchanged(self, flow: Flow, seen: FlowView) -> bool:
        """Delete ``flow`` if its entry is still the one ``seen`` (same action, host, token,
        and no packet since): a decision made without the lock is checked under it."""
        with self._control:
            cur = self.get(flow)
            if cur is None or (cur.action, cur.host, cur.token, cur.last_ns) != (
                seen.action,
                seen.host,
                seen.token,
                seen.last_ns,
            ):
                return False
            with contextlib.suppress(FlowTableError):
                self.table.delete(flow)
            self._drop_state(flow)
            return True

    def gc(self, *, dry_run: bool = False) -> list[Removal]:  # noqa: PLR0912 - one pass
        """Collect what has outlived its connection or its migration: entries idle longer
        than ``idle_timeout`` that no agent claims, counters without an entry, and (not on
        a dry run) parks whose lease ran out, which are rolled back."""
        now, now_ns = time.monotonic(), _now_ns()
        idle_ns = int(self.idle_timeout * 1e9)
        hold = now - self.started < min(START_HOLD, self.idle_timeout)
        names = self.items_by_host()
        found: list[Removal] = []
        entries = self.items()  # a snapshot, read without the lock; changes re-check it
        present = {flow for flow, _ in entries}
        for flow, view in entries:
            host = names.get(view.host) if view.action == Action.TO else None
            if view.action == Action.PARK:
                if view.token and view.lease_ns and view.lease_ns < now_ns:
                    found.append(Removal(flow, "PARK", None, "lease expired"))
                    if not dry_run:
                        self._expire(flow, view)
                continue
            claim = self._claims.get(flow)
            if claim is not None and claim[1] > now:
                continue
            if flow in self.stored:  # the store backs it: it goes when the store says so
                continue
            if hold or now - self._touched.get(flow, 0.0) < self.idle_timeout:
                continue
            last = view.last_ns
            if not last:  # never saw a packet: idle since it was set, or first seen
                since = self._touched.get(flow) or self._first_seen.setdefault(flow, now)
                idle = now - since >= self.idle_timeout
            else:
                idle = now_ns - last >= idle_ns
            if not idle:
                continue
            if dry_run or self._remove_if_unchanged(flow, view):
                found.append(Removal(flow, view.action.name, host, "idle"))
                self.events["gc_idle"] += 0 if dry_run else 1
        if not dry_run:
            for flow in self.table.orphan_stats():
                if flow not in present:
                    self.table.delete_stats(flow)
            self._forget_memory(present)
        failed = self._stat(Stat.DIVERT_FAILED)
        if failed > self._divert_failed_seen:
            log.error(
                "%d new connection(s) could not be diverted (flow table full, %d "
                "entries): they went to their default host",
                failed - self._divert_failed_seen,
                self.table.capacity,
            )
            self._divert_failed_seen = failed
        lost = self._xdp_watch.failed() if self._xdp_watch else 0
        if lost > self._redirect_failed_seen:
            log.error(
                "%d packet(s) redirected by XDP were lost (so far, by link: %s): a link "
                "sends redirected frames only when it runs an XDP program (a veth: when "
                "its peer runs one, or has GRO on); or use --mode tc",
                lost - self._redirect_failed_seen,
                self._xdp_watch.summary(),
            )
            self._redirect_failed_seen = lost
        if found and not dry_run:
            log.info(
                "gc: removed %d entr%s (%s)",
                len(found),
                "y" if len(found) == 1 else "ies",
                ", ".join(sorted({r.reason for r in found})),
            )
        return found

    def _expire(self, flow: Flow, seen: FlowView) -> None:
        """A park whose lease ran out: its migration lost; roll it back (if still so)."""
        with self._control:
            cur = self.get(flow)
            if cur is None or cur.action != Action.PARK or cur.token != seen.token:
                return
            if cur.lease_ns >= _now_ns():
                return
            self.events["lease_expired"] += 1
            stored = self.hosts.get(self.stored.get(flow, ""))
            if stored is not None:
                # The shared store knows where it is (its migration committed on another
                # steering node, whose claim never reached this one): there, not back.
                replayed = self._unpark(flow, Action.TO, stored, stored, REPLAY_WAIT)
                if cur.token:
                    self._decide(cur.token, Decision.ABORTED, stored.id)
                log.info(
                    "%s: lease expired (migration %016x): to %s as the store says, %d replayed",
                    flow,
                    cur.token,
                    stored.name,
                    replayed,
                )
                return
            self._restore(flow, cur, None, REPLAY_WAIT, "lease expired: rolled back")

    def _forget_memory(self, present: set[Flow]) -> None:
        """Drop what this process keeps for flows no longer in the table (bounded memory).

        ``present`` is a snapshot taken without the lock: a flow parked since then is not
        in it, yet its queue holds packets a claim is about to replay. So nothing goes
        unless, under the lock, the flow is confirmed absent now (an entry is only ever
        made under the lock, and only a parked entry queues packets)."""
        now = time.monotonic()
        for flow, (_, until) in list(self._claims.items()):
            if until < now:
                self._claims.pop(flow, None)
        with self._routes_lock:
            for key, (t, _) in list(self._routes.items()):
                if now - t > 60:
                    self._routes.pop(key, None)
        keys = {bytes(flow_key(f)) for f in present}
        with self._control:
            flows = {f for d in (self._touched, self._first_seen, self._parked_at) for f in list(d)}
            for flow in flows - present:
                if self.table.get(flow) is None:
                    self._touched.pop(flow, None)
                    self._first_seen.pop(flow, None)
                    self._parked_at.pop(flow, None)
            with self._arrived:
                candidates = {k for k in (*self.counters, *self._queues) if k not in keys}
            for key in candidates:
                if self.table.get(key_flow(FlowKey.from_buffer_copy(key))) is not None:
                    continue
                with self._arrived:
                    self.counters.pop(key, None)
                    queue = self._queues.pop(key, None)
                    if queue is not None:
                        self._total_bytes -= queue.bytes

    def _drop_state(self, flow: Flow) -> None:
        self._touched.pop(flow, None)
        self._claims.pop(flow, None)
        self._first_seen.pop(flow, None)
        self._parked_at.pop(flow, None)
        key = bytes(flow_key(flow))
        with self._arrived:
            queue = self._queues.pop(key, _Queue())
            self._total_bytes -= queue.bytes
            self.counters.pop(key, None)

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
                self.events["park_dropped"] += 1
            elif (
                len(queue.packets) >= self.max_per_flow
                or self._total_bytes + len(frame) > self.max_total_bytes
            ):
                counters.dropped += 1
                self.events["park_dropped"] += 1
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
                        self.events["park_lost"] += upto - queue.next_replay
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
                    self.events["replayed"] += 1
                    sent += 1
                except (PacketError, OSError):
                    counters.dropped += 1
                    self.events["park_dropped"] += 1
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

    def destroy(self) -> None:
        """Detach, and remove the pinned maps: every flow of this instance is forgotten."""
        self.close(detach=True)
        pins.remove(self.pin.name)

    def close(self, *, detach: bool = False) -> None:
        """Stop the poller. The pinned maps and (unless ``detach``) the programs stay."""
        self._stop.set()
        self._poller.join(2)
        for sock in self._packet_sockets.values():
            sock.close()
        if detach:
            self._in_ns(loader.detach, self.ifname, self.mode)
            for host in self.hosts.values() if self.mode == "xdp-native" else ():
                self._in_ns(loader.detach_pass, host.ifname)
        if getattr(self, "_xdp_watch", None) is not None:
            self._xdp_watch.close()
            self._xdp_watch = None
        self.bpf.cleanup()


def resolve(address: str, namespace: str | None = None, timeout: float = 3.0) -> tuple[str, str]:
    """The interface and MAC address that reach ``address`` (a host's link address): what
    ``add_host`` needs, found from the routing and neighbour tables (in ``namespace``)."""

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

    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise SteerError(f"not an IP address: {address!r}") from None
    return netns.call_in(namespace, lookup) if namespace else lookup()


def _describe(view: FlowView | None, name: Callable[[int], str]) -> str:
    if view is None:
        return "by its route"
    if view.action == Action.TO:
        return f"to {name(view.host)}"
    return view.action.name


def _link_macs() -> dict[bytes, str]:
    """Every MAC of this namespace's interfaces (a host MAC must not be one of them)."""
    out = {}
    with IPRoute() as ipr:
        for link in ipr.get_links():
            mac = link.get_attr("IFLA_ADDRESS")
            name = link.get_attr("IFLA_IFNAME")
            if mac and mac != "00:00:00:00:00:00" and len(mac) == 17:
                out[bytes.fromhex(mac.replace(":", ""))] = name
    return out
