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
    {"op": "put_many", "flows": [F...], "host": H, "by": B} -> {"ok": true, "revision": R}
    {"op": "delete_all"}                -> {"ok": true, "deleted": N}
    {"op": "admission", "node": N}      -> {"ok": true, "admission": [accepting, drained_to]|null}
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

    tasks: list[asyncio.Task] = []

    async def put(req: dict[str, Any]) -> dict[str, Any]:
        o = Override(req["flow"], req["host"], req["by"])
        return {"revision": await store.put_override(o, expect=req.get("expect"))}

    async def listing(_req: dict[str, Any]) -> dict[str, Any]:
        found, revision = await store.overrides()
        return {"overrides": {f: as_json(o) for f, o in found.items()}, "revision": revision}

    async def start_watch(req: dict[str, Any]) -> dict[str, Any]:
        tasks.append(asyncio.create_task(watch(req["from"])))
        await asyncio.sleep(0.2)  # the watch is set up before the next request
        return {}

    async def put_many(req: dict[str, Any]) -> dict[str, Any]:
        batch = [Override(f, req["host"], req["by"]) for f in req["flows"]]
        return {"revision": await store.put_many(batch)}

    async def compact(req: dict[str, Any]) -> dict[str, Any]:
        await store.compact(req["revision"])
        return {}

    async def get(req: dict[str, Any]) -> dict[str, Any]:
        return {"override": as_json(await store.get_override(req["flow"]))}

    async def delete(req: dict[str, Any]) -> dict[str, Any]:
        return {"deleted": await store.delete_override(req["flow"], expect=req.get("expect"))}

    async def delete_all(_req: dict[str, Any]) -> dict[str, Any]:
        return {"deleted": await store.delete_all_overrides()}

    async def admission(req: dict[str, Any]) -> dict[str, Any]:
        found = await store.get_admission(req["node"])
        return {"admission": None if found is None else list(found)}

    async def collected(_req: dict[str, Any]) -> dict[str, Any]:
        return {"changes": list(changes), "gap": gap[0] if gap else None}

    ops = {
        "put": put,
        "get": get,
        "list": listing,
        "delete": delete,
        "watch": start_watch,
        "changes": collected,
        "compact": compact,
        "put_many": put_many,
        "delete_all": delete_all,
        "admission": admission,
    }
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        req = json.loads(line)
        started = time.monotonic()
        try:
            if req.get("op") not in ops:
                raise ValueError(f"unknown op {req.get('op')!r}")
            out = {"ok": True} | await ops[req["op"]](req)
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
