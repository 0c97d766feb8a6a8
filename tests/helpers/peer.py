"""Talking to an agent's peer listener as another node would: mutual TLS, the RPC's hello,
then requests one at a time."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import TYPE_CHECKING

from pysteer.lab.cluster import AGENT_PORT
from pysteer.rpc.codec import Decoder, encode, hello

if TYPE_CHECKING:
    from helpers.cluster import Cluster


def peer_connect(
    cluster: Cluster, node: str, cert: Path, key: Path, ca: Path, *, worker: int = 0
) -> ssl.SSLSocket:
    """From ``node``'s namespace, to b's worker ``worker`` (port AGENT_PORT + worker)."""
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.load_cert_chain(cert, key)
    host = str(cluster.lab.plan.address("b"))

    def connect() -> ssl.SSLSocket:
        raw = socket.create_connection((host, AGENT_PORT + worker), timeout=5)
        tls = ctx.wrap_socket(raw, server_hostname="b")
        tls.sendall(encode(hello()))  # its answer: the server's verdict
        if not tls.recv(100):
            raise ConnectionError("the agent hung up")
        return tls

    return cluster.lab.call(node, connect)


def answer_of(sock: socket.socket) -> dict:
    """The next answer on ``sock`` (one at a time: nothing is left over)."""
    decoder = Decoder()
    while (message := decoder.next()) is None:
        data = sock.recv(65536)
        assert data, "the agent hung up"
        decoder.feed(data)
    assert not decoder.pending
    return message


def ask(sock: socket.socket, message: dict) -> dict:
    sock.sendall(encode(message))
    return answer_of(sock)
