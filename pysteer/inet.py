"""The Internet checksum (RFC 1071), shared by everything that builds packets by hand."""

from __future__ import annotations

import struct


def checksum(data: bytes) -> int:
    """The ones'-complement sum of ``data`` as 16-bit words, complemented."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF
