"""What the lab's helper daemons (nginx, etcd) share: stop one, and see that it listens."""

from __future__ import annotations

import signal
import socket
import subprocess


def stop_process(proc: subprocess.Popen, patience: float, sig: int = signal.SIGTERM) -> None:
    """Signal ``proc`` and wait ``patience`` seconds for it to end, then kill it."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(patience)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def accepts(address: tuple[str, int]) -> bool:
    """Whether something accepts TCP connections at ``address`` (call it in the node's
    namespace: a lab address is not local in the root one)."""
    try:
        socket.create_connection(address, 0.5).close()
    except OSError:
        return False
    return True
