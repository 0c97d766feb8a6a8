"""Faults in the middle of a drain of 150 live TLS connections from a to b: a process is
killed (-9), and maybe restarted. Connections on the dead host are lost (the docs say
so); every other one must end intact (byte-exact), with no manual step, and none may hang.
Nothing may stay parked, in-doubt, or half-imported.

One test per fault, with the counts asserted; and B killed holding the restored socket.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.cluster import PYSTEER, Cluster, Session, check_ticker_stream, running_cluster
from helpers.fleet import Fleet
from helpers.waiting import wait_until

from pysteer.agent.control import ask
from pysteer.lab.cluster import control_path_for

N = 150
BATCH = 8


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with running_cluster(
        tmp_path, steer_args=["--gc-interval", "0.3"], agent_args=["--sync-interval", "2"]
    ) as c:
        yield c


def served(cluster: Cluster) -> dict[str, str]:
    return cluster.served()


def unsettled(cluster: Cluster) -> list[str]:
    """What is still in the middle of something: parked flows, in-flight or in-doubt
    migrations on an agent that is up."""
    left = [f"parked {f}" for f, r in cluster.steer_rows().items() if r["action"] == "PARK"]
    for node in cluster.lab.plan.hosts:
        if node in cluster.procs and cluster.procs[node].poll() is None:
            for m in ask(control_path_for(cluster, node), "migrations")["migrations"]:
                left.append(f"{node}: {m['state']} {m['flow']}")
    return left


def start_drain(cluster: Cluster) -> subprocess.Popen[str]:
    """The operator's drain a -> b, in small batches so that a fault lands in its middle;
    returns once the first batch is done."""
    proc = subprocess.Popen(
        [
            *PYSTEER,
            "drain",
            "--from",
            "a",
            "--to",
            "b",
            "--batch",
            str(BATCH),
            "--json",
            "--config",
            str(cluster.config),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()
    assert re.match(r"\d+/\d+ done", line), line
    return proc


def verdicts(fleet: Fleet) -> dict[str, set[str]]:
    v = fleet.verdicts(settle=15)
    return {k: {fleet.conns[i].flow for i in idx} for k, idx in v.items()}


def fleet_on_a(cluster: Cluster) -> Fleet:
    fleet = Fleet(cluster.lab, 443, N, ca=cluster.client_ca)
    fleet.start_talking(0.3)
    wait_until(lambda: len(served(cluster)) == N, 20, "every connection to be served")
    assert set(served(cluster).values()) == {"a"}
    return fleet


@pytest.mark.parametrize("restart", [True, False], ids=["restarted", "not-restarted"])
def test_target_killed_mid_drain(cluster: Cluster, restart: bool) -> None:
    fleet = fleet_on_a(cluster)
    try:
        drain = start_drain(cluster)
        cluster.procs["b"].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        cluster.procs["b"].wait(10)
        out, _ = drain.communicate(timeout=120)
        summary = json.loads(out)
        del cluster.procs["b"]
        if restart:
            cluster.start_agent("b")
        wait_until(lambda: not unsettled(cluster), 15, "every migration to settle")
        settled = time.monotonic() - killed_at
        v = verdicts(fleet)
        assert (v["hung"], v["corrupt"]) == (set(), set()), v
        # What the drain moved to b died with b; everything else is intact on a.
        flows = {c.flow for c in fleet.conns}
        moved = flows - set(summary["remaining"]) - {r["flow"] for r in summary["not_moved"]}
        assert summary["moved"] == len(moved)
        assert v["reset"] == moved, {k: len(x) for k, x in v.items()}
        assert v["survived"] == flows - moved
        assert set(served(cluster)) == v["survived"]
        assert set(served(cluster).values()) <= {"a"}
        assert moved, "the kill landed after the drain: nothing was on b"
        print(
            f"\nkill -9 b ({'restarted' if restart else 'not restarted'}): "
            f"{len(v['survived'])} survived, {len(v['reset'])} reset (were on b), 0 hung; "
            f"settled {settled:.1f} s after the kill"
        )
    finally:
        fleet.shutdown()


def test_steering_daemon_killed_mid_drain_and_restarted(cluster: Cluster) -> None:
    fleet = fleet_on_a(cluster)
    try:
        drain = start_drain(cluster)
        cluster.procs["steer"].send_signal(signal.SIGKILL)
        cluster.procs["steer"].wait(10)
        del cluster.procs["steer"]
        time.sleep(1.0)
        restarted = time.monotonic()
        cluster.start_steer()  # the pinned maps kept steering meanwhile
        drain.communicate(timeout=120)
        wait_until(lambda: not unsettled(cluster), 15, "every migration to settle")
        settled = time.monotonic() - restarted
        v = verdicts(fleet)
        assert len(v["survived"]) == N, {k: len(x) for k, x in v.items()}
        now = served(cluster)
        assert set(now) == v["survived"]
        rows = cluster.steer_rows()
        for flow, node in now.items():  # every flow on b is steered there
            if node == "b":
                assert rows[flow]["action"] == "TO" and rows[flow]["host"] == "b", rows[flow]
        assert "in-doubt" not in cluster.log("a") or "resolved" in cluster.log("a")
        print(
            f"\nkill -9 steering daemon: {N} survived, 0 reset, 0 hung; "
            f"{sum(1 for n in now.values() if n == 'b')} on b; settled {settled:.1f} s "
            "after the restart"
        )
    finally:
        fleet.shutdown()


@pytest.mark.parametrize("restart", [True, False], ids=["restarted", "not-restarted"])
def test_source_killed_mid_drain(cluster: Cluster, restart: bool) -> None:
    fleet = fleet_on_a(cluster)
    try:
        drain = start_drain(cluster)
        cluster.procs["a"].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        cluster.procs["a"].wait(10)
        drain.communicate(timeout=120)  # it streamed from a: it ends with a
        del cluster.procs["a"]
        if restart:
            cluster.start_agent("a")
        # A flow a parked and b never took goes back when its lease ends (5 s + 2 s).
        wait_until(lambda: not unsettled(cluster), 15, "every park to end")
        settled = time.monotonic() - killed_at
        v = verdicts(fleet)
        assert (v["hung"], v["corrupt"]) == (set(), set()), v
        now = served(cluster)
        assert set(now.values()) <= {"b"}
        assert v["survived"] == set(now)
        assert len(v["survived"]) + len(v["reset"]) == N
        assert v["survived"], "the kill landed before the drain moved anything"
        print(
            f"\nkill -9 a ({'restarted' if restart else 'not restarted'}): "
            f"{len(v['survived'])} survived (were on b), {len(v['reset'])} reset, 0 hung; "
            f"settled {settled:.1f} s after the kill"
        )
    finally:
        fleet.shutdown()


def test_target_killed_holding_the_restored_socket(cluster: Cluster) -> None:
    """B restores the socket and dies before its thaw and claim: A gets no answer to the
    move, asks the steering node, finds the flow still parked for it, takes it back, and
    the client notices nothing; then the flow moves to a restarted B."""
    cluster.stop("b")
    cluster.start_agent("b", fault="thaw:exit")
    session, flow = cluster.ticker()
    report = cluster.migrate(flow, "b")
    assert report["outcome"] == "rolled-back", report
    steps = [s["step"] for s in report["timeline"]]
    assert steps[-4:] == ["resolving", "decided", "resumed", "unparked"], steps
    assert cluster.procs["b"].wait(10) == 72
    del cluster.procs["b"]
    cluster.start_agent("b")
    assert cluster.owner(flow) == "a"
    assert cluster.migrate(flow, "b")["outcome"] == "moved"
    session.stop_writing()
    session.drain()
    check_ticker_stream(session.finish(), session.sent)


def migrate_in_background(cluster: Cluster, flow: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            *PYSTEER,
            "migrate",
            "--flow",
            flow,
            "--to",
            "b",
            "--json",
            "--config",
            str(cluster.config),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def in_doubt_while_the_steering_node_is_down(cluster: Cluster) -> tuple[Session, str, dict]:
    """B stalls in its commit; the steering daemon dies meanwhile: B cannot claim the flow,
    A cannot learn or decide the outcome. The migration is in-doubt on A (socket frozen)
    and claiming on B (socket thawed, not served)."""
    cluster.stop("b")
    cluster.start_agent("b", fault="thaw:stall")
    session, flow = cluster.ticker()
    proc = migrate_in_background(cluster, flow)
    time.sleep(1.5)  # B is in its commit's stall
    cluster.procs["steer"].send_signal(signal.SIGKILL)
    cluster.procs["steer"].wait(10)
    del cluster.procs["steer"]
    out, err = proc.communicate(timeout=60)
    report = json.loads(out)
    assert (proc.returncode, report["outcome"]) == (1, "in-doubt"), (report, err)
    listed = cluster.cli("migrations", "--json")
    assert listed.returncode == 0, listed.stderr
    states = {
        (m["node"], m["role"], m["state"], m["flow"])
        for m in json.loads(listed.stdout)["migrations"]
    }
    assert states == {("a", "source", "in-doubt", flow), ("b", "target", "claiming", flow)}
    human = cluster.cli("migrations")
    assert report["id"][:12] in human.stdout and "in-doubt" in human.stdout
    return session, flow, report


def test_in_doubt_is_resolved_when_the_steering_node_returns(cluster: Cluster) -> None:
    session, flow, report = in_doubt_while_the_steering_node_is_down(cluster)
    cluster.start_steer()
    wait_until(lambda: not unsettled(cluster), 15, "the in-doubt migration to resolve")
    owner = served(cluster)[flow]  # B's claim or A's revert won: exactly one serves it
    rows = cluster.steer_rows()
    if owner == "b":
        assert rows[flow]["action"] == "TO" and rows[flow]["host"] == "b", rows.get(flow)
    else:
        assert flow not in rows or rows[flow]["action"] != "PARK"
    assert f"in-doubt migration {report['id'][:12]}" in cluster.log("a")
    assert "resolved" in cluster.log("a")
    session.stop_writing()
    session.drain()
    check_ticker_stream(session.finish(), session.sent)
    print(f"\nin-doubt resolved: {owner} serves the flow")


def test_operator_resolves_an_in_doubt_migration(cluster: Cluster) -> None:
    """With the steering node down for longer, the operator keeps the flow on its source:
    A resumes, B drops its copy silently; when steering returns, the park's lease has
    ended and the flow's packets go back to a. Nothing lost."""
    session, flow, report = in_doubt_while_the_steering_node_is_down(cluster)
    bad = cluster.cli("migrations", "resolve", "zz", "--keep", "source")
    assert bad.returncode == 2 and "not a migration id" in bad.stderr
    out = cluster.cli("migrations", "resolve", report["id"][:12], "--keep", "source", "--json")
    assert out.returncode == 0, out.stderr
    done = {d["node"]: d["outcome"] for d in json.loads(out.stdout)["resolved"]}
    assert done == {"a": "rolled-back", "b": "rolled-back"}
    again = cluster.cli("migrations", "resolve", report["id"][:12], "--keep", "source")
    assert again.returncode == 1 and "no node holds" in again.stderr
    time.sleep(1.0)
    cluster.start_steer()
    wait_until(lambda: not unsettled(cluster), 15, "the lease to end")
    assert served(cluster)[flow] == "a"
    session.stop_writing()
    session.drain()
    check_ticker_stream(session.finish(), session.sent)
