"""Where pysteer's files live: its run directory, and its non-Python sources."""

from __future__ import annotations

import os
from pathlib import Path

RUN_DIR = Path("/run/pysteer")  # sockets, locks, ledgers, the lab's keys: root's, tmpfs


def repo_root() -> Path:
    """The source checkout pysteer runs from (it is installed editable by scripts/setup)."""
    return Path(__file__).resolve().parent.parent


def bpf_dir() -> Path:
    """The BPF C sources: ``$PYSTEER_BPF_DIR`` or the checkout's ``bpf/``."""
    return Path(os.environ.get("PYSTEER_BPF_DIR") or repo_root() / "bpf")
