"""The ``pysteer`` command: the table of its commands, and the dispatcher that runs one.

Each subcommand is declared next to its handler (``pysteer.clitable`` says how); this
module lists them in the order ``pysteer --help`` shows. Handlers raise, and
``pysteer.exitcodes`` turns what they raise into the exit code and the one line printed.
Every command must start fast (``scripts/bench/cli_start.py``), so building the tree
imports nothing heavy; ``tests/unit/test_cli_imports.py`` keeps it so.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from collections.abc import Sequence

from pysteer import __version__, certs_cli, doctor, exitcodes, manual
from pysteer.agent import cli as agent_cli
from pysteer.clitable import Command, arg, build
from pysteer.steer import cli as steer_cli

# ``pysteer.lab`` (its package) imports the lab's topology: its subtree is loaded only
# when the lab command runs, and ``pysteer --help`` shows this line from here instead.
LAB_HELP = "build, inspect or remove the namespace test lab"


def _lab() -> Command:
    from pysteer.lab.cli import LAB  # noqa: PLC0415 - see LAB_HELP

    return LAB


ROOT = Command(
    "pysteer",
    help="live migration of established TCP and TLS connections",
    description=(
        "Live migration of established TCP and TLS connections between Linux hosts. "
        "Run `pysteer doctor` first to check that this machine can run pysteer."
    ),
    args=(arg("-V", "--version", action="version", version=f"pysteer {__version__}"),),
    epilog=exitcodes.SUMMARY,
    actions=(
        doctor.DOCTOR,
        Command("lab", help=LAB_HELP, load=_lab),
        steer_cli.STEER,
        certs_cli.CERTS,
        *agent_cli.COMMANDS,
        manual.COMPLETION,
        manual.MANPAGE,
    ),
)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole tree, or, given the ``command`` about to run, all but the lab's subtree
    unless that is ``lab`` (see LAB_HELP)."""
    return build(ROOT, expand=command)


def _command(argv: Sequence[str]) -> str:
    """The command word of ``argv``: the top level has only flags (-h, --version)."""
    return next((arg for arg in argv if not arg.startswith("-")), "")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run the command; an exception ends it as ``pysteer.exitcodes`` says
    (0 success, 1 a check or operation failed, 2 bad input, 70 a bug...)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        if signal.getsignal(signal.SIGINT) not in (signal.SIG_IGN, signal.default_int_handler):
            with contextlib.suppress(ValueError):  # not the main thread: leave it
                signal.signal(signal.SIGINT, signal.default_int_handler)  # console's until now
        if "_ARGCOMPLETE" in os.environ:  # the shell asks for completions: answer, exit
            import argcomplete  # noqa: PLC0415 - only then

            argcomplete.autocomplete(build_parser(None))
        args = build_parser(_command(argv)).parse_args(argv)  # --help prints, too
        return int(args.func(args) or 0)
    except (Exception, KeyboardInterrupt) as exc:  # SystemExit (argparse's) goes through
        return exitcodes.report(exc)


if __name__ == "__main__":
    sys.exit(main())
