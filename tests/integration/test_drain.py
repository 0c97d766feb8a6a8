"""`pysteer drain`: every flow of a host moves, new connections go to the other host, and
an interrupted drain leaves every flow on exactly one host.

Clients: 200 active TLS connections (s_client and gnutls-cli processes, and Python ssl
connections on one asyncio loop) on the ticker, and 300 idle keep-alive TLS connections on the
http app, which answer a request byte-exact after the drain.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator

import pytest
from helpers.cluster import PYSTEER, Cluster, Session, check_ticker_stream, running_cluster
from helpers.migration import RstCapture

from pysteer.app.handlers import http_body
from pysteer.lab.clients import LineClient

ACTIVE_PROCESSES = 10  # s_client and gnutls-cli, half each
ACTIVE_THREADS = 190
IDLE = 300


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running_cluster(tmp_path_factory.mktemp("cluster")) as c:
        yield c


class Clients:
    def __init__(self, cluster: Cluster) -> None:
        lab, vip = cluster.lab, str(cluster.lab.plan.vip(4))
        ca = str(cluster.client_ca)
        self.sessions = []
        for i in range(ACTIVE_PROCESSES):
            argv = (
                [
                    "openssl",
                    "s_client",
                    "-connect",
                    f"{vip}:443",
                    "-servername",
                    "vip",
                    "-CAfile",
                    ca,
                    "-quiet",
                ]
                if i % 2 == 0
                else [
                    "gnutls-cli",
                    "--x509cafile",
                    ca,
                    "--verify-hostname",
                    "vip",
                    "--logfile",
                    "/dev/null",
                    "-p",
                    "443",
                    vip,
                ]
            )
            session = Session(lab, argv, interval=0.2)
            self.sessions.append(session)
        ctx = ssl.create_default_context(cafile=ca)
        self.threads = []
        for _ in range(ACTIVE_THREADS):
            raw = lab.call("client", socket.create_connection, (vip, 443))
            self.threads.append(LineClient(raw, ssl=ctx, server_hostname="vip"))
        self.idle = []
        for _ in range(IDLE):
            raw = lab.call("client", socket.create_connection, (vip, 8443))
            self.idle.append(ctx.wrap_socket(raw, server_hostname="vip"))
        for session in self.sessions:
            session.wait_for("ticker ready")
            session.start_writing()
        for t in self.threads:
            t.start()

    def drain(self) -> None:
        """Stop sending and wait for every echo (still under the RST capture)."""
        for session in self.sessions:
            session.stop_writing()
        for t in self.threads:
            t.stop.set()
        for session in self.sessions:
            session.drain()
        for t in self.threads:
            check_ticker_stream(t.finish(), t.sent)

    def check(self) -> None:
        """End the client processes and check their streams; ask every idle connection."""
        for session in self.sessions:
            check_ticker_stream(session.finish(), session.sent)
        for i, sock in enumerate(self.idle):
            size = 1000 + i
            sock.sendall(b"GET /bytes/%d HTTP/1.1\r\nHost: vip\r\n\r\n" % size)
            data = b""
            while not data.endswith(http_body(size)[-20:]) or len(data) < size:
                chunk = sock.recv(65536)
                assert chunk, "idle connection closed"
                data += chunk
            head, body = data.split(b"\r\n\r\n", 1)
            assert head.startswith(b"HTTP/1.1 200") and body == http_body(size)
            sock.close()

    def total(self) -> int:
        return len(self.sessions) + len(self.threads) + len(self.idle)


def drain_argv(cluster: Cluster, source: str, target: str, *extra: str) -> list[str]:
    return [
        *PYSTEER,
        "drain",
        "--from",
        source,
        "--to",
        target,
        "--config",
        str(cluster.config),
        *extra,
    ]


def nodes_of(cluster: Cluster) -> dict[str, list[str]]:
    where: dict[str, list[str]] = {}
    for f in cluster.flows():
        where.setdefault(f["flow"], []).append(f["node"])
    return where


def test_drain_moves_everything_and_new_connections_go_to_b(cluster: Cluster) -> None:
    before = cluster.client_counters()
    with RstCapture(cluster.lab, "client", "to-steer") as capture:
        clients = Clients(cluster)
        assert len([n for n in nodes_of(cluster).values() if n == ["a"]]) == clients.total()
        dry = cluster.cli("drain", "--from", "a", "--to", "b", "--dry-run")
        assert dry.returncode == 0
        assert f"would move {clients.total()} flow(s) from a to b" in dry.stdout
        dry_json = json.loads(
            cluster.cli("drain", "--from", "a", "--to", "b", "--dry-run", "--json").stdout
        )
        assert (dry_json["dry_run"], dry_json["from"], dry_json["to"]) == (True, "a", "b")
        assert len(dry_json["flows"]) == clients.total()
        proc = subprocess.Popen(
            drain_argv(cluster, "a", "b", "--json"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        # A new connection while the drain runs lands on b (the steering node diverts it).
        progress = proc.stderr.readline()
        assert re.match(r"\d+/\d+ done", progress), progress
        newcomer = cluster.lab.call(
            "client", socket.create_connection, (str(cluster.lab.plan.vip(4)), 7000)
        )
        newcomer.settimeout(10)
        assert newcomer.recv(100) == b"ticker ready\n"
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        summary = json.loads(out)
        assert summary["moved"] == clients.total() and summary["remaining"] == []
        assert summary["failed"] == summary["rolled_back"] == 0
        print(
            f"\ndrain of {clients.total()}: {summary['per_second']}/s, freeze "
            f"{summary['freeze_ms']}"
        )
        local = newcomer.getsockname()
        flow = f"{local[0]}:{local[1]}-{cluster.lab.plan.vip(4)}:7000"
        assert cluster.owner(flow) == "b"
        row = cluster.steer_row(flow)
        assert row["action"] == "TO" and row["host"] == "b" and row["packets"]["pass"] == 0
        assert all(n == ["b"] for n in nodes_of(cluster).values())
        assert not [f for f in cluster.flows() if f["node"] == "a"]
        status = json.loads(cluster.cli("status", "--json").stdout)
        assert status["nodes"]["a"]["drained_to"] == "b"
        assert not status["nodes"]["a"]["accepting"]
        clients.drain()
    clients.check()
    newcomer.close()  # after the capture: its kernel may RST a tick that crosses the close
    after = cluster.client_counters()
    # Clients tear down after the check; their RSTs (answering ticks) come later.
    assert capture.count == 0, capture.lines[:5]
    assert after["TCPTimeouts"] == before["TCPTimeouts"]
    # undrain: a takes new connections again
    assert cluster.cli("undrain", "a").returncode == 0
    fresh = cluster.lab.call(
        "client", socket.create_connection, (str(cluster.lab.plan.vip(4)), 7000)
    )
    fresh.settimeout(10)
    assert fresh.recv(100) == b"ticker ready\n"
    local = fresh.getsockname()
    assert cluster.owner(f"{local[0]}:{local[1]}-{cluster.lab.plan.vip(4)}:7000") == "a"
    fresh.close()
    for t in clients.threads:
        t.close()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill", "ctrl-c"])
def test_interrupted_drain(cluster: Cluster, sig: int) -> None:
    """Killed (or Ctrl-C) midway: every flow on exactly one host; a second drain finishes."""
    cluster.cli("undrain", "a")
    cluster.cli("undrain", "b")
    lab, vip = cluster.lab, str(cluster.lab.plan.vip(4))
    ctx = ssl.create_default_context(cafile=str(cluster.client_ca))
    threads = []
    for _ in range(120):
        raw = lab.call("client", socket.create_connection, (vip, 443))
        threads.append(LineClient(raw, ssl=ctx, server_hostname="vip"))
    for t in threads:
        t.start()
    ours = {f"{t.sock.getsockname()[0]}:{t.sock.getsockname()[1]}-{vip}:443" for t in threads}
    time.sleep(0.5)
    proc = subprocess.Popen(
        drain_argv(cluster, "a", "b", "--batch", "4"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stderr.readline()  # the first batch's progress
    assert re.match(r"\d+/\d+ done", line), (line, proc.stderr.read())
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    if sig == signal.SIGINT:
        assert proc.returncode == 130, err
        assert "drain interrupted" in out and "still served by a" in out
    time.sleep(1)  # a killed CLI: the agent ends the batch in flight, then stops
    where = nodes_of(cluster)
    assert ours <= set(where)
    assert all(len(where[f]) == 1 for f in ours), "a flow on two hosts"
    on_a = [f for f in ours if where[f] == ["a"]]
    assert 0 < len(on_a) < len(ours), "the drain was not interrupted midway"
    again = subprocess.run(
        drain_argv(cluster, "a", "b"), capture_output=True, text=True, timeout=120, check=False
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert "a serves no flow" in again.stdout
    where = nodes_of(cluster)
    assert all(where[f] == ["b"] for f in ours)
    for t in threads:
        t.stop.set()
    for t in threads:
        check_ticker_stream(t.finish(), t.sent)
        t.close()
    # Back to a for the next case.
    assert cluster.cli("undrain", "a").returncode == 0


def test_drain_bad_input(cluster: Cluster) -> None:
    for args, message in [
        (["--from", "a", "--to", "a"], "same node"),
        (["--from", "a", "--to", "c"], "unknown node 'c'"),
        (["--from", "a", "--to", "b", "--batch", "0"], "--batch must be"),
    ]:
        out = cluster.cli("drain", *args)
        assert out.returncode == 2 and message in out.stderr, out.stderr
