"""Where pysteer pins its BPF maps: /sys/fs/bpf/pysteer/<name>/ on a mounted bpffs."""

from __future__ import annotations

import ctypes
import os
import re
from pathlib import Path

BPFFS = Path("/sys/fs/bpf")
PIN_ROOT = BPFFS / "pysteer"
BPF_FS_MAGIC = 0xCAFE4A11
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


class PinError(RuntimeError):
    """The pin directory cannot be used."""


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
