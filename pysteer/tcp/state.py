"""``TcpState``: everything needed to rebuild one TCP socket, and its versioned wire form.

The fields follow CRIU's libsoccr: addresses, TCP state, both sequence numbers, the queues,
the negotiated options and ``TCP_REPAIR_WINDOW``, plus the socket options an application
sets. Sequence numbers count data only: a FIN that was sent or received is implied by
``state`` and never included in ``send_seq`` or ``recv_seq``.

``to_wire`` gives msgpack-ready plain types; ``from_wire`` checks every field and the
relations between them, so a bad blob fails here and never reaches the kernel.

Queues can be megabytes (a peer that stopped reading), so neither direction copies them:
``to_wire`` hands msgpack the queue objects themselves and ``from_wire`` keeps the bytes
msgpack made. A dumped send queue that holds both sent and unsent data is one buffer
seen through two memoryviews.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field, fields
from typing import Any, TypeAlias

from pysteer.redact import name as _name
from pysteer.redact import show as _show
from pysteer.tcp.errors import StateFormatError
from pysteer.tcp.info import TcpStateCode

WIRE_VERSION = 1
U32 = 1 << 32

#: A queue's bytes: ``bytes``, or a read-only memoryview of them (a slice of a dumped
#: queue, shared rather than copied). msgpack packs both as bin; ``==`` compares content.
Queue: TypeAlias = bytes | memoryview

#: The states pysteer can move: established and every half-closed state.
MOVABLE_STATES = frozenset(
    {
        TcpStateCode.ESTABLISHED,
        TcpStateCode.FIN_WAIT1,
        TcpStateCode.FIN_WAIT2,
        TcpStateCode.CLOSE_WAIT,
        TcpStateCode.LAST_ACK,
        TcpStateCode.CLOSING,
    }
)
#: States in which we have sent a FIN (it sits at the end of the send queue).
FIN_SENT = frozenset(
    {TcpStateCode.FIN_WAIT1, TcpStateCode.FIN_WAIT2, TcpStateCode.CLOSING, TcpStateCode.LAST_ACK}
)
#: States in which the peer's FIN has been received.
FIN_RECEIVED = frozenset({TcpStateCode.CLOSE_WAIT, TcpStateCode.LAST_ACK, TcpStateCode.CLOSING})
#: States in which our FIN has been acknowledged.
FIN_ACKED = frozenset({TcpStateCode.FIN_WAIT2})


def seq_before(a: int, b: int) -> bool:
    """RFC 793 sequence comparison: ``a`` comes strictly before ``b`` (mod 2**32)."""
    return ((a - b) % U32) > (U32 >> 1)


@dataclass(frozen=True)
class RepairWindow:
    """``struct tcp_repair_window``: the window state TCP_REPAIR_WINDOW reads and writes."""

    snd_wl1: int
    snd_wnd: int
    max_window: int
    rcv_wnd: int
    rcv_wup: int


@dataclass(frozen=True)
class SocketOptions:
    """Socket and TCP options an application may have set; restored as they were."""

    nodelay: bool = False
    cork: bool = False
    keepalive: bool = False
    keepidle: int = 7200
    keepintvl: int = 75
    keepcnt: int = 9
    sndbuf: int = 0  # as getsockopt reports it (twice the set value); 0 leaves the default
    rcvbuf: int = 0
    priority: int = 0
    mark: int = 0
    tos: int = 0  # IP_TOS for IPv4, IPV6_TCLASS for IPv6
    v6only: bool = False


@dataclass(frozen=True)
class TcpState:
    """A frozen TCP socket, as ``dump`` read it and ``restore`` rebuilds it."""

    family: int  # 4 or 6
    local: tuple[str, int]
    peer: tuple[str, int]
    state: TcpStateCode
    send_seq: int  # sequence number after the last byte queued for sending (write_seq)
    recv_seq: int  # sequence number after the last byte received (rcv_nxt)
    recv_queue: Queue = field(repr=False)  # received, not yet read by the application
    send_unacked: Queue = field(repr=False)  # sent, not yet acknowledged
    send_unsent: Queue = field(repr=False)  # queued, never sent
    mss_clamp: int
    sack: bool
    timestamps: bool
    wscale: tuple[int, int] | None  # (snd_wscale, rcv_wscale) when window scaling is on
    timestamp: int | None  # TCP_TIMESTAMP, verbatim (its low bit is the usec flag)
    window: RepairWindow
    options: SocketOptions

    def __repr__(self) -> str:
        # Queue contents are application data (maybe TLS records): never in a repr.
        return (
            f"TcpState({self.state.name} {_endpoint(self.local)} -> {_endpoint(self.peer)}, "
            f"recv {len(self.recv_queue)} B, unacked {len(self.send_unacked)} B, "
            f"unsent {len(self.send_unsent)} B)"
        )

    @property
    def queued(self) -> int:
        """Bytes in the three queues: nearly all of the state's size on the wire. A msgpack
        Packer given this much room (``buf_size``) copies the queues once; ``packb``'s
        buffer starts small, doubles past them, and is copied again into the result."""
        return len(self.recv_queue) + len(self.send_unacked) + len(self.send_unsent)

    @property
    def send_una(self) -> int:
        """The oldest unacknowledged sequence number (snd_una)."""
        return (self.send_seq - len(self.send_unacked) - len(self.send_unsent)) % U32

    def to_wire(self) -> dict[str, Any]:
        """Plain, msgpack-ready types, with explicit lengths that ``from_wire`` checks."""
        return {
            "v": WIRE_VERSION,
            "family": self.family,
            "local": [self.local[0], self.local[1]],
            "peer": [self.peer[0], self.peer[1]],
            "state": self.state.name,
            "send_seq": self.send_seq,
            "recv_seq": self.recv_seq,
            "recv_len": len(self.recv_queue),
            "unacked_len": len(self.send_unacked),
            "unsent_len": len(self.send_unsent),
            "recv_queue": self.recv_queue,
            "send_unacked": self.send_unacked,
            "send_unsent": self.send_unsent,
            "mss_clamp": self.mss_clamp,
            "sack": self.sack,
            "timestamps": self.timestamps,
            "wscale": list(self.wscale) if self.wscale else None,
            "timestamp": self.timestamp,
            "window": [getattr(self.window, name) for name in _WINDOW_FIELDS],
            "options": {name: getattr(self.options, name) for name in _OPTION_DEFAULTS},
        }

    @classmethod
    def from_wire(cls, wire: Any) -> TcpState:
        """Decode and validate; any problem raises ``StateFormatError`` naming the field."""
        return _decode(wire)


_WINDOW_FIELDS = tuple(f.name for f in fields(RepairWindow))
_OPTION_DEFAULTS = {f.name: f.default for f in fields(SocketOptions)}
_FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}


def _endpoint(addr: tuple[str, int]) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --- decoding ---------------------------------------------------------------------------------
_KEYS = {
    "v",
    "family",
    "local",
    "peer",
    "state",
    "send_seq",
    "recv_seq",
    "recv_len",
    "unacked_len",
    "unsent_len",
    "recv_queue",
    "send_unacked",
    "send_unsent",
    "mss_clamp",
    "sack",
    "timestamps",
    "wscale",
    "timestamp",
    "window",
    "options",
}


def _fail(reason: str) -> StateFormatError:
    return StateFormatError(reason)


def _int(wire: dict[str, Any], key: str, lo: int, hi: int) -> int:
    value = wire[key]
    if type(value) is not int:
        raise _fail(f"field {key!r} must be an integer, not {type(value).__name__}")
    if not lo <= value <= hi:
        raise _fail(f"field {key!r} = {_show(value)} is out of range {lo}..{hi}")
    return value


def _bool(value: Any, key: str) -> bool:
    if type(value) is not bool:
        raise _fail(f"field {key!r} must be a boolean, not {type(value).__name__}")
    return value


def _bytes(wire: dict[str, Any], key: str) -> bytes:
    value = wire[key]
    if not isinstance(value, bytes | bytearray):
        raise _fail(f"field {key!r} must be bytes, not {type(value).__name__}")
    return bytes(value)  # the same object when it is bytes: never a copy of msgpack's


def _address(value: Any, key: str, family: int) -> tuple[str, int]:
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise _fail(f"field {key!r} must be [host, port]")
    host, port = value
    if not isinstance(host, str):  # ip_address also takes ints and packed bytes
        raise _fail(f"field {key!r} has an invalid address {_show(host)}")
    try:
        # inet_pton: a twentieth of ip_address's cost, and the text getsockname gives.
        text = socket.inet_ntop(_FAMILIES[family], socket.inet_pton(_FAMILIES[family], host))
    except (OSError, ValueError):  # ValueError: an embedded NUL
        text = _slow_address(host, key, family)
    if type(port) is not int or not 1 <= port <= 65535:
        raise _fail(f"field {key!r} has an invalid port {_show(port)}")
    return text, port


def _slow_address(host: str, key: str, family: int) -> str:
    """What inet_pton refused: a scoped IPv6 address (fe80::1%eth0), the other family, or
    no address at all, each with its own message."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise _fail(f"field {key!r} has an invalid address {_show(host)}") from None
    if ip.version != family:
        raise _fail(f"field {key!r} is IPv{ip.version} in an IPv{family} state")
    return str(ip)


def _check_keys(wire: Any) -> dict[str, Any]:
    if not isinstance(wire, dict):
        raise _fail(f"state must be a map, not {type(wire).__name__}")
    version = wire.get("v")
    if type(version) is not int or version != WIRE_VERSION:  # True == 1.0 == 1
        raise _fail(f"unknown state version {_show(version)} (this pysteer reads {WIRE_VERSION})")
    missing = sorted(_KEYS - wire.keys())
    if missing:
        raise _fail(f"missing field(s): {', '.join(missing)}")
    extra = sorted(_name(key) for key in wire.keys() - _KEYS)
    if extra:
        raise _fail(f"unexpected field(s): {', '.join(extra)}")
    return wire


def _state(wire: dict[str, Any]) -> TcpStateCode:
    name = wire["state"]
    try:
        state = TcpStateCode[name]
    except (KeyError, TypeError):
        raise _fail(f"unknown TCP state {_show(name)}") from None
    if state not in MOVABLE_STATES:
        raise _fail(f"TCP state {state.name} cannot be restored")
    return state


def _queues(wire: dict[str, Any], state: TcpStateCode) -> tuple[bytes, bytes, bytes]:
    queues = tuple(_bytes(wire, key) for key in ("recv_queue", "send_unacked", "send_unsent"))
    for key, data in zip(("recv_len", "unacked_len", "unsent_len"), queues, strict=True):
        declared = _int(wire, key, 0, U32 - 1)
        if declared != len(data):
            raise _fail(f"inconsistent queue: {key} says {declared} bytes, data has {len(data)}")
    _recv, unacked, unsent = queues
    if unsent and state in FIN_SENT - {TcpStateCode.FIN_WAIT1}:
        raise _fail(f"inconsistent queue: unsent data after the FIN in state {state.name}")
    if unacked and state in FIN_ACKED:
        raise _fail(f"inconsistent queue: unacknowledged data in state {state.name}")
    return queues  # type: ignore[return-value]


def _wscale(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2
        or not all(type(w) is int and 0 <= w <= 14 for w in value)
    ):
        raise _fail("field 'wscale' must be null or [snd, rcv] with scales 0..14")
    return (value[0], value[1])


def _timestamp(wire: dict[str, Any], timestamps: bool) -> int | None:
    if timestamps:
        return _int(wire, "timestamp", 0, U32 - 1)
    if wire["timestamp"] is not None:
        raise _fail("field 'timestamp' is set but timestamps are off")
    return None


def _window(value: Any, recv_seq: int) -> RepairWindow:
    if (
        not isinstance(value, list | tuple)
        or len(value) != 5
        or not all(type(w) is int and 0 <= w < U32 for w in value)
    ):
        raise _fail("field 'window' must be five 32-bit integers")
    window = RepairWindow(*value)
    if seq_before(recv_seq, window.rcv_wup):
        raise _fail("inconsistent window: rcv_wup is after recv_seq")
    return window


def _options(value: Any) -> SocketOptions:
    if not isinstance(value, dict):
        raise _fail("field 'options' must be a map")
    known = _OPTION_DEFAULTS
    unknown = sorted(_name(key) for key in value.keys() - known.keys())
    if unknown:
        raise _fail(f"unexpected option(s): {', '.join(unknown)}")
    values: dict[str, Any] = {}
    for name, item in value.items():
        if isinstance(known[name], bool):
            values[name] = _bool(item, f"options.{name}")
        elif type(item) is not int or not 0 <= item < U32:
            raise _fail(f"option {name!r} must be a 32-bit unsigned integer")
        else:
            values[name] = item
    return SocketOptions(**values)


def _decode(raw: Any) -> TcpState:
    wire = _check_keys(raw)
    family = wire["family"]
    if type(family) is not int or family not in (4, 6):
        raise _fail(f"field 'family' must be 4 or 6, not {_show(family)}")
    state = _state(wire)
    recv_queue, send_unacked, send_unsent = _queues(wire, state)
    recv_seq = _int(wire, "recv_seq", 0, U32 - 1)
    timestamps = _bool(wire["timestamps"], "timestamps")
    return TcpState(
        family=family,
        local=_address(wire["local"], "local", family),
        peer=_address(wire["peer"], "peer", family),
        state=state,
        send_seq=_int(wire, "send_seq", 0, U32 - 1),
        recv_seq=recv_seq,
        recv_queue=recv_queue,
        send_unacked=send_unacked,
        send_unsent=send_unsent,
        mss_clamp=_int(wire, "mss_clamp", 1, 65535),
        sack=_bool(wire["sack"], "sack"),
        timestamps=timestamps,
        wscale=_wscale(wire["wscale"]),
        timestamp=_timestamp(wire, timestamps),
        window=_window(wire["window"], recv_seq),
        options=_options(wire["options"]),
    )
