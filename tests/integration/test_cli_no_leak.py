"""The CLI never sends traffic where it should not.

In the namespace lab the nodes' control addresses are not local to the root namespace: a
TCP connection to one from there leaves the machine by its default route, to a network
that is not ours. So with an agent down (its local socket gone) the CLI run in the root
namespace must either enter the node's namespace (``netns`` in the cluster file) or send
nothing at all (a node marked neither ``netns`` nor ``remote``), and still say "down".

A guard table in the ROOT namespace counts and drops every packet it sends to the lab
plan's ranges; it is installed before the cluster starts and before any CLI command.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.cluster import HELPERS, Cluster, Session, check_ticker_stream, running_cluster

from pysteer.lab.plan import load
from pysteer.lab.pytest_plugin import require_root

PYSTEER = [sys.executable, "-m", "pysteer"]
# A loopback address the guard's rule also matches: a probe to it shows that the rule is
# hooked in this namespace and that its counter counts, so "still 0" is not vacuous.
SENTINEL = "127.77.0.1"


class Guard:
    """An nftables table in the root namespace: count and drop output to the lab's ranges."""

    def __init__(self) -> None:
        plan = load()
        self.v4 = plan.v4
        self.v6 = plan.v6.supernet(new_prefix=16)  # every ULA prefix the plan draws from
        self.table = f"pysteer_noleak_{os.getpid()}"

    def install(self) -> None:
        rules = f"""
        table inet {self.table} {{
            counter leak {{ }}
            chain out {{
                type filter hook output priority raw; policy accept;
                ip daddr {{ {self.v4}, {SENTINEL} }} counter name "leak" drop
                ip6 daddr {self.v6} counter name "leak" drop
            }}
        }}
        """
        subprocess.run(["nft", "-f", "-"], input=rules, text=True, check=True)

    def remove(self) -> None:
        subprocess.run(["nft", "delete", "table", "inet", self.table], check=False)

    def packets(self) -> int:
        out = subprocess.run(
            ["nft", "-j", "list", "counter", "inet", self.table, "leak"],
            capture_output=True,
            text=True,
            check=True,
        )
        entry = next(e for e in json.loads(out.stdout)["nftables"] if "counter" in e)
        return entry["counter"]["packets"]


@pytest.fixture(scope="module")
def guard() -> Iterator[Guard]:
    require_root()
    g = Guard()
    g.install()
    try:
        yield g
    finally:
        g.remove()


@pytest.fixture(scope="module")
def cluster(guard: Guard, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running_cluster(tmp_path_factory.mktemp("cluster")) as c:
        yield c


@pytest.fixture(scope="module")
def client(cluster: Cluster) -> Iterator[tuple[Session, str]]:
    """A plain TCP client on the ticker (port 7000), served by a."""
    before = {f["flow"] for f in cluster.flows()}
    argv = [sys.executable, str(HELPERS / "line_client.py"), str(cluster.lab.plan.vip(4)), "7000"]
    session = Session(cluster.lab, argv)
    flow = cluster.wait_new_flow(before, 7000)["flow"]
    session.start_writing()
    yield session, flow
    session.stop_writing()
    session.drain()
    check_ticker_stream(session.finish(), session.sent)


def variant(cluster: Cluster, name: str, edit: dict[str, str]) -> Path:
    """A copy of the lab's cluster file beside it, with each node's netns line replaced by
    ``edit[node]`` ("" drops it)."""
    text = cluster.config.read_text()
    for node, line in edit.items():
        netns_line = f'netns = "{cluster.lab.netns(node)}"'
        assert netns_line in text, text
        text = text.replace(netns_line, line)
    path = cluster.dir / name
    path.write_text(text)
    return path


def cli(config: Path, *args: str, netns: str | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI in the root namespace, or in namespace ``netns`` (an operator on that host)."""
    argv = [*PYSTEER, *args, "--config", str(config)]
    return subprocess.run(
        argv if netns is None else ["ip", "netns", "exec", netns, *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def assert_served(session: Session) -> None:
    """The client's lines are still echoed: its connection is alive and served."""
    count = session.text().count("\necho ")
    time.sleep(0.3)
    assert session.text().count("\necho ") > count, "the flow is not served"


def test_the_guard_counts(guard: Guard) -> None:
    """Its rule is live in the root namespace: a probe to the sentinel is counted."""
    before = guard.packets()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s, pytest.raises(PermissionError):
        s.sendto(b"probe", (SENTINEL, 9))  # dropped by the guard: EPERM
    assert guard.packets() == before + 1


def test_lab_cluster_file_names_each_namespace(cluster: Cluster) -> None:
    text = cluster.config.read_text()
    for node in (cluster.lab.plan.steer, *cluster.lab.plan.hosts):
        assert f'netns = "{cluster.lab.netns(node)}"' in text
    assert "remote" not in text


def test_agent_down_no_packet_leaves_the_root_namespace(
    cluster: Cluster, client: tuple[Session, str], guard: Guard
) -> None:
    """b's agent stopped: status, flows and migrate say "down" (exit codes as always), and
    the CLI's TCP to b goes inside b's namespace, never out of the root namespace."""
    session, flow = client
    local_only = variant(cluster, "local-only.toml", {"b": ""})  # b: neither netns nor remote
    gone = variant(cluster, "gone.toml", {"b": f'netns = "{cluster.lab.prefix}-gone"'})
    before = guard.packets()

    def run(*args: str, config: Path = cluster.config) -> subprocess.CompletedProcess[str]:
        out = cli(config, *args)
        leaked = guard.packets() - before
        assert leaked == 0, f"`pysteer {' '.join(args)}` sent {leaked} packet(s) out of root"
        return out

    cluster.stop("b")
    try:
        status = run("status")
        assert status.returncode == 3, status.stderr  # a node is down
        line = next(ln for ln in status.stdout.splitlines() if "node b:" in ln)
        assert "DOWN" in line and f"in namespace {cluster.lab.netns('b')}" in line, line
        assert re.search(r"node a: up", status.stdout), status.stdout
        state = json.loads(run("status", "--json").stdout)
        assert state["nodes"]["a"]["up"] and not state["nodes"]["b"]["up"]
        flows = run("flows")
        assert flows.returncode == 0 and flow in flows.stdout and "(b: down)" in flows.stdout
        only_b = run("flows", "--node", "b")
        assert only_b.returncode == 3 and "node b is down" in only_b.stderr, only_b.stderr
        mig = run("migrate", "--flow", flow, "--to", "b")
        assert mig.returncode == 3 and "node b is down" in mig.stderr, mig.stderr
        assert mig.stdout == ""
        # No netns, no remote: the local socket only, and a clear "down" without any TCP.
        status = run("status", config=local_only)
        assert status.returncode == 3, status.stderr
        line = next(ln for ln in status.stdout.splitlines() if "node b:" in ln)
        assert "DOWN" in line and "not asked over TCP" in line, line
        mig = run("migrate", "--flow", flow, "--to", "b", config=local_only)
        assert mig.returncode == 3 and "node b is down" in mig.stderr, mig.stderr
        # A namespace that does not exist (a lab taken down): down, and still nothing sent.
        status = run("status", config=gone)
        line = next(ln for ln in status.stdout.splitlines() if "node b:" in ln)
        assert "DOWN" in line and "no network namespace named" in line, line
    finally:
        cluster.start_agent("b")
    assert cluster.owner(flow) == "a"
    assert_served(session)
    assert guard.packets() == before


def test_remote_node_is_reached_from_host_a(
    cluster: Cluster, client: tuple[Session, str], guard: Guard
) -> None:
    """An operator on host a, with b marked ``remote`` (another machine) and b's socket not
    visible: the CLI reaches b's agent over its mutual-TLS listener, both ways."""
    session, flow = client
    remote_b = variant(cluster, "remote-b.toml", {"b": "remote = true"})
    on_a = cluster.lab.netns("a")
    sock = Path(f"/run/pysteer/{cluster.lab.prefix}/agent-b.sock")
    hidden = sock.with_name("agent-b.sock.hidden")
    before = guard.packets()
    log_start = len(cluster.log("b"))
    sock.rename(hidden)
    try:
        flows = cli(remote_b, "flows", "--node", "b", "--json", netns=on_a)
        assert flows.returncode == 0, flows.stderr
        for node in ("b", "a"):
            out = cli(remote_b, "migrate", "--flow", flow, "--to", node, "--json", netns=on_a)
            assert out.returncode == 0, out.stdout + out.stderr
            assert json.loads(out.stdout)["outcome"] == "moved"
        status = json.loads(cli(remote_b, "status", "--json", netns=on_a).stdout)
        assert status["nodes"]["b"]["up"] and status["nodes"]["b"]["pid"] > 0
    finally:
        hidden.rename(sock)
    log = cluster.log("b")[log_start:]
    assert "remote flows from a" in log and "remote migrate from a" in log, log
    assert cluster.owner(flow) == "a"
    assert_served(session)
    assert guard.packets() == before
