"""Where pysteer pins its BPF maps: /sys/fs/bpf/pysteer/<name>/ on a mounted bpffs."""

from __future__ import annotations

import ctypes
import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path

BPFFS = Path("/sys/fs/bpf")
PIN_ROOT = BPFFS / "pysteer"
BPF_FS_MAGIC = 0xCAFE4A11
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


# bpf(2) has no libc wrapper: its number per machine.
NR_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "ppc64le": 361, "s390x": 351}
_BPF_OBJ_GET, _BPF_OBJ_GET_INFO_BY_FD = 7, 15


class PinError(RuntimeError):
    """The pin directory cannot be used."""


@dataclass(frozen=True)
class MapInfo:
    """The shape of a pinned map: what a program compiled against it must agree with."""

    type: int
    key_size: int
    value_size: int
    max_entries: int


class _ObjGet(ctypes.Structure):
    _fields_ = (("pathname", ctypes.c_uint64), ("bpf_fd", ctypes.c_uint32),
                ("file_flags", ctypes.c_uint32))  # fmt: skip


class _InfoByFd(ctypes.Structure):
    _fields_ = (("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32),
                ("info", ctypes.c_uint64))  # fmt: skip


class _MapInfo(ctypes.Structure):
    _fields_ = (("type", ctypes.c_uint32), ("id", ctypes.c_uint32),
                ("key_size", ctypes.c_uint32), ("value_size", ctypes.c_uint32),
                ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32),
                ("name", ctypes.c_char * 16), ("rest", ctypes.c_uint8 * 64))  # fmt: skip


def map_info(path: Path) -> MapInfo:
    """The shape of the map pinned at ``path`` (OSError if there is none)."""
    nr = NR_BPF.get(platform.machine())
    if nr is None:
        raise PinError(f"unknown bpf() syscall number on {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)
    name = ctypes.create_string_buffer(str(path).encode())
    get = _ObjGet(pathname=ctypes.addressof(name))
    fd = libc.syscall(nr, _BPF_OBJ_GET, ctypes.byref(get), ctypes.sizeof(get))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))
    try:
        info = _MapInfo()
        req = _InfoByFd(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
        if libc.syscall(nr, _BPF_OBJ_GET_INFO_BY_FD, ctypes.byref(req), ctypes.sizeof(req)) < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
        return MapInfo(info.type, info.key_size, info.value_size, info.max_entries)
    finally:
        os.close(fd)


def pinned_maps(name: str) -> dict[str, MapInfo]:
    """Every map pinned by instance ``name``, by its name (empty when there are none)."""
    path = PIN_ROOT / name
    if not is_bpffs() or not path.is_dir():
        return {}
    return {p.name: map_info(p) for p in sorted(path.iterdir())}


class _Statfs(ctypes.Structure):
    _fields_ = (("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 112))


def is_bpffs(path: Path = BPFFS) -> bool:
    buf = _Statfs()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.statfs(str(path).encode(), ctypes.byref(buf)) != 0:
        return False
    return buf.f_type & 0xFFFFFFFF == BPF_FS_MAGIC


def ensure_bpffs() -> None:
    """Mount bpffs at /sys/fs/bpf if nothing is mounted there (needs CAP_SYS_ADMIN)."""
    if is_bpffs():
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"bpf", str(BPFFS).encode(), b"bpf", 0, None) != 0:
        err = ctypes.get_errno()
        raise PinError(f"cannot mount bpffs at {BPFFS}: {os.strerror(err)}")


def remove(name: str) -> None:
    """Unpin every map of instance ``name`` and remove its directory (safe if absent)."""
    path = PIN_ROOT / name
    if path.is_dir():
        for pinned in path.iterdir():
            pinned.unlink()
        path.rmdir()


def pin_dir(name: str) -> Path:
    """The pin directory of steering instance ``name``, created if needed."""
    if not NAME_RE.match(name):
        raise PinError(f"invalid steering instance name {name!r}: use [a-z0-9_-], 1-63 chars")
    ensure_bpffs()
    path = PIN_ROOT / name
    path.mkdir(parents=True, exist_ok=True)
    return path
