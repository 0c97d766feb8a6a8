"""A shared-store client for the tests, run inside a lab namespace (so that gRPC's own
threads, which open its sockets, are in the lab too): one JSON request per stdin line,
one JSON answer per stdout line.

    {"op": "put", "flow": F, "host": H, "by": B, "expect": N|null} -> {"ok": true, "revision": R}
    {"op": "get", "flow": F}            -> {"ok": true, "override": {...}|null}
    {"op": "list"}                      -> {"ok": true, "overrides": {...}, "revision": R}
    {"op": "delete", "flow": F, "expect": N|null} -> {"ok": true, "deleted": bool}
    {"op": "watch", "from": R}          -> {"ok": true} (changes collected in the background)
    {"op": "changes"}                   -> {"ok": true, "changes": [...], "gap": str|null}
    {"op": "compact", "revision": R}    -> {"ok": true}
An error is {"ok": false, "error": CLASS, "message": ..., "seconds": how long it took}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from pysteer.store import Override, Store, StoreError, WatchGap


def as_json(o: Override | None) -> dict[str, Any] | None:
    return (
        None if o is None else {"flow": o.flow, "host": o.host, "by": o.by, "revision": o.revision}
    )


async def main(args: argparse.Namespace) -> None:
    endpoints = [(e.rsplit(":", 1)[0], int(e.rsplit(":", 1)[1])) for e in args.endpoint]
    store = Store(
        endpoints,
        args.cluster,
        ca=Path(args.ca).read_bytes(),
        cert=Path(args.cert).read_bytes(),
        key=Path(args.key).read_bytes(),
        timeout=args.timeout,
    )
    changes: list[dict[str, Any]] = []
    gap: list[str] = []

    async def watch(start: int) -> None:
        try:
            async for c in store.watch_overrides(start):
                changes.append(
                    {"flow": c.flow, "override": as_json(c.override), "revision": c.revision}
                )
        except WatchGap as exc:
            gap.append(str(exc))

    tasks = []
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        req = json.loads(line)
        started = time.monotonic()
        try:
            op = req["op"]
            if op == "put":
                o = Override(req["flow"], req["host"], req["by"])
                answer = {"revision": await store.put_override(o, expect=req.get("expect"))}
            elif op == "get":
                answer = {"override": as_json(await store.get_override(req["flow"]))}
            elif op == "list":
                found, revision = await store.overrides()
                answer = {
                    "overrides": {f: as_json(o) for f, o in found.items()},
                    "revision": revision,
                }
            elif op == "delete":
                answer = {
                    "deleted": await store.delete_override(req["flow"], expect=req.get("expect"))
                }
            elif op == "watch":
                tasks.append(asyncio.create_task(watch(req["from"])))
                await asyncio.sleep(0.2)  # the watch is set up before the next request
                answer = {}
            elif op == "changes":
                answer = {"changes": list(changes), "gap": gap[0] if gap else None}
            elif op == "compact":
                await store.compact(req["revision"])
                answer = {}
            else:
                raise ValueError(f"unknown op {op!r}")
            out = {"ok": True} | answer
        except (StoreError, ValueError) as exc:
            out = {"ok": False, "error": type(exc).__name__, "message": str(exc)}
        out["seconds"] = round(time.monotonic() - started, 3)
        print(json.dumps(out), flush=True)
    for t in tasks:
        t.cancel()
    await store.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--endpoint", action="append", required=True)
    p.add_argument("--cluster", default="lab")
    p.add_argument("--ca", required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--timeout", type=float, default=2.0)
    asyncio.run(main(p.parse_args()))
