"""Child processes that end with their parent."""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Callable

PR_SET_PDEATHSIG = 1  # prctl(2)


def die_with_parent(sig: int = signal.SIGKILL) -> Callable[[], None]:
    """A ``preexec_fn`` that makes the kernel send ``sig`` to the child when we die.

    PR_SET_PDEATHSIG survives the exec (of ``ip netns exec`` and of its target too), but
    fires when the *thread* that forked exits: start children from a thread that lives as
    long as they should (the main thread).
    """
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    prctl.argtypes = [ctypes.c_int, *[ctypes.c_ulong] * 4]
    parent = os.getpid()

    def tie() -> None:  # in the child, between fork and exec: no imports, no locks
        if prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
        if os.getppid() != parent:  # we died before the tie was made
            os.kill(os.getpid(), sig)

    return tie
