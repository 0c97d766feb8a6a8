"""The namespace lab: client, steering node and hosts as network namespaces and veth pairs.

``Lab`` builds the topology of the design doc from a ``LabPlan``: every node is a network
namespace named ``<prefix>-<node>``, every link a veth pair created directly inside the two
namespaces, so the lab adds nothing to the root namespace and routes nothing outside
itself. The VIP sits on ``lo`` of every host (no dummy interfaces on this kernel) and the
steering node routes it to the default host.

A lab is owned through a state file under ``/run/pysteer/labs``: ``up`` refuses namespaces
it does not own, repairs a half-built lab of its own by rebuilding it whole, and removes
everything it made if building fails, so a lab is either fully up or absent.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pysteer import netns
from pysteer.lab import routes
from pysteer.lab.plan import LabPlan, from_dict, load
from pysteer.paths import RUN_DIR
from pysteer.paths import STATE_DIR as NODE_STATE_DIR
from pysteer.provision import add_vip, role_sysctls, set_sysctls

if TYPE_CHECKING:
    from pyroute2 import IPRoute

T = TypeVar("T")

STATE_DIR = Path("/run/pysteer/labs")
DEFAULT_PREFIX = "pysteer"
PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,9}$")


class LabError(RuntimeError):
    """The lab cannot be built, found or removed; the message says why and what to do."""


def validate_prefix(prefix: str) -> str:
    if not PREFIX_RE.match(prefix):
        raise LabError(
            f"invalid lab prefix {prefix!r}: use 1-10 lowercase letters and digits, "
            "starting with a letter (it names the namespaces <prefix>-<node>)"
        )
    return prefix


def known_labs(state_dir: Path = STATE_DIR) -> list[str]:
    """Prefixes of the labs that have a state file."""
    return sorted(p.stem for p in state_dir.glob("*.json")) if state_dir.is_dir() else []


def _with_ipr(fn: Callable[[IPRoute], T]) -> Callable[[], T]:
    def run() -> T:
        # pyroute2 is pysteer's slowest import: `pysteer lab --help` starts without it.
        from pyroute2 import IPRoute  # noqa: PLC0415

        with IPRoute() as ipr:
            return fn(ipr)

    return run


@dataclass
class Lab:
    """One namespace lab. Use ``with Lab(...) as lab:`` to build it and always remove it."""

    prefix: str = DEFAULT_PREFIX
    plan: LabPlan = field(default_factory=load)
    state_dir: Path = STATE_DIR

    def __post_init__(self) -> None:
        validate_prefix(self.prefix)

    # --- names ------------------------------------------------------------------------
    def instance(self, steer: str) -> str:
        """The steering instance (pins, lock, socket) of steering node ``steer``: the
        lab's name for the first one, ``<lab>-<node>`` for the others."""
        return self.prefix if steer == self.plan.steer else f"{self.prefix}-{steer}"

    def netns(self, node: str) -> str:
        """The namespace name of ``node``."""
        if node not in self.plan.nodes:
            raise LabError(f"unknown lab node {node!r}; nodes are {', '.join(self.plan.nodes)}")
        return f"{self.prefix}-{node}"

    @property
    def namespaces(self) -> dict[str, str]:
        return {node: self.netns(node) for node in self.plan.nodes}

    @property
    def state_file(self) -> Path:
        return self.state_dir / f"{self.prefix}.json"

    def owned(self) -> bool:
        return self.state_file.exists()

    @classmethod
    def existing(cls, prefix: str, state_dir: Path = STATE_DIR) -> Lab:
        """The lab named ``prefix`` with the plan it was built with (default plan if none)."""
        lab = cls(prefix=prefix, state_dir=state_dir)
        saved = lab._read_state().get("plan")
        if saved:
            lab.plan = from_dict(saved)
        return lab

    # --- running things inside ----------------------------------------------------------
    def call(self, node: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call a Python callable in a thread inside ``node``'s namespace."""
        return netns.call_in(self.netns(node), fn, *args, **kwargs)

    def run(
        self, node: str, argv: list[str], *, check: bool = True, timeout: float = 60, **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside ``node``'s namespace and return its completed process."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(
            netns.exec_argv(self.netns(node), argv), check=check, timeout=timeout, **kwargs
        )

    def popen(self, node: str, argv: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a command inside ``node``'s namespace; ``down`` ends it if nobody else does."""
        return subprocess.Popen(netns.exec_argv(self.netns(node), argv), **kwargs)

    def mac(self, node: str, ifname: str) -> str:
        """The MAC address of ``ifname`` in ``node``'s namespace."""

        def read(ipr: IPRoute) -> str:
            found = ipr.link_lookup(ifname=ifname)
            if not found:
                raise LabError(f"no interface {ifname!r} in {self.netns(node)}")
            return ipr.get_links(found[0])[0].get_attr("IFLA_ADDRESS")

        return self.call(node, _with_ipr(read))

    # --- lifecycle -------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialize ``up`` and ``down`` of one lab across processes."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / f".{self.prefix}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def up(self) -> Lab:
        """Build the lab; a no-op if it is already fully up, a rebuild if it is half-built."""
        self.ensure()
        return self

    def ensure(self) -> str:
        """Like ``up``, returning what it did: ``built``, ``already up`` or ``repaired``."""
        with self._locked():
            return self._up()

    def down(self) -> list[str]:
        """Remove every namespace, link and process of this lab. Safe to run twice.

        Returns the namespaces removed. Refuses namespaces of this prefix that the lab does
        not own, so it never deletes somebody else's.
        """
        with self._locked():
            return self._down()

    def _up(self) -> str:
        present = [name for name in self.namespaces.values() if netns.exists(name)]
        outcome = "built"
        if not self.owned():
            if present:
                raise LabError(
                    f"prefix {self.prefix!r} collides with existing network namespaces "
                    f"{', '.join(present)} that no pysteer lab owns; choose another --prefix "
                    "or remove them (ip netns del NAME)"
                )
        else:
            saved = self._read_state()
            if saved.get("plan") != self.plan.to_dict():
                raise LabError(
                    f"lab {self.prefix!r} exists with a different address plan; "
                    f"run `pysteer lab down --prefix {self.prefix}` first"
                )
            if not self.problems():
                return "already up"
            # Half-built (an interrupted up, a namespace deleted by hand, ...): rebuild whole.
            self._down()
            outcome = "repaired"
        self._write_state("building")
        try:
            self._build()
            problems = self.problems()
            if problems:
                raise LabError("; ".join(problems))
        except BaseException as exc:
            self._down()
            if isinstance(exc, LabError):
                raise LabError(f"lab up failed, everything it made is removed: {exc}") from exc
            if not isinstance(exc, Exception):
                raise
            raise LabError(
                f"lab up failed, everything it made is removed: {type(exc).__name__}: {exc}"
            ) from exc
        self._write_state("up")
        return outcome

    def _down(self) -> list[str]:
        from pyroute2 import netns as pr_netns  # noqa: PLC0415 - see _with_ipr

        present = [name for name in self.namespaces.values() if netns.exists(name)]
        if present and not self.owned():
            raise LabError(
                f"namespaces {', '.join(present)} were not made by pysteer lab {self.prefix!r}; "
                "not removing them"
            )
        for name in present:
            _kill_all(name)
            pr_netns.remove(name)  # its veth ends go with it
        for steer in self.plan.steers:
            remove_instance(self.instance(steer))
        self.state_file.unlink(missing_ok=True)
        return present

    def __enter__(self) -> Lab:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    # --- building ----------------------------------------------------------------------
    def _build(self) -> None:
        from pyroute2 import netns as pr_netns  # noqa: PLC0415 - see _with_ipr

        plan = self.plan
        ecmp = len(plan.steers) > 1
        for node in plan.nodes:
            pr_netns.create(self.netns(node))
            steer = node in plan.steers
            values = role_sysctls(steer=steer, host=node in plan.hosts, ecmp=ecmp and not steer)
            self.call(node, set_sysctls, values)
            self.call(node, _with_ipr(_lo_up))
        for steer in plan.steers:
            self.call(steer, _with_ipr(lambda ipr, s=steer: self._build_steer(ipr, s)))
        for peer in (plan.client, *plan.hosts):
            self.call(peer, _with_ipr(lambda ipr, p=peer: self._build_peer(ipr, p)))

    def next_hops(self, steers: list[str]) -> None:
        """Route the client and the hosts through ``steers`` only (ECMP over them), as a
        router does when it adds or withdraws a steering node's next hop."""
        if not steers or not set(steers) <= set(self.plan.steers):
            raise LabError(f"next hops must be some of {self.plan.steers}, not {steers}")
        for peer in (self.plan.client, *self.plan.hosts):
            self.call(
                peer, _with_ipr(lambda ipr, p=peer: routes.next_hops(ipr, self.plan, p, steers))
            )

    def _build_steer(self, ipr: IPRoute, steer: str) -> None:
        plan = self.plan
        for link in plan.links:
            if link.steer_end.node != steer:
                continue
            end = link.steer_end
            ipr.link(
                "add",
                ifname=end.name,
                kind="veth",
                peer={"ifname": link.peer_end.name, "net_ns_fd": self.netns(link.peer)},
            )
            idx = ipr.link_lookup(ifname=end.name)[0]
            _addresses(ipr, idx, end.v4, end.v6)
            ipr.link("set", index=idx, state="up")
        routes.steer_routes(ipr, plan, steer)

    def _build_peer(self, ipr: IPRoute, peer: str) -> None:
        plan = self.plan
        for link in plan.links:
            if link.peer != peer:
                continue
            idx = ipr.link_lookup(ifname=link.peer_end.name)[0]
            _addresses(ipr, idx, link.peer_end.v4, link.peer_end.v6)
            ipr.link("set", index=idx, state="up")
        if peer in plan.hosts:
            add_vip(ipr, plan.vip_v4, plan.vip_v6)
        routes.peer_routes(ipr, plan, peer)

    # --- inspection ----------------------------------------------------------------------
    def problems(self) -> list[str]:
        """What differs from a fully built lab; empty when the lab is up and whole."""
        found: list[str] = []
        expected: dict[str, dict[str, set[str]]] = {node: {} for node in self.plan.nodes}
        for link in self.plan.links:
            for end in (link.steer_end, link.peer_end):
                expected[end.node][end.name] = {str(end.v4), str(end.v6)}
        for host in self.plan.hosts:
            expected[host]["lo"] = {f"{self.plan.vip_v4}/32", f"{self.plan.vip_v6}/128"}
        for node, ifaces in expected.items():
            name = self.netns(node)
            if not netns.exists(name):
                found.append(f"namespace {name} is missing")
                continue
            actual = self.call(node, _with_ipr(_interfaces))
            for ifname, addrs in ifaces.items():
                have = actual.get(ifname)
                if have is None:
                    found.append(f"{name}: interface {ifname} is missing")
                elif not have["up"]:
                    found.append(f"{name}: interface {ifname} is down")
                elif not addrs <= set(have["addresses"]):
                    missing = ", ".join(sorted(addrs - set(have["addresses"])))
                    found.append(f"{name}: {ifname} lacks {missing}")
        return found

    def status(self) -> dict[str, Any]:
        """What exists of this lab: namespaces, interfaces, addresses, VIPs and processes."""
        nodes: dict[str, Any] = {}
        for node, name in self.namespaces.items():
            entry: dict[str, Any] = {"netns": name, "exists": netns.exists(name)}
            if entry["exists"]:
                entry["interfaces"] = self.call(node, _with_ipr(_interfaces))
                entry["pids"] = netns.pids(name)
            nodes[node] = entry
        present = sum(n["exists"] for n in nodes.values())
        if present == 0 and not self.owned():
            state = "absent"
        else:
            state = "up" if self.owned() and not self.problems() else "partial"
        return {
            "prefix": self.prefix,
            "state": state,
            "vip": {"v4": str(self.plan.vip_v4), "v6": str(self.plan.vip_v6)},
            "default_host": self.plan.default_host,
            "steer": self.plan.steer,
            "client": self.plan.client,
            "hosts": list(self.plan.hosts),
            "nodes": nodes,
            "plan": self.plan.to_dict(),
        }

    # --- state file ------------------------------------------------------------------------
    def _write_state(self, phase: str) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(
            json.dumps({"prefix": self.prefix, "phase": phase, "plan": self.plan.to_dict()})
        )
        tmp.replace(self.state_file)

    def _read_state(self) -> dict[str, Any]:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, json.JSONDecodeError):
            return {}


def _lo_up(ipr: IPRoute) -> None:
    ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")


def _addresses(ipr: IPRoute, idx: int, v4: Any, v6: Any) -> None:
    ipr.addr("add", index=idx, address=str(v4.ip), prefixlen=v4.network.prefixlen)
    ipr.addr("add", index=idx, address=str(v6.ip), prefixlen=v6.network.prefixlen)


def _interfaces(ipr: IPRoute) -> dict[str, dict[str, Any]]:
    """Interfaces of the current namespace: up flag and global addresses."""
    out: dict[str, dict[str, Any]] = {}
    names: dict[int, str] = {}
    for link in ipr.get_links():
        name = link.get_attr("IFLA_IFNAME")
        names[link["index"]] = name
        out[name] = {"up": bool(link["flags"] & 1), "addresses": []}
    for addr in ipr.get_addr():
        if addr["scope"] != 0:  # only global scope: skip link-local and host ::1/127.0.0.1
            continue
        name = names.get(addr["index"])
        if name is not None:
            out[name]["addresses"].append(f"{addr.get_attr('IFA_ADDRESS')}/{addr['prefixlen']}")
    return out


def remove_instance(name: str, grace: float = 2.0) -> list[str]:
    """Remove what a lab's cluster leaves outside its namespaces (the cluster and the
    steering instance are named after the lab): the steering daemon (it runs in the root
    namespace; its pid is in its lock), its pinned maps, its lock and socket, and the
    agents' run directory (sockets, ledgers, and the keys ``lab cluster`` wrote there by
    default). A lab rebuilt with the same name starts clean. Returns what it removed."""
    from pysteer.steer import pins  # noqa: PLC0415 - only when a lab goes down

    run = RUN_DIR
    removed = []
    lock = run / f"steer-{name}.lock"
    if _locked(lock):  # the daemon still runs: its pid is in the lock
        with contextlib.suppress(OSError, ValueError):
            pid = int(lock.read_text().strip() or 0)
            for sig in (signal.SIGTERM, signal.SIGKILL):
                if pid <= 0 or not _locked(lock):
                    break
                _signal(pid, sig)
                deadline = time.monotonic() + grace
                while _locked(lock) and time.monotonic() < deadline:
                    time.sleep(0.02)
            removed.append(f"steering daemon {pid}")
    if (pins.PIN_ROOT / name).is_dir():
        try:
            pins.remove(name)
        except pins.PinError as exc:  # someone else's directory: not ours to empty
            raise LabError(f"cannot remove the lab's pins: {exc}") from None
        removed.append(str(pins.PIN_ROOT / name))
    for path in (lock, run / f"steer-{name}.sock"):
        if path.exists() or path.is_symlink():
            path.unlink()
            removed.append(str(path))
    # The agents' sockets and ledgers, the lab's keys (lab cluster); the nodes' drained state.
    for cluster in (run / name, NODE_STATE_DIR / name):
        if cluster.is_dir() and not cluster.is_symlink():
            shutil.rmtree(cluster)  # never follows a symlink inside
            removed.append(str(cluster))
    return removed


def _locked(path: Path) -> bool:
    try:
        with path.open() as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
    except BlockingIOError:
        return True
    except OSError:
        return False


def _kill_all(name: str, grace: float = 2.0) -> None:
    """End every process in namespace ``name``: SIGTERM, then SIGKILL after ``grace``."""
    pids = netns.pids(name)
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while pids and time.monotonic() < deadline:
        time.sleep(0.02)
        pids = netns.pids(name)
    for pid in pids:
        _signal(pid, signal.SIGKILL)
    deadline = time.monotonic() + grace
    while netns.pids(name) and time.monotonic() < deadline:
        time.sleep(0.02)


def _signal(pid: int, sig: int) -> None:
    if pid == os.getpid():
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
