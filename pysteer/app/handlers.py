"""Connection handlers: bytes in, bytes out, and a snapshot that moves with the connection.

A handler never touches a socket: the runtime feeds it ``on_data`` and sends what it
returns. ``snapshot()`` returns plain msgpack-able data and ``restore(snapshot)`` continues
on another host, so an unmodified client sees one continuous application.

Built-ins:
- ``echo``: everything back.
- ``ticker``: a numbered line every ``interval`` seconds, and each client line echoed with
  a per-connection counter, so a client can check both directions and app-state continuity.
- ``http``: HTTP/1.1 keep-alive; ``GET /bytes/N`` returns N deterministic bytes.
Users load their own as ``module:Class``.

``on_tick`` is called every few tens of milliseconds unless the handler class sets
``TICKS = False``. A handler whose output can be large also has ``pull(limit) -> bytes``:
the runtime asks for more only as the socket drains, so the output owed to the peer
(which travels in a migration) stays small.

``restore`` checks every field's type and range and raises ``HandlerError`` (the target
refuses the move before it thaws anything, and the source keeps the connection): a
snapshot comes from another host, and one bad value must not hang or exhaust the daemon
that continues the connection. docs/handlers.md shows how to write one.
"""

from __future__ import annotations

import importlib
import math
import time
from typing import Any, Protocol, runtime_checkable

MAX_LINE = 64 * 1024
MAX_REQUEST_HEAD = 16 * 1024
MAX_BODY = 1 << 31
MAX_COUNTER = (1 << 64) - 1  # counters travel as msgpack integers
MIN_INTERVAL, MAX_INTERVAL = 0.001, 86400.0  # ticker seconds: on_tick's loop stays short
MAX_QUEUE = 1024  # queued http responses (head and body each count): then 503 and close
MAX_HEAD = 1024  # one queued response head (ours are under 200 bytes)
MAX_CLOSING_BUFFER = 1 << 20  # unread bytes after a close: ignored, but bounded
PATTERN = bytes((i * 7 + 3) % 251 for i in range(65536))


class HandlerError(ValueError):
    """A handler cannot be loaded or restored; the message says which and why."""


def _fields(snapshot: Any, app: str, keys: set[str]) -> dict[str, Any]:
    """The snapshot as a map with exactly ``keys``."""
    if not isinstance(snapshot, dict) or set(snapshot) != keys:
        raise HandlerError(f"malformed {app} snapshot: not a map of {', '.join(sorted(keys))}")
    return snapshot


def _int(value: Any, app: str, name: str, lo: int = 0, hi: int = MAX_COUNTER) -> int:
    if type(value) is not int or not lo <= value <= hi:  # bool is no integer here
        raise HandlerError(f"malformed {app} snapshot: {name} must be an integer in {lo}..{hi}")
    return value


def _bytes(value: Any, app: str, name: str, limit: int) -> bytes:
    if not isinstance(value, bytes) or len(value) > limit:
        raise HandlerError(f"malformed {app} snapshot: {name} must be at most {limit} bytes")
    return value


def _seconds(value: Any, what: str, lo: float, hi: float) -> float:
    if type(value) not in (int, float) or not math.isfinite(value) or not lo <= value <= hi:
        raise HandlerError(f"{what} must be a number of seconds in [{lo}, {hi}]")
    return float(value)


@runtime_checkable
class Handler(Protocol):
    def on_connect(self) -> bytes: ...
    def on_data(self, data: bytes) -> bytes: ...
    def on_tick(self, now: float) -> bytes: ...
    def on_close(self) -> None: ...
    def snapshot(self) -> Any: ...
    def restore(self, snapshot: Any) -> None: ...


class Echo:
    TICKS = False  # no periodic output: the runtime need not wake it

    def on_connect(self) -> bytes:
        return b""

    def on_data(self, data: bytes) -> bytes:
        return data

    def on_tick(self, now: float) -> bytes:
        return b""

    def on_close(self) -> None:
        pass

    def snapshot(self) -> Any:
        return {}

    def restore(self, snapshot: Any) -> None:
        if snapshot != {}:
            raise HandlerError("echo has no state to restore")


class Ticker:
    """``tick N`` every ``interval`` seconds; each client line comes back as ``echo N line``."""

    def __init__(self, interval: float = 0.1, clock: Any = time.monotonic) -> None:
        interval = _seconds(interval, "ticker interval", MIN_INTERVAL, MAX_INTERVAL)
        self.interval, self.clock = interval, clock
        self.ticks = 0
        self.echoes = 0
        self.partial = b""
        self.next_tick = clock() + interval

    def on_connect(self) -> bytes:
        return b"ticker ready\n"

    def on_data(self, data: bytes) -> bytes:
        self.partial += data
        out = []
        while b"\n" in self.partial:
            line, self.partial = self.partial.split(b"\n", 1)
            self.echoes += 1
            out.append(b"echo %d %s\n" % (self.echoes, line))
        if len(self.partial) > MAX_LINE:
            self.partial = b""
            out.append(b"error line too long\n")
        return b"".join(out)

    def on_tick(self, now: float) -> bytes:
        out = []
        while now >= self.next_tick:
            self.ticks += 1
            out.append(b"tick %d\n" % self.ticks)
            self.next_tick += self.interval
        return b"".join(out)

    def on_close(self) -> None:
        pass

    def snapshot(self) -> Any:
        # Clocks differ between hosts: the next tick travels as time remaining.
        remaining = min(self.interval, max(0.0, self.next_tick - self.clock()))
        return {
            "ticks": self.ticks,
            "echoes": self.echoes,
            "partial": self.partial,
            "interval": self.interval,
            "next_in": remaining,
        }

    def restore(self, snapshot: Any) -> None:
        s = _fields(snapshot, "ticker", {"ticks", "echoes", "partial", "interval", "next_in"})
        ticks, echoes = _int(s["ticks"], "ticker", "ticks"), _int(s["echoes"], "ticker", "echoes")
        partial = _bytes(s["partial"], "ticker", "partial", MAX_LINE)
        what = "malformed ticker snapshot: "
        interval = _seconds(s["interval"], what + "interval", MIN_INTERVAL, MAX_INTERVAL)
        next_in = _seconds(s["next_in"], what + "next_in", 0.0, MAX_INTERVAL)
        self.ticks, self.echoes, self.partial, self.interval = ticks, echoes, partial, interval
        self.next_tick = self.clock() + min(next_in, interval)  # never more than one interval


def http_body(n: int, offset: int = 0) -> bytes:
    """Bytes ``offset`` to ``offset + n`` of the deterministic body of ``GET /bytes/N``."""
    start = offset % len(PATTERN)
    return (PATTERN[start:] + PATTERN * (n // len(PATTERN) + 1))[:n]


class Http:
    """HTTP/1.1 with keep-alive: ``GET /bytes/N`` (N deterministic bytes), else 404.

    Bodies stream: ``on_data`` queues each response and ``pull`` produces it as the
    connection takes it, so a moving connection carries a position, not the body.
    """

    TICKS = False  # idle keep-alive connections cost nothing between requests

    def __init__(self) -> None:
        self.buffer = b""
        self.requests = 0
        self.closing = False
        self.queue: list[list[Any]] = []  # ["raw", bytes] or ["body", offset, remaining]

    def on_connect(self) -> bytes:
        return b""

    def on_data(self, data: bytes) -> bytes:
        if self.closing:
            return b""
        self.buffer += data
        while b"\r\n\r\n" in self.buffer and not self.closing:
            if len(self.queue) >= MAX_QUEUE - 2:  # a client that sends and never reads
                self.closing = True
                self.queue.append(["raw", _head(503, 0, close=True)])
                break
            head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            self._respond(head)
        if len(self.buffer) > MAX_REQUEST_HEAD and not self.closing:
            self.closing = True
            self.queue.append(["raw", _head(431, 0, close=True)])
        if self.closing:
            self.buffer = b""  # never read again
        return b""  # the responses come out through pull()

    def pull(self, limit: int) -> bytes:
        """Up to ``limit`` bytes of the queued responses (b"" when all are out)."""
        out = bytearray()
        while self.queue and len(out) < limit:
            item = self.queue[0]
            if item[0] == "raw":
                out += item[1]
                self.queue.pop(0)
                continue
            n = min(limit - len(out), item[2])
            out += http_body(n, item[1])
            item[1] += n
            item[2] -= n
            if item[2] == 0:
                self.queue.pop(0)
        return bytes(out)

    def _respond(self, head: bytes) -> None:
        self.requests += 1
        lines = head.split(b"\r\n")
        parts = lines[0].split()
        close = any(ln.lower().replace(b" ", b"") == b"connection:close" for ln in lines[1:])
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            self.closing = True
            self.queue.append(["raw", _head(400, 0, close=True)])
            return
        method, path = parts[0], parts[1]
        length, status = 0, 404
        if method != b"GET":
            status = 405
        elif path.startswith(b"/bytes/") and path[7:].isdigit() and int(path[7:]) <= MAX_BODY:
            length, status = int(path[7:]), 200
        self.closing = close
        self.queue.append(["raw", _head(status, length, close=close)])
        if length:
            self.queue.append(["body", 0, length])

    def on_tick(self, now: float) -> bytes:
        return b""

    def on_close(self) -> None:
        pass

    def snapshot(self) -> Any:
        return {
            "buffer": self.buffer,
            "requests": self.requests,
            "closing": self.closing,
            "queue": self.queue,
        }

    def restore(self, snapshot: Any) -> None:
        s = _fields(snapshot, "http", {"buffer", "requests", "closing", "queue"})
        closing = s["closing"]
        if type(closing) is not bool:
            raise HandlerError("malformed http snapshot: closing must be a boolean")
        # Older versions kept unread bytes after a close; they are never read: accept, drop.
        limit = MAX_CLOSING_BUFFER if closing else MAX_REQUEST_HEAD
        buffer = _bytes(s["buffer"], "http", "buffer", limit)
        requests = _int(s["requests"], "http", "requests")
        queue = s["queue"]
        if not isinstance(queue, list | tuple) or len(queue) > MAX_QUEUE:
            raise HandlerError(
                f"malformed http snapshot: queue must be a list of at most {MAX_QUEUE} items"
            )
        self.buffer, self.requests, self.closing = b"" if closing else buffer, requests, closing
        self.queue = [_queued(item) for item in queue]


def _queued(item: Any) -> list[Any]:
    """One queued response part, checked: ["raw", head] or ["body", offset, remaining]."""
    if isinstance(item, list | tuple) and len(item) == 2 and item[0] == "raw":
        return ["raw", _bytes(item[1], "http", "a queued head", MAX_HEAD)]
    if isinstance(item, list | tuple) and len(item) == 3 and item[0] == "body":
        offset = _int(item[1], "http", "a body offset", 0, MAX_BODY - 1)
        remaining = _int(item[2], "http", "a body's remaining length", 1, MAX_BODY - offset)
        return ["body", offset, remaining]
    raise HandlerError("malformed http snapshot: a queue item is neither raw nor body")


_REASONS = {
    200: b"OK",
    400: b"Bad Request",
    404: b"Not Found",
    405: b"Method Not Allowed",
    431: b"Request Header Fields Too Large",
    503: b"Service Unavailable",
}


def _head(status: int, length: int, *, close: bool) -> bytes:
    head = b"HTTP/1.1 %d %s\r\nContent-Type: application/octet-stream\r\n" % (
        status,
        _REASONS[status],
    )
    head += b"Content-Length: %d\r\n" % length
    if close:
        head += b"Connection: close\r\n"
    return head + b"\r\n"


BUILTIN: dict[str, type] = {"echo": Echo, "ticker": Ticker, "http": Http}


def load_handler(spec: str) -> type:
    """A handler class: a built-in name (echo, ticker, http) or ``module:Class``."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    module_name, sep, class_name = spec.partition(":")
    if not sep or not module_name or not class_name:
        raise HandlerError(f"unknown app {spec!r}: use {', '.join(BUILTIN)} or module:Class")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise HandlerError(f"cannot import {module_name!r}: {exc}") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise HandlerError(f"module {module_name!r} has no {class_name!r}")
    missing = [
        m
        for m in ("on_connect", "on_data", "on_close", "snapshot", "restore")
        if not callable(getattr(cls, m, None))
    ]
    if missing:
        raise HandlerError(f"{spec} is not a handler: it lacks {', '.join(missing)}")
    return cls
