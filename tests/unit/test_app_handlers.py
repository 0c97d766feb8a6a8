"""The built-in app handlers, and app state moving through a msgpack snapshot."""

import hashlib

import msgpack
import pytest

from pysteer.app import Echo, HandlerError, Http, Ticker, load_handler
from pysteer.app.handlers import http_body


def moved(handler, factory):
    """The same handler after a snapshot travelled through msgpack to a fresh instance."""
    fresh = factory()
    fresh.restore(msgpack.unpackb(msgpack.packb(handler.snapshot())))
    return fresh


def test_echo() -> None:
    h = Echo()
    assert h.on_data(b"abc") == b"abc"
    assert moved(h, Echo).on_data(b"x") == b"x"
    with pytest.raises(HandlerError):
        Echo().restore({"x": 1})


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_ticker_counts_continue_across_a_move() -> None:
    clock = Clock()
    t = Ticker(interval=0.5, clock=clock)
    assert t.on_connect() == b"ticker ready\n"
    assert t.on_tick(clock.now) == b""
    clock.now += 1.0
    assert t.on_tick(clock.now) == b"tick 1\ntick 2\n"
    assert t.on_data(b"hello\nwor") == b"echo 1 hello\n"
    clock.now += 0.2  # 0.3 s left until tick 3
    other_clock = Clock()
    other_clock.now = 5000.0  # another host's monotonic clock
    t2 = Ticker(interval=9, clock=other_clock)
    t2.restore(msgpack.unpackb(msgpack.packb(t.snapshot())))
    assert t2.on_data(b"ld\n") == b"echo 2 world\n"  # the partial line moved too
    assert t2.on_tick(other_clock.now + 0.29) == b""
    assert t2.on_tick(other_clock.now + 0.31) == b"tick 3\n"
    with pytest.raises(HandlerError, match="malformed ticker snapshot"):
        Ticker().restore({"ticks": 1})
    with pytest.raises(HandlerError, match="interval must be positive"):
        Ticker(interval=0)


def _parse(stream: bytes) -> list[tuple[int, bytes, bool]]:
    """(status, body, close) of each response in ``stream``."""
    out = []
    while stream:
        head, stream = stream.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        length = next(int(ln.split(b":")[1]) for ln in lines if ln.startswith(b"Content-Length"))
        out.append((int(lines[0].split()[1]), stream[:length], b"Connection: close" in head))
        stream = stream[length:]
    return out


def served(h: Http, data: bytes, limit: int = 1000) -> bytes:
    """What the runtime would send: on_data's output, then pull() until it runs dry."""
    out = h.on_data(data)
    while chunk := h.pull(limit):
        assert len(chunk) <= limit + 200  # a response head may exceed it a little
        out += chunk
    return out


def test_http_keep_alive_and_a_move_mid_request() -> None:
    h = Http()
    first = h.on_data(b"GET /bytes/70000 HTTP/1.1\r\nHost: x\r\n\r\nGET /bytes/3 HTTP/1.1\r\nHo")
    first += h.pull(30000)  # part of the body is out, the rest is a position
    h2 = moved(h, Http)  # the second request's head is half there, the body half sent
    assert len(msgpack.packb(h2.snapshot())) < 200
    rest = served(h2, b"st: x\r\n\r\nGET /nope HTTP/1.1\r\nConnection: close\r\n\r\n")
    responses = _parse(first + rest)
    assert [(s, len(b), c) for s, b, c in responses] == [(200, 70000, False), (200, 3, False),
                                                          (404, 0, True)]  # fmt: skip
    assert hashlib.sha256(responses[0][1]).digest() == hashlib.sha256(http_body(70000)).digest()
    assert h2.requests == 3
    assert served(h2, b"GET /bytes/1 HTTP/1.1\r\n\r\n") == b""  # closing: nothing more
    with pytest.raises(HandlerError, match="malformed http snapshot"):
        Http().restore(h2.snapshot() | {"queue": [["body", -1, 5]]})


def test_http_bad_requests() -> None:
    assert _parse(served(Http(), b"garbage\r\n\r\n"))[0][0] == 400
    assert _parse(served(Http(), b"POST /bytes/1 HTTP/1.1\r\n\r\n"))[0][0] == 405
    h = Http()
    assert _parse(served(h, b"GET /" + b"a" * 20000))[0][0] == 431
    assert h.closing


def test_load_handler() -> None:
    assert load_handler("ticker") is Ticker
    assert load_handler("pysteer.app.handlers:Http") is Http
    for spec, message in [
        ("nope", "unknown app 'nope'"),
        ("no.such.module:X", "cannot import 'no.such.module'"),
        ("pysteer.app.handlers:Missing", "has no 'Missing'"),
        ("pysteer.app.handlers:HandlerError", "is not a handler: it lacks on_connect"),
    ]:
        with pytest.raises(HandlerError, match=message):
            load_handler(spec)


def test_http_body_at_an_offset() -> None:
    """What a streamed download continues with after a move: the body from its position."""
    body = http_body(200_000)
    assert http_body(50_000, 150_000) == body[150_000:]
    assert http_body(10, 65530) == body[65530:65540]
