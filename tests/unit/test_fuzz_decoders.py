"""Fuzzing every decoder of untrusted input: only the module's documented error may come out.

Two sources of cases, both reproducible. A seeded mutator takes VALID encodings and breaks
them the way a bug or an attacker would (bit flips, truncation, type swaps of one field,
huge integers, NaN, deep nesting, bad UTF-8), which reaches far deeper than random bytes;
and hypothesis (derandomized) drives the same mutator and generates arbitrary values.
Targets: ``TcpState.from_wire``, the TLS state decoder, sealed blobs (the envelope, and
plaintexts sealed with the real key so they get past the AEAD), RPC frames read through
an ``asyncio.StreamReader`` and through the sans-IO decoder fed in random pieces (both
must agree), requests as a server decodes them (then ``Flow.parse`` as the steering daemon
calls it), and a real ``Daemon._client`` loop, old JSON-line clients included.
"""

import asyncio
import copy
import json
import logging
import math
import random
import socket
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import msgpack
import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pysteer.flow import Flow, FlowSyntaxError
from pysteer.rpc import aio
from pysteer.rpc.codec import Decoder, encode, hello
from pysteer.rpc.errors import BadFrame, ProtocolError
from pysteer.steer.control import MAX_REQUEST
from pysteer.steer.daemon import Daemon
from pysteer.tcp import RepairWindow, SocketOptions, StateFormatError, TcpState, TcpStateCode
from pysteer.tls.state import TlsState, TlsStateError
from pysteer.tls.suites import BY_NAME, TLS13
from pysteer.transfer import BlobError, MigrationBlob, open_sealed, seal
from pysteer.transfer import blob as blob_module

SEED = 0x5EED_2024


def seeded(seed: int) -> random.Random:
    """The mutator's randomness: reproducible from its seed (not for cryptography)."""
    return random.Random(seed)  # noqa: S311


CASES = 1500  # per target and kind of mutation: the whole file runs in about 15 s
FUZZ = settings(
    derandomize=True,
    database=None,
    max_examples=200,
    deadline=timedelta(seconds=5),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# --- nasty values ------------------------------------------------------------------------------
def nested(depth: int, leaf: Any = 0) -> Any:
    for _ in range(depth):
        leaf = [leaf]
    return leaf


def nested_map(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = {"v": value}
    return value


HUGE = 10**5000  # over the 4300 digits str() and int() accept
NASTY: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    1,
    2,
    4,
    6,
    1 << 31,
    (1 << 32) - 1,
    1 << 32,
    (1 << 64) - 1,
    1 << 64,
    -(1 << 63),
    HUGE,
    -HUGE,
    0.0,
    1.0,
    0.5,
    -0.0,
    math.nan,
    math.inf,
    -math.inf,
    "",
    "x",
    "x" * 5000,
    "9" * 5000,
    "\udc80",
    "\u0665\u0661",
    "TLSv1.3",
    "ESTABLISHED",
    "10.0.0.1",
    "fd00::1",
    "TLS_AES_128_GCM_SHA256",
    "10.0.0.2:" + "9" * 5000 + "-10.0.0.3:1",
    b"",
    b"\xff" * 16,
    bytes(32),
    bytes(70_000),
    bytearray(b"ab"),
    [],
    {},
    [1, 2],
    (1, 2),
    ["10.0.0.1", 1],
    {"": None},
    {1: 2},
    {HUGE: 1},
    {b"v": 1},
    nested(60),
    nested(3000),
    nested_map(3000),
    frozenset({1}),
    complex(1, 1),
    object(),
]
MSGPACK_TOKENS = [
    b"\x91" * 1020 + b"\x00",  # 1020 arrays deep: under msgpack's own 1024
    b"\x91" * 2000 + b"\x00",
    b"\xdd\xff\xff\xff\xff",  # array of 2**32-1
    b"\xdf\xff\xff\xff\xff",  # map of 2**32-1
    b"\xc6\xff\xff\xff\xff",  # bin of 2**32-1
    b"\xcb\x7f\xf8\x00\x00\x00\x00\x00\x00",  # NaN
    b"\xcb\x7f\xf0\x00\x00\x00\x00\x00\x00",  # inf
    b"\xd6\xff\x00\x00\x00\x01",  # a timestamp ext
    b"\xc7\x03\xff\x00\x00\x00",  # a bad timestamp ext
    b"\xd4\x05\x00",  # an unknown ext
    b"\xa2\xff\xfe",  # a str of invalid UTF-8
    b"\xc1",  # never used
    b"\xcf" + b"\xff" * 8,  # 2**64-1
    b"\xd3\x80" + bytes(7),  # -2**63
    b"\x81\x91\x00\x00",  # a list as a map key
    b"\x81\x01\x02",  # an int as a map key
    b"\xc3",
    b"\xc0",
]
JSON_TOKENS = [
    b"[" * 5000,
    b'{"a":' * 5000,
    b"9" * 5000,
    b"-" + b"9" * 30,
    b"1e999",
    b"-1e999",
    b"NaN",
    b"-Infinity",
    b"\xff",
    b"\xc3",
    b"\xed\xa0\x80",
    b'"\\ud800"',
    b"\x00",
    b"\\",
    b'"',
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b'"cmd"',
    b'"flow"',
    b"null",
    b"true",
    b"\xef\xbb\xbf",
    "\u0665\u0661".encode(),
    b"10.0.0.1:" + b"9" * 5000,
]
FLOW_TOKENS = [
    "9" * 5000,
    "99999",
    "0",
    "\u0665",
    "\u0661\u0662",
    "[",
    "]",
    ":",
    "-",
    "%eth0",
    "::",
    "::ffff:1.2.3.4",
    "\x00",
    " ",
    "\n",
    "1.2.3.4",
    "fd00::1",
    "256",
    "00001",
    "+1",
    "1_0",
]


# --- the mutator -------------------------------------------------------------------------------
def _slots(root: Any, limit: int = 400) -> list[tuple[Any, Any]]:
    """(container, key) pairs of ``root``, breadth first, iterative: nesting cannot hurt."""
    out: list[tuple[Any, Any]] = []
    queue = [root]
    while queue and len(out) < limit:
        node = queue.pop(0)
        keys = list(node) if isinstance(node, dict) else range(len(node))
        for key in keys:
            out.append((node, key))
            if isinstance(node[key], dict | list):
                queue.append(node[key])
    return out


def swap_type(value: Any, rng: random.Random) -> Any:
    """``value`` turned into a near miss of another type (or the same type, out of range)."""
    if isinstance(value, bool):
        options = [int(value), str(value).lower(), None, [value]]
    elif isinstance(value, int) and value.bit_length() > 64:  # str() and float() refuse it
        options = [-value, "9" * 5000, 1 << 64, [value]]
    elif isinstance(value, int):
        options = [
            str(value),
            float(value),
            -value - 1,
            value + (1 << 32),
            value << 64,
            [value],
            value == 1,
            HUGE,
        ]
    elif isinstance(value, float):
        options = [int(value) if math.isfinite(value) else 0, str(value), math.nan, -math.inf]
    elif isinstance(value, str):
        options = [
            value.encode("utf-8", "surrogatepass"),
            value[: len(value) // 2],
            value * 50,
            value + "\x00",
            list(value),
            value.upper(),
            "9" * 5000,
        ]
    elif isinstance(value, bytes | bytearray):
        options = [
            value.decode("latin-1"),
            value[:-1],
            value + b"\0",
            bytearray(value),
            list(value),
            bytes(len(value) * 2),
        ]
    elif isinstance(value, list | tuple):
        options = [
            tuple(value),
            list(value)[:-1],
            list(value) * 2,
            [value],
            {str(i): x for i, x in enumerate(value)},
        ]
    elif isinstance(value, dict):
        options = [list(value.values()), list(value.items()), {**value, "extra": 1}, [value]]
    else:
        options = NASTY
    return rng.choice(options)


def mutate(seed: Any, rng: random.Random) -> Any:
    """A deep copy of ``seed`` with one to three structural mutations."""
    root = copy.deepcopy(seed)
    for _ in range(rng.choice((1, 1, 2, 3))):
        slots = _slots(root) if isinstance(root, dict | list) else []
        if isinstance(root, dict) and root and rng.random() < 0.4:  # top-level fields more often
            slots = [(root, key) for key in root]
        if not slots or rng.random() < 0.03:
            root = rng.choice(NASTY) if rng.random() < 0.5 else swap_type(root, rng)
            continue
        node, key = rng.choice(slots)
        op = rng.random()
        if op < 0.15 and isinstance(node, dict):
            del node[key]
        elif op < 0.25 and isinstance(node, dict):
            node[rng.choice(["extra", "", "v2", 1, HUGE, b"v", (1, 2)])] = rng.choice(NASTY)
        elif op < 0.6:
            node[key] = swap_type(node[key], rng)
        else:
            node[key] = rng.choice(NASTY)
    return root


def mutate_bytes(data: bytes, rng: random.Random, tokens: list[bytes]) -> bytes:
    """``data`` with one to three byte-level mutations: flips, cuts, inserts, splices."""
    buf = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 3))):
        pos = rng.randrange(len(buf) + 1)
        op = rng.randrange(7)
        if op == 0 and buf:  # flip bits
            for _ in range(rng.randint(1, 8)):
                i = rng.randrange(len(buf))
                buf[i] ^= 1 << rng.randrange(8)
        elif op == 1:  # truncate
            del buf[pos:]
        elif op == 2:  # insert random bytes
            buf[pos:pos] = rng.randbytes(rng.randint(1, 8))
        elif op == 3:  # delete a slice
            del buf[pos : pos + rng.randint(1, 16)]
        elif op == 4 and buf:  # duplicate a slice
            start = rng.randrange(len(buf))
            buf[pos:pos] = buf[start : start + rng.randint(1, 64)]
        elif op == 5:  # insert a nasty token
            buf[pos:pos] = rng.choice(tokens)
        else:  # replace a slice by a nasty token
            buf[pos : pos + rng.randint(1, 8)] = rng.choice(tokens)
    return bytes(buf)


def packb(value: Any) -> bytes | None:
    """msgpack of ``value``, or None when msgpack itself cannot carry it (not the decoder's
    business: huge ints, depth over 512, non-msgpack types)."""
    try:
        return msgpack.packb(value, use_bin_type=True)
    except (TypeError, ValueError, OverflowError, RecursionError):
        return None


def unpackb(data: bytes) -> Any:
    """What a peer's bytes decode to, as msgpack would hand them to a decoder (or None)."""
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception:  # msgpack's own refusals are not under test here
        return None


def only(error: type[BaseException], fn: Callable[[], Any], case: str) -> Any:
    """``fn()``'s result, None if it raised ``error``; any other exception fails the test."""
    try:
        return fn()
    except error:
        return None
    except Exception as exc:  # the point of the fuzzing: nothing else may come out
        pytest.fail(f"{case}: {type(exc).__name__} escaped: {str(exc)[:300]}", pytrace=False)


# --- valid seeds -------------------------------------------------------------------------------
def tcp_seeds() -> list[dict[str, Any]]:
    base = {
        "family": 4,
        "local": ("10.77.100.1", 443),
        "peer": ("10.77.1.2", 51000),
        "state": TcpStateCode.ESTABLISHED,
        "send_seq": 1000,
        "recv_seq": 5000,
        "recv_queue": b"r" * 7,
        "send_unacked": b"u" * 10,
        "send_unsent": b"n" * 20,
        "mss_clamp": 1460,
        "sack": True,
        "timestamps": True,
        "wscale": (7, 10),
        "timestamp": 123456,
        "window": RepairWindow(4990, 65535, 65535, 65535, 4990),
        "options": SocketOptions(nodelay=True, sndbuf=87040, rcvbuf=131072, mark=7),
    }
    v6 = base | {
        "family": 6,
        "local": ("fd00::1", 443),
        "peer": ("fd00::2", 5000),
        "timestamps": False,
        "timestamp": None,
        "wscale": None,
    }
    fin = base | {"state": TcpStateCode.FIN_WAIT1, "send_unsent": b""}
    close_wait = base | {"state": TcpStateCode.CLOSE_WAIT, "recv_queue": b""}
    return [TcpState(**f).to_wire() for f in (base, v6, fin, close_wait)]


def tls_seeds(rng: random.Random) -> list[dict[str, Any]]:
    out = []
    for name in (
        "TLS_AES_128_GCM_SHA256",
        "TLS_AES_256_GCM_SHA384",
        "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
    ):
        suite = BY_NAME[name]
        if suite.version == TLS13:
            read = {"secret": rng.randbytes(suite.hash_len), "seq": 0}
            write = {"secret": rng.randbytes(suite.hash_len), "seq": 2}
        else:
            read = {
                "key": rng.randbytes(suite.key_len),
                "iv": rng.randbytes(suite.fixed_iv_len),
                "seq": 1,
            }
            write = {
                "key": rng.randbytes(suite.key_len),
                "iv": rng.randbytes(suite.fixed_iv_len),
                "seq": 1,
            }
        out.append(
            {
                "v": 1,
                "version": suite.version,
                "suite": name,
                "read": read,
                "write": write,
                "rx": b"\x17\x03\x03",
                "hs": b"",
                "close_sent": False,
                "close_received": False,
                "written": 10,
                "sni": "example.test",
                "alpn": "h2",
                "resumed": False,
                "peer_chain": [b"der"],
            }
        )
    return out


MID = bytes(range(16))
KEY = bytes(range(32, 64))
BOUND = {"source": "a", "target": "b", "now": 1.7e9}  # the seeds' nodes and time


def blob_seeds(rng: random.Random) -> list[dict[str, Any]]:
    tcp, tls = tcp_seeds(), tls_seeds(rng)
    flows = ["10.77.1.2:51000-10.77.100.1:443", "[fd00::2]:5000-[fd00::1]:443"]
    v = blob_module.BLOB_VERSION
    return [
        {
            "v": v,
            "id": MID,
            "flow": flows[0],
            "tcp": tcp[0],
            "tls": tls[0],
            "app": {"counter": 7, "lines": ["a", "b"]},
            "out": b"owed",
            "t": 1.7e9,
        },
        {
            "v": v,
            "id": MID,
            "flow": flows[1],
            "tcp": tcp[1],
            "tls": None,
            "app": None,
            "out": b"",
            "t": 1700000000,
        },
        {
            "v": v,
            "id": MID,
            "flow": flows[0],
            "tcp": tcp[2],
            "tls": tls[2],
            "app": [1, 2.5],
            "out": b"",
            "t": 1.7e9,
        },
    ]


def seal_plain(plain: bytes, rng: random.Random, mid: bytes = MID) -> bytes:
    """``plain`` sealed under the real key: mutated plaintexts get past the AEAD."""
    nonce = rng.randbytes(12)
    header = blob_module._header(mid, nonce, "a", "b")
    return header + ChaCha20Poly1305(KEY).encrypt(nonce, plain, header)


FRAME_SEEDS: list[dict[str, Any]] = [
    {"op": "prepare", "id": MID, "blob": bytes(300)},
    {"op": "hello"},
    {"ok": True, "node": "a", "accepting": True, "services": [80, 443]},
    {"op": "control", "request": {"cmd": "migrate", "flow": "10.0.0.2:1-10.0.0.3:443", "to": "b"}},
    {"ok": False, "error": "unknown op 'x'"},
    {"ok": True, "flows": [{"flow": "10.0.0.2:1-10.0.0.3:443", "bytes": 10, "tls": True}] * 3},
]
CONTROL_SEEDS: list[dict[str, Any]] = [
    {"cmd": "stats"},
    {"cmd": "park", "flow": "10.77.1.2:51000-10.77.100.1:443"},
    {"cmd": "to", "flow": "[fd00::2]:51000-[fd00::64]:443", "host": "b"},
    {"cmd": "pass", "flow": "10.77.1.2:51000-10.77.100.1:443", "host": None},
    {"cmd": "divert", "address": "10.77.100.1", "host": "a"},
]
FLOW_SEEDS = ["10.77.1.2:51000-10.77.100.1:443", "[fd00::2]:51000-[fd70:7374::64]:443"]


# --- targets -----------------------------------------------------------------------------------
def check_tcp(wire: Any, case: str) -> None:
    only(StateFormatError, lambda: TcpState.from_wire(wire), case)


def check_tls(wire: Any, case: str) -> None:
    only(TlsStateError, lambda: TlsState.from_wire(wire), case)


def check_sealed(data: Any, case: str) -> None:
    got = only(BlobError, lambda: open_sealed(data, KEY, expect_id=MID, **BOUND), case)
    assert got is None or (isinstance(got, MigrationBlob) and math.isfinite(got.t)), case


def frame_of(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


def check_request(body: bytes, case: str) -> None:
    """A request frame as the steering daemon takes it: decoded (numbers finite, within
    its bound), then its flow parsed."""

    def decode() -> Any:
        decoder = Decoder(MAX_REQUEST, finite=True)
        decoder.feed(frame_of(body))
        return decoder.next()

    req = only(ProtocolError, decode, case)
    if req is None:
        return
    assert isinstance(req, dict), case
    encode(req)  # an accepted request can be echoed back in an answer
    only(FlowSyntaxError, lambda: Flow.parse(str(req.get("flow", ""))), case)


def check_flow(text: Any, case: str) -> None:
    only(FlowSyntaxError, lambda: Flow.parse(text), case)


def decode_pieces(data: bytes, rng: random.Random, case: str) -> list[Any]:
    """What the sans-IO decoder makes of ``data`` fed in random pieces (one byte to all
    of it): messages, "bad" for each bad frame it skips, then "broken" if the stream broke
    for good. Only a ProtocolError may come out of it."""
    decoder, out, pos = Decoder(), [], 0
    while pos < len(data):
        step = rng.choice((1, 1, 2, 3, 7, 64, len(data)))
        decoder.feed(data[pos : pos + step])
        pos += step
        while True:
            try:
                message = decoder.next()
            except BadFrame:
                out.append("bad")
                continue
            except ProtocolError:
                return [*out, "broken"]
            except Exception as exc:
                pytest.fail(f"{case}: {type(exc).__name__} escaped", pytrace=False)
            if message is None:
                break
            out.append(message)
    return out


async def read_all(data: bytes, case: str, eof: bool = True) -> list[Any]:
    """Every frame in ``data``, read as an agent's server reads its client (a bad frame
    is skipped, as the server answers it), until it breaks or the peer hangs up. The same
    list as ``decode_pieces``, "bad" and "broken" included."""
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    conn = aio.Connection(reader, None, frame_timeout=0.01)  # type: ignore[arg-type]
    out: list[Any] = []
    for _ in range(64):
        try:
            message = await asyncio.wait_for(conn.receive(), 2)
        except BadFrame:
            out.append("bad")
            continue
        except ProtocolError as exc:
            return (
                out if "hung up" in str(exc) or "part of a frame" in str(exc) else [*out, "broken"]
            )
        except TimeoutError:  # only the unbounded wait for a frame to START may take long
            assert not eof and not conn.decoder.pending, case
            return out
        except Exception as exc:
            pytest.fail(f"{case}: {type(exc).__name__} escaped: {str(exc)[:300]}", pytrace=False)
        if message is None:
            return out
        assert isinstance(message, dict), case
        out.append(message)
    return out


def check_frames(cases: list[tuple[bytes, str, bool]]) -> None:
    rng = seeded(SEED + 7)

    async def run() -> None:
        for data, case, eof in cases:
            read = await read_all(data, case, eof)
            pieces = decode_pieces(data, rng, case)
            if len(read) < 64:  # read_all stops there
                assert msgpack.packb(pieces) == msgpack.packb(read), case  # NaN == NaN
            else:
                assert msgpack.packb(pieces[:64]) == msgpack.packb(read), case

    asyncio.run(run())


# --- seeded mutation of valid encodings --------------------------------------------------------
def test_tcp_state_mutations() -> None:
    rng = seeded(SEED)
    seeds = tcp_seeds()
    for seed in seeds:
        assert TcpState.from_wire(seed).to_wire() == seed  # the seeds are valid
    for i in range(CASES):
        wire = mutate(rng.choice(seeds), rng)
        check_tcp(wire, f"tcp structural #{i}")
        packed = packb(wire)
        if packed is not None:
            check_tcp(unpackb(packed), f"tcp structural via msgpack #{i}")
    for i in range(CASES):
        data = mutate_bytes(msgpack.packb(rng.choice(seeds)), rng, MSGPACK_TOKENS)
        check_tcp(unpackb(data), f"tcp bytes #{i}")


def test_tls_state_mutations() -> None:
    rng = seeded(SEED + 1)
    seeds = tls_seeds(rng)
    for seed in seeds:
        TlsState.from_wire(seed)
    for i in range(CASES):
        wire = mutate(rng.choice(seeds), rng)
        check_tls(wire, f"tls structural #{i}")
        packed = packb(wire)
        if packed is not None:
            check_tls(unpackb(packed), f"tls structural via msgpack #{i}")
    for i in range(CASES):
        data = mutate_bytes(msgpack.packb(rng.choice(seeds)), rng, MSGPACK_TOKENS)
        check_tls(unpackb(data), f"tls bytes #{i}")


def test_sealed_blob_mutations() -> None:
    rng = seeded(SEED + 2)
    seeds = blob_seeds(rng)
    for seed in seeds:
        sealed = seal_plain(msgpack.packb(seed), rng)
        assert open_sealed(sealed, KEY, expect_id=MID, **BOUND).id == MID
    # The envelope: mutated sealed bytes (header, nonce, ciphertext, tag, length).
    sealed = [seal_plain(msgpack.packb(s), rng) for s in seeds]
    for i in range(CASES):
        check_sealed(mutate_bytes(rng.choice(sealed), rng, MSGPACK_TOKENS), f"sealed #{i}")
    # The contents: mutated plaintexts, sealed with the real key.
    for i in range(CASES):
        packed = packb(mutate(rng.choice(seeds), rng))
        if packed is not None:
            check_sealed(seal_plain(packed, rng), f"plaintext structural #{i}")
        plain = mutate_bytes(msgpack.packb(rng.choice(seeds)), rng, MSGPACK_TOKENS)
        check_sealed(seal_plain(plain, rng), f"plaintext bytes #{i}")


def test_frame_mutations() -> None:
    rng = seeded(SEED + 3)
    frames = [encode(m) for m in FRAME_SEEDS]
    cases: list[tuple[bytes, str, bool]] = [(f, "valid", True) for f in frames]
    for i in range(CASES):
        cases.append((mutate_bytes(rng.choice(frames), rng, MSGPACK_TOKENS), f"bytes #{i}", True))
        packed = packb(mutate(rng.choice(FRAME_SEEDS), rng))
        if packed is not None:
            body = len(packed).to_bytes(4, "big") + packed
            cases.append((body, f"structural #{i}", True))
    for i in range(40):  # truncated, and the peer stays silent: the frame timeout fires
        frame = rng.choice(frames)
        cases.append((frame[: rng.randrange(1, len(frame))], f"stalled #{i}", False))
    check_frames(cases)


def test_request_mutations() -> None:
    rng = seeded(SEED + 4)
    bodies = [msgpack.packb(s) for s in CONTROL_SEEDS]
    for i in range(CASES):
        check_request(mutate_bytes(rng.choice(bodies), rng, MSGPACK_TOKENS), f"bytes #{i}")
        packed = packb(mutate(rng.choice(CONTROL_SEEDS), rng))
        if packed is not None:
            check_request(packed, f"structural #{i}")


def test_flow_mutations() -> None:
    rng = seeded(SEED + 5)
    for i in range(CASES * 2):
        text = rng.choice(FLOW_SEEDS)
        for _ in range(rng.choice((1, 2, 3))):
            pos = rng.randrange(len(text) + 1)
            cut = pos + rng.randint(0, 3)
            text = text[:pos] + rng.choice([*FLOW_TOKENS, ""]) + text[cut:]
        check_flow(text, f"flow #{i}")


def receive_one(sock: socket.socket, decoder: Decoder) -> dict[str, Any]:
    while (answer := decoder.next()) is None:
        data = sock.recv(65536)
        assert data, "the daemon hung up"
        decoder.feed(data)
    return answer


def test_daemon_client_survives_mutated_frames(caplog: pytest.LogCaptureFixture) -> None:
    """A real ``Daemon._client`` loop: one answer per frame, always ``ok: false`` here
    (there is no steerer, so even good commands fail inside ``handle``), and the thread
    lives on."""
    caplog.set_level(logging.CRITICAL, logger="pysteer.steer")
    rng = seeded(SEED + 6)
    bodies = [msgpack.packb(s) for s in CONTROL_SEEDS]
    ours, theirs = socket.socketpair()
    daemon = Daemon(None, Path("/nonexistent"))  # type: ignore[arg-type]
    thread = threading.Thread(target=daemon._client, args=(theirs,), daemon=True)
    thread.start()
    ours.settimeout(10)
    decoder = Decoder()
    with ours:
        ours.sendall(encode(hello()))
        assert receive_one(ours, decoder)["ok"] is True
        for i in range(300):
            ours.sendall(frame_of(mutate_bytes(rng.choice(bodies), rng, MSGPACK_TOKENS)))
            answer = receive_one(ours, decoder)
            assert answer["ok"] is False and isinstance(answer["error"], str), f"frame #{i}"
            assert thread.is_alive(), f"frame #{i}"
    thread.join(10)
    assert not thread.is_alive()


def test_daemon_client_answers_old_clients(caplog: pytest.LogCaptureFixture) -> None:
    """A client of the JSON lines pysteer spoke before its RPC, sending anything at all:
    one JSON line that says which versions meet, then the daemon hangs up."""
    caplog.set_level(logging.CRITICAL, logger="pysteer.steer")
    rng = seeded(SEED + 8)
    daemon = Daemon(None, Path("/nonexistent"))  # type: ignore[arg-type]
    for i in range(40):
        line = b"{" + mutate_bytes(json.dumps(rng.choice(CONTROL_SEEDS)).encode(), rng, JSON_TOKENS)
        ours, theirs = socket.socketpair()
        thread = threading.Thread(target=daemon._client, args=(theirs,), daemon=True)
        thread.start()
        with ours:
            ours.settimeout(10)
            ours.sendall(line + b"\n")
            got = b""
            while chunk := ours.recv(65536):
                got += chunk
        thread.join(10)
        assert not thread.is_alive(), f"line #{i}"
        answer = json.loads(got)
        assert answer["ok"] is False and answer["code"] == "version", f"line #{i}"
        assert "version 1" in answer["error"] and "version 0" in answer["error"]


# --- hypothesis: arbitrary values, and the mutator driven by hypothesis' own randomness ------
def nasty(index: int) -> Any:
    return NASTY[index]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=30,
)
msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(1 << 63), (1 << 64) - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8) | st.binary(max_size=4), inner, max_size=4)
    ),
    max_leaves=30,
)
python_values = st.recursive(
    # By index: hypothesis must never repr HUGE (str() refuses it) while describing a case.
    st.integers(0, len(NASTY) - 1).map(nasty) | msgpack_values,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)
mutator_rng = st.randoms(use_true_random=False)


@FUZZ
@given(body=st.binary(max_size=300))
def test_hypothesis_request_bytes(body: bytes) -> None:
    check_request(body, f"bytes {body[:60]!r}")


@FUZZ
@given(text=st.text(max_size=300))
def test_hypothesis_request_text(text: str) -> None:
    check_request(msgpack.packb({"cmd": "park", "flow": text}), "text as a flow")
    raw = text.encode("utf-8", "surrogatepass")  # a lone surrogate is no UTF-8
    check_request(b"\x81\xa3cmd\xda" + len(raw).to_bytes(2, "big") + raw, "raw str")


@FUZZ
@given(value=msgpack_values, depth=st.integers(0, 40))
def test_hypothesis_request_values(value: Any, depth: int) -> None:
    request = {"cmd": "park", "flow": "10.0.0.2:1-10.0.0.3:2", "x": nested(depth, value)}
    check_request(msgpack.packb(request, use_bin_type=True), "nested value")
    check_request(msgpack.packb(value, use_bin_type=True), "value")


@FUZZ
@given(rng=mutator_rng)
def test_hypothesis_request_mutations(rng: random.Random) -> None:
    body = msgpack.packb(rng.choice(CONTROL_SEEDS))
    check_request(mutate_bytes(body, rng, MSGPACK_TOKENS), "mutated request")


@FUZZ
@given(text=st.text(max_size=80) | st.from_regex(r"\[?[0-9a-f:.]{0,20}\]?:[0-9]{0,8}-.{0,30}"))
def test_hypothesis_flows(text: str) -> None:
    check_flow(text, f"flow {text!r}")


@FUZZ
@given(rng=mutator_rng, value=python_values)
def test_hypothesis_tcp_state(rng: random.Random, value: Any) -> None:
    check_tcp(mutate(rng.choice(tcp_seeds()), rng), "tcp mutated")
    check_tcp(value, "tcp arbitrary")
    wire = tcp_seeds()[0]
    wire[rng.choice(sorted(wire))] = value
    check_tcp(wire, "tcp one field arbitrary")


@FUZZ
@given(rng=mutator_rng, value=python_values)
def test_hypothesis_tls_state(rng: random.Random, value: Any) -> None:
    seeds = tls_seeds(seeded(0))
    check_tls(mutate(rng.choice(seeds), rng), "tls mutated")
    check_tls(value, "tls arbitrary")
    wire = rng.choice(seeds)
    wire[rng.choice(sorted(wire))] = value
    check_tls(wire, "tls one field arbitrary")


@FUZZ
@given(rng=mutator_rng, value=msgpack_values)
def test_hypothesis_blob_plaintext(rng: random.Random, value: Any) -> None:
    seeds = blob_seeds(seeded(0))
    wire = rng.choice(seeds)
    wire[rng.choice(sorted(wire))] = value
    check_sealed(seal_plain(msgpack.packb(wire, use_bin_type=True), rng), "one field arbitrary")
    check_sealed(seal_plain(msgpack.packb(value, use_bin_type=True), rng), "arbitrary plaintext")
    plain = mutate_bytes(msgpack.packb(rng.choice(seeds)), rng, MSGPACK_TOKENS)
    check_sealed(seal_plain(plain, rng), "mutated plaintext")


@FUZZ
@given(data=st.binary(max_size=200), value=msgpack_values)
def test_hypothesis_frames(data: bytes, value: Any) -> None:
    body = msgpack.packb(value, use_bin_type=True)
    check_frames(
        [
            (data, "arbitrary bytes", True),
            (len(body).to_bytes(4, "big") + body, "arbitrary value", True),
        ]
    )


@FUZZ
@given(data=st.binary(max_size=200))
def test_hypothesis_sealed_envelope(data: bytes) -> None:
    sealed = seal(
        MigrationBlob(
            MID, Flow.parse(FLOW_SEEDS[0]), TcpState.from_wire(tcp_seeds()[0]), None, None
        ),
        KEY,
        source="a",
        target="b",
    )
    check_sealed(data, "arbitrary bytes")
    check_sealed(sealed[:29] + data, "arbitrary body after a valid header")
