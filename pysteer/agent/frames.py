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
_LEN = struct.Struct("!I")


class FrameError(ConnectionError):
    """The peer sent something that is not a frame, or hung up."""


async def read_frame(reader: asyncio.StreamReader) -> dict[str, Any]:
    try:
        head = await reader.readexactly(_LEN.size)
        (size,) = _LEN.unpack(head)
        if size > MAX_FRAME:
            raise FrameError(f"frame of {size} bytes is over the {MAX_FRAME} limit")
        body = await reader.readexactly(size)
    except asyncio.IncompleteReadError:
        raise FrameError("the peer hung up") from None
    try:
        message = msgpack.unpackb(body, raw=False)
    except (ValueError, msgpack.UnpackException):
        raise FrameError("the peer sent invalid msgpack") from None
    if not isinstance(message, dict):
        raise FrameError("a frame must hold a map")
    return message


def encode_frame(message: dict[str, Any]) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    return _LEN.pack(len(body)) + body


async def write_frame(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
    writer.write(encode_frame(message))
    await writer.drain()
