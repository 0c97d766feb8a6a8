"""A minimal WebSocket backend for the proxy tests: answers an Upgrade with 101 (RFC 6455
accept key) and then echoes each text frame the client sends, unmasked, as a server must.
Run as ``python ws_backend.py PORT`` inside a host's namespace."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import sys

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    key = next(
        (
            ln.split(b":", 1)[1].strip()
            for ln in head.split(b"\r\n")
            if ln.lower().startswith(b"sec-websocket-key:")
        ),
        b"",
    )
    accept = base64.b64encode(hashlib.sha1(key + GUID).digest())  # noqa: S324 - RFC 6455
    writer.write(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )
    while True:
        try:
            _first, second = await reader.readexactly(2)
        except asyncio.IncompleteReadError:
            break
        length = second & 0x7F
        mask = await reader.readexactly(4) if second & 0x80 else b"\0\0\0\0"
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(await reader.readexactly(length)))
        writer.write(bytes([0x81, len(payload)]) + payload)  # short text frames only
        await writer.drain()
    writer.close()


async def main(port: int) -> None:
    server = await asyncio.start_server(serve, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
