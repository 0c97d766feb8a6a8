"""Hand-made TCP segments injected into a restored socket, as if the peer had sent them.

Restoring a half-closed socket needs the peer's FIN in the receive queue and, for
FIN_WAIT2, the peer's ACK of our FIN; no setsockopt can put them there, so (like CRIU's
libsoccr) we send the segment to ourselves on a raw socket. The same trick makes a restored
socket send the peer a prompt, in-window ACK: a segment just beyond the receive window
draws an immediate duplicate ACK carrying the current ``rcv_nxt``.

Segments go from the peer's address to the local one, so the kernel delivers them over
loopback without touching the wire. They carry ``INJECT_MARK``. Needs CAP_NET_RAW
and CAP_NET_ADMIN (for the mark).
"""

from __future__ import annotations

import socket
import struct

from pysteer.inet import checksum
from pysteer.tcp.constants import INJECT_MARK, SO_MARK

FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
_TCP = struct.Struct("!HHIIBBHHH")


def build(
    src: tuple[str, int],
    dst: tuple[str, int],
    *,
    seq: int,
    ack: int,
    flags: int,
    window: int,
    payload: bytes = b"",
) -> bytes:
    """A whole IPv4 or IPv6 packet carrying one TCP segment, checksums filled in."""
    family = socket.AF_INET6 if ":" in src[0] else socket.AF_INET
    sip, dip = socket.inet_pton(family, src[0]), socket.inet_pton(family, dst[0])
    header = _TCP.pack(
        src[1], dst[1], seq % (1 << 32), ack % (1 << 32), 5 << 4, flags, min(window, 0xFFFF), 0, 0
    )
    length = len(header) + len(payload)
    if family == socket.AF_INET:
        pseudo = sip + dip + struct.pack("!BBH", 0, socket.IPPROTO_TCP, length)
    else:
        pseudo = sip + dip + struct.pack("!I3xB", length, socket.IPPROTO_TCP)
    csum = checksum(pseudo + header + payload)
    segment = header[:16] + struct.pack("!H", csum) + header[18:] + payload
    if family == socket.AF_INET:
        ip = struct.pack(
            "!BBHHHBBH4s4s", 0x45, 0, 20 + length, 0, 0x4000, 64, socket.IPPROTO_TCP, 0, sip, dip
        )
        ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    else:
        ip = struct.pack("!IHBB16s16s", 6 << 28, length, socket.IPPROTO_TCP, 64, sip, dip)
    return ip + segment


def inject(packet: bytes, dst: str) -> None:
    """Send a packet built by ``build`` to the local address ``dst`` (this namespace).

    The raw socket is not cached: it would pin its network namespace alive.
    """
    family = socket.AF_INET6 if ":" in dst else socket.AF_INET
    with socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
        raw.setsockopt(socket.SOL_SOCKET, SO_MARK, INJECT_MARK)
        raw.sendto(packet, (dst, 0))
