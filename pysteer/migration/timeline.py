"""A migration's timestamped steps, as JSON without secrets: what happened, and when."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Timeline:
    """Steps in order, each with wall time and milliseconds since the first."""

    steps: list[dict[str, Any]] = field(default_factory=list)
    _t0: float = field(default_factory=time.perf_counter)
    _wall0: float = field(default_factory=time.time)

    def step(self, name: str, **detail: Any) -> float:
        """Record ``name`` now; returns its offset in ms."""
        at = (time.perf_counter() - self._t0) * 1000
        self.steps.append(
            {"step": name, "ms": round(at, 3), "t": round(self._wall0 + at / 1000, 6), **detail}
        )
        return at

    def at(self, name: str) -> float | None:
        for s in self.steps:
            if s["step"] == name:
                return s["ms"]
        return None

    def span(self, first: str, last: str) -> float | None:
        a, b = self.at(first), self.at(last)
        return None if a is None or b is None else round(b - a, 3)

    def to_json(self) -> list[dict[str, Any]]:
        return list(self.steps)
