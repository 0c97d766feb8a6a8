"""The target's ledger of imports: each migration id imported once, its outcome kept.

B fences imports with it (a replayed blob is refused) and answers A's ``outcome``
question from it. It is kept in a file under the agent's run directory, so a restarted
agent still refuses a replay and still knows what it committed. The file is append-only
(one line per change) and rewritten smaller when it grows; entries older than ``keep``
seconds go then (a blob older than 60 s is refused by age anyway).

The file lives on tmpfs (``/run``): a reboot empties it, and a blob imported before the
reboot could be replayed after it. So the ledger has an *epoch*, the time it started,
kept in its file's first line (``epoch <time>``) and so unchanged by an agent restart: a
blob sealed before the epoch is refused, as the ledger cannot know whether it was imported.
With the blob's 60 s age bound, that closes the reboot window. The comparison is between
the source's clock (the blob's time) and the target's: a source whose clock is d seconds
behind sees its blobs refused for the first d seconds of a new ledger (the safe side).

Outcomes: ``prepared`` (restored, still frozen), ``claiming`` (thawed, asking the
steering node for the flow), ``committed`` (serving here) and ``aborted`` (discarded,
never served). After a restart, ``prepared`` entries are ``aborted`` (a frozen socket
dies silently with its process) and ``claiming`` ones ``lost``: the steering node's
decision says whether the flow was taken, and if it was, it died with the process.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from pathlib import Path

log = logging.getLogger("pysteer.agent")

OUTCOMES = ("prepared", "claiming", "committed", "aborted", "lost")
_AFTER_RESTART = {"prepared": "aborted", "claiming": "lost"}


class LedgerError(ValueError):
    """A migration id the ledger refuses (seen before, or sealed before its epoch)."""


class Ledger:
    def __init__(
        self, path: Path | None = None, *, keep: float = 600.0, limit: int = 200_000
    ) -> None:
        """``path``: the file (None: memory only). ``limit`` bounds the entries kept."""
        self.path, self.keep, self.limit = path, keep, limit
        self.epoch = time.time()  # when this ledger started: refuses blobs sealed before
        self._seen: dict[bytes, tuple[str, float]] = {}  # id -> (outcome, when)
        self._lock = threading.Lock()
        self._lines = 0
        self._file = None
        if path is not None:
            self._load(path)

    def _load(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        changed = 0
        epoch = None
        with contextlib.suppress(FileNotFoundError), path.open() as f:
            for line in f:
                parts = line.split()
                if len(parts) == 2 and parts[0] == "epoch" and epoch is None:
                    with contextlib.suppress(ValueError):
                        epoch = float(parts[1])
                    continue
                if len(parts) != 3 or parts[1] not in OUTCOMES:
                    continue  # a torn last line after a crash
                try:
                    mid, when = bytes.fromhex(parts[0]), float(parts[2])
                except ValueError:
                    continue
                if len(mid) == 16:
                    self._seen[mid] = (parts[1], when)
        for mid, (outcome, when) in list(self._seen.items()):
            if outcome in _AFTER_RESTART:
                self._seen[mid] = (_AFTER_RESTART[outcome], when)
                changed += 1
        if changed:
            log.warning(
                "ledger: %d import(s) were in flight when the agent stopped: "
                "their sockets died with it",
                changed,
            )
        if epoch is not None and math.isfinite(epoch):
            self.epoch = epoch  # a restart of the agent, not of the machine: same ledger
            if epoch > time.time() + 1:
                log.warning(
                    "ledger: it started %.0f s in the future (the clock went back): "
                    "imports sealed before then are refused",
                    epoch - time.time(),
                )
        else:
            log.info("ledger %s starts afresh: imports sealed before now are refused", path)
        self._rewrite()

    def _rewrite(self) -> None:
        """Write the live entries afresh (dropping old ones), atomically."""
        assert self.path is not None  # noqa: S101
        cutoff = time.time() - self.keep
        self._seen = {m: v for m, v in self._seen.items() if v[1] >= cutoff}
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"epoch {self.epoch!r}\n")
            f.writelines(f"{m.hex()} {o} {t:.3f}\n" for m, (o, t) in self._seen.items())
        os.replace(tmp, self.path)
        if self._file is not None:
            self._file.close()
        self._file = self.path.open("a")
        self._lines = len(self._seen)

    def _record(self, mid: bytes, outcome: str) -> None:
        now = time.time()
        self._seen[mid] = (outcome, now)
        if len(self._seen) > self.limit:  # oldest first
            del self._seen[next(iter(self._seen))]
        if self._file is None:
            return
        self._file.write(f"{mid.hex()} {outcome} {now:.3f}\n")
        self._file.flush()
        self._lines += 1
        if self._lines > 2 * len(self._seen) + 1000:
            self._rewrite()

    def claim(self, mid: bytes, *, sealed_at: float) -> None:
        """Record ``mid`` as prepared; LedgerError if it was seen before (a replay), or
        sealed (``sealed_at``, the blob's time) before this ledger started: it may have
        been imported into one lost since, at a reboot."""
        with self._lock:
            if not sealed_at >= self.epoch:  # NaN too
                raise LedgerError(
                    f"migration {mid.hex()} was sealed before this node's import "
                    "ledger started (a replay from before a reboot?)"
                )
            if mid in self._seen:
                raise LedgerError(f"migration {mid.hex()} was already imported (replay?)")
            self._record(mid, "prepared")

    def decide(self, mid: bytes, outcome: str) -> None:
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}")
        with self._lock:
            self._record(mid, outcome)

    def outcome(self, mid: bytes) -> str | None:
        with self._lock:
            entry = self._seen.get(mid)
        return entry[0] if entry else None

    def __len__(self) -> int:
        return len(self._seen)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
