"""Flow strings and packet surgery (re-segmentation, checksums, TTL) without a network."""

import ipaddress
import re
import struct

import pytest

from pysteer.flow import Flow, FlowSyntaxError
from pysteer.steer.maps import flow_key, key_flow
from pysteer.steer.packet import PacketError, checksum, forward

DMAC, SMAC = bytes.fromhex("020000000002"), bytes.fromhex("020000000001")


@pytest.mark.parametrize(
    "text",
    ["10.77.1.2:51000-10.77.100.1:443", "[fd70::2]:51000-[fd70:7374:6565:64::1]:443"],
)
def test_flow_round_trip(text: str) -> None:
    flow = Flow.parse(text)
    assert str(flow) == text
    assert key_flow(flow_key(flow)) == flow


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10.0.0.1:80", "expected SRC:PORT-DST:PORT"),
        ("10.0.0.1:80-10.0.0.2", "expected SRC:PORT-DST:PORT"),
        ("10.0.0.1:0-10.0.0.2:80", "port 0 out of 1..65535"),
        ("10.0.0.1:80-10.0.0.2:70000", "port 70000 out of 1..65535"),
        ("300.0.0.1:80-10.0.0.2:80", "bad address '300.0.0.1'"),
        ("fd00::1:80-10.0.0.2:80", "put IPv6 addresses in brackets, e.g. [fd00::2]:51000"),
        ("fd00::1:80-fd00::2:80", "put IPv6 addresses in brackets"),
        ("[10.0.0.1]:80-10.0.0.2:80", "10.0.0.1 is an IPv4 address, written without brackets"),
        ("10.0.0.1:80-[10.0.0.2]:80", "10.0.0.2 is an IPv4 address, written without brackets"),
        ("10.0.0.1:80-[fd00::2]:80", "mixes IPv4 and IPv6"),
    ],
)
def test_malformed_flows(text: str, message: str) -> None:
    with pytest.raises(FlowSyntaxError, match=re.escape(message)):
        Flow.parse(text)


def _tcp_ok(src: bytes, dst: bytes, segment: bytes) -> bool:
    if len(src) == 4:
        pseudo = src + dst + struct.pack("!BBH", 0, 6, len(segment))
    else:
        pseudo = src + dst + struct.pack("!I3xB", len(segment), 6)
    return checksum(pseudo + segment) == 0


def _frame(version: int, payload: bytes, flags: int = 0x19, ttl: int = 64) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", 51000, 443, 1000, 7, 8 << 4, flags, 512, 0xDEAD, 0)
    tcp += b"\x01\x01\x08\x0a" + bytes(8)  # NOP NOP timestamps: options are repeated
    if version == 4:
        ip = struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            0,
            9,
            0x4000,
            ttl,
            6,
            0,
            bytes([10, 0, 0, 2]),
            bytes([10, 0, 0, 1]),
        )
        return SMAC + DMAC + b"\x08\x00" + ip + tcp + payload  # length 0: a GSO packet
    ip = struct.pack(
        "!IHBB16s16s",
        6 << 28,
        len(tcp) + len(payload),
        6,
        ttl,
        ipaddress.ip_address("fd00::2").packed,
        ipaddress.ip_address("fd00::1").packed,
    )
    return SMAC + DMAC + b"\x86\xdd" + ip + tcp + payload


@pytest.mark.parametrize("version", [4, 6])
def test_gso_packet_is_resegmented_with_valid_checksums(version: int) -> None:
    payload = bytes(range(256)) * 40  # 10,240 bytes
    frames = forward(_frame(version, payload), DMAC, SMAC, 1500)
    ihl = 20 if version == 4 else 40
    mss = 1500 - ihl - 32
    assert len(frames) == -(-len(payload) // mss)
    joined = b""
    for n, frame in enumerate(frames):
        assert frame[:12] == DMAC + SMAC
        ip, segment = frame[14 : 14 + ihl], frame[14 + ihl :]
        assert len(ip) + len(segment) <= 1500
        if version == 4:
            assert checksum(ip) == 0
            assert ip[8] == 63  # TTL decremented
            assert struct.unpack_from("!H", ip, 2)[0] == len(frame) - 14
            src, dst = ip[12:16], ip[16:20]
        else:
            assert ip[7] == 63
            assert struct.unpack_from("!H", ip, 4)[0] == len(segment)
            src, dst = ip[8:24], ip[24:40]
        assert _tcp_ok(src, dst, segment)
        assert struct.unpack_from("!I", segment, 4)[0] == 1000 + n * mss
        flags = segment[13]
        last = n == len(frames) - 1
        assert bool(flags & 0x01) == last  # FIN only on the last piece
        assert bool(flags & 0x08) == last  # PSH too
        assert segment[20:32] == b"\x01\x01\x08\x0a" + bytes(8)
        joined += segment[32:]
    assert joined == payload


def test_small_packet_keeps_its_shape() -> None:
    frames = forward(_frame(4, b"hello", flags=0x18), DMAC, SMAC, 1500)
    assert len(frames) == 1
    assert frames[0][-5:] == b"hello"
    assert frames[0][14 + 20 + 13] == 0x18


def test_packets_that_cannot_be_forwarded() -> None:
    with pytest.raises(PacketError, match="TTL or hop limit expired"):
        forward(_frame(4, b"x", ttl=1), DMAC, SMAC, 1500)
    udp = bytearray(_frame(4, b"x"))
    udp[14 + 9] = 17
    with pytest.raises(PacketError, match="not TCP"):
        forward(bytes(udp), DMAC, SMAC, 1500)
    arp = SMAC + DMAC + b"\x08\x06" + bytes(28)
    with pytest.raises(PacketError, match="is not IP"):
        forward(arp, DMAC, SMAC, 1500)
    with pytest.raises(PacketError, match="too short"):
        forward(b"\x00" * 20, DMAC, SMAC, 1500)
