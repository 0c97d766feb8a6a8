"""A TLS connection continues in another process, over and over, at random byte points:
``export_state()`` -> msgpack -> a different process, which receives the socket's fd over
SCM_RIGHTS. The client (Python ssl) checks an intact numbered-line echo stream."""

import random
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import pytest
from conftest import Pki
from helpers.tls_worker import MAX_MESSAGE, serve_budget
from test_tls_clients import SUITES

from pysteer.tls import ServerConfig, TlsServerConnection

HOPS = 100
TESTS_DIR = Path(__file__).resolve().parents[1]
MIGRATION_SUITES = [
    s
    for s in SUITES
    if s[0]
    in {
        "TLS_AES_128_GCM_SHA256",
        "TLS_AES_256_GCM_SHA384",
        "TLS_CHACHA20_POLY1305_SHA256",
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
        "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
    }
]


class Worker:
    def __init__(self) -> None:
        self.ctl, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "helpers.tls_worker", str(child.fileno())],
            pass_fds=[child.fileno()],
            cwd=TESTS_DIR,
        )
        child.close()
        self.ctl.settimeout(30)

    def hop(self, state: dict, fd: int, job: dict) -> tuple[dict, int]:
        socket.send_fds(self.ctl, [msgpack.packb({"state": state, **job})], [fd])
        message, fds, _flags, _addr = socket.recv_fds(self.ctl, MAX_MESSAGE, 1)
        assert fds, f"worker {self.proc.pid} returned no socket: {message[:80]!r}"
        return msgpack.unpackb(message), fds[0]

    def close(self) -> None:
        self.ctl.send(b"quit")
        self.proc.wait(10)
        self.ctl.close()


class LineClient:
    """Sends numbered lines (sometimes in bursts) and checks their echo, in order.

    One thread does both: an OpenSSL connection must not be read and written at once.
    """

    def __init__(self, tls: ssl.SSLSocket, seed: int) -> None:
        self.tls, self.rng = tls, random.Random(seed)  # noqa: S311
        self.sent = 0
        self.echoed = 0
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self._buf = b""

    def line(self, n: int) -> bytes:
        return b"%08d %s\n" % (n, b"x" * (n % 97))

    def _run(self) -> None:
        try:
            while not self.stop.is_set() or self.echoed < self.sent:
                if not self.stop.is_set() and self.sent - self.echoed < 200:
                    burst = self.rng.choice([1, 1, 1, 5, 40])
                    self.tls.sendall(b"".join(self.line(self.sent + i) for i in range(burst)))
                    self.sent += burst
                self._read()
        except BaseException as exc:
            self.error = exc

    def _read(self) -> None:
        self.tls.settimeout(0.002)
        try:
            chunk = self.tls.recv(65536)
        except TimeoutError:
            return
        finally:
            self.tls.settimeout(30)
        if not chunk:
            raise EOFError("server closed")
        self._buf += chunk
        while b"\n" in self._buf:
            got, self._buf = self._buf.split(b"\n", 1)
            if got != self.line(self.echoed)[:-1]:
                raise AssertionError(f"line {self.echoed}: got {got[:40]!r}")
            self.echoed += 1


@pytest.mark.timeout(300)
@pytest.mark.parametrize("suite", MIGRATION_SUITES, ids=[s[0] for s in MIGRATION_SUITES])
def test_connection_hops_between_processes(pki: Pki, suite: tuple) -> None:
    rng = random.Random(suite[0])  # noqa: S311 - reproducible hop points
    cfg = ServerConfig(
        pki.servers["ecdsa"].chain_pem, pki.servers["ecdsa"].key_pem, suites=[suite[0]]
    )
    listener = socket.create_server(("127.0.0.1", 0))
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    raw = socket.create_connection(listener.getsockname())
    server_sock, _ = listener.accept()
    listener.close()
    server_sock.settimeout(20)
    conn = TlsServerConnection(cfg)
    handshake = threading.Thread(
        target=lambda: setattr(handshake, "tls", ctx.wrap_socket(raw, server_hostname="localhost"))
    )
    handshake.start()
    while conn.phase == "handshake":
        conn.receive_data(server_sock.recv(65536))
        server_sock.sendall(conn.data_to_send())
    handshake.join(10)
    tls = handshake.tls
    tls.settimeout(30)
    client = LineClient(tls, rng.randrange(1 << 30))
    client.thread.start()
    workers = [Worker(), Worker()]
    key_updates = mid_record = 0
    try:
        serve_budget(server_sock, conn, 2000, rng)
        state, fd = conn.export_state(), server_sock.detach()
        for hop in range(HOPS):
            key_update = conn.info.version == "TLSv1.3" and rng.random() < 0.2
            key_updates += key_update
            job = {
                "budget": rng.randint(1, 2500),
                "seed": rng.randrange(1 << 30),
                "key_update": key_update,
            }
            new_state, new_fd = workers[hop % 2].hop(state, fd, job)
            socket.close(fd)  # the worker had its own copy
            state, fd = new_state, new_fd
            mid_record += bool(state["rx"])  # exported with part of a record received
            assert client.error is None, client.error
        final = TlsServerConnection.from_state(state)
        last = socket.socket(fileno=fd)
        client.stop.set()
        serve_budget(last, final, 0, rng)  # whatever arrived during the last export
        deadline = time.monotonic() + 20
        while client.echoed < client.sent and time.monotonic() < deadline:
            last.settimeout(0.05)
            try:
                data = last.recv(65536)
            except TimeoutError:
                continue
            for event in final.receive_data(data):
                if hasattr(event, "data"):
                    final.send(event.data)
            last.sendall(final.data_to_send())
        client.thread.join(10)
        assert client.error is None, client.error
        assert client.echoed == client.sent > HOPS
        last.close()
    finally:
        for worker in workers:
            worker.close()
        tls.close()
    assert mid_record > HOPS // 4
    if conn.info.version == "TLSv1.3":
        assert key_updates > 5
