"""Native XDP at the steering node's start: a self-test of the redirect, and the watch.

Whether a native XDP redirect reaches a host's link depends on the target's driver, not
on the receiving one. Most drivers (virtio-net among them) transmit redirected frames only
when they run an XDP program of their own. A veth transmits them only when its *peer* runs
one, or has GRO on. Otherwise every redirected packet is lost, while the counters say
"redirected". So, at start:

- each host's link gets the pass-through program, pysteer_pass (``loader.attach_pass``;
  ``Steerer._install_host`` does it in native mode);
- the self-test redirects a few probe frames to each host's link. A probe program runs
  through ``BPF_PROG_TEST_RUN`` with live frames (``BPF_F_TEST_XDP_LIVE_FRAMES``, Linux
  5.18), as if the frames had been received on ``lo``. They take the kernel's real redirect
  path and the target driver's real transmit path (``ndo_xdp_xmit``), and nothing is sent
  on any other link. The watch (``xdp_watch``) tells whether the target's driver took them.
  Each probe frame goes to the host's MAC with ethertype 0x88B5 (IEEE local experimental,
  like the doctor's probe). No protocol stack handles that ethertype, so a host that gets
  one drops it. The test takes a few milliseconds.
- ``auto`` keeps native XDP only if every host's link passed. Otherwise it uses tc and
  logs why. An explicit ``xdp-native`` is kept, and a failure is logged as an error;
- the watch stays open and counts the redirected packets the kernel loses
  (``redirect_failed``).

Everything here runs in the steering namespace (through ``Steerer._in_ns``).
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import socket
import struct
from collections.abc import Iterable
from typing import Any

from pysteer.steer import loader
from pysteer.steer.xdp_watch import Watch, WatchError, errno_name, open_watch

log = logging.getLogger("pysteer.steer")

ETH_P_PYSTEER_PROBE = 0x88B5  # the doctor's probe ethertype (IEEE local experimental)
PROBE_FRAMES = 4
PROBE_PAYLOAD = b"pysteer xdp self-test: no protocol, dropped by its receiver"
_BPF_PROG_TEST_RUN = 10
_BPF_F_TEST_XDP_LIVE_FRAMES = 1 << 1


class _TestRun(ctypes.Structure):  # bpf_attr.test
    _fields_ = (
        ("prog_fd", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("data_in", ctypes.c_uint64),
        ("data_out", ctypes.c_uint64),
        ("repeat", ctypes.c_uint32),
        ("duration", ctypes.c_uint32),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_uint64),
        ("ctx_out", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    )


class _XdpMd(ctypes.Structure):
    _fields_ = tuple(
        (name, ctypes.c_uint32)
        for name in (
            "data",
            "data_end",
            "data_meta",
            "ingress_ifindex",
            "rx_queue_index",
            "egress_ifindex",
        )
    )


def probe_frame(dmac: bytes, smac: bytes) -> bytes:
    """A frame for ``dmac`` that no protocol handles (see the module's doc)."""
    return dmac + smac + struct.pack("!H", ETH_P_PYSTEER_PROBE) + PROBE_PAYLOAD.ljust(46, b"\0")


def _live_run(prog_fd: int, frame: bytes, ingress: int, count: int) -> None:
    """Run XDP program ``prog_fd`` on ``count`` live copies of ``frame``, as received on
    ``ingress``: what it redirects is really sent (OSError if the kernel cannot)."""
    from pysteer.steer.pins import NR_BPF  # noqa: PLC0415

    nr = NR_BPF.get(platform.machine())
    if nr is None:
        raise OSError(0, f"unknown bpf() syscall number on {platform.machine()}")
    data = ctypes.create_string_buffer(frame, len(frame))
    md = _XdpMd(data=0, data_end=len(frame), ingress_ifindex=ingress)
    attr = _TestRun(
        prog_fd=prog_fd,
        data_size_in=len(frame),
        data_in=ctypes.addressof(data),
        repeat=count,
        ctx_size_in=ctypes.sizeof(md),
        ctx_in=ctypes.addressof(md),
        flags=_BPF_F_TEST_XDP_LIVE_FRAMES,
    )
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(nr, _BPF_PROG_TEST_RUN, ctypes.byref(attr), ctypes.sizeof(attr)) < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def check(watch: Watch, hosts: Iterable[Any]) -> str | None:
    """Redirect PROBE_FRAMES probe frames to each host's link and check that its driver
    took them all. ``hosts`` have ``ifname``, ``ifindex``, ``mac`` and ``our_mac``. Returns
    None if every link passed, or why one did not."""
    lo = socket.if_nametoindex("lo")  # the probe's receiving link: not a steered one
    seen: set[int] = set()
    for host in hosts:
        if host.ifindex in seen:
            continue
        seen.add(host.ifindex)
        watch.add(lo, host.ifindex, host.ifname)
        try:
            fd = watch.set_probe_target(host.ifindex)
            try:
                _live_run(fd, probe_frame(host.mac, host.our_mac), lo, PROBE_FRAMES)
            except OSError as exc:
                return (
                    f"this kernel cannot run the self-test (BPF_PROG_TEST_RUN with live "
                    f"XDP frames, Linux 5.18+: {exc.strerror})"
                )
            got = watch.count(lo, host.ifindex)
        finally:
            watch.remove(lo, host.ifindex)
        if got.refused:
            return (
                f"XDP redirect to {host.ifname} is refused ({errno_name(got.last_err)}): "
                f"its driver sends redirected frames only when it runs an XDP program "
                f"(a veth: when its peer runs one, or has GRO on)"
            )
        if got.dropped:
            return (
                f"the driver of {host.ifname} dropped {got.dropped} of {PROBE_FRAMES} "
                f"redirected frames ({errno_name(got.last_err)})"
            )
        if got.sent < PROBE_FRAMES:
            return (
                f"the driver of {host.ifname} took {got.sent} of {PROBE_FRAMES} redirected frames"
            )
    return None


def _give_pass(host: Any) -> None:
    """The host's link gets pysteer_pass, or keeps the native XDP program it has."""
    try:
        if not loader.attach_pass(host.ifname):
            log.info(
                "%s keeps the native XDP program it runs (not pysteer's): any one lets "
                "its driver send redirected frames",
                host.ifname,
            )
    except loader.AttachError as exc:
        log.warning("%s: native XDP redirects to host %s may be lost", exc, host.name)


def add_host(ifname: str, mode: str, host: Any, watch: Watch | None) -> None:
    """A host added to a steering node in an XDP mode (``ifname``: its client-facing link).
    In native mode its link gets pysteer_pass, and, once the watch runs, the self-test
    (a failure is logged). The watch counts what is lost on the way to it."""
    if mode == "xdp-native":
        _give_pass(host)
    if watch is None:
        return
    watch.add(socket.if_nametoindex(ifname), host.ifindex, host.ifname)
    if mode == "xdp-native":
        why = check(watch, [host])
        if why is not None:
            log.error(
                "native XDP self-test for host %s failed: %s. Packets steered to it "
                "will be lost (counted as redirect_failed)",
                host.name,
                why,
            )


def _clear_leftovers(ifname: str, mode: str, hosts: list[Any]) -> None:
    """Remove what an earlier run in another mode left: the steering XDP program on
    ``ifname`` (a steerer in tc mode must not be bypassed by a stale XDP program, whose
    redirects to a link without XDP would be lost), and pysteer_pass on the hosts' links
    unless the mode is native."""
    keep = {"xdp-native": loader.XDP_ATTACHED_DRV, "xdp-generic": loader.XDP_ATTACHED_SKB}
    current = loader.xdp_program(ifname)
    if current is not None and current[1] == loader.STEER_XDP_NAME and current[0] != keep.get(mode):
        loader.detach_named(ifname, loader.STEER_XDP_NAME)
    if mode != "xdp-native":
        for host in hosts:
            loader.detach_pass(host.ifname)


def _open(ifname: str, requested: str, hosts: list[Any]) -> tuple[Watch | None, str | None]:
    """The watch of ``ifname``'s redirects to the hosts, or None and why not."""
    try:
        watch = open_watch()
    except WatchError as exc:
        if requested != "auto":
            log.warning("XDP redirect failures will not be counted: %s", exc)
        return None, f"native XDP redirects cannot be checked ({exc})"
    watch.ingress = socket.if_nametoindex(ifname)
    for host in hosts:
        watch.add(watch.ingress, host.ifindex, host.ifname)
    return watch, None


def start(ifname: str, mode: str, requested: str, hosts: list[Any]) -> tuple[str, Watch | None]:
    """The mode the steering node runs in, and the watch of its redirects (None in tc
    mode, or when this kernel cannot be watched). ``mode`` is what was resolved so far,
    ``requested`` what the operator asked for. Call it after ``add_host`` for each host."""
    _clear_leftovers(ifname, mode, hosts)
    if mode == "tc":
        return mode, None
    watch, why = _open(ifname, requested, hosts)
    if mode != "xdp-native":
        return mode, watch
    if watch is not None and not hosts:
        why = "no host to test a redirect to"
    elif watch is not None:
        failure = check(watch, hosts)
        why = None if failure is None else f"the self-test failed: {failure}"
    if requested == "auto" and why is not None:
        log.warning("auto mode: tc on %s, not native XDP: %s", ifname, why)
        for host in hosts:
            loader.detach_pass(host.ifname)
        if watch is not None:
            watch.close()
        return "tc", None
    if watch is not None and hosts and why is None:
        log.info(
            "native XDP on %s: the self-test's frames redirected to %s left them",
            ifname,
            ", ".join(sorted({h.ifname for h in hosts})),
        )
    elif watch is not None and hosts:
        log.error(
            "native XDP on %s: %s. Packets steered there will be lost (counted as "
            "redirect_failed); --mode auto would use tc",
            ifname,
            why,
        )
    return mode, watch
