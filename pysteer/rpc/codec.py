"""The RPC without I/O: frames, an incremental decoder, and the hello (see ``pysteer.rpc``).

Everything here works on bytes and maps; ``aio`` and ``blocking`` move the bytes. Garbage
from a peer is only ever a ``ProtocolError`` (a ``BadFrame`` when one frame's body is bad
but the stream holds together), never another exception.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from typing import Any

import msgpack

from pysteer.rpc import VERSION
from pysteer.rpc.errors import (
    CODES,
    BadFrame,
    LegacyJson,
    ProtocolError,
    Unreachable,
    VersionMismatch,
    check,
)

log = logging.getLogger("pysteer.rpc")

MAX_FRAME = 64 << 20  # a blob carries at most both socket queues of a connection
FRAME_TIMEOUT = 30.0  # seconds for the rest of a frame once its first byte came
MAX_DEPTH = 32  # maps and arrays in a frame; handlers (repr, f-strings) recurse
MAX_ITEMS = 1 << 20  # per array or map: far over any real message, and bounds its memory
SUPPORTED = frozenset({VERSION})  # the versions a server accepts in a hello
_LEN = struct.Struct("!I")


def encode(message: dict[str, Any]) -> bytes:
    """One frame: the length, then the msgpack map (bytes as bin, unchanged)."""
    body = msgpack.packb(message, use_bin_type=True)
    return _LEN.pack(len(body)) + body


def encode_answer(answer: dict[str, Any]) -> bytes:
    """``encode(answer)``, or, if a bug put something msgpack cannot carry in it, an
    internal error the client can read (the connection goes on)."""
    try:
        return encode(answer)
    except (TypeError, ValueError, OverflowError) as exc:
        log.error("an answer could not be encoded (%s)", type(exc).__name__)
        error = f"internal error ({type(exc).__name__} encoding the answer); see the log"
        return encode({"ok": False, "error": error})


def decode_body(body: bytes | memoryview, *, finite: bool = False) -> dict[str, Any]:
    """A frame's msgpack map, within bounds; BadFrame for anything else, never another
    error. ``finite``: refuse NaN and infinities too (servers do, for requests)."""
    try:
        message = msgpack.unpackb(
            body,
            raw=False,
            max_bin_len=len(body),
            max_str_len=len(body),
            max_array_len=MAX_ITEMS,
            max_map_len=MAX_ITEMS,
            max_ext_len=0,  # pysteer sends no extension types
        )
    except UnicodeDecodeError:
        raise BadFrame("a frame's strings must be UTF-8") from None
    except (ValueError, TypeError, OverflowError, RecursionError, msgpack.UnpackException):
        raise BadFrame("the peer sent invalid msgpack") from None
    if not isinstance(message, dict):
        raise BadFrame("a frame must hold a map")
    problem = _problem(message, finite)
    if problem:
        raise BadFrame(problem)
    return message


def _problem(message: dict[str, Any], finite: bool) -> str | None:
    """What is wrong with a decoded map, if anything: nesting beyond MAX_DEPTH, or (with
    ``finite``) a number that is not finite. Iterative, so any depth is safe to check."""
    stack: list[tuple[Any, int]] = [(message, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            return f"a frame nests at most {MAX_DEPTH} maps or arrays deep"
        for value in item.values() if isinstance(item, dict) else item:
            if isinstance(value, dict | list):
                stack.append((value, depth + 1))
            elif finite and isinstance(value, float) and not math.isfinite(value):
                return "a request's numbers must be finite"
    return None


class Decoder:
    """Bytes in, messages out: ``feed`` what arrived, then call ``next`` until it gives
    None (the rest of a frame is still to come).

    A frame over ``max_frame`` breaks the stream for good (every later ``next`` raises
    ProtocolError again); a frame whose body is bad raises BadFrame once, and the next
    frame is read as usual. Before the first frame, a ``{`` is a JSON line: LegacyJson.
    """

    def __init__(self, max_frame: int = MAX_FRAME, *, finite: bool = False) -> None:
        self.max_frame, self.finite = max_frame, finite
        self._buffer = bytearray()
        self._first = True
        self._broken: str | None = None

    @property
    def pending(self) -> bool:
        """Whether part of a frame has arrived (its rest is then due within a deadline)."""
        return bool(self._buffer)

    def feed(self, data: bytes) -> None:
        if self._broken is None:
            self._buffer += data

    def next(self) -> dict[str, Any] | None:
        if self._broken is not None:
            raise ProtocolError(self._broken)
        buffer = self._buffer
        if self._first and buffer[:1] == b"{":
            self._break("the peer sent a JSON line")
            raise LegacyJson(
                f"the peer sent a JSON line: it speaks version 0 (pysteer's JSON lines, "
                f"from before its RPC); this end speaks pysteer RPC version {VERSION}"
            )
        if len(buffer) < _LEN.size:
            return None
        (size,) = _LEN.unpack_from(buffer)
        if size > self.max_frame:
            self._break(f"a frame of {size} bytes is over the {self.max_frame}-byte limit")
            raise ProtocolError(self._broken or "")
        end = _LEN.size + size
        if len(buffer) < end:
            return None
        self._first = False
        try:
            with memoryview(buffer) as view, view[_LEN.size : end] as body:
                return decode_body(body, finite=self.finite)
        finally:
            del buffer[:end]  # a bad body is skipped: the next frame is read as usual

    def _break(self, why: str) -> None:
        self._broken = why
        self._buffer.clear()


# --- the hello ---------------------------------------------------------------------------
def hello() -> dict[str, Any]:
    """A client's first frame. Its newline comes last: see ``pysteer.rpc``."""
    return {"rpc": "hello", "version": VERSION, "nl": "\n"}


def _shown(version: Any) -> str:
    if isinstance(version, int) and not isinstance(version, bool):
        return str(version)
    return f"{str(version)[:20]!r} (not a version)"


def accept(message: dict[str, Any], server: str) -> dict[str, Any]:
    """A server's answer to a connection's first frame (``server`` names it: "this
    steering daemon"); VersionMismatch, naming both versions, if that is no hello of a
    version it speaks: answer it (``errors.answer_for``), then hang up."""
    if message.get("rpc") != "hello":
        raise VersionMismatch(
            f"{server} speaks pysteer RPC version {VERSION}; the client sent no hello "
            f"first, so it speaks version 0 (pysteer from before its RPC): upgrade it"
        )
    version = message.get("version")
    if isinstance(version, bool) or version not in SUPPORTED:
        raise VersionMismatch(
            f"{server} speaks pysteer RPC version {VERSION}; the client speaks version "
            f"{_shown(version)}: run the same version on both ends (upgrade the older one)"
        )
    return {"ok": True, "rpc": "hello", "version": VERSION}


def check_hello(answer: dict[str, Any], where: str) -> None:
    """A client's check of the server's answer to its hello (``where`` names the server
    in the exception): an Unreachable, most often VersionMismatch, unless it is welcome."""
    if answer.get("ok") is True and answer.get("rpc") == "hello":
        version = answer.get("version")
        if isinstance(version, bool) or version != VERSION:
            raise VersionMismatch(
                f"{where} speaks pysteer RPC version {_shown(version)}; this end speaks "
                f"version {VERSION}: run the same version on both ends (upgrade the older one)"
            )
        return
    cls = CODES.get(str(answer.get("code")))
    if cls is not None and issubclass(cls, Unreachable):
        check(answer, where)  # raises it: busy, version, protocol
    raise VersionMismatch(
        f"{where} answered no hello, so it speaks version 0 (pysteer from before its "
        f"RPC); this end speaks pysteer RPC version {VERSION}: upgrade it"
    )


def legacy_refusal(server: str) -> bytes:
    """The JSON line a server answers a client of the old JSON-line protocol with."""
    error = (
        f"{server} speaks pysteer RPC version {VERSION} (length-prefixed msgpack frames); "
        f"the client sent a JSON line, so it speaks version 0 (pysteer from before its "
        f"RPC): upgrade it"
    )
    return json.dumps({"ok": False, "code": "version", "error": error}).encode() + b"\n"
