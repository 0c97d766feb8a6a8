"""Two steering nodes behind the client's ECMP route (an L4 hash), with the shared store
in etcd, against live TLS clients (Python ssl; byte-exact ticker streams, counted):

- (a) one steering node dies (its daemon killed -9 and its links down) and the router
  withdraws its next hop: every connection, moved or not, goes on through the other;
- (b) one is rebooted (next hop withdrawn, daemon stopped, its programs and maps gone,
  started again, next hop back): it loads every override before it attaches, and while
  it is down a move is refused before anything is frozen;
- (c) a third steering node joins under load: its daemon loads every override before it
  attaches, the agents take it on SIGHUP (moves go on meanwhile), then the router adds
  its next hop; flows it now carries keep going;
- (f) a move's source dies after the switch: the override is in etcd and on both
  steering nodes, and the target serves the flow; the dead host's other connections
  are the only ones lost.

A flow's steering node is the one its hash picks (``ip route get`` with its ports); the
tests check that both carry moved flows, so the kill hits some of them.
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

from pysteer.flow import Flow

pytestmark = pytest.mark.timeout(300)
STEERS = ["steer", "steer2"]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with running_cluster(
        tmp_path,
        steering=2,
        steer_args=["--gc-interval", "0.3"],
        agent_args=["--sync-interval", "2"],
    ) as c:
        yield c


def served(cluster: Cluster) -> dict[str, str]:
    return cluster.served()


def wipe(cluster: Cluster, node: str) -> None:
    """As a reboot leaves steering node ``node``: no program attached, no pinned map."""
    plan = cluster.lab.plan
    out = cluster.steer(
        "destroy",
        "--netns",
        cluster.lab.netns(node),
        "--ifname",
        plan.link(plan.client, node).steer_end.name,
        node=node,
    )
    assert out.returncode == 0, out.stderr


def steering_node_of(cluster: Cluster, flow: str) -> str:
    """The steering node the client's ECMP route picks for ``flow``."""
    f = Flow.parse(flow)
    argv = ["ip", "-j", "route", "get", str(f.dst), "from", str(f.src), "ipproto", "tcp"]
    argv += ["sport", str(f.sport), "dport", str(f.dport)]
    gateway = json.loads(cluster.lab.run("client", argv).stdout)[0]["gateway"]
    plan = cluster.lab.plan
    return next(s for s in plan.steers if str(plan.link(plan.client, s).steer_end.v4.ip) == gateway)


def drain(cluster: Cluster, source: str, target: str) -> dict:
    out = cluster.cli("drain", "--from", source, "--to", target, "--json", timeout=120)
    assert out.returncode == 0, f"{out.stderr}\n{out.stdout[-3000:]}"
    return json.loads(out.stdout)


def kill_steering_node(cluster: Cluster, node: str) -> None:
    """The node dies: its daemon killed, its links down (nothing more passes it)."""
    cluster.stop(node, signal.SIGKILL)
    for link in cluster.lab.plan.links:
        if link.steer_end.node == node:
            cluster.lab.run(node, ["ip", "link", "set", link.steer_end.name, "down"])


def test_a_steering_node_dies_and_every_connection_goes_on(cluster: Cluster) -> None:
    moved = Fleet(cluster.lab, 443, 100, ca=cluster.client_ca)
    moved.start_talking(0.3)
    wait_until(lambda: len(served(cluster)) == 100, 30, "100 connections on a")
    summary = drain(cluster, "a", "b")
    assert summary.get("moved") == 100, summary
    out = cluster.cli("undrain", "--node", "a")
    assert out.returncode == 0, out.stderr
    unmoved = Fleet(cluster.lab, 443, 100, ca=cluster.client_ca)
    unmoved.start_talking(0.3)
    wait_until(lambda: len(served(cluster)) == 200, 30, "100 more connections, on a")
    now = served(cluster)
    assert {now[c.flow] for c in moved.conns} == {"b"}
    assert {now[c.flow] for c in unmoved.conns} == {"a"}
    via = {c.flow: steering_node_of(cluster, c.flow) for c in [*moved.conns, *unmoved.conns]}
    on_dead = [c.flow for c in moved.conns if via[c.flow] == "steer2"]
    assert 10 <= len(on_dead) <= 90, f"{len(on_dead)} of 100 moved flows go through steer2"
    rows = cluster.steer_rows("steer")
    assert all(rows[f]["action"] == "TO" and rows[f]["host"] == "b" for f in on_dead)

    kill_steering_node(cluster, "steer2")
    cluster.lab.next_hops(["steer"])  # the router's failure detection
    try:
        for fleet in (moved, unmoved):
            v = fleet.verdicts(settle=15)
            assert len(v["survived"]) == 100, {k: x for k, x in v.items() if x}
        assert served(cluster) == now
    finally:
        moved.shutdown()
        unmoved.shutdown()


def test_a_rebooted_steering_node_loads_every_override_before_it_attaches(
    cluster: Cluster,
) -> None:
    fleet = Fleet(cluster.lab, 443, 40, ca=cluster.client_ca)
    fleet.start_talking(0.2)
    try:
        wait_until(lambda: len(served(cluster)) == 40, 30, "40 connections on a")
        flows = [c.flow for c in fleet.conns]
        for flow in flows[:20]:
            report = cluster.migrate(flow, "b")
            assert report["outcome"] == "moved", cluster.diagnose(flow, [report])
        via = {f: steering_node_of(cluster, f) for f in flows}
        assert {via[f] for f in flows[:20]} == set(STEERS), via

        cluster.lab.next_hops(["steer"])  # drained: the router no longer sends it anything
        assert cluster.stop("steer2") == 0
        wipe(cluster, "steer2")
        out = cluster.cli("status", "--json")
        status = json.loads(out.stdout)
        assert out.returncode == 3, out.stdout  # something is down
        assert status["steers"]["steer"]["reachable"], status["steers"]
        assert not status["steers"]["steer2"]["reachable"], status["steers"]
        assert any("steering node steer2" in p["what"] for p in status["problems"])
        refused = cluster.migrate(flows[20], "b")
        assert refused["outcome"] == "failed" and "nothing was frozen" in refused["error"]
        assert "steer2" in refused["error"], refused["error"]

        cluster.start_steer(node="steer2")
        assert "store: 20 overrides loaded before attaching ({'set': 20})" in cluster.log("steer2")
        cluster.lab.next_hops(STEERS)
        rows = cluster.steer_rows("steer2")
        assert all(rows[f]["action"] == "TO" and rows[f]["host"] == "b" for f in flows[:20])
        report = cluster.migrate(flows[20], "b")
        assert report["outcome"] == "moved", cluster.diagnose(flows[20], [report])
        v = fleet.verdicts(settle=15)
        assert len(v["survived"]) == 40, {k: x for k, x in v.items() if x}
        expected = {f: "b" if i <= 20 else "a" for i, f in enumerate(flows)}
        assert served(cluster) == expected
    finally:
        fleet.shutdown()


def test_a_source_that_dies_after_the_switch_leaves_the_flow_on_the_target(
    cluster: Cluster,
) -> None:
    cluster.stop("a")
    cluster.start_agent("a", fault="record:exit")
    fleet = Fleet(cluster.lab, 443, 6, ca=cluster.client_ca)
    fleet.start_talking(0.2)
    try:
        wait_until(lambda: len(served(cluster)) == 6, 30, "6 connections on a")
        flow = fleet.conns[0].flow
        out = cluster.cli("migrate", "--flow", flow, "--to", "b", "--json")
        assert out.returncode == 3 and "node a is down" in out.stderr, out  # a died meanwhile
        assert cluster.procs["a"].wait(10) == 73
        del cluster.procs["a"]
        wait_until(lambda: flow in cluster.store_overrides(), 15, "b's write of the override")
        assert cluster.store_overrides()[flow]["host"] == "b"
        for node in STEERS:
            row = cluster.steer_rows(node)[flow]
            assert (row["action"], row["host"]) == ("TO", "b"), (node, row)
        assert served(cluster) == {flow: "b"}
        v = fleet.verdicts(settle=10)
        assert v["survived"] == [0], v  # the other five were on the dead host
        assert sorted(v["reset"]) == [1, 2, 3, 4, 5], v
    finally:
        fleet.shutdown()


def test_a_third_steering_node_joins_under_load(tmp_path: Path) -> None:
    with running_cluster(
        tmp_path, steering=3, start_steers=STEERS, agent_args=["--sync-interval", "2"]
    ) as cluster:
        cluster.lab.next_hops(STEERS)
        fleet = Fleet(cluster.lab, 443, 60, ca=cluster.client_ca)
        fleet.start_talking(0.2)
        try:
            wait_until(lambda: len(served(cluster)) == 60, 30, "60 connections on a")
            flows = [c.flow for c in fleet.conns]
            for flow in flows[:20]:
                report = cluster.migrate(flow, "b")
                assert report["outcome"] == "moved", cluster.diagnose(flow, [report])

            reports: list[dict] = []  # moves while the node joins

            def mover() -> None:
                for flow in flows[20:35]:
                    reports.append(cluster.migrate(flow, "b"))

            moving = threading.Thread(target=mover)
            moving.start()
            cluster.start_steer(node="steer3")
            log = cluster.log("steer3")
            assert "overrides loaded before attaching" in log, log
            cluster.list_steers(["steer", "steer2", "steer3"])
            for host in cluster.lab.plan.hosts:
                cluster.procs[host].send_signal(signal.SIGHUP)
            for host in cluster.lab.plan.hosts:
                wait_until(
                    lambda h=host: "steer3 joined" in cluster.log(h), 10, f"{host} to take it"
                )
            moving.join(120)
            assert [r["outcome"] for r in reports] == ["moved"] * 15, reports
            cluster.lab.next_hops(["steer", "steer2", "steer3"])  # the router adds it
            rows = cluster.steer_rows("steer3")
            for flow in flows[:35]:
                assert (rows[flow]["action"], rows[flow]["host"]) == ("TO", "b"), rows.get(flow)
            via = [steering_node_of(cluster, f) for f in flows]
            assert via.count("steer3") >= 5, via
            report = cluster.migrate(flows[35], "b")  # parks on all three now
            assert report["outcome"] == "moved", cluster.diagnose(flows[35], [report])
            v = fleet.verdicts(settle=15)
            assert len(v["survived"]) == 60, {k: x for k, x in v.items() if x}
            expected = {f: "b" if i <= 35 else "a" for i, f in enumerate(flows)}
            assert served(cluster) == expected
        finally:
            fleet.shutdown()


def test_connections_a_drain_diverted_survive_a_steering_node(tmp_path: Path) -> None:
    """During a drain a -> b, new connections go to b: each one's SYN made an entry at the
    steering node it reached, and b's notice steers it to b on the other one too (long
    before the 30 s sync), so losing that steering node loses none of them."""
    with running_cluster(tmp_path, steering=2) as cluster:
        summary = drain(cluster, "a", "b")  # nothing to move: it diverts new connections
        assert summary["moved"] == 0, summary
        fleet = Fleet(cluster.lab, 443, 60, ca=cluster.client_ca)
        fleet.start_talking(0.2)
        try:
            wait_until(lambda: len(served(cluster)) == 60, 30, "60 connections")
            assert set(served(cluster).values()) == {"b"}
            flows = [c.flow for c in fleet.conns]
            via = {f: steering_node_of(cluster, f) for f in flows}
            assert 5 <= list(via.values()).count("steer2") <= 55, via

            def everywhere() -> bool:
                rows = [cluster.steer_rows(s) for s in STEERS]
                return all(f in r and r[f]["host"] == "b" for r in rows for f in flows)

            wait_until(everywhere, 5, "every steering node to steer them to b")
            kill_steering_node(cluster, "steer2")
            cluster.lab.next_hops(["steer"])
            v = fleet.verdicts(settle=15)
            assert len(v["survived"]) == 60, {k: x for k, x in v.items() if x}
        finally:
            fleet.shutdown()


def test_a_rebooted_steering_node_learns_a_drains_diversion(tmp_path: Path) -> None:
    """A drain's diversion is in the store: steer2, rebooted during the drain, diverts new
    connections before it attaches; an undrain removes it from the store and from both."""
    with running_cluster(tmp_path, steering=2) as cluster:
        vip = str(cluster.lab.plan.vip(4))
        assert drain(cluster, "a", "b")["moved"] == 0
        cluster.lab.next_hops(["steer"])
        assert cluster.stop("steer2") == 0
        wipe(cluster, "steer2")
        cluster.start_steer(node="steer2")
        assert f"store: new connections to {vip} go to b (a drain's)" in cluster.log("steer2")
        cluster.lab.next_hops(STEERS)
        assert cluster.store_report("steer2")["diversions"][vip] == "b"
        fleet = Fleet(cluster.lab, 443, 30, ca=cluster.client_ca)
        try:
            flows = [c.flow for c in fleet.conns]
            assert "steer2" in {steering_node_of(cluster, f) for f in flows}
            wait_until(lambda: len(served(cluster)) == 30, 30, "30 connections")
            assert set(served(cluster).values()) == {"b"}
        finally:
            fleet.shutdown()
        out = cluster.cli("undrain", "--node", "a")
        assert out.returncode == 0, out.stderr
        for node in STEERS:
            wait_until(
                lambda n=node: not cluster.store_report(n)["diversions"], 10, f"{node} to follow"
            )
        fleet = Fleet(cluster.lab, 443, 10, ca=cluster.client_ca)
        try:
            flows = [c.flow for c in fleet.conns]
            wait_until(lambda: set(flows) <= set(served(cluster)), 30, "10 connections")
            assert {served(cluster)[f] for f in flows} == {"a"}
        finally:
            fleet.shutdown()


def test_a_steering_node_that_stalls_through_the_claim_still_ends_at_the_target(
    tmp_path: Path,
) -> None:
    """The two steering nodes decide apart: B's claim commits at steer while steer2's
    daemon is stopped (SIGSTOP) with the flow parked. B serves at once (the first commit
    wins); steer2, continued, takes B's claim late, or its lease runs out and the store's
    override sends the flow to b: either way it ends at b, and the connection, which goes
    through steer2, survives byte-exact."""
    with running_cluster(tmp_path, steering=2) as cluster:
        cluster.stop("b")
        cluster.start_agent("b", fault="thaw:stall")  # B waits 3 s before it thaws
        fleet = Fleet(cluster.lab, 443, 12, ca=cluster.client_ca)
        fleet.start_talking(0.2)
        try:
            wait_until(lambda: len(served(cluster)) == 12, 30, "12 connections on a")
            flow = next(
                c.flow for c in fleet.conns if steering_node_of(cluster, c.flow) == "steer2"
            )
            moving = threading.Thread(target=lambda: reports.append(cluster.migrate(flow, "b")))
            reports: list[dict] = []
            moving.start()
            wait_until(
                lambda: cluster.steer_rows("steer2").get(flow, {}).get("action") == "PARK",
                5,
                "the park on steer2",
            )
            cluster.procs["steer2"].send_signal(signal.SIGSTOP)
            try:
                moving.join(30)
                assert reports and reports[0]["outcome"] == "moved", reports
                assert served(cluster)[flow] == "b"
                time.sleep(1.0)
            finally:
                cluster.procs["steer2"].send_signal(signal.SIGCONT)
            wait_until(
                lambda: (
                    cluster.steer_rows("steer2").get(flow, {}).get("host") == "b"
                    and cluster.steer_rows("steer2")[flow]["action"] == "TO"
                ),
                15,
                "steer2 to steer it to b",
            )
            log = cluster.log("steer2")
            how = "late claim" if f"{flow}: claimed by b" in log else "lease and store"
            assert how == "late claim" or "as the store says" in log, log[-2000:]
            print(f"\nsteer2 stopped through the claim: it ended at b by its {how}")
            v = fleet.verdicts(settle=15)
            assert len(v["survived"]) == 12, {k: x for k, x in v.items() if x}
        finally:
            fleet.shutdown()
