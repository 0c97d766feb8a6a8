"""The cluster's shared state in etcd: which host serves a moved flow (its override),
and the rest several steering nodes must agree on. ``keys`` is the layout and the
codec (sans-IO); ``etcd`` the asyncio adapter over etcd's gRPC API with mutual TLS,
loaded on first use of ``Store`` (gRPC is heavy, and most users only catch errors)."""

from __future__ import annotations

from typing import Any

from pysteer.store.errors import Conflict, StoreError, StoreUnavailable, WatchGap
from pysteer.store.keys import Override, StoreDataError

__all__ = [
    "Change",
    "Conflict",
    "Override",
    "Store",
    "StoreDataError",
    "StoreError",
    "StoreUnavailable",
    "WatchGap",
]


def __getattr__(name: str) -> Any:
    if name in ("Store", "Change"):
        from pysteer.store import etcd  # noqa: PLC0415

        return getattr(etcd, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
