"""The agent's long-lived mTLS connections: to a peer agent (msgpack frames) and to the
steering daemon (JSON lines). Kept open between migrations so that a freeze never waits
for a TLS handshake; a broken link is dialled again on next use.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
from collections.abc import AsyncIterator, Collection
from typing import Any

from pysteer.agent.frames import FrameError, read_frame, write_frame
from pysteer.identity import IdentityError, peer_node

LINE_LIMIT = 2 << 20  # the steering daemon's answers (a sync's lists) fit in one read


class LinkError(ConnectionError):
    """The other side is unreachable, refused us, or did not answer in time."""


class Refused(RuntimeError):
    """The other side answered, and said no (its reason is the message; ``code``, when it
    gives one, is for the caller's logic: e.g. ``committed``, ``aborted``, ``pending``)."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class _Link:
    what = "link"

    def __init__(
        self,
        name: str,
        address: tuple[str, int],
        context: ssl.SSLContext,
        names: Collection[str] = (),
    ) -> None:
        """``names``: every identity of the cluster (the peer must be ``name``, and its
        certificate may name no other of them)."""
        self.name, self.address, self.context = name, address, context
        self.names = {name, *names}
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()

    @property
    def where(self) -> str:
        host, port = self.address
        return f"{self.what} {self.name} at {'[' + host + ']' if ':' in host else host}:{port}"

    async def connect(self, timeout: float) -> None:
        """Open the link now (a no-op if it is open): its handshake is then out of the way."""
        async with self._lock:
            await self._connect(timeout)

    async def _connect(self, timeout: float) -> None:
        if self._writer is not None and not self._writer.is_closing():
            return
        try:
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_connection(
                    *self.address, ssl=self.context, server_hostname=self.name, limit=LINE_LIMIT
                ),
                timeout,
            )
        except TimeoutError:
            raise LinkError(f"{self.where}: no answer within {timeout:g} s") from None
        except ssl.SSLError as exc:
            raise LinkError(f"{self.where}: TLS refused ({exc.reason or exc})") from None
        except OSError as exc:
            raise LinkError(f"{self.where}: {exc.strerror or exc}") from None
        try:
            peer_node(self._writer.get_extra_info("ssl_object"), self.names, self.name)
        except IdentityError as exc:
            self.close()
            raise LinkError(f"{self.where}: refused its certificate: {exc}") from None
        sock = self._writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None

    async def call(self, timeout: float, **request: Any) -> dict[str, Any]:
        """One request and its answer; the link is dropped on any failure."""
        timeout = max(timeout, 0.001)
        async with self._lock:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            await self._connect(timeout)
            try:
                answer = await asyncio.wait_for(
                    self._exchange(request), max(deadline - loop.time(), 0.001)
                )
            except TimeoutError:
                self.close()
                raise LinkError(f"{self.where}: no answer within {timeout:g} s") from None
            except (OSError, FrameError, ValueError) as exc:
                self.close()
                raise LinkError(f"{self.where}: connection lost ({exc})") from None
        if not answer.get("ok"):
            code = answer.get("code")
            raise Refused(
                f"{self.name}: {answer.get('error', 'refused')}",
                code if isinstance(code, str) else None,
            )
        return answer

    async def _exchange(self, request: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError


class PeerLink(_Link):
    """To another node's agent; requests are msgpack maps with an ``op``."""

    what = "agent"

    async def _exchange(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self._reader is not None and self._writer is not None  # noqa: S101
        await write_frame(self._writer, request)
        return await read_frame(self._reader)


class SteerLink(_Link):
    """To the steering daemon's mTLS listener; requests are JSON lines with a ``cmd``."""

    what = "steering daemon"

    async def _exchange(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self._reader is not None and self._writer is not None  # noqa: S101
        self._writer.write(json.dumps(request).encode() + b"\n")
        await self._writer.drain()
        line = await self._reader.readline()
        if not line.endswith(b"\n"):
            raise FrameError("the steering daemon hung up")
        return json.loads(line)


class LinkPool:
    """Up to ``size`` links to one peer, so concurrent migrations (a drain) do not queue
    behind each other's round trips. Each request leases a link for its round trip only,
    so nothing waits on a link held by a migration that is itself waiting."""

    def __init__(self, make: Any, size: int = 8) -> None:
        self._make, self.size = make, size
        self._idle: list[_Link] = []
        self._count = 0
        self._free = asyncio.Condition()
        self.name = make().name  # a throwaway link, never connected: for messages

    @contextlib.asynccontextmanager
    async def lease(self) -> AsyncIterator[Any]:
        async with self._free:
            while not self._idle and self._count >= self.size:
                await self._free.wait()
            if self._idle:
                link = self._idle.pop()
            else:
                link = self._make()
                self._count += 1
        try:
            yield link
        finally:
            async with self._free:
                self._idle.append(link)
                self._free.notify()

    async def call(self, timeout: float, **request: Any) -> dict[str, Any]:
        async with self.lease() as link:
            return await link.call(timeout, **request)

    async def connect(self, timeout: float) -> None:
        """Have an open link ready (its handshake out of the way of what follows)."""
        async with self.lease() as link:
            await link.connect(timeout)

    def close(self) -> None:
        for link in self._idle:
            link.close()
