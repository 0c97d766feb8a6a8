"""Write key material into a directory nobody else controls.

``certs init`` and ``certs bundle`` write private keys, often as root and sometimes into a
path other users can guess. Anyone who owns the directory, or may write to it, can plant
files or symlinks there before root writes, or swap what root wrote afterwards. So:

- ``private_dir`` walks the path from ``/`` with ``O_NOFOLLOW`` (no symlink anywhere in
  it is followed), creating what is missing 0700. Every ancestor must be root's or ours
  and writable by nobody else (unless sticky and root's, like /tmp); the directory itself
  must be ours and not group- or world-writable. Each check is made on the descriptor
  that was opened, so nothing can be swapped between a check and its use;
- ``SafeDir.write`` creates a fresh, randomly named temporary file with
  ``O_EXCL|O_NOFOLLOW`` relative to that descriptor, sets its mode with ``fchmod``,
  ``fsync``s it and renames it over the target atomically, then ``fsync``s the directory.
  A planted ``*.tmp`` file or symlink is never opened or followed.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import stat
from pathlib import Path

PRIVATE = 0o600
_TEMPORARY = re.compile(r"\.[^/]+\.[0-9a-f]{16}\.tmp")  # what write names them
PUBLIC = 0o644


class UnsafeDirectory(PermissionError):
    """A directory that someone other than us could write to or swap; the message says
    which path, who owns it and how to fix it."""


def _check(st: os.stat_result, path: Path) -> None:
    """The key directory itself: ours, and no one else may write to it."""
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


def _check_parent(st: os.stat_result, path: Path, child: Path) -> None:
    """An ancestor: whoever may rename entries in it could swap ``child`` for their own.
    So it must be root's or ours, and writable by nobody else, unless sticky and root's
    (like /tmp, where only an entry's owner may rename it)."""
    if st.st_uid not in (0, os.geteuid()):
        raise UnsafeDirectory(
            f"{path} is owned by uid {st.st_uid}, who could replace {child}; "
            "use a directory whose parents are root's"
        )
    if st.st_mode & 0o022 and not (st.st_mode & stat.S_ISVTX and st.st_uid == 0):
        raise UnsafeDirectory(
            f"{path} is writable by others (mode {stat.S_IMODE(st.st_mode):04o}), so they "
            f"could replace {child}; use a directory under a safe parent"
        )


def _open_dir(name: str, parent_fd: int | None, path: Path) -> int:
    """One path component, never through a symlink."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(name, flags, dir_fd=parent_fd)
    except OSError as exc:
        if os.path.islink(path):
            raise UnsafeDirectory(f"{path} is a symlink; give the real directory") from None
        raise UnsafeDirectory(f"{path}: {exc.strerror}") from None


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

    def remove_temporaries(self) -> None:
        """Remove what ``write`` left when its process was killed midway: its temporaries
        are never read, but would pile up."""
        for name in os.listdir(self.fd):
            if _TEMPORARY.fullmatch(name):
                self.remove(name)

    def remove(self, name: str) -> None:
        """Remove ``name`` (a file, or a symlink itself) if it is there."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=self.fd)

    def read(self, name: str) -> bytes:
        """A regular file of this directory, never through a symlink."""
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.fd)
        except OSError as exc:  # named in full: the caller's message says where
            raise OSError(exc.errno, exc.strerror, str(self.path / name)) from None
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

    The path is walked from ``/`` one component at a time, each opened relative to the
    one before with ``O_NOFOLLOW``: no symlink anywhere in it is followed, every ancestor
    is checked on the descriptor that was opened (``_check_parent``), and so is the
    directory itself (``_check``). Raises UnsafeDirectory otherwise."""
    path = Path(os.path.abspath(path))
    parts = path.parts[1:]
    if not parts:
        raise UnsafeDirectory("/ is not a place for keys")
    fd = _open_dir("/", None, Path("/"))
    here = Path("/")
    try:
        for i, name in enumerate(parts):
            _check_parent(os.fstat(fd), here, path)
            child = here / name
            try:
                os.mkdir(name, 0o700, dir_fd=fd)
            except FileExistsError:
                pass  # made before (or meanwhile): checked like any other below
            except OSError as exc:
                raise UnsafeDirectory(f"cannot create {child}: {exc.strerror}") from None
            next_fd = _open_dir(name, fd, child)
            os.close(fd)
            fd, here = next_fd, child
            if i == len(parts) - 1:
                _check(os.fstat(fd), path)
    except BaseException:
        os.close(fd)
        raise
    return SafeDir(path, fd)
