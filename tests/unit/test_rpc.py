"""pysteer's RPC (``pysteer.rpc``): the codec, its bounds, the hello and its version, the
error map, and deadlines, over real sockets where they matter (socketpairs, unix sockets,
loopback TCP), with the steering daemon's real per-client loop as the blocking server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from pysteer.agent.control import AgentDown, AgentRefused, ask
from pysteer.agent.links import LinkError
from pysteer.agent.links import Refused as LinkRefused
from pysteer.rpc import VERSION, aio, blocking, codec, errors
from pysteer.rpc.codec import MAX_DEPTH, MAX_FRAME, MAX_ITEMS, Decoder, encode, hello
from pysteer.rpc.errors import (
    BadFrame,
    BadRequest,
    Busy,
    LegacyJson,
    ProtocolError,
    Refused,
    Stalled,
    Unreachable,
    VersionMismatch,
)
from pysteer.steer import daemon as steerd
from pysteer.steer.control import ControlError, request
from pysteer.steer.daemon import Daemon

MESSAGES: list[dict[str, Any]] = [
    {"rpc": "hello", "version": VERSION, "nl": "\n"},
    {"op": "prepare", "id": bytes(range(16)), "blob": os.urandom(1 << 16) + b"\n\0"},
    {"cmd": "sync", "host": "a", "flows": ["10.0.0.2:1-10.0.0.3:443"] * 100, "done": True},
    {"ok": True, "n": [0, -1, 2**63, 2**64 - 1, -(2**63)], "t": 0.25, "none": None},
    {"ok": False, "error": "h\u00e9 \u2603 \U0001f600", "code": "pending"},
    {"nested": {"a": [[{"b": [1]}]]}, "empty": {}, "list": [], "bin": b""},
]


def frames(messages: list[dict[str, Any]]) -> bytes:
    return b"".join(encode(m) for m in messages)


def decode_all(data: bytes, step: int | None = None, **options: Any) -> list[dict[str, Any]]:
    """Every message in ``data``, fed ``step`` bytes at a time (None: all at once)."""
    decoder, out = Decoder(**options), []
    step = step or max(len(data), 1)
    for pos in range(0, len(data), step):
        decoder.feed(data[pos : pos + step])
        while (message := decoder.next()) is not None:
            out.append(message)
    assert not decoder.pending
    return out


def body_frame(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


# --- the codec ---------------------------------------------------------------------------
def test_round_trip_keeps_types() -> None:
    got = decode_all(frames(MESSAGES))
    assert got == MESSAGES
    blob = got[1]["blob"]
    assert type(blob) is bytes and blob == MESSAGES[1]["blob"]  # bin, unchanged
    assert type(got[1]["id"]) is bytes and type(got[4]["error"]) is str


def test_frame_layout() -> None:
    frame = encode({"a": b"\x01"})
    assert frame[:4] == (len(frame) - 4).to_bytes(4, "big")
    assert frame[4:] == msgpack.packb({"a": b"\x01"}, use_bin_type=True)
    assert frame[4:] == b"\x81\xa1a\xc4\x01\x01"  # a bin, not a str


def test_byte_by_byte() -> None:
    data = frames(MESSAGES)
    decoder, out = Decoder(), []
    for i in range(len(data)):
        decoder.feed(data[i : i + 1])
        message = decoder.next()
        if message is not None:
            out.append(message)
            assert decoder.next() is None  # one frame at a time: nothing more yet
        assert decoder.pending == (message is None)  # a frame ends exactly at its last byte
    assert out == MESSAGES


@pytest.mark.parametrize("step", [2, 3, 5, 4096])
def test_any_split(step: int) -> None:
    assert decode_all(frames(MESSAGES), step) == MESSAGES


def test_hello_ends_with_a_newline() -> None:
    """So that a JSON-line server of before answers it at once (see ``pysteer.rpc``)."""
    frame = encode(hello())
    assert frame.endswith(b"\n") and frame.count(b"\n") == 1
    assert decode_all(frame) == [hello()]


# --- every bound -------------------------------------------------------------------------
def test_frame_size_bound() -> None:
    body = msgpack.packb({"b": bytes(100)}, use_bin_type=True)
    assert decode_all(body_frame(body), max_frame=len(body)) == [{"b": bytes(100)}]
    decoder = Decoder(max_frame=len(body) - 1)
    decoder.feed(body_frame(body)[:4])  # refused from its length: the body never comes
    with pytest.raises(ProtocolError, match=f"{len(body)} bytes is over the {len(body) - 1}"):
        decoder.next()
    decoder.feed(encode({"a": 1}))
    with pytest.raises(ProtocolError, match="over the"):  # broken for good
        decoder.next()
    assert Decoder().max_frame == MAX_FRAME == 64 << 20


def nest(depth: int) -> dict[str, Any]:
    """A map whose maps and arrays nest ``depth`` deep (it counts as one)."""
    value: Any = [0]
    for i in range(depth - 2):
        value = {"v": value} if i % 2 else [value]
    return {"v": value}


def test_depth_bound() -> None:
    assert decode_all(encode(nest(MAX_DEPTH))) == [nest(MAX_DEPTH)]
    for depth in (MAX_DEPTH + 1, 500):
        with pytest.raises(BadFrame, match=f"nests at most {MAX_DEPTH}"):
            decode_all(encode(nest(depth)))


def test_items_bound() -> None:
    ok = {"v": [0] * MAX_ITEMS}
    assert decode_all(encode(ok))[0]["v"] == ok["v"]
    with pytest.raises(BadFrame, match="invalid msgpack"):
        decode_all(encode({"v": [0] * (MAX_ITEMS + 1)}))
    with pytest.raises(BadFrame, match="invalid msgpack"):
        decode_all(body_frame(b"\x81\xa1v\xdf\xff\xff\xff\xff"))  # a map of 2**32-1, claimed


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"\x81\xa1v\xd6\xff\x00\x00\x00\x01", "invalid msgpack"),  # a timestamp ext
        (b"\x81\xa1v\xd4\x05\x00", "invalid msgpack"),  # an unknown ext
        (b"\x81\x01\x02", "invalid msgpack"),  # an int key
        (b"\x81\x91\x00\x00", "invalid msgpack"),  # a list as a key
        (b"\x81\xa1v\xa2\xff\xfe", "must be UTF-8"),
        (b"\x81\xa1v\xc6\xff\xff\xff\xff", "invalid msgpack"),  # a bin of 2**32-1, claimed
        (b"\x92\x01\x02", "must hold a map"),
        (b"\xc0", "must hold a map"),
    ],
    ids=["timestamp", "ext", "int-key", "list-key", "utf8", "bin-header", "array", "nil"],
)
def test_body_bounds(body: bytes, message: str) -> None:
    with pytest.raises(BadFrame, match=message):
        decode_all(body_frame(body))


def test_a_bad_body_skips_one_frame_only() -> None:
    data = encode({"a": 1}) + body_frame(b"\xc1") + encode({"b": 2})
    decoder, out = Decoder(), []
    decoder.feed(data)
    out.append(decoder.next())
    with pytest.raises(BadFrame):
        decoder.next()
    out.append(decoder.next())
    assert out == [{"a": 1}, {"b": 2}] and not decoder.pending


def test_numbers_must_be_finite_in_requests_only() -> None:
    frame = encode({"cmd": "park", "lease": [math.inf]})
    with pytest.raises(BadFrame, match="finite"):
        decode_all(frame, finite=True)
    assert decode_all(frame)[0]["lease"] == [math.inf]  # an answer may carry one


def test_garbage_is_only_ever_a_protocol_error() -> None:
    """Random bytes, and valid frames with random damage, fed in random pieces: messages,
    or a ProtocolError, and nothing else ever."""
    rng = random.Random(0x5EED)  # noqa: S311 - reproducible, not for cryptography
    valid = frames(MESSAGES)
    outcomes = {"message": 0, "bad": 0, "broken": 0}
    for case in range(3000):
        if case % 3 == 0:
            data = rng.randbytes(rng.randint(0, 200))
        else:
            data = bytearray(valid[: rng.randint(0, 400)])
            for _ in range(rng.randint(1, 4)):
                if data:
                    data[rng.randrange(len(data))] = rng.randrange(256)
            data = bytes(data)
        decoder = Decoder(max_frame=1 << 16, finite=bool(case % 2))
        pos = 0
        with contextlib.suppress(ProtocolError):
            while pos < len(data):
                step = rng.choice((1, 2, 7, 100))
                decoder.feed(data[pos : pos + step])
                pos += step
                while True:
                    try:
                        message = decoder.next()
                    except BadFrame:
                        outcomes["bad"] += 1
                        continue
                    if message is None:
                        break
                    assert isinstance(message, dict)
                    outcomes["message"] += 1
            continue
        outcomes["broken"] += 1
    assert all(outcomes.values()), outcomes  # every outcome was reached


# --- the error map -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("code", "cls"),
    [
        ("version", VersionMismatch),
        ("busy", Busy),
        ("protocol", ProtocolError),
        ("bad-request", BadRequest),
        ("committed", Refused),
        ("pending", Refused),
        (None, Refused),
        (7, Refused),
    ],
)
def test_error_map(code: Any, cls: type) -> None:
    answer = {"ok": False, "error": "no, because"} | ({} if code is None else {"code": code})
    with pytest.raises(cls) as info:
        errors.check(answer, "node b")
    assert type(info.value) is cls
    assert str(info.value) == "node b: no, because"
    assert info.value.code == (code if isinstance(code, str) else cls.code)


def test_error_map_round_trip() -> None:
    """A server's ``answer_for`` and a client's ``check`` are inverses, over the wire."""
    for cls in (VersionMismatch, Busy, ProtocolError, BadRequest):
        wire = decode_all(encode(errors.answer_for(cls("why"))))[0]
        with pytest.raises(cls, match=r"^why$"):
            errors.check(wire)
    wire = decode_all(encode(errors.answer_for(BadFrame("bad body"))))[0]
    assert wire == {"ok": False, "error": "bad body", "code": "bad-request"}
    with pytest.raises(BadRequest):
        errors.check(wire)


def test_error_map_families() -> None:
    """No answer (a ConnectionError, the link's LinkError) or a no (a RuntimeError); the
    CLI's and links' classes are the map's."""
    for cls in (Unreachable, ProtocolError, Stalled, VersionMismatch, LegacyJson, Busy):
        assert issubclass(cls, LinkError) and issubclass(cls, ConnectionError)
        assert not issubclass(cls, Refused)
    assert issubclass(BadRequest, Refused) and issubclass(Refused, RuntimeError)
    assert LinkRefused is Refused and issubclass(AgentRefused, Refused)
    assert issubclass(AgentDown, Unreachable) and issubclass(ControlError, RuntimeError)
    assert str(ProtocolError("plain text")) == "plain text"  # not OSError's "[Errno ...]"


def test_check_passes_answers_and_bounds_errors() -> None:
    assert errors.check({"ok": True, "x": 1}) == {"ok": True, "x": 1}
    with pytest.raises(Refused, match=r"^refused$"):
        errors.check({"ok": 1})  # only true is a yes
    with pytest.raises(Refused) as info:
        errors.check({"ok": False, "error": "x" * 100_000})
    assert len(str(info.value)) == errors.MAX_ERROR


# --- the hello and its version -----------------------------------------------------------
def test_accept_names_both_versions() -> None:
    assert codec.accept(hello(), "this agent (b)") == {
        "ok": True,
        "rpc": "hello",
        "version": VERSION,
    }
    for version, shown in [(VERSION + 1, str(VERSION + 1)), (0, "0"), (True, "'True'")]:
        with pytest.raises(VersionMismatch) as info:
            codec.accept(hello() | {"version": version}, "this agent (b)")
        assert str(info.value).startswith(
            f"this agent (b) speaks pysteer RPC version {VERSION}; the client speaks "
            f"version {shown}"
        )
    with pytest.raises(VersionMismatch, match="sent no hello first, so it speaks version 0"):
        codec.accept({"op": "hello"}, "this agent (b)")  # an agent of before


def test_check_hello() -> None:
    codec.check_hello({"ok": True, "rpc": "hello", "version": VERSION}, "x")
    with pytest.raises(VersionMismatch, match=f"x speaks pysteer RPC version {VERSION + 1}; "):
        codec.check_hello({"ok": True, "rpc": "hello", "version": VERSION + 1}, "x")
    with pytest.raises(VersionMismatch, match="x answered no hello, so it speaks version 0"):
        codec.check_hello({"ok": False, "error": "op must be a string"}, "x")  # before
    with pytest.raises(Busy, match=r"^x: busy now$"):
        codec.check_hello({"ok": False, "error": "busy now", "code": "busy"}, "x")


@pytest.fixture
def daemon_conn(caplog: pytest.LogCaptureFixture) -> Iterator[socket.socket]:
    """A socket served by the steering daemon's real per-client thread (no steerer)."""
    caplog.set_level(logging.INFO, logger="pysteer.steer")
    ours, theirs = socket.socketpair()
    daemon = Daemon(None, Path("/nonexistent"))  # type: ignore[arg-type]
    thread = threading.Thread(target=daemon._client, args=(theirs, 5.0), daemon=True)
    thread.start()
    ours.settimeout(10)
    yield ours
    ours.close()
    thread.join(10)
    assert not thread.is_alive()


def read_to_end(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_steering_daemon_refuses_another_version(
    daemon_conn: socket.socket, caplog: pytest.LogCaptureFixture
) -> None:
    """The refusal names both versions, comes before the request behind the hello is
    read, and the daemon hangs up (and logs it for the operator)."""
    daemon_conn.sendall(encode(hello() | {"version": VERSION + 1}) + encode({"cmd": "nope"}))
    assert decode_all(read_to_end(daemon_conn)) == [
        {
            "ok": False,
            "code": "version",
            "error": f"this steering daemon speaks pysteer RPC version {VERSION}; the client "
            f"speaks version {VERSION + 1}: run the same version on both ends (upgrade the "
            "older one)",
        }
    ]
    assert (
        f"refused a control client: this steering daemon speaks pysteer RPC version {VERSION}; "
        f"the client speaks version {VERSION + 1}"
    ) in caplog.text


def test_steering_daemon_answers_a_json_line_in_json(daemon_conn: socket.socket) -> None:
    """A CLI or agent of before sends a JSON line: one JSON line answers it."""
    daemon_conn.sendall(b'{"cmd": "stats"}\n')
    answer = json.loads(read_to_end(daemon_conn))
    assert answer["ok"] is False and answer["code"] == "version"
    assert answer["error"].startswith(
        f"this steering daemon speaks pysteer RPC version {VERSION} (length-prefixed msgpack "
        "frames); the client sent a JSON line, so it speaks version 0"
    )


def test_steering_daemon_refuses_a_client_without_hello(daemon_conn: socket.socket) -> None:
    daemon_conn.sendall(encode({"cmd": "stats"}))
    (answer,) = decode_all(read_to_end(daemon_conn))
    assert answer["code"] == "version" and "sent no hello first" in answer["error"]


def unix_server(
    tmp_path: Path, serve: Callable[[socket.socket], None]
) -> tuple[Path, threading.Thread]:
    """A unix socket at a fresh path, whose one connection ``serve`` handles."""
    path = tmp_path / "server.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen()

    def run() -> None:
        with listener, listener.accept()[0] as conn:
            conn.settimeout(10)
            serve(conn)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return path, thread


def newer(conn: socket.socket) -> None:
    """A server of the next version: it welcomes a hello with its own version."""
    decoder = Decoder()
    while decoder.next() is None:
        decoder.feed(conn.recv(65536))
    conn.sendall(encode({"ok": True, "rpc": "hello", "version": VERSION + 1}))
    with contextlib.suppress(OSError):
        read_to_end(conn)


def json_lines(conn: socket.socket) -> None:
    """A server of the JSON lines before: it answers each line, as the old ones did."""
    buffer = b""
    while chunk := conn.recv(65536):
        buffer += chunk
        while b"\n" in buffer:
            _line, buffer = buffer.split(b"\n", 1)
            conn.sendall(b'{"ok": false, "error": "requests are one JSON object per line"}\n')


def test_clients_refuse_a_server_of_another_version(tmp_path: Path) -> None:
    """The CLI's clients, each against a server of the next version and one of before."""
    for serve in (newer, json_lines):
        path, thread = unix_server(tmp_path, serve)
        start = time.monotonic()
        with pytest.raises(ControlError) as info:
            request(path, "stats", timeout=10)
        assert time.monotonic() - start < 5  # never waits out its timeout
        assert info.value.code == "version"
        why = {
            newer: f"speaks pysteer RPC version {VERSION + 1}; this end speaks version {VERSION}",
            json_lines: f"speaks version 0 (pysteer's JSON lines, from before its RPC); this "
            f"end speaks pysteer RPC version {VERSION}",
        }[serve]
        assert str(info.value).startswith(f"steering daemon at {path}")
        assert why in str(info.value)
        thread.join(10)
        path.unlink()
        path, thread = unix_server(tmp_path, serve)
        with pytest.raises(AgentDown) as down:
            ask(path, "status")
        assert str(down.value).startswith(f"the agent at {path}") and why in str(down.value)
        assert down.value.code == "version"
        thread.join(10)
        path.unlink()


def test_busy_is_its_own_error(tmp_path: Path) -> None:
    """A daemon at its bound answers the hello with ``busy`` (the real ``_refuse``)."""
    path, thread = unix_server(tmp_path, lambda conn: steerd._refuse(conn, "too many, later"))
    with pytest.raises(ControlError, match=r": too many, later$") as info:
        request(path, "stats")
    assert info.value.code == "busy"
    thread.join(10)


# --- the asyncio adapter, as the agent serves with it ----------------------------------------
async def echo(request: dict[str, Any]) -> dict[str, Any] | None:
    if request.get("cmd") == "boom":
        return {"ok": True, "unencodable": {1, 2}}  # a bug: the client still gets an answer
    return {"ok": True, "echo": request}


@contextlib.asynccontextmanager
async def agent_like(tmp_path: Path, **options: Any) -> Any:
    """A unix server whose connections ``aio.serve`` serves; yields (path, ends)."""
    ends: list[BaseException | None] = []

    async def client_connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await aio.serve(aio.Connection(reader, writer, **options), echo, "this agent (b)")
            ends.append(None)
        except OSError as exc:
            ends.append(exc)
        finally:
            writer.close()

    path = tmp_path / "agent.sock"
    server = await asyncio.start_unix_server(client_connected, path)
    try:
        yield path, ends
    finally:
        server.close()


def test_aio_serve_and_link(tmp_path: Path) -> None:
    async def go() -> None:
        async with agent_like(tmp_path) as (path, ends):
            reader, writer = await asyncio.open_unix_connection(path)
            conn = aio.Connection(reader, writer)
            await conn.hello("agent b")
            blob = os.urandom(3 << 20)
            answer = await conn.exchange({"op": "prepare", "blob": blob})
            assert answer["echo"]["blob"] == blob and type(answer["echo"]["blob"]) is bytes
            writer.write(body_frame(b"\xc1"))  # a bad frame: answered, and the link goes on
            assert await conn.receive() == {
                "ok": False,
                "error": "the peer sent invalid msgpack",
                "code": "bad-request",
            }
            answer = await conn.exchange({"cmd": "park", "lease": math.nan})
            assert answer["code"] == "bad-request" and "finite" in answer["error"]
            answer = await conn.exchange({"cmd": "boom"})
            assert answer["ok"] is False and "internal error (TypeError" in answer["error"]
            assert (await conn.exchange({"cmd": "x"}))["echo"] == {"cmd": "x"}
            writer.close()
            await asyncio.sleep(0.1)
            assert ends == [None]

    asyncio.run(asyncio.wait_for(go(), 20))


def test_aio_server_refuses_another_version(tmp_path: Path) -> None:
    async def go() -> None:
        async with agent_like(tmp_path) as (path, ends):
            for first, expect in [
                (encode(hello() | {"version": VERSION + 1}), "the client speaks version 2"),
                (encode({"op": "hello"}), "sent no hello first, so it speaks version 0"),
                (b'{"cmd": "status"}\n', "the client sent a JSON line, so it speaks version 0"),
            ]:
                reader, writer = await asyncio.open_unix_connection(path)
                writer.write(first + encode({"op": "hello"}))
                data = await asyncio.wait_for(reader.read(), 5)  # then it hangs up
                writer.close()
                answer = json.loads(data) if first[:1] == b"{" else decode_all(data)[0]
                assert answer["ok"] is False and answer["code"] == "version"
                assert f"this agent (b) speaks pysteer RPC version {VERSION}" in answer["error"]
                assert expect in answer["error"]
            await asyncio.sleep(0.1)
            assert [type(e) for e in ends] == [VersionMismatch, VersionMismatch, LegacyJson]

    asyncio.run(asyncio.wait_for(go(), 20))


def test_aio_client_refuses_a_server_of_another_version() -> None:
    async def go(serve: Callable[[socket.socket], None]) -> BaseException:
        ours, theirs = socket.socketpair()
        thread = threading.Thread(target=serve, args=(theirs,), daemon=True)
        thread.start()
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        try:
            await asyncio.wait_for(aio.Connection(reader, writer).hello("agent b"), 5)
        except VersionMismatch as exc:
            return exc
        finally:
            writer.close()
            await asyncio.to_thread(thread.join, 5)  # our hang-up ends it
        raise AssertionError("welcomed")

    exc = asyncio.run(go(newer))
    assert str(exc).startswith(f"agent b speaks pysteer RPC version {VERSION + 1}; this end")
    exc = asyncio.run(go(json_lines))
    assert isinstance(exc, LegacyJson) and str(exc).startswith("agent b: the peer sent a JSON")


# --- deadlines: a stall mid-frame ends the read ------------------------------------------
def test_blocking_stall_mid_frame() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        channel = blocking.Channel(theirs, frame_timeout=0.3)
        ours.sendall(encode({"a": 1}) + encode({"b": b"x" * 100})[:10])
        assert channel.receive(None) == {"a": 1}
        start = time.monotonic()
        with pytest.raises(Stalled, match="part of a frame"):
            channel.receive(None)  # no limit to start, but this one had started
        assert 0.25 < time.monotonic() - start < 3
        with pytest.raises(TimeoutError):  # nothing started: the caller's wait, not a stall
            blocking.Channel(ours, frame_timeout=0.05).receive(0.3)


def test_blocking_client_stalled_by_its_server(tmp_path: Path) -> None:
    def half(conn: socket.socket) -> None:
        conn.sendall(encode({"ok": True, "rpc": "hello", "version": VERSION})[:5])
        time.sleep(2)

    path, thread = unix_server(tmp_path, half)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        client = blocking.Client(sock, "server x", frame_timeout=0.3)
        start = time.monotonic()
        with pytest.raises(Stalled, match=r"^server x: the peer sent part of a frame"):
            client.call({"cmd": "stats"})
        assert time.monotonic() - start < 1.5
    thread.join(10)


def test_aio_stall_mid_frame_over_tcp() -> None:
    """A real TCP connection: the server ends a connection stalled mid-frame."""

    async def go() -> tuple[float, list[BaseException | None], bytes]:
        ends: list[BaseException | None] = []

        async def client_connected(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            try:
                await aio.serve(aio.Connection(reader, writer, frame_timeout=0.3), echo, "srv")
                ends.append(None)
            except OSError as exc:
                ends.append(exc)
            finally:
                writer.close()

        server = await asyncio.start_server(client_connected, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(encode(hello()) + encode({"op": "prepare", "blob": bytes(1000)})[:100])
        start = asyncio.get_running_loop().time()
        data = await asyncio.wait_for(reader.read(), 5)  # the server hangs up
        took = asyncio.get_running_loop().time() - start
        writer.close()
        server.close()
        await asyncio.sleep(0.05)
        return took, ends, data

    took, ends, data = asyncio.run(go())
    assert 0.25 < took < 3
    assert [type(e) for e in ends] == [Stalled]
    welcome, last = decode_all(data)
    assert welcome["ok"] is True and last["code"] == "protocol"
    assert "then nothing for 0.3 s" in last["error"]


# --- the agents' links, over mutual TLS on loopback ------------------------------------
@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cluster CA and node certificates for a and b, as files."""
    from pysteer.certs import CertificateAuthority  # noqa: PLC0415

    d = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority()
    (d / "ca.pem").write_bytes(ca.cert_pem)
    for node in ("a", "b"):
        issued = ca.issue(node, names=[node], usage="node")
        (d / f"{node}.pem").write_bytes(issued.chain_pem)
        (d / f"{node}.key").write_bytes(issued.key_pem)
    return d


async def slow_echo(request: dict[str, Any]) -> dict[str, Any]:
    if request.get("op") == "slow":
        await asyncio.sleep(0.5)
    if request.get("op") == "no":
        return {"ok": False, "error": "no", "code": "absent"}
    return {"ok": True, "echo": request}


@contextlib.asynccontextmanager
async def agent_b(pki: Path, welcome: dict[str, Any] | None = None) -> Any:
    """Agent b's peer listener as the agent serves it (``aio.serve``), or, given
    ``welcome``, a server that answers every hello with it. Yields (port, hellos seen)."""
    from pysteer.identity import server_context  # noqa: PLC0415

    hellos: list[dict[str, Any]] = []

    async def client_connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = aio.Connection(reader, writer)
        try:
            if welcome is not None:
                hellos.append(await conn.receive() or {})
                await conn.send(welcome)
                await conn.receive()
            else:
                await aio.serve(conn, slow_echo, "this agent (b)")
        except OSError:
            pass
        finally:
            writer.close()

    context = server_context(pki / "b.pem", pki / "b.key", pki / "ca.pem")
    server = await asyncio.start_server(client_connected, "127.0.0.1", 0, ssl=context)
    try:
        yield server.sockets[0].getsockname()[1], hellos
    finally:
        server.close()


def link_to_b(pki: Path, port: int) -> Any:
    from pysteer.agent.links import PeerLink  # noqa: PLC0415
    from pysteer.identity import client_context  # noqa: PLC0415

    context = client_context(pki / "a.pem", pki / "a.key", pki / "ca.pem")
    return PeerLink("b", ("127.0.0.1", port), context, {"a", "b"})


def test_link_round_trip_and_cancel(pki: Path) -> None:
    """A link says hello when it opens; a blob comes back as the same bytes; a call
    cancelled mid-way drops the link, so its late answer never answers the next call."""

    async def go() -> None:
        async with agent_b(pki) as (port, _):
            link = link_to_b(pki, port)
            await link.connect(5)
            blob = os.urandom(1 << 20)
            answer = await link.call(5, op="prepare", id=bytes(16), blob=blob)
            assert answer["echo"]["blob"] == blob
            slow = asyncio.get_running_loop().create_task(link.call(5, op="slow"))
            await asyncio.sleep(0.1)
            slow.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await slow
            answer = await link.call(5, op="next")
            assert answer["echo"] == {"op": "next"}
            with pytest.raises(LinkRefused, match=r"^b: no$") as info:
                await link.call(5, op="no")  # a refusal keeps the link
            assert info.value.code == "absent"
            assert (await link.call(5, op="again"))["echo"] == {"op": "again"}
            link.close()

    asyncio.run(asyncio.wait_for(go(), 20))


def test_link_refuses_an_agent_of_another_version(pki: Path) -> None:
    async def go() -> None:
        welcome = {"ok": True, "rpc": "hello", "version": VERSION + 1}
        async with agent_b(pki, welcome) as (port, hellos):
            link = link_to_b(pki, port)
            with pytest.raises(LinkError) as info:
                await link.call(5, op="hello")
            assert isinstance(info.value, VersionMismatch)
            assert str(info.value) == (
                f"agent b at 127.0.0.1:{port} speaks pysteer RPC version {VERSION + 1}; this "
                f"end speaks version {VERSION}: run the same version on both ends (upgrade "
                "the older one)"
            )
            assert hellos == [hello()]  # its first frame, and nothing of the request
        refusal = {"ok": False, "code": "version", "error": "this agent (b) speaks version 9"}
        async with agent_b(pki, refusal) as (port, _):
            with pytest.raises(VersionMismatch, match=r"^agent b at .*: this agent \(b\) speaks"):
                await link_to_b(pki, port).connect(5)

    asyncio.run(asyncio.wait_for(go(), 20))
