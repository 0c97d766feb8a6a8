"""The RPC over asyncio streams: the agents' links (client) and their listeners (server)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from pysteer.rpc.codec import (
    FRAME_TIMEOUT,
    MAX_FRAME,
    Decoder,
    accept,
    check_hello,
    encode,
    encode_answer,
    hello,
    legacy_refusal,
)
from pysteer.rpc.errors import (
    BadFrame,
    LegacyJson,
    ProtocolError,
    Stalled,
    Unreachable,
    VersionMismatch,
    answer_for,
)

READ_SIZE = 1 << 20  # bytes asked of the stream at once (a blob comes in a few reads)
STREAM_LIMIT = 1 << 20  # for StreamReaders the RPC reads: buffered before reading pauses

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any] | None]]


class Connection:
    """One connection's frames, both ways. Not for concurrent readers or writers."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        max_frame: int = MAX_FRAME,
        frame_timeout: float = FRAME_TIMEOUT,
        finite: bool = False,
    ) -> None:
        self.reader, self.writer = reader, writer
        self.decoder = Decoder(max_frame, finite=finite)
        self.frame_timeout = frame_timeout

    @property
    def closing(self) -> bool:
        return self.writer.is_closing()

    def close(self) -> None:
        self.writer.close()

    async def send(self, message: dict[str, Any]) -> None:
        self.writer.write(encode(message))
        await self.writer.drain()

    async def answer(self, answer: dict[str, Any]) -> None:
        """Send a server's answer (an internal error instead, if it cannot be encoded)."""
        self.writer.write(encode_answer(answer))
        await self.writer.drain()

    def send_nowait(self, message: dict[str, Any]) -> None:
        """Queue ``message`` without waiting for the peer to take it (a last word before
        hanging up: a peer that reads nothing cannot hold us)."""
        if not self.writer.is_closing():
            self.writer.write(encode(message))

    async def receive(self) -> dict[str, Any] | None:
        """The next message, or None if the peer hung up between two. Waiting for a frame
        to start has no limit (links stay open between requests; callers bound their
        waits), but once it has, its rest must come within ``frame_timeout`` seconds.
        ProtocolError otherwise, and for garbage (BadFrame: only that frame was bad)."""
        deadline: float | None = None
        loop = asyncio.get_running_loop()
        while (message := self.decoder.next()) is None:
            if deadline is None and self.decoder.pending:
                deadline = loop.time() + self.frame_timeout
            try:
                if deadline is None:
                    data = await self.reader.read(READ_SIZE)
                else:
                    async with asyncio.timeout_at(deadline):
                        data = await self.reader.read(READ_SIZE)
            except TimeoutError:
                raise Stalled(
                    f"the peer sent part of a frame, then nothing for {self.frame_timeout:g} s"
                ) from None
            if not data:
                if self.decoder.pending:
                    raise ProtocolError("the peer hung up inside a frame")
                return None
            self.decoder.feed(data)
        return message

    # --- client ----------------------------------------------------------------------------
    async def hello(self, where: str) -> None:
        """Say hello and check the answer (``where`` names the server in exceptions)."""
        await self.send(hello())
        try:
            answer = await self.receive()
        except ProtocolError as exc:
            raise type(exc)(f"{where}: {exc}") from None
        if answer is None:
            raise Unreachable(f"{where} hung up before it answered the hello")
        check_hello(answer, where)

    async def exchange(self, request: dict[str, Any]) -> dict[str, Any]:
        """One request and its answer, unchecked (``errors.check`` says what it means)."""
        await self.send(request)
        answer = await self.receive()
        if answer is None:
            raise Unreachable("the peer hung up")
        return answer


async def serve_unix(
    path: Path, handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
) -> asyncio.AbstractServer:
    """A local control socket at ``path``, root's only (mode 0600, its directory 0700),
    replacing a stale one."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    old = os.umask(0o177)
    try:
        return await asyncio.start_unix_server(handle, path)
    finally:
        os.umask(old)


async def open_unix(path: str | Path, where: str, timeout: float = 5.0) -> Connection:
    """A client connection to a local control socket, its hello done (OSError, including
    TimeoutError and ProtocolError, if that fails)."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_unix_connection(str(path), limit=STREAM_LIMIT), timeout
    )
    conn = Connection(reader, writer)
    try:
        await asyncio.wait_for(conn.hello(where), timeout)
    except BaseException:
        conn.close()
        raise
    return conn


async def serve_local(conn: Connection, handle: Handler, server: str, log: logging.Logger) -> None:
    """Serve one client of a local control socket until it hangs up, then close: a client
    of another version is refused and logged (an operator must upgrade one side); garbage
    or a stall was answered, and ends the connection quietly."""
    try:
        await serve(conn, handle, server)
    except VersionMismatch as exc:
        log.warning("refused a control client: %s", exc)
    except OSError:
        pass
    finally:
        conn.close()


async def serve(conn: Connection, handle: Handler, server: str) -> None:
    """Serve one client until it hangs up: its hello first, then each request's answer
    from ``handle`` (which returns None when it answered itself, e.g. a stream).

    A frame that holds no valid request is answered as a bad request, and serving goes
    on. A refused hello, garbage, or a stall is answered when it can be, then raised (a
    ProtocolError: the caller logs it and hangs up); a clean hang-up just returns.
    ``server`` names this end in refusals ("this steering daemon"). Numbers in requests
    must be finite."""
    conn.decoder.finite = True
    try:
        first = await conn.receive()
    except LegacyJson:
        conn.writer.write(legacy_refusal(server))
        raise
    except BadFrame as exc:
        conn.send_nowait(answer_for(exc))
        raise
    if first is None:
        return
    try:
        welcome = accept(first, server)
    except VersionMismatch as exc:
        conn.send_nowait(answer_for(exc))
        raise
    await conn.send(welcome)
    while True:
        try:
            request = await conn.receive()
        except BadFrame as exc:
            await conn.answer(answer_for(exc))
            continue
        except ProtocolError as exc:
            conn.send_nowait(answer_for(exc))
            raise
        if request is None:
            return
        answer = await handle(request)
        if answer is not None:
            await conn.answer(answer)
