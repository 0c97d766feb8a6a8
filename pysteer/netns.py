"""Enter named network namespaces from Python, one thread at a time.

Python 3.11 has no ``os.setns``, so this calls libc's ``setns(2)``. A network namespace
switch applies to the calling thread only; that is what lets one process drive a whole
namespace lab. Anything that resolves interface names or ifindexes (pyroute2, DEVMAP
updates, sockets) must run in the thread that is inside the target namespace.
"""

from __future__ import annotations

import errno
import functools
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    import ctypes

NETNS_RUN_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000

T = TypeVar("T")


class NetnsError(OSError):
    """A namespace could not be entered or left (its message says which and why)."""

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno N]"
        return str(self.strerror) if self.strerror else super().__str__()


def netns_path(name: str) -> Path:
    """The bind-mount of a named namespace, as ``ip netns`` makes it."""
    if not name or "/" in name or name in {".", ".."}:
        raise ValueError(f"invalid network namespace name: {name!r}")
    return NETNS_RUN_DIR / name


def exists(name: str) -> bool:
    return netns_path(name).exists()


def inode(name: str) -> int:
    """The namespace's inode number, which identifies it in /proc/PID/ns/net."""
    return os.stat(netns_path(name)).st_ino


@functools.cache
def _libc() -> ctypes.CDLL:
    """libc, loaded on first use: the CLI imports this module (cluster files name
    namespaces) and starts faster without ctypes, or threading (``call_in``)."""
    import ctypes  # noqa: PLC0415

    return ctypes.CDLL(None, use_errno=True)


def _setns(fd: int, what: str) -> None:
    import ctypes  # noqa: PLC0415 - see _libc

    if _libc().setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetnsError(err, f"setns({what}): {os.strerror(err)}")


@contextmanager
def entered(name: str) -> Iterator[None]:
    """Run the ``with`` body with the calling thread inside namespace ``name``.

    The thread returns to its previous namespace on exit, even on error.
    """
    try:
        target = os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetnsError(errno.ENOENT, f"no network namespace named {name!r}") from None
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target, name)
        try:
            yield
        finally:
            _setns(home, "back to the original namespace")
    finally:
        os.close(target)
        os.close(home)


def call_in(name: str, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
    """Call ``fn(*args, **kwargs)`` in a fresh thread inside namespace ``name``.

    The result is returned and an exception re-raised in the caller. Sockets the callable
    creates stay bound to that namespace after it returns.
    """
    import threading  # noqa: PLC0415 - see _libc

    box: dict[str, object] = {}

    def runner() -> None:
        try:
            with entered(name):
                box["result"] = fn(*args, **kwargs)
        except BaseException as exc:  # re-raised in the caller below
            box["error"] = exc

    thread = threading.Thread(target=runner, name=f"netns:{name}", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["result"]  # type: ignore[return-value]


def exec_argv(name: str, argv: list[str]) -> list[str]:
    """The argv that runs ``argv`` inside namespace ``name`` (via ``ip netns exec``)."""
    netns_path(name)
    return ["ip", "netns", "exec", name, *argv]


def pids(name: str) -> list[int]:
    """Processes whose network namespace is ``name``."""
    try:
        target = inode(name)
    except FileNotFoundError:
        return []
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.stat(entry / "ns" / "net").st_ino == target:
                found.append(int(entry.name))
        except OSError:
            continue
    return found
