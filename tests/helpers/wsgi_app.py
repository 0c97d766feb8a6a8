"""A small WSGI app for the proxy tests, served by waitress on each lab host.

- ``POST /sum``: the request body's length and sha256 (Content-Length or chunked).
- ``GET /delay/S``: answers after S seconds (a request in flight for a while).
- ``GET /bytes/N``: N deterministic bytes (``pattern``).
Every response names the host (``X-App-Host``, from PYSTEER_HOST) and appends a line to
``$PYSTEER_APP_LOG``: host, method, path, client address as the app saw it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

HOST = os.environ.get("PYSTEER_HOST", "?")
LOG = os.environ.get("PYSTEER_APP_LOG")


def pattern(n: int) -> bytes:
    return bytes((i * 31 + 7) % 251 for i in range(n))


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
    status, body = "200 OK", b""
    if method == "POST" and path == "/sum":
        digest, size, stream = hashlib.sha256(), 0, environ["wsgi.input"]
        while chunk := stream.read(65536):
            digest.update(chunk)
            size += len(chunk)
        body = json.dumps({"length": size, "sha256": digest.hexdigest()}).encode()
    elif method == "GET" and path.startswith("/delay/"):
        time.sleep(float(path[7:]))
        body = b"slept\n"
    elif method == "GET" and path.startswith("/bytes/") and path[7:].isdigit():
        body = pattern(int(path[7:]))
    else:
        status, body = "404 Not Found", b"no such thing\n"
    if LOG:
        with open(LOG, "a") as log:
            forwarded = environ.get("HTTP_X_FORWARDED_FOR", "-")
            log.write(f"{HOST} {method} {path} {environ.get('REMOTE_ADDR')} {forwarded}\n")
    start_response(
        status,
        [("Content-Length", str(len(body))), ("X-App-Host", HOST), ("Content-Type", "text/plain")],
    )
    return [body]
