"""Count the packets that XDP redirects and the kernel then loses.

A native XDP redirect to a link whose driver cannot transmit XDP frames loses every
packet. This happens when the link has no XDP program of its own (virtio-net and most NIC
drivers), or, for a veth, when its peer has neither an XDP program nor GRO. The steering
program's counters still say "redirected", and the daemon would report nothing.
``bpf/xdp_watch.c`` catches both ways the kernel reports such a loss:

- the ``xdp:xdp_redirect_err`` tracepoint: the redirect is refused at once. Linux 6.3 and
  later do this for such a link (EOPNOTSUPP). A target that is gone or down shows here too.
- the ``xdp:xdp_devmap_xmit`` tracepoint: its ``drops`` are frames the target's driver
  dropped in ``ndo_xdp_xmit``. Kernels before 6.3 drop them there, with ENXIO.

Counts are kept per link (namespace, receiving interface, target interface). The
tracepoints are attached as raw tracepoints, which need no tracefs. The offsets they read
come from the running kernel's BTF (/sys/kernel/btf/vmlinux, through libbpf).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import socket
import threading
from dataclasses import dataclass
from typing import Any

from pysteer.bpfload import BpfBuildError, compile_file, load_func
from pysteer.paths import bpf_dir

SO_NETNS_COOKIE = 71  # asm-generic (x86, arm64, ...): Linux 5.14+
_BTF_STRUCT, _BTF_UNION = 4, 5
_BTF_MODIFIERS = {8, 9, 10, 11, 18}  # typedef, volatile, const, restrict, type_tag


class WatchError(RuntimeError):
    """Redirect failures cannot be watched here; the message says why."""


class LinkKey(ctypes.Structure):
    _fields_ = (("netns", ctypes.c_uint64), ("from_", ctypes.c_uint32), ("to", ctypes.c_uint32))


class LinkCount(ctypes.Structure):
    _fields_ = (
        ("sent", ctypes.c_uint64),
        ("dropped", ctypes.c_uint64),
        ("refused", ctypes.c_uint64),
        ("last_err", ctypes.c_int32),
        ("pad", ctypes.c_uint32),
    )


@dataclass(frozen=True)
class Count:
    sent: int  # frames the target's driver took
    dropped: int  # frames its driver dropped
    refused: int  # redirects refused at once
    last_err: int  # errno of the last failure (positive), 0 if none

    @property
    def failed(self) -> int:
        return self.dropped + self.refused

    def minus(self, before: Count) -> Count:
        return Count(
            self.sent - before.sent,
            self.dropped - before.dropped,
            self.refused - before.refused,
            self.last_err,
        )


def errno_name(err: int) -> str:
    if err == errno.EOPNOTSUPP:  # == ENOTSUP on Linux; the kernel's name for it here
        return "EOPNOTSUPP"
    return errno.errorcode.get(err, str(err)) if err else "no error"


class _Btf:
    """The running kernel's BTF, read with libbpf (which BCC's libbpfcc depends on)."""

    def __init__(self) -> None:
        try:
            lib = ctypes.CDLL("libbpf.so.1")
        except OSError as exc:
            raise WatchError(f"libbpf is not available: {exc}") from None
        lib.btf__load_vmlinux_btf.restype = ctypes.c_void_p
        lib.btf__find_by_name_kind.argtypes = (ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint32)
        lib.btf__type_by_id.restype = ctypes.c_void_p
        lib.btf__type_by_id.argtypes = (ctypes.c_void_p, ctypes.c_uint32)
        lib.btf__name_by_offset.restype = ctypes.c_char_p
        lib.btf__name_by_offset.argtypes = (ctypes.c_void_p, ctypes.c_uint32)
        lib.btf__free.argtypes = (ctypes.c_void_p,)
        self.lib, self.btf = lib, lib.btf__load_vmlinux_btf()
        if not self.btf or self.btf > (1 << 64) - 4096:  # NULL, or an old libbpf's ERR_PTR
            raise WatchError("the kernel's BTF (/sys/kernel/btf/vmlinux) cannot be read")

    def close(self) -> None:
        self.lib.btf__free(self.btf)

    def _type(self, type_id: int) -> tuple[int, int, int, int]:
        """(address, kind, info, size or referenced type) of a type, past typedefs and
        qualifiers."""
        while True:
            ptr = self.lib.btf__type_by_id(self.btf, type_id)
            if not ptr:
                raise KeyError(type_id)
            _name, info, ref = (ctypes.c_uint32 * 3).from_address(ptr)
            kind = (info >> 24) & 0x1F
            if kind not in _BTF_MODIFIERS:
                return ptr, kind, info, ref
            type_id = ref

    def member(self, type_id: int, name: str) -> tuple[int, int]:
        """(type id, byte offset) of member ``name``, looking into anonymous members."""
        ptr, kind, info, _ = self._type(type_id)
        if kind not in (_BTF_STRUCT, _BTF_UNION):
            raise KeyError(name)
        vlen, bitfields = info & 0xFFFF, info >> 31
        members = (ctypes.c_uint32 * (3 * vlen)).from_address(ptr + 12)
        for i in range(vlen):
            name_off, mtype, offset = members[3 * i : 3 * i + 3]
            byte = (offset & 0xFFFFFF if bitfields else offset) // 8
            mname = self.lib.btf__name_by_offset(self.btf, name_off) or b""
            if mname.decode() == name:
                return mtype, byte
            if not mname:
                with contextlib.suppress(KeyError):
                    inner, off = self.member(mtype, name)
                    return inner, byte + off
        raise KeyError(name)

    def offset(self, struct: str, path: str) -> int:
        """The byte offset of ``path`` (``member.member...``) in ``struct struct``."""
        type_id = self.lib.btf__find_by_name_kind(self.btf, struct.encode(), _BTF_STRUCT)
        if type_id <= 0:
            raise KeyError(struct)
        total = 0
        for part in path.split("."):
            type_id, off = self.member(type_id, part)
            total += off
        return total


@functools.cache
def kernel_offsets() -> dict[str, int]:
    """OFF_* for bpf/xdp_watch.c, read from the running kernel's BTF."""
    btf = _Btf()
    try:
        return {
            "OFF_IFINDEX": btf.offset("net_device", "ifindex"),
            "OFF_ND_NET": btf.offset("net_device", "nd_net.net"),
            "OFF_NET_COOKIE": btf.offset("net", "net_cookie"),
        }
    except KeyError as exc:
        raise WatchError(f"the kernel's BTF has no {exc.args[0]} where expected") from None
    finally:
        btf.close()


def netns_cookie() -> int:
    """The cookie of the calling thread's network namespace."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
        except OSError as exc:
            raise WatchError(f"no network namespace cookie (Linux 5.14+): {exc}") from None
    return int.from_bytes(raw, "little")


class Watch:
    """Redirect counters for links of one network namespace: one BPF module, with its two
    raw tracepoints attached while it is open. Open it with ``open_watch``."""

    def __init__(self, bpf: Any, netns: int) -> None:
        self.bpf, self.netns = bpf, netns
        self.ingress = 0  # the steering link's ifindex: failed() and summary() count from it
        self.links = bpf[b"links"]
        self.names: dict[tuple[int, int], str] = {}  # (from, to) -> the target's name
        self._probe: Any = None
        self._lock = threading.Lock()

    def add(self, from_ifindex: int, to_ifindex: int, name: str) -> None:
        """Count redirects from ``from_ifindex`` to ``to_ifindex`` (kept if counted already)."""
        with self._lock:
            key = LinkKey(self.netns, from_ifindex, to_ifindex)
            if (from_ifindex, to_ifindex) not in self.names:
                self.links[key] = LinkCount()
            self.names[(from_ifindex, to_ifindex)] = name

    def remove(self, from_ifindex: int, to_ifindex: int) -> None:
        with self._lock:
            self.names.pop((from_ifindex, to_ifindex), None)
            with contextlib.suppress(KeyError):
                del self.links[LinkKey(self.netns, from_ifindex, to_ifindex)]

    def count(self, from_ifindex: int, to_ifindex: int) -> Count:
        try:
            c = self.links[LinkKey(self.netns, from_ifindex, to_ifindex)]
        except KeyError:
            return Count(0, 0, 0, 0)
        return Count(c.sent, c.dropped, c.refused, -c.last_err)

    def counts(self, from_ifindex: int | None = None) -> dict[str, Count]:
        """By target name: the links from ``from_ifindex`` (default: ``ingress``)."""
        from_ifindex = self.ingress if from_ifindex is None else from_ifindex
        out: dict[str, Count] = {}
        for (src, dst), name in sorted(self.names.items()):
            if src != from_ifindex:
                continue
            c, prev = self.count(src, dst), out.get(name)
            if prev is not None:
                c = Count(
                    c.sent + prev.sent,
                    c.dropped + prev.dropped,
                    c.refused + prev.refused,
                    c.last_err or prev.last_err,
                )
            out[name] = c
        return out

    def failed(self, from_ifindex: int | None = None) -> int:
        """Redirected packets lost so far, from ``from_ifindex`` to any watched link."""
        return sum(c.failed for c in self.counts(from_ifindex).values())

    def summary(self, from_ifindex: int | None = None) -> str:
        parts = [
            f"{name}: {c.failed} ({errno_name(c.last_err)})"
            for name, c in self.counts(from_ifindex).items()
            if c.failed
        ]
        return ", ".join(parts) or "none"

    def set_probe_target(self, ifindex: int) -> int:
        """The probe program's fd, redirecting to ``ifindex`` from now on."""
        from bcc import BPF  # noqa: PLC0415

        if self._probe is None:
            self._probe = load_func(self.bpf, "pysteer_probe", BPF.XDP)
        self.bpf[b"probe_target"][ctypes.c_int(0)] = ctypes.c_uint32(ifindex)
        return self._probe.fd

    def close(self) -> None:
        self.bpf.cleanup()


def open_watch() -> Watch:
    """Compile and attach the watch; call it in the namespace whose links it will count.
    WatchError if this kernel cannot be watched (no BTF, no raw tracepoints)."""
    offsets = kernel_offsets()
    cookie = netns_cookie()
    cflags = [f"-D{name}={value}" for name, value in offsets.items()]
    try:
        bpf = compile_file(bpf_dir() / "xdp_watch.c", cflags=cflags)
    except BpfBuildError as exc:  # also a raw tracepoint that cannot be attached
        raise WatchError(str(exc)) from None
    return Watch(bpf, cookie)
