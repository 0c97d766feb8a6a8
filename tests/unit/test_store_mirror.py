"""The steering node's mirror of the shared store (pure), and the cluster file's [store]."""

from __future__ import annotations

from pathlib import Path

import pytest

from pysteer.cluster.config import ConfigError, load_config
from pysteer.steer.mirror import SET, UNSET, Mirror, Op

F1, F2, F3 = (f"10.0.0.1:{p}-10.0.0.9:443" for p in (5001, 5002, 5003))


def test_a_full_read_in_parts_applies_once_at_its_end() -> None:
    m = Mirror()
    assert not m.loaded
    assert m.part([(F1, "b")], last=False, revision=10) == []
    ops = m.part([(F2, "a")], last=True, revision=10)
    assert ops == [Op(SET, F1, "b"), Op(SET, F2, "a")]
    assert m.loaded and m.state == "synced" and m.revision == 10
    assert m.known == {F1: "b", F2: "a"}


def test_changes_apply_in_order_and_duplicates_change_nothing() -> None:
    m = Mirror()
    m.part([(F1, "b")], last=True, revision=10)
    assert m.change(F2, "b", 11) == [Op(SET, F2, "b")]
    assert m.change(F1, "b", 12) == []  # rewritten with the same host
    assert m.change(F1, "a", 13) == [Op(SET, F1, "a")]
    assert m.change(F1, None, 14) == [Op(UNSET, F1, "a")]
    assert m.change(F3, None, 15) == []  # never known
    assert m.change(F2, None, 11) == []  # from before: a duplicate
    assert m.counts["duplicates"] == 1 and m.revision == 15
    assert m.known == {F2: "b"}


def test_a_resync_after_a_gap_gives_only_the_difference() -> None:
    m = Mirror()
    m.part([(F1, "b"), (F2, "b")], last=True, revision=10)
    m.gap("compacted")
    assert m.state == "resyncing"
    ops = m.part([(F2, "a"), (F3, "b")], last=True, revision=40)
    assert sorted(ops, key=lambda o: o.flow) == [
        Op(UNSET, F1, "b"),
        Op(SET, F2, "a"),
        Op(SET, F3, "b"),
    ]
    assert m.state == "synced" and m.counts["gaps"] == 1 and m.counts["loads"] == 2


def test_a_gap_drops_a_half_read() -> None:
    m = Mirror()
    m.part([(F1, "b")], last=False, revision=10)
    m.gap("broke")
    assert m.part([(F2, "b")], last=True, revision=12) == [Op(SET, F2, "b")]
    assert m.known == {F2: "b"}


def test_an_outage_is_counted_once_and_keeps_what_is_known() -> None:
    m = Mirror()
    m.part([(F1, "b")], last=True, revision=10)
    m.down("no quorum")
    m.down("no quorum")
    report = m.report()
    assert report["state"] == "down" and report["outages"] == 1 and report["overrides"] == 1


CLUSTER = """
[cluster]
vip = "10.0.0.100"
ca = "ca.pem"
key = "cluster.key"
[services.443]
app = "echo"
tls = false
[steer]
control = "10.0.1.1:7700"
cert = "s.pem"
key = "s.key"
[nodes.a]
control = "10.0.2.2:7701"
cert = "a.pem"
key = "a.key"
"""


def write(tmp_path: Path, store: str) -> Path:
    path = tmp_path / "cluster.toml"
    path.write_text(CLUSTER + store)
    return path


def test_the_store_section_is_optional_and_checked(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")).store is None
    spec = load_config(write(tmp_path, '[store]\nendpoints = ["10.0.1.5:2379"]\n')).store
    assert spec is not None and spec.endpoints == (("10.0.1.5", 2379),) and spec.timeout == 2.0


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("endpoints = []", "store.endpoints must be a list"),
        ('endpoints = ["etcd:2379"]', "must be ADDRESS:PORT"),
        ('endpoints = ["10.0.1.5:2379", "10.0.1.5:2379"]', "twice"),
        ('endpoints = ["10.0.1.5:2379", "[fd00::1]:2379"]', "all IPv4 or all IPv6"),
        ('endpoints = ["10.0.1.5:2379"]\ntimeout = 0', "store.timeout"),
        ('endpoints = ["10.0.1.5:2379"]\nlease = 3', "unknown key(s): lease"),
    ],
)
def test_a_bad_store_section_says_what(tmp_path: Path, text: str, error: str) -> None:
    with pytest.raises(ConfigError, match=error.replace("(", r"\(").replace(")", r"\)")):
        load_config(write(tmp_path, f"[store]\n{text}\n"))


def test_the_mirror_is_in_the_steering_nodes_metrics() -> None:
    from pysteer.metrics import store_metrics  # noqa: PLC0415

    m = Mirror()
    m.part([(F1, "b"), (F2, "b")], last=True, revision=42)
    m.down("no quorum")
    families = {f.name: f.samples[0].value for f in store_metrics(m.report() | {"restarts": 1})}
    assert families["pysteer_steer_store_synced"] == 0
    assert families["pysteer_steer_store_overrides"] == 2
    assert families["pysteer_steer_store_revision"] == 42
    assert families["pysteer_steer_store_outages"] == 1
    assert families["pysteer_steer_store_reader_restarts"] == 1
