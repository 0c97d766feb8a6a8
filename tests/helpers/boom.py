"""A handler that fails on demand (``boom``): what the runtime does when an app raises."""

from __future__ import annotations

from typing import Any

from pysteer.app.handlers import Echo


class Boom(Echo):
    """Echo, except that a line ``boom`` makes it raise."""

    def on_data(self, data: bytes) -> bytes:
        if b"boom" in data:
            raise RuntimeError("the app failed on purpose")
        return data

    def snapshot(self) -> Any:
        return {}
