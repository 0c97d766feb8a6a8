"""Compile pysteer's BPF programs with BCC and attach them with pyroute2.

Attach and detach work on the network namespace of the calling thread (pyroute2 talks to
the namespace of the thread that uses it), so call them from inside the namespace, for
example through ``pysteer.netns.call_in``.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import platform
import socket
import threading
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from pysteer.bpfload import compile_file, load_func
from pysteer.paths import bpf_dir

log = logging.getLogger("pysteer.steer")

MODES = ("auto", "tc", "xdp-native", "xdp-generic")
XDP_FLAGS_UPDATE_IF_NOEXIST, XDP_FLAGS_SKB_MODE, XDP_FLAGS_DRV_MODE = 1, 2, 4
XDP_FLAGS_REPLACE = 16
XDP_ATTACHED_DRV, XDP_ATTACHED_SKB = 1, 2
TC_INGRESS = "ffff:fff2"
STEER_XDP_NAME = "steer_xdp"  # BPF program names (the C function's, at most 15 bytes)
PASS_NAME = "pysteer_pass"  # noqa: S105 - a program name


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
    if kind == "veth":
        log.info(
            "auto mode: %s is a veth: tc, which is faster there than native XDP (and "
            "native XDP redirect between veths needs an XDP program or GRO on the "
            "target's peer, and TX checksum offload off on the sender)",
            ifname,
        )
        return "tc"
    return "xdp-native"


def native_xdp_supported(ifname: str) -> bool:
    """Whether ``ifname``'s driver runs XDP natively: attach a trivial program, then remove it."""
    from bcc import BPF  # noqa: PLC0415

    probe = compile_file(bpf_dir() / "probe" / "doctor.c")
    try:
        fn = load_func(probe, "doctor_xdp", BPF.XDP)
        try:
            attach(ifname, "xdp-native", fn.fd, "pysteer_probe")
        except AttachError as exc:
            log.info("native XDP is not available on %s (%s): auto mode uses tc", ifname, exc)
            return False
        detach_xdp(ifname, "xdp-native")
        return True
    finally:
        probe.cleanup()


def detach_xdp(ifname: str, mode: str) -> None:
    flags = XDP_FLAGS_SKB_MODE if mode == "xdp-generic" else XDP_FLAGS_DRV_MODE
    with IPRoute() as ipr, contextlib.suppress(NetlinkError):
        ipr.link(
            "set",
            index=_index(ipr, ifname),
            xdp={"attrs": [("IFLA_XDP_FD", -1), ("IFLA_XDP_FLAGS", flags)]},
        )


def attach(ifname: str, mode: str, fd: int, name: str) -> None:
    """Attach program ``fd`` on ``ifname``'s ingress, replacing what pysteer put there."""
    with IPRoute() as ipr:
        idx = _index(ipr, ifname)
        try:
            if mode == "tc":
                with contextlib.suppress(NetlinkError):  # already there
                    ipr.tc("add", "clsact", idx)
                # replace, not delete + add: a restarted daemon leaves no gap
                ipr.tc(
                    "replace-filter",
                    "bpf",
                    idx,
                    ":1",
                    fd=fd,
                    name=name,
                    parent=TC_INGRESS,
                    classid=1,
                    direct_action=True,
                    prio=1,
                )
            else:
                flags = XDP_FLAGS_SKB_MODE if mode == "xdp-generic" else XDP_FLAGS_DRV_MODE
                ipr.link(
                    "set",
                    index=idx,
                    xdp={"attrs": [("IFLA_XDP_FD", fd), ("IFLA_XDP_FLAGS", flags)]},
                )
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
            ipr.tc(
                "replace-filter",
                "bpf",
                idx,
                ":1",
                fd=fd,
                name=name,
                parent=TC_EGRESS,
                classid=1,
                direct_action=True,
                prio=1,
            )
        except NetlinkError as exc:
            raise AttachError(f"attaching {name} (tc egress) to {ifname}: {exc}") from None


def detach(ifname: str, mode: str) -> None:
    """Remove what ``attach`` put on ``ifname``: the clsact programs, and XDP if any."""
    with IPRoute() as ipr, contextlib.suppress(NetlinkError):
        ipr.tc("del", "clsact", _index(ipr, ifname))
    if mode != "tc":
        detach_xdp(ifname, mode)


# --- the XDP program on a link, and the host-facing links' pass-through program -----------
_BPF_MAP_LOOKUP_ELEM, _BPF_OBJ_GET, _BPF_PROG_GET_FD_BY_ID, _BPF_OBJ_GET_INFO_BY_FD = 1, 7, 13, 15


class _Attr(ctypes.Structure):
    """The bpf_attr of the commands used here (the kernel reads only what it needs)."""

    _fields_ = (
        ("a", ctypes.c_uint32),
        ("b", ctypes.c_uint32),
        ("c", ctypes.c_uint64),
        ("d", ctypes.c_uint64),
        ("e", ctypes.c_uint64),
    )


class _ObjGet(ctypes.Structure):
    _fields_ = (
        ("pathname", ctypes.c_uint64),
        ("bpf_fd", ctypes.c_uint32),
        ("file_flags", ctypes.c_uint32),
        ("pad", ctypes.c_uint64 * 2),
    )


class _ProgInfo(ctypes.Structure):  # the head of struct bpf_prog_info
    _fields_ = (
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16),
    )


def _bpf(cmd: int, attr: _Attr | _ObjGet) -> int:
    from pysteer.steer.pins import NR_BPF  # noqa: PLC0415

    nr = NR_BPF.get(platform.machine())
    if nr is None:
        raise OSError(0, f"unknown bpf() syscall number on {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)
    rc = libc.syscall(nr, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return rc


def _prog_name(prog_id: int) -> tuple[int, str]:
    """An fd of program ``prog_id`` (the caller closes it) and the program's name."""
    fd = _bpf(_BPF_PROG_GET_FD_BY_ID, _Attr(a=prog_id))
    info = _ProgInfo()
    try:
        _bpf(_BPF_OBJ_GET_INFO_BY_FD, _Attr(a=fd, b=ctypes.sizeof(info), c=ctypes.addressof(info)))
    except OSError:
        os.close(fd)
        raise
    return fd, info.name.decode(errors="replace")


def xdp_attached(ifname: str) -> tuple[int, int] | None:
    """How an XDP program runs on ``ifname`` (XDP_ATTACHED_DRV: native, or _SKB: generic)
    and its id, or None when there is none."""
    with IPRoute() as ipr:
        link = ipr.get_links(_index(ipr, ifname))[0]
    xdp = link.get_attr("IFLA_XDP")
    if xdp is None:
        return None
    # the kernel gives a program id per mode attached (an offloaded one does not matter here)
    for attached, attr in (
        (XDP_ATTACHED_DRV, "IFLA_XDP_DRV_PROG_ID"),
        (XDP_ATTACHED_SKB, "IFLA_XDP_SKB_PROG_ID"),
    ):
        if xdp.get_attr(attr):
            return attached, xdp.get_attr(attr)
    return None


def xdp_program(ifname: str) -> tuple[int, str] | None:
    """(XDP_ATTACHED_DRV or _SKB, program name) of the XDP program on ``ifname``, or None."""
    found = xdp_attached(ifname)
    if found is None:
        return None
    try:
        fd, name = _prog_name(found[1])
    except OSError:  # detached meanwhile
        return None
    os.close(fd)
    return found[0], name


def detach_named(ifname: str, name: str) -> bool:
    """Remove the XDP program on ``ifname`` if it is called ``name`` (pysteer's), and no
    other: the kernel checks that the program it removes is still that one."""
    found = xdp_attached(ifname)
    if found is None:
        return False
    try:
        fd, current = _prog_name(found[1])
    except OSError:
        return False
    try:
        if current != name:
            return False
        mode = XDP_FLAGS_DRV_MODE if found[0] == XDP_ATTACHED_DRV else XDP_FLAGS_SKB_MODE
        with IPRoute() as ipr:
            try:
                ipr.link(
                    "set",
                    index=_index(ipr, ifname),
                    xdp={
                        "attrs": [
                            ("IFLA_XDP_FD", -1),
                            ("IFLA_XDP_EXPECTED_FD", fd),
                            ("IFLA_XDP_FLAGS", mode | XDP_FLAGS_REPLACE),
                        ]
                    },
                )
            except NetlinkError:  # replaced meanwhile
                return False
        return True
    finally:
        os.close(fd)


_pass_lock = threading.Lock()
_pass: list[Any] = []  # (module, program): compiled once per process


def attach_pass(ifname: str) -> bool:
    """Give host-facing link ``ifname`` an XDP program, so that its driver transmits what
    native XDP redirects to it: pysteer_pass, which passes every frame. A native XDP program
    already there is kept, since any program does. Returns whether pysteer_pass runs there
    (False: another program does); AttachError if neither can."""
    from bcc import BPF  # noqa: PLC0415

    current = xdp_program(ifname)
    if current is not None and current[0] == XDP_ATTACHED_DRV:
        return current[1] == PASS_NAME
    with _pass_lock:
        if not _pass:
            module = compile_file(bpf_dir() / "xdp_pass.c")
            _pass.append((module, load_func(module, PASS_NAME, BPF.XDP)))
        fd = _pass[0][1].fd
    flags = XDP_FLAGS_DRV_MODE | XDP_FLAGS_UPDATE_IF_NOEXIST
    with IPRoute() as ipr:
        try:
            ipr.link(
                "set",
                index=_index(ipr, ifname),
                xdp={"attrs": [("IFLA_XDP_FD", fd), ("IFLA_XDP_FLAGS", flags)]},
            )
        except NetlinkError as exc:
            raise AttachError(f"attaching {PASS_NAME} (xdp-native) to {ifname}: {exc}") from None
    return True


def detach_pass(ifname: str) -> bool:
    """Remove pysteer_pass from ``ifname`` (never another program). Whether it was there."""
    return detach_named(ifname, PASS_NAME)


def pinned_host_ifindexes(pin: Path) -> list[int]:
    """The links (ifindexes, in the steering namespace) of the hosts pinned at ``pin``."""
    from pysteer.steer.maps import MAX_HOSTS, HostEntry  # noqa: PLC0415

    path = ctypes.create_string_buffer(str(pin / "hosts").encode())
    try:
        fd = _bpf(_BPF_OBJ_GET, _ObjGet(pathname=ctypes.addressof(path)))
    except OSError:
        return []  # nothing pinned
    found: list[int] = []
    try:
        for i in range(MAX_HOSTS):
            key, value = ctypes.c_uint32(i), HostEntry()
            attr = _Attr(a=fd, c=ctypes.addressof(key), d=ctypes.addressof(value))
            with contextlib.suppress(OSError):
                _bpf(_BPF_MAP_LOOKUP_ELEM, attr)
                if value.ifindex and value.ifindex not in found:
                    found.append(value.ifindex)
    finally:
        os.close(fd)
    return found


def detach_pass_hosts(pin: Path) -> list[str]:
    """Remove pysteer_pass from the host links of the instance pinned at ``pin``; call it
    in the steering namespace. Returns the links it was removed from."""
    done = []
    for index in pinned_host_ifindexes(pin):
        try:
            ifname = socket.if_indextoname(index)
        except OSError:  # the link is gone
            continue
        if detach_pass(ifname):
            done.append(ifname)
    return done


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
