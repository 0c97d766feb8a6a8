"""A pysteer app written from docs/handlers.md: named counters, one command per line.

    add NAME N   -> "NAME=TOTAL"      (N an integer, 0..10**9)
    get NAME     -> "NAME=TOTAL"
    sum          -> "sum=TOTAL over K names"

Its whole state (the counters, and a line cut in the middle) moves with the connection.
Serve it with ``app = "tally:Tally"`` in the cluster file, this file on the agents' path.
"""

from __future__ import annotations

from typing import Any

from pysteer.app.handlers import HandlerError

MAX_NAMES = 1000  # a client cannot grow the state without bound
MAX_LINE = 1024
MAX_VALUE = 10**9


class Tally:
    SNAPSHOT_VERSION = 1  # both nodes must read the same version, or the move is refused
    TICKS = False  # nothing to say unless asked: the runtime need not wake it

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.partial = b""

    def on_connect(self) -> bytes:
        return b"tally ready\n"

    def on_data(self, data: bytes) -> bytes:
        self.partial += data
        out = []
        while b"\n" in self.partial:
            line, self.partial = self.partial.split(b"\n", 1)
            out.append(self._command(line.decode("utf-8", "replace").split()))
        if len(self.partial) > MAX_LINE:
            self.partial = b""
            out.append("error: line too long")
        return "".join(f"{reply}\n" for reply in out).encode()

    def _command(self, words: list[str]) -> str:
        if len(words) == 3 and words[0] == "add" and words[2].isdigit():
            name, value = words[1][:64], int(words[2])
            if value > MAX_VALUE:
                return f"error: at most {MAX_VALUE}"
            if name not in self.counts and len(self.counts) >= MAX_NAMES:
                return f"error: at most {MAX_NAMES} names"
            self.counts[name] = self.counts.get(name, 0) + value
            return f"{name}={self.counts[name]}"
        if len(words) == 2 and words[0] == "get":
            return f"{words[1]}={self.counts.get(words[1], 0)}"
        if words == ["sum"]:
            return f"sum={sum(self.counts.values())} over {len(self.counts)} names"
        return "error: add NAME N | get NAME | sum"

    def on_tick(self, now: float) -> bytes:
        return b""

    def on_close(self) -> None:
        pass

    def snapshot(self) -> Any:
        """Plain msgpack data: what another host needs to continue this connection."""
        return {"counts": dict(self.counts), "partial": self.partial}

    def restore(self, snapshot: Any) -> None:
        """Check everything: the snapshot comes from another host. A HandlerError makes the
        target refuse the move, and the connection stays where it was."""
        if not isinstance(snapshot, dict) or set(snapshot) != {"counts", "partial"}:
            raise HandlerError("malformed tally snapshot: not a map of counts, partial")
        counts, partial = snapshot["counts"], snapshot["partial"]
        if not isinstance(counts, dict) or len(counts) > MAX_NAMES:
            raise HandlerError(f"malformed tally snapshot: counts must map at most {MAX_NAMES}")
        for name, value in counts.items():
            if not isinstance(name, str) or len(name) > 64:
                raise HandlerError("malformed tally snapshot: a name must be text of 64 or less")
            if type(value) is not int or not 0 <= value <= MAX_NAMES * MAX_VALUE:
                raise HandlerError("malformed tally snapshot: a count is out of range")
        if not isinstance(partial, bytes) or len(partial) > MAX_LINE:
            raise HandlerError(
                f"malformed tally snapshot: partial must be {MAX_LINE} bytes at most"
            )
        self.counts, self.partial = dict(counts), partial
