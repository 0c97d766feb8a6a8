"""The migration blob: ``{v, id, flow, tcp, tls, app, out, t}`` as msgpack, sealed with an AEAD.

The blob holds a connection's TCP state, its TLS keys and the app's snapshot, so it is
never handled in the clear: ``seal`` encrypts it under the cluster key (ChaCha20-Poly1305,
random nonce, the migration id as associated data) and ``open_sealed`` refuses anything
tampered, of another version, or for another id. It travels inside the agents' mTLS
channel on top of that. ``ImportLedger`` is B's fencing: a migration id is imported once.
"""

from __future__ import annotations

import math
import os
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from pysteer.steer.flow import Flow, FlowSyntaxError
from pysteer.tcp import StateFormatError, TcpState
from pysteer.tls.state import TlsStateError, decode_state

BLOB_VERSION = 1
MAGIC = b"PSMB"  # pysteer migration blob
_HEADER = struct.Struct("!4sB16s12s")  # magic, version, migration id, nonce
KEY_LEN = 32


class BlobError(ValueError):
    """A blob that cannot be sealed or opened; the message never contains its contents."""


def new_migration_id() -> bytes:
    return os.urandom(16)


@dataclass(frozen=True)
class MigrationBlob:
    """Everything B needs to continue one connection."""

    id: bytes
    flow: Flow
    tcp: TcpState = field(repr=False)
    tls: dict[str, Any] | None = field(repr=False)  # TlsServerConnection.export_state()
    app: Any = field(repr=False)  # the handler's snapshot, msgpack-able
    out: bytes = field(default=b"", repr=False)  # owed to the peer, not yet in the socket
    t: float = field(default_factory=time.time)

    def __repr__(self) -> str:
        kind = "TLS" if self.tls else "TCP"
        return f"MigrationBlob({self.id.hex()[:8]}, {self.flow}, {kind})"

    def to_wire(self) -> dict[str, Any]:
        return {
            "v": BLOB_VERSION,
            "id": self.id,
            "flow": str(self.flow),
            "tcp": self.tcp.to_wire(),
            "tls": self.tls,
            "app": self.app,
            "out": self.out,
            "t": self.t,
        }


def _check_key(key: bytes) -> ChaCha20Poly1305:
    if not isinstance(key, bytes) or len(key) != KEY_LEN:
        raise BlobError(f"the cluster key must be {KEY_LEN} bytes")
    return ChaCha20Poly1305(key)


def seal(blob: MigrationBlob, key: bytes) -> bytes:
    """Encrypt and authenticate ``blob`` under the cluster key."""
    aead = _check_key(key)
    if len(blob.id) != 16:
        raise BlobError("a migration id is 16 bytes")
    try:
        plain = msgpack.packb(blob.to_wire(), use_bin_type=True)
    except (TypeError, ValueError) as exc:
        raise BlobError(f"the blob cannot be encoded: {type(exc).__name__}") from None
    nonce = os.urandom(12)
    header = _HEADER.pack(MAGIC, BLOB_VERSION, blob.id, nonce)
    return header + aead.encrypt(nonce, plain, header)


def open_sealed(data: bytes, key: bytes, *, expect_id: bytes | None = None) -> MigrationBlob:
    """Authenticate, decrypt and validate a sealed blob (for ``expect_id``, if given).

    Any problem is a BlobError, never another exception: the agent answers it to its peer.
    """
    aead = _check_key(key)
    if not isinstance(data, bytes | bytearray | memoryview):
        raise BlobError(f"a sealed blob is bytes, not {type(data).__name__}")
    data = bytes(data)
    if len(data) < _HEADER.size + 16:
        raise BlobError("sealed blob too short")
    header = data[: _HEADER.size]
    magic, version, mid, nonce = _HEADER.unpack(header)
    if magic != MAGIC:
        raise BlobError("not a pysteer migration blob")
    if version != BLOB_VERSION:
        raise BlobError(f"unknown blob version {version} (this pysteer reads {BLOB_VERSION})")
    if expect_id is not None and mid != expect_id:
        raise BlobError("the blob is for another migration")
    try:
        plain = aead.decrypt(nonce, data[_HEADER.size :], header)
    except InvalidTag:
        raise BlobError("sealed blob failed authentication (tampered, or another key)") from None
    return decode_plain(plain, mid)


def decode_plain(plain: bytes, mid: bytes) -> MigrationBlob:
    """The blob in an authenticated plaintext, checked field by field; BlobError if bad.

    Split from ``open_sealed`` so that what passes the AEAD is tested by itself too.
    """
    try:
        wire = msgpack.unpackb(plain, raw=False, max_ext_len=0)  # the blob has no ext types
    except (ValueError, TypeError, OverflowError, RecursionError, msgpack.UnpackException):
        raise BlobError("sealed blob holds no valid msgpack") from None
    return _decode(wire, mid)


def _decode(wire: Any, mid: bytes) -> MigrationBlob:
    if not isinstance(wire, dict):
        raise BlobError("blob must be a map")
    expected = {"v", "id", "flow", "tcp", "tls", "app", "out", "t"}
    if set(wire) != expected:
        raise BlobError(f"blob fields must be exactly {', '.join(sorted(expected))}")
    if type(wire["v"]) is not int or wire["v"] != BLOB_VERSION or wire["id"] != mid:
        raise BlobError("blob version or id does not match its envelope")
    if not isinstance(wire["flow"], str):
        raise BlobError("blob flow must be a string")
    try:
        flow = Flow.parse(wire["flow"])
        tcp = TcpState.from_wire(wire["tcp"])
        if wire["tls"] is not None:
            decode_state(wire["tls"])  # validated now, restored by the agent
    except (FlowSyntaxError, StateFormatError, TlsStateError) as exc:
        raise BlobError(f"invalid blob: {exc}") from None
    try:
        t = float(wire["t"]) if type(wire["t"]) in (float, int) else math.nan
    except OverflowError:
        t = math.nan
    if not math.isfinite(t):  # NaN passes any staleness test written as `age > limit`
        raise BlobError("blob time must be a finite number")
    if not isinstance(wire["out"], bytes):
        raise BlobError("blob output must be bytes")
    return MigrationBlob(mid, flow, tcp, wire["tls"], wire["app"], wire["out"], t)


class ImportLedger:
    """B's fencing: each migration id is imported at most once, and its outcome kept.

    Outcomes: ``prepared`` (restored, still frozen), ``committed`` (serving here) or
    ``aborted`` (discarded, never served). A asks for the outcome when a commit's answer
    is lost, so it resumes only when B has certainly not served the flow.
    """

    OUTCOMES = ("prepared", "committed", "aborted")

    def __init__(self, limit: int = 100_000) -> None:
        self._seen: dict[bytes, str] = {}
        self._limit = limit
        self._lock = threading.Lock()

    def claim(self, migration_id: bytes) -> None:
        """Record ``migration_id`` as prepared; raises BlobError if it was seen before."""
        with self._lock:
            if migration_id in self._seen:
                raise BlobError(f"migration {migration_id.hex()} was already imported (replay?)")
            if len(self._seen) >= self._limit:  # oldest first; stale blobs are refused by age
                del self._seen[next(iter(self._seen))]
            self._seen[migration_id] = "prepared"

    def decide(self, migration_id: bytes, outcome: str) -> None:
        if outcome not in self.OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}")
        with self._lock:
            self._seen[migration_id] = outcome

    def outcome(self, migration_id: bytes) -> str | None:
        with self._lock:
            return self._seen.get(migration_id)
