"""An agent as several worker processes (``workers = 2`` for both hosts): the kernel spreads
new connections over a's workers, each moves its own, each of b's takes the migrations whose
id routes to it, and the node still looks like one to the CLI (flows, status, migrate,
drain). A worker that dies is restarted; the supervisor's SIGTERM ends them all.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.blobs import blob
from helpers.cluster import Cluster, check_ticker_stream, running_cluster
from helpers.peer import ask, peer_connect

from pysteer.agent.control import AgentRefused
from pysteer.agent.control import ask as ask_agent
from pysteer.lab.clients import LineClient
from pysteer.lab.cluster import AGENT_PORT, control_path_for
from pysteer.transfer import new_migration_id, seal
from pysteer.transfer.blob import worker_of

CLIENTS = 24  # all on one of two workers: a chance of 2 in 2**24


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running_cluster(
        tmp_path_factory.mktemp("cluster"),
        workers={"a": 2, "b": 2},
        agent_args=["--sync-interval", "1"],
    ) as c:
        yield c


def clients(cluster: Cluster, n: int) -> list[LineClient]:
    vip = str(cluster.lab.plan.vip(4))
    ctx = ssl.create_default_context(cafile=str(cluster.client_ca))
    out = []
    for _ in range(n):
        raw = cluster.lab.call("client", socket.create_connection, (vip, 443))
        client = LineClient(raw, ssl=ctx, server_hostname="vip")
        client.start()
        out.append(client)
    return out


def local_flow(client: LineClient, cluster: Cluster) -> str:
    """The flow as the agents name it (client address:port-VIP:443)."""
    host, port = client.sock.getsockname()[:2]
    return f"{host}:{port}-{cluster.lab.plan.vip(4)}:443"


def wait_flows(cluster: Cluster, wanted: set[str], timeout: float = 20) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        flows = [f for f in cluster.flows() if f["flow"] in wanted]
        if len(flows) == len(wanted):
            return flows
        time.sleep(0.05)
    raise AssertionError(f"the agents serve {len(flows)} of {len(wanted)} flows")


def workers_of(cluster: Cluster, node: str) -> list[int]:
    """The pids of ``node``'s worker processes in this cluster, from /proc."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--worker" in argv and str(cluster.config).encode() in argv and node.encode() in argv:
            pids.append(int(entry.name))
    return pids


def status(cluster: Cluster, node: str) -> dict:
    out = cluster.cli("status", "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["nodes"][node]


def test_each_worker_moves_its_own_and_the_node_drains_as_one(cluster: Cluster) -> None:
    running = clients(cluster, CLIENTS)
    names = {local_flow(c, cluster) for c in running}
    flows = wait_flows(cluster, names)
    assert {f["node"] for f in flows} == {"a"}
    assert {f["worker"] for f in flows} == {0, 1}  # the kernel spread them
    st = status(cluster, "a")
    assert st["connections"] == CLIENTS
    assert [w["worker"] for w in st["workers"]] == [0, 1]
    assert sum(w["connections"] for w in st["workers"]) == CLIENTS
    assert st["pid"] not in {w["pid"] for w in st["workers"]}

    # One flow of each worker, moved by its worker through the node's control socket.
    by_worker = {f["worker"]: f["flow"] for f in flows}
    for flow in by_worker.values():
        report = cluster.migrate(flow, "b")
        assert report["outcome"] == "moved", report
        assert cluster.owner(flow) == "b"

    out = cluster.cli("drain", "--from", "a", "--to", "b", "--json")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["moved"] == CLIENTS - 2, summary
    assert (summary["rolled_back"], summary["failed"], summary["remaining"]) == (0, 0, [])
    assert len(summary["workers"]) == 2
    assert sum(w["moved"] for w in summary["workers"]) == CLIENTS - 2
    flows = wait_flows(cluster, names)
    assert {f["node"] for f in flows} == {"b"}
    # b's two workers took them: each migration went to the worker its id routes to.
    assert {f["worker"] for f in flows} == {0, 1}
    time.sleep(0.5)
    for client in running:
        check_ticker_stream(client.finish(), client.sent)
        client.close()
    assert cluster.cli("undrain", "a").returncode == 0


def test_a_move_for_another_worker_is_refused_untouched(cluster: Cluster) -> None:
    """A move whose id routes to worker 0 of b, sent to b's worker 1: refused as aborted
    (nothing opened or recorded: the source may roll back), and so is its outcome."""
    key = (cluster.dir / "cluster.key").read_bytes()
    mid = new_migration_id()
    while worker_of(mid, 2) != 0:
        mid = new_migration_id()
    sealed = seal(blob(mid), key, source="a", target="b")
    d = cluster.dir
    sock = peer_connect(cluster, "a", d / "a.pem", d / "a.key", d / "ca.pem", worker=1)
    with sock:
        why = (
            f"migration {mid.hex()[:12]} belongs to worker 0 of b, not to worker 1: do both "
            "nodes' cluster files give b workers = 2?"
        )
        answer = ask(sock, {"op": "move", "id": mid, "blob": sealed})
        assert answer == {"ok": False, "error": why, "code": "aborted"}
        assert ask(sock, {"op": "outcome", "id": mid}) == {"ok": False, "error": why}
        assert ask(sock, {"op": "hello"})["workers"] == 2
    # The right worker has never seen it: the refusal recorded nothing.
    sock = peer_connect(cluster, "a", d / "a.pem", d / "a.key", d / "ca.pem", worker=0)
    with sock:
        assert ask(sock, {"op": "outcome", "id": mid}) == {"ok": True, "outcome": None}


@pytest.mark.parametrize(
    ("request_", "error"),
    [
        ({"cmd": "nope"}, "unknown command 'nope'"),
        ({"cmd": "migrate", "flow": "garbage", "to": "b"}, "malformed flow"),
        (
            {"cmd": "migrate", "flow": "10.77.1.2:1-10.77.100.1:443", "to": "b"},
            "flow 10.77.1.2:1-10.77.100.1:443 is not served on a",
        ),
        ({"cmd": "migrate", "flow": "10.77.1.2:1-10.77.100.1:443", "to": "zz"}, "unknown node"),
        ({"cmd": "resolve", "id": "abcd", "keep": "source"}, "no in-doubt migration 'abcd' on a"),
        ({"cmd": "drain", "to": "zz"}, "cannot drain a to 'zz' (nodes: b)"),
        ({"cmd": "drain", "to": "b", "batch": 0}, "batch must be 1..4096"),
    ],
)
def test_the_supervisor_refuses_as_one_agent(cluster: Cluster, request_: dict, error: str) -> None:
    """Each worker checks the request; the node answers once, with the workers' reason."""
    with pytest.raises(AgentRefused) as info:
        ask_agent(control_path_for(cluster, "a"), **request_)
    assert error in str(info.value)
    assert "Traceback" not in cluster.log("a")


def test_the_supervisor_syncs_every_workers_flows(cluster: Cluster) -> None:
    """Each second b's supervisor lists both workers' flows to the steering node: an
    entry for a flow nobody serves goes, and none of the workers' real ones does (a sync of
    one worker's flows would have the other's removed as stale)."""
    running = {local_flow(c, cluster): c for c in clients(cluster, CLIENTS)}
    flows = wait_flows(cluster, set(running))
    for flow in running:
        assert cluster.migrate(flow, "b")["outcome"] == "moved"
    flows = wait_flows(cluster, set(running))
    assert {(f["node"], f["worker"]) for f in flows} == {("b", 0), ("b", 1)}
    ghost = f"10.77.1.2:9-{cluster.lab.plan.vip(4)}:443"
    assert cluster.steer("to", ghost, "b").returncode == 0
    deadline = time.monotonic() + 15
    while ghost in (table := cluster.steer_rows()):
        assert time.monotonic() < deadline, "the stale entry was never removed"
        time.sleep(0.2)
    assert "sync: b does not serve " + ghost in cluster.log("steer")
    assert {table[f]["host"] for f in running} == {"b"}  # every real one kept
    time.sleep(2.5)  # more syncs: still all there
    table = cluster.steer_rows()
    assert {table[f]["host"] for f in running} == {"b"}
    for client in running.values():
        check_ticker_stream(client.finish(), client.sent)
        client.close()


def test_remote_control_reaches_the_whole_node(cluster: Cluster) -> None:
    """The CLI's remote path lands on one worker's peer listener; the answer is the node's."""
    d = cluster.dir
    sock = peer_connect(cluster, "a", d / "a.pem", d / "a.key", d / "ca.pem", worker=1)
    with sock:
        answer = ask(sock, {"op": "control", "request": {"cmd": "status"}})
    assert answer["ok"], answer
    assert [w["worker"] for w in answer["status"]["workers"]] == [0, 1]
    assert answer["status"]["node"] == "b"


def test_a_killed_worker_is_restarted(cluster: Cluster) -> None:
    running = {local_flow(c, cluster): c for c in clients(cluster, CLIENTS)}
    names = set(running)
    flows = wait_flows(cluster, names)
    before = status(cluster, "a")["workers"]
    victim = before[1]
    os.kill(victim["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while "worker 1 is back" not in cluster.log("a"):
        assert time.monotonic() < deadline, cluster.log("a")[-3000:]
        time.sleep(0.1)
    assert f"worker 1 (pid {victim['pid']}) exited with -9" in cluster.log("a")
    after = status(cluster, "a")["workers"]
    assert after[0]["pid"] == before[0]["pid"]
    assert after[1]["pid"] != victim["pid"] and after[1]["restarts"] == 1
    # Worker 0's connections never noticed; worker 1's died with it.
    survivors = {f["flow"] for f in flows if f["worker"] == 0}
    assert survivors
    assert {f["flow"] for f in cluster.flows()} & names == survivors
    for flow, client in running.items():
        if flow in survivors:
            check_ticker_stream(client.finish(), client.sent)
        client.close()
    # The restarted worker serves new connections again.
    fresh = clients(cluster, CLIENTS)
    flows = wait_flows(cluster, {local_flow(c, cluster) for c in fresh})
    assert {f["worker"] for f in flows} == {0, 1}
    for client in fresh:
        check_ticker_stream(client.finish(), client.sent)
        client.close()


def test_sigterm_ends_every_worker(cluster: Cluster) -> None:
    pids = [w["pid"] for w in status(cluster, "a")["workers"]]
    sockets = [control_path_for(cluster, "a")]
    sockets += [Path(f"{sockets[0]}".replace(".sock", f".w{i}.sock")) for i in range(2)]
    assert all(p.exists() for p in sockets)
    assert cluster.stop("a") == 0
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not any(p.exists() for p in sockets)
    log = cluster.log("a")
    assert "agent a stopped" in log and "Traceback" not in log
    cluster.start_agent("a")  # the module's other tests may follow in any order


def test_a_killed_supervisor_takes_its_workers_down(cluster: Cluster) -> None:
    """kill -9 of the supervisor: the kernel sends its workers SIGTERM (PR_SET_PDEATHSIG);
    none is left holding the node's ports."""
    pids = [w["pid"] for w in status(cluster, "a")["workers"]]
    start = len(cluster.log("a"))
    assert cluster.stop("a", signal.SIGKILL) == -signal.SIGKILL
    deadline = time.monotonic() + 20
    for pid in pids:
        while Path(f"/proc/{pid}").exists():
            assert time.monotonic() < deadline, cluster.log("a")[-3000:]
            time.sleep(0.05)
    log = cluster.log("a")[start:]
    assert log.count("stopped: 0 connection(s) moved") == 2 and "Traceback" not in log
    cluster.start_agent("a")
    assert len(status(cluster, "a")["workers"]) == 2


def test_a_worker_that_cannot_start_stops_the_node_cleanly(cluster: Cluster) -> None:
    """Worker 1's peer port is taken: the start fails with the reason, worker 0 is not
    left behind, and nothing prints a traceback."""
    start = len(cluster.log("a"))
    assert cluster.stop("a") == 0
    host = str(cluster.lab.plan.address("a"))
    squatter = cluster.lab.call("a", socket.create_server, (host, AGENT_PORT + 1))
    try:
        with pytest.raises(RuntimeError, match="a did not start"):
            cluster.start_agent("a")
    finally:
        squatter.close()
    log = cluster.log("a")[start:]
    assert f"cannot listen on {host}:{AGENT_PORT + 1}: Address already in use" in log
    assert "agent a: worker 1 exited with 2" in log, log
    assert "Traceback" not in log
    assert not workers_of(cluster, "a")  # worker 0 ended too
    cluster.start_agent("a")
    assert len(status(cluster, "a")["workers"]) == 2


def test_a_stopped_worker_is_named_not_waited_for(cluster: Cluster) -> None:
    """SIGSTOP on one worker: the node's answers fail within the supervisor's bound, name
    that worker, and everything works again after SIGCONT."""
    victim = status(cluster, "a")["workers"][1]["pid"]
    os.kill(victim, signal.SIGSTOP)
    try:
        started = time.monotonic()
        out = cluster.cli("flows", "--node", "a")
        assert time.monotonic() - started < 9  # the CLI waits 10 s: the node answered
        assert out.returncode == 3, out.stderr
        assert f"worker 1 (pid {victim}) answered nothing within 6 s" in out.stderr
    finally:
        os.kill(victim, signal.SIGCONT)
    assert status(cluster, "a")["workers"][1]["pid"] == victim
