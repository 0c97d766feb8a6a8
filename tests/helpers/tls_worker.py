"""A separate process that continues a TLS connection it is handed, then hands it back.

Protocol on a SOCK_SEQPACKET unix socket (fd in argv[1]): each job is a msgpack map
``{state, budget, seed, key_update}`` with the TCP socket's fd attached (SCM_RIGHTS).
The worker restores the connection, echoes until it has read ``budget`` more bytes from
the socket (in random-sized reads, so it stops anywhere, mid-record included), optionally
sends a KeyUpdate, exports the state and sends it back with the fd. ``b"quit"`` ends it.
"""

from __future__ import annotations

import random
import socket
import sys

import msgpack

from pysteer.tls import DataReceived, TlsServerConnection

MAX_MESSAGE = 1 << 20


def serve_budget(
    sock: socket.socket, conn: TlsServerConnection, budget: int, rng: random.Random
) -> None:
    """Echo until ``budget`` raw bytes have been read; everything we owe is sent."""
    for event in conn.receive_data(b""):  # records completed before the hand-over
        if isinstance(event, DataReceived):
            conn.send(event.data)
    sock.sendall(conn.data_to_send())
    while budget > 0:
        data = sock.recv(min(budget, rng.randint(1, 700)))
        if not data:
            raise EOFError("the client closed mid-test")
        budget -= len(data)
        for event in conn.receive_data(data):
            if isinstance(event, DataReceived):
                conn.send(event.data)
        sock.sendall(conn.data_to_send())


def main() -> int:
    ctl = socket.socket(fileno=int(sys.argv[1]))
    while True:
        message, fds, _flags, _addr = socket.recv_fds(ctl, MAX_MESSAGE, 1)
        if message == b"quit" or not message:
            return 0
        job = msgpack.unpackb(message)
        sock = socket.socket(fileno=fds[0])
        sock.settimeout(20)
        conn = TlsServerConnection.from_state(job["state"])
        serve_budget(sock, conn, job["budget"], random.Random(job["seed"]))  # noqa: S311
        if job["key_update"]:
            conn.key_update(request_peer=True)
            sock.sendall(conn.data_to_send())
        state = msgpack.packb(conn.export_state())
        socket.send_fds(ctl, [state], [sock.fileno()])
        sock.close()  # our copy; the receiver has its own


if __name__ == "__main__":
    sys.exit(main())
