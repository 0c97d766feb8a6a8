"""Many client connections in one process, on one asyncio loop thread, and what each saw.

``Fleet`` opens N connections from the lab's client namespace to a service on the VIP
(plain TCP, or TLS with Python's ssl on asyncio's memory BIOs: no ``ssl.SSLSocket`` is
ever touched by two threads). Each connection can write a numbered line every
``interval`` and keeps every byte it reads with the time it came. Afterwards ``verdicts``
says, per connection, whether it ``survived`` (its stream is byte-exact and it still
answers), was ``reset`` (EOF or an error: it ended), or ``hung`` (silent, yet not ended).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pysteer.lab import Lab
from pysteer.lab.clients import StreamError, check_ticker_stream


@dataclass
class Conn:
    index: int
    flow: str
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    out: bytearray = field(default_factory=bytearray)
    sent: list[bytes] = field(default_factory=list)
    last_read: float = field(default_factory=time.monotonic)
    ended: str | None = None  # why it ended: "eof" or an error's name


class Fleet:
    def __init__(
        self, lab: Lab, port: int, count: int, *, ca: Path | None = None, family: int = 4
    ) -> None:
        self.lab, self.port = lab, port
        vip = str(lab.plan.vip(family))
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fleet", daemon=True)
        self._thread.start()
        self._talk: asyncio.Task | None = None
        ctx = ssl.create_default_context(cafile=str(ca)) if ca else None
        socks = lab.call("client", _connect_many, vip, port, count)
        self.conns: list[Conn] = self._run(self._open(socks, ctx), timeout=120)
        for conn in self.conns:
            self.loop.call_soon_threadsafe(self._spawn_reader, conn)

    def _run(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _open(self, socks: list[socket.socket], ctx: ssl.SSLContext | None) -> list[Conn]:
        sem = asyncio.Semaphore(64)

        async def one(i: int, sock: socket.socket) -> Conn:
            async with sem:
                local, peer = sock.getsockname(), sock.getpeername()
                kw: dict[str, Any] = {"ssl": ctx, "server_hostname": "vip"} if ctx else {}
                reader, writer = await asyncio.open_connection(sock=sock, **kw)
                return Conn(i, f"{local[0]}:{local[1]}-{peer[0]}:{peer[1]}", reader, writer)

        return list(await asyncio.gather(*(one(i, s) for i, s in enumerate(socks))))

    def _spawn_reader(self, conn: Conn) -> None:
        self.loop.create_task(self._read(conn))

    async def _read(self, conn: Conn) -> None:
        try:
            while chunk := await conn.reader.read(65536):
                conn.out += chunk
                conn.last_read = time.monotonic()
            conn.ended = "eof"
        except (ConnectionError, OSError, ssl.SSLError) as exc:
            conn.ended = type(exc).__name__

    # --- traffic ------------------------------------------------------------------------
    def start_talking(self, interval: float = 0.2) -> None:
        """Every connection writes ``l-N`` lines, one every ``interval`` s (staggered)."""

        async def talk() -> None:
            n = len(self.conns)
            step = interval / max(n, 1)
            while True:
                for conn in self.conns:
                    if conn.ended is None:
                        line = b"l-%d\n" % (len(conn.sent) + 1)
                        try:
                            conn.writer.write(line)
                            conn.sent.append(line)
                        except (ConnectionError, OSError, RuntimeError):
                            pass
                    await asyncio.sleep(step)

        self._talk = asyncio.run_coroutine_threadsafe(_as_task(talk()), self.loop).result(5)

    def stop_talking(self) -> None:
        if self._talk is not None:
            self.loop.call_soon_threadsafe(self._talk.cancel)
            self._talk = None

    def send_line(self, conn: Conn, line: bytes) -> None:
        def write() -> None:
            conn.writer.write(line)
            conn.sent.append(line)

        self.loop.call_soon_threadsafe(write)

    # --- verdicts -----------------------------------------------------------------------
    def verdicts(self, *, settle: float = 10.0, ticker: bool = True) -> dict[str, list[int]]:
        """Stop talking, give every live connection ``settle`` s to echo its last line, then
        ask each one more line. ``survived``: byte-exact and it answered; ``reset``: it
        ended; ``hung``: neither; ``corrupt``: its bytes are wrong (never acceptable)."""
        self.stop_talking()
        deadline = time.monotonic() + settle
        while time.monotonic() < deadline:
            if all(c.ended or self._echoed(c, len(c.sent)) for c in self.conns):
                break
            time.sleep(0.1)
        probes = {c.index: len(c.sent) + 1 for c in self.conns if c.ended is None}
        for conn in self.conns:
            if conn.index in probes:
                self.send_line(conn, b"l-%d\n" % probes[conn.index])
        deadline = time.monotonic() + settle
        while time.monotonic() < deadline:
            if all(c.ended or self._echoed(c, probes[c.index]) for c in self.conns):
                break
            time.sleep(0.1)
        out: dict[str, list[int]] = {"survived": [], "reset": [], "hung": [], "corrupt": []}
        for conn in self.conns:
            if conn.ended is not None:
                out["reset"].append(conn.index)
                continue
            if not self._echoed(conn, probes[conn.index]):
                out["hung"].append(conn.index)
                continue
            try:
                if ticker:
                    check_ticker_stream(bytes(conn.out).decode(errors="replace"), conn.sent)
                elif bytes(conn.out) != b"".join(conn.sent):
                    raise StreamError("echo differs")
            except StreamError:
                out["corrupt"].append(conn.index)
                continue
            out["survived"].append(conn.index)
        return out

    @staticmethod
    def _echoed(conn: Conn, n: int) -> bool:
        return f"echo {n} ".encode() in conn.out or conn.out.endswith(b"l-%d\n" % n)

    # --- ending -------------------------------------------------------------------------
    def close(self, indices: list[int] | None = None, *, how: str = "fin") -> None:
        """End connections: ``fin`` (a clean close) or ``rst`` (SO_LINGER 0: a RST)."""
        chosen = self.conns if indices is None else [self.conns[i] for i in indices]

        async def end() -> None:
            for conn in chosen:
                if how == "rst":
                    sock = conn.writer.get_extra_info("socket")
                    if sock is not None:
                        sock.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
                    conn.writer.transport.abort()
                else:
                    conn.writer.close()
            await asyncio.sleep(0)

        self._run(end())

    def shutdown(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


async def _as_task(coro: Any) -> asyncio.Task:
    return asyncio.get_running_loop().create_task(coro)


def _connect_many(vip: str, port: int, count: int) -> list[socket.socket]:
    """``count`` connections from this thread's namespace (the client's), non-blocking."""
    family = socket.AF_INET6 if ":" in vip else socket.AF_INET
    out = []
    for _ in range(count):
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.settimeout(10)
        s.connect((vip, port))
        s.setblocking(False)
        out.append(s)
    return out
