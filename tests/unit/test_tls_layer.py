"""pysteer's TLS record layer without sockets: records, key schedule, state, events.

A synthetic peer built from the same secrets plays the client, so every record the
connection sends is opened and checked, and every record it receives is made here.
"""

import os
import pickle
import subprocess

import msgpack
import pytest

from pysteer.tls import (
    Alert,
    ConnectionClosed,
    DataReceived,
    KeyUpdated,
    Secret,
    TlsError,
    TlsServerConnection,
    TlsStateError,
)
from pysteer.tls import record as rec
from pysteer.tls.keys import prf12
from pysteer.tls.record import Protection, RecordError
from pysteer.tls.suites import BY_NAME, TLS13

SUITES = sorted(BY_NAME)


def state_for(
    name: str, *, rx: bytes = b"", hs: bytes = b""
) -> tuple[dict, Protection, Protection]:
    """A connection state for suite ``name`` and the peer's (client) protections."""
    suite = BY_NAME[name]
    if suite.version == TLS13:
        cs, ss = os.urandom(suite.hash_len), os.urandom(suite.hash_len)
        read, write = {"secret": cs, "seq": 0}, {"secret": ss, "seq": 2}
        client_out = Protection(suite, 0, secret=Secret(cs))
        client_in = Protection(suite, 2, secret=Secret(ss))
    else:
        ck, sk = os.urandom(suite.key_len), os.urandom(suite.key_len)
        civ, siv = os.urandom(suite.fixed_iv_len), os.urandom(suite.fixed_iv_len)
        read, write = {"key": ck, "iv": civ, "seq": 1}, {"key": sk, "iv": siv, "seq": 1}
        client_out = Protection(suite, 1, key=Secret(ck), iv=Secret(civ))
        client_in = Protection(suite, 1, key=Secret(sk), iv=Secret(siv))
    state = {
        "v": 1,
        "version": suite.version,
        "suite": name,
        "read": read,
        "write": write,
        "rx": rx,
        "hs": hs,
        "close_sent": False,
        "close_received": False,
        "written": 0,
        "sni": "example.test",
        "alpn": "http/1.1",
        "resumed": False,
        "peer_chain": [b"der"],
    }
    return state, client_out, client_in


def open_all(peer: Protection, data: bytes) -> list[tuple[int, bytes]]:
    out, pos = [], 0
    while pos < len(data):
        length = int.from_bytes(data[pos + 3 : pos + 5], "big")
        out.append(peer.open(data[pos : pos + 5], data[pos + 5 : pos + 5 + length]))
        pos += 5 + length
    return out


@pytest.mark.parametrize("name", SUITES)
def test_data_both_ways_and_state_round_trip(name: str) -> None:
    state, client_out, client_in = state_for(name)
    conn = TlsServerConnection.from_state(msgpack.unpackb(msgpack.packb(state)))
    message = os.urandom(40_000)
    record = client_out.seal(rec.APPLICATION_DATA, message[:10_000])
    # Half a record, then a move: the partial record travels in the state.
    assert conn.receive_data(record[:777]) == []
    moved = TlsServerConnection.from_state(conn.export_state())
    rest = b"".join(client_out.seal(23, message[i : i + 15_000]) for i in (10_000, 25_000))
    events = moved.receive_data(record[777:] + rest)
    assert b"".join(e.data for e in events if isinstance(e, DataReceived)) == message
    moved.send(message * 2)
    records = open_all(client_in, moved.data_to_send())
    assert [t for t, _ in records] == [23] * 5  # 80,000 bytes in 2^14-byte records
    assert b"".join(d for _, d in records) == message * 2
    assert moved.export_state()["write"]["seq"] == state["write"]["seq"] + 5


@pytest.mark.parametrize("name", SUITES)
def test_tampered_and_oversized_records(name: str) -> None:
    state, client_out, client_in = state_for(name)
    conn = TlsServerConnection.from_state(state)
    record = bytearray(client_out.seal(23, b"payload"))
    record[-1] ^= 1
    events = conn.receive_data(bytes(record))
    assert events == [Alert(2, 20, sent=True), ConnectionClosed(clean=False)]
    assert open_all(client_in, conn.data_to_send()) == [(21, b"\x02\x14")]
    assert conn.receive_data(b"more") == []  # closed: nothing more is processed
    with pytest.raises(TlsError, match="cannot send: connection is closed"):
        conn.send(b"x")

    state, client_out, client_in = state_for(name)
    conn = TlsServerConnection.from_state(state)
    events = conn.receive_data(b"\x17\x03\x03\x48\x01")  # announces 2^14 + 2049 bytes
    assert events == [Alert(2, 22, sent=True), ConnectionClosed(clean=False)]
    # A record whose plaintext exceeds 2^14 bytes once opened is an overflow too.
    state, client_out, client_in = state_for(name)
    conn = TlsServerConnection.from_state(state)
    events = conn.receive_data(client_out.seal(23, b"x" * ((1 << 14) + 1)))
    assert events == [Alert(2, 22, sent=True), ConnectionClosed(clean=False)]


def test_unexpected_records_after_the_handshake() -> None:
    state, client_out, _ = state_for("TLS_AES_128_GCM_SHA256")
    conn = TlsServerConnection.from_state(state)
    events = conn.receive_data(b"\x16\x03\x03\x00\x04\x01\x00\x00\x00")  # plaintext handshake
    assert events == [Alert(2, 10, sent=True), ConnectionClosed(clean=False)]
    state, client_out, _ = state_for("TLS_AES_128_GCM_SHA256")
    conn = TlsServerConnection.from_state(state)
    events = conn.receive_data(client_out.seal(rec.HANDSHAKE, b"\x04\x00\x00\x00"))  # NST
    assert events == [Alert(2, 10, sent=True), ConnectionClosed(clean=False)]


@pytest.mark.parametrize("name", [s for s in SUITES if BY_NAME[s].version == TLS13])
def test_key_update_requested_split_across_records_and_a_move(name: str) -> None:
    state, client_out, client_in = state_for(name)
    conn = TlsServerConnection.from_state(state)
    key_update = bytes((24, 0, 0, 1, 1))  # KeyUpdate, update_requested
    assert conn.receive_data(client_out.seal(rec.HANDSHAKE, key_update[:3])) == []
    moved = TlsServerConnection.from_state(conn.export_state())  # the partial message moves
    events = moved.receive_data(client_out.seal(rec.HANDSHAKE, key_update[3:]))
    assert events == [KeyUpdated(answered=True)]
    client_out = client_out.updated()
    assert moved.receive_data(client_out.seal(23, b"new key")) == [DataReceived(b"new key")]
    moved.send(b"reply")
    out = moved.data_to_send()
    first = 5 + int.from_bytes(out[3:5], "big")
    # Our answer goes under the old key, then everything under the next one.
    assert client_in.open(out[:5], out[5:first]) == (22, bytes((24, 0, 0, 1, 0)))
    assert open_all(client_in.updated(), out[first:]) == [(23, b"reply")]


def test_automatic_rekey_before_the_aead_limit() -> None:
    state, _client_out, client_in = state_for("TLS_AES_256_GCM_SHA384")
    conn = TlsServerConnection.from_state(state)
    conn.rekey_after = 3
    for i in range(8):
        conn.send(b"%d" % i)
    out, got, updates, pos = conn.data_to_send(), [], 0, 0
    while pos < len(out):
        length = int.from_bytes(out[pos + 3 : pos + 5], "big")
        ctype, data = client_in.open(out[pos : pos + 5], out[pos + 5 : pos + 5 + length])
        pos += 5 + length
        if ctype == rec.HANDSHAKE:
            assert data == bytes((24, 0, 0, 1, 0))
            client_in, updates = client_in.updated(), updates + 1
        else:
            got.append(data)
    assert got == [b"%d" % i for i in range(8)]
    assert updates == 2


def test_close_notify_both_ways() -> None:
    state, client_out, client_in = state_for("TLS_CHACHA20_POLY1305_SHA256")
    conn = TlsServerConnection.from_state(state)
    events = conn.receive_data(client_out.seal(rec.ALERT, b"\x01\x00"))
    assert events == [Alert(1, 0, sent=False), ConnectionClosed(clean=True)]
    assert open_all(client_in, conn.data_to_send()) == [(21, b"\x01\x00")]
    state, client_out, client_in = state_for("TLS_CHACHA20_POLY1305_SHA256")
    conn = TlsServerConnection.from_state(state)
    conn.close()
    assert open_all(client_in, conn.data_to_send()) == [(21, b"\x01\x00")]
    assert conn.close_sent
    with pytest.raises(TlsError, match="close_notify sent"):
        conn.send(b"late")
    moved = TlsServerConnection.from_state(conn.export_state())
    assert moved.close_sent  # the flag moves too


def test_export_refused_with_unflushed_output() -> None:
    state, _, _ = state_for("TLS_AES_128_GCM_SHA256")
    conn = TlsServerConnection.from_state(state)
    conn.send(b"pending")
    with pytest.raises(TlsStateError, match="not yet sent"):
        conn.export_state()
    conn.data_to_send()
    assert conn.export_state()["write"]["seq"] == 3


BAD_STATES = [
    (lambda s: s.update(v=2), "unknown state version 2"),
    (lambda s: s.pop("rx"), "missing field(s): rx"),
    (lambda s: s.update(extra=1), "unexpected field(s): extra"),
    (lambda s: s.update(suite="TLS_AES_128_CCM_SHA256"), "unknown cipher suite"),
    (lambda s: s.update(version="TLSv1.2"), "does not belong to version"),
    (lambda s: s["read"].update(secret=b"short"), "read.secret must be 32 bytes, not 5"),
    (lambda s: s["write"].update(seq=-1), "write.seq must be an integer"),
    (lambda s: s["write"].update(key=b"k"), "write must hold exactly secret and seq"),
    (lambda s: s.update(rx=b"x" * 20000), "rx is too long"),
    (lambda s: s.update(close_sent=1), "close_sent must be a boolean"),
    (lambda s: s.update(peer_chain=["pem"]), "peer_chain must be a list"),
    (lambda s: s.update(sni=5), "sni must be a string or null"),
    (lambda s: s.update(read=[]), "read must be a map"),
]


@pytest.mark.parametrize(("mutate", "message"), BAD_STATES, ids=[m for _, m in BAD_STATES])
def test_bad_state_is_refused(mutate, message: str) -> None:
    state, _, _ = state_for("TLS_AES_128_GCM_SHA256")
    mutate(state)
    with pytest.raises(TlsStateError) as info:
        TlsServerConnection.from_state(state)
    assert message in str(info.value)
    assert str(info.value).startswith("tls state: ")


def test_secret_never_shows_itself() -> None:
    s = Secret(b"\x01\x02topsecret")
    for text in (repr(s), str(s), f"{s}", f"{s!r}", "%s" % (s,)):  # noqa: UP031
        assert "topsecret" not in text
        assert b"\x01\x02topsecret".hex() not in text
    assert s.reveal() == b"\x01\x02topsecret"
    assert s == Secret(b"\x01\x02topsecret")
    assert s != Secret(b"other")
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(s)


@pytest.mark.parametrize("digest", ["SHA256", "SHA384"])
def test_tls12_prf_matches_openssl(digest: str) -> None:
    secret, seed = os.urandom(48), os.urandom(64)
    label = b"key expansion"
    out = subprocess.run(
        [
            "openssl",
            "kdf",
            "-keylen",
            "72",
            "-kdfopt",
            f"digest:{digest}",
            "-kdfopt",
            f"hexsecret:{secret.hex()}",
            "-kdfopt",
            f"hexseed:{(label + seed).hex()}",
            "TLS1-PRF",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    suite = BY_NAME[
        "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384"
        if digest == "SHA384"
        else "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"
    ]
    assert prf12(suite, secret, label, seed, 72) == bytes.fromhex(out.replace(":", ""))


def test_record_sequence_exhaustion() -> None:
    """The connection ends (TlsEnded) instead of a RecordError escaping; the protection
    itself refuses to seal or open at 2^64 - 1 (test_tls_hardening has the rest)."""
    state, _, _ = state_for("TLS_AES_128_GCM_SHA256")
    state["write"]["seq"] = (1 << 64) - 1
    conn = TlsServerConnection.from_state(state)
    with pytest.raises(TlsError, match="sequence numbers exhausted") as info:
        conn.send(b"x")
    assert type(info.value).__name__ == "TlsEnded"  # a TlsError: the connection is over
    suite = BY_NAME["TLS_AES_128_GCM_SHA256"]
    last = Protection(suite, (1 << 64) - 1, secret=Secret(bytes(32)))
    with pytest.raises(RecordError, match="sequence number exhausted"):
        last.seal(23, b"x")
    with pytest.raises(RecordError, match="sequence number exhausted"):
        last.open(b"\x17\x03\x03\x00\x11", bytes(17))
