"""The app runtime serves real clients, and a connection moves between two runtimes:
export (pause, freeze, snapshot) in one, adopt (restore, continue) in the other."""

import asyncio
import re
import socket
import ssl
import threading
import time
from collections.abc import Iterator

import pytest
from conftest import Pki
from helpers.flowlock import NftDrop

from pysteer import netns, tcp
from pysteer.app.runtime import Runtime, Service
from pysteer.tls import ServerConfig

PORT = 7300


class Loop:
    """An asyncio loop in a thread inside a network namespace."""

    def __init__(self, ns: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=netns.call_in, args=(ns, self._run), daemon=True)
        self.thread.start()
        self.ready.wait(5)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self.ready.set)
        self.loop.run_forever()

    def call(self, coro_or_fn, *args):
        if asyncio.iscoroutine(coro_or_fn):
            return asyncio.run_coroutine_threadsafe(coro_or_fn, self.loop).result(10)

        async def wrap():
            return coro_or_fn(*args)

        return asyncio.run_coroutine_threadsafe(wrap(), self.loop).result(10)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def loop(scratch_netns: str) -> Iterator[Loop]:
    lp = Loop(scratch_netns)
    yield lp
    lp.stop()


class TickerClient:
    """Sends numbered lines and checks 'echo N line' and 'tick N' keep counting."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.sent, self.echoes, self.ticks = sock, 0, 0, 0
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        buf = b""
        try:
            self.sock.settimeout(0.005)
            while not self.stop.is_set() or self.echoes < self.sent:
                if not self.stop.is_set() and self.sent - self.echoes < 5:
                    self.sent += 1
                    self.sock.sendall(b"line %d\n" % self.sent)
                try:
                    chunk = self.sock.recv(65536)
                except (TimeoutError, ssl.SSLWantReadError):
                    continue
                if not chunk:
                    raise EOFError("server closed")
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    self._check(line)
        except BaseException as exc:
            self.error = exc

    def _check(self, line: bytes) -> None:
        if line == b"ticker ready":
            return
        if m := re.fullmatch(rb"tick (\d+)", line):
            assert int(m[1]) == self.ticks + 1, f"tick {m[1]} after {self.ticks}"
            self.ticks += 1
        elif m := re.fullmatch(rb"echo (\d+) line (\d+)", line):
            assert int(m[1]) == int(m[2]) == self.echoes + 1, line
            self.echoes += 1
        else:
            raise AssertionError(f"unexpected line {line!r}")


@pytest.mark.parametrize("use_tls", [False, True], ids=["tcp", "tls"])
def test_connection_moves_between_runtimes(
    scratch_netns: str, loop: Loop, pki: Pki, use_tls: bool
) -> None:
    tls = (
        ServerConfig(pki.servers["ecdsa"].chain_pem, pki.servers["ecdsa"].key_pem)
        if use_tls
        else None
    )
    port = PORT + use_tls  # sockets of the other case may still hold PORT (TIME_WAIT)
    services = [Service(port, "ticker", tls=tls, tick=0.02)]
    here, there = Runtime(services, "127.0.0.1"), Runtime(services, "127.0.0.1")
    loop.call(here.start())
    raw = netns.call_in(scratch_netns, socket.create_connection, ("127.0.0.1", port))
    sock = raw
    if use_tls:
        ctx = ssl.create_default_context(cafile=str(pki.ca_file))
        sock = ctx.wrap_socket(raw, server_hostname="localhost")
    client = TickerClient(sock)
    client.thread.start()
    drop = NftDrop(scratch_netns, hook="prerouting")
    moves = 0
    try:
        for n in range(10):
            time.sleep(0.1)
            src, dst = (here, there) if n % 2 == 0 else (there, here)
            (conn_id,) = list(src.connections)
            flow = (*sock.getsockname()[:2], *sock.getpeername()[:2])
            drop.add(flow)  # the lock: from before the freeze until the new socket exists
            exported = loop.call(src.export(conn_id))
            tcp.release(exported.sock)
            loop.call(dst.adopt, exported)
            drop.remove(flow)
            moves += 1
            assert client.error is None, client.error
        # The ticker keeps counting after the last move (the test's nft lock drops packets,
        # so a few ticks may come late; parking, not this lock, is what makes moves lossless).
        after = client.ticks
        deadline = time.monotonic() + 10
        while client.ticks < after + 2 and client.error is None:
            assert time.monotonic() < deadline, f"ticks stuck at {client.ticks}"
            time.sleep(0.01)
        client.stop.set()
        client.thread.join(10)
        assert client.error is None, client.error
        assert client.echoes == client.sent > 10
        assert moves == 10
    finally:
        client.stop.set()
        loop.call(here.close())
        loop.call(there.close())
        sock.close()


def test_export_then_resume_is_a_rollback(scratch_netns: str, loop: Loop) -> None:
    """A move that fails after the freeze: the same runtime resumes the connection."""
    services = [Service(PORT + 2, "echo", tick=0.02)]
    rt = Runtime(services, "127.0.0.1")
    loop.call(rt.start())
    client = netns.call_in(scratch_netns, socket.create_connection, ("127.0.0.1", PORT + 2))
    client.settimeout(5)
    try:
        client.sendall(b"before\n")
        assert client.recv(100) == b"before\n"
        drop = NftDrop(scratch_netns, hook="prerouting")
        flow = (*client.getsockname()[:2], *client.getpeername()[:2])
        drop.add(flow)
        (conn_id,) = list(rt.connections)
        exported = loop.call(rt.export(conn_id))
        assert rt.connections == {}
        assert exported.meta["bytes_in"] == 7
        loop.call(rt.resume, exported)
        drop.remove(flow)
        client.sendall(b"after the rollback\n")
        got = b""
        while not got.endswith(b"rollback\n"):
            got += client.recv(100)
        assert got == b"after the rollback\n"
        assert len(rt.connections) == 1
    finally:
        loop.call(rt.close())
        client.close()
