"""An upgrade that changes the RPC version, one node at a time: the node of the next
version and the others refuse each other clearly (both versions named, in the CLI's error
and in the logs), nothing is frozen or lost on the way, and once both run the same
version, migrations work again. docs/deployment.md gives the procedure."""

from __future__ import annotations

import socket
import ssl
import sys
import time
from collections.abc import Iterator

import pytest
from helpers.cluster import HELPERS, Cluster, check_ticker_stream, running_cluster

from pysteer.agent.control import ask
from pysteer.lab.clients import LineClient
from pysteer.lab.cluster import control_path_for
from pysteer.rpc import VERSION


@pytest.fixture
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running_cluster(tmp_path_factory.mktemp("cluster")) as c:
        yield c


def test_a_node_of_another_rpc_version_is_refused_clearly(cluster: Cluster) -> None:
    vip = str(cluster.lab.plan.vip(4))
    ctx = ssl.create_default_context(cafile=str(cluster.client_ca))
    client = LineClient(
        cluster.lab.call("client", socket.create_connection, (vip, 443)),
        ssl=ctx,
        server_hostname="vip",
    )
    client.start()
    host, port = client.sock.getsockname()[:2]
    flow = f"{host}:{port}-{vip}:443"
    time.sleep(0.3)

    # b is "upgraded" to the next RPC version; a and the steering daemon are not.
    start = len(cluster.log("b"))
    assert cluster.stop("b") == 0
    cluster.start_agent("b", launcher=[sys.executable, str(HELPERS / "agent_next_version.py")])
    mismatch = f"speaks pysteer RPC version {VERSION}; the client speaks version {VERSION + 1}"
    deadline = time.monotonic() + 10
    while mismatch not in cluster.log("b")[start:]:  # its links to the steering daemon
        assert time.monotonic() < deadline, cluster.log("b")[start:]
        time.sleep(0.1)

    # The CLI (of the older version) cannot ask b, and says why.
    refused = cluster.cli("migrate", "--flow", flow, "--to", "b")
    assert refused.returncode == 3, refused.stderr
    assert f"this agent (b) speaks pysteer RPC version {VERSION + 1}; the client speaks " in (
        refused.stderr
    )
    # Asked directly, a tries: b's listener refuses a's hello, before anything is frozen.
    report = ask(control_path_for(cluster, "a"), "migrate", flow=flow, to="b")["migration"]
    assert report["outcome"] == "failed", report
    assert f"speaks pysteer RPC version {VERSION + 1}" in report["error"], report
    assert report["freeze_ms"] is None
    assert cluster.owner(flow) == "a"

    flows = cluster.cli("flows", "--node", "b")  # this CLI is of the older version
    assert flows.returncode == 3, flows.stderr
    assert f"speaks pysteer RPC version {VERSION + 1}; the client speaks version {VERSION}" in (
        flows.stderr
    )
    assert "upgrade the older one" in flows.stderr
    assert "Traceback" not in cluster.log("b") + cluster.log("a") + cluster.log("steer")

    # The upgrade finished (here: b back on the version of the others): moves work again.
    assert cluster.stop("b") == 0
    cluster.start_agent("b")
    report = cluster.migrate(flow, "b")
    assert report["outcome"] == "moved", report
    time.sleep(0.3)
    check_ticker_stream(client.finish(), client.sent)
    client.close()
