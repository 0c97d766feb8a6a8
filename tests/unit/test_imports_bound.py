"""B bounds the imports it runs at once: past MAX_ACTIVE a move is refused before its blob
is opened or recorded (the source then rolls back; nothing else changes)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from pysteer.agent import imports
from pysteer.agent.imports import Import, Imports
from pysteer.migration.target import Target


class Ledger:
    def __init__(self) -> None:
        self.claimed: list[bytes] = []

    def claim(self, mid: bytes, *, sealed_at: float) -> None:
        self.claimed.append(mid)


def test_a_move_past_the_bound_is_refused_untouched() -> None:
    node = SimpleNamespace(name="b", accepting=True)
    ledger = Ledger()
    counted: list[str] = []
    arriving = Imports(node, ledger, counted.append)  # type: ignore[arg-type]
    for i in range(imports.MAX_ACTIVE):
        mid = i.to_bytes(16, "big")
        arriving.active[mid] = Import(Target(mid=mid, source="a", me="b"), b"")
    answer = asyncio.run(arriving.move("a", b"\xff" * 16, b"sealed"))
    assert answer == {
        "ok": False,
        "error": f"b is busy: {imports.MAX_ACTIVE} imports in progress",
        "code": "aborted",
    }
    assert not ledger.claimed and not counted and len(arriving.active) == imports.MAX_ACTIVE
