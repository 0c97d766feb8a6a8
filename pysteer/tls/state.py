"""The exported form of a TLS connection: versioned, plain types, validated on the way in.

It holds the suite and version, each direction's secret (TLS 1.3) or key and IV (TLS 1.2)
with its sequence number, received bytes not yet processed (a partial record), a partial
post-handshake message, the close_notify flags, and what an application authorizes on:
SNI, ALPN and the peer's certificate chain. It holds keys, so it travels only sealed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pysteer.redact import name as _name
from pysteer.redact import show as _show
from pysteer.tls.events import HandshakeComplete
from pysteer.tls.record import Protection
from pysteer.tls.secret import Secret
from pysteer.tls.suites import BY_NAME, TLS13, Suite

WIRE_VERSION = 1
_KEYS = {
    "v",
    "version",
    "suite",
    "read",
    "write",
    "rx",
    "hs",
    "close_sent",
    "close_received",
    "written",
    "sni",
    "alpn",
    "resumed",
    "peer_chain",
}
_MAX_RX = 5 + (1 << 14) + 2048  # at most one partial record
#: The most a partial post-handshake message may hold, live (the connection refuses a
#: longer one from its header) and in an imported state: one limit, so any connection
#: can be exported and imported.
MAX_HS_BUFFER = 1 << 16


class TlsStateError(ValueError):
    """A TLS state cannot be exported, or a blob cannot be restored; names the field only."""


@dataclass(frozen=True)
class TlsState:
    """A connection's whole state (``TlsServerConnection.export_state`` makes one, and
    ``from_state`` continues from one); ``to_wire``/``from_wire`` are its exported form."""

    read: Protection = field(repr=False)
    write: Protection = field(repr=False)
    rx: bytes = field(repr=False)
    hs: bytes = field(repr=False)
    close_sent: bool
    close_received: bool
    written: int
    info: HandshakeComplete

    def to_wire(self) -> dict[str, Any]:
        """Plain, msgpack-ready types. Contains keys: seal it."""
        info = self.info
        return {
            "v": WIRE_VERSION,
            "version": info.version,
            "suite": info.suite,
            "read": _direction(self.read),
            "write": _direction(self.write),
            "rx": self.rx,
            "hs": self.hs,
            "close_sent": self.close_sent,
            "close_received": self.close_received,
            "written": self.written,
            "sni": info.sni,
            "alpn": info.alpn,
            "resumed": info.resumed,
            "peer_chain": list(info.peer_chain),
        }

    @classmethod
    def from_wire(cls, d: Any) -> TlsState:
        """Validate an exported state; any problem is a TlsStateError naming the field."""
        return _decode(d)


def _direction(p: Protection) -> dict[str, Any]:
    if p.suite.version == TLS13:
        assert p.secret is not None  # noqa: S101
        return {"secret": p.secret.reveal(), "seq": p.seq}
    return {"key": p.key.reveal(), "iv": p.iv.reveal(), "seq": p.seq}


def _fail(reason: str) -> TlsStateError:
    return TlsStateError(f"tls state: {reason}")


def _bytes(
    d: dict[str, Any], key: str, where: str, size: int | None = None, limit: int = 1 << 24
) -> bytes:
    value = d.get(key)
    if not isinstance(value, bytes | bytearray):
        raise _fail(f"{where}{key} must be bytes")
    if size is not None and len(value) != size:
        raise _fail(f"{where}{key} must be {size} bytes, not {len(value)}")
    if len(value) > limit:
        raise _fail(f"{where}{key} is too long ({len(value)} bytes)")
    return bytes(value)


def _int(d: dict[str, Any], key: str, where: str, hi: int) -> int:
    value = d.get(key)
    if type(value) is not int or not 0 <= value <= hi:
        raise _fail(f"{where}{key} must be an integer in 0..{hi}")
    return value


def _protection(d: Any, name: str, suite: Suite) -> Protection:
    where = f"{name}."
    if not isinstance(d, dict):
        raise _fail(f"{name} must be a map")
    seq = _int(d, "seq", where, (1 << 64) - 1)
    if suite.version == TLS13:
        if set(d) != {"secret", "seq"}:
            raise _fail(f"{name} must hold exactly secret and seq")
        secret = _bytes(d, "secret", where, suite.hash_len)
        return Protection(suite, seq, secret=Secret(secret))
    if set(d) != {"key", "iv", "seq"}:
        raise _fail(f"{name} must hold exactly key, iv and seq")
    key = _bytes(d, "key", where, suite.key_len)
    iv = _bytes(d, "iv", where, suite.fixed_iv_len)
    return Protection(suite, seq, key=Secret(key), iv=Secret(iv))


def _optional_str(d: dict[str, Any], key: str) -> str | None:
    value = d[key]
    if value is not None and not isinstance(value, str):
        raise _fail(f"{key} must be a string or null")
    return value


def _decode(d: Any) -> TlsState:
    if not isinstance(d, dict):
        raise _fail(f"state must be a map, not {type(d).__name__}")
    version = d.get("v")
    if type(version) is not int or version != WIRE_VERSION:  # True == 1.0 == 1
        raise _fail(f"unknown state version {_show(version)} (this pysteer reads {WIRE_VERSION})")
    missing, extra = sorted(_KEYS - d.keys()), sorted(_name(k) for k in d.keys() - _KEYS)
    if missing:
        raise _fail(f"missing field(s): {', '.join(missing)}")
    if extra:
        raise _fail(f"unexpected field(s): {', '.join(extra)}")
    suite = BY_NAME.get(d["suite"]) if isinstance(d["suite"], str) else None
    if suite is None:
        raise _fail(f"unknown cipher suite {_show(d['suite'])}")
    if d["version"] != suite.version:
        raise _fail(f"suite {suite.name} does not belong to version {_show(d['version'])}")
    flags = {}
    for key in ("close_sent", "close_received", "resumed"):
        if type(d[key]) is not bool:
            raise _fail(f"{key} must be a boolean")
        flags[key] = d[key]
    chain = d["peer_chain"]
    if not isinstance(chain, list | tuple) or not all(isinstance(c, bytes) for c in chain):
        raise _fail("peer_chain must be a list of DER certificates (bytes)")
    return TlsState(
        read=_protection(d["read"], "read", suite),
        write=_protection(d["write"], "write", suite),
        rx=_bytes(d, "rx", "", limit=_MAX_RX),
        hs=_bytes(d, "hs", "", limit=MAX_HS_BUFFER),
        close_sent=flags["close_sent"],
        close_received=flags["close_received"],
        written=_int(d, "written", "", (1 << 64) - 1),
        info=HandshakeComplete(
            version=suite.version,
            suite=suite.name,
            alpn=_optional_str(d, "alpn"),
            sni=_optional_str(d, "sni"),
            resumed=flags["resumed"],
            peer_chain=tuple(chain),
        ),
    )
