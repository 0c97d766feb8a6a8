"""Whether a node takes imports, and where it was drained to, kept on disk.

An operator drains a host before a restart or a reboot, and the steering node goes on
diverting its new connections until ``pysteer undrain``. So the agent that comes back must
still refuse imports and still say where it was drained to. The state lives in
``STATE_DIR/<cluster>/node-<node>.json`` (``/var/lib``: a reboot keeps it), written whole
and renamed into place at each change (``safefile``). A file that cannot be read starts
the node cordoned, and says so: refusing imports is the safe side.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from pysteer.paths import STATE_DIR
from pysteer.safefile import PUBLIC, UnsafeDirectory, private_dir

log = logging.getLogger("pysteer.agent")


@dataclass(frozen=True)
class Admission:
    accepting: bool = True  # imports are taken (a drain or a cordon turns it off)
    drained_to: str | None = None  # the node a drain diverted new connections to

    def describe(self) -> str:
        if self.drained_to:
            return f"drained to {self.drained_to}"
        return "accepting" if self.accepting else "cordoned"


def admission_path(cluster: str, node: str) -> Path:
    return STATE_DIR / cluster / f"node-{node}.json"


def load(path: Path) -> Admission:
    """The node's state as last saved; a node never drained or cordoned accepts."""
    try:
        data = json.loads(path.read_bytes())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        accepting, drained_to = data["accepting"], data["drained_to"]
        if not isinstance(accepting, bool) or not isinstance(drained_to, str | None):
            raise ValueError("accepting must be true or false, drained_to a name or null")
    except FileNotFoundError:
        return Admission()
    except (OSError, ValueError, KeyError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        log.error(
            "cannot read the node's state %s (%s): starting cordoned, so no import is "
            "taken by mistake; `pysteer uncordon` or `pysteer undrain` when it should",
            path,
            why,
        )
        return Admission(accepting=False)
    return Admission(accepting, drained_to)


def save(path: Path, state: Admission) -> bool:
    """Write the state; False (and an error logged) if it cannot be kept across restarts."""
    body = json.dumps({"accepting": state.accepting, "drained_to": state.drained_to})
    try:
        with private_dir(path.parent) as directory:
            directory.write(path.name, body.encode() + b"\n", PUBLIC)
    except (OSError, UnsafeDirectory) as exc:
        log.error(
            "the node is %s, but %s cannot be written (%s): a restart forgets it",
            state.describe(),
            path,
            exc,
        )
        return False
    return True
