"""The HTTP/1.1 proxy core: a client's keep-alive connection, relayed request by request
to a connection of its own to the backend, and movable between requests.

Two h11 state machines do the parsing: one speaks as the server to the client, one as
the client to the backend. Relaying parsed events (rather than bytes) is what makes the
request boundary exact: chunked and Content-Length bodies, HEAD, 1xx, ``Expect:
100-continue``, ``Connection: close`` and pipelining are h11's to get right, and the
backend sees a request only once it is whole and well-formed.

At a boundary (the last response fully handed to the client, no byte of the next
request forwarded, nothing buffered) the connection holds no HTTP state: a move takes
the client's TCP and TLS state and two counters, and the new host opens its own
backend connection. ``hold`` (set by a move) stops reading the client there, so the
next request waits in the socket's receive queue, which moves with it.

``Upgrade`` (WebSocket) and ``CONNECT`` turn the connection into a byte tunnel once the
backend agrees: its state is then the backend's, and it is marked not movable.
"""

from __future__ import annotations

from typing import Any

import h11

from pysteer.app.handlers import HandlerError
from pysteer.proxy.proxyv2 import header
from pysteer.proxy.spec import ProxySpec, RelayCore

MAX_HEAD = 64 * 1024  # a request or response head
HIGH_WATER = 256 * 1024  # bytes owed to the backend before the client is not read
PIPELINE_BUFFER = 64 * 1024  # a pipelining client's queued requests, read ahead at most
MAX_COUNT = (1 << 63) - 1
HOP_BY_HOP = {
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"te",
    b"trailer",
    b"upgrade",
}
FRAMING = {b"content-length", b"transfer-encoding", b"host"}  # never dropped by Connection:
IDLE_BOTH = {h11.CLIENT: h11.IDLE, h11.SERVER: h11.IDLE}
IDEMPOTENT = {b"GET", b"HEAD", b"OPTIONS"}


class HttpProxy(RelayCore):
    """One client connection's HTTP/1.1 relay (sans-IO; see the module docstring)."""

    def __init__(
        self, spec: ProxySpec, client: tuple[str, int], local: tuple[str, int], tls: bool
    ) -> None:
        self.spec, self.client, self.local, self.tls = spec, client, local, tls
        self.cl = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self.be: h11.Connection | None = None  # the backend's side, while connected
        self.hold = False
        self.not_movable: str | None = None
        self.tunnel = False
        self.requests = 0  # requests forwarded
        self.responses = 0  # responses completed
        self._to_backend = bytearray()
        self._queued: list[Any] = []  # request events waiting for a backend connection
        self._drop = False
        self._done = False
        self._started = False  # the current request's response has begun
        self._answered = False  # ...and ended: the rest of the request body is discarded
        self._upgrade: str | None = None  # the request in flight asks for a tunnel
        self._retry: list[Any] | None = None  # an idempotent request, resent once if a
        self._reused = False  # reused backend connection closed before answering it

    # --- the handler methods ----------------------------------------------------------
    def on_data(self, data: bytes) -> bytes:
        """Bytes from the client; returns bytes for the client (an error response)."""
        if self._done:
            return b""
        if self.tunnel:
            self._to_backend += data
            return b""
        self.cl.receive_data(data)
        return self._pump_client()

    def snapshot(self) -> Any:
        if not self.at_boundary(0.0):  # the runtime moves a proxy only at a boundary
            raise RuntimeError("an HTTP proxy connection moves only between requests")
        return {"requests": self.requests, "responses": self.responses}

    def restore(self, snapshot: Any) -> None:
        if not isinstance(snapshot, dict) or set(snapshot) != {"requests", "responses"}:
            raise HandlerError("malformed proxy snapshot: not a map of requests, responses")
        for name in ("requests", "responses"):
            value = snapshot[name]
            if type(value) is not int or not 0 <= value <= MAX_COUNT:
                raise HandlerError(f"malformed proxy snapshot: {name} must be a count")
        self.requests, self.responses = snapshot["requests"], snapshot["responses"]

    # --- what the runtime asks ----------------------------------------------------------
    def wants_backend(self) -> bool:
        return self.be is None and bool(self._queued) and not self._done

    def drop_backend(self) -> bool:
        drop, self._drop = self._drop, False
        return drop

    def finished(self) -> bool:
        return self._done

    def backend_output(self) -> bytes:
        out = bytes(self._to_backend)
        self._to_backend.clear()
        return out

    def reading_client(self) -> bool:
        if self._done or len(self._to_backend) >= HIGH_WATER:
            return False
        if self.tunnel:
            return True
        state = self.cl.their_state
        if state is h11.SEND_BODY:
            return True
        buffered = len(self.cl.trailing_data[0])
        if state is h11.IDLE:  # a partial head is finished even when held
            # Up to just past the limit, so that h11 refuses an oversized head (431)
            # rather than the connection waiting for ever.
            return buffered <= MAX_HEAD and (buffered > 0 or not self.hold)
        # The request is complete: more bytes are the next (pipelined) request.
        return not self.hold and buffered < PIPELINE_BUFFER

    def at_boundary(self, now: float) -> bool:
        """No request in flight and nothing buffered either way: it may freeze."""
        return (
            not self._done
            and not self.tunnel
            and self.cl.our_state is h11.IDLE
            and self.cl.their_state is h11.IDLE
            and not self._to_backend
            and not self._queued
            and not self.cl.trailing_data[0]
            and (self.be is None or self.be.states == IDLE_BOTH)
        )

    def next_check(self, now: float) -> float | None:
        return None  # only I/O changes the boundary

    def describe(self) -> dict[str, Any]:
        state = "tunnel" if self.tunnel else "idle" if self.at_boundary(0.0) else "request"
        return {
            "protocol": "http/1.1",
            "state": state,
            "requests": self.requests,
            "not_movable": self.not_movable,
        }

    # --- the backend connection ---------------------------------------------------------
    def backend_opened(self, *, fresh: bool = True) -> None:
        self.be = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
        self._reused = False
        if self.spec.proxy_protocol and fresh:  # a resumed one had its header
            self._to_backend += header(self.client, self.local)
        queued, self._queued = self._queued, []
        for event in queued:
            self._send_backend(event)

    def backend_failed(self, why: str) -> bytes:
        """The backend could not be reached (or reset the connection): a 502 if the
        response has not begun, else the client's connection ends."""
        self.be, self._queued, self._to_backend = None, [], bytearray()
        if self.cl.their_state is h11.IDLE and not self.cl.trailing_data[0]:
            return b""  # nothing was asked: the next request connects again
        return self._give_up(502, b"pysteer: the backend is unavailable\n")

    def waiting_for_backend(self) -> bool:
        """A request was forwarded and its response has not ended: the backend owes us."""
        return not self._done and not self.tunnel and self.requests > self.responses

    def backend_timed_out(self) -> bytes:
        """The backend sent nothing for ``read_timeout``: a 504 if the response has not
        begun (and the connection ends), else the client's connection ends at once."""
        self.be, self._queued, self._to_backend, self._drop = None, [], bytearray(), True
        return self._give_up(504, b"pysteer: the backend did not answer in time\n")

    def _give_up(self, status: int, text: bytes) -> bytes:
        """The request in flight cannot be answered: an error response of our own if its
        answer has not begun, else just the end of the client's connection."""
        if self._started or self.cl.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            self._done = True
            return b""
        return self._error(status, text)

    def on_backend(self, data: bytes) -> bytes:
        """Bytes from the backend (b"": it closed); returns bytes for the client."""
        if self.tunnel:
            if not data:
                self._done = True
            return data
        if self.be is None:
            return b""  # an old connection's last words: nothing is waiting for them
        if not data and not self._started:  # closed before a response: idle, or the race
            return self._backend_closed()
        self.be.receive_data(data)
        out = bytearray()
        while self.be is not None and not self._done:
            try:
                event = self.be.next_event()
            except h11.RemoteProtocolError:
                return bytes(out) + self._backend_broken()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                break
            if isinstance(event, h11.ConnectionClosed):
                out += self._backend_closed()
                break
            out += self._relay_response(event)
        return bytes(out)

    # --- client to backend ------------------------------------------------------------------
    def _pump_client(self) -> bytes:
        out = bytearray()
        while not self._done and not self.tunnel:
            try:
                event = self.cl.next_event()
            except h11.RemoteProtocolError as exc:
                return bytes(out) + self._error(exc.error_status_hint, b"pysteer: bad request\n")
            if event is h11.NEED_DATA or event is h11.PAUSED:
                break
            if isinstance(event, h11.Request):
                self._forward_request(event)
            elif isinstance(event, h11.Data):
                if not self._answered:
                    self._send_backend(h11.Data(data=event.data))
                    self._retry = None
            elif isinstance(event, h11.EndOfMessage):
                if not self._answered:
                    self._send_backend(h11.EndOfMessage())
                    if self._retry is not None:
                        self._retry.append(h11.EndOfMessage())
                out += self._next_cycle()
            elif isinstance(event, h11.ConnectionClosed):
                self._done = True
        return bytes(out)

    def _forward_request(self, request: h11.Request) -> None:
        self.requests += 1
        self._started = self._answered = False
        names = {n for n, _ in request.headers}
        if request.method == b"CONNECT":
            self._upgrade = "a CONNECT tunnel"
        elif b"upgrade" in names:
            what = dict(request.headers).get(b"upgrade", b"").decode("latin-1")[:40]
            self._upgrade = f"an Upgrade tunnel ({what or 'unnamed'})"
        else:
            self._upgrade = None
        forwarded = h11.Request(
            method=request.method,
            target=request.target,
            headers=self._request_headers(request),
        )
        bodyless = not names & {b"content-length", b"transfer-encoding"}
        self._retry = [forwarded] if request.method in IDEMPOTENT and bodyless else None
        self._send_backend(forwarded)

    def _request_headers(self, request: h11.Request) -> list[tuple[bytes, bytes]]:
        headers = _without_hop_by_hop(request.headers.raw_items(), keep_upgrade=bool(self._upgrade))
        host = self.client[0]
        if self.spec.forwarded == "x-forwarded-for":
            before = [v for n, v in headers if n.lower() == b"x-forwarded-for"]
            headers = [
                (n, v)
                for n, v in headers
                if n.lower() not in (b"x-forwarded-for", b"x-forwarded-proto")
            ]
            chain = b", ".join([*before, host.encode()])
            headers += [
                (b"X-Forwarded-For", chain),
                (b"X-Forwarded-Proto", b"https" if self.tls else b"http"),
            ]
        elif self.spec.forwarded == "forwarded":
            node = f"[{host}]" if ":" in host else host
            value = f'for="{node}:{self.client[1]}";proto={"https" if self.tls else "http"}'
            headers.append((b"Forwarded", value.encode()))
        if not any(n.lower() == b"host" for n, _ in headers):  # an HTTP/1.0 client's
            b_host, b_port = self.spec.backend
            name = f"[{b_host}]:{b_port}" if ":" in b_host else f"{b_host}:{b_port}"
            headers.append((b"Host", name.encode()))
        return headers

    def _send_backend(self, event: Any) -> None:
        if self.be is None:
            self._queued.append(event)
            return
        try:
            data = self.be.send(event)
        except h11.LocalProtocolError:
            self._done = True  # a request h11 cannot frame: nothing sane to forward
            return
        if data:
            self._to_backend += data

    # --- backend to client ----------------------------------------------------------------
    def _relay_response(self, event: Any) -> bytes:
        if isinstance(event, h11.InformationalResponse | h11.Response):
            final = isinstance(event, h11.Response)
            if final:
                self._started = self._reused = True
            switching = not final and event.status_code == 101 and self._upgrade is not None
            head = type(event)(
                status_code=event.status_code,
                headers=_without_hop_by_hop(event.headers.raw_items(), keep_upgrade=switching),
                reason=event.reason,
            )
            return self._send_client(head) + self._tunnel_if_switched()
        if isinstance(event, h11.Data):
            return self._send_client(h11.Data(data=event.data))
        if isinstance(event, h11.EndOfMessage):  # trailers are not relayed
            out = self._send_client(h11.EndOfMessage())
            self.responses += 1
            self._answered, self._retry = True, None
            return out + self._next_cycle()
        return b""

    def _send_client(self, event: Any) -> bytes:
        try:
            return self.cl.send(event) or b""
        except h11.LocalProtocolError:
            self._done = True  # a response the client's side cannot carry: end it
            self._drop = True
            return b""

    def _tunnel_if_switched(self) -> bytes:
        if self.cl.our_state is not h11.SWITCHED_PROTOCOL or self.be is None:
            return b""
        self.tunnel = True
        self.not_movable = f"{self._upgrade or 'a tunnel'} carries the backend's own state"
        self._to_backend += self.cl.trailing_data[0]
        return self.be.trailing_data[0]

    def _next_cycle(self) -> bytes:
        """After a request or a response ended: start the next exchange on each side
        that is done, and serve a pipelined request already buffered."""
        be = self.be
        if be is not None:
            if be.our_state is h11.DONE and be.their_state is h11.DONE:
                be.start_next_cycle()
            elif be.their_state in (h11.MUST_CLOSE, h11.CLOSED) and self._answered:
                self.be, self._drop = None, True
        if self.cl.our_state is h11.DONE and self.cl.their_state is h11.DONE:
            self.cl.start_next_cycle()
            self._started = self._answered = False
            self._upgrade = None
            return self._pump_client()
        if self.cl.our_state in (h11.MUST_CLOSE, h11.CLOSED) and self._answered:
            self._done = True
        return b""

    def _backend_closed(self) -> bytes:
        self.be, self._drop = None, True
        if self.cl.their_state is h11.IDLE and not self._queued:
            return b""  # idle: the next request opens a new one
        if self._answered:
            return b""
        if not self._started and self._retry is not None and self._reused:
            retry, self._retry = self._retry, None  # the keep-alive race: resend it once
            self._queued = list(retry)
            return b""
        return self.backend_failed("closed the connection before answering")

    def _backend_broken(self) -> bytes:
        self.be, self._drop = None, True
        return self.backend_failed("sent a malformed response")

    def _error(self, status: int, text: bytes) -> bytes:
        """An error response of our own, then the client's connection ends."""
        self._drop, self.be, self._queued = True, None, []
        out = b""
        if self.cl.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            try:
                out = (
                    self.cl.send(
                        h11.Response(
                            status_code=status,
                            headers=[
                                (b"Content-Type", b"text/plain"),
                                (b"Content-Length", str(len(text)).encode()),
                                (b"Connection", b"close"),
                            ],
                        )
                    )
                    or b""
                )
                out += (self.cl.send(h11.Data(data=text)) or b"") + (
                    self.cl.send(h11.EndOfMessage()) or b""
                )
            except h11.LocalProtocolError:
                out = b""
        self._done = True
        return out


def _without_hop_by_hop(headers: Any, *, keep_upgrade: bool) -> list[tuple[bytes, bytes]]:
    """The headers meant for the next hop only removed (RFC 9110 7.6.1): those named
    in Connection too, but never the message's framing."""
    listed: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            listed |= {t.strip().lower() for t in value.split(b",") if t.strip()}
    listed -= FRAMING
    out = []
    for name, value in headers:
        low = name.lower()
        kept = keep_upgrade and low in (b"upgrade", b"connection")
        if kept or (low not in HOP_BY_HOP and low not in listed):
            out.append((name, value))
    return out
