"""Run ``pysteer`` with one fault injected at a migration step (the product has no hooks).

    agent_with_fault.py FAULT agent run --config ... --node ...

FAULT is ``<step>:<kind>``; the fault hits just before the target's step runs:
- ``open:exit``: B's agent dies when a move arrives (exit 70);
- ``thaw:exit``: B dies holding the restored, built, still frozen socket (exit 72);
- ``restore:stall``: B never gets past restoring (the source's timeout ends the move);
- ``thaw:stall``: B waits 3 s before thawing (time to break something meanwhile);
- ``thaw:fail``: B leaves repair mode and its first ACK cannot be sent;
- ``export:fail``: A's export fails after the dump (the socket is frozen by then);
- ``record:exit``: A dies once B serves the flow, before it writes the override to the
  shared store and releases its frozen socket (exit 73).
"""

from __future__ import annotations

import asyncio
import functools
import os
import sys
from typing import Any

from pysteer import tcp
from pysteer.agent.imports import Imports
from pysteer.agent.migrate import Migration
from pysteer.app import runtime
from pysteer.cli import main
from pysteer.migration.events import Do

EXIT_CODES = {"open": 70, "thaw": 72}
SOURCE_EXIT_CODES = {"record": 73}
STALLS = {"restore": 3600.0, "thaw": 3.0}


def at_step(step: str, kind: str) -> None:
    original = Imports._carry_out

    async def faulty(self: Imports, entry: Any, action: Any) -> Any:
        if isinstance(action, Do) and action.what == step:
            if kind == "exit":
                os._exit(EXIT_CODES[step])
            await asyncio.sleep(STALLS[step])
        return await original(self, entry, action)

    Imports._carry_out = faulty  # type: ignore[method-assign]


def source_at_step(step: str) -> None:
    original = Migration._carry_out

    async def faulty(self: Migration, action: Any) -> Any:
        if isinstance(action, Do) and action.what == step:
            os._exit(SOURCE_EXIT_CODES[step])
        return await original(self, action)

    Migration._carry_out = faulty  # type: ignore[method-assign]


def failing_elicit(_state: tcp.TcpState) -> None:
    raise OSError(5, "injected fault: the first ACK could not be sent")


def failing_snapshot(*_args: Any) -> Any:
    raise RuntimeError("injected fault after the dump")


def install(fault: str) -> None:
    step, _, kind = fault.partition(":")
    if fault == "thaw:fail":
        tcp.thaw = functools.partial(tcp.thaw, elicit=failing_elicit)
    elif fault == "export:fail":
        runtime.versioned_snapshot = failing_snapshot
    elif kind == "exit" and step in SOURCE_EXIT_CODES:
        source_at_step(step)
    elif kind in ("exit", "stall") and (step in EXIT_CODES or step in STALLS):
        at_step(step, kind)
    else:
        raise SystemExit(f"agent_with_fault.py: unknown fault {fault!r}")


if __name__ == "__main__":
    install(sys.argv[1])
    sys.exit(main(sys.argv[2:]))
