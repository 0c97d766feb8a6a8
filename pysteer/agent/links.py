"""The agent's long-lived mTLS connections: to a peer agent and to the steering daemon,
both in pysteer's RPC (``pysteer.rpc``). Kept open between migrations so that a freeze
never waits for a TLS handshake or a hello; a broken link is dialled again on next use.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator, Collection
from typing import Any

from pysteer.identity import IdentityError, peer_node
from pysteer.rpc import aio
from pysteer.rpc.errors import Refused, RpcError, check
from pysteer.rpc.errors import Unreachable as LinkError

__all__ = ["LinkError", "LinkPool", "PeerLink", "Refused", "SteerLink"]

# LinkError: the other side is unreachable, refused us (its certificate, its version, or
# busy), or did not answer in time. Refused: it answered, and said no (``code``, when it
# gives one, is for the caller's logic: e.g. ``committed``, ``aborted``, ``pending``).
# Both come from the RPC's one error map (``pysteer.rpc.errors``).


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
        self._conn: aio.Connection | None = None
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
        """Open the link: TLS, the peer's identity, then the RPC's hello (its version)."""
        if self._conn is not None and not self._conn.closing:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    *self.address,
                    ssl=self.context,
                    server_hostname=self.name,
                    limit=aio.STREAM_LIMIT,
                ),
                timeout,
            )
        except TimeoutError:
            raise LinkError(f"{self.where}: no answer within {timeout:g} s") from None
        except ssl.SSLError as exc:
            raise LinkError(f"{self.where}: TLS refused ({exc.reason or exc})") from None
        except OSError as exc:
            raise LinkError(f"{self.where}: {exc.strerror or exc}") from None
        conn = aio.Connection(reader, writer)
        try:
            peer_node(writer.get_extra_info("ssl_object"), self.names, self.name)
        except IdentityError as exc:
            conn.close()
            raise LinkError(f"{self.where}: refused its certificate: {exc}") from None
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await asyncio.wait_for(conn.hello(self.where), max(deadline - loop.time(), 0.001))
        except TimeoutError:
            conn.close()
            raise LinkError(f"{self.where}: no answer to its hello within {timeout:g} s") from None
        except RpcError:  # its version, busy, garbage: the message says which
            conn.close()
            raise
        except OSError as exc:
            conn.close()
            raise LinkError(f"{self.where}: connection lost ({exc})") from None
        except BaseException:  # cancelled: a link without its hello is no link
            conn.close()
            raise
        self._conn = conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = None

    async def call(self, timeout: float, **request: Any) -> dict[str, Any]:
        """One request and its answer; the link is dropped on any failure."""
        timeout = max(timeout, 0.001)
        async with self._lock:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            await self._connect(timeout)
            assert self._conn is not None  # noqa: S101
            try:
                answer = await asyncio.wait_for(
                    self._conn.exchange(request), max(deadline - loop.time(), 0.001)
                )
            except TimeoutError:
                self.close()
                raise LinkError(f"{self.where}: no answer within {timeout:g} s") from None
            except OSError as exc:  # the RPC's Unreachable and ProtocolError among them
                self.close()
                raise LinkError(f"{self.where}: connection lost ({exc})") from None
            except asyncio.CancelledError:  # its answer would come to the next request
                self.close()
                raise
        return check(answer, self.name)


class PeerLink(_Link):
    """To another node's agent; requests are maps with an ``op``."""

    what = "agent"


class SteerLink(_Link):
    """To the steering daemon's mTLS listener; requests are maps with a ``cmd``."""

    what = "steering daemon"


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
