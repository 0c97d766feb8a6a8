"""The agents' wire format: length-prefixed msgpack maps over an asyncio stream.

Binary-safe (sealed blobs travel as they are), bounded, and the same both ways:
a request ``{"op": ..., ...}`` is answered by ``{"ok": true, ...}`` or
``{"ok": false, "error": ...}``.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import msgpack

MAX_FRAME = 64 << 20  # a blob carries at most both socket queues
FRAME_TIMEOUT = 30.0  # seconds for the rest of a frame once its first byte came
MAX_DEPTH = 32  # maps and arrays in a frame; handlers (repr, f-strings) recurse
MAX_ITEMS = 1 << 20  # per array or map: far over any real message, and bounds its memory
_LEN = struct.Struct("!I")


class FrameError(ConnectionError):
    """The peer sent something that is not a frame, or hung up, or stalled inside one."""


async def read_frame(
    reader: asyncio.StreamReader, timeout: float | None = FRAME_TIMEOUT
) -> dict[str, Any]:
    """The next frame's map. Waiting for a frame to start has no limit (links stay open
    between requests), but once it has, its rest must come within ``timeout`` seconds:
    a peer that stalls mid-frame is a FrameError, not a reader held forever."""
    try:
        first = await reader.readexactly(1)
        async with asyncio.timeout(timeout):
            head = first + await reader.readexactly(_LEN.size - 1)
            (size,) = _LEN.unpack(head)
            if size > MAX_FRAME:
                raise FrameError(f"frame of {size} bytes is over the {MAX_FRAME} limit")
            body = await reader.readexactly(size)
    except asyncio.IncompleteReadError:
        raise FrameError("the peer hung up") from None
    except TimeoutError:
        raise FrameError(f"the peer sent part of a frame, then nothing for {timeout:g} s") from None
    return decode_body(body)


def decode_body(body: bytes) -> dict[str, Any]:
    """A frame's msgpack map, within bounds; FrameError for anything else, never another error."""
    try:
        message = msgpack.unpackb(
            body,
            raw=False,
            max_bin_len=MAX_FRAME,
            max_str_len=MAX_FRAME,
            max_array_len=MAX_ITEMS,
            max_map_len=MAX_ITEMS,
            max_ext_len=0,  # pysteer sends no extension types
        )
    except (ValueError, TypeError, OverflowError, RecursionError, msgpack.UnpackException):
        raise FrameError("the peer sent invalid msgpack") from None
    if not isinstance(message, dict):
        raise FrameError("a frame must hold a map")
    if _too_deep(message):
        raise FrameError(f"a frame nests at most {MAX_DEPTH} maps or arrays deep")
    return message


def _too_deep(message: dict[str, Any]) -> bool:
    """Whether containers nest beyond MAX_DEPTH; iterative, so any depth is safe to check."""
    stack: list[tuple[Any, int]] = [(message, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            return True
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values() if isinstance(v, dict | list))
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item if isinstance(v, dict | list))
    return False


def encode_frame(message: dict[str, Any]) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    return _LEN.pack(len(body)) + body


async def write_frame(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
    writer.write(encode_frame(message))
    await writer.drain()
