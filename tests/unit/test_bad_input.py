"""Bad input that used to reach a traceback: each now gets its module's documented error.

One test per hole that was found: the RPC's request decoder (it replaced the steering
daemon's control line decoder), the daemon's per-client loop, flows, frames as agents read
them, sealed blobs, and the TCP and TLS state decoders.
"""

import asyncio
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from helpers.blobs import SECRET, blob

from pysteer.flow import Flow, FlowSyntaxError
from pysteer.rpc import VERSION, aio
from pysteer.rpc.codec import FRAME_TIMEOUT, MAX_DEPTH, Decoder, decode_body, encode, hello
from pysteer.rpc.errors import BadFrame, ProtocolError
from pysteer.steer.control import MAX_REQUEST
from pysteer.steer.daemon import Daemon
from pysteer.tcp import StateFormatError, TcpState
from pysteer.tls.state import TlsState, TlsStateError
from pysteer.transfer import BlobError, open_sealed, seal
from pysteer.transfer import blob as blob_module

KEY = os.urandom(32)
HUGE = "9" * 5000  # over Python's 4300-digit limit for int(str)
GOOD = "10.0.0.2:51000-10.0.0.100:443"


def nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


DEEP = "deep-placeholder"  # packb stops at 512 levels: put deeper msgpack in its place
DEEP_MSGPACK = b"\x91" * 1020 + b"\x00"  # [[...[0]...]]: msgpack stops at 1024, repr ~1000


def packb(value: Any) -> bytes:
    """msgpack of ``value``, with DEEP (the string) replaced by DEEP_MSGPACK."""
    return msgpack.packb(value, use_bin_type=True).replace(msgpack.packb(DEEP), DEEP_MSGPACK)


# --- flows -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "message"),
    [
        (f"10.0.0.2:{HUGE}-10.0.0.100:443", "expected SRC:PORT-DST:PORT"),
        (f"10.0.0.2:51000-10.0.0.100:{HUGE}", "expected SRC:PORT-DST:PORT"),
        ("10.0.0.2:\u0665\u0661-10.0.0.100:443", "expected SRC:PORT-DST:PORT"),  # Arabic 51
        ("10.0.0.2:000443-10.0.0.100:443", "expected SRC:PORT-DST:PORT"),
    ],
    ids=["huge-sport", "huge-dport", "unicode-digits", "six-digits"],
)
def test_flow_ports_are_five_ascii_digits(text: str, message: str) -> None:
    with pytest.raises(FlowSyntaxError, match=message) as info:
        Flow.parse(text)
    assert len(str(info.value)) < 300  # the bad text is quoted, but cut short


@pytest.mark.parametrize("value", [None, 5, b"10.0.0.2:1-10.0.0.3:2", ["x"]])
def test_flow_parse_only_takes_strings(value: Any) -> None:
    with pytest.raises(FlowSyntaxError, match="a flow is a string"):
        Flow.parse(value)


# --- requests, as servers decode them -----------------------------------------------------
def body_frame(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


def request(body: bytes) -> dict[str, Any]:
    """One frame's request as a server decodes it (numbers finite), within the steering
    daemon's bound; BadFrame (a ProtocolError) when it holds none."""
    decoder = Decoder(MAX_REQUEST, finite=True)
    decoder.feed(body_frame(body))
    message = decoder.next()
    assert message is not None and not decoder.pending
    return message


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"\x81\xa3cmd\xa5st\xffts", "strings must be UTF-8"),
        (b"\x81\xa3cmd\xa2\xed\xa0", "strings must be UTF-8"),  # a lone surrogate
        (packb({"cmd": nested(100)}), f"nests at most {MAX_DEPTH} maps or arrays"),
        (packb({"cmd": DEEP}), f"nests at most {MAX_DEPTH} maps or arrays"),
        (b"\x81\xa3cmd" + b"\x91" * 2000 + b"\x00", "invalid msgpack"),  # past msgpack's own
        (packb({"cmd": "stats", "t": math.inf}), "finite"),
        (packb({"cmd": "stats", "t": -math.inf}), "finite"),
        (packb({"cmd": "stats", "t": math.nan}), "finite"),
        (packb({"cmd": "stats", "x": [[{"t": math.nan}]]}), "finite"),
        (packb(["stats"]), "must hold a map"),
        (packb("stats"), "must hold a map"),
        (b"\x81\xa3cmd\xd3", "invalid msgpack"),  # cut inside a number
        (b"\x81\xa3cmd\xc1", "invalid msgpack"),  # a byte msgpack never uses
        (b"\x81\xa3cmd\xc0\xc0", "invalid msgpack"),  # a second value after the map
        (b"", "invalid msgpack"),
    ],
    ids=[
        "utf8",
        "surrogate",
        "deep-100",
        "deep-1020",
        "deep-2000",
        "inf",
        "-inf",
        "nan",
        "nested-nan",
        "list",
        "str",
        "cut",
        "never-used",
        "extra-data",
        "empty",
    ],
)
def test_request_frames_refused(body: bytes, message: str) -> None:
    with pytest.raises(BadFrame, match=message) as info:
        request(body)
    assert len(str(info.value)) < 200  # never quotes the frame back


def test_request_frames_accepted() -> None:
    assert request(packb({"cmd": "stats"})) == {"cmd": "stats"}
    got = request(packb({"cmd": "to", "flow": GOOD, "host": "b", "n": 2**64 - 1, "x": [[{}]]}))
    assert got["n"] == 2**64 - 1 and got["x"] == [[{}]]
    assert request(packb({"cmd": "[" * 1000}))["cmd"] == "[" * 1000  # text, not nesting
    assert request(packb({"a": nested(MAX_DEPTH - 1)}))["a"]
    assert request(packb({"t": 0.5, "b": b"\xff"})) == {"t": 0.5, "b": b"\xff"}
    decoder = Decoder()  # a client's: answers may carry any float
    decoder.feed(encode({"t": math.inf}))
    assert decoder.next() == {"t": math.inf}


def test_request_frames_over_the_bound() -> None:
    decoder = Decoder(MAX_REQUEST, finite=True)
    decoder.feed((MAX_REQUEST + 1).to_bytes(4, "big"))
    with pytest.raises(ProtocolError, match=f"over the {MAX_REQUEST}-byte limit"):
        decoder.next()
    decoder.feed(encode({"cmd": "stats"}))  # the stream is broken for good
    with pytest.raises(ProtocolError, match="over the"):
        decoder.next()


def test_request_error_is_a_control_error() -> None:
    from pysteer.steer.control import ControlError, RequestError  # noqa: PLC0415

    assert issubclass(RequestError, ControlError)


@pytest.fixture
def daemon_conn(caplog: pytest.LogCaptureFixture) -> Iterator[socket.socket]:
    """A client socket served by a real ``Daemon._client`` thread, past its hello.

    The daemon has no steerer (that needs BPF): any command reaching the flow table fails
    inside ``handle``, which is exactly the unexpected error the loop must survive.
    """
    caplog.set_level(logging.INFO, logger="pysteer.steer")
    ours, theirs = socket.socketpair()
    daemon = Daemon(None, Path("/nonexistent"))  # type: ignore[arg-type]
    thread = threading.Thread(target=daemon._client, args=(theirs,), daemon=True)
    thread.start()
    ours.settimeout(10)
    assert ask(ours, encode(hello())) == {"ok": True, "rpc": "hello", "version": VERSION}
    yield ours
    ours.close()
    thread.join(10)
    assert not thread.is_alive()


def ask(sock: socket.socket, frame: bytes) -> dict[str, Any]:
    """Send ``frame``, read the one answer frame."""
    sock.sendall(frame)
    decoder = Decoder()
    while (answer := decoder.next()) is None:
        data = sock.recv(65536)
        assert data, "the daemon hung up"
        decoder.feed(data)
    assert not decoder.pending  # exactly one answer
    return answer


def test_daemon_client_answers_bad_frames_and_keeps_serving(
    daemon_conn: socket.socket, caplog: pytest.LogCaptureFixture
) -> None:
    bad = [
        (body_frame(b"\x81\xa3cmd\xa5flo\xffs"), "must be UTF-8"),
        (body_frame(packb({"cmd": DEEP})), "nests at most"),
        (encode({"cmd": "park", "flow": f"10.0.0.2:{HUGE}-10.0.0.3:80"}), "flow"),
        (encode({"cmd": "park", "flow": GOOD, "lease": math.inf}), "finite"),
        (body_frame(b"\x91\x01"), "must hold a map"),
        (body_frame(b"\x81\xa3cmd\xc1"), "invalid msgpack"),
        (encode({"cmd": "nope"}), "unknown command 'nope'"),
    ]
    for frame, message in bad:
        answer = ask(daemon_conn, frame)
        assert answer["ok"] is False
        assert message in answer["error"], answer
    # An unexpected failure inside handle (here: no steerer) is answered and logged.
    answer = ask(daemon_conn, encode({"cmd": "stats"}))
    assert answer == {"ok": False, "error": "internal error (AttributeError), see the daemon's log"}
    assert "control request failed" in caplog.text
    answer = ask(daemon_conn, encode({"cmd": "nope"}))  # the thread still serves
    assert answer["error"] == "unknown command 'nope'"


# --- frames, as agents read them ----------------------------------------------------------
def stalled(data: bytes) -> asyncio.StreamReader:
    """A reader holding ``data`` whose peer then neither sends nor hangs up."""
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    return reader


def reading(reader: asyncio.StreamReader, **options: Any) -> aio.Connection:
    return aio.Connection(reader, None, **options)  # type: ignore[arg-type] - reads only


@pytest.mark.parametrize("cut", [1, 3, 4, 10], ids=["head-1", "head-3", "head-4", "body"])
def test_truncated_frame_times_out(cut: int) -> None:
    frame = encode({"op": "prepare", "blob": b"x" * 100})

    async def go() -> float:
        start = time.monotonic()
        conn = reading(stalled(frame[:cut]), frame_timeout=0.2)
        with pytest.raises(ProtocolError, match="part of a frame"):
            await asyncio.wait_for(conn.receive(), 5)
        return time.monotonic() - start

    assert 0.15 < asyncio.run(go()) < 3


def test_idle_wait_for_a_frame_is_unbounded() -> None:
    async def go() -> None:
        conn = reading(stalled(b""), frame_timeout=0.05)
        with pytest.raises(TimeoutError):  # ours: receive itself never gives up here
            await asyncio.wait_for(conn.receive(), 0.5)

    asyncio.run(go())


def test_default_frame_timeout_is_finite() -> None:
    """The agent reads with the default: it must bound a stalled frame."""
    import inspect  # noqa: PLC0415

    assert 0 < FRAME_TIMEOUT <= 120
    default = inspect.signature(aio.Connection).parameters["frame_timeout"].default
    assert default == FRAME_TIMEOUT


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (msgpack.packb({"op": nested(100)}), "nests at most"),
        (packb({"op": DEEP}), "nests at most"),
        (msgpack.packb({"op": list(range((1 << 20) + 1))}), "invalid msgpack"),
        (msgpack.packb({"op": {str(i): 0 for i in range((1 << 20) + 1)}}), "invalid msgpack"),
        (b"\x81\xa2op\xd6\xff\x00\x00\x00\x01", "invalid msgpack"),  # an ext type (timestamp)
        (b"\x81\xa2op\xdd\xff\xff\xff\xff", "invalid msgpack"),  # an array of 2**32-1
        (b"\x81\x01\x02", "invalid msgpack"),  # an int key
    ],
    ids=["deep-100", "deep-1020", "long-array", "big-map", "ext", "array-header", "int-key"],
)
def test_bad_frame_bodies(body: bytes, message: str) -> None:
    async def go() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(body_frame(body))
        reader.feed_eof()
        await reading(reader).receive()

    with pytest.raises(ProtocolError, match=message):
        asyncio.run(go())
    with pytest.raises(BadFrame, match=message):
        decode_body(body)


# --- sealed blobs ------------------------------------------------------------------------------
def seal_wire(wire: Any, mid: bytes) -> bytes:
    """Seal any plaintext map under the real key: it passes the AEAD and reaches decoding."""
    plain = packb(wire)
    nonce = os.urandom(12)
    header = blob_module._header(mid, nonce, "a", "b")
    return header + ChaCha20Poly1305(KEY).encrypt(nonce, plain, header)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("flow", f"10.0.0.2:{HUGE}-10.0.0.100:443", "invalid blob: malformed flow"),
        ("flow", 12, "flow must be a string"),
        ("t", math.nan, "finite"),
        ("t", math.inf, "finite"),
        ("t", -math.inf, "finite"),
        ("t", True, "finite"),
        ("t", "now", "finite"),
        ("v", True, "version or id"),
        ("v", 1.0, "version or id"),
        ("tcp", {"v": DEEP}, "invalid blob: tcp state: unknown state version a list"),
        ("tls", {"v": DEEP}, "invalid blob: tls state: unknown state version a list"),
    ],
)
def test_bad_blob_fields(field: str, value: Any, message: str) -> None:
    b = blob()
    wire = b.to_wire() | {field: value}
    with pytest.raises(BlobError, match=message) as info:
        open_sealed(seal_wire(wire, b.id), KEY, expect_id=b.id, source="a", target="b")
    assert SECRET.hex() not in str(info.value) and HUGE not in str(info.value)


@pytest.mark.parametrize("data", ["PSMB" * 20, None, 12, [b"PSMB"]])
def test_sealed_blob_must_be_bytes(data: Any) -> None:
    with pytest.raises(BlobError, match="a sealed blob is bytes"):
        open_sealed(data, KEY, source="a", target="b")


def test_blob_round_trip_still_works() -> None:
    b = blob()
    sealed = seal(b, KEY, source="a", target="b")
    opened = open_sealed(bytearray(sealed), KEY, expect_id=b.id, source="a", target="b")
    assert opened.to_wire() == b.to_wire()
    assert isinstance(opened.tls, TlsState)  # decoded once, keys derived once: not again


# --- TCP and TLS state -------------------------------------------------------------------------
def tcp_wire(**changes: Any) -> dict[str, Any]:
    return blob().tcp.to_wire() | changes


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (tcp_wire(family=10**5000), "'family' must be 4 or 6, not a huge integer"),
        (tcp_wire(send_seq=10**5000), "'send_seq' = a huge integer is out of range"),
        (tcp_wire(v=10**5000), "unknown state version a huge integer"),
        (tcp_wire(v=nested(1000)), "unknown state version a list"),
        (tcp_wire(v=True), "unknown state version True"),
        (tcp_wire(v=1.0), "unknown state version 1.0"),
        (tcp_wire(state=nested(1000)), "unknown TCP state a list"),
        (tcp_wire(state=SECRET), f"unknown TCP state {len(SECRET)} bytes"),
        (tcp_wire(peer=["10.0.0.2", 10**5000]), "invalid port a huge integer"),
        (tcp_wire(peer=[nested(1000), 1]), "invalid address a list"),
        (tcp_wire(peer=[167772162, 51000]), "invalid address 167772162"),
        (tcp_wire(peer=[bytes([10, 0, 0, 2]), 51000]), "invalid address 4 bytes"),
        (tcp_wire() | {10**5000: 1}, "unexpected field(s): a huge integer"),
        (tcp_wire(options={10**5000: 1}), "unexpected option(s): a huge integer"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_tcp_state_errors_are_state_format_errors(wire: dict, message: str) -> None:
    with pytest.raises(StateFormatError) as info:
        TcpState.from_wire(wire)
    assert message in str(info.value)
    assert "SECRET" not in str(info.value)


def tls_wire(**changes: Any) -> dict[str, Any]:
    return dict(blob().tls or {}) | changes


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (tls_wire(v=10**5000), "unknown state version a huge integer"),
        (tls_wire(v=nested(1000)), "unknown state version a list"),
        (tls_wire(v=True), "unknown state version True"),
        (tls_wire(suite=10**5000), "unknown cipher suite a huge integer"),
        (tls_wire(suite=nested(1000)), "unknown cipher suite a list"),
        (tls_wire(version=nested(1000)), "does not belong to version a list"),
        (tls_wire(version=SECRET), f"does not belong to version {len(SECRET)} bytes"),
        (tls_wire() | {10**5000: 1}, "unexpected field(s): a huge integer"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_tls_state_errors_are_tls_state_errors(wire: dict, message: str) -> None:
    with pytest.raises(TlsStateError) as info:
        TlsState.from_wire(wire)
    assert message in str(info.value)
    assert SECRET.hex() not in str(info.value)
