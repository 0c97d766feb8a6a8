"""pytest fixtures for tests that need the namespace lab.

Enable with ``pytest_plugins = ["pysteer.lab.pytest_plugin"]``. Each lab gets a prefix of
its own (so tests and a developer's lab coexist) and is removed after the test, whatever
the outcome.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns

from pysteer import netns
from pysteer.lab.plan import load
from pysteer.lab.topology import Lab

_serial = itertools.count(1)


def unique_prefix() -> str:
    """A lab prefix no other test process uses: ``t<pid hex><serial>``."""
    return f"t{os.getpid():x}{next(_serial)}"[:10]


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: builds network namespaces")


@pytest.fixture
def lab_factory() -> Iterator[Callable[..., Lab]]:
    """Build labs on demand: ``lab_factory(prefix=None, **plan_overrides)``."""
    require_root()
    made: list[Lab] = []

    def make(prefix: str | None = None, **plan: Any) -> Lab:
        lab = Lab(prefix=prefix or unique_prefix(), plan=load(**plan))
        made.append(lab)
        return lab.up()

    yield make
    for lab in reversed(made):
        lab.down()


@pytest.fixture
def lab(lab_factory: Callable[..., Lab]) -> Lab:
    """A fully built lab with the default address plan, removed after the test."""
    return lab_factory()


@pytest.fixture(scope="module")
def scratch_netns() -> Iterator[str]:
    """A bare network namespace (loopback up) for tests that need no topology."""
    require_root()
    name = f"{unique_prefix()}-scratch"
    pr_netns.create(name)

    def lo_up() -> None:
        with IPRoute() as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")

    try:
        netns.call_in(name, lo_up)
        yield name
    finally:
        for pid in netns.pids(name):
            os.kill(pid, 9)
        pr_netns.remove(name)
