"""Dump and restore established TCP sockets with TCP_REPAIR, the way CRIU's libsoccr does.

``dump`` freezes a socket (repair mode: it stops transmitting) and reads its whole state;
``restore`` rebuilds it in the caller's network namespace in the order the kernel demands
(docs/how-it-works.md); ``release`` closes a frozen socket without FIN or RST;
``resume`` thaws it in place for a rollback.

Two details keep the peer from waiting on its retransmission timer, the failure that made
CRIU's peer RTO grow to 120 s over a chain of migrations. Before the dump, TCP_QUICKACK
pushes out a pending delayed ACK. After the restore, one out-of-window segment injected
over loopback draws an immediate ACK carrying the restored ``rcv_nxt``, in the peer's
window, instead of leaving only the repair-off window probe that the peer ignores.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import socket
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

from pysteer.tcp import constants as k
from pysteer.tcp import segment
from pysteer.tcp.errors import (
    AddressNotAvailableError,
    RepairError,
    RepairPermissionError,
    UnsupportedSocketError,
)
from pysteer.tcp.info import (
    TCPI_OPT_SACK,
    TCPI_OPT_TIMESTAMPS,
    TCPI_OPT_WSCALE,
    TcpInfo,
    TcpStateCode,
    tcp_info,
)
from pysteer.tcp.state import (
    FIN_ACKED,
    FIN_RECEIVED,
    FIN_SENT,
    MOVABLE_STATES,
    U32,
    Queue,
    RepairWindow,
    SocketOptions,
    TcpState,
)

_U32 = struct.Struct("=I")
_I32 = struct.Struct("=i")
_OPT = struct.Struct("=II")
_WINDOW = struct.Struct("=5I")
_MAX_USER_MSS = 32767
_MIN_CHUNK = 1024  # the smallest piece a queue write backs off to on ENOMEM
_ROOM = 4  # buffer room while the queues go in, per queued byte (see _restore_queues)
_NO_LOWAT = (1 << 31) - 1  # TCP_NOTSENT_LOWAT that never stops a write
_INJECT_WAIT = 1.0  # seconds to wait for an injected segment to change the socket's state


# --- small helpers ---------------------------------------------------------------------------
def describe(sock: socket.socket) -> str:
    """A name for error messages: kind, file descriptor and endpoints (never any data)."""
    kind = {socket.SOCK_STREAM: "TCP", socket.SOCK_DGRAM: "UDP"}.get(sock.type, str(sock.type))
    ends = []
    for getter in (sock.getsockname, sock.getpeername):
        try:
            ends.append(_fmt(getter()))
        except OSError:
            ends.append("?")
    return f"{kind} socket fd {sock.fileno()} {ends[0]} -> {ends[1]}"


class _Name:
    """A socket's name for error messages, worked out only if an error needs it."""

    __slots__ = ("_make",)

    def __init__(self, make: Callable[[], str]) -> None:
        self._make = make

    def __str__(self) -> str:
        return self._make()


Name = str | _Name


def _name_of(sock: socket.socket) -> _Name:
    return _Name(lambda: describe(sock))


def _fmt(addr: tuple) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _setint(sock: socket.socket, level: int, opt: int, value: int) -> None:
    # Python's int form takes a C int: larger unsigned values (marks, ...) go as bytes.
    if 0 <= value < 1 << 31:
        sock.setsockopt(level, opt, value)
    else:
        sock.setsockopt(level, opt, _I32.pack(value) if value < 0 else _U32.pack(value))


def _getint(sock: socket.socket, level: int, opt: int) -> int:
    return sock.getsockopt(level, opt)


def _repair(sock: socket.socket, name: Name, value: int) -> None:
    try:
        _setint(sock, socket.IPPROTO_TCP, k.TCP_REPAIR, value)
    except PermissionError:
        raise RepairPermissionError(
            name, "TCP_REPAIR needs CAP_NET_ADMIN in the socket's network namespace"
        ) from None


def in_repair(sock: socket.socket) -> bool:
    return bool(_getint(sock, socket.IPPROTO_TCP, k.TCP_REPAIR))


def _queue(sock: socket.socket, queue: int) -> None:
    _setint(sock, socket.IPPROTO_TCP, k.TCP_REPAIR_QUEUE, queue)


def _step(name: Name, what: str, exc: OSError) -> RepairError:
    return RepairError(name, f"{what} failed: {exc.strerror or exc}")


@contextmanager
def _doing(name: Name, what: str) -> Iterator[None]:
    """Name the restore step in an OSError's message."""
    try:
        yield
    except RepairError:
        raise
    except OSError as exc:
        raise _step(name, what, exc) from None


# --- dump ---------------------------------------------------------------------------------------
def check_movable(sock: socket.socket) -> Name:
    """Refuse sockets pysteer cannot move, with a clear reason; returns the socket's name."""
    name = _name_of(sock)
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        raise UnsupportedSocketError(name, "not an IPv4 or IPv6 socket")
    if sock.type != socket.SOCK_STREAM:
        raise UnsupportedSocketError(name, "not a TCP socket (only TCP connections can move)")
    if _getint(sock, socket.SOL_SOCKET, socket.SO_PROTOCOL) != socket.IPPROTO_TCP:
        raise UnsupportedSocketError(name, "a stream socket but not plain TCP")
    state = tcp_info(sock).state
    if state == TcpStateCode.LISTEN:
        raise UnsupportedSocketError(name, "a listening socket has no connection to move")
    if state == TcpStateCode.CLOSE:
        raise UnsupportedSocketError(
            name,
            "not connected (never connected, reset, or closed: a descriptor whose connection "
            "is in TIME_WAIT reports CLOSE)",
        )
    if state not in MOVABLE_STATES:
        raise UnsupportedSocketError(
            name,
            f"state {TcpStateCode(state).name} cannot be moved "
            "(pysteer moves ESTABLISHED and the half-closed states)",
        )
    return name


def dump(sock: socket.socket) -> TcpState:
    """Freeze ``sock`` in repair mode and read its whole state.

    On failure the socket is thawed again, as it was. On success it stays frozen: it sends
    no data until ``release`` (close silently) or ``resume`` (carry on here). It may still
    ACK what arrives, so the flow must be held (parked or locked) before the dump.
    """
    name = check_movable(sock)
    if in_repair(sock):
        raise RepairError(name, "already frozen by an earlier dump (release or resume it)")
    # Push out a pending delayed ACK so the peer is not left waiting for it.
    with suppress(OSError):
        _setint(sock, socket.IPPROTO_TCP, k.TCP_QUICKACK, 1)
    _repair(sock, name, k.TCP_REPAIR_ON)
    _queue(sock, k.TCP_SEND_QUEUE)  # from here on queued data is never transmitted
    timeout = sock.gettimeout()
    try:
        # A Python timeout makes recv() poll first, and a queue peek in repair mode is
        # never "readable": peek in blocking mode (MSG_DONTWAIT keeps it from blocking).
        sock.settimeout(None)
        return _read(sock, name)
    except BaseException:
        with suppress(OSError):
            _queue(sock, k.TCP_NO_QUEUE)
            _repair(sock, name, k.TCP_REPAIR_OFF)
        raise
    finally:
        sock.settimeout(timeout)


def _peek_queue(sock: socket.socket, name: Name, queue: int, length: int) -> tuple[int, bytes]:
    """The selected queue's first sequence number and all its bytes, in one call.

    One peek copies the whole queue into one new bytes object (the send side copies whole
    skbs, so the buffer must hold them all). One byte more than expected proves the queue
    holds exactly ``length``.
    """
    seq = _U32.unpack(sock.getsockopt(socket.IPPROTO_TCP, k.TCP_QUEUE_SEQ, 4))[0]
    data = b""
    if length:
        data = sock.recv(length + 1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        if len(data) != length:
            which = "receive" if queue == k.TCP_RECV_QUEUE else "send"
            raise RepairError(name, f"{which} queue holds {len(data)} bytes, expected {length}")
    return seq, data


def _split(data: bytes, at: int) -> tuple[Queue, Queue]:
    """``data[:at], data[at:]`` without copying: a 16 MiB backlog is not copied twice."""
    if at <= 0:
        return b"", data
    if at >= len(data):
        return data, b""
    view = memoryview(data)
    return view[:at], view[at:]


def _ioctl_int(sock: socket.socket, request: int) -> int:
    return _I32.unpack(fcntl.ioctl(sock.fileno(), request, b"\0\0\0\0"))[0]


def _read(sock: socket.socket, name: Name) -> TcpState:
    """Read the state of a socket in repair mode, the send side last.

    Repair mode alone does not stop transmission: a pacing or TSQ timer can still push
    queued data out. Under TCP_REPAIR_QUEUE=SEND the kernel records such data as sent
    without sending it, so the send side is read under SEND, after everything else, and
    the socket is left that way: from then on nothing it transmits is missing from the dump.
    """
    try:
        info = tcp_info(sock)
        state = TcpStateCode(info.state)
        if state not in MOVABLE_STATES:
            raise UnsupportedSocketError(name, f"state changed to {state.name} while freezing")
        _queue(sock, k.TCP_RECV_QUEUE)
        recv_seq, recv_queue = _peek_queue(
            sock, name, k.TCP_RECV_QUEUE, _ioctl_int(sock, k.SIOCINQ)
        )
        _queue(sock, k.TCP_SEND_QUEUE)
        outq = _ioctl_int(sock, k.SIOCOUTQ)
        unsent = _ioctl_int(sock, k.SIOCOUTQNSD)
        if state in FIN_SENT:  # the FIN takes a sequence number but carries no data
            outq = max(outq - 1, 0)
            unsent = max(unsent - 1, 0)
        send_seq, send_queue = _peek_queue(sock, name, k.TCP_SEND_QUEUE, outq)
        mss = _getint(sock, socket.IPPROTO_TCP, socket.TCP_MAXSEG)  # mss_clamp in repair
        timestamp = None
        if info.options & TCPI_OPT_TIMESTAMPS:
            raw = sock.getsockopt(socket.IPPROTO_TCP, k.TCP_TIMESTAMP, 4)
            timestamp = _U32.unpack(raw)[0]
        window = RepairWindow(
            *_WINDOW.unpack(sock.getsockopt(socket.IPPROTO_TCP, k.TCP_REPAIR_WINDOW, 20))
        )
        options = _read_options(sock)
    except OSError as exc:
        raise _step(name, "reading the socket state", exc) from None

    if state in FIN_SENT:
        send_seq = (send_seq - 1) % U32
    if state in FIN_RECEIVED:
        recv_seq = (recv_seq - 1) % U32
        if window.rcv_wup == (recv_seq + 1) % U32:
            # Keep rcv_wup within the data-only sequence space; the right edge is unchanged.
            window = RepairWindow(
                window.snd_wl1,
                window.snd_wnd,
                window.max_window,
                window.rcv_wnd + 1,
                recv_seq,
            )
    send_unacked, send_unsent = _split(send_queue, outq - unsent)
    local, peer = sock.getsockname(), sock.getpeername()
    return TcpState(
        family=4 if sock.family == socket.AF_INET else 6,
        local=(local[0], local[1]),
        peer=(peer[0], peer[1]),
        state=state,
        send_seq=send_seq,
        recv_seq=recv_seq,
        recv_queue=recv_queue,
        send_unacked=send_unacked,
        send_unsent=send_unsent,
        mss_clamp=mss,
        sack=bool(info.options & TCPI_OPT_SACK),
        timestamps=timestamp is not None,
        wscale=_wscale(info),
        timestamp=timestamp,
        window=window,
        options=options,
    )


def _wscale(info: TcpInfo) -> tuple[int, int] | None:
    """Window scales; (0, 0) is the same as no scaling, and ``restore`` writes it as such."""
    scales = (info.snd_wscale, info.rcv_wscale)
    return scales if info.options & TCPI_OPT_WSCALE and scales != (0, 0) else None


def _read_options(sock: socket.socket) -> SocketOptions:
    tcp, sol = socket.IPPROTO_TCP, socket.SOL_SOCKET
    v6 = sock.family == socket.AF_INET6
    return SocketOptions(
        nodelay=bool(_getint(sock, tcp, socket.TCP_NODELAY)),
        cork=bool(_getint(sock, tcp, socket.TCP_CORK)),
        keepalive=bool(_getint(sock, sol, socket.SO_KEEPALIVE)),
        keepidle=_getint(sock, tcp, socket.TCP_KEEPIDLE),
        keepintvl=_getint(sock, tcp, socket.TCP_KEEPINTVL),
        keepcnt=_getint(sock, tcp, socket.TCP_KEEPCNT),
        sndbuf=_getint(sock, sol, socket.SO_SNDBUF),
        rcvbuf=_getint(sock, sol, socket.SO_RCVBUF),
        priority=_getint(sock, sol, k.SO_PRIORITY),
        mark=_getint(sock, sol, k.SO_MARK) & 0xFFFFFFFF,
        tos=_getint(sock, socket.IPPROTO_IPV6, k.IPV6_TCLASS)
        if v6
        else _getint(sock, socket.IPPROTO_IP, socket.IP_TOS),
        v6only=bool(_getint(sock, socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)) if v6 else False,
    )


# --- release and resume -----------------------------------------------------------------------
def release(sock: socket.socket) -> None:
    """Close a frozen socket silently: in repair mode the kernel sends no FIN and no RST."""
    if not in_repair(sock):
        raise RepairError(
            describe(sock), "not frozen (dump it first): closing it now would send a FIN"
        )
    sock.close()


def discard(sock: socket.socket) -> None:
    """Close ``sock`` without a FIN or RST, frozen or not: repair mode first, then close.

    For a connection that must vanish silently from this host because another serves it
    (an aborted import, a failed thaw); never raises."""
    with suppress(OSError):
        _setint(sock, socket.IPPROTO_TCP, k.TCP_REPAIR, k.TCP_REPAIR_ON)
    sock.close()


def _reuse(sock: socket.socket) -> None:
    # Leaving repair mode resets SO_REUSEADDR; without it, the TIME_WAIT this socket
    # leaves behind when it closes blocks a listener on the same address for 60 s.
    with suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)


def resume(sock: socket.socket) -> None:
    """Thaw a dumped socket in place, for a rollback: it carries on as if never frozen."""
    name = _name_of(sock)
    if not in_repair(sock):
        raise RepairError(name, "not frozen: nothing to resume")
    try:
        _queue(sock, k.TCP_NO_QUEUE)
        _repair(sock, name, k.TCP_REPAIR_OFF)  # sends a window probe: the peer re-syncs
    except OSError as exc:
        raise _step(name, "leaving repair mode", exc) from None
    _reuse(sock)


# --- restore -------------------------------------------------------------------------------
def advance_clock(state: TcpState, ms: float) -> TcpState:
    """``state`` with its TCP timestamp clock ``ms`` milliseconds later.

    A frozen socket is not silent: with unread data in its receive queue (a proxy held at
    a request boundary) TCP_QUICKACK cannot push its delayed ACK before the dump, and the
    delayed-ACK timer sends it from the frozen socket up to 200 ms later, with a TSval
    past the dumped one. A restored socket starting from the dumped TSval then sends
    segments "older" than that ACK: the peer's PAWS check drops them, and a restored
    socket, with no RTT sample yet, probes only after a second (seen: 1.08 s stalls in
    a drain). A timestamp clock that jumps forward is harmless to the peer (RFC 7323
    only forbids going back)."""
    if state.timestamp is None or ms <= 0:
        return state
    usec = state.timestamp & 1  # the low bit says the clock counts microseconds
    step = int(ms * (1000 if usec else 1)) & ~1  # even: the flag bit stays as it is
    return dataclasses.replace(state, timestamp=(state.timestamp + step) & 0xFFFFFFFF)


def restore(state: TcpState, *, frozen: bool = False, advance_ms: float = 0.0) -> socket.socket:
    """Rebuild the socket of ``state`` in the current network namespace.

    The namespace must hold the local address. On any failure the half-built socket is
    closed silently (in repair mode) and the error raised; nothing is left behind.
    ``frozen=True`` stops short of leaving repair mode: a migration's target holds the
    socket silent until the commit, then calls ``thaw`` (or ``release`` on an abort).
    ``advance_ms``: start the timestamp clock that much later (see ``advance_clock``).
    """
    state = advance_clock(state, advance_ms)
    family = socket.AF_INET if state.family == 4 else socket.AF_INET6
    name = _Name(lambda: f"restored TCP socket {_fmt(state.local)} -> {_fmt(state.peer)}")
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        _rebuild(sock, state, name)
        if not frozen:
            thaw(sock, state)
    except BaseException as exc:
        discard(sock)  # whatever point the restore had reached
        if isinstance(exc, OSError) and not isinstance(exc, RepairError):
            raise _step(name, "restore", exc) from None
        raise
    return sock


def _write_queue(sock: socket.socket, name: Name, data: Queue, what: str) -> None:
    """Write ``data`` to the selected repair queue (or, out of repair, the send queue).

    The send queue takes any size in one call; the receive queue takes one skb per call
    (17 pages), so a large one needs a call per 68 KiB, each handed the whole rest (a
    memoryview slice: no copy). ENOMEM (a kernel that wants a linear skb per call, as old
    ones did) halves the piece. MSG_DONTWAIT: a send buffer that is too small fails here
    instead of blocking a frozen socket forever.
    """
    view, chunk = memoryview(data), len(data)
    while view:
        try:
            sent = sock.send(view[:chunk], socket.MSG_DONTWAIT)
        except BlockingIOError:
            raise RepairError(name, f"the {what} does not fit the socket's buffer") from None
        except OSError as exc:
            if exc.errno == errno.ENOMEM and chunk > _MIN_CHUNK:
                chunk = max(min(chunk, len(view)) // 2, _MIN_CHUNK)
                continue
            raise
        view = view[sent:]


def _set_queue_seq(sock: socket.socket, queue: int, seq: int) -> None:
    _queue(sock, queue)
    sock.setsockopt(socket.IPPROTO_TCP, k.TCP_QUEUE_SEQ, _U32.pack(seq % U32))


def _rebuild(sock: socket.socket, state: TcpState, name: Name) -> None:
    """Restore in the order the kernel enforces (docs/how-it-works.md)."""
    if state.family == 6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(state.options.v6only))
    # Repair mode before bind: it forces reuse, so the socket binds next to a listener
    # (SO_REUSEADDR would weaken that to plain reuse; thaw sets it afterwards).
    _repair(sock, name, k.TCP_REPAIR_ON)
    try:
        sock.bind(state.local)
    except OSError as exc:
        if exc.errno == errno.EADDRNOTAVAIL:
            raise AddressNotAvailableError(
                name, f"local address {state.local[0]} is not configured in this network namespace"
            ) from None
        raise _step(name, f"bind to {_fmt(state.local)}", exc) from None
    step = "connecting and setting TCP options"  # names the step in an OSError's message
    try:
        _connect(sock, state, name)
        step = "restoring the queues"
        buffers = _restore_queues(sock, state, name)
        step = "setting TCP_REPAIR_WINDOW"
        w = state.window
        window = _WINDOW.pack(w.snd_wl1, w.snd_wnd, w.max_window, w.rcv_wnd, w.rcv_wup)
        sock.setsockopt(socket.IPPROTO_TCP, k.TCP_REPAIR_WINDOW, window)  # checked vs queues
        step = "restoring the FINs"
        _restore_fins(sock, state, name)
        step = "setting socket options"
        _write_options(sock, state, buffers)
    except RepairError:
        raise
    except OSError as exc:
        raise _step(name, step, exc) from None


def thaw(
    sock: socket.socket, state: TcpState, *, elicit: Callable[[TcpState], None] | None = None
) -> None:
    """Leave repair mode on a restored socket and make it announce itself to the peer.

    If the announcement (an injected segment; ``elicit`` replaces it in fault tests)
    fails, the socket is frozen again before the error is raised: whoever discards it
    then sends nothing, as if the thaw had never begun.
    """
    name = _name_of(sock)
    _repair(sock, name, k.TCP_REPAIR_OFF)  # sends one window probe
    _reuse(sock)
    try:
        with _doing(name, "sending the first ACK"):
            (elicit or _elicit_ack)(state)
    except BaseException:
        with suppress(OSError):
            _setint(sock, socket.IPPROTO_TCP, k.TCP_REPAIR, k.TCP_REPAIR_ON)
        raise


def _connect(sock: socket.socket, state: TcpState, name: Name) -> None:
    """Queue sequence numbers, a SYN-less connect, then the negotiated options and clock."""
    tcp = socket.IPPROTO_TCP
    send_queue_len = len(state.send_unacked) + len(state.send_unsent)
    _set_queue_seq(sock, k.TCP_RECV_QUEUE, state.recv_seq - len(state.recv_queue))
    _set_queue_seq(sock, k.TCP_SEND_QUEUE, state.send_seq - send_queue_len)
    _queue(sock, k.TCP_NO_QUEUE)
    # connect() sizes the MSS from the clamp it finds; TCP_REPAIR_OPTIONS sets the clamp
    # only afterwards and never re-syncs, which would leave 536-byte segments.
    # TCP_MAXSEG takes at most 32767 (loopback's 65483 gets the largest it allows).
    sock.setsockopt(tcp, socket.TCP_MAXSEG, min(state.mss_clamp, _MAX_USER_MSS))
    try:
        sock.connect(state.peer)  # in repair mode: no SYN, straight to ESTABLISHED
    except OSError as exc:
        raise _step(name, f"connect to {_fmt(state.peer)}", exc) from None
    opts = [(k.TCPOPT_MSS, state.mss_clamp)]
    if state.sack:
        opts.append((k.TCPOPT_SACK_PERM, 0))
    # Always set the scales: without the option, connect() has already picked a receive
    # scale from this host's sysctl, and the peer would read our window unscaled.
    snd_wscale, rcv_wscale = state.wscale or (0, 0)
    opts.append((k.TCPOPT_WINDOW, snd_wscale | rcv_wscale << 16))
    if state.timestamps:
        opts.append((k.TCPOPT_TIMESTAMP, 0))
    sock.setsockopt(tcp, k.TCP_REPAIR_OPTIONS, b"".join(_OPT.pack(*o) for o in opts))
    if state.timestamp is not None:
        # Without it the TSval jumps and the peer's PAWS drops our segments as old.
        sock.setsockopt(tcp, k.TCP_TIMESTAMP, _U32.pack(state.timestamp))


def _restore_queues(sock: socket.socket, state: TcpState, name: Name) -> tuple[int, int]:
    """Write the queues back; returns the (sndbuf, rcvbuf) sizes set on the way (0: none).

    The buffers get room while the queues go in (our skbs need not pack as tightly as the
    originals): the dumped size, or ``_ROOM`` times the queue if that is more.
    ``_write_options`` then puts back a dumped size that differs. FORCE ignores the caps.
    """
    o = state.options
    send = len(state.send_unacked) + len(state.send_unsent)
    recv = len(state.recv_queue)
    sndbuf = max(o.sndbuf, _ROOM * send)
    rcvbuf = max(o.rcvbuf, _ROOM * recv)
    if sndbuf:
        _setint(sock, socket.SOL_SOCKET, k.SO_SNDBUFFORCE, sndbuf // 2)
    if rcvbuf:
        _setint(sock, socket.SOL_SOCKET, k.SO_RCVBUFFORCE, rcvbuf // 2)
    if recv:
        _queue(sock, k.TCP_RECV_QUEUE)
        _write_queue(sock, name, state.recv_queue, "receive queue")
    if state.send_unacked:
        _queue(sock, k.TCP_SEND_QUEUE)  # restored as sent: retransmitted on our timer
        _write_queue(sock, name, state.send_unacked, "send queue")
    _queue(sock, k.TCP_NO_QUEUE)
    if state.send_unsent:
        # Never-sent data is queued normally, before any FIN, with repair briefly off.
        # A host's net.ipv4.tcp_notsent_lowat (16 KiB on some) would stop the write at its
        # mark, though one write may take the original past it: lifted for the write,
        # then back to the sysctl (an application's own setting is not dumped).
        _setint(sock, socket.IPPROTO_TCP, k.TCP_NOTSENT_LOWAT, _NO_LOWAT)
        _setint(sock, socket.IPPROTO_TCP, k.TCP_REPAIR, k.TCP_REPAIR_OFF_NO_WP)
        try:
            _write_queue(sock, name, state.send_unsent, "unsent data")
        finally:
            _repair(sock, name, k.TCP_REPAIR_ON)
            _setint(sock, socket.IPPROTO_TCP, k.TCP_NOTSENT_LOWAT, 0)
    return sndbuf, rcvbuf


def _peer_segment(state: TcpState, seq: int, ack: int, flags: int) -> None:
    window = state.window.snd_wnd >> (state.wscale[0] if state.wscale else 0)
    packet = segment.build(state.peer, state.local, seq=seq, ack=ack, flags=flags, window=window)
    segment.inject(packet, state.local[0])


def _await_state(sock: socket.socket, name: Name, want: TcpStateCode) -> None:
    deadline = time.monotonic() + _INJECT_WAIT
    while (now := tcp_info(sock).state) != want:
        if time.monotonic() > deadline:
            raise RepairError(
                name, f"state is {TcpStateCode(now).name} after restoring a FIN, wanted {want.name}"
            )
        time.sleep(0.0005)


def _restore_fins(sock: socket.socket, state: TcpState, name: Name) -> None:
    """Put the FINs of a half-closed connection back, in the order they happened."""
    s = state.state
    if s in (TcpStateCode.FIN_WAIT1, TcpStateCode.FIN_WAIT2, TcpStateCode.CLOSING):
        _shutdown_in_repair(sock, acked=s in FIN_ACKED)
    if s in FIN_RECEIVED:
        fin_ack = segment.FIN | segment.ACK
        _peer_segment(state, state.recv_seq, state.send_una, fin_ack)
        want = {
            TcpStateCode.CLOSE_WAIT: TcpStateCode.CLOSE_WAIT,
            TcpStateCode.LAST_ACK: TcpStateCode.CLOSE_WAIT,
            TcpStateCode.CLOSING: TcpStateCode.CLOSING,
        }[s]
        _await_state(sock, name, want)
    if s == TcpStateCode.LAST_ACK:
        _shutdown_in_repair(sock, acked=False)
    if s in FIN_ACKED:
        _peer_segment(state, state.recv_seq, state.send_seq + 1, segment.ACK)
        _await_state(sock, name, TcpStateCode.FIN_WAIT2)


def _shutdown_in_repair(sock: socket.socket, *, acked: bool) -> None:
    # Under TCP_SEND_QUEUE the FIN is recorded as already sent, so no FIN leaves now.
    if acked:
        _queue(sock, k.TCP_SEND_QUEUE)
    sock.shutdown(socket.SHUT_WR)
    _queue(sock, k.TCP_NO_QUEUE)


def _elicit_ack(state: TcpState) -> None:
    """Draw an immediate ACK from the restored socket, carrying its rcv_nxt to the peer."""
    rcv_nxt = state.recv_seq + (1 if state.state in FIN_RECEIVED else 0)
    beyond = rcv_nxt + (1 << 31) - 1  # after any receive window: answered by a dup ACK
    _peer_segment(state, beyond, state.send_una, segment.ACK)


_DEFAULT_OPTIONS = SocketOptions()


def _write_options(sock: socket.socket, state: TcpState, buffers: tuple[int, int]) -> None:
    """Set the options; flags and numbers whose default is 0 only when set (syscalls cost).

    ``buffers``: the (sndbuf, rcvbuf) the queues were written with, left if they match.
    """
    o, d = state.options, _DEFAULT_OPTIONS
    tcp, sol = socket.IPPROTO_TCP, socket.SOL_SOCKET
    for value, default, level, opt in (
        (o.nodelay, d.nodelay, tcp, socket.TCP_NODELAY),
        (o.cork, d.cork, tcp, socket.TCP_CORK),
        (o.keepalive, d.keepalive, sol, socket.SO_KEEPALIVE),
        (o.priority, d.priority, sol, k.SO_PRIORITY),
        (o.mark, d.mark, sol, k.SO_MARK),
    ):
        if value != default:
            _setint(sock, level, opt, int(value))
    # Keepalive timers default to this host's sysctls, which may differ: always set them.
    _setint(sock, tcp, socket.TCP_KEEPIDLE, o.keepidle)
    _setint(sock, tcp, socket.TCP_KEEPINTVL, o.keepintvl)
    _setint(sock, tcp, socket.TCP_KEEPCNT, o.keepcnt)
    if o.sndbuf and o.sndbuf != buffers[0]:
        _setint(sock, sol, k.SO_SNDBUFFORCE, o.sndbuf // 2)
    if o.rcvbuf and o.rcvbuf != buffers[1]:
        _setint(sock, sol, k.SO_RCVBUFFORCE, o.rcvbuf // 2)
    if o.tos:
        if state.family == 6:
            _setint(sock, socket.IPPROTO_IPV6, k.IPV6_TCLASS, o.tos)
        else:
            _setint(sock, socket.IPPROTO_IP, socket.IP_TOS, o.tos)
