"""``TlsServerConnection``: a sans-IO TLS server connection whose state can move.

Bytes in (``receive_data``), bytes out (``data_to_send``), events back; no sockets. The
handshake runs in OpenSSL (``handshake.py``); from the record that completes it, pysteer's
own record layer carries the connection, so its whole state is a small dict
(``export_state``) that ``from_state`` continues in another process or on another host.
"""

from __future__ import annotations

import struct
from collections import deque
from typing import Any

from pysteer.tls import record as rec
from pysteer.tls.config import ServerConfig
from pysteer.tls.events import (
    Alert,
    ConnectionClosed,
    DataReceived,
    Event,
    HandshakeComplete,
    HandshakeFailed,
    KeyUpdated,
)
from pysteer.tls.handshake import HandshakeError, HandshakeResult, OpenSSLHandshake
from pysteer.tls.keys import key_block12
from pysteer.tls.record import Protection, RecordError
from pysteer.tls.secret import Secret
from pysteer.tls.state import MAX_HS_BUFFER, TlsState, TlsStateError
from pysteer.tls.suites import TLS13

# Alert levels and descriptions (RFC 8446 §6)
WARNING, FATAL = 1, 2
CLOSE_NOTIFY, HANDSHAKE_FAILURE, ILLEGAL_PARAMETER = 0, 40, 47
INTERNAL_ERROR, NO_RENEGOTIATION = 80, 100
# Handshake message types after the handshake
CLIENT_HELLO, KEY_UPDATE = 1, 24
MAX_CIPHERTEXT = {TLS13: (1 << 14) + 256, "TLSv1.2": (1 << 14) + 2048}
#: The peer's post-handshake messages (TLS 1.3 KeyUpdates, TLS 1.2 renegotiation
#: ClientHellos): at most POST_HANDSHAKE_BURST in any POST_HANDSHAKE_WINDOW records it
#: sends, so each costs a rekey (or an alert) per 32 records on average, never per byte.
#: The count starts afresh after a move. OpenSSL allows 32 KeyUpdates in a row. A KeyUpdate
#: that follows our own request is the peer's answer and is not counted.
POST_HANDSHAKE_BURST, POST_HANDSHAKE_WINDOW = 32, 1024
_HEADER = struct.Struct("!BHH")


class TlsError(Exception):
    """Misuse of a connection: sending after close, exporting mid-handshake, ..."""


class TlsEnded(TlsError):
    """``send`` (or ``key_update``) could not go on and ended the connection: its sequence
    numbers ran out. A fatal alert is queued when one still fits: send ``data_to_send()``,
    then close the socket."""


class TlsServerConnection:
    """One server-side TLS connection, from ClientHello to close_notify."""

    def __init__(self, config: ServerConfig | None) -> None:
        self._rx = bytearray()
        self._tx = bytearray()
        self._hs: OpenSSLHandshake | None = OpenSSLHandshake(config) if config else None
        self.phase = "handshake"  # -> "open" -> "closed"
        self._read: Protection | None = None
        self._write: Protection | None = None
        self._hs_buf = b""  # a post-handshake message split across records
        self.close_sent = False
        self.close_received = False
        self.info: HandshakeComplete | None = None
        self.rekey_after: int | None = None  # records per write key; None: the AEAD limit / 2
        self._written = 0
        self._owe_key_update = False  # the peer asked for one; requests that come together
        self._records_in = 0  # records opened here (not exported: a budget, not state)
        self._post_hs: deque[int] = deque(maxlen=POST_HANDSHAKE_BURST)  # their record numbers
        self._asked = False  # we requested a KeyUpdate and the peer has not sent one since

    def __repr__(self) -> str:
        suite = self.info.suite if self.info else "-"
        return f"TlsServerConnection({self.phase}, {suite})"

    # --- bytes in ---------------------------------------------------------------------------
    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes from the peer; returns what happened, in order."""
        if self.phase == "closed":
            return []
        self._rx += data
        events: list[Event] = []
        if self.phase == "handshake":
            self._handshake(events)
        if self.phase == "open":
            self._records(events)
        return events

    def _next_record(self, limit: int) -> tuple[bytes, bytes] | None:
        if len(self._rx) < 5:
            return None
        _ctype, _version, length = _HEADER.unpack_from(self._rx)
        if length > limit:
            raise RecordError(rec.RECORD_OVERFLOW, f"record of {length} bytes announced")
        if len(self._rx) < 5 + length:
            return None
        header, body = bytes(self._rx[:5]), bytes(self._rx[5 : 5 + length])
        del self._rx[: 5 + length]
        return header, body

    def _handshake(self, events: list[Event]) -> None:
        assert self._hs is not None  # noqa: S101 - handshake phase has a driver
        try:
            while len(self._rx) >= 5:
                ctype, version, _length = _HEADER.unpack_from(self._rx)
                if ctype not in (20, 21, 22, 23) or version >> 8 != 3:
                    # Not TLS: let OpenSSL judge the bytes and answer as it would.
                    garbage, self._rx = bytes(self._rx), bytearray()
                    self._hs.feed(garbage)
                    raise HandshakeError("not a TLS record", b"")
                nxt = self._next_record(MAX_CIPHERTEXT["TLSv1.2"])
                if nxt is None:
                    return
                done, out = self._hs.feed(nxt[0] + nxt[1])
                self._tx += out
                if done:
                    self._complete(self._hs.result(out), events)
                    return
        except (HandshakeError, RecordError) as exc:
            self._tx += getattr(exc, "output", b"")
            self.phase = "closed"
            self._hs = None
            events.append(HandshakeFailed(str(exc)))
            events.append(ConnectionClosed(clean=False))

    def _complete(self, result: HandshakeResult, events: list[Event]) -> None:
        suite = result.suite
        if result.version == TLS13:
            client, server = (
                result.secrets.get(f"{s}_TRAFFIC_SECRET_0") for s in ("CLIENT", "SERVER")
            )
            if client is None or server is None:
                raise HandshakeError("OpenSSL logged no traffic secrets", b"")
            self._read = Protection(suite, 0, secret=client)
            # OpenSSL wrote its NewSessionTickets under the new key: seq 0 .. n-1.
            self._write = Protection(suite, result.tickets_sent, secret=server)
        else:
            master = result.secrets.get("CLIENT_RANDOM")
            if master is None:
                raise HandshakeError("OpenSSL logged no master secret", b"")
            ck, sk, civ, siv = key_block12(
                suite, master.reveal(), result.client_random, result.server_random
            )
            # Each side has sent exactly one record (its Finished) under these keys.
            self._read = Protection(suite, 1, key=Secret(ck), iv=Secret(civ))
            self._write = Protection(suite, 1, key=Secret(sk), iv=Secret(siv))
        self._hs = None
        self.phase = "open"
        self.info = HandshakeComplete(
            version=result.version,
            suite=suite.name,
            alpn=result.alpn,
            sni=result.sni,
            resumed=result.resumed,
            peer_chain=result.peer_chain,
            hello_retry=result.client_hellos > 1,
        )
        events.append(self.info)

    def _records(self, events: list[Event]) -> None:
        assert self._read is not None  # noqa: S101
        limit = MAX_CIPHERTEXT[self._read.suite.version]
        try:
            while self.phase == "open" and (nxt := self._next_record(limit)):
                header, body = nxt
                if self._read.suite.version == TLS13 and header[0] != rec.APPLICATION_DATA:
                    raise RecordError(rec.UNEXPECTED_MESSAGE, f"plaintext record type {header[0]}")
                ctype, data = self._read.open(header, body)
                self._records_in += 1
                self._dispatch(ctype, data, events)
            if self._owe_key_update and self.phase == "open" and not self.close_sent:
                self._send_key_update(request_peer=False)  # one answer for all requests
        except RecordError as exc:
            self._fatal(exc.alert, events)

    def _dispatch(self, ctype: int, data: bytes, events: list[Event]) -> None:
        assert self._read is not None  # noqa: S101
        if self._hs_buf and ctype != rec.HANDSHAKE and self._read.suite.version == TLS13:
            # RFC 8446 §5.1: no other record between the fragments of a handshake message.
            raise RecordError(rec.UNEXPECTED_MESSAGE, "record inside a handshake message")
        if ctype == rec.APPLICATION_DATA:
            if self.close_received:
                raise RecordError(rec.UNEXPECTED_MESSAGE, "data after close_notify")
            if data:
                events.append(DataReceived(data))
        elif ctype == rec.ALERT:
            self._alert(data, events)
        elif ctype == rec.HANDSHAKE:
            self._post_handshake(data, events)
        else:
            raise RecordError(rec.UNEXPECTED_MESSAGE, f"record type {ctype} after the handshake")

    def _alert(self, data: bytes, events: list[Event]) -> None:
        if len(data) != 2:
            raise RecordError(rec.DECODE_ERROR, "malformed alert")
        level, description = data
        events.append(Alert(level, description, sent=False))
        if description == CLOSE_NOTIFY:
            self.close_received = True
            if not self.close_sent:
                self.close()  # answer close_notify with close_notify
            self.phase = "closed"
            events.append(ConnectionClosed(clean=True))
        elif level == FATAL or (self._read and self._read.suite.version == TLS13):
            self.phase = "closed"  # TLS 1.3: every alert but close_notify is fatal
            events.append(ConnectionClosed(clean=False))

    def _post_handshake(self, data: bytes, events: list[Event]) -> None:
        if not data:  # RFC 8446 §5.1, RFC 5246 §6.2.1: never a zero-length fragment
            raise RecordError(rec.UNEXPECTED_MESSAGE, "empty handshake record")
        buf = self._hs_buf + data
        while len(buf) >= 4:
            msg_type, length = buf[0], int.from_bytes(buf[1:4], "big")
            self._check_header(msg_type, length)  # before buffering any of its body
            if len(buf) < 4 + length:
                break
            body, buf = buf[4 : 4 + length], buf[4 + length :]
            if msg_type == KEY_UPDATE and buf:
                # RFC 8446 §5.1: a key change must end its record (one KeyUpdate per record).
                raise RecordError(rec.UNEXPECTED_MESSAGE, "data after a KeyUpdate")
            self._handshake_message(msg_type, body, events)
        self._hs_buf = buf

    def _check_header(self, msg_type: int, length: int) -> None:
        """Refuse a post-handshake message from its 4-byte header: only a KeyUpdate (TLS
        1.3) or a ClientHello to refuse (TLS 1.2) may come, and what waits for the rest of
        a message stays under MAX_HS_BUFFER, the most an exported state may carry."""
        assert self._read is not None  # noqa: S101
        if self._read.suite.version == TLS13:
            if msg_type != KEY_UPDATE:
                raise RecordError(rec.UNEXPECTED_MESSAGE, f"handshake message {msg_type}")
            if length != 1:
                raise RecordError(rec.DECODE_ERROR, "malformed KeyUpdate")
        elif msg_type != CLIENT_HELLO:
            raise RecordError(rec.UNEXPECTED_MESSAGE, f"handshake message {msg_type}")
        elif 4 + length > MAX_HS_BUFFER:  # as OpenSSL: excessive message size
            raise RecordError(ILLEGAL_PARAMETER, "handshake message too long")

    def _handshake_message(self, msg_type: int, body: bytes, events: list[Event]) -> None:
        assert self._read is not None  # noqa: S101
        post = self._post_hs
        if msg_type == KEY_UPDATE and self._asked:
            self._asked = False  # the answer to our request: not the peer's to count
        elif len(post) == post.maxlen and self._records_in - post[0] < POST_HANDSHAKE_WINDOW:
            raise RecordError(rec.UNEXPECTED_MESSAGE, "too many post-handshake messages")
        else:
            post.append(self._records_in)
        if msg_type == KEY_UPDATE:
            if body[0] not in (0, 1):
                raise RecordError(rec.DECODE_ERROR, "malformed KeyUpdate")
            self._read = self._read.updated()
            # RFC 8446 §4.6.3: requests that arrive while we are silent get one answer.
            answered = body[0] == 1 and not self.close_sent and not self._owe_key_update
            self._owe_key_update = self._owe_key_update or answered
            events.append(KeyUpdated(answered=answered))
        else:  # a TLS 1.2 ClientHello: renegotiation cannot follow a move
            self._send_alert(WARNING, NO_RENEGOTIATION)
            events.append(Alert(WARNING, NO_RENEGOTIATION, sent=True))

    # --- bytes out -------------------------------------------------------------------------
    def _seal(self, ctype: int, data: bytes, *, final: bool = False) -> bool:
        """Queue one record. The last sequence number of each key is kept for a ``final``
        record (the alert that ends the connection); False if even that one is gone.
        Raises RecordError(internal_error) when a non-final record no longer fits."""
        write = self._write
        assert write is not None  # noqa: S101
        if final:
            if write.remaining < 1:
                return False
        else:
            if write.suite.version == TLS13 and ctype != rec.HANDSHAKE:
                limit = self.rekey_after or write.suite.record_limit // 2
                if self._owe_key_update or self._written >= limit or write.remaining <= 2:
                    self._send_key_update(request_peer=False)  # also rekeys before a wrap
                    write = self._write
                    assert write is not None  # noqa: S101
            if write.remaining < 2:
                raise RecordError(INTERNAL_ERROR, "sequence numbers exhausted")
        self._tx += write.seal(ctype, data)
        self._written += 1
        return True

    def _ended(self, exc: RecordError) -> TlsEnded:
        """Close after our own sending failed; the error for the caller to raise."""
        self._end(exc.alert)
        return TlsEnded(f"TLS cannot go on: {exc}")

    def send(self, data: bytes) -> None:
        """Queue application data, cut into records of at most 2^14 bytes. Raises
        ``TlsEnded`` (the connection is then closed) when the sequence numbers run out."""
        if self.phase != "open" or self.close_sent:
            raise TlsError(
                f"cannot send: connection is {self.phase}"
                + (", close_notify sent" if self.close_sent else "")
            )
        view = memoryview(data)
        try:
            for pos in range(0, len(view), rec.MAX_PLAINTEXT):
                self._seal(rec.APPLICATION_DATA, bytes(view[pos : pos + rec.MAX_PLAINTEXT]))
        except RecordError as exc:
            raise self._ended(exc) from None

    def _send_alert(self, level: int, description: int, *, final: bool = False) -> bool:
        return self._seal(rec.ALERT, bytes((level, description)), final=final)

    def _send_key_update(self, *, request_peer: bool) -> None:
        assert self._write is not None  # noqa: S101
        self._seal(rec.HANDSHAKE, bytes((KEY_UPDATE, 0, 0, 1, int(request_peer))))
        self._write = self._write.updated()
        self._written = 0
        self._owe_key_update = False  # ours answers the peer's request too

    def key_update(self, *, request_peer: bool = True) -> None:
        """Switch to the next write key (TLS 1.3); ask the peer to do the same if requested.
        Raises ``TlsEnded`` like ``send`` when no sequence number is left for it."""
        if (
            self.phase != "open"
            or self.close_sent
            or self._write is None
            or self._write.suite.version != TLS13
        ):
            raise TlsError("KeyUpdate needs an open TLS 1.3 connection")
        try:
            self._send_key_update(request_peer=request_peer)
        except RecordError as exc:
            raise self._ended(exc) from None
        self._asked = self._asked or request_peer

    def close(self) -> None:
        """Send close_notify. Data may still arrive until the peer's close_notify."""
        if self.phase == "open" and not self.close_sent:
            self._send_alert(WARNING, CLOSE_NOTIFY, final=True)
            self.close_sent = True

    def fail(self) -> None:
        """End the connection on our side's error: a fatal internal_error alert, so the peer
        learns it was not a clean close (what a server owes a client when its app fails)."""
        self._end(INTERNAL_ERROR)

    def _end(self, description: int) -> bool:
        """A fatal alert, if a sequence number is left for it, and the end; True if sent."""
        sent = False
        if self.phase == "open":
            self._owe_key_update = False
            sent = self._send_alert(FATAL, description, final=True)
        self.phase = "closed"
        return sent

    def _fatal(self, description: int, events: list[Event]) -> None:
        if self._end(description):
            events.append(Alert(FATAL, description, sent=True))
        events.append(ConnectionClosed(clean=False))

    def data_to_send(self) -> bytes:
        """Everything queued for the peer; afterwards the queue is empty."""
        out, self._tx = bytes(self._tx), bytearray()
        return out

    # --- moving ------------------------------------------------------------------------------
    def export_state(self) -> dict[str, Any]:
        """The whole connection as plain, msgpack-ready types. Contains keys: seal it."""
        if self.phase != "open" or self._read is None or self._write is None:
            raise TlsStateError(f"cannot export: the connection is {self.phase}")
        if self._tx:
            raise TlsStateError(f"cannot export: {len(self._tx)} bytes not yet sent (flush first)")
        assert self.info is not None  # noqa: S101
        state = TlsState(
            read=self._read,
            write=self._write,
            rx=bytes(self._rx),
            hs=self._hs_buf,
            close_sent=self.close_sent,
            close_received=self.close_received,
            written=self._written,
            info=self.info,
        )
        return state.to_wire()

    @classmethod
    def from_state(cls, state: Any) -> TlsServerConnection:
        """Continue a connection exported by ``export_state``: its wire form (validated
        first) or a TlsState already decoded from it (an opened blob's)."""
        decoded = state if isinstance(state, TlsState) else TlsState.from_wire(state)
        conn = cls(None)
        conn.phase = "open"
        conn._read, conn._write = decoded.read, decoded.write
        conn._rx = bytearray(decoded.rx)
        conn._hs_buf = decoded.hs
        conn.close_sent, conn.close_received = decoded.close_sent, decoded.close_received
        conn.info = decoded.info
        conn._written = decoded.written
        return conn
