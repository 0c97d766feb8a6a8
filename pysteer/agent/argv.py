"""The command line that runs an agent: what the lab, the benchmarks and an agent's
supervisor (for each of its workers) start."""

from __future__ import annotations

import sys
from pathlib import Path


def agent_argv(config: Path, node: str, *options: str) -> list[str]:
    """``pysteer agent run`` for ``node`` of the cluster file ``config``, by this Python."""
    return [
        sys.executable,
        "-m",
        "pysteer",
        "agent",
        "run",
        "--config",
        str(config),
        "--node",
        node,
        *options,
    ]
