"""The shared store (etcd) with the steering node and the agents, against live TLS
clients: every move is recorded in etcd before its source lets go; a steering node that
comes back without its maps loads every override before it attaches; with etcd down,
moves are refused before anything is frozen while every connection goes on, and once it
returns the mirror resyncs and moves work again; an ended connection's override goes.
With three members: one lost changes nothing, a lost quorum behaves like etcd down, moves
under way when it goes either complete or are refused before their freeze (none hangs),
and everything resyncs when it returns.

Streams are byte-exact (the ticker's echo and tick order) and counted.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.cluster import Cluster, running_cluster
from helpers.fleet import Fleet
from helpers.waiting import wait_until

from pysteer.migration.source import token_of

pytestmark = pytest.mark.timeout(240)
N, MOVED = 12, 6


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with running_cluster(tmp_path, store=True, steer_args=["--gc-interval", "0.3"]) as c:
        yield c


def fleet_on_a(cluster: Cluster) -> Fleet:
    fleet = Fleet(cluster.lab, 443, N, ca=cluster.client_ca)
    fleet.start_talking(0.2)
    wait_until(lambda: len(cluster.flows()) == N, 20, "every connection to be served")
    return fleet


def move(cluster: Cluster, flow: str, to: str) -> dict:
    report = cluster.migrate(flow, to)
    assert report["outcome"] == "moved", cluster.diagnose(flow, [report])
    assert report["stored"] in ("written", "already"), report
    return report


def test_moves_are_recorded_and_a_steering_node_without_maps_loads_them(
    cluster: Cluster,
) -> None:
    fleet = fleet_on_a(cluster)
    flows = [c.flow for c in fleet.conns]
    for flow in flows[:MOVED]:
        move(cluster, flow, "b")
    stored = cluster.store_overrides()
    assert {f: o["host"] for f, o in stored.items()} == dict.fromkeys(flows[:MOVED], "b")
    wait_until(
        lambda: cluster.store_report()["overrides"] == MOVED, 10, "the mirror to see the moves"
    )
    report = cluster.store_report()
    assert report["state"] == "synced" and report["loads"] == 1, report

    # The steering node comes back with no maps (as after a reboot): its old program
    # steers with the old maps until the new one replaces it, already loaded.
    assert cluster.stop("steer") == 0
    out = cluster.steer("destroy", "--json")
    assert out.returncode == 0, out.stderr
    cluster.start_steer()
    assert f"store: {MOVED} overrides loaded before attaching ({{'set': {MOVED}}})" in cluster.log(
        "steer"
    )
    rows = cluster.steer_rows()
    for flow in flows[:MOVED]:
        assert rows[flow]["action"] == "TO" and rows[flow]["host"] == "b", rows.get(flow)

    v = fleet.verdicts(settle=10)
    assert len(v["survived"]) == N, {k: x for k, x in v.items() if x}
    assert {f["flow"]: f["node"] for f in cluster.flows()} == {
        f: ("b" if i < MOVED else "a") for i, f in enumerate(flows)
    }

    # Ended connections: their overrides go from etcd, then from the steering node.
    fleet.close(list(range(MOVED)))
    wait_until(lambda: not cluster.store_overrides(), 15, "the overrides to be removed")
    wait_until(
        lambda: cluster.store_report()["overrides"] == 0, 10, "the mirror to see the removals"
    )
    fleet.shutdown()


def test_store_down_refuses_moves_and_everything_resyncs(cluster: Cluster) -> None:
    assert cluster.etcd is not None
    fleet = fleet_on_a(cluster)
    flows = [c.flow for c in fleet.conns]
    first = move(cluster, flows[0], "b")

    member = cluster.etcd.nodes[0]
    cluster.etcd.stop(member, signal.SIGKILL)
    refused = cluster.migrate(flows[1], "b")
    assert refused["exit"] != 0 and refused["outcome"] == "failed", refused
    assert "shared store" in refused["error"] and "nothing was frozen" in refused["error"]
    assert not any(s["step"] == "park" for s in refused["timeline"]), refused
    assert cluster.owner(flows[1]) == "a"
    wait_until(lambda: cluster.store_report()["state"] == "down", 15, "the mirror to see it")

    cluster.etcd.start(member)
    wait_until(
        lambda: cluster.store_report()["state"] == "synced", 20, "the mirror to read it again"
    )
    report = cluster.store_report()
    assert report["loads"] >= 2 and report["outages"] >= 1, report
    second = move(cluster, flows[1], "b")
    stored = cluster.store_overrides()
    assert {f: (o["host"], o["by"]) for f, o in stored.items()} == {
        flows[0]: ("b", f"{token_of(bytes.fromhex(first['id'])):016x}"),
        flows[1]: ("b", f"{token_of(bytes.fromhex(second['id'])):016x}"),
    }
    v = fleet.verdicts(settle=10)
    assert len(v["survived"]) == N, {k: x for k, x in v.items() if x}
    fleet.shutdown()


def test_three_members_one_lost_changes_nothing_a_lost_quorum_refuses(tmp_path: Path) -> None:
    with running_cluster(
        tmp_path, store=True, store_members=["steer", "a", "b"], agent_args=["--sync-interval", "2"]
    ) as cluster:
        assert cluster.etcd is not None
        fleet = fleet_on_a(cluster)
        flows = [c.flow for c in fleet.conns]
        try:
            move(cluster, flows[0], "b")
            cluster.etcd.stop("a", signal.SIGKILL)  # one member lost: nothing changes
            move(cluster, flows[1], "b")

            reports: list[dict] = []  # moves under way when the quorum goes

            def mover() -> None:
                for flow in flows[2:8]:
                    reports.append(cluster.migrate(flow, "b"))

            moving = threading.Thread(target=mover)
            moving.start()
            wait_until(lambda: len(reports) >= 2, 30, "two moves before the quorum goes")
            cluster.etcd.stop("b", signal.SIGKILL)  # no quorum: as if etcd were down
            moving.join(120)
            assert not moving.is_alive()
            for r in reports:
                if r["outcome"] != "moved":
                    assert r["outcome"] == "failed" and "nothing was frozen" in r["error"], r
            moved_while = [
                f for f, r in zip(flows[2:8], reports, strict=True) if r["outcome"] == "moved"
            ]
            refused = cluster.migrate(flows[8], "b")
            assert refused["outcome"] == "failed" and "shared store" in refused["error"], refused
            wait_until(
                lambda: cluster.store_report()["state"] == "down", 20, "the mirror to see it"
            )

            cluster.etcd.start("a")
            cluster.etcd.start("b")
            wait_until(lambda: cluster.store_report()["state"] == "synced", 30, "a resync")
            move(cluster, flows[8], "b")
            expected = {flows[0], flows[1], flows[8], *moved_while}
            wait_until(
                lambda: set(cluster.store_overrides()) == expected,
                20,
                "every move's override (the targets write theirs until they land)",
            )
            assert cluster.store_report()["overrides"] == len(expected)
            v = fleet.verdicts(settle=10)
            assert len(v["survived"]) == N, {k: x for k, x in v.items() if x}
            assert {f for f, n in cluster_served(cluster).items() if n == "b"} == expected
        finally:
            fleet.shutdown()


def cluster_served(cluster: Cluster) -> dict[str, str]:
    return {f["flow"]: f["node"] for f in cluster.flows()}


def test_many_short_moved_connections_leave_nothing_behind(cluster: Cluster) -> None:
    """Rounds of connections that are moved (a drain) and then end: after each round the
    store and the steering node's mirror and table hold none of them."""
    for _ in range(3):
        fleet = Fleet(cluster.lab, 443, 40, ca=cluster.client_ca)
        try:
            flows = {c.flow for c in fleet.conns}
            wait_until(
                lambda f=flows: {x["flow"] for x in cluster.flows()} >= f, 20, "40 on a node"
            )
            (source,) = {x["node"] for x in cluster.flows() if x["flow"] in flows}
            target = "b" if source == "a" else "a"
            out = cluster.cli("drain", "--from", source, "--to", target, "--json", timeout=120)
            assert out.returncode == 0, out.stderr
            assert json.loads(out.stdout)["moved"] == 40, out.stdout[:2000]
            assert cluster.cli("undrain", "--node", source).returncode == 0
            wait_until(lambda f=flows: set(cluster.store_overrides()) == f, 15, "40 overrides")
            fleet.close()
            wait_until(lambda: not cluster.store_overrides(), 20, "their removal")
            wait_until(lambda: cluster.store_report()["overrides"] == 0, 10, "the mirror to follow")
            wait_until(lambda f=flows: not f & set(cluster.steer_rows()), 10, "the entries to go")
        finally:
            fleet.shutdown()
    report = cluster.store_report()
    assert report["set"] == report["unset"] == 120, report


def test_a_restarted_host_sweeps_the_overrides_of_its_lost_connections(cluster: Cluster) -> None:
    """b killed -9 with moved connections: they end with it, their overrides stay (no one
    removed them); b, started again, removes them (comparing each value it read)."""
    fleet = fleet_on_a(cluster)
    flows = [c.flow for c in fleet.conns]
    try:
        for flow in flows[:3]:
            move(cluster, flow, "b")
        wait_until(lambda: set(cluster.store_overrides()) == set(flows[:3]), 10, "3 overrides")
        cluster.stop("b", signal.SIGKILL)
        time.sleep(1.0)
        assert set(cluster.store_overrides()) == set(flows[:3])  # nobody removed them
        cluster.start_agent("b")
        wait_until(lambda: not cluster.store_overrides(), 20, "b's sweep")
        assert "store: 3 stale override(s) to this node removed" in cluster.log("b")
        wait_until(lambda: cluster.store_report()["overrides"] == 0, 10, "the mirror")
        v = fleet.verdicts(settle=10)
        assert sorted(v["reset"]) == [0, 1, 2] and len(v["survived"]) == N - 3, v
    finally:
        fleet.shutdown()


def test_a_host_without_its_disk_keeps_its_cordon_from_the_store(cluster: Cluster) -> None:
    """b cordoned; its agent comes back without its state file (a reinstalled host): it
    takes the cordon from etcd and refuses imports until uncordoned."""
    from pysteer.agent.admission import admission_path  # noqa: PLC0415

    fleet = fleet_on_a(cluster)
    flows = [c.flow for c in fleet.conns]
    try:
        assert cluster.cli("agent", "cordon", "--node", "b").returncode == 0
        wait_until(lambda: cluster.store_admission("b") == [False, None], 10, "etcd to have it")
        assert cluster.stop("b") == 0
        admission_path(cluster.lab.prefix, "b").unlink()
        cluster.start_agent("b")
        assert "b has no state of its own: it is cordoned, as the shared store says" in (
            cluster.log("b")
        )
        refused = cluster.migrate(flows[0], "b")
        assert refused["outcome"] == "failed" and "cordoned" in refused["error"], refused
        assert cluster.cli("agent", "uncordon", "--node", "b").returncode == 0
        wait_until(lambda: cluster.store_admission("b") == [True, None], 10, "etcd to follow")
        move(cluster, flows[0], "b")
        v = fleet.verdicts(settle=10)
        assert len(v["survived"]) == N, {k: x for k, x in v.items() if x}
    finally:
        fleet.shutdown()
