"""TCP_REPAIR across lab hosts: a live connection moves between a and b, the client sees
byte-exact streams, no reset, and its retransmission timer never runs away."""

import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers.migration import (
    Client,
    EchoServer,
    Mover,
    RstCapture,
    connect,
    listen,
    netstat,
)

from pysteer import tcp
from pysteer.lab import Lab
from pysteer.provision import set_sysctls

PORT = 7100
FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}


def _sockets(lab: Lab) -> str:
    """ss -tin of every node, to explain a stalled connection."""
    return "\n".join(
        f"--- {node}\n{lab.run(node, ['ss', '-tin'], check=False).stdout}"
        for node in lab.plan.nodes
    )


def migrate_echo(
    lab: Lab,
    *,
    family: int = 4,
    pattern: str = "bulk",
    moves: int = 4,
    interval: float = 0.02,
    mss: int | None = None,
) -> dict:
    """Echo traffic both ways while the server socket moves ``moves`` times."""
    fam, vip = FAMILIES[family], str(lab.plan.vip(family))
    listeners = [lab.call(h, listen, fam, vip, PORT) for h in lab.plan.hosts]
    client_sock = lab.call("client", connect, fam, vip, PORT, mss=mss)
    server_sock, _ = listeners[0].accept()
    mover = Mover(lab, family)
    server = EchoServer(server_sock, mover)
    client = Client(client_sock, pattern)
    counters = lab.call("client", netstat)
    max_rto = 0
    states = []
    try:
        with RstCapture(lab, "client", "to-steer") as capture:
            server.start()
            client.start()
            for _ in range(moves):
                time.sleep(interval)
                server.request_move()
                states.append(mover.last_state)
                max_rto = max(max_rto, tcp.tcp_info(client_sock).rto_us)
            time.sleep(interval)
            client.stop.set()
            try:
                client.join(30)
            except TimeoutError as exc:
                raise TimeoutError(f"{exc}\n{_sockets(lab)}") from None
            server.join(30)
            max_rto = max(max_rto, tcp.tcp_info(client_sock).rto_us)
            info = tcp.tcp_info(client_sock)
    finally:
        client.stop.set()
        mover.close()
        for s in (*listeners, client_sock, server.sock):
            s.close()
    after = lab.call("client", netstat)
    assert client.errors == []
    assert server.error is None
    assert mover.moves == moves
    assert client.nsent > 0
    assert server.nreceived == client.nsent
    assert client.ngot == client.nsent
    assert server.received.digest() == client.sent.digest()
    assert client.got.digest() == client.sent.digest()
    assert capture.count == 0, capture.lines
    assert after["EstabResets"] == counters["EstabResets"]
    assert after["OutRsts"] == counters["OutRsts"]
    return {"max_rto_us": max_rto, "states": states, "info": info, "bytes": client.nsent}


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_live_connection_moves_between_hosts(lab: Lab, family: int) -> None:
    result = migrate_echo(lab, family=family, moves=2)
    assert result["bytes"] > 1 << 20
    first = result["states"][0]
    assert first.local == (str(lab.plan.vip(family)), PORT)
    assert first.peer[0] == str(lab.plan.address("client", family))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("pattern", ["bursts", "bulk"])
def test_chain_of_100_migrations_keeps_rto_low(lab: Lab, pattern: str) -> None:
    result = migrate_echo(lab, pattern=pattern, moves=100, interval=0.01)
    assert result["max_rto_us"] < 1_000_000
    assert result["bytes"] > 0


@pytest.mark.parametrize(
    ("sysctls", "mss", "family", "check"),
    [
        ({"net.ipv4.tcp_timestamps": "0"}, None, 4, lambda s: not s.timestamps),
        ({"net.ipv4.tcp_sack": "0"}, None, 4, lambda s: not s.sack),
        ({"net.ipv4.tcp_window_scaling": "0"}, None, 4, lambda s: s.wscale is None),
        ({}, 536, 4, lambda s: s.mss_clamp <= 536),
        ({}, None, 6, lambda s: s.family == 6 and s.timestamps and s.sack and s.wscale),
    ],
    ids=["no-timestamps", "no-sack", "no-wscale", "mss-536", "ipv6"],
)
def test_options_still_migrate(
    lab: Lab, sysctls: dict, mss: int | None, family: int, check
) -> None:
    lab.call("client", set_sysctls, sysctls)
    result = migrate_echo(lab, family=family, moves=4, mss=mss)
    assert all(check(state) for state in result["states"])


def _read_all(sock: socket.socket) -> bytes:
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def _await_state(sock: socket.socket, want: tcp.TcpStateCode) -> None:
    deadline = time.monotonic() + 5
    while tcp.tcp_info(sock).state != want:
        assert time.monotonic() < deadline, f"{tcp.tcp_info(sock).state_name}, wanted {want.name}"
        time.sleep(0.001)


def _flow_sockets(lab: Lab, node: str, port: int) -> list[str]:
    out = lab.run(node, ["ss", "-Htan", f"sport = :{port}"]).stdout
    return [ln for ln in out.splitlines() if ln.strip() and "LISTEN" not in ln]


def _connection(lab: Lab, family: int) -> tuple[socket.socket, socket.socket, socket.socket]:
    """(listener on host a, client socket, accepted server socket) for one VIP connection."""
    fam, vip = FAMILIES[family], str(lab.plan.vip(family))
    listener = lab.call("a", listen, fam, vip, PORT)
    client = lab.call("client", connect, fam, vip, PORT)
    server, _ = listener.accept()
    server.settimeout(10)
    return listener, client, server


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_half_closed_by_client(lab: Lab, family: int) -> None:
    """The client shut its write side: the server (CLOSE_WAIT) moves and still talks."""
    listener, client, server = _connection(lab, family)
    request, reply = b"q" * 300_000, bytes(range(256)) * 4000
    mover = Mover(lab, family)
    try:
        with RstCapture(lab, "client", "to-steer") as capture:
            client.sendall(request)
            client.shutdown(socket.SHUT_WR)
            assert _read_all(server) == request
            _await_state(server, tcp.TcpStateCode.CLOSE_WAIT)
            server = mover.move(server)
            assert mover.last_state.state == tcp.TcpStateCode.CLOSE_WAIT
            assert tcp.tcp_info(server).state == tcp.TcpStateCode.CLOSE_WAIT
            assert server.recv(10) == b""  # the EOF is still there after the move
            reader = ThreadPoolExecutor(1).submit(_read_all, client)
            server.sendall(reply)
            server.close()
            assert reader.result(10) == reply
            client.close()
            deadline = time.monotonic() + 5
            while _flow_sockets(lab, "b", PORT):
                assert time.monotonic() < deadline, _flow_sockets(lab, "b", PORT)
                time.sleep(0.01)
    finally:
        mover.close()
        listener.close()
    assert capture.count == 0, capture.lines


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_half_closed_by_server(lab: Lab, family: int) -> None:
    """The server shut its write side (FIN_WAIT2): it moves and still receives to the end."""
    listener, client, server = _connection(lab, family)
    greeting, upload = b"hello " * 1000, b"u" * 500_000
    mover = Mover(lab, family)
    try:
        with RstCapture(lab, "client", "to-steer") as capture:
            server.sendall(greeting)
            server.shutdown(socket.SHUT_WR)
            assert _read_all(client) == greeting
            _await_state(server, tcp.TcpStateCode.FIN_WAIT2)
            server = mover.move(server)
            assert mover.last_state.state == tcp.TcpStateCode.FIN_WAIT2
            assert tcp.tcp_info(server).state == tcp.TcpStateCode.FIN_WAIT2
            reader = ThreadPoolExecutor(1).submit(_read_all, server)
            client.sendall(upload)
            client.close()
            assert reader.result(10) == upload
            server.close()
    finally:
        mover.close()
        listener.close()
    assert capture.count == 0, capture.lines
