"""The steering daemon's control protocol: one JSON object per line over a unix socket.

Request ``{"cmd": ..., ...}``; answer ``{"ok": true, ...}`` or ``{"ok": false, "error": ...}``.
Commands: flows, hosts, stats, park FLOW, to FLOW HOST, pass FLOW, forget FLOW.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

RUN_DIR = Path("/run/pysteer")


def socket_path(name: str) -> Path:
    return RUN_DIR / f"steer-{name}.sock"


class ControlError(RuntimeError):
    """The daemon could not be reached, or refused the request (its message is kept)."""


def request(path: Path, cmd: str, timeout: float = 10.0, **args: Any) -> dict[str, Any]:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except (FileNotFoundError, ConnectionRefusedError):
        raise ControlError(f"no steering daemon at {path} (is `pysteer steer run` up?)") from None
    except OSError as exc:
        raise ControlError(f"steering daemon at {path}: {exc.strerror or exc}") from None
    try:
        answer = json.loads(data)
    except json.JSONDecodeError:
        raise ControlError(f"steering daemon at {path} sent no valid answer") from None
    if not answer.get("ok"):
        raise ControlError(answer.get("error", "request refused"))
    return answer
