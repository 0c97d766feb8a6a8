"""A threaded TLS test server on loopback: real sockets around pysteer's sans-IO TLS layer.

Apps: ``echo`` (everything back; a line ``BYE`` makes the server close after echoing it)
and ``http`` (HTTP/1.1 keep-alive, ``GET /bytes/N`` returns N deterministic bytes).
Every connection's events are recorded for the tests to inspect.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from pysteer.app.handlers import Http
from pysteer.tls import (
    ConnectionClosed,
    DataReceived,
    Event,
    HandshakeComplete,
    ServerConfig,
    TlsServerConnection,
)


@dataclass
class Served:
    """One connection as the server saw it."""

    events: list[Event] = field(default_factory=list)
    conn: TlsServerConnection | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def handshake(self) -> HandshakeComplete | None:
        return next((e for e in self.events if isinstance(e, HandshakeComplete)), None)


class EchoApp:
    def __init__(self) -> None:
        self.tail = b"\n"

    def __call__(self, conn: TlsServerConnection, data: bytes) -> None:
        conn.send(data)
        self.tail = (self.tail + data)[-5:]
        if self.tail.endswith(b"\nBYE\n"):
            conn.close()


class HttpApp:
    """pysteer's built-in http handler, driven over the TLS connection."""

    def __init__(self) -> None:
        self.handler = Http()

    def __call__(self, conn: TlsServerConnection, data: bytes) -> None:
        if out := self.handler.on_data(data):
            conn.send(out)
        while out := self.handler.pull(1 << 20):  # the whole response (this server is simple)
            conn.send(out)
        if self.handler.closing:
            conn.close()


APPS: dict[str, Callable[[], Callable[[TlsServerConnection, bytes], None]]] = {
    "echo": EchoApp,
    "http": HttpApp,
}


class TlsTestServer:
    def __init__(
        self,
        config: ServerConfig,
        app: str = "echo",
        *,
        on_event: Callable[[TlsServerConnection, Event], None] | None = None,
    ) -> None:
        self.config, self.app, self.on_event = config, app, on_event
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.served: list[Served] = []
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._accept_loop, daemon=True)
        self._accept.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            served = Served()
            self.served.append(served)
            t = threading.Thread(target=self._serve, args=(sock, served), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, sock: socket.socket, served: Served) -> None:
        conn = served.conn = TlsServerConnection(self.config)
        app = APPS[self.app]()
        sock.settimeout(30)
        shut = False
        try:
            with sock:
                while conn.phase != "closed":
                    try:
                        data = sock.recv(65536)
                    except ConnectionResetError:
                        break
                    if not data:
                        break
                    for event in conn.receive_data(data):
                        served.events.append(event)
                        if isinstance(event, DataReceived):
                            app(conn, event.data)
                        if self.on_event:
                            self.on_event(conn, event)
                    if out := conn.data_to_send():
                        sock.sendall(out)
                    if conn.close_sent and not shut:
                        sock.shutdown(socket.SHUT_WR)  # close_notify, then the TCP FIN
                        shut = True
                if (out := conn.data_to_send()) and not shut:
                    sock.sendall(out)
                if not any(isinstance(e, ConnectionClosed) for e in served.events):
                    served.events.append(ConnectionClosed(clean=False))
        except BaseException as exc:  # recorded for the test to assert on
            served.error = exc
        finally:
            served.done.set()

    def wait(self, count: int = 1, timeout: float = 30) -> list[Served]:
        for served in self.served[:count]:
            served.done.wait(timeout)
        return self.served

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self.listener.close()
        self._accept.join(5)
        for t in self._threads:
            t.join(10)

    def __enter__(self) -> TlsTestServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
