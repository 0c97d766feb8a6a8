"""pyproject.toml lists the packages by hand (one of them is bpf/, mapped in): a new
subpackage that is not listed would be missing from every install."""

from __future__ import annotations

import tomllib

from pysteer.paths import repo_root


def test_every_subpackage_is_listed() -> None:
    config = tomllib.loads((repo_root() / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {
        ".".join(p.parent.relative_to(repo_root()).parts)
        for p in (repo_root() / "pysteer").rglob("__init__.py")
    }
    assert found <= listed, sorted(found - listed)
    assert listed - found == {"pysteer.bpf_sources"}
    assert config["package-dir"] == {"pysteer.bpf_sources": "bpf"}
