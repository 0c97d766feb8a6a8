"""A migration's timestamped steps, as JSON without secrets: what happened, and when."""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Iterable
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


def spread(values: Iterable[float]) -> dict[str, Any]:
    """n, p50, p90, p99 and max, rounded to the microsecond (for milliseconds)."""
    ordered = sorted(values)
    if not ordered:
        return {"n": 0, "p50": None, "p90": None, "p99": None, "max": None}
    at = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {
        "n": len(ordered),
        **{f"p{round(q * 100)}": round(at(q), 3) for q in (0.5, 0.9, 0.99)},
        "max": round(ordered[-1], 3),
    }


def step_durations(timelines: Iterable[Any]) -> dict[str, dict[str, Any]]:
    """Milliseconds between consecutive steps of many migrations' timelines, per pair of
    step names (``"park->parked"``), as ``spread``s: where a drain's time goes.

    The pairs come from the data (a rollback only adds its own pairs), ordered by where
    they start in the median timeline."""
    spans: dict[str, list[float]] = {}
    starts: dict[str, list[float]] = {}
    for timeline in timelines:
        if not isinstance(timeline, list):
            continue
        steps = [s for s in timeline if isinstance(s, dict) and "step" in s and "ms" in s]
        for a, b in itertools.pairwise(steps):
            key = f"{a['step']}->{b['step']}"
            spans.setdefault(key, []).append(b["ms"] - a["ms"])
            starts.setdefault(key, []).append(a["ms"])
    order = sorted(spans, key=lambda k: statistics.median(starts[k]))
    return {k: spread(spans[k]) for k in order}
