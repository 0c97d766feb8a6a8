"""The ``pysteer`` command's entry point: quiet about a Ctrl-C from its very first moment.

Importing the CLI and what it needs takes tens of milliseconds. A Ctrl-C in that time used
to print a KeyboardInterrupt traceback, because ``pysteer.cli.main``'s exception map was
not running yet. So this module, imported first, makes SIGINT end the process with the
map's own line and code (130) until ``main`` takes over (the map handles it from there).
"""

from __future__ import annotations

import os
import signal
from types import FrameType


def _interrupted(_signum: int, _frame: FrameType | None) -> None:
    os.write(2, b"pysteer: interrupted\n")
    os._exit(130)


if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not if ignored (nohup)
    signal.signal(signal.SIGINT, _interrupted)


def main() -> int:
    from pysteer.cli import main as run  # noqa: PLC0415 - after the handler is in place

    return run()
