"""A backed-up connection moves between lab hosts: its client stopped reading, megabytes
wait in the server's queues both ways, and after the move from a to b both streams arrive
whole, byte for byte, and the connection carries on."""

import contextlib
import fcntl
import hashlib
import os
import socket
import struct
import time

import pytest
from helpers.migration import Mover, RstCapture, listen

from pysteer import tcp
from pysteer.lab import Lab
from pysteer.tcp import constants as k

PORT = 7200
UP, DOWN = 4 << 20, 6 << 20  # bytes queued at the server: unread, and not yet delivered
FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}


def _slow_reader(family: int, vip: str) -> socket.socket:
    """A client with a small, fixed receive buffer: its window shuts after a few hundred
    KiB if it does not read."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 128 << 10)  # before the handshake
    sock.settimeout(20)
    sock.connect((vip, PORT))
    return sock


def _queued(sock: socket.socket, request: int) -> int:
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), request, b"\0" * 4))[0]


def _read(sock: socket.socket, n: int) -> bytes:
    digest = hashlib.sha256()
    while n:
        chunk = sock.recv(min(n, 1 << 20))
        assert chunk, f"EOF with {n} bytes still to come"
        digest.update(chunk)
        n -= len(chunk)
    return digest.digest()


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_backed_up_connection_moves_byte_exact(lab: Lab, family: int) -> None:
    vip = str(lab.plan.vip(family))
    listener = lab.call("a", listen, FAMILIES[family], vip, PORT)
    listener.setsockopt(socket.SOL_SOCKET, k.SO_SNDBUFFORCE, 16 << 20)  # inherited
    listener.setsockopt(socket.SOL_SOCKET, k.SO_RCVBUFFORCE, 16 << 20)
    client = lab.call("client", _slow_reader, FAMILIES[family], vip)
    server, _ = listener.accept()
    server.settimeout(20)
    mover = Mover(lab, family)
    try:
        with RstCapture(lab, "client", "to-steer") as capture:
            up = os.urandom(UP)
            client.sendall(up)  # the server reads none of it before the move
            deadline = time.monotonic() + 20
            while _queued(server, k.SIOCINQ) < UP:
                assert time.monotonic() < deadline, "the upload never arrived"
                time.sleep(0.005)
            down = os.urandom(DOWN)
            server.setblocking(False)
            sent = 0
            with contextlib.suppress(BlockingIOError):
                while sent < DOWN:
                    sent += server.send(down[sent:])
            server.settimeout(20)
            assert sent == DOWN, f"the server could queue only {sent} bytes"
            held = -1
            while held != _queued(client, k.SIOCINQ):  # until the client's window is shut
                held = _queued(client, k.SIOCINQ)
                time.sleep(0.05)
            assert held < DOWN // 4

            server = mover.move(server)
            state = mover.last_state
            assert state is not None
            assert len(state.recv_queue) == UP
            assert len(state.send_unacked) + len(state.send_unsent) == DOWN - held
            assert tcp.tcp_info(server).state == tcp.TcpStateCode.ESTABLISHED

            assert _read(client, DOWN) == hashlib.sha256(down).digest()
            assert _read(server, UP) == hashlib.sha256(up).digest()
            server.sendall(b"still here")  # the connection goes on both ways from b
            assert _read(client, 10) == hashlib.sha256(b"still here").digest()
            client.sendall(b"and so am I")
            assert _read(server, 11) == hashlib.sha256(b"and so am I").digest()
    finally:
        mover.close()
        for sock in (listener, client, server):
            sock.close()
    assert capture.count == 0, capture.lines
