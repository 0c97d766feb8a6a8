"""The TCP proxy core: bytes relayed both ways, movable once both directions are idle.

For request/response protocols whose backend connection holds no state between
exchanges (docs/proxy.md says exactly when that is safe). The core knows only the
stream: the runtime adds what only the sockets know (nothing unsent or unacknowledged
to the backend, nothing unread from it) before it calls the connection quiet.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from pysteer.app.handlers import HandlerError
from pysteer.proxy.proxyv2 import header
from pysteer.proxy.spec import ProxySpec, RelayCore

HIGH_WATER = 256 * 1024
MAX_COUNT = (1 << 63) - 1


class TcpProxy(RelayCore):
    """One client connection's byte relay (sans-IO: ``clock`` is the only time it reads)."""

    def __init__(
        self,
        spec: ProxySpec,
        client: tuple[str, int],
        local: tuple[str, int],
        tls: bool,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.spec, self.client, self.local, self.clock = spec, client, local, clock
        self.hold = False
        self.not_movable: str | None = None
        self.up = 0  # bytes client -> backend
        self.down = 0  # bytes backend -> client
        self._to_backend = bytearray()
        self._opened = False
        self._done = False
        self._last = clock()

    def on_data(self, data: bytes) -> bytes:
        if data and not self._done:
            self._to_backend += data
            self.up += len(data)
            self._last = self.clock()
        return b""

    def on_backend(self, data: bytes) -> bytes:
        if not data:
            self._done = True  # the backend ended the exchange: so does the client's side
            return b""
        self.down += len(data)
        self._last = self.clock()
        return data

    def backend_output(self) -> bytes:
        out = bytes(self._to_backend)
        self._to_backend.clear()
        return out

    def backend_opened(self, *, fresh: bool = True) -> None:
        self._opened = True
        if self.spec.proxy_protocol and fresh:  # a resumed one had its header
            self._to_backend[:0] = header(self.client, self.local)

    def backend_failed(self, why: str) -> bytes:
        self._done = True  # a byte stream has no error message: the connection ends
        return b""

    def waiting_for_backend(self) -> bool:
        return False  # a byte stream has no notion of an answer owed

    def backend_timed_out(self) -> bytes:
        return b""

    def wants_backend(self) -> bool:
        return not self._opened and not self._done

    def drop_backend(self) -> bool:
        return False

    def finished(self) -> bool:
        return self._done

    def reading_client(self) -> bool:
        return not self._done and len(self._to_backend) < HIGH_WATER

    def at_boundary(self, now: float) -> bool:
        """Quiet both ways for ``idle_ms`` with nothing buffered here (the runtime checks
        the backend socket's queues)."""
        return (
            not self._done
            and self._opened
            and not self._to_backend
            and now - self._last >= self.spec.idle_ms / 1000
        )

    def next_check(self, now: float) -> float | None:
        if self._done:
            return None
        return max(self._last + self.spec.idle_ms / 1000 - now, 0.0)

    def describe(self) -> dict[str, Any]:
        return {"protocol": "tcp", "up": self.up, "down": self.down, "not_movable": None}

    def snapshot(self) -> Any:
        return {"up": self.up, "down": self.down}

    def restore(self, snapshot: Any) -> None:
        if not isinstance(snapshot, dict) or set(snapshot) != {"up", "down"}:
            raise HandlerError("malformed proxy snapshot: not a map of up, down")
        for name in ("up", "down"):
            if type(snapshot[name]) is not int or not 0 <= snapshot[name] <= MAX_COUNT:
                raise HandlerError(f"malformed proxy snapshot: {name} must be a count")
        self.up, self.down = snapshot["up"], snapshot["down"]
        self._last = self.clock()
