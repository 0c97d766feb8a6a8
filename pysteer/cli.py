"""The ``pysteer`` command: one argparse tree, each subcommand defined by its own module.

Every command must start fast (``scripts/bench/cli_start.py``), so building the tree
imports nothing heavy: the subcommand modules import the TLS, BPF and netlink stacks only
in the handlers that use them, and choices defined next to that code are ``LazyChoices``.
``tests/unit/test_cli_imports.py`` keeps it so.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Collection, Iterator, Sequence

from pysteer import __version__, exitcodes

# ``pysteer.lab`` (its package) imports pyroute2: the lab's subtree is built only when
# the lab command runs, and ``pysteer --help`` shows this line from here instead.
LAB_HELP = "build, inspect or remove the namespace test lab"


class LazyChoices(Collection[str]):
    """argparse ``choices`` owned by a module that is slow to import: ``load`` runs the
    first time argparse checks a value or shows the choices, not when the tree is built.
    Set it on the action ``add_argument`` returns: ``add_argument`` itself formats the
    choices it is given (to check the metavar)."""

    def __init__(self, load: Callable[[], Sequence[str]]) -> None:
        self._load = load
        self._values: tuple[str, ...] | None = None

    def _get(self) -> tuple[str, ...]:
        if self._values is None:
            self._values = tuple(self._load())
        return self._values

    def __contains__(self, value: object) -> bool:
        return value in self._get()

    def __iter__(self) -> Iterator[str]:
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole tree, or, given the ``command`` about to run, all but the lab's subtree
    unless that is ``lab`` (see LAB_HELP)."""
    # The subcommand modules use LazyChoices and LAB_HELP from here: imported once this
    # module is complete.
    from pysteer import certs_cli, doctor  # noqa: PLC0415
    from pysteer.agent import cli as agent_cli  # noqa: PLC0415
    from pysteer.steer import cli as steer_cli  # noqa: PLC0415

    parser = argparse.ArgumentParser(
        prog="pysteer",
        description=(
            "Live migration of established TCP and TLS connections between Linux hosts. "
            "Run `pysteer doctor` first to check that this machine can run pysteer."
        ),
    )
    parser.add_argument("--version", action="version", version=f"pysteer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    doctor.add_parser(sub)
    if command in (None, "lab"):
        from pysteer.lab import cli as lab_cli  # noqa: PLC0415 - see LAB_HELP

        lab_cli.add_parser(sub)
    else:
        sub.add_parser("lab", help=LAB_HELP)  # another command runs: only this line shows
    steer_cli.add_parser(sub)
    certs_cli.add_parser(sub)
    agent_cli.add_parser(sub)
    return parser


def _command(argv: Sequence[str]) -> str:
    """The command word of ``argv``: the top level has only flags (-h, --version)."""
    return next((arg for arg in argv if not arg.startswith("-")), "")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run the command; an exception ends it as ``pysteer.exitcodes`` says
    (0 success, 1 a check or operation failed, 2 bad input, 70 a bug...)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser(_command(argv)).parse_args(argv)  # --help prints, too
        return int(args.func(args) or 0)
    except (Exception, KeyboardInterrupt) as exc:  # SystemExit (argparse's) goes through
        return exitcodes.report(exc)


if __name__ == "__main__":
    sys.exit(main())
