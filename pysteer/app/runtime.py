"""The app runtime: an asyncio server whose connections can leave and arrive mid-stream.

Each connection is a socket, an optional TLS connection (pysteer's record layer) and a
handler. ``export(conn_id)`` pauses one connection at a safe point, freezes its socket
(TCP_REPAIR) and returns everything another runtime needs; ``adopt(...)`` continues it.
Bytes the connection owed the peer but had not yet handed to the socket travel as
``pending`` and are sent first on arrival, so nothing is lost or repeated.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pysteer import tcp
from pysteer.app.handlers import Handler, load_handler
from pysteer.steer.flow import Flow
from pysteer.tls import (
    ConnectionClosed,
    DataReceived,
    HandshakeComplete,
    KeyUpdated,
    ServerConfig,
    TlsServerConnection,
)

_ids = itertools.count(1)
LOW_WATER = 256 * 1024  # refill the output from the handler's pull() below this
PULL_CHUNK = 64 * 1024
PAUSE_TIMEOUT = 1.0  # seconds for a connection's task to stop at a safe point


@dataclass
class Service:
    """What the runtime serves on one port: a handler class, over TLS or plain TCP."""

    port: int
    app: str
    tls: ServerConfig | None = None
    tick: float = 0.05  # seconds between on_tick calls


@dataclass
class Connection:
    id: int
    sock: socket.socket
    service: Service
    handler: Handler
    tls: TlsServerConnection | None
    created: float = field(default_factory=time.time)
    bytes_in: int = 0
    bytes_out: int = 0
    out: bytearray = field(default_factory=bytearray)  # owed to the peer, not yet sent
    task: asyncio.Task | None = None
    closed: bool = False
    flow: Flow | None = None
    key_updates: int = 0  # the peer's TLS 1.3 KeyUpdates since the connection came here

    def __post_init__(self) -> None:
        with contextlib.suppress(OSError):
            self.flow = Flow.of_server_socket(self.sock.getsockname(), self.sock.getpeername())

    def describe(self) -> dict[str, Any]:
        local, peer = self.sock.getsockname(), self.sock.getpeername()
        info = self.tls.info if self.tls else None
        return {
            "id": self.id,
            "local": [local[0], local[1]],
            "peer": [peer[0], peer[1]],
            "tls": {"version": info.version, "suite": info.suite, "key_updates": self.key_updates}
            if info
            else None,
            "age": round(time.time() - self.created, 3),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "app": self.service.app,
            "flow": str(self.flow) if self.flow else None,
        }


@dataclass(frozen=True)
class Exported:
    """A connection that left: its frozen socket stays here until ``release``/``resume``."""

    sock: socket.socket
    tcp: tcp.TcpState
    tls: dict[str, Any] | None
    app: Any
    pending: bytes
    service_port: int
    meta: dict[str, Any]


async def _readable(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, timeout: float | None
) -> bool:
    """Wait until ``sock`` has something to read, or ``timeout``. Reads nothing itself,
    so cancelling it (export pauses a connection so) can never lose received bytes —
    unlike ``wait_for(sock_recv())``, whose cancellation Python 3.11 can swallow."""
    fut = loop.create_future()

    def wake(value: bool) -> None:
        if not fut.done():
            fut.set_result(value)

    fd = sock.fileno()
    loop.add_reader(fd, wake, True)
    timer = loop.call_later(timeout, wake, False) if timeout is not None else None
    try:
        return await fut
    finally:
        loop.remove_reader(fd)
        if timer is not None:
            timer.cancel()


class Runtime:
    def __init__(self, services: list[Service], address: str | list[str]) -> None:
        self.services = {s.port: s for s in services}
        self.addresses = [address] if isinstance(address, str) else list(address)
        self.connections: dict[int, Connection] = {}
        self._by_flow: dict[Flow, Connection] = {}  # find() is on every migration's path
        self._listeners: list[socket.socket] = []
        self._tasks: list[asyncio.Task] = []
        self.on_close: Callable[[Connection], None] | None = None

    # --- serving ---------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for service in self.services.values():
            for address in self.addresses:
                family = socket.AF_INET6 if ":" in address else socket.AF_INET
                listener = socket.socket(family, socket.SOCK_STREAM)
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                listener.bind((address, service.port))
                listener.listen(1024)
                listener.setblocking(False)
                self._listeners.append(listener)
                self._tasks.append(loop.create_task(self._accept(listener, service)))

    async def _accept(self, listener: socket.socket, service: Service) -> None:
        loop = asyncio.get_running_loop()
        while True:
            sock, _ = await loop.sock_accept(listener)
            handler = load_handler(service.app)()
            tls = TlsServerConnection(service.tls) if service.tls else None
            conn = Connection(next(_ids), sock, service, handler, tls)
            if tls is None:
                conn.out += handler.on_connect()
            self._run(conn)

    def _run(self, conn: Connection) -> None:
        conn.sock.setblocking(False)
        self.connections[conn.id] = conn
        if conn.flow is not None:
            self._by_flow[conn.flow] = conn
        conn.task = asyncio.get_running_loop().create_task(self._serve(conn))

    def _app_output(self, conn: Connection, data: bytes) -> None:
        if not data:
            return
        if conn.tls is not None:
            conn.tls.send(data)
            conn.out += conn.tls.data_to_send()
        else:
            conn.out += data

    def _feed(self, conn: Connection, data: bytes) -> bool:
        """Process bytes from the peer; False once the connection is over."""
        conn.bytes_in += len(data)
        if conn.tls is None:
            self._app_output(conn, conn.handler.on_data(data))
            return True
        for event in conn.tls.receive_data(data):
            if isinstance(event, DataReceived):
                self._app_output(conn, conn.handler.on_data(event.data))
            elif isinstance(event, ConnectionClosed):
                conn.out += conn.tls.data_to_send()
                return False
            elif isinstance(event, KeyUpdated):
                conn.key_updates += 1
            elif isinstance(event, HandshakeComplete):
                conn.out += conn.tls.data_to_send()
                self._app_output(conn, conn.handler.on_connect())
        conn.out += conn.tls.data_to_send()
        return True

    def _refill(self, conn: Connection) -> None:
        """Take more streamed output from the handler, while little is owed."""
        pull = getattr(conn.handler, "pull", None)
        if pull is None or (conn.tls is not None and conn.tls.phase != "open"):
            return
        while len(conn.out) < LOW_WATER:
            chunk = pull(PULL_CHUNK)
            if not chunk:
                return
            self._app_output(conn, chunk)

    async def _flush(self, conn: Connection) -> None:
        """Send what is owed; ``conn.out`` always holds exactly the unsent rest."""
        loop = asyncio.get_running_loop()
        self._refill(conn)
        while conn.out:
            try:
                sent = conn.sock.send(conn.out)
            except BlockingIOError:
                waiter = loop.create_future()
                loop.add_writer(conn.sock.fileno(), waiter.set_result, None)
                try:
                    await waiter
                finally:
                    loop.remove_writer(conn.sock.fileno())
                continue
            del conn.out[:sent]
            conn.bytes_out += sent
            self._refill(conn)

    async def _serve(self, conn: Connection) -> None:
        loop = asyncio.get_running_loop()
        alive = True
        try:
            await self._flush(conn)
            while alive:
                data = None
                # Handlers without periodic output (TICKS = False) sleep until data comes.
                tick = conn.service.tick if getattr(conn.handler, "TICKS", True) else None
                if await _readable(loop, conn.sock, tick):
                    try:
                        data = conn.sock.recv(65536)
                    except BlockingIOError:
                        data = None
                if data == b"":
                    break
                if data:
                    alive = self._feed(conn, data)
                if conn.tls is None or conn.tls.phase == "open":
                    self._app_output(conn, conn.handler.on_tick(time.monotonic()))
                await self._flush(conn)
        except (ConnectionError, OSError):
            pass
        self._finish(conn)

    def _finish(self, conn: Connection) -> None:
        if conn.closed:
            return
        conn.closed = True
        conn.handler.on_close()
        self._forget(conn)
        conn.sock.close()
        if self.on_close:
            self.on_close(conn)

    def find(self, flow: Flow) -> Connection | None:
        """The served connection of ``flow`` (client to service address), if any."""
        return self._by_flow.get(flow)

    def _forget(self, conn: Connection) -> None:
        self.connections.pop(conn.id, None)
        if conn.flow is not None and self._by_flow.get(conn.flow) is conn:
            del self._by_flow[conn.flow]

    # --- moving ----------------------------------------------------------------------
    async def export(self, conn_id: int) -> Exported:
        """Pause a connection at a safe point and freeze its socket for a move.

        The caller must already hold the flow's packets (park or lock): a frozen socket
        still ACKs what arrives. On success the connection is no longer served here.
        """
        conn = self.connections[conn_id]
        if conn.tls is not None and conn.tls.phase != "open":
            raise tcp.RepairError(f"connection {conn_id}", "TLS handshake still running")
        assert conn.task is not None  # noqa: S101
        conn.task.cancel()  # the reader stops; ``out`` holds exactly what is owed
        done, _ = await asyncio.wait([conn.task], timeout=PAUSE_TIMEOUT)
        if not done or not conn.task.cancelled():
            if conn.task.done():  # it ended by itself (peer closed): nothing to move
                raise tcp.RepairError(f"connection {conn_id}", "closed while pausing")
            raise tcp.RepairError(f"connection {conn_id}", "did not pause")  # still served
        conn.sock.setblocking(True)
        meta = conn.describe()
        try:
            state = tcp.dump(conn.sock)
        except tcp.RepairError:
            self._run(conn)  # nothing was frozen: carry on here
            raise
        tls_state = conn.tls.export_state() if conn.tls else None
        self._forget(conn)
        return Exported(conn.sock, state, tls_state, conn.handler.snapshot(), bytes(conn.out),
                        conn.service.port, meta)  # fmt: skip

    def resume(self, exported: Exported) -> Connection:
        """Roll back: thaw the frozen socket and serve the connection here again."""
        tcp.resume(exported.sock)
        return self.adopt_socket(exported.sock, exported)

    def adopt_socket(self, sock: socket.socket, exported: Exported) -> Connection:
        service = self.services[exported.service_port]
        handler = load_handler(service.app)()
        handler.restore(exported.app)
        tls = TlsServerConnection.from_state(exported.tls) if exported.tls else None
        conn = Connection(next(_ids), sock, service, handler, tls)
        conn.out += exported.pending
        if tls is not None:
            # Records completed before the move but not yet processed go first.
            self._feed(conn, b"")
        self._run(conn)
        return conn

    def adopt(self, exported: Exported) -> Connection:
        """Continue a connection exported elsewhere: restore its socket here and serve it."""
        sock = tcp.restore(exported.tcp)
        return self.adopt_socket(sock, exported)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for listener in self._listeners:
            listener.close()
        for conn in list(self.connections.values()):
            if conn.task:
                conn.task.cancel()
            self._finish(conn)
