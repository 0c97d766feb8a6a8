"""Unmodified services behind pysteer (``app = "proxy"``), in the namespace lab.

Each host runs Debian's nginx (static files, ``/slow/`` at a limited rate, ``/app/``
proxied to a waitress WSGI app) and a small WebSocket backend. pysteer terminates TLS on
the VIP and relays to the host's own nginx; clients are unmodified (Python http.client,
curl, wrk). Every body is checked (sha256), every move's outcome asserted, and the
backends' own logs say which host served what.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.cluster import Cluster

from pysteer.lab import Lab
from pysteer.lab.backends import Nginx, file_sha256
from pysteer.lab.plan import load
from pysteer.lab.pytest_plugin import require_root, unique_prefix

HELPERS = Path(__file__).parent.parent / "helpers"
HTTPS, HTTPS_PP, WS, TCP = 443, 444, 445, 7300
NGINX, NGINX_PP, APP, WS_PORT = 8080, 8082, 8081, 8090
pytestmark = pytest.mark.timeout(180)


class Backends:
    """nginx, waitress and the WebSocket backend on both hosts."""

    def __init__(self, lab: Lab, directory: Path) -> None:
        self.lab, self.dir = lab, directory
        self.nginx = Nginx(lab, directory, port=NGINX, proxy_protocol_port=NGINX_PP, app_port=APP)
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> Backends:
        self.nginx.start_all()
        for host in self.lab.plan.hosts:
            env = dict(
                os.environ,
                PYTHONPATH=str(HELPERS),
                PYSTEER_HOST=host,
                PYSTEER_APP_LOG=str(self.dir / f"app-{host}.log"),
            )
            waitress = [sys.executable, "-m", "waitress", f"--listen=127.0.0.1:{APP}"]
            waitress += ["--threads=16", "wsgi_app:app"]
            ws = [sys.executable, str(HELPERS / "ws_backend.py"), str(WS_PORT)]
            for argv in (waitress, ws):
                self.procs.append(
                    self.lab.popen(
                        host, argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                    )
                )
            for port in (APP, WS_PORT):
                wait_port(self.lab, host, port)
        return self

    def app_log(self, host: str) -> list[str]:
        path = self.dir / f"app-{host}.log"
        return path.read_text().splitlines() if path.exists() else []

    def close(self) -> None:
        self.nginx.close()
        for proc in self.procs:
            proc.terminate()
            proc.wait(10)


def wait_port(lab: Lab, host: str, port: int) -> None:
    def accepts() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
        except OSError:
            return False
        return True

    deadline = time.monotonic() + 20
    while not lab.call(host, accepts):
        assert time.monotonic() < deadline, f"nothing listens on {host}:{port}"
        time.sleep(0.05)


SERVICES = {
    HTTPS: ("proxy", True, {"backend": f"127.0.0.1:{NGINX}"}),
    HTTPS_PP: ("proxy", True, {"backend": f"127.0.0.1:{NGINX_PP}", "proxy_protocol": "v2"}),
    WS: ("proxy", True, {"backend": f"127.0.0.1:{WS_PORT}"}),
    TCP: ("proxy", False, {"backend": f"127.0.0.1:{APP}", "protocol": "tcp", "idle_ms": 100}),
}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, Backends]]:
    require_root()
    lab = Lab(prefix=unique_prefix(), plan=load()).up()
    backends = Backends(lab, tmp_path_factory.mktemp("backends"))
    cluster = Cluster(lab, tmp_path_factory.mktemp("cluster"), services=SERVICES)
    try:
        backends.start()
        cluster.start()
        yield cluster, backends
    finally:
        cluster.close()
        backends.close()
        lab.down()


# --- clients ------------------------------------------------------------------------------
def https(cluster: Cluster, port: int = HTTPS) -> http.client.HTTPSConnection:
    """A keep-alive HTTPS client to the VIP, connected from inside the client namespace."""
    vip = str(cluster.lab.plan.vip(4))
    context = ssl.create_default_context(cafile=str(cluster.client_ca))

    def connect() -> http.client.HTTPSConnection:
        conn = http.client.HTTPSConnection(vip, port, context=context, timeout=30)
        conn.connect()
        return conn

    return cluster.lab.call("client", connect)


def flow_of(conn: http.client.HTTPConnection) -> str:
    assert conn.sock is not None
    local, peer = conn.sock.getsockname(), conn.sock.getpeername()
    return f"{local[0]}:{local[1]}-{peer[0]}:{peer[1]}"


def get(conn: http.client.HTTPConnection, path: str) -> tuple[int, bytes, dict[str, str]]:
    before = conn.sock
    conn.request("GET", path)
    response = conn.getresponse()
    body = response.read()
    assert conn.sock is before, "http.client opened another connection"
    return response.status, body, {k.lower(): v for k, v in response.getheaders()}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def other(host: str) -> str:
    return "b" if host == "a" else "a"


# --- (a) keep-alive moves between requests --------------------------------------------------
def test_keepalive_connection_moves_ten_times_between_requests(
    env: tuple[Cluster, Backends],
) -> None:
    cluster, backends = env
    conn = https(cluster)
    flow = flow_of(conn)
    assert cluster.owner(flow) == "a"
    where = "a"
    for i in range(10):
        status, body, headers = get(conn, "/1m.bin")
        assert (status, sha(body), headers["x-backend"]) == (200, file_sha256("1m.bin"), where)
        payload = os.urandom(100_000 + i)
        conn.request("POST", "/app/sum", body=payload)
        response = conn.getresponse()
        answer = json.loads(response.read())
        assert answer == {"length": len(payload), "sha256": sha(payload)}
        assert (response.getheader("X-Backend"), response.getheader("X-App-Host")) == (where,) * 2
        report = cluster.migrate(flow, other(where))
        assert report["outcome"] == "moved", report
        where = other(where)
        assert cluster.owner(flow) == where
    status, body, headers = get(conn, "/64k.bin")
    assert (status, sha(body), headers["x-backend"]) == (200, file_sha256("64k.bin"), where)
    conn.close()
    # nginx saw the client's address in X-Forwarded-For, on both hosts.
    client_ip = flow.split(":", 1)[0]
    for host in ("a", "b"):
        rows = [r for r in backends.nginx.access_log(host) if r["uri"] == "/1m.bin"]
        assert len(rows) == 5, rows
        assert {r["xff"] for r in rows} == {client_ip}
