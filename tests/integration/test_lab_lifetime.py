"""A lab's daemons die with the process that started them.

A benchmark that segfaulted never ran ``LabCluster.close``: its steering daemon and agents
were still running 24 minutes later. Here a parent process starts a ``LabCluster`` the
usual way (the steering daemon from the root namespace, each agent through ``ip netns
exec``), is SIGKILLed, and every daemon must be gone within seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pysteer import netns
from pysteer.lab.topology import Lab
from pysteer.steer import pins

PARENT = """
import json, sys, time
from pathlib import Path
from pysteer.lab.cluster import LabCluster
from pysteer.lab.topology import Lab

cluster = LabCluster(Lab.existing(sys.argv[1]), Path(sys.argv[2])).start()
print(json.dumps({name: proc.pid for name, proc in cluster.procs.items()}), flush=True)
time.sleep(600)
"""


def running_daemon(pid: int) -> bool:
    """``pid`` is a live (not zombie) pysteer process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in {"Z", "X"} and b"pysteer" in cmdline


def test_daemons_die_with_their_parent(lab: Lab, tmp_path: Path) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, lab.prefix, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    pids: dict[str, int] = {}
    try:
        line = parent.stdout.readline()  # once every daemon said "control at"
        assert line, f"the parent failed (exit {parent.wait()}); logs in {tmp_path}"
        pids = json.loads(line)
        assert set(pids) == {"steer", *lab.plan.hosts}
        for host in lab.plan.hosts:  # the agent is ip netns exec's target, same pid
            assert pids[host] in netns.pids(lab.netns(host))
        time.sleep(0.5)
        assert all(running_daemon(pid) for pid in pids.values()), "a daemon died early"
        parent.send_signal(signal.SIGKILL)  # no close, no atexit: like a crash
        parent.wait(10)
        deadline = time.monotonic() + 5
        while any(map(running_daemon, pids.values())) and time.monotonic() < deadline:
            time.sleep(0.05)
        survivors = {name: pid for name, pid in pids.items() if running_daemon(pid)}
        assert survivors == {}, f"still running after their parent died: {survivors}"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        parent.stdout.close()
        for pid in pids.values():
            if running_daemon(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        pins.remove(lab.prefix)
