"""Unmodified clients in the lab, and what they noticed: streams, counters, RSTs.

``Session`` drives an interactive client program (s_client, gnutls-cli, a line client)
over its stdin and stdout, timestamping what it prints; ``LineClient`` is the same kind of
client inside this process, on one asyncio loop. ``check_ticker_stream`` checks the
ticker app's output byte for byte. ``RstCapture`` records every RST on a link, and
``netstat`` reads the TCP counters of the calling thread's namespace. The tests and
``scripts/demo`` use them alike.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import os
import re
import signal
import socket
import ssl as ssl_module
import subprocess
import tempfile
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from pysteer.lab.topology import Lab

T = TypeVar("T")


def netstat(section: str = "Tcp") -> dict[str, int]:
    """Counters of this thread's namespace: ``Tcp`` (snmp) or ``TcpExt`` (netstat)."""
    path = "netstat" if section == "TcpExt" else "snmp"
    rows = [ln.split() for ln in Path(f"/proc/thread-self/net/{path}").read_text().splitlines()]
    names, values = [r for r in rows if r[0] == f"{section}:"][:2]
    return {n: int(v) for n, v in zip(names[1:], values[1:], strict=True)}


class RstCapture:
    """tcpdump of RST segments on one interface of a lab node, for the life of a with-block."""

    FILTER = "(tcp[tcpflags] & tcp-rst != 0) or (ip6 and ip6[6] == 6 and ip6[53] & 4 != 0)"

    def __init__(self, lab: Lab, node: str, ifname: str) -> None:
        self.lab, self.node, self.ifname = lab, node, ifname
        self.path = Path(tempfile.mkdtemp(prefix="pysteer-rst-")) / "rst.pcap"
        self.count: int | None = None

    def __enter__(self) -> RstCapture:
        # --immediate-mode: without it a packet can wait a whole buffer timeout (1 s) in
        # the kernel's ring and be lost when we stop tcpdump.
        argv = [
            "tcpdump",
            "-i",
            self.ifname,
            "-nn",
            "--immediate-mode",
            "-U",
            "-w",
            str(self.path),
            self.FILTER,
        ]
        self.proc = self.lab.popen(self.node, argv, stderr=subprocess.PIPE, text=True)
        line = self.proc.stderr.readline()  # "listening on ..." once the filter is in place
        if "listening on" not in line:
            raise RuntimeError(f"tcpdump did not start: {line}")
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.05)  # let the last packets reach tcpdump
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(10)
        self.proc.stderr.close()
        out = subprocess.run(
            ["tcpdump", "-nn", "-r", str(self.path)], capture_output=True, text=True, check=True
        )
        self.lines = out.stdout.splitlines()
        self.count = len(self.lines)
        os.unlink(self.path)
        os.rmdir(self.path.parent)


class Session:
    """An interactive client: lines go to its stdin, everything it prints is kept."""

    def __init__(self, lab: Lab, argv: list[str], interval: float = 0.02) -> None:
        self.proc = lab.popen(
            "client", argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self.out = bytearray()
        self.err = bytearray()
        self.arrivals: list[float] = []  # monotonic time of each chunk read
        self.sent: list[bytes] = []
        self.interval = interval
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._writing = threading.Lock()  # one writer of stdin at a time: lines, commands
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._err_reader = threading.Thread(target=self._read_err, daemon=True)
        self._err_reader.start()
        self._writer: threading.Thread | None = None

    def _read(self) -> None:
        while chunk := self.proc.stdout.read1(65536):
            with self._lock:
                self.out += chunk
                self.arrivals.append(time.monotonic())

    def _read_err(self) -> None:
        while chunk := self.proc.stderr.read1(65536):
            with self._lock:
                self.err += chunk

    def largest_gap(self, start: float, end: float) -> float:
        """The longest silence (s) between outputs within [start, end]."""
        with self._lock:
            times = [t for t in self.arrivals if start <= t <= end]
        return max((b - a for a, b in itertools.pairwise(times)), default=end - start)

    def text(self) -> str:
        with self._lock:
            return self.out.decode(errors="replace")

    def wait_for(self, needle: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.text():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"{needle!r} not seen; got {self.text()[-500:]!r}")
            time.sleep(0.02)

    def send(self, line: bytes) -> None:
        with self._writing:
            self.proc.stdin.write(line)
            self.proc.stdin.flush()
            self.sent.append(line)

    def command(self, line: bytes, done: str, timeout: float = 20) -> None:
        """Input the client itself acts on (s_client's K), alone: not sent as data.

        s_client acts on a command only at the start of what one read() of its stdin
        returns, and then drops the whole read: a line written just before or after would
        be taken for data or lost (a test once waited for an echo of a line s_client had
        dropped with its K). So the lines stop, the client is seen to have sent every one
        (its echo came back), the command goes in alone, and the lines resume only once the
        client says ``done`` on stderr (s_client: "KEYUPDATE")."""
        with self._writing:
            if self.sent:
                self.wait_for(f"echo {len(self.sent)} ", timeout)
            with self._lock:
                before = self.err.count(done.encode())
            self.proc.stdin.write(line)
            self.proc.stdin.flush()
            deadline = time.monotonic() + timeout
            while True:
                with self._lock:
                    if self.err.count(done.encode()) > before:
                        break
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise AssertionError(f"{done!r} not seen on stderr after {line!r}")
                time.sleep(0.01)

    def start_writing(self) -> None:
        def write() -> None:
            n = 0
            while not self._stop.wait(self.interval):
                n += 1
                self.send(b"line-%d-%s\n" % (n, b"x" * (n % 37)))

        self._writer = threading.Thread(target=write, daemon=True)
        self._writer.start()

    def stop_writing(self) -> None:
        self._stop.set()
        if self._writer:
            self._writer.join()

    def drain(self, timeout: float = 20) -> None:
        """Wait for the echo of every line sent, and a few more ticks."""
        self.wait_for(f"echo {len(self.sent)} ", timeout)
        time.sleep(0.3)

    def finish(self) -> str:
        """End the client (its kernel may answer the ticks still coming with a RST)."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5)
        self._err_reader.join(5)
        self.proc.stdin.close()
        self.proc.stderr.close()
        return self.text()


class StreamError(AssertionError):
    """A client's stream shows a loss, a repeat, a reorder or a reconnect."""


TICK = re.compile(r"^tick (\d+)$")
ECHO = re.compile(r"^echo (\d+) (.*)$")


def check_ticker_stream(text: str, sent: list[bytes]) -> int:
    """The ticker's output, line by line: one greeting, consecutive ticks, one echo per line
    sent in order with a counter that never restarts (a reconnect would start it again).
    Returns the number of ticks.

    A last line without its newline is left out: a client ended while output kept coming
    (its stdout a pipe, block-buffered) can be cut mid-line, after the buffer's last flush
    (gnutls-cli's output once ended in "t"). Every whole line is checked."""
    if not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if "ticker ready" not in lines:
        raise StreamError("the ticker's greeting never came")
    lines = lines[lines.index("ticker ready") :]
    if lines.count("ticker ready") != 1:
        raise StreamError("the app greeted twice: a reconnect")
    ticks, echoes = [], []
    for line in lines[1:]:
        if m := TICK.match(line):
            ticks.append(int(m.group(1)))
        elif m := ECHO.match(line):
            echoes.append((int(m.group(1)), m.group(2)))
        else:
            raise StreamError(f"unexpected line {line!r}")
    if ticks != list(range(1, len(ticks) + 1)):
        raise StreamError("ticks lost, repeated or restarted")
    expected = [(i + 1, s.decode().rstrip("\n")) for i, s in enumerate(sent)]
    if echoes != expected:
        raise StreamError("echoes lost, repeated or out of order")
    return len(ticks)


class _ClientLoop:
    """The asyncio loop that owns every ``LineClient``'s connection, in one daemon thread.

    OpenSSL must not see a read and a write of one connection from two threads at once,
    and a socket timeout in the middle of an SSL write leaves a half-written record: so
    each connection is only ever touched by this loop, and callers hand work in through
    ``run``. One loop for all clients keeps a test's 200 connections on one thread.
    """

    _lock = threading.Lock()
    _loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def get(cls) -> asyncio.AbstractEventLoop:
        with cls._lock:
            if cls._loop is None or cls._loop.is_closed():
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="lab-clients", daemon=True).start()
                cls._loop = loop
            return cls._loop

    @classmethod
    def run(cls, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, cls.get())


class LineClient:
    """A client in this process on a socket from the lab (plain, or TLS with ``ssl=``): a
    line every ``interval``, every byte it gets kept with arrival times. Same checks as a
    Session.

    The socket is handed over to an asyncio loop thread (``_ClientLoop``) that alone does
    its I/O; TLS runs there on asyncio's memory BIOs, so no ``ssl.SSLSocket`` exists. The
    handshake is done when the constructor returns, like ``wrap_socket``'s. Read ``sock``
    only for its addresses, and end the connection with ``close``, not ``sock.close()``.
    """

    def __init__(
        self,
        sock: socket.socket,
        interval: float = 0.2,
        *,
        ssl: ssl_module.SSLContext | None = None,
        server_hostname: str | None = None,
        timeout: float = 60,
    ) -> None:
        if isinstance(sock, ssl_module.SSLSocket):
            raise TypeError("LineClient takes the plain socket and ssl=context, not an SSLSocket")
        self.sock, self.out, self.sent = sock, bytearray(), []
        self.arrivals: list[float] = []
        self.interval = interval
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self._task: concurrent.futures.Future[None] | None = None
        self._streams = _ClientLoop.run(self._connect(ssl, server_hostname, timeout)).result(
            timeout + 5
        )

    async def _connect(
        self, ctx: ssl_module.SSLContext | None, server_hostname: str | None, timeout: float
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(
            sock=self.sock,
            ssl=ctx,
            server_hostname=server_hostname if ctx else None,
            ssl_handshake_timeout=timeout if ctx else None,
            limit=1 << 20,
        )

    def start(self) -> None:
        """Start sending lines and reading what comes back."""
        self._task = _ClientLoop.run(self._run())

    async def _run(self) -> None:
        """The old blocking loop, on the loop: a line when due, else wait for data."""
        reader, writer = self._streams
        reading: asyncio.Future[bytes] | None = None
        next_send = 0.0
        try:
            while not self.stop.is_set() or f"echo {len(self.sent)} ".encode() not in self.out:
                now = time.monotonic()
                if not self.stop.is_set() and now >= next_send:
                    line = b"l-%d\n" % (len(self.sent) + 1)
                    writer.write(line)
                    self.sent.append(line)
                    await writer.drain()
                    next_send = now + self.interval
                # A pending read is kept across waits, never cancelled mid-way: no byte lost.
                reading = reading or asyncio.ensure_future(reader.read(65536))
                wait = self.interval if self.stop.is_set() else next_send - time.monotonic()
                if not (await asyncio.wait({reading}, timeout=max(wait, 0)))[0]:
                    continue
                chunk, reading = reading.result(), None
                if not chunk:
                    raise EOFError("server closed")
                self.out += chunk
                self.arrivals.append(time.monotonic())
        except BaseException as exc:  # kept for the check
            self.error = exc
            raise
        finally:
            if reading is not None:
                reading.cancel()  # the connection stays open, unread, until ``close``

    def finish(self, timeout: float = 30) -> str:
        """Stop sending, wait for the last echo; the stream's text."""
        self.stop.set()
        if self._task is None:
            raise StreamError("the client was never started")
        try:
            self._task.result(timeout)
        except concurrent.futures.TimeoutError:
            self._task.cancel()
            raise StreamError("the last echo never came") from None
        except BaseException as exc:
            raise StreamError(f"the client failed: {exc!r}") from exc
        return self.out.decode(errors="replace")

    def close(self) -> None:
        """Close the connection (in the loop that owns it)."""

        async def close() -> None:
            writer = self._streams[1]
            writer.close()
            with contextlib.suppress(OSError, ssl_module.SSLError):
                await asyncio.wait_for(writer.wait_closed(), 5)

        with contextlib.suppress(TimeoutError):
            _ClientLoop.run(close()).result(10)

    def largest_gap(self, start: float, end: float) -> float:
        times = [t for t in self.arrivals if start <= t <= end]
        return max((b - a for a, b in itertools.pairwise(times)), default=end - start)
