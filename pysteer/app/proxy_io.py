"""The I/O adapter of a proxy connection: two sockets (the client's, the backend's)
driven around a sans-IO proxy core (``pysteer.proxy``), and the quiet point a move
waits for.

One task serves both sockets, waiting on whichever can make progress. Each direction
is bounded: the client is not read while much is owed to the backend, nor the backend
while much is owed to the client, so a fast backend and a slow client cost at most a
few hundred kilobytes. The wait reads nothing itself, so cancelling the task (a move's
export) can never lose a byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import socket
import struct
import termios
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pysteer.app.runtime import Connection, Runtime
    from pysteer.proxy import ProxySpec

log = logging.getLogger("pysteer.app")
HIGH_OUT = 256 * 1024  # owed to the client: the backend is not read beyond this
CONNECT_TIMEOUT = 5.0  # seconds for a backend connection (when serving)
PREPARE_CONNECT_TIMEOUT = 1.0  # ... when a moved connection arrives (inside its freeze)
SIOCOUTQ = termios.TIOCOUTQ  # bytes not yet acknowledged by the peer
SIOCINQ = termios.FIONREAD  # bytes received and not yet read


class QuiesceError(RuntimeError):
    """The connection did not reach a point where it may move; nothing was frozen."""

    code = "busy"


class NotMovable(QuiesceError):
    """The connection can never move (a tunnel); the message says why."""

    code = "not-movable"


@dataclass
class Backend:
    """A proxy connection's connection to its backend, and the bytes owed to it."""

    sock: socket.socket
    out: bytearray = field(default_factory=bytearray)
    heard: float = field(default_factory=time.monotonic)  # the backend's last sign of life

    def close(self, flow: Any = None) -> None:
        """Close it; bytes the backend sent that nobody will read are logged."""
        with contextlib.suppress(OSError):
            unread = _queued(self.sock, SIOCINQ)
            if unread:
                log.warning(
                    "connection %s: the backend sent %d bytes after the connection moved; "
                    "they are dropped (see docs/proxy.md on when a tcp proxy is safe)",
                    flow,
                    unread,
                )
        self.sock.close()


def _queued(sock: socket.socket, request: int) -> int:
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), request, b"\0\0\0\0"))[0]


def backend_quiet(backend: Backend | None) -> bool:
    """Nothing owed to the backend, unsent or unacknowledged, and nothing unread from it."""
    if backend is None:
        return True
    if backend.out:
        return False
    try:
        return _queued(backend.sock, SIOCOUTQ) == 0 and _queued(backend.sock, SIOCINQ) == 0
    except OSError:
        return True  # closed under us: nothing in it can matter


def connect_now(spec: ProxySpec) -> socket.socket:
    """A backend connection opened at once (a moved connection's, before its commit);
    OSError says why not."""
    sock = socket.create_connection(spec.backend, timeout=PREPARE_CONNECT_TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    return sock


async def _connect(spec: ProxySpec) -> socket.socket:
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in spec.backend[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.wait_for(loop.sock_connect(sock, spec.backend), CONNECT_TIMEOUT)
    except BaseException:
        sock.close()
        raise
    return sock


class Interest:
    """The fds a proxy connection's task waits on, kept registered with the loop between
    waits (registering anew for each wait was a fifth of a request's cost) and changed
    only when what it waits for changes."""

    def __init__(self) -> None:
        self.reads: set[int] = set()
        self.writes: set[int] = set()
        self.ready: set[tuple[str, int]] = set()
        self.fut: asyncio.Future | None = None

    def _wake(self, kind: str, fd: int) -> None:
        self.ready.add((kind, fd))
        if self.fut is not None and not self.fut.done():
            self.fut.set_result(None)

    def update(self, loop: asyncio.AbstractEventLoop, reads: set[int], writes: set[int]) -> None:
        for fd in self.reads - reads:
            loop.remove_reader(fd)
        for fd in reads - self.reads:
            loop.add_reader(fd, self._wake, "r", fd)
        for fd in self.writes - writes:
            loop.remove_writer(fd)
        for fd in writes - self.writes:
            loop.add_writer(fd, self._wake, "w", fd)
        self.reads, self.writes = reads, writes

    def forget(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        """Before ``fd`` is closed: the loop must not keep a closed fd's registration."""
        self.update(loop, self.reads - {fd}, self.writes - {fd})

    def clear(self, loop: asyncio.AbstractEventLoop) -> None:
        self.update(loop, set(), set())


async def _wait(
    conn: Connection, reads: list[int], writes: list[int], timeout: float | None
) -> set[tuple[str, int]]:
    """Which of the fds are ready (or none, after ``timeout`` or a poke). Reads nothing
    itself: cancelling it loses no byte."""
    loop = asyncio.get_running_loop()
    interest = conn.io
    interest.update(loop, set(reads), set(writes))
    interest.ready = set()
    fut = interest.fut = loop.create_future()
    timer = loop.call_later(timeout, interest._wake, "t", -1) if timeout is not None else None
    conn.poke = fut
    try:
        await fut
    finally:
        conn.poke = interest.fut = None
        if timer is not None:
            timer.cancel()
    return interest.ready


def close_backend(conn: Connection) -> None:
    """Close the connection's backend connection (unregistered first)."""
    if conn.backend is None:
        return
    if conn.io is not None:
        with contextlib.suppress(RuntimeError):
            conn.io.forget(asyncio.get_running_loop(), conn.backend.sock.fileno())
    conn.backend.close(conn.flow)
    conn.backend = None


def poke(conn: Connection) -> None:
    """Wake the connection's task to look at its state again (a move's hold changed)."""
    if conn.poke is not None and not conn.poke.done():
        conn.poke.set_result(None)


def check_quiet(conn: Connection, now: float) -> None:
    """Tell a waiting move when the connection is quiet (or can never be)."""
    quiet = conn.quiet
    if quiet is None or quiet.done():
        return
    core = conn.handler
    if core.not_movable:
        quiet.set_exception(NotMovable(f"not movable: {core.not_movable}"))
    elif core.finished():
        quiet.set_exception(QuiesceError("the connection is closing"))
    elif core.hold and not conn.out and core.at_boundary(now) and backend_quiet(conn.backend):
        conn.held = True  # from now on the client's bytes wait in the socket
        quiet.set_result(None)


async def serve(runtime: Runtime, conn: Connection) -> bool:
    """Relay between the client and the backend until either ends (or a move's export
    cancels the task). True when the relay ended the connection itself (a ``Connection:
    close``, a 502): the client is owed a proper goodbye."""
    loop = asyncio.get_running_loop()
    conn.io = Interest()
    try:
        await _relay(runtime, conn, loop)
    finally:
        conn.io.clear(loop)
        conn.io = None
    return bool(conn.handler.finished())


async def _relay(runtime: Runtime, conn: Connection, loop: asyncio.AbstractEventLoop) -> None:
    core = conn.handler
    while True:
        await _tend_backend(runtime, conn)
        backend = conn.backend
        if core.finished() and not conn.out and not (backend and backend.out):
            return
        now = loop.time()
        check_quiet(conn, now)
        reads, writes = _interest(conn)
        timeout = None
        if conn.quiet is not None and not conn.quiet.done():  # a move waits: time may tell
            check = core.next_check(now)
            timeout = None if check is None else max(check, 0.005)
        elif not reads and not writes and conn.quiet is None:
            timeout = 1.0  # nothing to wait on: look again (a poke comes sooner)
        if backend is not None and core.waiting_for_backend():
            left = backend.heard + conn.service.proxy.read_timeout - time.monotonic()
            if left <= 0:
                _backend_silent(runtime, conn)
                continue
            timeout = left if timeout is None else min(timeout, left)
        ready = await _wait(conn, reads, writes, timeout)
        if not _exchange(runtime, conn, backend, ready):
            return


async def _tend_backend(runtime: Runtime, conn: Connection) -> None:
    """Close the backend connection the core let go of; open one it needs; hand it
    what the core owes it."""
    core, spec = conn.handler, conn.service.proxy
    assert spec is not None  # noqa: S101
    if core.drop_backend():
        close_backend(conn)
    if conn.backend is None and core.wants_backend():
        try:
            conn.backend = Backend(await _connect(spec))
            core.backend_opened()
        except (OSError, TimeoutError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else "timed out"
            log.warning("connection %s: backend %s: %s", conn.flow, backend_name(spec), why)
            runtime.app_output(conn, core.backend_failed(why))
    if conn.backend is not None:
        conn.backend.out += core.backend_output()


def _interest(conn: Connection) -> tuple[list[int], list[int]]:
    """The fds to wait on: each direction only while the other end keeps up."""
    core, backend = conn.handler, conn.backend
    reads, writes = [], []
    if not conn.held and not conn.ending and core.reading_client() and len(conn.out) < HIGH_OUT:
        reads.append(conn.sock.fileno())
    if conn.out:
        writes.append(conn.sock.fileno())
    if backend is not None:
        if len(conn.out) < HIGH_OUT:
            reads.append(backend.sock.fileno())
        if backend.out:
            writes.append(backend.sock.fileno())
    return reads, writes


def _exchange(
    runtime: Runtime, conn: Connection, backend: Backend | None, ready: set[tuple[str, int]]
) -> bool:
    """One round of reads and writes on what is ready; False once the client is gone."""
    cfd = conn.sock.fileno()
    bfd = backend.sock.fileno() if backend is not None else -1
    if ("r", cfd) in ready:
        data = _recv(conn.sock)
        if data == b"":
            return False  # the client closed
        if data is not None and not runtime.feed(conn, data):
            return False
    if backend is not None and ("r", bfd) in ready:
        _from_backend(runtime, conn, backend)
    if ("w", cfd) in ready and conn.out:
        sent = _send(conn.sock, conn.out)
        del conn.out[:sent]
        conn.bytes_out += sent
    if backend is not None and backend is conn.backend and ("w", bfd) in ready:
        try:
            sent = _send(backend.sock, backend.out)
            del backend.out[:sent]
            if sent:
                backend.heard = time.monotonic()  # its wait for the answer starts now
        except OSError as exc:
            _backend_lost(runtime, conn, exc)
    return True


def _from_backend(runtime: Runtime, conn: Connection, backend: Backend) -> None:
    core = conn.handler
    try:
        data = _recv(backend.sock)
    except OSError as exc:
        _backend_lost(runtime, conn, exc)
        return
    if data is None:
        return
    backend.heard = time.monotonic()
    runtime.app_output(conn, core.on_backend(data))
    if data == b"" and conn.backend is backend:
        close_backend(conn)
        core.drop_backend()  # the core let go of it already


def _backend_silent(runtime: Runtime, conn: Connection) -> None:
    spec = conn.service.proxy
    assert spec is not None  # noqa: S101
    log.warning(
        "connection %s: backend %s sent nothing for %g s during a request; answering 504",
        conn.flow,
        backend_name(spec),
        spec.read_timeout,
    )
    close_backend(conn)
    runtime.app_output(conn, conn.handler.backend_timed_out())


def _backend_lost(runtime: Runtime, conn: Connection, exc: OSError) -> None:
    core = conn.handler
    close_backend(conn)
    spec = conn.service.proxy
    log.warning("connection %s: backend %s: %s", conn.flow, backend_name(spec), exc.strerror or exc)
    runtime.app_output(conn, core.backend_failed(exc.strerror or "connection lost"))


def _recv(sock: socket.socket) -> bytes | None:
    """Bytes, b"" at the end, None when nothing is there after all. Client errors
    propagate (they end the connection)."""
    try:
        return sock.recv(65536)
    except (BlockingIOError, InterruptedError):
        return None


def _send(sock: socket.socket, data: bytearray) -> int:
    try:
        return sock.send(data)
    except (BlockingIOError, InterruptedError):
        return 0
    except OSError as exc:
        if exc.errno == errno.EAGAIN:
            return 0
        raise


def backend_name(spec: ProxySpec | None) -> str:
    if spec is None:
        return "?"
    host, port = spec.backend
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
