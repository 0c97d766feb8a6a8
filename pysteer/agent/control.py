"""The CLI's side of an agent's local control socket (JSON lines, root only)."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from pysteer.steer.control import LineReader


class AgentDown(ConnectionError):
    """No agent answers on the socket."""


class AgentRefused(RuntimeError):
    """The agent answered no; the message is its reason."""


def ask(path: Path, cmd: str, *, timeout: float = 10.0, **args: Any) -> dict[str, Any]:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
            data = LineReader(sock).line()
    except (FileNotFoundError, ConnectionRefusedError):
        raise AgentDown(f"no agent at {path}") from None
    except TimeoutError:
        raise AgentDown(f"the agent at {path} did not answer within {timeout:g} s") from None
    except PermissionError:
        raise AgentRefused(f"{path}: permission denied (the control socket is root's)") from None
    except OSError as exc:
        raise AgentDown(f"agent at {path}: {exc.strerror or exc}") from None
    try:
        answer = json.loads(data)
    except json.JSONDecodeError:
        raise AgentDown(f"the agent at {path} sent no valid answer") from None
    if not answer.get("ok"):
        raise AgentRefused(answer.get("error", "refused"))
    return answer


class Stream:
    """A long request (a drain): its answers arrive one per line until the final one."""

    def __init__(self, path: Path, cmd: str, **args: Any) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            self.sock.close()
            raise AgentDown(f"no agent at {path}") from None
        except PermissionError:
            self.sock.close()
            raise AgentRefused(
                f"{path}: permission denied (the control socket is root's)"
            ) from None
        self.sock.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        self.reader = LineReader(self.sock)

    def next(self) -> dict[str, Any]:
        data = self.reader.line()
        if not data:
            raise AgentDown(f"the agent at {self.path} hung up")
        answer = json.loads(data)
        if not answer.get("ok"):
            raise AgentRefused(answer.get("error", "refused"))
        return answer

    def stop(self) -> None:
        """Ask the agent to stop after what is in flight; answers keep coming."""
        self.sock.sendall(b'{"cmd": "stop"}\n')

    def close(self) -> None:
        self.sock.close()
