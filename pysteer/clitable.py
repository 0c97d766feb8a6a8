"""The command table's vocabulary, and the one function that turns it into argparse.

Each command is declared once, as data (name, help, arguments, handler), next to its
handler; ``build`` makes the argparse tree from the table in ``pysteer.cli``. Building
must stay cheap (every command starts in at most 0.15 s): declarations import nothing
heavy, handlers import what they need, choices that live next to heavy code are
``LazyChoices``, and a command whose module is slow to import (``load``) is loaded only
when it runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple

Handler = Callable[[argparse.Namespace], int]


class LazyChoices(Collection[str]):
    """argparse ``choices`` owned by a module that is slow to import: ``load`` runs the
    first time argparse checks a value or shows the choices, not when the tree is built."""

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


# NamedTuples, not dataclasses: as immutable, and a tenth of the cost to define (about
# 0.5 ms each, at every start).
class Arg(NamedTuple):
    """One ``add_argument`` call: its flags (or name) and its keyword arguments."""

    flags: tuple[str, ...]
    options: Mapping[str, Any]


def arg(*flags: str, **options: Any) -> Arg:
    """Declare an argument exactly as ``add_argument`` takes it."""
    return Arg(flags, options)


class Command(NamedTuple):
    """A command of the tree. It runs ``run``, or one of its ``actions`` (both: the
    action is optional, as in ``pysteer migrations [resolve]``)."""

    name: str
    help: str
    run: Handler | None = None
    args: Sequence[Arg] = ()
    description: str | None = None
    actions: Sequence[Command] = ()
    # Set on the namespace when this command runs: lets one handler serve several commands.
    defaults: Mapping[str, Any] = MappingProxyType({})
    # The description is laid out by hand (kept as written, not rewrapped).
    verbatim: bool = False
    # The whole declaration (same name and help), from a module too slow to import for
    # every command: loaded only when this command runs; ``pysteer --help`` needs only
    # the name and help given here.
    load: Callable[[], Command] | None = None
    epilog: str | None = None  # the root's: what follows the options in --help


def build(root: Command, expand: str | None = None) -> argparse.ArgumentParser:
    """The argparse tree of ``root`` (its name is the program's). Its commands with
    ``load`` are loaded only if named by ``expand`` (the command about to run) or if
    ``expand`` is None (the whole tree)."""
    parser = argparse.ArgumentParser(
        prog=root.name, description=described(root), epilog=root.epilog
    )
    _fill(parser, root, "command", "COMMAND", expand)
    return parser


def _fill(
    parser: argparse.ArgumentParser,
    cmd: Command,
    dest: str,
    metavar: str,
    expand: str | None = None,
) -> None:
    for a in cmd.args:
        options = dict(a.options)
        lazy = options.pop("choices") if isinstance(options.get("choices"), LazyChoices) else None
        added = parser.add_argument(*a.flags, **options)
        if lazy is not None:  # after add_argument, which formats the choices it is given
            added.choices = lazy
    if cmd.run is not None:
        parser.set_defaults(func=cmd.run, **cmd.defaults)
    if not cmd.actions:
        return
    sub = parser.add_subparsers(dest=dest, metavar=metavar, required=cmd.run is None)
    for declared in cmd.actions:
        if declared.load is not None and expand not in (None, declared.name):
            sub.add_parser(declared.name, help=declared.help)  # only its line in --help
            continue
        action = declared.load() if declared.load is not None else declared
        child = sub.add_parser(
            action.name,
            help=action.help,
            description=described(action),
            formatter_class=(
                argparse.RawDescriptionHelpFormatter if action.verbatim else argparse.HelpFormatter
            ),
        )
        _fill(child, action, f"{action.name}_command", "ACTION")


def described(cmd: Command) -> str:
    """What ``--help`` says above the options: the description without its docstring
    markup (``literal`` quotes), or, for a command declared without one, its help line."""
    if cmd.description:
        return cmd.description.replace("``", "")
    return f"{cmd.help[:1].upper()}{cmd.help[1:]}."


def walk(cmd: Command, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Command]]:
    """Every command under ``cmd`` with its path of names, loading what ``load`` defers."""
    for action in cmd.actions:
        loaded = action.load() if action.load else action
        yield (*path, action.name), loaded
        yield from walk(loaded, (*path, action.name))


def print_table(rows: list[tuple[str, ...]]) -> None:
    """Columns padded to their widest cell (an IPv6 flow too); the first row is the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def given(option: str | None, old: str | None, flag: str) -> str | None:
    """The value of ``flag`` (the spelling every command uses), or of the positional form
    it replaced (kept as a deprecated alias); not both. None if neither was given."""
    if option is not None and old is not None:
        from pysteer.errors import UsageError  # noqa: PLC0415

        raise UsageError(f"give {flag} once (the positional form is its old spelling)")
    return option if option is not None else old


def one_of(option: str | None, old: str | None, flag: str) -> str:
    """``given``, and required."""
    value = given(option, old, flag)
    if value is None:
        from pysteer.errors import UsageError  # noqa: PLC0415

        raise UsageError(f"{flag} is required")
    return value
