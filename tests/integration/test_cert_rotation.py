"""Certificates and the CA rotate live (SIGHUP), as a 24/7 cluster must once a year: TLS
clients of the service never notice, migrations keep working, and once the old CA is
gone from the bundle a certificate it issued is refused."""

from __future__ import annotations

import signal
import socket
import ssl
import time
from pathlib import Path

import pytest
from helpers.cluster import Cluster, check_ticker_stream, running_cluster
from helpers.peer import peer_connect

from pysteer.certs import CertificateAuthority
from pysteer.lab.clients import LineClient
from pysteer.safefile import PRIVATE, PUBLIC, private_dir

NODES = ("a", "b", "steer")
RELOADED = {
    "a": "reloaded the certificates of a and the CA",
    "b": "reloaded the certificates of b and the CA",
    "steer": "reloaded the TLS certificate, key and CA",
}


def reload_all(cluster: Cluster, times: int) -> None:
    """SIGHUP to every daemon; wait until each has logged its ``times``-th reload."""
    for name in NODES:
        cluster.procs[name].send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    for name in NODES:
        while cluster.log(name).count(RELOADED[name]) < times:
            assert time.monotonic() < deadline, cluster.log(name)[-2000:]
            time.sleep(0.05)
        assert "reload refused" not in cluster.log(name)


def test_certificates_and_ca_rotate_under_live_connections(tmp_path: Path) -> None:
    with running_cluster(tmp_path / "cluster") as cluster:
        d = cluster.dir
        vip = str(cluster.lab.plan.vip(4))
        ctx = ssl.create_default_context(cafile=str(cluster.client_ca))
        clients = []
        for _ in range(6):
            raw = cluster.lab.call("client", socket.create_connection, (vip, 443))
            client = LineClient(raw, ssl=ctx, server_hostname="vip")
            client.start()
            clients.append(client)
        flows = []
        for client in clients:
            host, port = client.sock.getsockname()[:2]
            flows.append(f"{host}:{port}-{vip}:443")
        time.sleep(0.5)
        old_ca = (d / "ca.pem").read_bytes()
        (tmp_path / "old-a.pem").write_bytes((d / "a.pem").read_bytes())
        (tmp_path / "old-a.key").write_bytes((d / "a.key").read_bytes())
        new_ca = CertificateAuthority("pysteer control-plane CA 2", days=365)

        with private_dir(d) as out:  # 1. everyone trusts both CAs
            out.write("ca.pem", old_ca + new_ca.cert_pem, PUBLIC)
        reload_all(cluster, 1)
        with private_dir(d) as out:  # 2. every node gets a certificate of the new CA
            for name in NODES:
                issued = new_ca.issue(name, names=[name], usage="node", days=365)
                out.write(f"{name}.pem", issued.chain_pem, PUBLIC)
                out.write(f"{name}.key", issued.key_pem, PRIVATE)
        reload_all(cluster, 2)
        with private_dir(d) as out:  # 3. the old CA goes
            out.write("ca.pem", new_ca.cert_pem, PUBLIC)
        reload_all(cluster, 3)

        # New links from here on: b restarts (it serves nothing), so a's links to it and
        # its own to the steering node are made with the new certificates only.
        cluster.stop("b")
        cluster.start_agent("b")
        for flow in flows[:3]:
            there = cluster.migrate(flow, "b")
            assert there["outcome"] == "moved", there
            back = cluster.migrate(flow, "a")
            assert back["outcome"] == "moved", back
        # A certificate of the old CA is refused now.
        with pytest.raises((ssl.SSLError, ConnectionError)):
            peer_connect(cluster, "a", tmp_path / "old-a.pem", tmp_path / "old-a.key", d / "ca.pem")
        # Nothing dropped: every stream byte-exact, through three reloads and six moves.
        time.sleep(0.3)
        for client in clients:
            check_ticker_stream(client.finish(), client.sent)
            client.close()
        # A bad file at a reload keeps what runs: the daemons say so, links still open.
        good_ca = (d / "ca.pem").read_bytes()
        with private_dir(d) as out:
            out.write("ca.pem", b"not a certificate", PUBLIC)
        for name in NODES:
            cluster.procs[name].send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        for name in NODES:
            while "reload refused" not in cluster.log(name):
                assert time.monotonic() < deadline, cluster.log(name)[-2000:]
                time.sleep(0.05)
        with private_dir(d) as out:
            out.write("ca.pem", good_ca, PUBLIC)
        cluster.stop("b")  # fresh links to a and to the steering daemon, as they were
        cluster.start_agent("b")
        raw = cluster.lab.call("client", socket.create_connection, (vip, 443))
        last = LineClient(raw, ssl=ctx, server_hostname="vip")
        last.start()
        host, port = last.sock.getsockname()[:2]
        time.sleep(0.3)
        report = cluster.migrate(f"{host}:{port}-{vip}:443", "b")
        assert report["outcome"] == "moved", report
        check_ticker_stream(last.finish(), last.sent)
        last.close()
        for name in NODES:
            assert "Traceback" not in cluster.log(name)
