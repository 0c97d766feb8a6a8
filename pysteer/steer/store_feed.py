"""The steering daemon's link to the shared store: a child process that reads etcd and
a thread that applies what it reads.

The daemon runs in the root namespace and enters the steering node's namespace thread
by thread; gRPC opens its sockets from threads of its own, which would stay in the root
namespace and send a lab address out of the default route. So the etcd client runs as a
child process started inside the namespace (``ip netns exec``). It reads every override,
then watches from the next revision, and on a watch gap reads everything again; it
writes msgpack frames to its stdout:

    {"t": "part", "items": [[flow, host], ...], "last": bool, "rev": R,
     "diversions": [[vip, host], ...] (the last part only)}
    {"t": "change", "kind": "override" | "diversion", "flow": F or VIP, "host": H | None,
     "rev": R}
    {"t": "gap" | "down" | "bad", "why": TEXT}

The daemon's side (``Feed``) feeds them to a ``Mirror`` and applies its ops to the
steerer. A child that dies is started again; the maps stay as they are meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import msgpack

from pysteer import netns
from pysteer.deathsig import die_with_parent
from pysteer.steer.mirror import DIVERT, SET, UNDIVERT, UNSET, Mirror, Op

log = logging.getLogger("pysteer.steer")

PART = 5000  # overrides per frame of a full read
RETRY_MAX = 5.0  # seconds between attempts while the store does not answer
MAX_FRAME = 4 << 20
Preload = tuple[dict[str, str], dict[str, str]]  # overrides, diversions
PROBE = 1.0  # seconds between the reader's checks that the store has a leader


# --- the child: etcd -> frames ----------------------------------------------------------------
def _send(out: IO[bytes], frame: dict[str, Any]) -> None:
    out.write(msgpack.packb(frame))
    out.flush()


async def _feed(args: argparse.Namespace, out: IO[bytes]) -> None:
    from pysteer.store.errors import StoreError  # noqa: PLC0415
    from pysteer.store.etcd import Store  # noqa: PLC0415 - gRPC in the child only

    endpoints = []
    for text in args.endpoint:
        host, _, port = text.rpartition(":")
        endpoints.append((host.strip("[]"), int(port)))
    store = Store(
        endpoints,
        args.cluster,
        ca=Path(args.ca).read_bytes(),
        cert=Path(args.cert).read_bytes(),
        key=Path(args.key).read_bytes(),
        timeout=args.timeout,
    )
    delay = 0.2
    while True:
        try:
            found, routes, revision = await store.state(
                bad=lambda exc: _send(out, {"t": "bad", "why": str(exc)[:300]})
            )
        except StoreError as exc:
            _send(out, {"t": "down", "why": str(exc)[:300]})
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)
            continue
        delay = 0.2
        items = [[o.flow, o.host] for o in found.values()]
        diversions = [[d.address, d.host] for d in routes.values()]
        for i in range(0, max(len(items), 1), PART):
            last = i + PART >= len(items)
            frame = {"t": "part", "items": items[i : i + PART], "last": last, "rev": revision}
            _send(out, frame | ({"diversions": diversions} if last else {}))
        watching = asyncio.ensure_future(_watch(store, revision, out))
        try:
            why = await _probe(store, watching)
        finally:
            watching.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watching
        if why is not None:  # the store lost its quorum: the watch would just go silent
            _send(out, {"t": "down", "why": why[:300]})
        await asyncio.sleep(0.1)


async def _watch(store: Any, revision: int, out: IO[bytes]) -> None:
    from pysteer.store.errors import StoreError, WatchGap  # noqa: PLC0415

    try:
        async for c in store.watch_state(revision + 1):
            frame = {"t": "change", "kind": c.kind, "flow": c.key, "host": c.host}
            _send(out, frame | {"rev": c.revision})
    except WatchGap as exc:
        _send(out, {"t": "gap", "why": str(exc)[:300]})
    except StoreError as exc:  # a bad value in the watch: read everything again
        _send(out, {"t": "bad", "why": str(exc)[:300]})
        _send(out, {"t": "gap", "why": "a bad value in the watch"})


async def _probe(store: Any, watching: asyncio.Future) -> str | None:
    """Until the watch ends: every PROBE seconds, is there a leader? A watch on a member
    without quorum stays open and silent, so a steering node would not know it is
    behind. None: the watch ended (a gap); else why the store is down."""
    from pysteer.store.errors import StoreError  # noqa: PLC0415

    while not watching.done():
        await asyncio.wait({watching}, timeout=PROBE)
        if watching.done():
            return None
        try:
            if await store.leader() == 0:
                return "etcd: the member has no leader (no quorum)"
        except StoreError as exc:
            return str(exc)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pysteer.steer.store_feed", description=__doc__)
    parser.add_argument("--endpoint", action="append", required=True)
    parser.add_argument("--cluster", required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--timeout", type=float, default=2.0)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with contextlib.suppress(KeyboardInterrupt, BrokenPipeError):
        asyncio.run(_feed(args, sys.stdout.buffer))
    return 0


# --- the daemon's side: frames -> mirror -> steerer ------------------------------------------
class Feed:
    """Starts the child, reads its frames, keeps the mirror, and applies the mirror's ops
    with ``apply`` once ``attach`` gave it one (before that, only the mirror learns)."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.mirror = Mirror()
        self.lock = threading.Lock()
        self.loaded = threading.Event()
        self._apply: Callable[[Op], str] | None = None
        self._stop = threading.Event()
        self._proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self.results: dict[str, int] = {}
        self._thread = threading.Thread(target=self._run, name="store-feed", daemon=True)

    def start(self) -> None:
        self._proc = self._spawn()  # from the caller's thread: see die_with_parent
        self._thread.start()

    def _spawn(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            preexec_fn=die_with_parent(signal.SIGKILL),  # noqa: PLW1509 - prctl only
        )

    def attach(self, apply: Callable[[Op], str], preloaded: Preload) -> None:
        """From now on, apply every op; first, whatever changed since ``preloaded``."""
        with self.lock:
            self._apply = apply
            (before, routes_before), m = preloaded, self.mirror
            ops = [Op(SET, f, h) for f, h in m.known.items() if before.get(f) != h]
            ops += [Op(UNSET, f, h) for f, h in before.items() if f not in m.known]
            routes = m.diversions
            ops += [Op(DIVERT, a, h) for a, h in routes.items() if routes_before.get(a) != h]
            ops += [Op(UNDIVERT, a, h) for a, h in routes_before.items() if a not in routes]
            for op in ops:
                self._count(apply(op))

    def _count(self, result: str) -> None:
        self.results[result] = self.results.get(result, 0) + 1

    def close(self) -> None:
        self._stop.set()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(2)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def report(self) -> dict[str, Any]:
        with self.lock:
            return self.mirror.report() | {"restarts": self.restarts, "applied": dict(self.results)}

    def _run(self) -> None:
        while not self._stop.is_set():
            proc = self._proc
            assert proc is not None and proc.stdout is not None  # noqa: S101
            self._read(proc.stdout)
            if self._stop.is_set():
                return
            proc.wait()
            with self.lock:
                self.mirror.down(f"the store reader exited ({proc.returncode})")
            log.error("store: the etcd reader exited (%s); starting it again", proc.returncode)
            self.restarts += 1
            time.sleep(1.0)
            self._proc = self._spawn()

    def _read(self, stdout: IO[bytes]) -> None:
        unpacker = msgpack.Unpacker(raw=False, max_buffer_size=MAX_FRAME)
        while True:
            chunk = stdout.read1(65536)  # type: ignore[attr-defined]
            if not chunk:
                return
            unpacker.feed(chunk)
            for frame in unpacker:
                try:
                    self._frame(frame)
                except Exception:  # never let one frame end the feed
                    log.exception("store: a frame could not be applied")

    def _frame(self, frame: dict[str, Any]) -> None:
        t = frame.get("t")
        with self.lock:
            m = self.mirror
            if t == "part":
                items = [(str(f), str(h)) for f, h in frame["items"]]
                routes = {str(a): str(h) for a, h in frame.get("diversions", [])}
                ops = m.part(
                    items, last=bool(frame["last"]), revision=int(frame["rev"]), diversions=routes
                )
                if frame["last"]:
                    log.info(
                        "store: %d overrides, %d diversions at revision %d",
                        len(m.known),
                        len(m.diversions),
                        m.revision,
                    )
            elif t == "change":
                host = frame.get("host")
                ops = m.change(
                    str(frame["flow"]),
                    None if host is None else str(host),
                    int(frame["rev"]),
                    kind=str(frame.get("kind", "override")),
                )
            elif t == "gap":
                m.gap(str(frame.get("why")))
                log.warning("store: watch gap (%s); reading everything again", m.why)
                return
            elif t == "down":
                was = m.state
                m.down(str(frame.get("why")))
                if was != "down":
                    log.error("store: unavailable (%s); steering goes on from the maps", m.why)
                return
            else:
                m.bad()
                log.error("store: %s", frame.get("why"))
                return
            if self._apply is not None:
                for op in ops:
                    self._count(self._apply(op))
        if m.loaded:
            self.loaded.set()

    def preload(self) -> Preload:
        """What the store says now (flow -> host, VIP -> host), for a steerer to load
        before attaching."""
        with self.lock:
            return dict(self.mirror.known), dict(self.mirror.diversions)


def feed_argv(
    namespace: str | None,
    endpoints: list[str],
    cluster: str,
    *,
    ca: Path,
    cert: Path,
    key: Path,
    timeout: float,
) -> list[str]:
    argv = [sys.executable, "-m", "pysteer.steer.store_feed", "--cluster", cluster]
    for e in endpoints:
        argv += ["--endpoint", e]
    argv += ["--ca", str(ca), "--cert", str(cert), "--key", str(key), "--timeout", str(timeout)]
    return netns.exec_argv(namespace, argv) if namespace else argv


if __name__ == "__main__":
    sys.exit(main())
