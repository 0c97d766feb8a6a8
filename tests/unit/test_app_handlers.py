"""The built-in app handlers, and app state moving through a msgpack snapshot."""

import hashlib
import math
from typing import Any

import msgpack
import pytest

from pysteer.app import Echo, HandlerError, Http, Ticker, load_handler
from pysteer.app.handlers import http_body
from pysteer.app.runtime import AdoptError, Exported, Runtime, Service


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
    with pytest.raises(HandlerError, match="interval must be a number of seconds"):
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
    assert [(s, len(b), c) for s, b, c in responses] == [
        (200, 70000, False),
        (200, 3, False),
        (404, 0, True),
    ]
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


def ticker_snapshot(**changes):
    return {"ticks": 3, "echoes": 2, "partial": b"par", "interval": 0.5, "next_in": 0.2} | changes


def http_snapshot(**changes):
    return {
        "buffer": b"GET /",
        "requests": 1,
        "closing": False,
        "queue": [["raw", b"HTTP/1.1 200 OK\r\n\r\n"], ["body", 10, 20]],
    } | changes


def bad(cls: type, **changes: Any) -> list[tuple[type, str, Any]]:
    """One bad snapshot per value: each field of a good snapshot replaced in turn."""
    good = ticker_snapshot if cls is Ticker else http_snapshot
    ((key, values),) = changes.items()
    return [(cls, f"{key}={v!r:.24}", good(**{key: v})) for v in values]


BAD_SNAPSHOTS = [
    (Echo, "None", None),
    (Echo, "list", []),
    (Echo, "state", {"x": 1}),
    (Ticker, "None", None),
    (Ticker, "list", [1, 2]),
    (Ticker, "missing", {"ticks": 1}),
    (Ticker, "extra", ticker_snapshot(extra=1)),
    *bad(Ticker, interval=[0, 0.0, -1, -0.5, math.nan, math.inf, 1e-9, 1e9, "0.5", True, None]),
    *bad(Ticker, next_in=[-1.0, math.nan, math.inf, -math.inf, 1e12, "0", None]),
    *bad(Ticker, ticks=[-1, 1 << 64, 1.5, True, "3", None]),
    *bad(Ticker, echoes=[-1, 1 << 64, 2.0, False]),
    *bad(Ticker, partial=["text", 100_000, [1, 2], None, b"x" * (64 * 1024 + 1)]),
    (Http, "None", None),
    (Http, "missing", {"buffer": b""}),
    (Http, "extra", http_snapshot(extra=1)),
    *bad(Http, buffer=["text", 100_000, [1], b"x" * (16 * 1024 + 1)]),
    *bad(Http, requests=[-1, 1 << 64, 1.0, True, "1"]),
    *bad(Http, closing=[1, 0, "yes", None]),
    *bad(
        Http,
        queue=[
            None,
            "raw",
            {"raw": b""},
            [["raw", b"x"]] * 1025,
            [["raw"]],
            [["raw", "text"]],
            [["raw", b"x" * 1025]],
            [["body", -1, 5]],
            [["body", 0, 0]],
            [["body", 0, 1 << 40]],
            [["body", (1 << 31) - 1, 2]],
            [["body", True, 1]],
            [["body", 0, 1.5]],
            [["x", 1]],
            [[]],
            [None],
            [["body", 0, 1, 2]],
        ],
    ),
]


@pytest.mark.parametrize(
    ("cls", "snapshot"),
    [(cls, snap) for cls, _, snap in BAD_SNAPSHOTS],
    ids=[f"{cls.__name__}-{label}" for cls, label, _ in BAD_SNAPSHOTS],
)
def test_every_snapshot_field_is_checked(cls, snapshot) -> None:
    """A bad value from another host is refused at restore: nothing hangs (a ticker with
    interval 0 looped for ever), allocates (bytes(N) of an integer) or fails later."""
    handler = cls()
    with pytest.raises(HandlerError, match=f"{cls.__name__.lower()}"):
        handler.restore(snapshot)


def test_good_snapshots_restore_and_keep_their_bounds() -> None:
    clock = Clock()
    t = Ticker(clock=clock)
    t.restore(ticker_snapshot(interval=1, next_in=0))  # integers are numbers too
    assert t.on_tick(clock.now) == b"tick 4\n"
    t.restore(ticker_snapshot(next_in=0.5000001))  # clock rounding: at most one interval
    assert t.next_tick == clock.now + 0.5
    assert t.snapshot()["next_in"] <= t.interval
    h = Http()
    h.restore(http_snapshot())
    assert h.pull(100).startswith(b"HTTP/1.1 200 OK")
    # Older versions kept unread bytes after a close: accepted, and dropped.
    h.restore(http_snapshot(closing=True, buffer=b"x" * 50_000))
    assert h.buffer == b"" and h.snapshot()["buffer"] == b""
    Echo().restore({})


def test_http_pipelining_is_bounded() -> None:
    """A client that pipelines requests and never reads gets a 503 and no more answers, so
    the queue (which travels in a move) stays within what restore accepts."""
    h = Http()
    h.on_data(b"GET /bytes/5 HTTP/1.1\r\n\r\n" * 5000)
    assert len(h.queue) <= 1024  # handlers.MAX_QUEUE
    assert h.closing and h.buffer == b""
    fresh = moved(h, Http)
    responses = _parse(served(fresh, b""))
    assert responses[-1] == (503, b"", True)
    assert [s for s, _, _ in responses[:-1]] == [200] * (len(responses) - 1)


def test_runtime_refuses_a_bad_snapshot_at_prepare() -> None:
    """The runtime's contract: restore's HandlerError becomes AdoptError in ``build``,
    before the migration's commit point."""
    runtime = Runtime([Service(80, "ticker")], "127.0.0.1")
    app = {"app": "ticker", "v": 1, "state": ticker_snapshot(interval=0)}
    exported = Exported(None, None, None, app, b"", 80, {})  # type: ignore[arg-type]
    with pytest.raises(AdoptError, match=r"ticker refused the snapshot: .*interval"):
        runtime.build(None, exported)  # type: ignore[arg-type]
