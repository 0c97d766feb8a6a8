"""The TLS record layer against real OpenSSL peers and malicious ones (security review,
issue 12), and the runtime's end of a connection that cannot go on.

Real peers: Python ``ssl`` and pyOpenSSL clients on memory BIOs, one per suite, so the
nonces, sequence numbers and key updates of pysteer's layer are checked by OpenSSL both
ways. Malicious peers: records crafted from the client's secrets.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl

import pytest
from OpenSSL import SSL
from test_tls_layer import open_all, state_for

from pysteer.app.handlers import Echo
from pysteer.app.runtime import Connection, Exported, Runtime, Service
from pysteer.certs import CertificateAuthority
from pysteer.flow import Flow
from pysteer.tcp.info import TcpStateCode
from pysteer.tcp.state import RepairWindow, SocketOptions, TcpState
from pysteer.tls import (
    Alert,
    ConnectionClosed,
    DataReceived,
    KeyUpdated,
    Secret,
    ServerConfig,
    TlsError,
    TlsServerConnection,
)
from pysteer.tls import record as rec
from pysteer.tls.handshake import HandshakeResult
from pysteer.tls.keys import traffic_key_iv
from pysteer.tls.record import Protection
from pysteer.tls.state import TlsState
from pysteer.tls.suites import BY_NAME, OPENSSL_NAMES, TLS13
from pysteer.transfer.blob import MigrationBlob

SUITES = sorted(BY_NAME)
TLS13_SUITES = [s for s in SUITES if BY_NAME[s].version == TLS13]
TLS12_SUITES = [s for s in SUITES if BY_NAME[s].version != TLS13]
SEQ_END = (1 << 64) - 1  # never used: 2^64 - 2 is the last sequence number of a key
FATAL = 2
UNEXPECTED, BAD_MAC, OVERFLOW, DECODE, ILLEGAL, INTERNAL = 10, 20, 22, 50, 47, 80
KEY_UPDATE = bytes((24, 0, 0, 1, 0))
KEY_UPDATE_REQUESTED = bytes((24, 0, 0, 1, 1))


def key_updates(client_out: Protection, message: bytes, count: int) -> tuple[bytes, Protection]:
    """``count`` KeyUpdate records from the client, each under the key the one before
    announced; and the client's key after them."""
    records = b""
    for _ in range(count):
        records += client_out.seal(rec.HANDSHAKE, message)
        client_out = client_out.updated()
    return records, client_out


def fatal(alert: int) -> list:
    return [Alert(FATAL, alert, sent=True), ConnectionClosed(clean=False)]


# --- real OpenSSL peers --------------------------------------------------------------------
@pytest.fixture(scope="module")
def pki() -> tuple[CertificateAuthority, dict]:
    ca = CertificateAuthority()
    return ca, {k: ca.issue("localhost", names=["localhost"], kind=k) for k in ("ecdsa", "rsa")}


def server_config(pki, name: str) -> ServerConfig:
    issued = pki[1]["rsa" if "_RSA_" in name else "ecdsa"]
    return ServerConfig(issued.chain_pem, issued.key_pem, suites=[name])


class PyClient:
    """Python ssl (OpenSSL) as the client, on memory BIOs, wired to one server connection."""

    def __init__(self, pki, name: str) -> None:
        ctx = ssl.create_default_context(cadata=pki[0].cert_pem.decode())
        version = (
            ssl.TLSVersion.TLSv1_3 if BY_NAME[name].version == TLS13 else ssl.TLSVersion.TLSv1_2
        )
        ctx.minimum_version = ctx.maximum_version = version
        if name in OPENSSL_NAMES:
            ctx.set_ciphers(OPENSSL_NAMES[name])
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.ssl = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")
        self.conn = TlsServerConnection(server_config(pki, name))
        self.events: list = []
        while True:
            try:
                self.ssl.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.pump()
        self.pump()  # the client's last flight (TLS 1.3: its Finished)
        assert self.conn.phase == "open"
        assert self.conn.info is not None and self.conn.info.suite == name

    def pump(self) -> None:
        """Client bytes to the server, then the server's to the client."""
        if data := self.outgoing.read():
            self.events += self.conn.receive_data(data)
        self.incoming.write(self.conn.data_to_send())

    def received(self) -> bytes:
        """What the server has received as application data since the last call."""
        data = b"".join(e.data for e in self.events if isinstance(e, DataReceived))
        self.events = [e for e in self.events if not isinstance(e, DataReceived)]
        return data

    def read(self) -> bytes:
        out = b""
        while True:
            try:
                out += self.ssl.read(1 << 20)
            except ssl.SSLWantReadError:
                return out

    def both_ways(self, sizes: list[int]) -> None:
        """Messages of these sizes each way; every record goes through OpenSSL."""
        for size in sizes:
            message = os.urandom(size)
            self.ssl.write(message)
            self.pump()
            assert self.received() == message
            self.conn.send(message[::-1])
            self.pump()
            assert self.read() == message[::-1]


@pytest.mark.parametrize("name", SUITES)
def test_records_interoperate_with_openssl_both_ways(pki, name: str) -> None:
    """Nonce construction matches OpenSSL for every suite: what our layer seals OpenSSL
    opens and vice versa, over many records, after a move, and across KeyUpdates."""
    client = PyClient(pki, name)
    client.both_ways([1, 1000, 1 << 14, 40_000, 0x1_0001])
    client.conn = TlsServerConnection.from_state(client.conn.export_state())  # a move
    client.both_ways([7, 50_000])
    if BY_NAME[name].version == TLS13:
        for _ in range(3):
            client.conn.key_update(request_peer=True)
            client.conn.send(b"under the next key")
            client.pump()
            assert client.read() == b"under the next key"
            client.ssl.write(b"answered")  # OpenSSL answers the request with its next write
            client.pump()
            assert client.received() == b"answered"
            assert client.events[-1] == KeyUpdated(answered=False)
        client.both_ways([3, 20_000])
    client.conn.close()
    client.pump()
    assert client.ssl.read(10) == b""  # our close_notify
    client.ssl.unwrap()  # and OpenSSL's answer
    closing = client.conn.receive_data(client.outgoing.read())
    assert closing == [Alert(1, 0, sent=False), ConnectionClosed(clean=True)]


@pytest.mark.parametrize(
    "name",
    [
        "TLS_AES_128_GCM_SHA256",
        "TLS_CHACHA20_POLY1305_SHA256",
        "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
        "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
    ],
)
def test_a_decryption_failure_is_fatal(pki, name: str) -> None:
    client = PyClient(pki, name)
    client.both_ways([10])
    client.ssl.write(b"honest data")
    record = bytearray(client.outgoing.read())
    record[-1] ^= 1
    assert client.conn.receive_data(bytes(record)) == fatal(BAD_MAC)
    client.incoming.write(client.conn.data_to_send())
    with pytest.raises(ssl.SSLError, match="BAD_RECORD_MAC"):
        client.read()
    assert client.conn.receive_data(b"\x17\x03\x03\x00\x05later") == []  # closed: ignored
    assert client.conn.data_to_send() == b""
    with pytest.raises(TlsError, match="connection is closed"):
        client.conn.send(b"x")


@pytest.mark.parametrize(
    "name",
    ["TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256", "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256"],
)
def test_renegotiation_is_refused(pki, name: str) -> None:
    """A TLS 1.2 client's renegotiation gets a no_renegotiation warning (a moved connection
    cannot renegotiate); OpenSSL's client then gives up with handshake_failure."""
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_cipher_list(OPENSSL_NAMES[name].encode())
    client = SSL.Connection(ctx, None)
    client.set_connect_state()
    conn = TlsServerConnection(server_config(pki, name))

    def pump_once() -> list:
        try:
            data = client.bio_read(1 << 20)
        except SSL.WantReadError:
            data = b""
        events = conn.receive_data(data)
        if out := conn.data_to_send():
            client.bio_write(out)
        return events

    while True:
        try:
            client.do_handshake()
            break
        except SSL.WantReadError:
            pump_once()
    pump_once()
    client.send(b"before")
    assert pump_once() == [DataReceived(b"before")]
    assert client.renegotiate()
    with pytest.raises(SSL.WantReadError):
        client.do_handshake()
    assert pump_once() == [Alert(1, 100, sent=True)]
    with pytest.raises(SSL.Error):
        client.do_handshake()
    assert pump_once() == [Alert(2, 40, sent=False), ConnectionClosed(clean=False)]


# --- TLS 1.3 KeyUpdate ---------------------------------------------------------------------
@pytest.mark.parametrize("name", TLS13_SUITES)
def test_a_record_of_key_updates_is_refused(name: str) -> None:
    """One 16 KB record of 3,276 KeyUpdates: refused at the first (a KeyUpdate must end
    its record), with one alert under the original key and no rekey, no reply."""
    state, client_out, client_in = state_for(name)
    conn = TlsServerConnection.from_state(state)
    flood = KEY_UPDATE_REQUESTED * 3276
    assert len(flood) <= rec.MAX_PLAINTEXT
    assert conn.receive_data(client_out.seal(rec.HANDSHAKE, flood)) == fatal(UNEXPECTED)
    assert open_all(client_in, conn.data_to_send()) == [(21, bytes((FATAL, UNEXPECTED)))]


def test_key_update_must_end_its_record() -> None:
    for trailing in (b"\x18", KEY_UPDATE[:2], KEY_UPDATE):
        state, client_out, _ = state_for("TLS_AES_128_GCM_SHA256")
        conn = TlsServerConnection.from_state(state)
        events = conn.receive_data(client_out.seal(rec.HANDSHAKE, KEY_UPDATE + trailing))
        assert events == fatal(UNEXPECTED)
    # Split across records it is fine, as long as it ends one (the common test covers it).
    state, client_out, _ = state_for("TLS_AES_128_GCM_SHA256")
    conn = TlsServerConnection.from_state(state)
    records = client_out.seal(rec.HANDSHAKE, KEY_UPDATE[:1]) + client_out.seal(
        rec.HANDSHAKE, KEY_UPDATE[1:]
    )
    assert conn.receive_data(records) == [KeyUpdated(answered=False)]


@pytest.mark.parametrize(
    ("between", "ctype"),
    [(b"data", rec.APPLICATION_DATA), (b"\x01\x00", rec.ALERT)],
    ids=["application_data", "alert"],
)
def test_no_record_between_the_fragments_of_a_handshake_message(between, ctype) -> None:
    state, client_out, _ = state_for("TLS_CHACHA20_POLY1305_SHA256")
    conn = TlsServerConnection.from_state(state)
    assert conn.receive_data(client_out.seal(rec.HANDSHAKE, KEY_UPDATE[:2])) == []
    assert conn.receive_data(client_out.seal(ctype, between)) == fatal(UNEXPECTED)


@pytest.mark.parametrize(
    "name", ["TLS_AES_256_GCM_SHA384", "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"]
)
def test_an_empty_handshake_record_is_refused(name: str) -> None:
    state, client_out, _ = state_for(name)
    conn = TlsServerConnection.from_state(state)
    assert conn.receive_data(client_out.seal(rec.HANDSHAKE, b"")) == fatal(UNEXPECTED)


@pytest.mark.parametrize("name", TLS13_SUITES)
def test_key_update_requests_that_come_together_get_one_answer(name: str) -> None:
    state, client_out, client_in = state_for(name)
    conn = TlsServerConnection.from_state(state)
    records, client_out = key_updates(client_out, KEY_UPDATE_REQUESTED, 5)
    events = conn.receive_data(records)
    assert events == [KeyUpdated(answered=True)] + [KeyUpdated(answered=False)] * 4
    assert open_all(client_in, conn.data_to_send()) == [(22, KEY_UPDATE)]
    client_in = client_in.updated()
    # A later request is answered again; data follows under the key after the answer.
    events = conn.receive_data(client_out.seal(rec.HANDSHAKE, KEY_UPDATE_REQUESTED))
    assert events == [KeyUpdated(answered=True)]
    client_out = client_out.updated()
    conn.send(b"after")
    out = conn.data_to_send()
    first = 5 + int.from_bytes(out[3:5], "big")
    assert open_all(client_in, out[:first]) == [(22, KEY_UPDATE)]
    assert open_all(client_in.updated(), out[first:]) == [(23, b"after")]
    assert conn.receive_data(client_out.seal(23, b"still")) == [DataReceived(b"still")]


@pytest.mark.parametrize("name", TLS13_SUITES)
def test_key_updates_are_rate_bounded(name: str) -> None:
    """32 KeyUpdates in any 1,024 records: a burst of 32 passes, the 33rd is fatal; one
    every 32 records passes for ever."""
    state, client_out, _ = state_for(name)
    conn = TlsServerConnection.from_state(state)
    burst, client_out = key_updates(client_out, KEY_UPDATE, 32)
    assert conn.receive_data(burst) == [KeyUpdated(answered=False)] * 32
    events = conn.receive_data(client_out.seal(rec.HANDSHAKE, KEY_UPDATE))
    assert events == fatal(UNEXPECTED)

    state, client_out, _ = state_for(name)
    conn = TlsServerConnection.from_state(state)
    for _ in range(100):  # 3,200 records, 100 KeyUpdates
        steady = b"".join(client_out.seal(23, b"x") for _ in range(31))
        steady += client_out.seal(rec.HANDSHAKE, KEY_UPDATE)
        client_out = client_out.updated()
        events = conn.receive_data(steady)
        assert events == [DataReceived(b"x")] * 31 + [KeyUpdated(answered=False)]


@pytest.mark.parametrize("name", TLS13_SUITES)
def test_answers_to_our_key_update_requests_are_not_counted(name: str) -> None:
    """A server that asks for a new key often is answered as often: never fatal."""
    state, client_out, client_in = state_for(name)
    conn = TlsServerConnection.from_state(state)
    for _ in range(100):
        conn.key_update(request_peer=True)
        assert open_all(client_in, conn.data_to_send()) == [(22, KEY_UPDATE_REQUESTED)]
        client_in = client_in.updated()
        events = conn.receive_data(client_out.seal(rec.HANDSHAKE, KEY_UPDATE))
        assert events == [KeyUpdated(answered=False)]
        client_out = client_out.updated()
    # Unasked ones still count, answered or not: 32 pass, the 33rd is fatal.
    burst, client_out = key_updates(client_out, KEY_UPDATE, 33)
    assert conn.receive_data(burst) == [KeyUpdated(answered=False)] * 32 + fatal(UNEXPECTED)


def test_renegotiation_attempts_are_rate_bounded() -> None:
    state, client_out, client_in = state_for("TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256")
    conn = TlsServerConnection.from_state(state)
    hello = bytes((1, 0, 0, 2, 3, 3))  # a ClientHello header and two bytes
    events = conn.receive_data(b"".join(client_out.seal(22, hello) for _ in range(32)))
    assert events == [Alert(1, 100, sent=True)] * 32
    assert conn.receive_data(client_out.seal(22, hello)) == fatal(UNEXPECTED)
    assert open_all(client_in, conn.data_to_send())[-1] == (21, bytes((FATAL, UNEXPECTED)))


# --- the post-handshake buffer -------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "header", "alert"),
    [
        ("TLS_AES_128_GCM_SHA256", b"\x04\xff\xff\xff", UNEXPECTED),  # a NewSessionTicket
        ("TLS_AES_128_GCM_SHA256", b"\x18\xff\xff\xff", DECODE),  # a 16 MB KeyUpdate
        ("TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256", b"\x01\xff\xff\xff", ILLEGAL),
        ("TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256", b"\x01\x00\xff\xfd", ILLEGAL),  # 64 KB + 1
    ],
    ids=["tls13_other_message", "tls13_long_key_update", "tls12_16MB", "tls12_64KB_plus_1"],
)
def test_post_handshake_buffer_is_capped(name: str, header: bytes, alert: int) -> None:
    """A message too long to buffer is refused from its header, so what waits for the rest
    of a message never outgrows what an export may carry (MAX_HS_BUFFER, 64 KB)."""
    state, client_out, _ = state_for(name)
    conn = TlsServerConnection.from_state(state)
    chunk = os.urandom(rec.MAX_PLAINTEXT)
    events = conn.receive_data(client_out.seal(rec.HANDSHAKE, header + chunk[4:]))
    for _ in range(199):
        events += conn.receive_data(client_out.seal(rec.HANDSHAKE, chunk))
    assert events == fatal(alert)


def test_a_64kb_client_hello_is_buffered_and_refused_and_always_movable() -> None:
    state, client_out, _ = state_for("TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256")
    conn = TlsServerConnection.from_state(state)
    message = b"\x01\x00\xff\xfc" + os.urandom((1 << 16) - 4)  # exactly MAX_HS_BUFFER
    for pos in range(0, len(message), rec.MAX_PLAINTEXT):
        events = conn.receive_data(client_out.seal(22, message[pos : pos + rec.MAX_PLAINTEXT]))
        conn.data_to_send()
        conn = TlsServerConnection.from_state(conn.export_state())  # movable at every step
    assert events == [Alert(1, 100, sent=True)]
    assert conn.export_state()["hs"] == b""
    assert conn.receive_data(client_out.seal(23, b"on")) == [DataReceived(b"on")]


# --- record sizes --------------------------------------------------------------------------
def seal_inner(client_out: Protection, inner: bytes, announced: int | None = None) -> bytes:
    """A TLS 1.3 record around any TLSInnerPlaintext (content type and padding included),
    with its nonce built here from the RFC, not by the layer under test."""
    suite = client_out.suite
    assert client_out.secret is not None
    key, iv = traffic_key_iv(suite, client_out.secret.reveal())
    nonce = (int.from_bytes(iv, "big") ^ client_out.seq).to_bytes(12, "big")
    length = announced if announced is not None else len(inner) + 16
    header = bytes((23, 3, 3)) + length.to_bytes(2, "big")
    client_out.seq += 1
    return header + suite.aead(key).encrypt(nonce, inner, header)


@pytest.mark.parametrize("name", TLS13_SUITES)
def test_padding_cannot_make_a_record_overflow(name: str) -> None:
    """RFC 8446 §5.4: the inner plaintext, padding included, is at most 2^14 + 1 bytes."""
    state, client_out, _ = state_for(name)
    conn = TlsServerConnection.from_state(state)
    full = b"x" * (1 << 14)
    assert conn.receive_data(seal_inner(client_out, full + b"\x17")) == [DataReceived(full)]
    padded = b"y" * 100 + b"\x17" + bytes((1 << 14) - 100)  # 2^14 + 1 with padding: fine
    assert conn.receive_data(seal_inner(client_out, padded)) == [DataReceived(b"y" * 100)]
    assert conn.receive_data(seal_inner(client_out, bytes(300))) == fatal(UNEXPECTED)
    for inner in (full + b"\x17\x00", b"z" + b"\x17" + bytes((1 << 14) + 238)):
        state, client_out, _ = state_for(name)
        conn = TlsServerConnection.from_state(state)
        assert conn.receive_data(seal_inner(client_out, inner)) == fatal(OVERFLOW)
    state, client_out, _ = state_for(name)
    conn = TlsServerConnection.from_state(state)
    too_long = conn.receive_data(b"\x17\x03\x03\x41\x01")  # announces 2^14 + 257 bytes
    assert too_long == fatal(OVERFLOW)


@pytest.mark.parametrize("name", TLS12_SUITES)
def test_tls12_record_bounds(name: str) -> None:
    state, client_out, _ = state_for(name)
    conn = TlsServerConnection.from_state(state)
    full = os.urandom(1 << 14)
    assert conn.receive_data(client_out.seal(23, full)) == [DataReceived(full)]
    assert conn.receive_data(client_out.seal(23, full + b"!")) == fatal(OVERFLOW)
    state, client_out, _ = state_for(name)
    conn = TlsServerConnection.from_state(state)
    assert conn.receive_data(b"\x17\x03\x03\x48\x01") == fatal(OVERFLOW)  # 2^14 + 2049
    state, client_out, _ = state_for(name)
    conn = TlsServerConnection.from_state(state)
    body = os.urandom((1 << 14) + 2048)  # within the ciphertext bound, too long a plaintext
    assert conn.receive_data(b"\x17\x03\x03\x48\x00" + body) == fatal(OVERFLOW)


# --- sequence numbers ----------------------------------------------------------------------
@pytest.mark.parametrize("name", TLS12_SUITES)
def test_tls12_send_ends_cleanly_when_sequence_numbers_run_out(name: str) -> None:
    """The last sequence number is kept for the fatal alert that ends the connection."""
    state, _, client_in = state_for(name)
    state["write"]["seq"] = client_in.seq = SEQ_END - 2
    conn = TlsServerConnection.from_state(state)
    conn.send(b"last")
    with pytest.raises(TlsError, match="sequence numbers exhausted") as info:
        conn.send(b"one too many")
    assert type(info.value).__name__ == "TlsEnded"
    assert conn.phase == "closed"
    assert open_all(client_in, conn.data_to_send()) == [(23, b"last"), (21, bytes((2, 80)))]
    with pytest.raises(TlsError, match="connection is closed"):
        conn.send(b"x")
    # Nothing left at all (an imported state may say so): closed, nothing sent.
    state, _, _ = state_for(name)
    state["write"]["seq"] = SEQ_END
    conn = TlsServerConnection.from_state(state)
    with pytest.raises(TlsError, match="sequence numbers exhausted"):
        conn.send(b"x")
    assert conn.phase == "closed"
    assert conn.data_to_send() == b""


@pytest.mark.parametrize("name", TLS13_SUITES)
def test_tls13_rekeys_before_its_sequence_numbers_run_out(name: str) -> None:
    state, _, client_in = state_for(name)
    state["write"]["seq"] = client_in.seq = SEQ_END - 3
    conn = TlsServerConnection.from_state(state)
    for i in range(5):
        conn.send(b"%d" % i)
    out, got = conn.data_to_send(), []
    pos = 0
    while pos < len(out):
        end = pos + 5 + int.from_bytes(out[pos + 3 : pos + 5], "big")
        ctype, data = client_in.open(out[pos : pos + 5], out[pos + 5 : end])
        pos = end
        if ctype == rec.HANDSHAKE:
            assert data == KEY_UPDATE
            client_in = client_in.updated()
        else:
            got.append(data)
    assert got == [b"%d" % i for i in range(5)]
    assert conn.phase == "open"
    assert conn.export_state()["write"]["seq"] == 4  # the new key: 4 records after the first


@pytest.mark.parametrize(
    "name", ["TLS_AES_128_GCM_SHA256", "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384"]
)
def test_receive_side_sequence_exhaustion_is_fatal(name: str) -> None:
    state, client_out, _ = state_for(name)
    state["read"]["seq"] = client_out.seq = SEQ_END - 1
    conn = TlsServerConnection.from_state(state)
    assert conn.receive_data(client_out.seal(23, b"last")) == [DataReceived(b"last")]
    garbage = b"\x17\x03\x03\x00\x20" + bytes(32)  # the peer cannot seal another: refused
    assert conn.receive_data(garbage) == fatal(UNEXPECTED)  # before any decryption
    # Both directions exhausted: receive_data still never raises; no alert fits.
    state, client_out, _ = state_for(name)
    state["read"]["seq"] = client_out.seq = SEQ_END - 1
    state["write"]["seq"] = SEQ_END
    conn = TlsServerConnection.from_state(state)
    assert conn.receive_data(client_out.seal(23, b"x") + garbage) == [
        DataReceived(b"x"),
        ConnectionClosed(clean=False),
    ]
    assert conn.data_to_send() == b""


def test_runtime_ends_a_connection_whose_sequence_numbers_ran_out(caplog) -> None:
    """The runtime finishes the connection: alert and FIN to the peer, socket closed, out of
    its table, one warning, no traceback."""
    caplog.set_level(logging.DEBUG, logger="pysteer.app")
    state, client_out, client_in = state_for("TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256")
    state["write"]["seq"] = client_in.seq = SEQ_END - 1  # only the alert's number is left

    async def scenario() -> tuple[bytes, Runtime, Connection, list]:
        loop = asyncio.get_running_loop()
        runtime = Runtime([Service(7, "echo")], "127.0.0.1")
        closed: list = []
        runtime.on_close = closed.append
        with socket.create_server(("127.0.0.1", 0)) as listener:
            client = socket.create_connection(listener.getsockname())
            server, _ = listener.accept()
        tls = TlsServerConnection.from_state(state)
        conn = Connection(1, server, runtime.services[7], Echo(), tls)
        runtime._run(conn)
        client.setblocking(False)
        with client:
            await loop.sock_sendall(client, client_out.seal(23, b"ping"))
            got = b""
            while chunk := await asyncio.wait_for(loop.sock_recv(client, 65536), 3):
                got += chunk
        assert conn.task is not None
        await asyncio.wait_for(conn.task, 3)
        return got, runtime, conn, closed

    got, runtime, conn, closed = asyncio.run(scenario())
    assert open_all(client_in, got) == [(21, bytes((FATAL, INTERNAL)))]
    assert conn.closed and closed == [conn]
    assert runtime.connections == {} and runtime.find(conn.flow) is None
    assert conn.sock.fileno() == -1
    records = [r for r in caplog.records if r.name == "pysteer.app"]
    assert len(records) == 1, [r.getMessage() for r in records]
    assert records[0].levelno == logging.WARNING and records[0].exc_info is None
    assert "sequence numbers exhausted" in records[0].getMessage()


# --- no key bytes in any repr --------------------------------------------------------------
def test_no_repr_holds_key_bytes() -> None:
    secrets: list[bytes] = []

    def secret(n: int) -> bytes:
        value = os.urandom(n)
        secrets.append(value)
        return value

    state13, _, _ = state_for("TLS_AES_256_GCM_SHA384")
    state13["read"]["secret"], state13["write"]["secret"] = secret(48), secret(48)
    state13["rx"], state13["hs"] = secret(16), secret(16)
    state12, _, _ = state_for("TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256")
    for side in ("read", "write"):
        state12[side].update(key=secret(32), iv=secret(12))
    conn13, conn12 = (TlsServerConnection.from_state(s) for s in (state13, state12))
    result = HandshakeResult(
        version=TLS13,
        suite=BY_NAME["TLS_AES_256_GCM_SHA384"],
        secrets={"CLIENT_TRAFFIC_SECRET_0": Secret(secret(48))},
        client_random=secret(32),
        server_random=secret(32),
        sni="x",
        alpn=None,
        resumed=False,
        peer_chain=(secret(40),),
        tickets_sent=2,
        client_hellos=1,
    )
    tcp = TcpState(
        family=4,
        local=("10.0.0.1", 443),
        peer=("10.0.0.2", 40000),
        state=TcpStateCode.ESTABLISHED,
        send_seq=1,
        recv_seq=2,
        recv_queue=secret(20),
        send_unacked=secret(20),
        send_unsent=secret(20),
        mss_clamp=1460,
        sack=True,
        timestamps=True,
        wscale=(7, 7),
        timestamp=1,
        window=RepairWindow(1, 2, 3, 4, 5),
        options=SocketOptions(),
    )
    tls_export = conn13.export_state()
    with socket.socket() as sock:
        app = {"app": "ticker", "v": 1, "state": {"partial": secret(20)}}
        exported = Exported(sock, tcp, tls_export, app, secret(30), 443, {"id": 1})
        blob = MigrationBlob(
            id=os.urandom(16),
            flow=Flow.parse("10.0.0.2:40000-10.0.0.1:443"),
            tcp=tcp,
            tls=conn12.export_state(),
            app={"partial": secret(20)},
            out=secret(30),
        )
        objects = [
            exported,
            conn13,
            conn12,
            conn13._read,
            conn13._write,
            conn12._read,
            conn12._write,
            TlsState.from_wire(state13),
            TlsState.from_wire(state12),
            result,
            tcp,
            blob,
            conn13.info,
            DataReceived(secret(25)),
        ]
        texts = [f(o) for o in objects for f in (repr, str)]
    for text in texts:
        for value in secrets:
            for shown in (repr(value)[2:-1], value.hex(), value.hex().upper()):
                assert shown not in text, f"{len(value)}-byte secret in {text[:60]}"
