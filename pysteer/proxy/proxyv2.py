"""The HAProxy PROXY protocol, version 2 (binary), which a proxy sends first on each
backend connection so the backend logs and serves the real client address (nginx:
``listen ... proxy_protocol``). Only the ``PROXY`` command over TCP, with no TLVs."""

from __future__ import annotations

import ipaddress
import struct

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
VERSION_PROXY = 0x21  # version 2, command PROXY
TCP4, TCP6 = 0x11, 0x21


def header(client: tuple[str, int], local: tuple[str, int]) -> bytes:
    """The header for a connection from ``client`` to ``local`` (the address it reached:
    the service address). Both must be of one family."""
    src, dst = ipaddress.ip_address(client[0]), ipaddress.ip_address(local[0])
    if isinstance(src, ipaddress.IPv6Address) and src.ipv4_mapped is not None:
        src = src.ipv4_mapped
    if isinstance(dst, ipaddress.IPv6Address) and dst.ipv4_mapped is not None:
        dst = dst.ipv4_mapped
    if src.version != dst.version:
        raise ValueError("client and local address are of different families")
    family = TCP4 if src.version == 4 else TCP6
    body = src.packed + dst.packed + struct.pack("!HH", client[1], local[1])
    return SIGNATURE + struct.pack("!BBH", VERSION_PROXY, family, len(body)) + body


def parse(data: bytes) -> tuple[tuple[str, int], tuple[str, int], int]:
    """The client and local address in a header, and its length: for tests and tools."""
    if len(data) < 16 or data[:12] != SIGNATURE or data[12] != VERSION_PROXY:
        raise ValueError("not a PROXY v2 header")
    family, length = data[13], struct.unpack("!H", data[14:16])[0]
    body = data[16 : 16 + length]
    if len(body) != length:
        raise ValueError("truncated PROXY v2 header")
    size = {TCP4: 4, TCP6: 16}.get(family)
    if size is None or length < 2 * size + 4:
        raise ValueError("PROXY v2 header: not TCP over IPv4 or IPv6")
    src = str(ipaddress.ip_address(body[:size]))
    dst = str(ipaddress.ip_address(body[size : 2 * size]))
    sport, dport = struct.unpack("!HH", body[2 * size : 2 * size + 4])
    return (src, sport), (dst, dport), 16 + length
