"""TCP_REPAIR on loopback in a scratch namespace: every queue, errors, options, rollback."""

import contextlib
import hashlib
import os
import random
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers.flowlock import NftDrop
from helpers.migration import wire_round_trip
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pysteer import netns, tcp
from pysteer.lab.clients import netstat
from pysteer.tcp import repair


def pair(ns: str, host: str = "127.0.0.1", **opts: int) -> tuple[socket.socket, socket.socket]:
    """A connected (client, server) pair on loopback inside namespace ``ns``."""

    def make() -> tuple[socket.socket, socket.socket]:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.create_server((host, 0), family=family) as listener:
            client = socket.socket(family, socket.SOCK_STREAM)
            client.connect(listener.getsockname()[:2])
            server, _ = listener.accept()
        return client, server

    client, server = netns.call_in(ns, make)
    for sock in (client, server):
        sock.settimeout(20)
    return client, server


def flow_of(sock: socket.socket) -> tuple[str, int, str, int]:
    """(source, sport, destination, dport) of the packets ``sock`` sends."""
    local, peer = sock.getsockname(), sock.getpeername()
    return (local[0], local[1], peer[0], peer[1])


def reverse(flow: tuple[str, int, str, int]) -> tuple[str, int, str, int]:
    return (flow[2], flow[3], flow[0], flow[1])


class Stream:
    """Send and receive hashed byte streams over one socket from background threads."""

    def __init__(self) -> None:
        self.sent = hashlib.sha256()
        self.got = hashlib.sha256()
        self.nsent = 0
        self.ngot = 0

    def record_sent(self, data: bytes) -> None:
        self.sent.update(data)
        self.nsent += len(data)

    def send_all(self, sock: socket.socket, data: bytes) -> None:
        sock.sendall(data)
        self.record_sent(data)

    def read_exactly(self, sock: socket.socket, n: int) -> None:
        while self.ngot < n:
            chunk = sock.recv(min(1 << 20, n - self.ngot))
            assert chunk, f"EOF after {self.ngot} of {n} bytes"
            self.got.update(chunk)
            self.ngot += len(chunk)


def exchange(
    client: socket.socket,
    server: socket.socket,
    streams: tuple[Stream, Stream],
    more: tuple[bytes, bytes],
) -> None:
    """Send more both ways at once and check both whole streams, first byte to last."""
    (up, down), (more_up, more_down) = streams, more
    total_up, total_down = up.nsent + len(more_up), down.nsent + len(more_down)
    threads = [
        threading.Thread(target=up.send_all, args=(client, more_up)),
        threading.Thread(target=down.send_all, args=(server, more_down)),
        threading.Thread(target=up.read_exactly, args=(server, total_up)),
        threading.Thread(target=down.read_exactly, args=(client, total_down)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert (up.ngot, down.ngot) == (total_up, total_down)
    assert up.got.digest() == up.sent.digest()
    assert down.got.digest() == down.sent.digest()


def _queue_sizes(sock: socket.socket) -> int:
    import fcntl  # noqa: PLC0415

    return struct.unpack("i", fcntl.ioctl(sock.fileno(), 0x541B, b"\0" * 4))[0]


def _fill_without_acks(
    ns: str, client: socket.socket, server: socket.socket, up: bytes, *, block_acks: bool
) -> tuple[bytes, NftDrop, tuple]:
    """Leave data in every server queue; returns what the server sent before the dump."""
    client.sendall(up)  # the server never reads it: its receive queue
    deadline = time.monotonic() + 5
    while up and _queue_sizes(server) == 0:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    drop = NftDrop(ns, hook="output")
    acks = flow_of(client)
    if block_acks:
        drop.add(acks)  # the server's data stays unacknowledged: it is also the lock
    server.setblocking(False)
    sent = b""
    chunk = os.urandom(65536)
    try:
        while True:
            sent += chunk[: server.send(chunk)]
    except BlockingIOError:
        pass
    server.settimeout(20)
    time.sleep(0.02)  # let the kernel transmit what the window allows
    return sent, drop, acks


def test_loopback_every_queue_byte_exact(scratch_netns: str) -> None:
    client, server = pair(scratch_netns)
    up_pre = os.urandom(150_000)
    down, up = Stream(), Stream()
    up.record_sent(up_pre)
    pre_sent, drop, acks = _fill_without_acks(
        scratch_netns, client, server, up_pre, block_acks=True
    )
    down.record_sent(pre_sent)

    state = tcp.dump(server)
    assert len(state.recv_queue) > 0
    assert len(state.send_unacked) > 0
    assert len(state.send_unsent) > 0
    assert up_pre.startswith(state.recv_queue)
    assert pre_sent.endswith(b"".join((state.send_unacked, state.send_unsent)))
    tcp.release(server)
    server = netns.call_in(scratch_netns, tcp.restore, wire_round_trip(state))
    drop.remove(acks)  # the lock ends once the new socket exists
    server.settimeout(20)

    more_up = b"".join(os.urandom(1 << 20) for _ in range(4))
    more_down = b"".join(os.urandom(1 << 20) for _ in range(4))
    exchange(client, server, (up, down), (more_up, more_down))
    assert tcp.tcp_info(client).state == tcp.TcpStateCode.ESTABLISHED
    client.close()
    server.close()


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    up_before=st.integers(0, 200_000),
    up_after=st.integers(0, 300_000),
    down_after=st.integers(0, 300_000),
    block_acks=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_queues_stay_byte_exact(
    scratch_netns: str,
    *,
    up_before: int,
    up_after: int,
    down_after: int,
    block_acks: bool,
    seed: int,
) -> None:
    rng = random.Random(seed)  # noqa: S311 - test data
    client, server = pair(scratch_netns)
    up, down = Stream(), Stream()
    first = rng.randbytes(up_before)
    up.record_sent(first)
    pre_sent, drop, acks = _fill_without_acks(
        scratch_netns, client, server, first, block_acks=block_acks
    )
    down.record_sent(pre_sent)
    if not block_acks:
        drop.add(acks)  # the lock: between release and restore a segment would draw a RST
    state = tcp.dump(server)
    tcp.release(server)
    server = netns.call_in(scratch_netns, tcp.restore, wire_round_trip(state))
    drop.remove(acks)
    server.settimeout(20)
    exchange(client, server, (up, down), (rng.randbytes(up_after), rng.randbytes(down_after)))
    client.close()
    server.close()


def _backed_up_pair(ns: str) -> tuple[socket.socket, socket.socket]:
    """A pair whose client reads nothing (a small fixed receive buffer: its window soon
    shuts) and whose server has room for megabytes queued both ways."""

    def make() -> tuple[socket.socket, socket.socket]:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            listener.setsockopt(socket.SOL_SOCKET, 32, 24 << 20)  # SO_SNDBUFFORCE
            listener.setsockopt(socket.SOL_SOCKET, 33, 24 << 20)  # SO_RCVBUFFORCE
            client = socket.socket()
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 128 << 10)
            client.connect(listener.getsockname())
            server, _ = listener.accept()
        return client, server

    client, server = netns.call_in(ns, make)
    for sock in (client, server):
        sock.settimeout(20)
    return client, server


def _queue_what_fits(sock: socket.socket, data: memoryview) -> int:
    """Write as much of ``data`` as the socket takes without blocking; how much it took."""
    sock.setblocking(False)
    sent = 0
    with contextlib.suppress(BlockingIOError):
        while sent < len(data):
            sent += sock.send(data[sent:])
    sock.settimeout(20)
    return sent


def test_megabytes_queued_each_way_move_byte_exact(scratch_netns: str) -> None:
    """A client that stopped reading, with MiBs waiting in every server queue: the moved
    socket delivers both streams whole, and the connection carries on.

    The client's ACKs are dropped while the server writes, so its send queue holds data
    both sent (unacknowledged) and never sent: the dump hands them out as two views of
    one buffer, which must restore as the bytes they are.
    """
    client, server = _backed_up_pair(scratch_netns)
    up, down = Stream(), Stream()
    up.send_all(client, os.urandom(5 << 20))  # the server never reads it before the move
    deadline = time.monotonic() + 10
    while _queue_sizes(server) < up.nsent:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    drop = NftDrop(scratch_netns, hook="output")
    acks = flow_of(client)
    drop.add(acks)  # the lock, from before the server writes: in flight stays unacknowledged
    data = memoryview(os.urandom(7 << 20))
    sent = _queue_what_fits(server, data)
    down.record_sent(data[:sent])
    assert sent > 6 << 20, f"the server could queue only {sent} bytes"
    time.sleep(0.05)  # let the kernel transmit what the window allows

    state = tcp.dump(server)
    assert len(state.recv_queue) == up.nsent
    assert len(state.send_unacked) > 0
    assert len(state.send_unsent) > 5 << 20
    assert data[:sent].tobytes().endswith(b"".join((state.send_unacked, state.send_unsent)))
    tcp.release(server)
    server = netns.call_in(scratch_netns, tcp.restore, wire_round_trip(state))
    drop.remove(acks)
    server.settimeout(20)

    threads = [
        threading.Thread(target=up.read_exactly, args=(server, up.nsent)),
        threading.Thread(target=down.read_exactly, args=(client, down.nsent)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert (up.ngot, down.ngot) == (up.nsent, down.nsent)
    assert up.got.digest() == up.sent.digest()
    assert down.got.digest() == down.sent.digest()
    exchange(client, server, (up, down), (os.urandom(1 << 20), os.urandom(1 << 20)))
    client.close()
    server.close()


def test_unsent_backlog_past_notsent_lowat(scratch_netns: str) -> None:
    """A host whose net.ipv4.tcp_notsent_lowat is low (16 KiB) still takes back an unsent
    backlog far past that mark, and the new socket then follows the sysctl again."""
    client, server = _backed_up_pair(scratch_netns)
    down = Stream()
    data = memoryview(os.urandom(2 << 20))
    sent = _queue_what_fits(server, data)
    down.record_sent(data[:sent])
    time.sleep(0.05)
    drop = NftDrop(scratch_netns, hook="output")
    acks = flow_of(client)
    drop.add(acks)
    state = tcp.dump(server)
    assert len(state.send_unsent) > 1 << 20
    tcp.release(server)
    lowat = "/proc/sys/net/ipv4/tcp_notsent_lowat"
    netns.call_in(scratch_netns, Path(lowat).write_text, "16384")
    server = netns.call_in(scratch_netns, tcp.restore, wire_round_trip(state))
    drop.remove(acks)
    assert server.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT) == 0
    down.read_exactly(client, down.nsent)
    assert down.got.digest() == down.sent.digest()
    client.close()
    server.close()


def test_restored_socket_acks_promptly(scratch_netns: str, monkeypatch) -> None:
    """Data the old socket received but never acknowledged is ACKed by the new one at once.

    While the client's own packets are dropped it cannot retransmit its way out, so only an
    in-window ACK from the restored socket can clear its unacknowledged bytes.
    """

    def run(elicit: bool) -> int:
        if not elicit:
            monkeypatch.setattr(repair, "_elicit_ack", lambda state: None)
        client, server = pair(scratch_netns)
        drop = NftDrop(scratch_netns, hook="output")
        to_client, to_server = flow_of(server), flow_of(client)
        drop.add(to_client)  # the server's ACKs never arrive
        client.sendall(b"x" * 1000)
        deadline = time.monotonic() + 5
        while _queue_sizes(server) < 1000:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        assert tcp.tcp_info(client).unacked > 0
        drop.add(to_server)
        drop.remove(to_client)
        state = tcp.dump(server)
        tcp.release(server)
        server = netns.call_in(scratch_netns, tcp.restore, state)
        deadline = time.monotonic() + (2 if elicit else 0.5)
        while tcp.tcp_info(client).unacked and time.monotonic() < deadline:
            time.sleep(0.002)
        unacked = tcp.tcp_info(client).unacked
        drop.remove(to_server)
        assert server.recv(2000) == b"x" * 1000
        client.close()
        server.close()
        monkeypatch.undo()
        return unacked

    assert run(elicit=True) == 0
    assert run(elicit=False) > 0  # the repair-off window probe alone does not ACK


def test_resume_rolls_back_in_place(scratch_netns: str) -> None:
    client, server = pair(scratch_netns)
    client.sendall(b"before")
    state = tcp.dump(server)
    assert state.recv_queue == b"before"
    with pytest.raises(tcp.RepairError, match="frozen"):
        tcp.dump(server)  # already in repair: TCP_INFO works but it is not thawed
    tcp.resume(server)
    client.sendall(b" after")
    server.sendall(b"reply")
    assert client.recv(10) == b"reply"
    got = b""
    while len(got) < 12:
        got += server.recv(100)
    assert got == b"before after"
    with pytest.raises(tcp.RepairError, match="not frozen: nothing to resume"):
        tcp.resume(server)
    with pytest.raises(tcp.RepairError, match=r"not frozen .* would send a FIN"):
        tcp.release(server)
    client.close()
    server.close()


def test_socket_options_are_kept(scratch_netns: str) -> None:
    for host in ("127.0.0.1", "::1"):
        client, server = pair(scratch_netns, host)
        tcpl, sol = socket.IPPROTO_TCP, socket.SOL_SOCKET
        settings_ = [
            (tcpl, socket.TCP_NODELAY, 1),
            (tcpl, socket.TCP_KEEPIDLE, 33),
            (tcpl, socket.TCP_KEEPINTVL, 7),
            (tcpl, socket.TCP_KEEPCNT, 4),
            (sol, socket.SO_KEEPALIVE, 1),
            (sol, 12, 5),  # SO_PRIORITY
            (sol, 36, 0xC0FFEE),  # SO_MARK
            (sol, socket.SO_SNDBUF, 100_000),
            (sol, socket.SO_RCVBUF, 150_000),
        ]
        if ":" in host:
            settings_ += [(socket.IPPROTO_IPV6, 67, 0x28)]  # IPV6_TCLASS
        else:
            settings_ += [(socket.IPPROTO_IP, socket.IP_TOS, 0x28)]
        for level, opt, value in settings_:
            server.setsockopt(level, opt, value)
        server.setsockopt(tcpl, socket.TCP_CORK, 1)
        before = {(lv, o): server.getsockopt(lv, o) for lv, o, _ in settings_}
        v6only = ":" in host and server.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
        state = tcp.dump(server)
        assert state.options.cork
        tcp.release(server)
        restored = netns.call_in(scratch_netns, tcp.restore, wire_round_trip(state))
        after = {(lv, o): restored.getsockopt(lv, o) for lv, o, _ in settings_}
        assert after == before
        assert restored.getsockopt(tcpl, socket.TCP_CORK) == 1
        assert state.options.v6only == bool(v6only)
        if ":" in host:
            assert restored.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == v6only
        restored.setsockopt(tcpl, socket.TCP_CORK, 0)
        restored.sendall(b"ok")
        assert client.recv(2) == b"ok"
        client.close()
        restored.close()


# --- errors --------------------------------------------------------------------------------
def _in_ns(ns: str, fn: Callable[[], socket.socket]) -> socket.socket:
    return netns.call_in(ns, fn)


def test_refuses_listening_unconnected_and_udp(scratch_netns: str) -> None:
    listener = _in_ns(scratch_netns, lambda: socket.create_server(("127.0.0.1", 0)))
    with pytest.raises(tcp.UnsupportedSocketError) as info:
        tcp.dump(listener)
    assert str(info.value).endswith("a listening socket has no connection to move")
    assert "TCP socket fd" in str(info.value)
    assert "127.0.0.1" in str(info.value)
    fresh = socket.socket()
    with pytest.raises(tcp.UnsupportedSocketError, match="not connected"):
        tcp.dump(fresh)
    udp = _in_ns(scratch_netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    with pytest.raises(tcp.UnsupportedSocketError, match=r"^UDP socket .*not a TCP socket"):
        tcp.dump(udp)
    for s in (listener, fresh, udp):
        s.close()


def test_refuses_closed_connection(scratch_netns: str) -> None:
    """A fully closed connection: its descriptor reports CLOSE (the kernel moved the
    TIME_WAIT part to a timewait socket that no descriptor reaches)."""
    client, server = pair(scratch_netns)
    server.shutdown(socket.SHUT_WR)
    assert client.recv(1) == b""
    client.close()
    deadline = time.monotonic() + 5
    while tcp.tcp_info(server).state != tcp.TcpStateCode.CLOSE:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    with pytest.raises(tcp.UnsupportedSocketError, match=r"not connected .*TIME_WAIT"):
        tcp.dump(server)
    server.close()


def test_refuses_syn_recv(scratch_netns: str) -> None:
    """A TCP Fast Open child is accepted in SYN_RECV while the handshake's last ACK is held."""
    # 0x207: client and server on, no cookie needed either way.
    netns.call_in(scratch_netns, Path("/proc/sys/net/ipv4/tcp_fastopen").write_text, "519")
    listener = _in_ns(scratch_netns, lambda: socket.create_server(("127.0.0.1", 0)))
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN, 5)
    port = listener.getsockname()[1]
    client = _in_ns(scratch_netns, socket.socket)
    client.bind(("127.0.0.1", 0))
    drop = NftDrop(scratch_netns, hook="output")
    flow = ("127.0.0.1", port, "127.0.0.1", client.getsockname()[1])
    drop.add(flow)  # the SYN-ACK never reaches the client, so the handshake never ends
    client.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        client.sendto(b"early data", socket.MSG_FASTOPEN, ("127.0.0.1", port))
    listener.settimeout(5)
    child, _ = listener.accept()
    try:
        if tcp.tcp_info(child).state != tcp.TcpStateCode.SYN_RECV:
            pytest.fail(f"setup: child is {tcp.tcp_info(child).state_name}, not SYN_RECV")
        with pytest.raises(tcp.UnsupportedSocketError, match="state SYN_RECV cannot be moved"):
            tcp.dump(child)
    finally:
        drop.remove(flow)
        for s in (child, client, listener):
            s.close()


def test_missing_cap_net_admin_is_named() -> None:
    code = """
import socket
from pysteer import tcp
ls = socket.create_server(("127.0.0.1", 0))
c = socket.create_connection(ls.getsockname())
s, _ = ls.accept()
try:
    tcp.dump(s)
except tcp.RepairPermissionError as exc:
    print(exc)
c.sendall(b"still usable")
print(s.recv(100).decode())
"""
    out = subprocess.run(
        ["setpriv", "--bounding-set=-all", "--inh-caps=-all", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = out.stdout.splitlines()
    assert lines[0].endswith("TCP_REPAIR needs CAP_NET_ADMIN in the socket's network namespace")
    assert lines[0].startswith("TCP socket fd ")
    assert lines[1] == "still usable"


def _tcp_sockets(ns: str) -> list[str]:
    out = subprocess.run(
        netns.exec_argv(ns, ["ss", "-Htan"]), capture_output=True, text=True, check=True
    ).stdout
    return [line for line in out.splitlines() if line.strip()]


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_restore_without_local_address_leaves_nothing(scratch_netns: str) -> None:
    client, server = pair(scratch_netns)
    state = tcp.dump(server)
    tcp.release(server)
    moved = wire_round_trip(state).to_wire()
    moved["local"] = ["10.99.0.1", moved["local"][1]]
    moved["peer"] = ["10.99.0.2", moved["peer"][1]]
    before_sockets, before_fds = _tcp_sockets(scratch_netns), _fds()
    with pytest.raises(tcp.AddressNotAvailableError) as info:
        netns.call_in(scratch_netns, tcp.restore, tcp.TcpState.from_wire(moved))
    assert str(info.value) == (
        f"restored TCP socket 10.99.0.1:{moved['local'][1]} -> 10.99.0.2:{moved['peer'][1]}: "
        "local address 10.99.0.1 is not configured in this network namespace"
    )
    assert _tcp_sockets(scratch_netns) == before_sockets
    assert _fds() == before_fds
    client.close()


def test_kernel_rejected_state_leaves_nothing(scratch_netns: str) -> None:
    """A blob that decodes but that the kernel refuses (window beyond the data) fails whole."""
    client, server = pair(scratch_netns)
    client.sendall(b"data")
    state = tcp.dump(server)
    tcp.release(server)
    wire = state.to_wire()
    w = wire["window"]
    w[0] = (wire["recv_seq"] + w[3] + 100_000) % (1 << 32)  # snd_wl1 after rcv_nxt + rcv_wnd
    bad = tcp.TcpState.from_wire(wire)
    before_sockets, before_fds = _tcp_sockets(scratch_netns), _fds()
    with pytest.raises(tcp.RepairError, match="setting TCP_REPAIR_WINDOW failed: Invalid argument"):
        netns.call_in(scratch_netns, tcp.restore, bad)
    assert _tcp_sockets(scratch_netns) == before_sockets
    assert _fds() == before_fds
    # The good state still restores: nothing of the failed attempt is in the way.
    server = netns.call_in(scratch_netns, tcp.restore, state)
    assert server.recv(4) == b"data"
    client.close()
    server.close()


def _await(sock: socket.socket, want: tcp.TcpStateCode) -> None:
    deadline = time.monotonic() + 5
    while tcp.tcp_info(sock).state != want:
        assert time.monotonic() < deadline, f"{tcp.tcp_info(sock).state_name} != {want.name}"
        time.sleep(0.001)


def _read_to_eof(sock: socket.socket) -> bytes:
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


@pytest.mark.parametrize("closing", ["FIN_WAIT1", "LAST_ACK", "CLOSING"])
def test_unacknowledged_fin_states(scratch_netns: str, closing: str) -> None:
    """The server's FIN is not yet acknowledged (lost on the way) when it moves.

    Drops are at prerouting: a drop in the sender's own output path would make TCP treat
    the data as never sent rather than lost. The new socket retransmits the data and the
    FIN on its timer, which starts at the kernel's 3 s fallback (no RTT sample yet).
    """
    client, server = pair(scratch_netns)
    drop = NftDrop(scratch_netns, hook="prerouting")
    to_client, to_server = flow_of(server), flow_of(client)
    tail = b"last words " * 500
    if closing == "LAST_ACK":
        client.shutdown(socket.SHUT_WR)  # server: CLOSE_WAIT
        assert _read_to_eof(server) == b""
    drop.add(to_client)  # the server's data and FIN never arrive
    server.sendall(tail)
    server.shutdown(socket.SHUT_WR)
    if closing == "CLOSING":
        client.shutdown(socket.SHUT_WR)  # crosses the lost FIN: server goes CLOSING
    _await(server, tcp.TcpStateCode[closing])
    drop.add(to_server)  # the lock
    state = tcp.dump(server)
    assert state.state == tcp.TcpStateCode[closing]
    assert state.send_unacked == tail
    tcp.release(server)
    server = netns.call_in(scratch_netns, tcp.restore, wire_round_trip(state))
    assert tcp.tcp_info(server).state == tcp.TcpStateCode[closing]
    drop.remove(to_server)
    drop.remove(to_client)
    assert _read_to_eof(client) == tail  # retransmitted by the new socket, then its FIN
    if closing == "FIN_WAIT1":
        client.sendall(b"answer")  # the client's direction is still open
        client.shutdown(socket.SHUT_WR)
        assert _read_to_eof(server) == b"answer"
    else:
        assert server.recv(1) == b""
    client.close()
    server.close()


def test_a_delayed_ack_from_the_frozen_socket_does_not_stall_the_restored_one(
    scratch_netns: str,
) -> None:
    """Unread data at the dump (a proxy held at a request boundary) keeps TCP_QUICKACK
    from pushing the pending delayed ACK, so the frozen socket sends it later, with a
    timestamp past the dumped one. Restored from the dumped timestamp, the new socket's
    answer is dropped by the client's PAWS check and resent only after a second; with
    its clock advanced (tcp.advance_clock), the answer arrives at once."""

    def paws_drops(advance_ms: float) -> tuple[int, int]:
        """The client's segments dropped by PAWS, and the restored socket's retransmits."""
        before = netns.call_in(scratch_netns, netstat, "TcpExt")["PAWSEstab"]
        client, server = pair(scratch_netns)
        for _ in range(4):  # request and answer: the server's ACKs become delayed ones
            client.sendall(b"q" * 100)
            assert server.recv(100) == b"q" * 100
            server.sendall(b"a" * 1000)
            got = b""
            while len(got) < 1000:
                got += client.recv(1000)
        client.sendall(b"next request")  # held: the server does not read it
        time.sleep(0.005)
        state = tcp.dump(server)
        time.sleep(0.3)  # the frozen socket's delayed-ACK timer fires meanwhile
        tcp.release(server)
        server = netns.call_in(scratch_netns, tcp.restore, state, advance_ms=advance_ms)
        assert server.recv(100) == b"next request"
        server.sendall(b"the answer")
        assert client.recv(100) == b"the answer"
        retransmits = tcp.tcp_info(server).total_retrans
        client.close()
        server.close()
        return netns.call_in(scratch_netns, netstat, "TcpExt")["PAWSEstab"] - before, retransmits

    assert paws_drops(1000) == (0, 0)
    dropped, retransmits = paws_drops(0)  # the bug, shown: the answer is dropped, resent
    assert dropped >= 1 and retransmits >= 1
