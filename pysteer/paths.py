"""Where pysteer's files live: its run and state directories, and its non-Python sources."""

from __future__ import annotations

import os
from pathlib import Path

RUN_DIR = Path("/run/pysteer")  # sockets, locks, ledgers, the lab's keys: root's, tmpfs
STATE_DIR = Path("/var/lib/pysteer")  # what outlives a reboot: a node drained or cordoned


def repo_root() -> Path:
    """The source checkout pysteer runs from (it is installed editable by scripts/setup)."""
    return Path(__file__).resolve().parent.parent


def bpf_dir() -> Path:
    """The BPF C sources: ``$PYSTEER_BPF_DIR``, else the checkout's ``bpf/`` (an editable
    install), else the copy an installed package carries (``pysteer/bpf_sources``)."""
    if os.environ.get("PYSTEER_BPF_DIR"):
        return Path(os.environ["PYSTEER_BPF_DIR"])
    checkout = repo_root() / "bpf"
    return checkout if checkout.is_dir() else Path(__file__).resolve().parent / "bpf_sources"
