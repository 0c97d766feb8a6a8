"""TcpState's wire form: round trips exactly, and every bad blob gets a clear error."""

import errno
import ipaddress
import os
import socket
import struct
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pysteer.tcp import (
    RepairError,
    RepairWindow,
    SocketOptions,
    StateFormatError,
    TcpState,
    TcpStateCode,
    repair,
    segment,
)
from pysteer.tcp.state import seq_before

SECRET = b"SECRET-PAYLOAD-never-in-messages"


def sample(**changes: Any) -> TcpState:
    fields = {
        "family": 4,
        "local": ("10.77.100.1", 443),
        "peer": ("10.77.1.2", 51000),
        "state": TcpStateCode.ESTABLISHED,
        "send_seq": 1000,
        "recv_seq": 5000,
        "recv_queue": SECRET,
        "send_unacked": b"u" * 10,
        "send_unsent": b"n" * 20,
        "mss_clamp": 1460,
        "sack": True,
        "timestamps": True,
        "wscale": (7, 10),
        "timestamp": 123456,
        "window": RepairWindow(4990, 65535, 65535, 65535, 4990),
        "options": SocketOptions(nodelay=True, sndbuf=87040, rcvbuf=131072, mark=7),
    }
    fields.update(changes)
    return TcpState(**fields)


def test_round_trip_through_msgpack() -> None:
    state = sample()
    wire = msgpack.unpackb(msgpack.packb(state.to_wire()))
    assert TcpState.from_wire(wire) == state
    assert wire["v"] == 1
    assert wire["recv_len"] == len(SECRET)


def test_repr_shows_no_queue_data() -> None:
    text = repr(sample())
    assert "SECRET" not in text
    assert text == (
        "TcpState(ESTABLISHED 10.77.100.1:443 -> 10.77.1.2:51000, "
        "recv 32 B, unacked 10 B, unsent 20 B)"
    )
    v6 = sample(family=6, local=("fd00::1", 443), peer=("fd00::2", 5000))
    assert "[fd00::1]:443 -> [fd00::2]:5000" in repr(v6)


def test_send_una() -> None:
    assert sample().send_una == 1000 - 30
    assert sample(send_seq=5).send_una == (5 - 30) % (1 << 32)


def _mutate(path: str, value: Any) -> dict:
    wire = sample().to_wire()
    if path.startswith("-"):
        del wire[path[1:]]
    elif "." in path:
        outer, inner = path.split(".")
        wire[outer][inner] = value
    else:
        wire[path] = value
    return wire


BAD = [
    ("v", 2, "unknown state version 2 (this pysteer reads 1)"),
    ("v", None, "unknown state version None (this pysteer reads 1)"),
    ("-window", None, "missing field(s): window"),
    ("extra", 1, "unexpected field(s): extra"),
    ("family", 5, "field 'family' must be 4 or 6, not 5"),
    ("state", "SYN_RECV", "TCP state SYN_RECV cannot be restored"),
    ("state", "TIME_WAIT", "TCP state TIME_WAIT cannot be restored"),
    ("state", "BOGUS", "unknown TCP state 'BOGUS'"),
    ("recv_len", 5, "inconsistent queue: recv_len says 5 bytes, data has 32"),
    ("unacked_len", 11, "inconsistent queue: unacked_len says 11 bytes, data has 10"),
    ("unsent_len", 0, "inconsistent queue: unsent_len says 0 bytes, data has 20"),
    ("recv_queue", "text", "field 'recv_queue' must be bytes, not str"),
    ("local", ["fd00::1", 443], "field 'local' is IPv6 in an IPv4 state"),
    ("peer", ["10.0.0.1", 0], "field 'peer' has an invalid port 0"),
    ("peer", ["not-an-ip", 1], "field 'peer' has an invalid address 'not-an-ip'"),
    ("peer", "10.0.0.1:1", "field 'peer' must be [host, port]"),
    ("send_seq", 1 << 32, "field 'send_seq' = 4294967296 is out of range 0..4294967295"),
    ("send_seq", "1", "field 'send_seq' must be an integer, not str"),
    ("mss_clamp", 0, "field 'mss_clamp' = 0 is out of range 1..65535"),
    ("sack", 1, "field 'sack' must be a boolean, not int"),
    ("wscale", [15, 0], "field 'wscale' must be null or [snd, rcv] with scales 0..14"),
    ("timestamps", False, "field 'timestamp' is set but timestamps are off"),
    ("window", [1, 2, 3], "field 'window' must be five 32-bit integers"),
    ("window", [0, 0, 0, 0, 6000], "inconsistent window: rcv_wup is after recv_seq"),
    ("options", [], "field 'options' must be a map"),
    ("options.nagle", True, "unexpected option(s): nagle"),
    ("options.mark", -1, "option 'mark' must be a 32-bit unsigned integer"),
    ("options.nodelay", "yes", "field 'options.nodelay' must be a boolean, not str"),
]


@pytest.mark.parametrize(("path", "value", "message"), BAD, ids=[b[2][:40] for b in BAD])
def test_bad_blob_is_refused(path: str, value: Any, message: str) -> None:
    with pytest.raises(StateFormatError) as info:
        TcpState.from_wire(_mutate(path, value))
    assert str(info.value) == f"tcp state: {message}"
    assert "SECRET" not in str(info.value)


def test_not_a_map() -> None:
    with pytest.raises(StateFormatError, match="state must be a map, not list"):
        TcpState.from_wire([1, 2])


@pytest.mark.parametrize(
    ("state", "queues", "message"),
    [
        ("FIN_WAIT2", {"send_unsent": b""}, "unacknowledged data in state FIN_WAIT2"),
        ("LAST_ACK", {"send_unacked": b""}, "unsent data after the FIN in state LAST_ACK"),
    ],
)
def test_queues_impossible_in_state(state: str, queues: dict, message: str) -> None:
    wire = sample(state=TcpStateCode[state], **queues).to_wire()
    with pytest.raises(StateFormatError, match=message):
        TcpState.from_wire(wire)


states = st.builds(
    TcpState,
    family=st.just(6),
    local=st.tuples(st.just("fd00::1"), st.integers(1, 65535)),
    peer=st.tuples(st.just("fd00::2"), st.integers(1, 65535)),
    state=st.sampled_from([TcpStateCode.ESTABLISHED, TcpStateCode.CLOSE_WAIT]),
    send_seq=st.integers(0, (1 << 32) - 1),
    recv_seq=st.just(100),
    recv_queue=st.binary(max_size=300),
    send_unacked=st.binary(max_size=300),
    send_unsent=st.binary(max_size=300),
    mss_clamp=st.integers(1, 65535),
    sack=st.booleans(),
    timestamps=st.just(True),
    wscale=st.none() | st.tuples(st.integers(0, 14), st.integers(0, 14)),
    timestamp=st.integers(0, (1 << 32) - 1),
    window=st.builds(
        RepairWindow, *[st.integers(0, (1 << 32) - 1)] * 4, rcv_wup=st.integers(0, 100)
    ),
    options=st.builds(SocketOptions, mark=st.integers(0, (1 << 32) - 1)),
)


@given(states)
def test_any_valid_state_round_trips(state: TcpState) -> None:
    assert TcpState.from_wire(msgpack.unpackb(msgpack.packb(state.to_wire()))) == state


def test_seq_before_wraps() -> None:
    assert seq_before(1, 2)
    assert not seq_before(2, 1)
    assert seq_before((1 << 32) - 5, 3)  # across the wrap
    assert not seq_before(3, (1 << 32) - 5)
    assert not seq_before(7, 7)


def _ones_complement_ok(data: bytes) -> bool:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total == 0xFFFF


@pytest.mark.parametrize(("src", "dst"), [("10.0.0.2", "10.0.0.1"), ("fd00::2", "fd00::1")])
def test_segment_checksums(src: str, dst: str) -> None:
    payload = b"abc"
    packet = segment.build(
        (src, 5000),
        (dst, 443),
        seq=7,
        ack=9,
        flags=segment.FIN | segment.ACK,
        window=70000,
        payload=payload,
    )
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if s.version == 4:
        ip, tcp_part = packet[:20], packet[20:]
        assert _ones_complement_ok(ip)
        pseudo = s.packed + d.packed + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(tcp_part))
    else:
        ip, tcp_part = packet[:40], packet[40:]
        assert struct.unpack("!H", ip[4:6])[0] == len(tcp_part)
        pseudo = s.packed + d.packed + struct.pack("!I3xB", len(tcp_part), socket.IPPROTO_TCP)
    assert _ones_complement_ok(pseudo + tcp_part)
    sport, dport, seq, ack, off, flags, window = struct.unpack("!HHIIBBH", tcp_part[:16])
    assert (sport, dport, seq, ack, off >> 4, flags, window) == (5000, 443, 7, 9, 5, 0x11, 0xFFFF)
    assert tcp_part[20:] == payload


# --- large queues: no copies, and the same bytes on the wire ------------------------------
def test_memoryview_queues_pack_as_the_same_bytes() -> None:
    """A dump hands out a mixed send queue as two views of one buffer: msgpack writes them
    as the bin fields bytes would be, and they decode to equal bytes."""
    queue = bytes(range(256)) * 40
    views = memoryview(queue)
    as_views = sample(send_unacked=views[:1000], send_unsent=views[1000:])
    as_bytes = sample(send_unacked=queue[:1000], send_unsent=queue[1000:])
    packed = msgpack.packb(as_views.to_wire(), use_bin_type=True)
    assert packed == msgpack.packb(as_bytes.to_wire(), use_bin_type=True)
    decoded = TcpState.from_wire(msgpack.unpackb(packed, raw=False))
    assert decoded == as_bytes == as_views
    assert type(decoded.send_unsent) is bytes


def test_decoded_queues_are_msgpacks_own_bytes() -> None:
    """from_wire keeps the queue objects msgpack made: megabytes are never copied again."""
    wire = msgpack.unpackb(msgpack.packb(sample(recv_queue=b"r" * (1 << 20)).to_wire()))
    state = TcpState.from_wire(wire)
    assert state.recv_queue is wire["recv_queue"]
    assert state.send_unsent is wire["send_unsent"]


@pytest.mark.parametrize(
    ("family", "host", "text"),
    [
        (4, "10.77.1.2", "10.77.1.2"),
        (6, "FD00:0:0::02", "fd00::2"),
        (6, "::ffff:10.1.2.3", "::ffff:10.1.2.3"),  # as getsockname gives it
        (6, "fe80::1%lo", "fe80::1%lo"),  # a scope: not inet_pton's, still accepted
    ],
)
def test_addresses_are_canonical(family: int, host: str, text: str) -> None:
    local = ("fd00::1", 443) if family == 6 else ("10.77.100.1", 443)
    wire = sample(family=family, local=local).to_wire()
    wire["peer"] = [host, 51000]
    assert TcpState.from_wire(wire).peer == (text, 51000)
    same = [ipaddress.ip_address(a.partition("%")[0]) for a in (text, host)]
    assert same[0] == same[1]


class _QueueSink:
    """A socket stand-in for queue writes: takes at most ``per_call`` bytes a call and
    refuses (ENOMEM) any piece over ``linear``, as an old kernel's repair queue did."""

    def __init__(self, per_call: int, linear: int, room: int = 1 << 30) -> None:
        self.per_call, self.linear, self.room = per_call, linear, room
        self.got = bytearray()
        self.calls = 0

    def send(self, data: memoryview, flags: int) -> int:
        assert flags & socket.MSG_DONTWAIT
        self.calls += 1
        if len(data) > self.linear:
            raise OSError(errno.ENOMEM, "Cannot allocate memory")
        if not self.room:
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
        n = min(len(data), self.per_call, self.room)
        self.got += data[:n]
        self.room -= n
        return n


@pytest.mark.parametrize(
    ("per_call", "linear"), [(1 << 30, 1 << 30), (69632, 1 << 30), (1 << 30, 5000), (700, 3000)]
)
def test_queue_writes_whole_and_in_order(per_call: int, linear: int) -> None:
    data = os.urandom(300_000)
    sink = _QueueSink(per_call, linear)
    repair._write_queue(sink, "sock", memoryview(data)[1:], "receive queue")  # type: ignore[arg-type]
    assert sink.got == data[1:]
    if per_call == linear == 1 << 30:
        assert sink.calls == 1  # one call takes all of it


def test_queue_that_does_not_fit_is_an_error_not_a_hang() -> None:
    sink = _QueueSink(1 << 30, 1 << 30, room=1000)
    with pytest.raises(RepairError, match=r"^sock: the send queue does not fit the socket's buf"):
        repair._write_queue(sink, "sock", b"x" * 5000, "send queue")  # type: ignore[arg-type]


def test_queued_sizes_a_packer_that_never_grows() -> None:
    state = sample(send_unsent=b"n" * 100_000)
    assert state.queued == len(SECRET) + 10 + 100_000
    packer = msgpack.Packer(use_bin_type=True, autoreset=False, buf_size=state.queued + 4096)
    packer.pack(state.to_wire())
    assert len(packer.getbuffer()) < state.queued + 4096
    assert packer.bytes() == msgpack.packb(state.to_wire(), use_bin_type=True)
