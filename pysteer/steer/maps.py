"""ctypes mirrors of bpf/include/pysteer_structs.h, and conversions to and from them."""

from __future__ import annotations

import ctypes
import enum
import ipaddress

from pysteer.flow import Flow

IPPROTO_TCP = 6
MAX_HOSTS = 64


class Action(enum.IntEnum):
    PASS = 0
    PARK = 1
    TO = 2
    NONE = 3  # prev_action only: the flow had no entry before it was parked


class Decision(enum.IntEnum):
    COMMITTED = 1
    ABORTED = 2


F_NXT, F_FIN, F_SYN = 1, 2, 4  # flow_stats.flags, per direction


class Stat(enum.IntEnum):
    SEEN = 0
    PASS = 1
    PARKED = 2
    REDIRECTED = 3
    DROP_NO_HOST = 4
    DROP_TTL = 5
    DROP_PARK_FULL = 6
    GUARD_DROPPED = 7
    XDP_FALLBACK = 8
    NEW_DIVERTED = 9
    DIVERT_FAILED = 10
    CLOSED_FIN = 11
    CLOSED_RST = 12
    STALE_SYN = 13
    STATS_FULL = 14


class FlowKey(ctypes.Structure):
    _fields_ = (
        ("family", ctypes.c_uint8),
        ("proto", ctypes.c_uint8),
        ("sport", ctypes.c_uint16),  # network order
        ("dport", ctypes.c_uint16),
        ("pad", ctypes.c_uint16),
        ("saddr", ctypes.c_uint8 * 16),
        ("daddr", ctypes.c_uint8 * 16),
    )


class FlowAction(ctypes.Structure):
    _fields_ = (
        ("action", ctypes.c_uint32),
        ("host", ctypes.c_uint32),
        ("prev_action", ctypes.c_uint32),
        ("prev_host", ctypes.c_uint32),
        ("token", ctypes.c_uint64),
        ("lease_ns", ctypes.c_uint64),
    )


class FlowStats(ctypes.Structure):
    _fields_ = (
        ("park_seq", ctypes.c_uint64),
        ("packets", ctypes.c_uint64 * 3),
        ("bytes", ctypes.c_uint64 * 3),
        ("last_ns", ctypes.c_uint64),
        ("syn_seq", ctypes.c_uint32),
        ("fin_end", ctypes.c_uint32 * 2),
        ("nxt", ctypes.c_uint32 * 2),
        ("flags", ctypes.c_uint8 * 2),
        ("pad", ctypes.c_uint8 * 2),
    )


class HostEntry(ctypes.Structure):
    _fields_ = (
        ("ifindex", ctypes.c_uint32),
        ("dmac", ctypes.c_uint8 * 6),
        ("smac", ctypes.c_uint8 * 6),
        ("mtu", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
    )


class DecisionEntry(ctypes.Structure):
    _fields_ = (("outcome", ctypes.c_uint32), ("host", ctypes.c_uint32), ("at_ns", ctypes.c_uint64))


class ParkMeta(ctypes.Structure):
    _fields_ = (
        ("key", FlowKey),
        ("seq", ctypes.c_uint64),
        ("len", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    )


class ServiceKey(ctypes.Structure):
    _fields_ = (
        ("family", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
        ("addr", ctypes.c_uint32 * 4),
    )


def service_key(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ServiceKey:
    key = ServiceKey()
    key.family = address.version
    packed = address.packed
    ctypes.memmove(key.addr, packed, len(packed))
    return key


def key_service(key: ServiceKey) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(bytes(key.addr)[: 4 if key.family == 4 else 16])


def _swap16(port: int) -> int:
    return int.from_bytes(port.to_bytes(2, "big"), "little")


def flow_key(flow: Flow) -> FlowKey:
    key = FlowKey()
    key.family = flow.family
    key.proto = IPPROTO_TCP
    key.sport, key.dport = _swap16(flow.sport), _swap16(flow.dport)
    src, dst = flow.src.packed, flow.dst.packed
    ctypes.memmove(key.saddr, src, len(src))
    ctypes.memmove(key.daddr, dst, len(dst))
    return key


def key_flow(key: FlowKey) -> Flow:
    size = 4 if key.family == 4 else 16
    src = ipaddress.ip_address(bytes(key.saddr)[:size])
    dst = ipaddress.ip_address(bytes(key.daddr)[:size])
    return Flow(src, _swap16(key.sport), dst, _swap16(key.dport))


def mac_bytes(mac: str) -> bytes:
    raw = bytes.fromhex(mac.replace(":", ""))
    if len(raw) != 6:
        raise ValueError(f"not a MAC address: {mac!r}")
    return raw
