"""The steering table through agents' eyes: moved and diverted connections leave no entry
once they end, a small table keeps working through many moves, agents keep their live
flows (idle or not) and the table true (sync), and a restarted agent serves at once.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.cluster import PYSTEER, Cluster, running_cluster
from helpers.fleet import Fleet
from helpers.waiting import wait_until

from pysteer.agent.control import Stream, ask
from pysteer.lab.cluster import DEFAULT_SERVICES, control_path_for

ECHO = 7007
SERVICES = DEFAULT_SERVICES | {ECHO: ("echo", False)}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running_cluster(
        tmp_path_factory.mktemp("cluster"),
        services=SERVICES,
        steer_args=["--gc-interval", "0.3", "--idle-timeout", "3"],
        agent_args=["--sync-interval", "1"],
    ) as c:
        yield c


def rows(cluster: Cluster) -> dict[str, dict]:
    return cluster.steer_rows()


def steer_stats(cluster: Cluster) -> dict:
    return cluster.steer_stats()


def drain(cluster: Cluster, source: str, target: str) -> dict:
    stream = Stream(control_path_for(cluster, source), "drain", to=target, batch=64, timeout_s=10)
    try:
        while "progress" in (answer := stream.next()):
            pass
    finally:
        stream.close()
    return answer["drain"]


def undrain(cluster: Cluster, node: str) -> None:
    assert ask(control_path_for(cluster, node), "undrain")["ok"]


def test_two_thousand_moved_connections_leave_no_entry(cluster: Cluster) -> None:
    """2,000 connections each moved once (a drain), then half closed cleanly and half
    reset: not one entry is left, at once, and none of them was collected as idle."""
    fleet = Fleet(cluster.lab, ECHO, 2000)
    try:
        before = steer_stats(cluster)
        summary = drain(cluster, "a", "b")
        assert (summary["moved"], summary["remaining"]) == (2000, []), summary
        table = rows(cluster)
        assert {r["flow"] for r in table.values()} >= {c.flow for c in fleet.conns}
        assert {r["host"] for r in table.values()} == {"b"}
        fleet.close(list(range(1000)), how="fin")
        fleet.close(list(range(1000, 2000)), how="rst")
        wait_until(lambda: not rows(cluster), 5, "every entry to go")
        after = steer_stats(cluster)
        assert after["gc_idle"] == before["gc_idle"]
        ended = sum(after[k] - before[k] for k in ("closed_fin", "closed_rst", "closed_by_agents"))
        assert ended >= 2000, after
        assert after["table_full"] == 0
    finally:
        fleet.shutdown()
        undrain(cluster, "a")


def test_a_small_table_keeps_working_through_many_moves(tmp_path: Path) -> None:
    """A table bounded at 64 entries and 1,000 short connections, each moved to b and
    closed, one after the other: every move works, and the table never fills."""
    with running_cluster(tmp_path, services=SERVICES, steer_args=["--max-flows", "64"]) as cluster:
        vip = str(cluster.lab.plan.vip(4))
        path = control_path_for(cluster, "a")
        for i in range(1000):
            sock = cluster.lab.call("client", socket.create_connection, (vip, ECHO), 5)
            local = sock.getsockname()
            flow = f"{local[0]}:{local[1]}-{vip}:{ECHO}"
            deadline = time.monotonic() + 5
            while True:  # the agent lists it once it has accepted it
                answer = ask(path, "migrate", flow=flow, to="b", timeout_s=5, timeout=30)
                report = answer["migration"]
                if report["outcome"] == "moved" or time.monotonic() > deadline:
                    break
                time.sleep(0.01)
            assert report["outcome"] == "moved", (i, report)
            sock.sendall(b"move %d\n" % i)
            assert sock.recv(100) == b"move %d\n" % i
            sock.close()
        wait_until(lambda: not rows(cluster), 5, "the table to empty")
        stats = steer_stats(cluster)
        assert (stats["table_full"], stats["capacity"]) == (0, 64), stats
        # Now fill it for real: the operator sees it in `pysteer status`.
        for port in range(1, 65):
            assert cluster.steer("park", f"10.77.1.2:{port}-{vip}:{ECHO}").returncode == 0
        full = cluster.steer("park", f"10.77.1.2:65-{vip}:{ECHO}")
        assert full.returncode == 2 and "flow table is full" in full.stderr
        status = cluster.cli("status")
        assert "64/64 flows in the table" in status.stdout, status.stdout
        assert "FLOW TABLE FULL: 1 change(s) refused" in status.stdout, status.stdout


def test_a_diverted_syn_leaves_no_entry_once_closed(cluster: Cluster) -> None:
    """During a drain the steering node enters new connections as TO(b) from their SYN;
    the entry goes with the connection."""
    summary = drain(cluster, "a", "b")  # nothing to move: the diversion stays
    assert summary["moved"] == 0
    try:
        before = steer_stats(cluster)["new_diverted"]
        vip = str(cluster.lab.plan.vip(4))
        sock = cluster.lab.call("client", socket.create_connection, (vip, ECHO), 5)
        local = sock.getsockname()
        flow = f"{local[0]}:{local[1]}-{vip}:{ECHO}"
        sock.sendall(b"hello b\n")
        assert sock.recv(100) == b"hello b\n"
        assert rows(cluster)[flow]["host"] == "b"
        assert steer_stats(cluster)["new_diverted"] == before + 1
        assert cluster.owner(flow) == "b"
        sock.close()
        wait_until(lambda: flow not in rows(cluster), 3, "the diverted entry to go")
    finally:
        undrain(cluster, "a")


def test_agents_keep_idle_flows_and_the_table_true(cluster: Cluster) -> None:
    """An idle connection moved to b outlives the 3 s idle timeout (b claims it in its
    syncs); an entry that points at b for a flow b does not serve is removed; a flow b
    serves whose entry was lost is steered to b again."""
    vip = str(cluster.lab.plan.vip(4))
    path = control_path_for(cluster, "a")
    sock = cluster.lab.call("client", socket.create_connection, (vip, ECHO), 5)
    local = sock.getsockname()
    flow = f"{local[0]}:{local[1]}-{vip}:{ECHO}"
    sock.sendall(b"one\n")
    assert sock.recv(100) == b"one\n"
    report = ask(path, "migrate", flow=flow, to="b", timeout_s=5)["migration"]
    assert report["outcome"] == "moved", report
    stale = f"{local[0]}:1-{vip}:{ECHO}"
    assert cluster.steer("to", stale, "b").returncode == 0
    time.sleep(5)  # idle, longer than the idle timeout
    table = rows(cluster)
    assert table[flow]["host"] == "b" and stale not in table
    sock.sendall(b"two\n")  # the idle connection still works, on b
    assert sock.recv(100) == b"two\n"
    assert cluster.steer("forget", flow).returncode == 0
    wait_until(lambda: rows(cluster).get(flow, {}).get("host") == "b", 4, "b's sync")
    assert "steered to b" in cluster.log("steer") or "serves" in cluster.log("steer")
    sock.sendall(b"three\n")
    assert sock.recv(100) == b"three\n"
    assert steer_stats(cluster)["reconciled"] >= 1
    sock.close()


def test_a_restarted_agent_serves_the_vip_at_once(cluster: Cluster) -> None:
    """Connections restored on b end in TIME_WAIT when b stops: the next agent on b must
    still bind the VIP (restored sockets keep SO_REUSEADDR)."""
    vip = str(cluster.lab.plan.vip(4))
    path = control_path_for(cluster, "a")
    socks = []
    for _ in range(3):
        sock = cluster.lab.call("client", socket.create_connection, (vip, ECHO), 5)
        local = sock.getsockname()
        flow = f"{local[0]}:{local[1]}-{vip}:{ECHO}"
        sock.sendall(b"x\n")
        assert sock.recv(10) == b"x\n"
        assert (
            ask(path, "migrate", flow=flow, to="b", timeout_s=5)["migration"]["outcome"] == "moved"
        )
        socks.append(sock)
    served = len(ask(control_path_for(cluster, "b"), "flows")["flows"])
    assert served >= 3
    assert cluster.stop("b", signal.SIGTERM) == 0  # b ends them: its side goes TIME_WAIT
    for sock in socks:
        assert sock.recv(10) == b""  # a FIN, not a reset
        sock.close()
    assert f"{served} ended" in cluster.log("b")
    cluster.start_agent("b")  # raises if it cannot serve the VIP
    assert "Address already in use" not in cluster.log("b")


def test_a_drained_node_stays_drained_after_a_restart(cluster: Cluster) -> None:
    """A drain is kept on disk: the agent that comes back still refuses imports and says
    where it was drained to, until `pysteer undrain`; a cordon likewise."""
    drain(cluster, "a", "b")
    path = control_path_for(cluster, "a")
    assert ask(path, "status")["status"]["drained_to"] == "b"
    start = len(cluster.log("a"))
    cluster.stop("a")
    cluster.start_agent("a")
    st = ask(path, "status")["status"]
    assert (st["accepting"], st["drained_to"]) == (False, "b")
    assert "a is drained to b, as it was before this start" in cluster.log("a")[start:]
    assert "node a: up, pysteer 0.1.0, pid" in (text := cluster.cli("status").stdout)
    assert ", drained to b, control" in text, text
    # A new connection is still diverted to b, and b cannot move it to a.
    vip = str(cluster.lab.plan.vip(4))
    with cluster.lab.call("client", socket.create_connection, (vip, ECHO), 5) as sock:
        local = sock.getsockname()
        flow = f"{local[0]}:{local[1]}-{vip}:{ECHO}"
        wait_until(lambda: cluster.owner(flow) == "b", 10, "b to serve the new connection")
        report = cluster.migrate(flow, "a")
        assert report["outcome"] == "failed" and "cordoned" in report["error"], report
        sock.sendall(b"still b\n")
        assert sock.recv(100) == b"still b\n"
    undrain(cluster, "a")
    assert ask(path, "cordon")["accepting"] is False
    cluster.stop("a")
    cluster.start_agent("a")
    st = ask(path, "status")["status"]
    assert (st["accepting"], st["drained_to"]) == (False, None)
    assert ask(path, "uncordon")["accepting"] is True
    cluster.stop("a")
    cluster.start_agent("a")
    assert ask(path, "status")["status"]["accepting"] is True


def test_steer_commands_find_their_daemon_from_the_cluster_file(cluster: Cluster) -> None:
    """The lab's steering daemon is named like its cluster: with the cluster file (option
    or environment), no --name is needed; an explicit --name still wins."""
    env = dict(os.environ, PYSTEER_CONFIG=str(cluster.config))
    for argv, extra_env in (
        (["steer", "hosts", "--json"], env),
        (["steer", "hosts", "--json", "--config", str(cluster.config)], None),
    ):
        out = subprocess.run(
            [*PYSTEER, *argv], capture_output=True, text=True, env=extra_env, check=False
        )
        assert out.returncode == 0, out.stderr
        assert sorted(h["name"] for h in json.loads(out.stdout)["hosts"]) == ["a", "b"]
    other = subprocess.run(
        [*PYSTEER, "steer", "stats", "--name", "nosuchdaemon"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert other.returncode == 3 and "steer-nosuchdaemon.sock" in other.stderr
