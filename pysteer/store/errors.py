"""The shared store's errors: a module of their own, so that what only catches them
(the agent's move steps, the CLI) does not load gRPC."""

from __future__ import annotations

from pysteer.store.keys import Override


class StoreError(RuntimeError):
    """The shared store refused or failed an operation; the message says which."""


class StoreUnavailable(StoreError):
    """No answer from the store (down, unreachable, or without quorum) in time."""


class Conflict(StoreError):
    """A compare-and-set lost: the key changed since it was read. ``current`` is what is
    there now (None: nothing)."""

    def __init__(self, message: str, current: Override | None) -> None:
        super().__init__(message)
        self.current = current


class WatchGap(StoreError):
    """The watch cannot go on from where it was (history compacted, or the watch
    broke): read everything again, then watch from there."""
