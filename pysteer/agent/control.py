"""The CLI's side of an agent: its local control socket (JSON lines, root only), or,
from another machine, its mutual-TLS peer listener (``ask_remote``)."""

from __future__ import annotations

import json
import socket
import ssl
from pathlib import Path
from typing import Any

import msgpack

from pysteer.agent.frames import encode_frame
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


def ask_remote(address: tuple[str, int], context: ssl.SSLContext, node: str, cmd: str, *,
               timeout: float = 10.0, **args: Any) -> dict[str, Any]:  # fmt: skip
    """The same request to a node's agent over its mutual-TLS peer listener (another
    machine). ``context`` carries a cluster certificate; the agent checks it is a node's."""
    where = f"agent {node} at {address[0]}:{address[1]}"
    request = encode_frame({"op": "control", "request": {"cmd": cmd, **args}})
    try:
        with (
            socket.create_connection(address, timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=node) as sock,
        ):
            sock.sendall(request)
            head = _read_exactly(sock, 4)
            answer = msgpack.unpackb(_read_exactly(sock, int.from_bytes(head, "big")), raw=False)
    except TimeoutError:
        raise AgentDown(f"{where} did not answer within {timeout:g} s") from None
    except (ssl.SSLError, OSError, EOFError) as exc:
        raise AgentDown(f"{where}: {exc}") from None
    if not isinstance(answer, dict) or not answer.get("ok"):
        raise AgentRefused(answer.get("error", "refused") if isinstance(answer, dict) else "?")
    return answer


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError("the agent hung up")
        data += chunk
    return data
