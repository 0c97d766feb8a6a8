"""``pysteer manpage`` and ``pysteer completion``: both generated from the command tree,
so they never drift from ``--help`` (argparse-manpage, argcomplete)."""

from __future__ import annotations

import argparse

from pysteer import __version__
from pysteer.clitable import Command, arg

SHELLS = ("bash", "zsh", "fish")
MAN_DATE = "2026-12"  # when this version's page was made


def manpage() -> str:
    """The roff source of pysteer(1): every command, its description and options."""
    from argparse_manpage.manpage import Manpage  # noqa: PLC0415 - only for this command

    from pysteer.cli import build_parser  # noqa: PLC0415 - the whole tree, lab included

    data = {
        "prog": "pysteer",
        "project_name": "pysteer",
        "version": __version__,
        "date": MAN_DATE,  # not today: the page is checked in (docs/pysteer.1)
        "description": "live migration of established TCP and TLS connections",
        "manual_title": "pysteer manual",
    }
    return str(Manpage(build_parser(None), _data=data))


def cmd_manpage(_args: argparse.Namespace) -> int:
    print(manpage(), end="")
    return 0


def cmd_completion(args: argparse.Namespace) -> int:
    import argcomplete  # noqa: PLC0415

    if args.shell == "zsh":  # argcomplete has no zsh code of its own: zsh runs bash's
        print("autoload -U +X bashcompinit && bashcompinit")
    shell = "bash" if args.shell == "zsh" else args.shell
    print(argcomplete.shellcode(["pysteer"], shell=shell), end="")
    return 0


MANPAGE = Command(
    "manpage",
    help="print pysteer's man page (roff), generated from the commands",
    description="Print pysteer(1) in roff: every command with its description and options, "
    "generated from the same tree as --help. Install it with: pysteer manpage > "
    "/usr/local/share/man/man1/pysteer.1",
    run=cmd_manpage,
)
COMPLETION = Command(
    "completion",
    help="print the shell code that completes pysteer's commands and options",
    description="Print the code that makes SHELL complete pysteer's commands, actions and "
    "options (argcomplete). For bash: pysteer completion bash > "
    '/etc/bash_completion.d/pysteer, or eval "$(pysteer completion bash)" in ~/.bashrc; '
    'for zsh, eval "$(pysteer completion zsh)" in ~/.zshrc.',
    args=(arg("shell", choices=SHELLS, help="the shell: " + ", ".join(SHELLS)),),
    run=cmd_completion,
)
