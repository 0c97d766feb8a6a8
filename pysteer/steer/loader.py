"""Compile pysteer's BPF programs with BCC and attach them with pyroute2.

Attach and detach work on the network namespace of the calling thread (pyroute2 talks to
the namespace of the thread that uses it), so call them from inside the namespace, for
example through ``pysteer.netns.call_in``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from pysteer.bpfload import compile_file, load_func
from pysteer.paths import bpf_dir

MODES = ("auto", "tc", "xdp-native", "xdp-generic")
XDP_FLAGS_SKB_MODE, XDP_FLAGS_DRV_MODE = 2, 4
TC_INGRESS = "ffff:fff2"


class AttachError(RuntimeError):
    """A program could not be attached; the message names the interface and mode."""


def compile_program(source: str, pin: Path, max_flows: int | None = None) -> Any:
    """Compile ``bpf/<source>`` with its maps pinned under ``pin``."""
    cflags = [f"-I{bpf_dir() / 'include'}", f'-DPIN_DIR="{pin}"']
    if max_flows:
        cflags.append(f"-DMAX_FLOWS={int(max_flows)}")
    return compile_file(bpf_dir() / source, cflags=cflags)


def _index(ipr: IPRoute, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise AttachError(f"no interface {ifname!r} in this network namespace")
    return found[0]


def resolve_mode(ifname: str, mode: str) -> str:
    """``auto`` picks tc on veth (faster there) and native XDP elsewhere."""
    if mode not in MODES:
        raise AttachError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode != "auto":
        return mode
    with IPRoute() as ipr:
        link = ipr.get_links(_index(ipr, ifname))[0]
        info = link.get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info else None
    return "tc" if kind == "veth" else "xdp-native"


def native_xdp_supported(ifname: str) -> bool:
    """Whether ``ifname``'s driver runs XDP natively: attach a trivial program, then remove it."""
    from bcc import BPF  # noqa: PLC0415

    probe = compile_file(bpf_dir() / "probe" / "doctor.c")
    try:
        fn = load_func(probe, "doctor_xdp", BPF.XDP)
        try:
            attach(ifname, "xdp-native", fn.fd, "pysteer_probe")
        except AttachError:
            return False
        detach_xdp(ifname, "xdp-native")
        return True
    finally:
        probe.cleanup()


def detach_xdp(ifname: str, mode: str) -> None:
    flags = XDP_FLAGS_SKB_MODE if mode == "xdp-generic" else XDP_FLAGS_DRV_MODE
    with IPRoute() as ipr, contextlib.suppress(NetlinkError):
        ipr.link("set", index=_index(ipr, ifname),
                 xdp={"attrs": [("IFLA_XDP_FD", -1), ("IFLA_XDP_FLAGS", flags)]})  # fmt: skip


def attach(ifname: str, mode: str, fd: int, name: str) -> None:
    """Attach program ``fd`` on ``ifname``'s ingress, replacing what pysteer put there."""
    with IPRoute() as ipr:
        idx = _index(ipr, ifname)
        try:
            if mode == "tc":
                with contextlib.suppress(NetlinkError):  # already there
                    ipr.tc("add", "clsact", idx)
                # replace, not delete + add: a restarted daemon leaves no gap
                ipr.tc("replace-filter", "bpf", idx, ":1", fd=fd, name=name,
                       parent=TC_INGRESS, classid=1, direct_action=True, prio=1)  # fmt: skip
            else:
                flags = XDP_FLAGS_SKB_MODE if mode == "xdp-generic" else XDP_FLAGS_DRV_MODE
                ipr.link("set", index=idx, xdp={"attrs": [("IFLA_XDP_FD", fd),
                                                          ("IFLA_XDP_FLAGS", flags)]})  # fmt: skip
        except NetlinkError as exc:
            raise AttachError(f"attaching {name} ({mode}) to {ifname}: {exc}") from None


TC_EGRESS = "ffff:fff3"


def attach_egress(ifname: str, fd: int, name: str) -> None:
    """Attach tc program ``fd`` on ``ifname``'s egress (clsact), replacing pysteer's."""
    with IPRoute() as ipr:
        idx = _index(ipr, ifname)
        try:
            with contextlib.suppress(NetlinkError):  # already there
                ipr.tc("add", "clsact", idx)
            ipr.tc("replace-filter", "bpf", idx, ":1", fd=fd, name=name,
                   parent=TC_EGRESS, classid=1, direct_action=True, prio=1)  # fmt: skip
        except NetlinkError as exc:
            raise AttachError(f"attaching {name} (tc egress) to {ifname}: {exc}") from None


def detach(ifname: str, mode: str) -> None:
    """Remove what ``attach`` put on ``ifname``: the clsact programs, and XDP if any."""
    with IPRoute() as ipr, contextlib.suppress(NetlinkError):
        ipr.tc("del", "clsact", _index(ipr, ifname))
    if mode != "tc":
        detach_xdp(ifname, mode)


def load_steer(pin: Path, mode: str, max_flows: int | None = None) -> tuple[Any, Any, Any, Any]:
    """The compiled steering module, its tc program, its XDP program (None in tc mode),
    and its egress program (connection tracking of the service's side).

    In the XDP modes the tc program is attached too, as the fallback for packets XDP
    passes up (larger than the target's MTU), so no offload has to be turned off."""
    from bcc import BPF  # noqa: PLC0415 - Debian's python3-bpfcc

    bpf = compile_program("steer.c", pin, max_flows)
    tc = load_func(bpf, "steer_tc", BPF.SCHED_CLS)
    xdp = None if mode == "tc" else load_func(bpf, "steer_xdp", BPF.XDP)
    egress = load_func(bpf, "steer_egress", BPF.SCHED_CLS)
    return bpf, tc, xdp, egress


def load_guard(pin: Path) -> tuple[Any, Any]:
    from bcc import BPF  # noqa: PLC0415

    bpf = compile_program("guard.c", pin)
    return bpf, load_func(bpf, "guard_tc", BPF.SCHED_CLS)
