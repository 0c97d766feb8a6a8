"""Shared test set-up. Integration tests carry the ``integration`` marker (see pyproject)."""

import os

import pytest

pytest_plugins = ["pysteer.lab.pytest_plugin"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """In CI every integration test must run: being skipped for lack of root is a failure."""
    if os.environ.get("CI") and os.geteuid() != 0:
        raise pytest.UsageError("CI must run the suite as root (integration tests need it)")
    for item in items:
        if "tests/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)
