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
#: TLS 1.3 TLSInnerPlaintext: data, content type and padding (RFC 8446 §5.4).
MAX_INNER_PLAINTEXT = MAX_PLAINTEXT + 1
#: Sequence numbers never wrap (RFC 8446 §5.3, RFC 5246 §6.1): 2^64 - 1 is never used.
SEQ_END = (1 << 64) - 1
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

    @property
    def remaining(self) -> int:
        """Records this key may still protect before its sequence number would wrap."""
        return max(0, SEQ_END - self.seq)

    def _nonce(self, seq: int) -> bytes:
        return (self._iv_int ^ seq).to_bytes(12, "big")

    def _next(self) -> int:
        """The sequence number for the next record, checked before any use of it."""
        seq = self.seq
        if seq >= SEQ_END:
            raise RecordError(UNEXPECTED_MESSAGE, "sequence number exhausted")
        self.seq = seq + 1
        return seq

    def seal(self, content_type: int, data: bytes) -> bytes:
        seq = self._next()
        if self.suite.version == TLS13:
            inner = data + bytes((content_type,))
            header = _HEADER.pack(APPLICATION_DATA, 0x0303, len(inner) + TAG_LEN)
            return header + self._aead.encrypt(self._nonce(seq), inner, header)
        aad = _AAD12.pack(seq, content_type, 0x0303, len(data))
        if len(self._iv) == 4:  # AES-GCM: salt + explicit nonce (our sequence number)
            explicit = _SEQ.pack(seq)
            body = explicit + self._aead.encrypt(self._iv + explicit, data, aad)
        else:  # ChaCha20-Poly1305: IV xor sequence number, no explicit part
            body = self._aead.encrypt(self._nonce(seq), data, aad)
        return _HEADER.pack(content_type, 0x0303, len(body)) + body

    def open(self, header: bytes, body: bytes) -> tuple[int, bytes]:
        """Decrypt one record; returns (content type, plaintext).

        Lengths are checked before decrypting (the AEAD's expansion is fixed), so an
        oversized record costs no decryption; the sequence number advances only on success.
        """
        seq = self.seq
        if seq >= SEQ_END:
            raise RecordError(UNEXPECTED_MESSAGE, "sequence number exhausted")
        outer_type = header[0]
        explicit_len = 8 if self.suite.version != TLS13 and len(self._iv) == 4 else 0
        if len(body) < explicit_len + TAG_LEN:
            raise RecordError(BAD_RECORD_MAC, "record too short")
        plain_len = len(body) - explicit_len - TAG_LEN
        if self.suite.version == TLS13 and plain_len > MAX_INNER_PLAINTEXT:
            raise RecordError(RECORD_OVERFLOW, "inner plaintext longer than 2^14 + 1 bytes")
        if self.suite.version != TLS13 and plain_len > MAX_PLAINTEXT:
            raise RecordError(RECORD_OVERFLOW, "plaintext longer than 2^14 bytes")
        try:
            if self.suite.version == TLS13:
                inner = self._aead.decrypt(self._nonce(seq), body, header)
                stripped = inner.rstrip(b"\x00")
                if not stripped:
                    raise RecordError(UNEXPECTED_MESSAGE, "record without a content type")
                content_type, data = stripped[-1], stripped[:-1]
            else:
                content_type = outer_type
                aad = _AAD12.pack(seq, content_type, 0x0303, plain_len)
                if explicit_len:
                    nonce, sealed = self._iv + body[:8], body[8:]
                else:
                    nonce, sealed = self._nonce(seq), body
                data = self._aead.decrypt(nonce, sealed, aad)
        except InvalidTag:
            raise RecordError(BAD_RECORD_MAC, "record authentication failed") from None
        self.seq = seq + 1
        return content_type, data
