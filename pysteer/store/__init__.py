"""The cluster's shared state in etcd: which host serves a moved flow (its override),
and the rest several steering nodes must agree on. ``keys`` is the layout and the
codec (sans-IO); ``etcd`` the asyncio adapter over etcd's gRPC API with mutual TLS."""

from pysteer.store.etcd import Conflict, Store, StoreError, StoreUnavailable, WatchGap
from pysteer.store.keys import Override, StoreDataError

__all__ = [
    "Conflict",
    "Override",
    "Store",
    "StoreDataError",
    "StoreError",
    "StoreUnavailable",
    "WatchGap",
]
