"""Reading ``struct tcp_info`` (linux/tcp.h), the kernel's view of one TCP socket."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from enum import IntEnum


class TcpStateCode(IntEnum):
    """Kernel TCP states (include/net/tcp_states.h)."""

    ESTABLISHED = 1
    SYN_SENT = 2
    SYN_RECV = 3
    FIN_WAIT1 = 4
    FIN_WAIT2 = 5
    TIME_WAIT = 6
    CLOSE = 7
    CLOSE_WAIT = 8
    LAST_ACK = 9
    LISTEN = 10
    CLOSING = 11
    NEW_SYN_RECV = 12


TCPI_OPT_TIMESTAMPS = 1
TCPI_OPT_SACK = 2
TCPI_OPT_WSCALE = 4

_HEAD = struct.Struct("=8B")
_U32 = struct.Struct("=I")
TCP_INFO_LEN = 240


@dataclass(frozen=True)
class TcpInfo:
    """The fields of ``TCP_INFO`` that repair and its tests use."""

    state: int
    retransmits: int
    backoff: int
    options: int
    snd_wscale: int
    rcv_wscale: int
    rto_us: int
    snd_mss: int
    rcv_mss: int
    unacked: int
    lost: int
    retrans: int
    total_retrans: int
    snd_cwnd: int

    @property
    def state_name(self) -> str:
        try:
            return TcpStateCode(self.state).name
        except ValueError:
            return f"state {self.state}"


def _u32(raw: bytes, offset: int) -> int:
    return _U32.unpack_from(raw, offset)[0] if len(raw) >= offset + 4 else 0


def tcp_info(sock: socket.socket) -> TcpInfo:
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_LEN)
    state, _ca, retransmits, _probes, backoff, options, wscale, _flags = _HEAD.unpack_from(raw)
    return TcpInfo(
        state=state,
        retransmits=retransmits,
        backoff=backoff,
        options=options,
        snd_wscale=wscale & 0x0F,
        rcv_wscale=wscale >> 4,
        rto_us=_u32(raw, 8),
        snd_mss=_u32(raw, 16),
        rcv_mss=_u32(raw, 20),
        unacked=_u32(raw, 24),
        lost=_u32(raw, 32),
        retrans=_u32(raw, 36),
        total_retrans=_u32(raw, 100),
        snd_cwnd=_u32(raw, 80),
    )
