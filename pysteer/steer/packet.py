"""Packet surgery for replaying parked packets: MACs, TTL, checksums, GSO re-segmentation.

Parked packets are captured before routing, so replay forwards them as a router would
(new MACs, TTL - 1). On veth the captured TCP checksum is only partial, and a GSO
super-packet is larger than the link MTU, so every packet is re-segmented to the MTU with
all checksums recomputed before it is sent on a packet socket. Pure functions, no I/O.
"""

from __future__ import annotations

import struct

from pysteer.inet import checksum

ETH_LEN = 14
ETH_P_IP, ETH_P_IPV6 = 0x0800, 0x86DD
TCP = 6
FIN, PSH, CWR = 0x01, 0x08, 0x80


class PacketError(ValueError):
    """Not an Ethernet/IP/TCP packet this code can forward."""


def _tcp_checksum(src: bytes, dst: bytes, segment: bytearray) -> int:
    if len(src) == 4:
        pseudo = src + dst + struct.pack("!BBH", 0, TCP, len(segment))
    else:
        pseudo = src + dst + struct.pack("!I3xB", len(segment), TCP)
    segment[16:18] = b"\0\0"
    return checksum(pseudo + bytes(segment))


def _ip_parts(frame: bytes) -> tuple[int, bytearray, bytes, bytes, bytes]:
    """(ethertype, IP header with TTL - 1, TCP segment, source, destination)."""
    if len(frame) < ETH_LEN + 20:
        raise PacketError("frame too short for Ethernet and IP")
    (ethertype,) = struct.unpack_from("!H", frame, 12)
    if ethertype == ETH_P_IP:
        ihl = (frame[ETH_LEN] & 0x0F) * 4
        ip = bytearray(frame[ETH_LEN : ETH_LEN + ihl])
        total = struct.unpack_from("!H", ip, 2)[0]
        proto, ttl_at, src, dst = ip[9], 8, bytes(ip[12:16]), bytes(ip[16:20])
    elif ethertype == ETH_P_IPV6:
        ihl = 40
        ip = bytearray(frame[ETH_LEN : ETH_LEN + 40])
        total = struct.unpack_from("!H", ip, 4)[0] + 40
        proto, ttl_at, src, dst = ip[6], 7, bytes(ip[8:24]), bytes(ip[24:40])
    else:
        raise PacketError(f"ethertype {ethertype:#06x} is not IP")
    if proto != TCP:
        raise PacketError("not TCP (or behind IPv6 extension headers)")
    if ip[ttl_at] <= 1:
        raise PacketError("TTL or hop limit expired")
    ip[ttl_at] -= 1
    # A GSO super-packet may carry a length field of 0 or one that does not fit: use it all.
    end = ETH_LEN + total if total > 0 and ETH_LEN + total <= len(frame) else len(frame)
    return ethertype, ip, frame[ETH_LEN + ihl : end], src, dst


def forward(frame: bytes, dmac: bytes, smac: bytes, mtu: int) -> list[bytes]:
    """Frames ready to send to the next hop: new MACs, TTL - 1, at most ``mtu`` bytes of IP
    each, every checksum recomputed. Raises PacketError for non-TCP or expiring packets."""
    ethertype, ip, body, src, dst = _ip_parts(frame)
    doff = (body[12] >> 4) * 4
    header, payload = bytes(body[:doff]), body[doff:]
    mss = mtu - len(ip) - doff
    if mss <= 0:
        raise PacketError("MTU smaller than the headers")
    chunks = [payload[i : i + mss] for i in range(0, len(payload), mss)] or [b""]
    (seq,) = struct.unpack_from("!I", header, 4)
    ident = struct.unpack_from("!H", ip, 4)[0] if ethertype == ETH_P_IP else 0
    frames = []
    for n, chunk in enumerate(chunks):
        tcp = bytearray(header)
        struct.pack_into("!I", tcp, 4, (seq + n * mss) & 0xFFFFFFFF)
        # FIN and PSH belong to the last piece, CWR to the first.
        tcp[13] &= ~((0 if n == len(chunks) - 1 else FIN | PSH) | (0 if n == 0 else CWR))
        segment = tcp + chunk
        struct.pack_into("!H", segment, 16, _tcp_checksum(src, dst, segment))
        hdr = bytearray(ip)
        if ethertype == ETH_P_IP:
            struct.pack_into("!HH", hdr, 2, len(hdr) + len(segment), (ident + n) & 0xFFFF)
            hdr[10:12] = b"\0\0"
            struct.pack_into("!H", hdr, 10, checksum(bytes(hdr)))
        else:
            struct.pack_into("!H", hdr, 4, len(segment))
        frames.append(dmac + smac + struct.pack("!H", ethertype) + bytes(hdr) + bytes(segment))
    return frames
