"""Moving a live server socket between lab hosts, and the traffic that checks nothing broke.

``Mover`` does what the agents will later do, with an nftables lock instead of parking:
lock the flow on the old host, dump, send the state through msgpack, restore on the new
host, point the steering node's VIP route at it, release the old socket, unlock.
``EchoServer`` and ``Client`` carry byte-counted, hashed streams both ways across moves.
"""

from __future__ import annotations

import hashlib
import queue
import random
import selectors
import socket
import ssl
import threading
import time

import msgpack
from pyroute2 import IPRoute

from helpers.flowlock import FlowLock
from pysteer import tcp
from pysteer.lab import Lab
from pysteer.lab.clients import RstCapture, netstat  # noqa: F401 - re-exported


def wire_round_trip(state: tcp.TcpState) -> tcp.TcpState:
    return tcp.TcpState.from_wire(msgpack.unpackb(msgpack.packb(state.to_wire())))


def _replace_route(dst: str, gateway: str) -> None:
    # pyroute2 0.9 talks to the namespace of the thread that *uses* IPRoute: use it here.
    with IPRoute() as ipr:
        ipr.route("replace", dst=dst, gateway=gateway)


class Mover:
    def __init__(self, lab: Lab, family: int = 4) -> None:
        self.lab = lab
        self.family = family
        self.locks = FlowLock(lab, lab.plan.hosts)
        self.host = lab.plan.default_host
        self.moves = 0
        self.last_state: tcp.TcpState | None = None

    def close(self) -> None:
        self.route_to(self.lab.plan.default_host)

    def route_to(self, host: str) -> None:
        end = self.lab.plan.link(host).peer_end
        vip = self.lab.plan.vip(self.family)
        gateway = end.v4.ip if self.family == 4 else end.v6.ip
        prefix = 32 if self.family == 4 else 128
        self.lab.call("steer", _replace_route, f"{vip}/{prefix}", str(gateway))

    def other(self) -> str:
        return next(h for h in self.lab.plan.hosts if h != self.host)

    def move(self, sock: socket.socket, to: str | None = None) -> socket.socket:
        src, dst = self.host, to or self.other()
        local, peer = sock.getsockname(), sock.getpeername()
        flow = (peer[0], peer[1], local[0], local[1])
        self.locks.lock(src, flow)
        try:
            state = tcp.dump(sock)
        except BaseException:
            self.locks.unlock(src, flow)
            raise
        self.last_state = state
        try:
            new = self.lab.call(dst, tcp.restore, wire_round_trip(state))
        except BaseException:
            tcp.resume(sock)
            self.locks.unlock(src, flow)
            raise
        self.route_to(dst)
        tcp.release(sock)
        self.locks.unlock(src, flow)
        self.host = dst
        self.moves += 1
        return new


class EchoServer(threading.Thread):
    """Echoes everything back; between reads it performs the moves asked of it."""

    def __init__(self, sock: socket.socket, mover: Mover) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.mover = mover
        self.received = hashlib.sha256()
        self.nreceived = 0
        self.requests: queue.Queue[threading.Event] = queue.Queue()
        self.error: BaseException | None = None
        self.finished = threading.Event()
        self.timeout = 20.0

    def request_move(self, timeout: float = 30) -> None:
        done = threading.Event()
        self.requests.put(done)
        deadline = time.monotonic() + timeout
        while not done.wait(0.05):
            if self.error:
                raise self.error
            if self.finished.is_set() or time.monotonic() > deadline:
                raise TimeoutError("the server did not perform the move")
        if self.error:
            raise self.error

    def run(self) -> None:
        try:
            self._serve()
        except BaseException as exc:
            self.error = exc
        finally:
            self.finished.set()
            while not self.requests.empty():
                self.requests.get().set()

    def _serve(self) -> None:
        self.sock.settimeout(self.timeout)
        while True:
            while not self.requests.empty():
                done = self.requests.get()
                self.sock = self.mover.move(self.sock)
                self.sock.settimeout(self.timeout)
                done.set()
            with selectors.DefaultSelector() as sel:
                sel.register(self.sock, selectors.EVENT_READ)
                if not sel.select(0.005):
                    continue
            data = self.sock.recv(65536)
            if not data:
                self.sock.shutdown(socket.SHUT_WR)
                return
            self.received.update(data)
            self.nreceived += len(data)
            self.sock.sendall(data)


class Client:
    """Writes a seeded random stream in a given pattern and reads the echo back.

    A writer and a reader thread share the socket: fine for plain TCP (the kernel allows a
    send and a recv at once), never for TLS (OpenSSL does not), so an SSLSocket is refused.
    """

    def __init__(
        self, sock: socket.socket, pattern: str, total: int | None = None, seed: int = 1
    ) -> None:
        if isinstance(sock, ssl.SSLSocket):
            raise TypeError("Client shares its socket between two threads: plain TCP only")
        self.sock = sock
        self.total = total
        self.pattern = pattern
        self.rng = random.Random(seed)  # noqa: S311 - test data, not crypto
        self.sent = hashlib.sha256()
        self.got = hashlib.sha256()
        self.nsent = 0
        self.ngot = 0
        self.errors: list[BaseException] = []
        self.stop = threading.Event()
        self.writer = threading.Thread(target=self._guard(self._write), daemon=True)
        self.reader = threading.Thread(target=self._guard(self._read), daemon=True)

    def _guard(self, fn):
        def run() -> None:
            try:
                fn()
            except BaseException as exc:
                self.errors.append(exc)

        return run

    def start(self) -> Client:
        self.sock.settimeout(30)
        self.writer.start()
        self.reader.start()
        return self

    def _chunk(self) -> bytes:
        # bulk, or small bursts with Nagle on
        size = 65536 if self.pattern == "bulk" else self.rng.randint(1, 120)
        if self.total is not None:
            size = min(size, self.total - self.nsent)
        return self.rng.randbytes(size)

    def _write(self) -> None:
        while not self.stop.is_set() and (self.total is None or self.nsent < self.total):
            data = self._chunk()
            self.sock.sendall(data)
            self.sent.update(data)
            self.nsent += len(data)
            if self.pattern == "bursts" and self.rng.random() < 0.3:
                time.sleep(0.001)
        self.sock.shutdown(socket.SHUT_WR)

    def _read(self) -> None:
        while True:
            data = self.sock.recv(1 << 20)
            if not data:
                return
            self.got.update(data)
            self.ngot += len(data)

    def join(self, timeout: float = 120) -> None:
        self.writer.join(timeout)
        self.reader.join(timeout)
        if self.writer.is_alive() or self.reader.is_alive():
            raise TimeoutError(f"client still running: sent {self.nsent}, got {self.ngot}")


def listen(family: int, addr: str, port: int) -> socket.socket:
    srv = socket.socket(family, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((addr, port))
    srv.listen()
    return srv


def connect(family: int, addr: str, port: int, *, mss: int | None = None) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    if mss:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, mss)
    sock.settimeout(10)
    sock.connect((addr, port))
    return sock
