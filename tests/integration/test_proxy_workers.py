"""A proxy service on agents that run two worker processes each: keep-alive connections
spread over both of a's workers move to b's (each to the worker its id routes to), and
every worker opens its own connections to its host's nginx."""

from __future__ import annotations

import hashlib
import http.client
import ssl
from collections.abc import Iterator

import pytest
from helpers.cluster import Cluster

from pysteer.lab import Lab
from pysteer.lab.backends import Nginx, file_sha256
from pysteer.lab.plan import load
from pysteer.lab.pytest_plugin import require_root, unique_prefix

PORT, NGINX = 443, 8080
pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_root()
    lab = Lab(prefix=unique_prefix(), plan=load()).up()
    nginx = Nginx(lab, tmp_path_factory.mktemp("nginx"), port=NGINX)
    c = Cluster(
        lab,
        tmp_path_factory.mktemp("cluster"),
        services={PORT: ("proxy", True, {"backend": f"127.0.0.1:{NGINX}"})},
        workers={"a": 2, "b": 2},
    )
    try:
        nginx.start_all()
        c.start()
        yield c
    finally:
        c.close()
        nginx.close()
        lab.down()


def get(conn: http.client.HTTPSConnection, path: str) -> tuple[str, str | None]:
    conn.request("GET", path)
    response = conn.getresponse()
    return hashlib.sha256(response.read()).hexdigest(), response.getheader("X-Backend")


def test_proxy_connections_move_between_workers_of_two_hosts(cluster: Cluster) -> None:
    vip = str(cluster.lab.plan.vip(4))
    context = ssl.create_default_context(cafile=str(cluster.client_ca))

    def connect() -> http.client.HTTPSConnection:
        conn = http.client.HTTPSConnection(vip, PORT, context=context, timeout=30)
        conn.connect()
        return conn

    conns = [cluster.lab.call("client", connect) for _ in range(12)]
    for conn in conns:
        assert get(conn, "/64k.bin") == (file_sha256("64k.bin"), "a")
    flows = {}
    for conn in conns:
        assert conn.sock is not None
        local = conn.sock.getsockname()
        flows[f"{local[0]}:{local[1]}-{vip}:{PORT}"] = conn
    rows = {f["flow"]: f for f in cluster.flows()}
    assert {rows[f]["worker"] for f in flows} == {0, 1}, "the kernel used one worker only"
    for flow in flows:
        report = cluster.migrate(flow, "b")
        assert report["outcome"] == "moved", report
    rows = {f["flow"]: f for f in cluster.flows()}
    assert {rows[f]["node"] for f in flows} == {"b"}
    assert {rows[f]["worker"] for f in flows} == {0, 1}, "b's workers did not both take some"
    for conn in conns:
        assert get(conn, "/1m.bin") == (file_sha256("1m.bin"), "b")
        conn.close()
