"""How an exception ends a ``pysteer`` command: its exit code and the one line it prints.

Handlers raise; ``report`` looks the exception up here, so every code and message
format is decided in this one table. Keys name a class by module and attribute instead
of importing it: some live in modules too slow for every command to import (the
steering daemon's needs BCC), and an exception of a class whose module was never
imported cannot occur. The entry of the most specific class in the exception's MRO
wins (BrokenPipeError before OSError, AgentDown before OSError).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

OK = 0
FAILED = 1  # a check or an operation ran and failed; also an OSError (as Python exits)
USAGE = 2  # bad input, or what to ask is not there: nothing was changed
DOWN = 3  # a node's agent or the steering daemon is down or not answering: nothing changed
INTERNAL = 70  # a bug (sysexits' EX_SOFTWARE): distinct from every expected outcome
INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT
CLOSED_PIPE = 141  # the reader went away, as a shell reports SIGPIPE

DEBUG_ENV = "PYSTEER_DEBUG"  # set: an internal error prints its traceback too

_PACKAGE = Path(__file__).resolve().parent


class Exit(NamedTuple):
    """What an exception class ends a command with; ``say`` gives the line for stderr
    (None: nothing)."""

    code: int
    say: Callable[[BaseException], str | None]


SUMMARY = (
    "exit codes: 0 done; 1 the operation failed or was rolled back, or a check found a "
    "problem; 2 bad input, nothing changed; 3 a node's agent or the steering daemon is "
    "down or not answering, nothing changed; 70 a bug (PYSTEER_DEBUG=1 shows its "
    "traceback); 130 interrupted (Ctrl-C); 141 the output was closed"
)


def _error(exc: BaseException) -> str:
    return f"pysteer: error: {exc}"


def _os_error(exc: BaseException) -> str:
    filename, strerror = getattr(exc, "filename", None), getattr(exc, "strerror", None)
    where = f"{filename}: " if filename else ""
    return f"pysteer: error: {where}{strerror or exc}"


def _interrupted(_exc: BaseException) -> str:
    return "pysteer: interrupted"


def _closed_pipe(_exc: BaseException) -> None:
    """`pysteer flows | head -1`: not an error. Point stdout at /dev/null, so that
    Python's own flush at exit cannot fail again (and print a traceback)."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


EXIT_CODES: dict[tuple[str, str], Exit] = {
    # Bad input: the message says what to fix.
    ("pysteer.errors", "UsageError"): Exit(USAGE, _error),
    ("pysteer.cluster.config", "ConfigError"): Exit(USAGE, _error),
    ("pysteer.flow", "FlowSyntaxError"): Exit(USAGE, _error),
    ("pysteer.lab.plan", "PlanError"): Exit(USAGE, _error),
    ("pysteer.lab.topology", "LabError"): Exit(USAGE, _error),
    ("pysteer.steer.pins", "PinError"): Exit(USAGE, _error),
    # A daemon that cannot start says why, before it changed anything.
    ("pysteer.agent.agent", "AgentError"): Exit(USAGE, _error),
    ("pysteer.steer.daemon", "DaemonError"): Exit(USAGE, _error),
    # The agent or the steering daemon said no: nothing was changed.
    ("pysteer.agent.control", "AgentRefused"): Exit(USAGE, _error),
    ("pysteer.steer.control", "ControlError"): Exit(USAGE, _error),
    # It is down, or does not answer: nothing was changed (a script may retry later).
    ("pysteer.agent.control", "AgentDown"): Exit(DOWN, _error),
    ("pysteer.steer.control", "SteerDown"): Exit(DOWN, _error),
    # The system said no (permissions, a missing file): the operation failed.
    ("builtins", "OSError"): Exit(FAILED, _os_error),
    ("builtins", "BrokenPipeError"): Exit(CLOSED_PIPE, _closed_pipe),
    ("builtins", "KeyboardInterrupt"): Exit(INTERRUPTED, _interrupted),
}


def _loaded(module: str, name: str) -> type | None:
    """The class, if its module is loaded (without loading it)."""
    found = getattr(sys.modules.get(module), name, None)
    return found if isinstance(found, type) else None


def exit_for(exc: BaseException) -> Exit | None:
    """The entry of the most specific class of ``exc`` in EXIT_CODES; None: a bug."""
    mro = type(exc).__mro__
    matches = [
        (mro.index(cls), entry)
        for (module, name), entry in EXIT_CODES.items()
        if (cls := _loaded(module, name)) is not None and cls in mro
    ]
    return min(matches, key=lambda m: m[0])[1] if matches else None


def _where(exc: BaseException) -> str:
    """The innermost line of pysteer's own code the exception passed: where to look,
    and nothing of its message (which may hold data, even a secret)."""
    import traceback  # noqa: PLC0415 - only a bug needs it

    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if Path(f.filename).resolve().is_relative_to(_PACKAGE)]
    if not (ours or frames):
        return "?"
    frame = (ours or frames)[-1]
    path = Path(frame.filename).resolve()
    shown = path.relative_to(_PACKAGE.parent) if ours else Path(path.name)
    return f"{shown}:{frame.lineno}"


def report(exc: BaseException) -> int:
    """Print the exception's one line on stderr and return its exit code. An exception
    the table does not know is a bug: its type and where, code INTERNAL, no traceback
    unless PYSTEER_DEBUG is set."""
    entry = exit_for(exc)
    if entry is not None:
        line = entry.say(exc)
        code = entry.code
    else:
        line = (
            f"pysteer: internal error: {type(exc).__name__} at {_where(exc)} (a bug; "
            f"{DEBUG_ENV}=1 shows the traceback)"
        )
        code = INTERNAL
    if line is not None:
        print(line, file=sys.stderr)
    if entry is None and os.environ.get(DEBUG_ENV):
        import traceback  # noqa: PLC0415

        traceback.print_exception(exc)
    return code
