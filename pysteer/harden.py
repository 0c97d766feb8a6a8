"""Process hardening for the daemons that hold keys (``agent run``, ``steer run``).

A core dump of either would hold the cluster key, node keys and live TLS traffic
secrets, written to disk by whatever handles cores. Two settings stop that:

- ``RLIMIT_CORE`` 0 (soft and hard, so nothing in the process raises it again): no
  core file. The kernel does not apply this limit when ``core_pattern`` pipes cores to
  a handler (systemd-coredump, apport; the handler decides), hence also:
- ``PR_SET_DUMPABLE`` 0: no core at all, by any handler; and even a process of the
  same uid needs CAP_SYS_PTRACE to attach to the daemon or read /proc/<pid>/mem.

Threads share both; an exec'd child is dumpable again but keeps the core limit of 0.
"""

from __future__ import annotations

import ctypes
import os
import resource

from pysteer.errors import UsageError

PR_SET_DUMPABLE, PR_GET_DUMPABLE = 4, 3  # prctl(2)


class HardenError(UsageError):
    """The process could not be hardened; a daemon holding keys must not run then (the
    CLI says why and exits 2, as for any daemon that cannot start)."""


def _prctl(option: int, arg: int, what: str) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, *[ctypes.c_ulong] * 4]
    result = libc.prctl(option, arg, 0, 0, 0)
    if result < 0:
        raise HardenError(f"cannot {what}: {os.strerror(ctypes.get_errno())}")
    return result


def harden() -> None:
    """No core dumps, and no memory reads by unprivileged ptrace: call it first thing."""
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (OSError, ValueError) as exc:
        raise HardenError(f"cannot turn core dumps off (RLIMIT_CORE): {exc}") from None
    _prctl(PR_SET_DUMPABLE, 0, "make the process non-dumpable (prctl PR_SET_DUMPABLE)")


def dumpable() -> bool:
    """Whether this process may dump core (PR_GET_DUMPABLE)."""
    return _prctl(PR_GET_DUMPABLE, 0, "read PR_GET_DUMPABLE") != 0
