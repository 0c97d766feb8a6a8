"""The command table: every command is complete, and the argparse tree is exactly the table."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest

from pysteer.cli import ROOT, build_parser
from pysteer.clitable import Command, LazyChoices, arg, build, walk

TABLE = dict(walk(ROOT))


def parsers(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield (*path, name), child
                yield from parsers(child, (*path, name))


def test_the_table_lists_every_command() -> None:
    top = [path[0] for path in TABLE if len(path) == 1]
    assert top == [
        "doctor",
        "lab",
        "steer",
        "certs",
        "agent",
        "migrate",
        "drain",
        "undrain",
        "flows",
        "migrations",
        "status",
        "completion",
        "manpage",
    ]
    assert len(TABLE) == 38


@pytest.mark.parametrize("path", list(TABLE), ids=" ".join)
def test_every_command_has_help_and_a_handler(path: tuple[str, ...]) -> None:
    cmd = TABLE[path]
    assert cmd.name == path[-1]
    assert cmd.help.strip() and cmd.help == cmd.help.strip()
    assert cmd.run is not None or cmd.actions, "neither a handler nor actions"
    names = [a.name for a in cmd.actions]
    assert len(names) == len(set(names))


def test_the_lab_loads_as_declared() -> None:
    """The lab's subtree is loaded only when it runs: what loads is the command whose
    name and help ``pysteer --help`` shows."""
    (stub,) = [c for c in ROOT.actions if c.name == "lab"]
    assert stub.load is not None and not stub.actions
    loaded = stub.load()
    assert (loaded.name, loaded.help) == (stub.name, stub.help)
    assert loaded.load is None and loaded.actions


def test_the_argparse_tree_is_the_table() -> None:
    """Same commands, each dispatching to its own handler with its own defaults."""
    tree = dict(parsers(build_parser()))
    assert list(tree) == list(TABLE)
    for path, parser in tree.items():
        cmd = TABLE[path]
        if cmd.run is not None:
            assert parser.get_default("func") is cmd.run, path
            for key, value in cmd.defaults.items():
                assert parser.get_default(key) == value, path
        for a in cmd.args:
            for flag in a.flags:
                if flag.startswith("-"):
                    assert flag in parser._option_string_actions, (path, flag)
                else:
                    assert flag in [x.dest for x in parser._actions], (path, flag)


def test_another_command_builds_the_lab_as_one_line() -> None:
    tree = dict(parsers(build_parser("flows")))
    assert ("lab",) in tree and ("lab", "up") not in tree
    assert ("lab", "up") in dict(parsers(build_parser("lab")))


def test_lazy_choices_load_only_when_used() -> None:
    calls = []

    def load() -> tuple[str, ...]:
        calls.append(1)
        return ("a", "b")

    root = Command(
        "prog",
        help="x",
        actions=(
            Command(
                "go", help="y", run=lambda _a: 0, args=(arg("--k", choices=LazyChoices(load)),)
            ),
        ),
    )
    parser = build(root)
    assert calls == []
    assert parser.parse_args(["go", "--k", "b"]).k == "b"
    assert calls == [1]
    with pytest.raises(SystemExit):
        parser.parse_args(["go", "--k", "c"])


def test_an_optional_action() -> None:
    """A command with a handler and actions runs itself when no action is given."""
    args = build_parser("migrations").parse_args(["migrations"])
    assert args.func is TABLE["migrations",].run
    args = build_parser("migrations").parse_args(
        ["migrations", "resolve", "ab12", "--keep", "source"]
    )
    assert args.func is TABLE["migrations", "resolve"].run
