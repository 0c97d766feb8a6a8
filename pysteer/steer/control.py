"""The steering daemon's control protocol: one JSON object per line over a unix socket.

Request ``{"cmd": ..., ...}``; answer ``{"ok": true, ...}`` or ``{"ok": false, "error": ...}``.
Commands: flows, hosts, stats, park FLOW (answers what it did before), to FLOW HOST,
pass FLOW [HOST] (replays parked packets to HOST, the host it routes to), forget FLOW,
divert ADDRESS HOST|null (new connections to ADDRESS go to HOST), diversions.
"""

from __future__ import annotations

import json
import math
import re
import socket
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pysteer.paths import RUN_DIR

if TYPE_CHECKING:
    import ssl


def socket_path(name: str) -> Path:
    return RUN_DIR / f"steer-{name}.sock"


class ControlError(RuntimeError):
    """The daemon could not be reached, or refused the request (its message is kept)."""


class RequestError(ControlError):
    """A control line that is not one JSON object within bounds; the message says what is
    wrong and never quotes the line, so it is safe to send back as the answer's error."""


MAX_MESSAGE = 1 << 20


class LineReader:
    """Newline-terminated messages from a socket, at most 1 MiB each, keeping any excess."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buffer = sock, b""

    def line(self) -> bytes:
        """The next message with its newline, or what came before EOF (maybe b"")."""
        while b"\n" not in self.buffer and len(self.buffer) < MAX_MESSAGE:
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, BrokenPipeError):  # a timeout is the caller's
                chunk = b""
            if not chunk:
                data, self.buffer = self.buffer, b""
                return data
            self.buffer += chunk
        head, sep, self.buffer = self.buffer.partition(b"\n")
        return head + sep


MAX_DEPTH = 16  # requests are flat maps; Python's JSON parser recurses, so bound it first
MAX_DIGITS = 20  # a 64-bit integer; int() refuses over 4300 digits with a plain ValueError
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')  # a JSON string, escapes and all
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def _too_deep(text: str) -> bool:
    """Whether ``text`` nests arrays or objects beyond MAX_DEPTH (brackets in strings aside)."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return False
    depth = 0
    for c in _NOT_BRACKET.sub("", _STRING.sub("", text)):
        depth += 1 if c in "[{" else -1
        if depth > MAX_DEPTH:
            return True
    return False


def _integer(literal: str) -> int:
    if len(literal.lstrip("-")) > MAX_DIGITS:
        raise RequestError(f"a request's numbers have at most {MAX_DIGITS} digits")
    return int(literal)


def _real(literal: str) -> float:
    value = float(literal) if len(literal) <= 2 * MAX_DIGITS else math.inf
    if not math.isfinite(value):
        raise RequestError("a request's numbers must be finite and short")
    return value


def _constant(name: str) -> float:
    raise RequestError(f"a request's numbers must be finite, not {name}")


def decode_request(line: bytes | str) -> dict[str, Any]:
    """One control line as the request map it holds, or RequestError (never anything else).

    Every way a line can be bad is refused here, before the daemon looks at it: invalid
    UTF-8, nesting that would make the parser recurse, numbers ``int()`` or JSON cannot
    carry, and anything but an object.
    """
    if isinstance(line, str):
        line = line.encode("utf-8", "surrogatepass")  # a lone surrogate fails below
    if len(line) > MAX_MESSAGE + 1:
        raise RequestError(f"a request is at most {MAX_MESSAGE} bytes")
    try:
        text = bytes(line).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(f"a request must be UTF-8 (bad byte at offset {exc.start})") from None
    if _too_deep(text):
        raise RequestError(f"a request nests at most {MAX_DEPTH} levels deep")
    try:
        req = json.loads(text, parse_int=_integer, parse_float=_real, parse_constant=_constant)
    except json.JSONDecodeError as exc:
        raise RequestError(
            f"requests are one JSON object per line (column {exc.colno}: {exc.msg})"
        ) from None
    except RecursionError:  # not reached within MAX_DEPTH; kept so the contract holds
        raise RequestError(f"a request nests at most {MAX_DEPTH} levels deep") from None
    if not isinstance(req, dict):
        raise RequestError(f"a request must be a JSON object, not {type(req).__name__}")
    return req


def read_line(sock: socket.socket) -> bytes:
    """One newline-terminated message (or what came before EOF), at most 1 MiB."""
    return LineReader(sock).line()


def _exchange(sock: socket.socket, cmd: str, args: dict[str, Any]) -> bytes:
    sock.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
    return read_line(sock)


def request_remote(
    address: tuple[str, int],
    context: ssl.SSLContext,
    server_name: str,
    cmd: str,
    names: Collection[str] = (),
    **args: Any,
) -> dict[str, Any]:
    """The same request, to a daemon's TCP listener over mutual TLS; the daemon must prove
    it is ``server_name``."""
    # Only here: the CLI's unix-socket requests need neither ssl nor cryptography.
    import ssl  # noqa: PLC0415

    from pysteer.identity import peer_node  # noqa: PLC0415

    where = f"{address[0]}:{address[1]}"
    try:
        with (
            socket.create_connection(address, timeout=10) as raw,
            context.wrap_socket(raw, server_hostname=server_name) as sock,
        ):
            peer_node(sock, {server_name, *names}, server_name)
            data = _exchange(sock, cmd, args)
    except (ssl.SSLError, OSError) as exc:
        raise ControlError(f"steering daemon at {where}: {exc}") from None
    return _answer(where, data)


def request(path: Path, cmd: str, timeout: float = 10.0, **args: Any) -> dict[str, Any]:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            data = _exchange(sock, cmd, args)
    except (FileNotFoundError, ConnectionRefusedError):
        raise ControlError(f"no steering daemon at {path} (is `pysteer steer run` up?)") from None
    except OSError as exc:
        raise ControlError(f"steering daemon at {path}: {exc.strerror or exc}") from None
    return _answer(str(path), data)


def _answer(path: str, data: bytes) -> dict[str, Any]:
    try:
        answer = json.loads(data)
    except json.JSONDecodeError:
        raise ControlError(f"steering daemon at {path} sent no valid answer") from None
    if not answer.get("ok"):
        raise ControlError(answer.get("error", "request refused"))
    return answer
