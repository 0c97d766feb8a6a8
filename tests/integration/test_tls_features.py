"""mTLS, resumption, KeyUpdate both ways, bad input and secret hygiene, with real clients."""

import os
import socket
import ssl
import subprocess
import time

import msgpack
import pytest
from conftest import Pki
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from helpers.tls_server import TlsTestServer

from pysteer.tls import (
    Alert,
    ConnectionClosed,
    DataReceived,
    HandshakeFailed,
    KeyUpdated,
    ServerConfig,
    TlsServerConnection,
    TlsStateError,
)


def client_ctx(pki: Pki, version: str, *, cert: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    v = ssl.TLSVersion.TLSv1_3 if version == "1.3" else ssl.TLSVersion.TLSv1_2
    ctx.minimum_version = ctx.maximum_version = v
    if cert:
        ctx.load_cert_chain(pki.client_cert_file, pki.client_key_file)
    return ctx


def echo_once(ctx: ssl.SSLContext, port: int, data: bytes, session=None):
    raw = socket.create_connection(("127.0.0.1", port))
    with raw, ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
        tls.settimeout(10)
        tls.sendall(data)
        got = b""
        while len(got) < len(data):
            got += tls.recv(65536)
        # TLS 1.3 tickets arrive after the handshake: read once more so the session has one.
        assert got == data
        return tls.session, tls.session_reused


def wait_served(server: TlsTestServer, count: int):
    deadline = time.monotonic() + 10
    while len(server.served) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    return server.wait(count)


@pytest.mark.parametrize("version", ["1.3", "1.2"])
def test_mtls_identity_survives_state_round_trip(pki: Pki, version: str) -> None:
    cfg = ServerConfig(
        pki.servers["ecdsa"].chain_pem, pki.servers["ecdsa"].key_pem, client_ca_pem=pki.ca.cert_pem
    )
    with TlsTestServer(cfg) as server:
        echo_once(client_ctx(pki, version, cert=True), server.port, b"hello\n")
        served = wait_served(server, 1)[0]
        hs = served.handshake
        assert hs.peer_chain[0] == pki.client.cert.public_bytes(Encoding.DER)
        # Without a client certificate the handshake fails cleanly.
        with pytest.raises(ssl.SSLError):
            echo_once(client_ctx(pki, version), server.port, b"x")
        refused = wait_served(server, 2)[1]
        assert any(isinstance(e, HandshakeFailed) for e in refused.events)
    # The identity travels with the state.
    conn = _open_connection(cfg, pki, version, cert=True)
    moved = TlsServerConnection.from_state(msgpack.unpackb(msgpack.packb(conn.export_state())))
    assert moved.info.peer_chain == conn.info.peer_chain
    assert moved.info.sni == "localhost"


def _open_connection(cfg: ServerConfig, pki: Pki, version: str, *, cert: bool = False):
    """A handshake between an in-memory ssl client and our connection; returns ours."""
    ctx = client_ctx(pki, version, cert=cert)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    server = TlsServerConnection(cfg)
    for _ in range(10):
        try:
            client.do_handshake()
            break
        except ssl.SSLWantReadError:
            pass
        server.receive_data(outgoing.read())
        incoming.write(server.data_to_send())
    server.receive_data(outgoing.read())
    incoming.write(server.data_to_send())
    assert server.phase == "open"
    return server


@pytest.mark.parametrize("version", ["1.3", "1.2"])
def test_resumption(pki: Pki, version: str) -> None:
    cfg = ServerConfig(pki.servers["ecdsa"].chain_pem, pki.servers["ecdsa"].key_pem)
    ctx = client_ctx(pki, version)
    with TlsTestServer(cfg) as server:
        session, reused = echo_once(ctx, server.port, b"first\n")
        assert not reused
        assert session is not None
        _session, reused = echo_once(ctx, server.port, b"second " * 3000 + b"\n", session)
        assert reused
        first, second = wait_served(server, 2)
        assert (first.handshake.resumed, second.handshake.resumed) == (False, True)
        got = b"".join(e.data for e in second.events if isinstance(e, DataReceived))
        assert got == b"second " * 3000 + b"\n"


def converse(server: TlsTestServer, argv: list[str], steps: list[bytes]) -> bytes:
    """Drive a client line by line: wait for each data line's echo, and after each
    command line (no echo) for the server to have processed one more KeyUpdate."""
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    out, updates = b"", 0
    try:
        for line in steps:
            proc.stdin.write(line)
            proc.stdin.flush()
            deadline = time.monotonic() + 10
            if line.startswith((b"k", b"K", b"^")):
                updates += 1
                while sum(isinstance(e, KeyUpdated) for e in wait_events(server)) < updates:
                    assert time.monotonic() < deadline, f"no KeyUpdate after {line!r}"
                    time.sleep(0.005)
            else:
                while not out.endswith(line):
                    assert time.monotonic() < deadline, f"no echo of {line!r}: {out!r}"
                    out += os.read(proc.stdout.fileno(), 65536)
    finally:
        proc.stdin.close()
        proc.wait(10)
        proc.stdout.close()
    return out


def wait_events(server: TlsTestServer) -> list:
    return server.served[0].events if server.served else []


def test_key_update_from_openssl_s_client(pki: Pki) -> None:
    cfg = ServerConfig(pki.servers["ecdsa"].chain_pem, pki.servers["ecdsa"].key_pem)
    with TlsTestServer(cfg) as server:
        # k: s_client updates its keys; K: and asks the server to update too.
        out = converse(
            server,
            [
                "openssl",
                "s_client",
                "-connect",
                f"127.0.0.1:{server.port}",
                "-servername",
                "localhost",
                "-CAfile",
                str(pki.ca_file),
                "-quiet",
                "-no_ign_eof",
                "-tls1_3",
            ],
            [b"one\n", b"k\n", b"two\n", b"K\n", b"three\n", b"BYE\n"],
        )
        assert out == b"one\ntwo\nthree\nBYE\n"
        served = wait_served(server, 1)[0]
    updates = [e for e in served.events if isinstance(e, KeyUpdated)]
    assert [u.answered for u in updates] == [False, True]
    got = b"".join(e.data for e in served.events if isinstance(e, DataReceived))
    assert got == b"one\ntwo\nthree\nBYE\n"


def test_key_update_from_gnutls_cli(pki: Pki) -> None:
    cfg = ServerConfig(pki.servers["ecdsa"].chain_pem, pki.servers["ecdsa"].key_pem)
    with TlsTestServer(cfg) as server:
        out = converse(
            server,
            [
                "gnutls-cli",
                "--x509cafile",
                str(pki.ca_file),
                "--inline-commands",
                "--priority",
                "NORMAL:-VERS-ALL:+VERS-TLS1.3",
                "--logfile",
                "/dev/null",
                "-p",
                str(server.port),
                "localhost",
            ],
            [b"one\n", b"^rekey^\n", b"two\n", b"^rekey1^\n", b"three\n", b"BYE\n"],
        )
        assert out == b"one\ntwo\nthree\nBYE\n"
        served = wait_served(server, 1)[0]
    updates = [e for e in served.events if isinstance(e, KeyUpdated)]
    # ^rekey^ asks the server to update too; ^rekey1^ updates only gnutls' own keys.
    assert [u.answered for u in updates] == [True, False]


def test_server_initiated_key_update(pki: Pki) -> None:
    """We update our keys and request the peer's: a Python ssl client follows both."""
    cfg = ServerConfig(pki.servers["ecdsa"].chain_pem, pki.servers["ecdsa"].key_pem)

    def on_event(conn: TlsServerConnection, event: object) -> None:
        if isinstance(event, DataReceived) and event.data.startswith(b"rekey"):
            conn.key_update(request_peer=True)

    with TlsTestServer(cfg, on_event=on_event) as server:
        raw = socket.create_connection(("127.0.0.1", server.port))
        with raw, client_ctx(pki, "1.3").wrap_socket(raw, server_hostname="localhost") as tls:
            tls.settimeout(10)
            # OpenSSL answers a KeyUpdate request with its next write: one line after each.
            for line in (b"rekey 1\n", b"after 1\n", b"rekey 2\n", b"after 2\n", b"end\n"):
                tls.sendall(line)
                got = b""
                while len(got) < len(line):
                    got += tls.recv(100)
                assert got == line
        served = wait_served(server, 1)[0]
    updates = [e for e in served.events if isinstance(e, KeyUpdated)]
    assert len(updates) == 2  # the client answered each request with its own KeyUpdate
    assert not any(u.answered for u in updates)


def _raw_tls13(pki: Pki, cfg: ServerConfig):
    """A handshake done over a real socket with an in-memory client, for tampering."""
    server = TlsTestServer(cfg)
    ctx = client_ctx(pki, "1.3")
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.settimeout(10)
    while True:
        try:
            client.do_handshake()
            break
        except ssl.SSLWantReadError:
            sock.sendall(outgoing.read())
            incoming.write(sock.recv(65536))
    sock.sendall(outgoing.read())
    return server, client, incoming, outgoing, sock


def _drain(sock: socket.socket) -> bytes:
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize(
    ("tamper", "alert"),
    [("flip", 20), ("oversize", 22)],
    ids=["bad_record_mac", "record_overflow"],
)
def test_bad_records_close_with_the_right_alert(pki: Pki, tamper: str, alert: int) -> None:
    cfg = ServerConfig(
        pki.servers["ecdsa"].chain_pem, pki.servers["ecdsa"].key_pem, min_version="TLSv1.3"
    )
    before = _fds()
    server, client, incoming, outgoing, sock = _raw_tls13(pki, cfg)
    with server, sock:
        client.write(b"honest data")
        record = bytearray(outgoing.read())
        if tamper == "flip":
            record[-3] ^= 0x40
        else:
            record = bytearray(b"\x17\x03\x03\x41\x01")  # announces 2^14 + 257 bytes
        sock.sendall(bytes(record))
        incoming.write(_drain(sock))  # the server alerts, then closes the TCP connection
        with pytest.raises(ssl.SSLError) as info:
            client.read(100)
        name = {20: "BAD_RECORD_MAC", 22: "RECORD_OVERFLOW"}[alert]
        assert name in str(info.value)
        served = wait_served(server, 1)[0]
        assert served.events[-2:] == [Alert(2, alert, sent=True), ConnectionClosed(clean=False)]
        assert not any(isinstance(e, DataReceived) for e in served.events)
    assert _fds() == before


@pytest.mark.parametrize("garbage", [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", os.urandom(600)])
def test_garbage_instead_of_client_hello(pki: Pki, garbage: bytes) -> None:
    cfg = ServerConfig(pki.servers["ecdsa"].chain_pem, pki.servers["ecdsa"].key_pem)
    before = _fds()
    with TlsTestServer(cfg) as server, socket.create_connection(("127.0.0.1", server.port)) as s:
        s.settimeout(10)
        s.sendall(garbage)
        _drain(s)  # the server closes
        served = wait_served(server, 1)[0]
        assert served.error is None
        kinds = [type(e) for e in served.events]
        assert kinds == [HandshakeFailed, ConnectionClosed]
        assert served.conn.phase == "closed"
    assert _fds() == before


def test_no_secret_in_repr_str_or_errors(pki: Pki) -> None:
    cfg = ServerConfig(pki.servers["ecdsa"].chain_pem, pki.servers["ecdsa"].key_pem)
    conn = _open_connection(cfg, pki, "1.3")
    state = conn.export_state()
    secrets = [state["read"]["secret"], state["write"]["secret"]]
    conn12 = _open_connection(cfg, pki, "1.2")
    s12 = conn12.export_state()
    secrets += [s12["read"]["key"], s12["write"]["key"], s12["read"]["iv"], s12["write"]["iv"]]
    texts = [repr(conn), str(conn), repr(conn12), repr(conn._read), repr(conn._write)]
    texts += [repr(conn._read.key), str(conn._read.secret), f"{conn._write.key}"]
    texts += [repr(cfg), repr(conn.info)]
    for bad in (
        {**state, "v": 9},
        {**state, "read": {"secret": state["read"]["secret"][:-1], "seq": 0}},
        {**state, "read": {**state["read"], "extra": state["write"]["secret"]}},
        {**state, "suite": state["write"]["secret"]},
        {**s12, "write": {**s12["write"], "iv": s12["write"]["iv"] * 2}},
    ):
        with pytest.raises(TlsStateError) as info:
            TlsServerConnection.from_state(bad)
        texts.append(str(info.value))
        texts.append(repr(info.value))
    conn.send(b"x")
    with pytest.raises(TlsStateError) as info:
        conn.export_state()  # unflushed
    texts.append(str(info.value))
    for text in texts:
        for secret in secrets:
            assert secret not in text.encode()
            assert secret.hex() not in text
            assert secret.hex().upper() not in text


def test_export_refused_mid_handshake(pki: Pki) -> None:
    cfg = ServerConfig(pki.servers["ecdsa"].chain_pem, pki.servers["ecdsa"].key_pem)
    conn = TlsServerConnection(cfg)
    with pytest.raises(TlsStateError, match="the connection is handshake"):
        conn.export_state()


def test_hello_retry_request(pki: Pki) -> None:
    """The server offers only P-384; Python's client guesses X25519 first: HRR, then P-384."""
    cfg = ServerConfig(
        pki.servers["ecdsa"].chain_pem, pki.servers["ecdsa"].key_pem, ecdh_curve=ec.SECP384R1()
    )
    with TlsTestServer(cfg) as server:
        echo_once(client_ctx(pki, "1.3"), server.port, b"after a retry\n" * 100)
        served = wait_served(server, 1)[0]
    assert served.handshake.hello_retry
    got = b"".join(e.data for e in served.events if isinstance(e, DataReceived))
    assert got == b"after a retry\n" * 100


def test_tls12_renegotiation_is_refused(pki: Pki) -> None:
    """s_client's R asks to renegotiate: the server answers with a no_renegotiation
    warning, as a moved connection cannot renegotiate. (OpenSSL's client then gives up.)"""
    cfg = ServerConfig(pki.servers["ecdsa"].chain_pem, pki.servers["ecdsa"].key_pem)
    with TlsTestServer(cfg) as server:
        proc = subprocess.Popen(
            [
                "openssl",
                "s_client",
                "-connect",
                f"127.0.0.1:{server.port}",
                "-servername",
                "localhost",
                "-CAfile",
                str(pki.ca_file),
                "-quiet",
                "-no_ign_eof",
                "-tls1_2",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        out = b""
        try:
            proc.stdin.write(b"before\n")
            proc.stdin.flush()
            while not out.endswith(b"before\n"):
                out += os.read(proc.stdout.fileno(), 65536)
            proc.stdin.write(b"R\n")
            proc.stdin.flush()
            proc.wait(10)
        finally:
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                stream.close()
        served = wait_served(server, 1)[0]
    alerts = [e for e in served.events if isinstance(e, Alert)]
    # Our warning, then OpenSSL's client aborts its renegotiation with handshake_failure.
    assert alerts == [Alert(1, 100, sent=True), Alert(2, 40, sent=False)]
    assert served.events[-1] == ConnectionClosed(clean=False)
    assert out == b"before\n"


@pytest.mark.parametrize("version", ["1.3", "1.2"])
def test_ed25519_certificate(pki: Pki, version: str) -> None:
    cfg = ServerConfig(pki.servers["ed25519"].chain_pem, pki.servers["ed25519"].key_pem)
    with TlsTestServer(cfg) as server:
        echo_once(client_ctx(pki, version), server.port, b"edwards\n" * 50)
        served = wait_served(server, 1)[0]
    assert served.handshake.version == f"TLSv{version}"
    got = b"".join(e.data for e in served.events if isinstance(e, DataReceived))
    assert got == b"edwards\n" * 50


def test_alpn_is_negotiated_and_moves(pki: Pki) -> None:
    cfg = ServerConfig(
        pki.servers["ecdsa"].chain_pem, pki.servers["ecdsa"].key_pem, alpn=["http/1.1"]
    )
    ctx = client_ctx(pki, "1.3")
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    with TlsTestServer(cfg) as server:
        echo_once(ctx, server.port, b"alpn\n")
        served = wait_served(server, 1)[0]
    assert served.handshake.alpn == "http/1.1"
    conn = _open_connection(cfg, pki, "1.3")
    assert TlsServerConnection.from_state(conn.export_state()).info.alpn is None  # not offered


def test_min_version_and_aead_only(pki: Pki) -> None:
    """TLS 1.3 only refuses a TLS 1.2 client; the default refuses non-AEAD (CBC) suites."""
    strict = ServerConfig(
        pki.servers["ecdsa"].chain_pem, pki.servers["ecdsa"].key_pem, min_version="TLSv1.3"
    )
    with TlsTestServer(strict) as server:
        with pytest.raises(ssl.SSLError):
            echo_once(client_ctx(pki, "1.2"), server.port, b"x")
        assert any(isinstance(e, HandshakeFailed) for e in wait_served(server, 1)[0].events)
    default = ServerConfig(pki.servers["rsa"].chain_pem, pki.servers["rsa"].key_pem)
    with TlsTestServer(default) as server:
        out = subprocess.run(
            [
                "openssl",
                "s_client",
                "-connect",
                f"127.0.0.1:{server.port}",
                "-tls1_2",
                "-cipher",
                "ECDHE-RSA-AES128-SHA256:AES128-SHA",
                "-CAfile",
                str(pki.ca_file),
            ],
            input=b"",
            capture_output=True,
            timeout=20,
            check=False,
        )
        assert out.returncode != 0
        assert b"handshake failure" in out.stderr
        assert any(isinstance(e, HandshakeFailed) for e in wait_served(server, 1)[0].events)
