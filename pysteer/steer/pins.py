"""Where pysteer pins its BPF maps: /sys/fs/bpf/pysteer/<name>/ on a mounted bpffs.

bpffs's root is world-writable (mode 1777) on many systems, so a local user could make
``pysteer`` or ``pysteer/<name>`` first and then rename or unlink the pins in it (or make
it a symlink elsewhere). Every directory pysteer uses there must therefore be a real
directory owned by the effective uid that nobody else can write; pysteer makes its own
0700 and refuses any other, with the path and the fix.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import re
import stat
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
    _fields_ = (
        ("pathname", ctypes.c_uint64),
        ("bpf_fd", ctypes.c_uint32),
        ("file_flags", ctypes.c_uint32),
    )


class _InfoByFd(ctypes.Structure):
    _fields_ = (
        ("bpf_fd", ctypes.c_uint32),
        ("info_len", ctypes.c_uint32),
        ("info", ctypes.c_uint64),
    )


class _MapInfo(ctypes.Structure):
    _fields_ = (
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
        ("rest", ctypes.c_uint8 * 64),
    )


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
    """Every map pinned by instance ``name``, by its name (empty when there are none).

    PinError if its directories are not safe to use: what is in them is not ours."""
    path = _instance(name)
    if not is_bpffs() or not _trusted(PIN_ROOT) or not _trusted(path):
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
    """Unpin every map of instance ``name`` and remove its directory (safe if absent).

    PinError, removing nothing, if the directory is not ours: a symlink would otherwise
    make this unlink whatever it points to."""
    path = _instance(name)
    if not _trusted(PIN_ROOT) or not _trusted(path):
        return
    for pinned in path.iterdir():
        pinned.unlink()  # never follows a symlink
    path.rmdir()


def pin_dir(name: str) -> Path:
    """The pin directory of steering instance ``name``, created (0700) if needed.

    PinError if bpffs or a directory on the way is one another user could change."""
    path = _instance(name)
    ensure_bpffs()
    _check_mount()
    for directory in (PIN_ROOT, path):
        with contextlib.suppress(FileExistsError):
            os.mkdir(directory, 0o700)
        _trusted(directory)  # also when it was there already, or made by someone else
    return path


def check_name(name: str) -> None:
    """PinError unless ``name`` can name a steering instance (nothing is made)."""
    _instance(name)


def _instance(name: str) -> Path:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise PinError(f"invalid steering instance name {name!r}: use [a-z0-9_-], 1-63 chars")
    return PIN_ROOT / name


def _refuse(path: Path, why: str, fix: str) -> PinError:
    return PinError(f"refusing the pin directory {path}: {why}. {fix}, then start again")


def _trusted(path: Path) -> bool:
    """Whether ``path`` exists; PinError unless it is a real directory (not a symlink)
    owned by the effective uid, that neither its group nor others may write."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise PinError(f"cannot inspect the pin directory {path}: {exc.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise _refuse(
            path,
            f"it is a symbolic link (to {os.readlink(path)!r}), and pins "
            "must live in a real directory of their own",
            f"Remove the link (rm {path})",
        )
    if not stat.S_ISDIR(st.st_mode):
        raise _refuse(path, "it is not a directory", f"Remove it (rm {path})")
    euid = os.geteuid()
    if st.st_uid != euid:
        raise _refuse(
            path,
            f"it belongs to uid {st.st_uid}, not to uid {euid} (this "
            "process): another user made it and could rename or unlink "
            "the pins in it",
            f"Check what it holds, then remove it (rm -r {path}) or, if it is "
            f"pysteer's own, chown {euid}:{os.getegid()} {path}",
        )
    if st.st_mode & 0o022:
        mode = stat.S_IMODE(st.st_mode)
        raise _refuse(
            path,
            f"its group or others may write it (mode {mode:04o}), so they "
            "could rename or unlink the pins in it",
            f"Check what it holds, then chmod go-w {path}",
        )
    return True


def _check_mount() -> None:
    """bpffs's root may be world-writable only if sticky (as /tmp): then nobody but its
    owner can rename or remove the pysteer directory in it."""
    st = os.lstat(BPFFS)
    if st.st_uid not in (0, os.geteuid()):
        raise PinError(f"{BPFFS} belongs to uid {st.st_uid}: mount bpffs there as root")
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        mode = stat.S_IMODE(st.st_mode)
        raise PinError(
            f"{BPFFS} is writable by others without the sticky bit (mode "
            f"{mode:04o}), so anyone could replace pysteer's pins: "
            f"chmod +t {BPFFS}, then start again"
        )
