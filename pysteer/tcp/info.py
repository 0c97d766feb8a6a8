"""Reading ``struct tcp_info`` (linux/tcp.h), the kernel's view of one TCP socket."""

from __future__ import annotations

import socket
import struct
from enum import IntEnum
from typing import NamedTuple


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

# The fixed head of struct tcp_info: eight u8 fields, then u32 fields up to total_retrans.
_HEAD = struct.Struct("=8B24I")
TCP_INFO_LEN = 240


class TcpInfo(NamedTuple):
    """The fields of ``TCP_INFO`` that repair and its tests use (a tuple: cheap to build)."""

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


def tcp_info(sock: socket.socket) -> TcpInfo:
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_LEN)
    f = _HEAD.unpack_from(raw)
    # u32 fields from index 8: rto, ato, snd_mss, rcv_mss, unacked, sacked, lost, retrans,
    # fackets, 4 x last_*, pmtu, rcv_ssthresh, rtt, rttvar, snd_ssthresh, snd_cwnd, advmss,
    # reordering, rcv_rtt, rcv_space, total_retrans.
    return TcpInfo(
        state=f[0],
        retransmits=f[2],
        backoff=f[4],
        options=f[5],
        snd_wscale=f[6] & 0x0F,
        rcv_wscale=f[6] >> 4,
        rto_us=f[8],
        snd_mss=f[10],
        rcv_mss=f[11],
        unacked=f[12],
        lost=f[14],
        retrans=f[15],
        total_retrans=f[31],
        snd_cwnd=f[26],
    )
