"""Unmodified services behind pysteer (``app = "proxy"``), in the namespace lab.

Each host runs Debian's nginx (static files, ``/slow/`` at a limited rate, ``/app/``
proxied to a waitress WSGI app) and a small WebSocket backend. pysteer terminates TLS on
the VIP and relays to the host's own nginx; clients are unmodified (Python http.client,
curl, wrk). Every body is checked (sha256), every move's outcome asserted, and the
backends' own logs say which host served what.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.cluster import Cluster

from pysteer.lab import Lab
from pysteer.lab.backends import Nginx, file_sha256
from pysteer.lab.plan import load
from pysteer.lab.pytest_plugin import require_root, unique_prefix

HELPERS = Path(__file__).parent.parent / "helpers"
HTTPS, HTTPS_PP, WS, TCP, HTTPS_QUICK = 443, 444, 445, 7300, 446
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
    HTTPS_QUICK: ("proxy", True, {"backend": f"127.0.0.1:{NGINX}", "read_timeout": 1}),
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
def keepalive(
    cluster: Cluster, port: int = HTTPS, *, tls: bool = True
) -> http.client.HTTPConnection:
    """A keep-alive HTTPS (or plain HTTP) client to the VIP, connected from inside the
    client namespace."""
    vip = str(cluster.lab.plan.vip(4))
    context = ssl.create_default_context(cafile=str(cluster.client_ca))

    def connect() -> http.client.HTTPConnection:
        if tls:
            conn = http.client.HTTPSConnection(vip, port, context=context, timeout=30)
        else:
            conn = http.client.HTTPConnection(vip, port, timeout=30)
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
    conn = keepalive(cluster)
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


def curl(cluster: Cluster, out_dir: Path, paths: list[str], *extra: str) -> subprocess.Popen[str]:
    """curl in the client namespace: ``paths`` on one keep-alive connection, each body to
    its own file, one line per transfer: connects made, status, size."""
    vip = str(cluster.lab.plan.vip(4))
    argv = ["curl", "-sS", "--cacert", str(cluster.client_ca), *extra]
    for i, path in enumerate(paths):
        argv += [f"https://{vip}{path}", "-o", str(out_dir / f"{i}.body")]
        argv += ["-w", "%{num_connects} %{http_code} %{size_download}\\n"]
    return cluster.lab.popen(
        "client", argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def curl_results(proc: subprocess.Popen[str], n: int) -> list[tuple[int, int, int]]:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    rows = [tuple(int(x) for x in line.split()) for line in out.splitlines()]
    assert len(rows) == n, out
    return rows  # type: ignore[return-value]


def flow_after(cluster: Cluster, before: set[str], port: int = HTTPS) -> str:
    return cluster.wait_new_flow(before, port)["flow"]


def test_curl_keepalive_loop_across_moves(env: tuple[Cluster, Backends], tmp_path: Path) -> None:
    """curl fetches 24 files on one connection (4 a second) while it moves a -> b -> a."""
    cluster, _ = env
    names = ["1k.bin", "64k.bin", "1m.bin"] * 8
    before = {f["flow"] for f in cluster.flows()}
    proc = curl(cluster, tmp_path, [f"/{n}" for n in names], "--rate", "4/s")
    flow = flow_after(cluster, before)
    for target in ("b", "a", "b"):
        time.sleep(1.2)
        report = cluster.migrate(flow, target)
        assert report["outcome"] == "moved", report
    rows = curl_results(proc, len(names))
    assert sum(r[0] for r in rows) == 1, f"curl connected more than once: {rows}"
    assert all(r[1] == 200 for r in rows), rows
    for i, name in enumerate(names):
        assert sha((tmp_path / f"{i}.body").read_bytes()) == file_sha256(name), name


# --- (c) a move asked mid-response waits for the boundary ------------------------------------
def test_move_asked_during_a_20mb_response_happens_after_it(
    env: tuple[Cluster, Backends], tmp_path: Path
) -> None:
    cluster, backends = env
    before = {f["flow"] for f in cluster.flows()}
    # 20 MB at 8 MB/s: about 2.5 s; then a second request on the same connection.
    proc = curl(cluster, tmp_path, ["/20m.bin", "/64k.bin"], "--limit-rate", "8M")
    flow = flow_after(cluster, before)
    time.sleep(0.5)
    report = cluster.migrate(flow, "b", "--timeout", "20")
    rows = curl_results(proc, 2)
    assert report["outcome"] == "moved", report
    waited = next(s for s in report["timeline"] if s["step"] == "quiesced")
    assert waited["waited_ms"] > 1000, report["timeline"]  # it waited for the response
    assert [r[:2] for r in rows] == [(1, 200), (0, 200)]
    assert sha((tmp_path / "0.body").read_bytes()) == file_sha256("20m.bin")
    assert sha((tmp_path / "1.body").read_bytes()) == file_sha256("64k.bin")
    # a served the whole 20 MB; b served the next request, on the moved connection.
    big = [r for r in backends.nginx.access_log("a") if r["uri"] == "/20m.bin"]
    assert big and big[-1]["status"] == "200" and int(big[-1]["bytes"]) == 20 << 20
    assert [r["uri"] for r in backends.nginx.access_log("b")][-1] == "/64k.bin"


# --- (d) a request that outlasts --timeout ----------------------------------------------------
def test_request_outlasting_the_timeout_rolls_back_intact(env: tuple[Cluster, Backends]) -> None:
    cluster, _ = env
    conn = keepalive(cluster)
    flow = flow_of(conn)
    result: dict[str, Any] = {}

    def slow_request() -> None:
        result["answer"] = get(conn, "/app/delay/3")

    thread = threading.Thread(target=slow_request)
    thread.start()
    time.sleep(0.3)
    report = cluster.migrate(flow, "b", "--timeout", "1")
    thread.join(30)
    assert report["outcome"] == "rolled-back", report
    assert "still in flight after 1 s" in report["error"], report
    assert "nothing was frozen" in report["error"], report
    assert result["answer"][:2] == (200, b"slept\n")
    assert result["answer"][2]["x-backend"] == "a"
    assert cluster.owner(flow) == "a"
    status, body, _ = get(conn, "/64k.bin")  # the same connection goes on
    assert (status, sha(body)) == (200, file_sha256("64k.bin"))
    report = cluster.migrate(flow, "b")  # and moves once it is between requests
    assert report["outcome"] == "moved", report
    status, body, headers = get(conn, "/1k.bin")
    assert (status, sha(body), headers["x-backend"]) == (200, file_sha256("1k.bin"), "b")
    conn.close()


# --- (e) WebSocket: not movable ----------------------------------------------------------------
def websocket(cluster: Cluster) -> ssl.SSLSocket:
    vip = str(cluster.lab.plan.vip(4))
    context = ssl.create_default_context(cafile=str(cluster.client_ca))

    def connect() -> ssl.SSLSocket:
        raw = socket.create_connection((vip, WS), 10)
        return context.wrap_socket(raw, server_hostname=vip)

    sock = cluster.lab.call("client", connect)
    key = base64.b64encode(os.urandom(16))
    sock.sendall(
        b"GET /chat HTTP/1.1\r\nHost: vip\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + key + b"\r\n\r\n"
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 101 "), head
    accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())  # noqa: S324
    assert b"Sec-WebSocket-Accept: " + accept in head, head
    return sock


def ws_echo(sock: ssl.SSLSocket, text: bytes) -> bytes:
    mask = os.urandom(4)
    sock.sendall(
        bytes([0x81, 0x80 | len(text)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(text))
    )
    frame = b""
    while len(frame) < 2 + len(text):
        frame += sock.recv(4096)
    assert frame[:2] == bytes([0x81, len(text)]), frame
    return frame[2:]


def test_websocket_upgrade_is_not_movable(env: tuple[Cluster, Backends]) -> None:
    cluster, _ = env
    sock = websocket(cluster)
    flow = f"{sock.getsockname()[0]}:{sock.getsockname()[1]}-{cluster.lab.plan.vip(4)}:{WS}"
    assert ws_echo(sock, b"hello") == b"hello"
    report = cluster.migrate(flow, "b")
    assert report["outcome"] == "not-movable", report
    assert "Upgrade tunnel (websocket)" in report["error"], report
    assert report["exit"] == 1
    assert cluster.owner(flow) == "a"
    assert ws_echo(sock, b"still here") == b"still here"
    row = next(f for f in cluster.flows() if f["flow"] == flow)
    assert row["proxy"]["state"] == "tunnel" and row["proxy"]["not_movable"], row
    sock.close()


# --- (f) the target's backend is down -----------------------------------------------------------
def test_target_backend_down_keeps_the_connection_on_its_host(
    env: tuple[Cluster, Backends],
) -> None:
    cluster, backends = env
    conn = keepalive(cluster)
    flow = flow_of(conn)
    assert get(conn, "/1k.bin")[0] == 200
    backends.nginx.stop("b")
    try:
        report = cluster.migrate(flow, "b")
        assert report["outcome"] == "rolled-back", report
        assert "backend 127.0.0.1:8080 is not reachable here: Connection refused" in report["error"]
        assert cluster.owner(flow) == "a"
        status, body, headers = get(conn, "/64k.bin")
        assert (status, sha(body), headers["x-backend"]) == (200, file_sha256("64k.bin"), "a")
    finally:
        backends.nginx.start("b")
    assert cluster.migrate(flow, "b")["outcome"] == "moved"
    status, body, headers = get(conn, "/64k.bin")
    assert (status, sha(body), headers["x-backend"]) == (200, file_sha256("64k.bin"), "b")
    conn.close()


# --- PROXY v2 and the tcp protocol ------------------------------------------------------------
def test_proxy_protocol_v2_gives_the_backend_the_client_address_on_both_hosts(
    env: tuple[Cluster, Backends],
) -> None:
    cluster, backends = env
    conn = keepalive(cluster, HTTPS_PP)
    flow = flow_of(conn)
    client_ip = flow.split(":", 1)[0]
    assert get(conn, "/1k.bin?pp=a")[2]["x-backend"] == "a"
    assert cluster.migrate(flow, "b")["outcome"] == "moved"
    assert get(conn, "/1k.bin?pp=b")[2]["x-backend"] == "b"
    conn.close()
    for host in ("a", "b"):
        row = next(r for r in backends.nginx.access_log(host) if r["uri"] == f"/1k.bin?pp={host}")
        assert row["client"] == client_ip, row  # not 127.0.0.1: nginx read the header
        assert row["xff"] == "-", row  # with PROXY v2 no X-Forwarded-For by default


def test_tcp_protocol_moves_after_both_directions_are_idle(env: tuple[Cluster, Backends]) -> None:
    """HTTP to waitress through a ``tcp`` proxy: pysteer sees only bytes, and moves the
    connection once it has been quiet for idle_ms (100 ms here)."""
    cluster, backends = env
    conn = keepalive(cluster, TCP, tls=False)
    flow = flow_of(conn)
    where = "a"
    for _ in range(4):
        status, body, headers = get(conn, "/bytes/300000")
        assert (status, len(body), headers["x-app-host"]) == (200, 300000, where)
        report = cluster.migrate(flow, other(where))
        assert report["outcome"] == "moved", report
        where = other(where)
    conn.close()
    assert sum(1 for line in backends.app_log("b") if "/bytes/300000" in line) >= 2


def test_a_backend_silent_past_read_timeout_gets_the_client_a_504(
    env: tuple[Cluster, Backends],
) -> None:
    cluster, _ = env
    conn = keepalive(cluster, HTTPS_QUICK)
    status, body, _ = get(conn, "/64k.bin")  # a quick answer is not affected
    assert (status, sha(body)) == (200, file_sha256("64k.bin"))
    conn.request("GET", "/app/delay/3")  # read_timeout = 1
    response = conn.getresponse()
    assert response.status == 504
    assert response.read() == b"pysteer: the backend did not answer in time\n"
    assert response.getheader("Connection") == "close"
    assert conn.sock is None  # http.client closed it, as told
    conn.close()
    assert "sent nothing for 1 s during a request; answering 504" in cluster.log("a")


# --- faults at each side of a proxy connection's move ---------------------------------------
def backend_links(cluster: Cluster, host: str) -> int:
    """Established connections to the host's nginx (pysteer's backend connections)."""
    out = cluster.lab.run(host, ["ss", "-Htn", "state", "established", f"( dport = :{NGINX} )"])
    return len(out.stdout.splitlines())


def restart(cluster: Cluster, node: str, fault: str | None = None) -> None:
    cluster.stop(node)
    cluster.start_agent(node, fault=fault)


@pytest.mark.parametrize(
    ("fault", "error"), [("thaw:fail", "injected fault"), ("thaw:exit", "connection lost")]
)
def test_target_failing_after_it_opened_its_backend_leaves_nothing_behind(
    env: tuple[Cluster, Backends], fault: str, error: str
) -> None:
    """b opens its backend connection, then fails (or dies) before the commit: the
    connection goes on from a, and b keeps no backend connection for it."""
    cluster, _ = env
    restart(cluster, "b", fault)
    try:
        conn = keepalive(cluster)
        flow = flow_of(conn)
        assert get(conn, "/1k.bin")[0] == 200
        before = backend_links(cluster, "b")
        report = cluster.migrate(flow, "b")
        assert report["outcome"] == "rolled-back", report
        assert error in report["error"], report
        assert cluster.owner(flow) == "a"
        status, body, headers = get(conn, "/64k.bin")
        assert (status, sha(body), headers["x-backend"]) == (200, file_sha256("64k.bin"), "a")
        deadline = time.monotonic() + 5
        while backend_links(cluster, "b") > before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert backend_links(cluster, "b") == before, "b kept the backend connection it opened"
    finally:
        restart(cluster, "b")
    assert cluster.migrate(flow, "b")["outcome"] == "moved"
    assert get(conn, "/1k.bin")[2]["x-backend"] == "b"
    conn.close()


def test_source_export_failing_while_held_lets_the_connection_go_on(
    env: tuple[Cluster, Backends],
) -> None:
    """a's export fails after the dump, with the connection held at its boundary: a thaws
    it, lets it read its client again, and it serves the next request."""
    cluster, _ = env
    restart(cluster, "a", "export:fail")
    try:
        conn = keepalive(cluster)
        flow = flow_of(conn)
        assert get(conn, "/1k.bin")[0] == 200
        report = cluster.migrate(flow, "b")
        assert report["outcome"] == "rolled-back", report
        assert "export failed" in report["error"], report
        for name in ("64k.bin", "1m.bin"):
            status, body, headers = get(conn, f"/{name}")
            assert (status, sha(body), headers["x-backend"]) == (200, file_sha256(name), "a")
        conn.close()
    finally:
        restart(cluster, "a")


def test_source_killed_while_its_move_waits_for_the_boundary(
    env: tuple[Cluster, Backends],
) -> None:
    """a is killed while a move waits for a request to end (the quiesce step): the CLI
    answers at once with the reason, nothing was parked at the steering node, and a
    restarted a serves again. The connection died with its host, as any would."""
    cluster, _ = env
    conn = keepalive(cluster)
    flow = flow_of(conn)
    failed: list[BaseException] = []

    def slow_request() -> None:
        try:
            get(conn, "/app/delay/5")
        except (OSError, http.client.HTTPException) as exc:
            failed.append(exc)

    thread = threading.Thread(target=slow_request)
    thread.start()
    time.sleep(0.3)
    argv = [sys.executable, "-m", "pysteer", "migrate", "--flow", flow, "--to", "b"]
    migrate = subprocess.Popen(
        [*argv, "--timeout", "20", "--config", str(cluster.config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.5)  # the move now waits for the request's end
    cluster.procs["a"].kill()
    try:
        _, err = migrate.communicate(timeout=30)
        thread.join(30)
        assert migrate.returncode == 3 and "Traceback" not in err, err
        assert "node a is down" in err, err
        assert failed, "the request on the killed host did not fail"
        assert cluster.steer_row(flow) is None  # the quiesce step parks nothing
    finally:
        restart(cluster, "a")
    fresh = keepalive(cluster)
    status, body, headers = get(fresh, "/64k.bin")
    assert (status, sha(body), headers["x-backend"]) == (200, file_sha256("64k.bin"), "a")
    fresh.close()


# --- (b) a drain under load: last, it leaves a drained ---------------------------------------
def wrk_counts(output: str) -> dict[str, int]:
    """wrk's summary: requests, and its error lines (printed only when not zero)."""
    counts = {"requests": int(re.search(r"(\d+) requests in", output)[1])}  # type: ignore[index]
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    counts["socket_errors"] = sum(int(x) for x in errors.groups()) if errors else 0
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    counts["non_2xx"] = int(non2xx[1]) if non2xx else 0
    return counts


def test_drain_under_wrk_load_keeps_every_connection(env: tuple[Cluster, Backends]) -> None:
    """200 keep-alive connections under wrk, and a WebSocket, drained from a to b."""
    cluster, backends = env
    vip = str(cluster.lab.plan.vip(4))
    ws = websocket(cluster)
    before_b = len(backends.nginx.access_log("b"))
    wrk = cluster.lab.popen(
        "client",
        ["wrk", "-t2", "-c200", "-d10s", "--timeout", "5s", f"https://{vip}/1k.bin"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 20
    while True:
        on_a = [f for f in cluster.flows() if f["node"] == "a" and f["flow"].endswith(":443")]
        if len(on_a) == 200:
            break
        assert time.monotonic() < deadline, f"{len(on_a)} of wrk's 200 connections came"
        time.sleep(0.2)
    time.sleep(1.5)  # under load for a while first
    out = cluster.cli("drain", "--from", "a", "--to", "b", "--json", timeout=120)
    summary = json.loads(out.stdout)
    assert summary["moved"] >= 200 and summary["failed"] == 0, summary
    assert summary["not_movable"] == 1, summary
    ws_flow = f"{ws.getsockname()[0]}:{ws.getsockname()[1]}-{vip}:{WS}"
    assert summary["remaining"] == [ws_flow], summary
    assert summary["not_movable_flows"][0]["flow"] == ws_flow
    assert "Upgrade tunnel" in summary["not_movable_flows"][0]["reason"]
    on_b = {f["flow"] for f in cluster.flows() if f["node"] == "b" and f["flow"].endswith(":443")}
    assert on_b == {f["flow"] for f in on_a}, "not the same 200 connections on b"
    text, _ = wrk.communicate(timeout=60)
    counts = wrk_counts(text)
    assert counts["socket_errors"] == 0 and counts["non_2xx"] == 0, text
    assert counts["requests"] > 1000, text
    served_by_b = len(backends.nginx.access_log("b")) - before_b
    assert served_by_b > 100, "b's nginx served none of the later requests"
    assert ws_echo(ws, b"after the drain") == b"after the drain"  # the tunnel stayed on a
    ws.close()
    assert cluster.cli("undrain", "--node", "a").returncode == 0
