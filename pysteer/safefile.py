"""Write key material into a directory nobody else controls.

``certs init`` and ``certs bundle`` write private keys, often as root and sometimes into a
path other users can guess. Anyone who owns the directory, or may write to it, can plant
files or symlinks there before root writes, or swap what root wrote afterwards. So:

- ``private_dir`` creates the directory 0700, or accepts an existing one only when it is
  a real directory (not a symlink), owned by the effective uid and not group- or
  world-writable; the check is repeated on the opened descriptor, so a rename between the
  check and the open is caught;
- ``SafeDir.write`` creates a fresh, randomly named temporary file with
  ``O_EXCL|O_NOFOLLOW`` relative to that descriptor, sets its mode with ``fchmod``,
  ``fsync``s it and renames it over the target atomically, then ``fsync``s the directory.
  A planted ``*.tmp`` file or symlink is never opened or followed.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path

PRIVATE = 0o600
PUBLIC = 0o644


class UnsafeDirectory(PermissionError):
    """A directory that someone other than us could write to or swap; the message says
    which path, who owns it and how to fix it."""


def _check(st: os.stat_result, path: Path) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeDirectory(f"{path} is a symlink; give the real directory")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeDirectory(f"{path} exists and is not a directory")
    euid = os.geteuid()
    if st.st_uid != euid:
        raise UnsafeDirectory(
            f"{path} is owned by uid {st.st_uid}, not by uid {euid} who writes the keys: "
            "someone else made it; remove it, or give a directory of your own"
        )
    if st.st_mode & 0o022:
        raise UnsafeDirectory(
            f"{path} is writable by its group or by others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); chmod go-w it, or give another directory"
        )


def _check_parents(path: Path) -> None:
    """Every ancestor must be unwritable by others, or sticky (like /tmp): otherwise
    another user could rename our directory away and put their own in its place."""
    for parent in path.parents:
        try:
            st = os.stat(parent)
        except FileNotFoundError:
            continue
        if st.st_mode & 0o002 and not st.st_mode & stat.S_ISVTX:
            raise UnsafeDirectory(
                f"{parent} is world-writable without the sticky bit, so anyone could "
                f"replace {path}; use a directory under a safe parent"
            )


class SafeDir:
    """An opened, checked directory; files are written relative to its descriptor."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self.fd = path, fd

    def __enter__(self) -> SafeDir:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def exists(self, name: str) -> bool:
        try:
            os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return True

    def read(self, name: str) -> bytes:
        """A regular file of this directory, never through a symlink."""
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.fd)
        with os.fdopen(fd, "rb") as f:
            return f.read()

    def write(self, name: str, data: bytes, mode: int) -> None:
        """Replace ``name`` with ``data`` atomically; readers see the old or the new file."""
        if "/" in name or name in ("", ".", ".."):
            raise ValueError(f"not a plain file name: {name!r}")
        tmp = f".{name}.{secrets.token_hex(8)}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o600, dir_fd=self.fd)
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=self.fd)
            raise
        os.close(fd)
        try:
            os.replace(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=self.fd)
            raise
        os.fsync(self.fd)


def private_dir(path: Path) -> SafeDir:
    """Open ``path`` for writing keys, creating it (and missing parents) 0700 if needed.

    Raises UnsafeDirectory for a directory that is not safely ours."""
    path = Path(os.path.abspath(path))
    _check_parents(path)
    missing = [p for p in (path, *path.parents) if not os.path.lexists(p)]
    for p in reversed(missing):
        with contextlib.suppress(FileExistsError):  # made meanwhile: checked below
            os.mkdir(p, 0o700)
    _check(os.lstat(path), path)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        _check(os.fstat(fd), path)  # the directory we opened is the one we checked
    except BaseException:
        os.close(fd)
        raise
    return SafeDir(path, fd)
