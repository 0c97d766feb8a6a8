"""The RPC over blocking sockets: the CLI's clients, and the steering daemon's threads."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable
from typing import Any

from pysteer.rpc.codec import (
    FRAME_TIMEOUT,
    MAX_FRAME,
    Decoder,
    accept,
    check_hello,
    encode,
    encode_answer,
    hello,
    legacy_refusal,
)
from pysteer.rpc.errors import (
    BadFrame,
    LegacyJson,
    ProtocolError,
    Stalled,
    Unreachable,
    VersionMismatch,
    answer_for,
    check,
)

RECV_SIZE = 1 << 16
SEND_TIMEOUT = 60.0  # a peer must take each frame within this


class Channel:
    """One connection's frames, both ways, over a blocking socket (plain or TLS)."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        max_frame: int = MAX_FRAME,
        frame_timeout: float = FRAME_TIMEOUT,
        finite: bool = False,
    ) -> None:
        self.sock = sock
        self.decoder = Decoder(max_frame, finite=finite)
        self.frame_timeout = frame_timeout

    def send(self, *messages: dict[str, Any], timeout: float | None = SEND_TIMEOUT) -> None:
        """Send ``messages`` at once (one write: a hello and a request travel together)."""
        self.sock.settimeout(timeout)
        self.sock.sendall(b"".join(encode(m) for m in messages))

    def receive(self, wait: float | None) -> dict[str, Any] | None:
        """The next message, or None if the peer hung up between two.

        ``wait``: seconds for it to arrive whole (None: no limit); TimeoutError if none
        started in that time. Once a frame has started, its rest must also come within
        ``frame_timeout`` seconds: a ProtocolError otherwise, and for garbage (BadFrame:
        only that frame was bad, the next call reads on)."""
        now = time.monotonic()
        until = None if wait is None else now + wait
        started = self.decoder.pending
        if started:
            until = _earliest(until, now + self.frame_timeout)
        while (message := self.decoder.next()) is None:
            left = None if until is None else until - time.monotonic()
            try:
                if left is not None and left <= 0:
                    raise TimeoutError("timed out")
                self.sock.settimeout(left)
                data = self.sock.recv(RECV_SIZE)
            except TimeoutError:
                if started:
                    raise Stalled(
                        "the peer sent part of a frame, then did not finish it in time"
                    ) from None
                raise
            except (ConnectionResetError, BrokenPipeError):
                data = b""
            if not data:
                if self.decoder.pending:
                    raise ProtocolError("the peer hung up inside a frame")
                return None
            self.decoder.feed(data)
            if not started:
                started = True
                until = _earliest(until, time.monotonic() + self.frame_timeout)
        return message


def _earliest(a: float | None, b: float) -> float:
    return b if a is None else min(a, b)


class Client:
    """A client's connection over a connected blocking socket. The hello goes out with
    the first request, in one write; its answer is checked before the first answer is
    read. Waits for an answer to start follow the socket's timeout (None: no limit).
    ``where`` names the server in exceptions about the connection; refusals of requests
    keep the server's words only."""

    def __init__(
        self, sock: socket.socket, where: str, *, frame_timeout: float = FRAME_TIMEOUT
    ) -> None:
        self.channel = Channel(sock, frame_timeout=frame_timeout)
        self.where = where
        self.wait = sock.gettimeout()
        self._greeted = self._welcomed = False

    def send(self, request: dict[str, Any]) -> None:
        """Send; a server that hung up meanwhile (a busy daemon refuses so, at once) may
        have left its reason to read: ``receive`` reports that, not a broken pipe."""
        messages = (request,) if self._greeted else (hello(), request)
        self._greeted = True
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # read next
            self.channel.send(*messages, timeout=self.wait)

    def receive(self) -> dict[str, Any]:
        """The next answer if it says yes; the exception the error map gives otherwise
        (TimeoutError if none came within the socket's timeout)."""
        if not self._welcomed:
            check_hello(self._next(), self.where)
            self._welcomed = True
        return check(self._next())

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        self.send(request)
        return self.receive()

    def _next(self) -> dict[str, Any]:
        try:
            message = self.channel.receive(self.wait)
        except ProtocolError as exc:
            raise type(exc)(f"{self.where}: {exc}") from None
        if message is None:
            raise Unreachable(f"{self.where} hung up")
        return message


def serve(
    sock: socket.socket,
    handle: Callable[[dict[str, Any]], dict[str, Any]],
    server: str,
    *,
    idle: float | None = None,
    max_frame: int = MAX_FRAME,
    frame_timeout: float = FRAME_TIMEOUT,
) -> OSError | None:
    """Serve one client until it hangs up: its hello first, then each request's answer
    from ``handle``. ``idle``: seconds each request has to arrive whole (None: no limit,
    as agents stay silent between migrations); a request that started must be whole
    within ``frame_timeout``. Numbers in requests must be finite.

    Returns None when the client hung up (or would not take an answer), else why the
    connection ended (for the log): a refused hello (VersionMismatch), garbage
    (ProtocolError) or a stall (Stalled), each answered if the socket takes it within a
    second; no request in time (TimeoutError); or the socket's own error. A frame that holds no
    valid request is answered (bad-request), and serving goes on. ``server`` names this
    end in refusals."""
    channel = Channel(sock, max_frame=max_frame, frame_timeout=frame_timeout, finite=True)
    welcomed = False
    try:
        while True:
            try:
                message = _next(channel, idle, server)
            except BadFrame as exc:
                if not welcomed:  # no hello: nothing more is read
                    raise _Ended(exc, answer_for(exc)) from None
                answer = answer_for(exc)
            else:
                if message is None:
                    return None
                answer = handle(message) if welcomed else _welcome(message, server)
                welcomed = True
            try:
                sock.settimeout(SEND_TIMEOUT)
                sock.sendall(encode_answer(answer))
            except OSError:  # the client went away without its answer: a hang-up
                return None
    except _Ended as end:
        if end.last_word is not None:
            _last_word(sock, end.last_word)
        return end.why


class _Ended(Exception):
    """The connection ends, for ``why``; ``last_word``: what to answer first."""

    def __init__(self, why: OSError, last_word: dict[str, Any] | bytes | None = None) -> None:
        super().__init__(str(why))
        self.why = why
        self.last_word = encode(last_word) if isinstance(last_word, dict) else last_word


def _next(channel: Channel, idle: float | None, server: str) -> dict[str, Any] | None:
    try:
        return channel.receive(idle)
    except TimeoutError:
        raise _Ended(TimeoutError("no whole request in time")) from None
    except LegacyJson as exc:
        raise _Ended(exc, legacy_refusal(server)) from None
    except BadFrame:
        raise
    except ProtocolError as exc:  # a stall too: the answer waits a second at most
        raise _Ended(exc, answer_for(exc)) from None
    except OSError as exc:  # a TLS client breaking its protocol, for one
        raise _Ended(exc) from None


def _welcome(message: dict[str, Any], server: str) -> dict[str, Any]:
    try:
        return accept(message, server)
    except VersionMismatch as exc:
        raise _Ended(exc, answer_for(exc)) from None


def _last_word(sock: socket.socket, data: bytes) -> None:
    """Send ``data`` before hanging up, if the socket takes it at once."""
    with contextlib.suppress(OSError):
        sock.settimeout(1.0)
        sock.sendall(data)
