"""Record protection for one direction of a connection (RFC 8446 §5, RFC 5288, RFC 7905).

A ``Protection`` holds one AEAD key, its IV and the sequence number; ``seal`` turns a
plaintext fragment into a whole record and ``open`` does the reverse. It keeps no buffers:
framing belongs to the connection.
"""

from __future__ import annotations

import struct

from cryptography.exceptions import InvalidTag

from pysteer.tls.keys import next_traffic_secret, traffic_key_iv
from pysteer.tls.secret import Secret
from pysteer.tls.suites import TLS13, Suite

CHANGE_CIPHER_SPEC, ALERT, HANDSHAKE, APPLICATION_DATA = 20, 21, 22, 23
MAX_PLAINTEXT = 1 << 14
TAG_LEN = 16
_HEADER = struct.Struct("!BHH")
_SEQ = struct.Struct("!Q")
_AAD12 = struct.Struct("!QBHH")


class RecordError(Exception):
    """A record failed; ``alert`` is the TLS alert description to send."""

    def __init__(self, alert: int, reason: str) -> None:
        super().__init__(reason)
        self.alert = alert


BAD_RECORD_MAC, RECORD_OVERFLOW, UNEXPECTED_MESSAGE, DECODE_ERROR = 20, 22, 10, 50


class Protection:
    """One direction's AEAD state: TLS 1.3 (from a traffic secret) or TLS 1.2 (key + IV)."""

    __slots__ = ("_aead", "_iv", "_iv_int", "key", "secret", "seq", "suite")

    def __init__(
        self,
        suite: Suite,
        seq: int,
        *,
        secret: Secret | None = None,
        key: Secret | None = None,
        iv: Secret | None = None,
    ) -> None:
        self.suite, self.seq, self.secret = suite, seq, secret
        if suite.version == TLS13:
            if secret is None:
                raise ValueError("a TLS 1.3 protection needs a traffic secret")
            raw_key, raw_iv = traffic_key_iv(suite, secret.reveal())
            self.key, iv = Secret(raw_key), Secret(raw_iv)
        else:
            if key is None or iv is None:
                raise ValueError("a TLS 1.2 protection needs a key and an IV")
            self.key = key
        self._iv = iv.reveal()
        self._iv_int = int.from_bytes(self._iv, "big")
        self._aead = suite.aead(self.key.reveal())

    @property
    def iv(self) -> Secret:
        return Secret(self._iv)

    def __repr__(self) -> str:
        return f"Protection({self.suite.name}, seq={self.seq})"

    def updated(self) -> Protection:
        """The next generation after a TLS 1.3 KeyUpdate, at sequence number 0."""
        assert self.secret is not None  # noqa: S101 - only called for TLS 1.3
        nxt = next_traffic_secret(self.suite, self.secret.reveal())
        return Protection(self.suite, 0, secret=Secret(nxt))

    def _nonce(self) -> bytes:
        return (self._iv_int ^ self.seq).to_bytes(12, "big")

    def _next(self) -> int:
        seq = self.seq
        if seq >= (1 << 64) - 1:
            raise RecordError(UNEXPECTED_MESSAGE, "sequence number exhausted")
        self.seq = seq + 1
        return seq

    def seal(self, content_type: int, data: bytes) -> bytes:
        if self.suite.version == TLS13:
            inner = data + bytes((content_type,))
            header = _HEADER.pack(APPLICATION_DATA, 0x0303, len(inner) + TAG_LEN)
            sealed = self._aead.encrypt(self._nonce(), inner, header)
            self._next()
            return header + sealed
        seq = self._next()
        aad = _AAD12.pack(seq, content_type, 0x0303, len(data))
        if len(self._iv) == 4:  # AES-GCM: salt + explicit nonce (our sequence number)
            explicit = _SEQ.pack(seq)
            body = explicit + self._aead.encrypt(self._iv + explicit, data, aad)
        else:  # ChaCha20-Poly1305: IV xor sequence number, no explicit part
            self.seq = seq
            nonce = self._nonce()
            self.seq = seq + 1
            body = self._aead.encrypt(nonce, data, aad)
        return _HEADER.pack(content_type, 0x0303, len(body)) + body

    def open(self, header: bytes, body: bytes) -> tuple[int, bytes]:
        """Decrypt one record; returns (content type, plaintext)."""
        outer_type = header[0]
        try:
            if self.suite.version == TLS13:
                inner = self._aead.decrypt(self._nonce(), body, header)
                stripped = inner.rstrip(b"\x00")
                if not stripped:
                    raise RecordError(UNEXPECTED_MESSAGE, "record without a content type")
                content_type, data = stripped[-1], stripped[:-1]
            else:
                content_type = outer_type
                if len(self._iv) == 4:
                    if len(body) < 8 + TAG_LEN:
                        raise RecordError(BAD_RECORD_MAC, "record too short")
                    explicit, sealed = body[:8], body[8:]
                    aad = _AAD12.pack(self.seq, content_type, 0x0303, len(sealed) - TAG_LEN)
                    data = self._aead.decrypt(self._iv + explicit, sealed, aad)
                else:
                    if len(body) < TAG_LEN:
                        raise RecordError(BAD_RECORD_MAC, "record too short")
                    aad = _AAD12.pack(self.seq, content_type, 0x0303, len(body) - TAG_LEN)
                    data = self._aead.decrypt(self._nonce(), body, aad)
        except InvalidTag:
            raise RecordError(BAD_RECORD_MAC, "record authentication failed") from None
        if len(data) > MAX_PLAINTEXT:
            raise RecordError(RECORD_OVERFLOW, "plaintext longer than 2^14 bytes")
        self._next()
        return content_type, data
