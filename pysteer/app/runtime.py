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
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pysteer import tcp
from pysteer.app import proxy_io
from pysteer.app.handlers import Handler, HandlerError, load_handler
from pysteer.app.proxy_io import Backend, NotMovable, QuiesceError
from pysteer.flow import Flow
from pysteer.proxy import ProxySpec, core_class, new_core
from pysteer.tls import (
    ConnectionClosed,
    DataReceived,
    HandshakeComplete,
    KeyUpdated,
    ServerConfig,
    TlsEnded,
    TlsServerConnection,
    TlsStateError,
)
from pysteer.tls.state import TlsState

log = logging.getLogger("pysteer.app")
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
    proxy: ProxySpec | None = None  # app = "proxy": the local backend and how to relay

    @property
    def kind(self) -> str:
        """The app both ends of a move must agree on (a proxy's protocol, not its backend)."""
        return self.proxy.kind if self.proxy is not None else self.app

    def handler_class(self) -> type:
        """The handler class (a proxy's core class); HandlerError if it cannot load."""
        return core_class(self.proxy) if self.proxy is not None else load_handler(self.app)


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
    ending: bool = False  # the peer closed (e.g. in records that came with a move): finish
    backend: Backend | None = None  # a proxy's connection to its backend
    held: bool = False  # a proxy at a boundary, its client not read: a move may freeze it
    quiet: asyncio.Future | None = None  # a move waiting for ``held``
    poke: asyncio.Future | None = None  # wakes a proxy's task (proxy_io)
    io: Any = None  # a proxy task's registered fds (proxy_io.Interest), while it runs

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
        } | ({"proxy": self.handler.describe()} if self.service.proxy is not None else {})


class AdoptError(ValueError):
    """A moved connection this runtime cannot continue (another app, snapshot version or
    TLS setting here); the message says why and never shows the connection's data."""


class ExportError(RuntimeError):
    """A connection could not be exported after its socket was frozen: it was thawed again
    and carries on here; the message says why."""


def snapshot_version(handler_class: type) -> Any:
    """The snapshot version a handler class writes and reads (``SNAPSHOT_VERSION``, 1
    if absent): a target continues only a snapshot of the version it reads."""
    return getattr(handler_class, "SNAPSHOT_VERSION", 1)


def signature(service: Service, handler_class: type | None) -> list[Any]:
    """What a node must agree on to continue a connection of ``service``: its port, app,
    snapshot version (None: the app cannot be loaded) and whether it is TLS. A node's
    hello lists its own; a source compares its connection's before freezing anything."""
    version = snapshot_version(handler_class) if handler_class is not None else None
    return [service.port, service.kind, version, service.tls is not None]


def versioned_snapshot(service: Service, handler: Handler) -> dict[str, Any]:
    """The handler's snapshot with what a target must agree on: the app and its version."""
    return {
        "app": service.kind,
        "v": snapshot_version(type(handler)),
        "state": handler.snapshot(),
    }


@dataclass(frozen=True)
class Exported:
    """A connection that left: its frozen socket stays here until ``release``/``resume``.

    ``app`` is a versioned snapshot (see ``versioned_snapshot``). ``tls`` holds traffic
    secrets, ``pending`` and ``app`` the connection's data: none of them is in the repr."""

    sock: socket.socket
    tcp: tcp.TcpState
    tls: dict[str, Any] | TlsState | None = field(repr=False)  # TlsState: decoded by B
    app: Any = field(repr=False)
    pending: bytes = field(repr=False)
    service_port: int
    meta: dict[str, Any]
    backend: Backend | None = field(default=None, repr=False)  # a proxy's, until released


def _let_go_of_backend(exported: Exported) -> None:
    if exported.backend is not None:
        exported.backend.close(exported.meta.get("flow"))


def _open_backend(spec: ProxySpec) -> Backend:
    """A moved proxy connection's backend connection on this host, opened before the
    move commits: a backend that is down refuses the move (AdoptError)."""
    try:
        return Backend(proxy_io.connect_now(spec))
    except OSError as exc:
        why = exc.strerror or str(exc) or type(exc).__name__
        name = proxy_io.backend_name(spec)
        raise AdoptError(f"backend {name} is not reachable here: {why}") from None


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
    def __init__(
        self, services: list[Service], address: str | list[str], *, shared: bool = False
    ) -> None:
        """``shared``: other processes (an agent's workers) listen on the same ports, and
        the kernel spreads new connections among them (SO_REUSEPORT)."""
        self.shared = shared
        self.services = {s.port: s for s in services}
        self.addresses = [address] if isinstance(address, str) else list(address)
        self.connections: dict[int, Connection] = {}
        self._by_flow: dict[Flow, Connection] = {}  # find() is on every migration's path
        self._listeners: list[socket.socket] = []
        self._tasks: list[asyncio.Task] = []
        self.on_close: Callable[[Connection], None] | None = None
        self.on_open: Callable[[Connection], None] | None = None  # accepted here (not moved)
        self._ids = itertools.count(1)  # connection ids, unique within this runtime
        self._signatures: list[list[Any]] | None = None

    def signatures(self) -> list[list[Any]]:
        """Each served port's ``signature``, for this node's hello (computed once: the
        services do not change while the runtime runs)."""
        if self._signatures is None:
            out = []
            for _port, service in sorted(self.services.items()):
                try:
                    handler_class: type | None = service.handler_class()
                except HandlerError:
                    handler_class = None
                out.append(signature(service, handler_class))
            self._signatures = out
        return self._signatures

    # --- serving ---------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for service in self.services.values():
            for address in self.addresses:
                family = socket.AF_INET6 if ":" in address else socket.AF_INET
                listener = socket.socket(family, socket.SOCK_STREAM)
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if self.shared:
                    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
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
            try:
                handler = self._new_handler(service, sock)
            except OSError:  # the client left already
                sock.close()
                continue
            tls = TlsServerConnection(service.tls) if service.tls else None
            conn = Connection(next(self._ids), sock, service, handler, tls)
            if tls is None:
                conn.out += handler.on_connect()
            self._run(conn)
            if self.on_open is not None:
                self.on_open(conn)

    @staticmethod
    def _new_handler(service: Service, sock: socket.socket) -> Handler:
        """A fresh handler for a connection of ``service`` (a proxy's core knows the
        client's address, for PROXY v2 and X-Forwarded-For)."""
        if service.proxy is not None:
            client, local = sock.getpeername(), sock.getsockname()
            return new_core(service.proxy, client[:2], local[:2], service.tls is not None)
        return load_handler(service.app)()

    def _run(self, conn: Connection) -> None:
        conn.sock.setblocking(False)
        self.connections[conn.id] = conn
        if conn.flow is not None:
            self._by_flow[conn.flow] = conn
        conn.task = asyncio.get_running_loop().create_task(self._serve(conn))

    def app_output(self, conn: Connection, data: bytes) -> None:
        """Bytes the app sends the peer (TLS-protected when the connection has it)."""
        self._app_output(conn, data)

    def feed(self, conn: Connection, data: bytes) -> bool:
        """Bytes from the peer (``_feed``), for the proxy adapter."""
        return self._feed(conn, data)

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
        """Serve ``conn`` until it ends (an app's loop, or a proxy's relay), then end it
        cleanly whatever ended it."""
        body = proxy_io.serve(self, conn) if conn.service.proxy is not None else self._loop(conn)
        try:
            if await body:  # it ended by itself and owes the peer a proper goodbye
                self._say_goodbye(conn, failed=False)
        except (ConnectionError, OSError):
            pass
        except TlsEnded as exc:  # TLS could not go on (sequence numbers ran out); not a bug
            log.warning("connection %s (%s): %s; closing it", conn.id, conn.flow, exc)
            self._say_goodbye(conn, failed=True)  # the layer queued its fatal alert already
        except Exception as exc:  # the app (or its TLS) failed: say so, end it cleanly
            log.error(
                "connection %s (%s): %s failed: %s: %.200s; closing it",
                conn.id,
                conn.flow,
                conn.service.app,
                type(exc).__name__,
                exc,
            )
            self._say_goodbye(conn, failed=True)
        self._finish(conn)

    async def _loop(self, conn: Connection) -> bool:
        """An app's connection: read, feed the handler, tick, flush."""
        loop = asyncio.get_running_loop()
        alive = not conn.ending
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
        return False

    def _say_goodbye(self, conn: Connection, *, failed: bool) -> None:
        """A last word before the FIN: close_notify, or a fatal alert when ``failed``; sent
        as far as the socket takes it without waiting."""
        if conn.tls is not None:
            with contextlib.suppress(Exception):
                conn.tls.fail() if failed else conn.tls.close()
                conn.out += conn.tls.data_to_send()
        with contextlib.suppress(OSError):
            conn.sock.setblocking(False)
            if conn.out:
                del conn.out[: conn.sock.send(conn.out)]
        with contextlib.suppress(OSError):
            conn.sock.shutdown(socket.SHUT_WR)

    def _finish(self, conn: Connection) -> None:
        if conn.closed:
            return
        conn.closed = True
        try:
            conn.handler.on_close()
        except Exception as exc:
            log.error(
                "connection %s (%s): %s on_close failed: %s",
                conn.id,
                conn.flow,
                conn.service.app,
                type(exc).__name__,
            )
        self._forget(conn)
        conn.sock.close()
        proxy_io.close_backend(conn)
        if conn.quiet is not None and not conn.quiet.done():
            conn.quiet.set_exception(QuiesceError("the connection closed"))
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
    async def quiesce(self, flow: Flow, timeout: float) -> float | None:
        """Wait until a proxy connection may freeze: between requests (or idle, for tcp),
        its client no longer read. Returns the milliseconds waited, or None for other
        apps (they pause anywhere: nothing is held). QuiesceError (NotMovable) says why
        not; then nothing is held."""
        conn = self.find(flow)
        if conn is None:
            raise QuiesceError(f"flow {flow} closed before it could move")
        if conn.service.proxy is None:
            return None
        if conn.held:
            return 0.0
        core = conn.handler
        if core.not_movable:
            raise NotMovable(f"not movable: {core.not_movable}")
        loop = asyncio.get_running_loop()
        started = loop.time()
        core.hold = True
        conn.quiet = quiet = loop.create_future()
        proxy_io.poke(conn)
        try:
            await asyncio.wait_for(asyncio.shield(quiet), timeout)
        except TimeoutError:
            self.unquiesce(flow)
            raise QuiesceError(
                f"a request was still in flight after {round(timeout, 1):g} s (it goes on here)"
            ) from None
        except QuiesceError:
            self.unquiesce(flow)
            raise
        return round((loop.time() - started) * 1000, 3)

    def unquiesce(self, flow: Flow) -> None:
        """Undo ``quiesce``: the connection reads its client again."""
        conn = self.find(flow)
        if conn is None or conn.service.proxy is None:
            return
        conn.handler.hold = False
        conn.held = False
        if conn.quiet is not None and not conn.quiet.done():
            conn.quiet.cancel()
        conn.quiet = None
        proxy_io.poke(conn)

    def release(self, exported: Exported) -> None:
        """The move committed: close the frozen socket silently, and a proxy's backend
        connection (the new host opened its own)."""
        tcp.release(exported.sock)
        _let_go_of_backend(exported)

    def discard(self, exported: Exported) -> None:
        """The frozen socket cannot be thawed: close it silently, and its backend too."""
        tcp.discard(exported.sock)
        _let_go_of_backend(exported)

    def unbuild(self, conn: Connection) -> None:
        """A connection from ``build`` that will not be served: free what it opened."""
        proxy_io.close_backend(conn)

    async def export(self, conn_id: int) -> Exported:
        """Pause a connection at a safe point and freeze its socket for a move.

        The caller must already hold the flow's packets (park or lock): a frozen socket
        still ACKs what arrives. On success the connection is no longer served here.
        """
        conn = self.connections[conn_id]
        if conn.tls is not None and conn.tls.phase != "open":
            raise tcp.RepairError(f"connection {conn_id}", "TLS handshake still running")
        if conn.service.proxy is not None and not conn.held:
            raise tcp.RepairError(f"connection {conn_id}", "not at a request boundary")
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
        try:
            tls_state = conn.tls.export_state() if conn.tls else None
            app = versioned_snapshot(conn.service, conn.handler)
        except Exception as exc:  # frozen, but not exportable: thaw it and carry on here
            try:
                tcp.resume(conn.sock)
            except tcp.RepairError:
                log.error(
                    "connection %s (%s): cannot thaw after a failed export; closing it silently",
                    conn_id,
                    conn.flow,
                )
                tcp.discard(conn.sock)
                self._finish(conn)
                raise ExportError(
                    f"connection {conn_id}: export failed and the socket could "
                    "not be thawed: the connection is lost"
                ) from None
            self._run(conn)
            raise ExportError(
                f"connection {conn_id}: export failed ({type(exc).__name__}); it carries on here"
            ) from None
        self._forget(conn)
        backend, conn.backend = conn.backend, None
        return Exported(
            conn.sock, state, tls_state, app, bytes(conn.out), conn.service.port, meta, backend
        )

    def resume(self, exported: Exported) -> Connection:
        """Roll back: thaw the frozen socket and serve the connection here again."""
        tcp.resume(exported.sock)
        return self.adopt_socket(exported.sock, exported, backend=exported.backend)

    def _restored(self, service: Service, sock: socket.socket, app: Any) -> Handler:
        """A handler continued from a moved connection's versioned snapshot; AdoptError
        says why it cannot be."""
        if not isinstance(app, dict) or set(app) != {"app", "v", "state"}:
            raise AdoptError("the app snapshot carries no app name and version")
        if app["app"] != service.kind:
            raise AdoptError(
                f"port {service.port} runs {service.kind!r} here, not {str(app['app'])[:60]!r}"
            )
        try:
            handler = self._new_handler(service, sock)
        except HandlerError as exc:
            raise AdoptError(str(exc)) from None
        except OSError as exc:
            raise AdoptError(f"the restored socket: {exc.strerror or exc}") from None
        version = snapshot_version(type(handler))
        if app["v"] != version:
            raise AdoptError(
                f"{service.app} snapshot version {str(app['v'])[:20]}: this node "
                f"reads version {version}"
            )
        try:
            handler.restore(app["state"])
        except HandlerError as exc:
            raise AdoptError(f"{service.app} refused the snapshot: {exc}") from None
        except Exception as exc:
            raise AdoptError(f"{service.app} refused the snapshot ({type(exc).__name__})") from None
        return handler

    def build(
        self, sock: socket.socket, exported: Exported, *, backend: Backend | None = None
    ) -> Connection:
        """A connection to continue here, fully checked but not yet served: the handler
        restored from its snapshot, the TLS layer from its state, and records that came
        before the move processed. Everything that can refuse it does so here (AdoptError),
        so a migration's target finds out before its commit point, not after."""
        service = self.services.get(exported.service_port)
        if service is None:
            raise AdoptError(f"port {exported.service_port} is not served here")
        handler = self._restored(service, sock, exported.app)
        if (exported.tls is not None) != (service.tls is not None):
            raise AdoptError(
                f"port {service.port} is {'TLS' if service.tls else 'plain TCP'} "
                "here, and the connection is not"
            )
        try:
            tls = TlsServerConnection.from_state(exported.tls) if exported.tls else None
        except TlsStateError as exc:
            raise AdoptError(f"TLS state: {exc}") from None
        fresh = service.proxy is not None and backend is None
        if service.proxy is not None:
            backend = backend or _open_backend(service.proxy)
            handler.backend_opened(fresh=fresh)
        conn = Connection(next(self._ids), sock, service, handler, tls)
        conn.backend = backend
        conn.out += exported.pending
        if tls is not None:
            # Records completed before the move but not yet processed go first.
            try:
                conn.ending = not self._feed(conn, b"")
            except Exception as exc:
                if fresh:
                    proxy_io.close_backend(conn)
                raise AdoptError(
                    f"records that came with the connection: {type(exc).__name__}"
                ) from None
        return conn

    def serve_built(self, conn: Connection) -> Connection:
        """Serve a connection from ``build`` (its socket now live)."""
        self._run(conn)
        return conn

    def adopt_socket(
        self, sock: socket.socket, exported: Exported, *, backend: Backend | None = None
    ) -> Connection:
        return self.serve_built(self.build(sock, exported, backend=backend))

    def adopt(self, exported: Exported) -> Connection:
        """Continue a connection exported elsewhere: restore its socket here and serve it."""
        sock = tcp.restore(exported.tcp)
        try:
            return self.adopt_socket(sock, exported)
        except AdoptError:
            tcp.discard(sock)
            raise

    async def close(self) -> int:
        """Stop serving: every connection gets a close_notify (TLS) and a FIN. Returns how
        many connections were ended."""
        for task in self._tasks:
            task.cancel()
        for listener in self._listeners:
            listener.close()
        ended = 0
        for conn in list(self.connections.values()):
            if conn.task:
                conn.task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await conn.task
            if not conn.closed:
                self._say_goodbye(conn, failed=False)
                self._finish(conn)
                ended += 1
        return ended
