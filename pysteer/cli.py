"""The ``pysteer`` command: one argparse tree, each subcommand defined by its own module."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pysteer import __version__, certs_cli, doctor
from pysteer.agent import cli as agent_cli
from pysteer.errors import UsageError
from pysteer.lab import cli as lab_cli
from pysteer.steer import cli as steer_cli


def build_parser() -> argparse.ArgumentParser:
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
    lab_cli.add_parser(sub)
    steer_cli.add_parser(sub)
    certs_cli.add_parser(sub)
    agent_cli.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point. Exit codes: 0 success, 1 a check or operation failed, 2 bad input."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"pysteer: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pysteer: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
