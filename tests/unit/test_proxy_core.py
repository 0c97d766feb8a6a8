"""The proxy cores without a socket: what reaches the backend, what reaches the client,
and exactly when a connection is at a boundary (may move) — for every HTTP/1.1 framing
h11 knows, pipelining, 1xx, Upgrade and CONNECT, a backend that fails, and garbage."""

from __future__ import annotations

from typing import Any

import pytest

from pysteer.app.handlers import HandlerError
from pysteer.proxy import HttpProxy, TcpProxy, make_spec, proxyv2
from pysteer.proxy.spec import SpecError, parse_backend

CLIENT, LOCAL = ("10.77.1.2", 40000), ("10.77.100.1", 443)


def core(**kw: Any) -> HttpProxy:
    return HttpProxy(make_spec("127.0.0.1:8080", **kw), CLIENT, LOCAL, True)


def connected(**kw: Any) -> HttpProxy:
    c = core(**kw)
    c.backend_opened()
    return c


def test_a_get_is_relayed_with_forwarding_headers_and_ends_at_a_boundary() -> None:
    c = core()
    assert c.at_boundary(0) and c.reading_client()
    assert c.on_data(b"GET /a HTTP/1.1\r\nHost: vip\r\nConnection: keep-alive\r\n\r\n") == b""
    assert c.wants_backend() and not c.at_boundary(0)
    c.backend_opened()
    assert c.backend_output() == (
        b"GET /a HTTP/1.1\r\nHost: vip\r\nX-Forwarded-For: 10.77.1.2\r\n"
        b"X-Forwarded-Proto: https\r\n\r\n"
    )
    out = c.on_backend(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nKeep-Alive: timeout=5\r\n\r\nab")
    assert out == b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nab"  # hop-by-hop dropped
    assert not c.at_boundary(0)
    assert c.on_backend(b"c") == b"c"
    assert c.at_boundary(0) and (c.requests, c.responses) == (1, 1)
    assert c.snapshot() == {"requests": 1, "responses": 1}


def test_an_existing_x_forwarded_for_is_extended_and_forwarded_is_an_option() -> None:
    c = connected()
    c.on_data(b"GET / HTTP/1.1\r\nHost: v\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n")
    assert b"X-Forwarded-For: 1.2.3.4, 10.77.1.2\r\n" in c.backend_output()
    v6 = HttpProxy(make_spec("127.0.0.1:1", forwarded="forwarded"), ("fd70::2", 5), LOCAL, False)
    v6.backend_opened()
    v6.on_data(b"GET / HTTP/1.1\r\nHost: v\r\n\r\n")
    assert b'Forwarded: for="[fd70::2]:5";proto=http\r\n' in v6.backend_output()
    none = connected(forwarded="none")
    none.on_data(b"GET / HTTP/1.1\r\nHost: v\r\n\r\n")
    assert b"Forwarded" not in none.backend_output()


def test_proxy_protocol_v2_header_opens_each_fresh_backend_connection_only() -> None:
    c = connected(proxy_protocol="v2")
    data = c.backend_output()
    client, local, n = proxyv2.parse(data)
    assert (client, local, n) == (CLIENT, LOCAL, 28)
    resumed = core(proxy_protocol="v2")
    resumed.backend_opened(fresh=False)  # a connection rolled back keeps its backend
    assert resumed.backend_output() == b""
    six = proxyv2.header(("fd70::2", 1), ("fd70::64", 443))
    assert proxyv2.parse(six)[:2] == (("fd70::2", 1), ("fd70::64", 443))
    assert (
        proxyv2.parse(proxyv2.header(("::ffff:10.0.0.1", 1), ("10.0.0.2", 2)))[0][0] == "10.0.0.1"
    )
    with pytest.raises(ValueError):
        proxyv2.parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n")


def test_chunked_request_body_streams_and_the_boundary_waits_for_the_response() -> None:
    c = connected()
    c.on_data(b"POST /up HTTP/1.1\r\nHost: v\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    assert c.cl.their_state.__name__ == "SEND_BODY" and c.reading_client()
    c.on_data(b"0\r\n\r\n")
    sent = c.backend_output()
    assert sent.endswith(b"5\r\nhello\r\n0\r\n\r\n") and b"chunked" in sent
    assert not c.at_boundary(0)
    c.on_backend(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert c.at_boundary(0)


def test_pipelined_requests_go_one_at_a_time_and_are_no_boundary() -> None:
    c = connected()
    c.on_data(b"GET /1 HTTP/1.1\r\nHost: v\r\n\r\nGET /2 HTTP/1.1\r\nHost: v\r\n\r\n")
    assert c.backend_output().count(b"GET ") == 1
    c.on_backend(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n1")
    assert c.backend_output().startswith(b"GET /2 ")  # the next one now
    assert not c.at_boundary(0)
    c.on_backend(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n2")
    assert c.at_boundary(0) and c.requests == 2


def test_held_at_the_boundary_the_next_request_is_not_read() -> None:
    c = connected()
    c.hold = True
    assert not c.reading_client()  # the next request waits in the socket
    c.on_data(b"GET /partial HTTP/1.1\r\nHo")  # read before the hold: finished first
    assert c.reading_client() and not c.at_boundary(0)
    c.on_data(b"st: v\r\n\r\n")
    assert not c.reading_client()  # complete: more bytes would be the next request
    assert c.backend_output().startswith(b"GET /partial ")
    c.on_backend(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert c.at_boundary(0) and not c.reading_client()
    c.hold = False
    assert c.reading_client()


def test_head_100_continue_and_early_hints_are_relayed() -> None:
    c = connected()
    c.on_data(b"HEAD /f HTTP/1.1\r\nHost: v\r\n\r\n")
    c.backend_output()
    out = c.on_backend(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
    assert out == b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" and c.at_boundary(0)
    c.on_data(b"PUT /f HTTP/1.1\r\nHost: v\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
    assert b"Expect: 100-continue" in c.backend_output()
    assert c.on_backend(b"HTTP/1.1 100 Continue\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
    c.on_data(b"ok")
    assert c.backend_output() == b"ok"
    out = c.on_backend(
        b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\nHTTP/1.1 201 Created\r\n"
    )
    assert out.startswith(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n")
    c.on_backend(b"Content-Length: 0\r\n\r\n")
    assert c.at_boundary(0)


def test_connection_close_from_the_client_ends_after_the_response() -> None:
    c = connected()
    c.on_data(b"GET / HTTP/1.1\r\nHost: v\r\nConnection: close\r\n\r\n")
    assert b"Connection" not in c.backend_output()  # hop-by-hop: not forwarded
    out = c.on_backend(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx")
    assert b"Connection: close" in out and c.finished() and not c.at_boundary(0)


def test_a_backend_that_closes_is_replaced_and_the_client_stays() -> None:
    c = connected()
    c.on_data(b"GET / HTTP/1.1\r\nHost: v\r\n\r\n")
    c.backend_output()
    out = c.on_backend(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx")
    assert b"close" not in out.lower() and not c.finished()
    assert c.drop_backend() and c.be is None and c.at_boundary(0)
    c.on_data(b"GET /2 HTTP/1.1\r\nHost: v\r\n\r\n")
    assert c.wants_backend()


def test_the_keep_alive_race_resends_an_idempotent_request_once() -> None:
    c = connected()
    c.on_data(b"GET /1 HTTP/1.1\r\nHost: v\r\n\r\n")
    c.on_backend(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    c.on_data(b"GET /2 HTTP/1.1\r\nHost: v\r\n\r\n")
    c.backend_output()
    assert c.on_backend(b"") == b""  # the reused connection closed before answering
    assert c.drop_backend() and c.wants_backend()
    c.backend_opened()
    assert c.backend_output().startswith(b"GET /2 ")
    assert c.on_backend(b"").startswith(b"HTTP/1.1 502 ")  # a fresh one too: give up
    assert c.finished()


def test_an_unreachable_backend_answers_502_and_a_post_is_never_resent() -> None:
    c = core()
    c.on_data(b"POST /x HTTP/1.1\r\nHost: v\r\nContent-Length: 1\r\n\r\nz")
    out = c.backend_failed("Connection refused")
    assert out.startswith(b"HTTP/1.1 502 ") and b"Connection: close" in out and c.finished()
    d = connected()
    d.on_data(b"GET /1 HTTP/1.1\r\nHost: v\r\n\r\n")
    d.on_backend(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    d.on_data(b"POST /2 HTTP/1.1\r\nHost: v\r\nContent-Length: 1\r\n\r\nz")
    assert d.on_backend(b"").startswith(b"HTTP/1.1 502 ")


def test_a_response_cut_short_ends_the_client_connection() -> None:
    c = connected()
    c.on_data(b"GET / HTTP/1.1\r\nHost: v\r\n\r\n")
    c.on_backend(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    c.on_backend(b"")
    assert c.finished()
    d = connected()
    d.on_data(b"GET / HTTP/1.1\r\nHost: v\r\n\r\n")
    assert d.on_backend(b"garbage\r\n\r\n").startswith(b"HTTP/1.1 502 ") and d.finished()


@pytest.mark.parametrize(
    "garbage",
    [
        b"NOT HTTP\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",  # no Host
        b"GET / HTTP/1.1\r\nHost: v\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: v\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: v\r\n" + b"X: " + b"a" * 200_000 + b"\r\n\r\n",
    ],
)
def test_garbage_gets_400_and_the_end(garbage: bytes) -> None:
    c = connected()
    out = b""
    for i in range(0, len(garbage), 16384):  # as a socket gives it
        if c.reading_client():
            out += c.on_data(garbage[i : i + 16384])
    assert out.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 431 ", b"HTTP/1.1 501 ")), out
    assert c.finished() and c.backend_output() == b""
    assert c.on_data(b"GET / HTTP/1.1\r\nHost: v\r\n\r\n") == b""


def test_connection_listed_headers_are_dropped_but_never_the_framing() -> None:
    c = connected()
    c.on_data(
        b"POST / HTTP/1.1\r\nHost: v\r\nConnection: content-length, x-secret\r\n"
        b"X-Secret: 1\r\nContent-Length: 2\r\n\r\nab"
    )
    sent = c.backend_output()
    assert b"X-Secret" not in sent and b"Connection" not in sent
    assert b"\r\nContent-Length: 2\r\n" in sent and sent.endswith(b"\r\n\r\nab")


def test_an_upgrade_becomes_a_tunnel_that_is_not_movable() -> None:
    c = connected()
    c.on_data(b"GET /ws HTTP/1.1\r\nHost: v\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    assert b"Upgrade: websocket\r\nConnection: Upgrade" in c.backend_output()
    out = c.on_backend(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\n\r\n\x81\x02hi"
    )
    assert out.endswith(b"\r\n\r\n\x81\x02hi") and c.tunnel
    assert c.not_movable and "websocket" in c.not_movable and not c.at_boundary(0)
    c.on_data(b"\x81\x82abcd")
    assert c.backend_output() == b"\x81\x82abcd"


def test_an_upgrade_the_backend_declines_stays_movable() -> None:
    c = connected()
    c.on_data(b"GET /ws HTTP/1.1\r\nHost: v\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    c.backend_output()
    c.on_backend(b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 0\r\n\r\n")
    assert not c.tunnel and c.not_movable is None and c.at_boundary(0)


def test_connect_becomes_a_tunnel() -> None:
    c = connected()
    c.on_data(b"CONNECT db:5432 HTTP/1.1\r\nHost: db:5432\r\n\r\n")
    c.backend_output()
    c.on_backend(b"HTTP/1.1 200 Connection established\r\n\r\n")
    assert c.tunnel and c.not_movable is not None and "CONNECT" in c.not_movable


@pytest.mark.parametrize(
    "snapshot",
    [
        None,
        {},
        {"requests": -1, "responses": 0},
        {"requests": True, "responses": 0},
        {"requests": 1, "responses": 1, "extra": 1},
        {"requests": 1 << 64, "responses": 0},
    ],
)
def test_bad_snapshots_are_refused(snapshot: Any) -> None:
    with pytest.raises(HandlerError):
        core().restore(snapshot)
    with pytest.raises(HandlerError):
        TcpProxy(make_spec("127.0.0.1:1", protocol="tcp"), CLIENT, LOCAL, False).restore(snapshot)


def test_a_snapshot_is_taken_only_at_a_boundary() -> None:
    c = connected()
    c.on_data(b"GET / HTTP/1.1\r\nHost: v\r\n\r\n")
    with pytest.raises(RuntimeError):
        c.snapshot()


def test_tcp_core_is_quiet_after_idle_ms_with_nothing_buffered() -> None:
    now = [100.0]
    t = TcpProxy(
        make_spec("127.0.0.1:1", protocol="tcp", idle_ms=200),
        CLIENT,
        LOCAL,
        False,
        clock=lambda: now[0],
    )
    assert t.wants_backend() and not t.at_boundary(now[0])
    t.backend_opened()
    t.on_data(b"ping")
    now[0] += 0.3
    assert not t.at_boundary(now[0])  # owed to the backend still
    assert t.backend_output() == b"ping" and t.at_boundary(now[0])
    assert t.on_backend(b"pong") == b"pong" and not t.at_boundary(now[0])
    assert t.next_check(now[0]) == pytest.approx(0.2)
    now[0] += 0.2
    assert t.at_boundary(now[0]) and t.snapshot() == {"up": 4, "down": 4}
    t.on_backend(b"")
    assert t.finished()


@pytest.mark.parametrize(
    ("words", "error"),
    [
        ({"backend": "localhost:80"}, "not an IP address"),
        ({"backend": "::1:80"}, "brackets"),
        ({"backend": "[10.0.0.1]:80"}, "IPv6 addresses only"),
        ({"backend": "127.0.0.1:0"}, "1..65535"),
        ({"backend": "127.0.0.1"}, "ADDRESS:PORT"),
        ({"backend": "127.0.0.1:80", "protocol": "http/2"}, "protocol must be"),
        ({"backend": "127.0.0.1:80", "proxy_protocol": "v1"}, "v2"),
        ({"backend": "127.0.0.1:80", "forwarded": "x-real-ip"}, "forwarded must be"),
        ({"backend": "127.0.0.1:80", "protocol": "tcp", "forwarded": "none"}, "forwarded is for"),
        ({"backend": "127.0.0.1:80", "idle_ms": 100}, "idle_ms is for"),
        ({"backend": "127.0.0.1:80", "protocol": "tcp", "idle_ms": 5}, "idle_ms must be"),
    ],
)
def test_bad_proxy_settings_are_refused(words: dict[str, Any], error: str) -> None:
    with pytest.raises(SpecError, match=error):
        make_spec(**words)


def test_backend_addresses_parse() -> None:
    assert parse_backend("[::1]:8080") == ("::1", 8080)
    assert parse_backend("127.0.0.1:80") == ("127.0.0.1", 80)
    assert make_spec("127.0.0.1:80", proxy_protocol="v2").forwarded == "none"
    assert make_spec("127.0.0.1:80").kind == "proxy/http/1.1"


def test_a_silent_backend_gets_the_client_a_504_or_the_end() -> None:
    c = connected()
    assert not c.waiting_for_backend()
    c.on_data(b"GET /slow HTTP/1.1\r\nHost: v\r\n\r\n")
    assert c.waiting_for_backend()
    out = c.backend_timed_out()
    assert out.startswith(b"HTTP/1.1 504 ") and b"Connection: close" in out and c.finished()
    d = connected()
    d.on_data(b"GET /slow HTTP/1.1\r\nHost: v\r\n\r\n")
    d.on_backend(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    assert d.waiting_for_backend()
    assert d.backend_timed_out() == b"" and d.finished()  # cut short: only the end is left
    e = connected()
    e.on_data(b"GET / HTTP/1.1\r\nHost: v\r\n\r\n")
    e.on_backend(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert not e.waiting_for_backend()  # answered: nothing is owed


@pytest.mark.parametrize("value", [0.5, 3601, "60", True])
def test_read_timeout_is_checked(value: Any) -> None:
    with pytest.raises(SpecError, match="read_timeout must be"):
        make_spec("127.0.0.1:80", read_timeout=value)
    assert make_spec("127.0.0.1:80", read_timeout=5).read_timeout == 5.0
    with pytest.raises(SpecError, match="read_timeout is for"):
        make_spec("127.0.0.1:80", protocol="tcp", read_timeout=5)
