"""The migration blob: ``{v, id, flow, tcp, tls, app, out, t}`` as msgpack, sealed with an AEAD.

The blob holds a connection's TCP state, its TLS keys and the app's snapshot, so it is
never handled in the clear: ``seal`` encrypts it under the cluster key (ChaCha20-Poly1305,
random nonce) and ``open_sealed`` refuses anything tampered, of another version, or for
another id. It travels inside the agents' mTLS channel on top of that.

The envelope is ``magic, version, migration id, nonce, source node, target node``, all of
it the AEAD's associated data: the blob is bound to the one move it was sealed for. The
target refuses a blob sealed for another node, or delivered by another node than the one
that sealed it (the agent passes the peer its mTLS link authenticated), so a blob cannot be
replayed to another node that holds the cluster key.

Time: ``t`` is when the source sealed it, by the source's clock. The target refuses a
blob older than ``MAX_BLOB_AGE`` (60 s) or more than ``MAX_CLOCK_SKEW`` (5 s) ahead of its
own clock, and any ``t`` that is not a finite number (NaN would pass a test written as
``age > limit``). The future allowance is small on purpose: it covers clocks that NTP keeps
within a second or two, and every second of it is a second a blob lives beyond its 60 s.
The age bound is what makes B's import ledger (``pysteer.agent.ledger``) enough against
replays: a blob older than the ledger's memory is refused by age, and one sealed before
the ledger started (a reboot emptied it) is refused by the ledger's epoch.
"""

from __future__ import annotations

import math
import os
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from pysteer.cluster.config import NAME_RE
from pysteer.flow import Flow, FlowSyntaxError
from pysteer.tcp import StateFormatError, TcpState
from pysteer.tls.state import TlsState, TlsStateError

BLOB_VERSION = 2  # 2: the envelope names the source and target nodes (1 bound neither)
MAGIC = b"PSMB"  # pysteer migration blob
_HEADER = struct.Struct("!4sB16s12s")  # magic, version, migration id, nonce; then the names
KEY_LEN = 32
MAX_BLOB_AGE = 60.0  # seconds: an older blob is stale (and may be a replay)
MAX_CLOCK_SKEW = 5.0  # seconds a blob's time may be ahead of the target's clock


class BlobError(ValueError):
    """A blob that cannot be sealed or opened; the message never contains its contents."""


def new_migration_id() -> bytes:
    return os.urandom(16)


def worker_of(mid: bytes, workers: int) -> int:
    """Which of the target's ``workers`` agent processes takes migration ``mid``.

    Every request of one migration (its move, and later questions about its outcome) goes
    to the same worker, whose ledger alone then fences replays of that id: the id is
    authenticated (the blob's header), so a replay cannot pick another worker.
    """
    return int.from_bytes(mid[:4], "big") % workers


@dataclass(frozen=True)
class MigrationBlob:
    """Everything B needs to continue one connection."""

    id: bytes
    flow: Flow
    tcp: TcpState = field(repr=False)
    # The source's TlsServerConnection.export_state(); the target's, decoded and checked
    # once when the blob is opened (its keys derived then, not again at the restore).
    tls: dict[str, Any] | TlsState | None = field(repr=False)
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
            "tls": self.tls.to_wire() if isinstance(self.tls, TlsState) else self.tls,
            "app": self.app,
            "out": self.out,
            "t": self.t,
        }


def _check_key(key: bytes) -> ChaCha20Poly1305:
    if not isinstance(key, bytes) or len(key) != KEY_LEN:
        raise BlobError(f"the cluster key must be {KEY_LEN} bytes")
    return ChaCha20Poly1305(key)


def _node(name: str, role: str) -> bytes:
    """A node name as the envelope holds it (at most 63 ASCII bytes, by the config's rule)."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise BlobError(f"the {role} must be a node name")
    return name.encode("ascii")


def _header(mid: bytes, nonce: bytes, source: str, target: str) -> bytes:
    """The envelope, all of it authenticated: it binds the blob to one move."""
    src, dst = _node(source, "source"), _node(target, "target")
    fixed = _HEADER.pack(MAGIC, BLOB_VERSION, mid, nonce)
    return fixed + bytes([len(src)]) + src + bytes([len(dst)]) + dst


def _shown(name: bytes) -> str:
    """An authenticated node name for a message; anything else is not echoed."""
    text = name.decode("ascii", "replace")
    return text if NAME_RE.fullmatch(text) else "an invalid node name"


def seal(blob: MigrationBlob, key: bytes, *, source: str, target: str) -> bytes:
    """Encrypt and authenticate ``blob`` under the cluster key, for ``source`` -> ``target``."""
    aead = _check_key(key)
    if len(blob.id) != 16:
        raise BlobError("a migration id is 16 bytes")
    # Sized for the queues, which are nearly all of a large blob: packb's buffer would
    # start small, double past them and be copied again; and the ciphertext goes straight
    # in after the header. A 16 MiB backlog is then copied once by msgpack, once by the AEAD.
    packer = msgpack.Packer(
        use_bin_type=True, autoreset=False, buf_size=blob.tcp.queued + len(blob.out) + (64 << 10)
    )
    try:
        packer.pack(blob.to_wire())
    except (TypeError, ValueError) as exc:
        raise BlobError(f"the blob cannot be encoded: {type(exc).__name__}") from None
    plain = packer.getbuffer()
    nonce = os.urandom(12)
    header = _header(blob.id, nonce, source, target)
    sealed = bytearray(len(header) + len(plain) + 16)  # 16: the Poly1305 tag
    sealed[: len(header)] = header
    aead.encrypt_into(nonce, plain, header, memoryview(sealed)[len(header) :])
    return bytes(sealed)


def open_sealed(
    data: bytes,
    key: bytes,
    *,
    source: str,
    target: str,
    expect_id: bytes | None = None,
    now: float | None = None,
) -> MigrationBlob:
    """Authenticate, decrypt and validate a sealed blob sent by ``source`` to ``target``.

    ``source`` is the node that delivered it (the authenticated peer), ``target`` this
    node; ``now`` is this node's clock (a parameter for tests). Any problem is a BlobError,
    never another exception: the agent answers it to its peer.
    """
    aead = _check_key(key)
    src, dst = _node(source, "source"), _node(target, "target")
    if not isinstance(data, bytes | bytearray | memoryview):
        raise BlobError(f"a sealed blob is bytes, not {type(data).__name__}")
    data = bytes(data)
    if len(data) < _HEADER.size + 16:
        raise BlobError("sealed blob too short")
    magic, version, mid, nonce = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise BlobError("not a pysteer migration blob")
    if 0 < version < BLOB_VERSION:
        raise BlobError(
            f"blob version {version} is from an older pysteer, not bound to its "
            f"nodes (this one reads only {BLOB_VERSION}): upgrade the source"
        )
    if version != BLOB_VERSION:
        raise BlobError(f"unknown blob version {version} (this pysteer reads {BLOB_VERSION})")
    if expect_id is not None and mid != expect_id:
        raise BlobError("the blob is for another migration")
    pos = _HEADER.size
    names = []
    for _ in range(2):
        size = data[pos] if pos < len(data) else 0
        names.append(data[pos + 1 : pos + 1 + size])
        pos += 1 + size
    if len(data) < pos + 16:
        raise BlobError("sealed blob too short")
    if not all(names):
        raise BlobError("the blob's envelope names no source or no target")
    header = data[:pos]
    try:
        plain = aead.decrypt(nonce, data[pos:], header)
    except InvalidTag:
        raise BlobError("sealed blob failed authentication (tampered, or another key)") from None
    sealed_by, sealed_for = names
    if sealed_for != dst:
        raise BlobError(f"the blob is sealed for {_shown(sealed_for)}, not {target}")
    if sealed_by != src:
        raise BlobError(f"the blob was sealed by {_shown(sealed_by)} but delivered by {source}")
    blob = decode_plain(plain, mid)
    _check_time(blob.t, time.time() if now is None else now)
    return blob


def _check_time(t: float, now: float) -> None:
    """Refuse a blob time that is not finite, older than MAX_BLOB_AGE or beyond the skew."""
    if not math.isfinite(t):
        raise BlobError("blob time must be a finite number")
    if now - t > MAX_BLOB_AGE:
        raise BlobError(f"stale blob ({now - t:.0f} s old; the limit is {MAX_BLOB_AGE:g} s)")
    if t - now > MAX_CLOCK_SKEW:
        raise BlobError(
            f"blob sealed {t - now:.0f} s in the future (beyond the "
            f"{MAX_CLOCK_SKEW:g} s clock skew allowed)"
        )


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
        tls = TlsState.from_wire(wire["tls"]) if wire["tls"] is not None else None
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
    return MigrationBlob(mid, flow, tcp, tls, wire["app"], wire["out"], t)
