"""The CLI's side of an agent: its local control socket (JSON lines, root only), or,
from another machine, its mutual-TLS peer listener (``ask_remote``)."""

from __future__ import annotations

import json
import socket
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pysteer.steer.control import LineReader

if TYPE_CHECKING:
    import ssl


class AgentDown(ConnectionError):
    """No agent answers on the socket."""


class AgentRefused(RuntimeError):
    """The agent answered no; the message is its reason."""


def ask(path: Path, cmd: str, *, timeout: float = 10.0, **args: Any) -> dict[str, Any]:
    """One request, one answer."""
    stream = Stream(path, cmd, timeout=timeout, **args)
    try:
        return stream.next()
    finally:
        stream.close()


class Stream:
    """A request on the local socket; its answers arrive one per line (a drain sends many)."""

    def __init__(self, path: Path, cmd: str, *, timeout: float | None = None, **args: Any) -> None:
        self.path, self.timeout = path, timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(path))
            self.sock.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        except BaseException as exc:
            self.sock.close()
            raise self._error(exc) from None
        self.reader = LineReader(self.sock)

    def _error(self, exc: BaseException) -> BaseException:
        if isinstance(exc, FileNotFoundError | ConnectionRefusedError):
            return AgentDown(f"no agent at {self.path}")
        if isinstance(exc, PermissionError):
            return AgentRefused(f"{self.path}: permission denied (the control socket is root's)")
        if isinstance(exc, TimeoutError):
            return AgentDown(f"the agent at {self.path} did not answer within {self.timeout:g} s")
        if isinstance(exc, OSError):
            return AgentDown(f"agent at {self.path}: {exc.strerror or exc}")
        return exc

    def next(self) -> dict[str, Any]:
        try:
            data = self.reader.line()
        except OSError as exc:
            raise self._error(exc) from None
        if not data:
            raise AgentDown(f"the agent at {self.path} hung up")
        try:
            answer = json.loads(data)
        except json.JSONDecodeError:
            raise AgentDown(f"the agent at {self.path} sent no valid answer") from None
        if not answer.get("ok"):
            raise AgentRefused(answer.get("error", "refused"))
        return answer

    def stop(self) -> None:
        """Ask the agent to stop after what is in flight; answers keep coming."""
        self.sock.sendall(b'{"cmd": "stop"}\n')

    def close(self) -> None:
        self.sock.close()


def ask_remote(
    address: tuple[str, int],
    context: ssl.SSLContext,
    node: str,
    cmd: str,
    *,
    timeout: float = 10.0,
    netns: str | None = None,
    names: Collection[str] = (),
    **args: Any,
) -> dict[str, Any]:
    """The same request to a node's agent over its mutual-TLS peer listener (another
    machine). ``context`` carries a cluster certificate; the agent checks it is a node's.

    ``netns``: open the connection inside that network namespace (the node's, on this
    machine), so that its packets never go out of the caller's own namespace."""
    # Only here: the local socket (every other request) needs no TLS, cryptography,
    # msgpack or asyncio (frames), and the CLI starts faster without them.
    import ssl  # noqa: PLC0415

    import msgpack  # noqa: PLC0415

    from pysteer.agent.frames import encode_frame  # noqa: PLC0415
    from pysteer.identity import IdentityError, peer_node  # noqa: PLC0415

    where = f"agent {node} at {address[0]}:{address[1]}"
    if netns is not None:
        where += f" in namespace {netns}"
    request = encode_frame({"op": "control", "request": {"cmd": cmd, **args}})
    try:
        if netns is None:
            raw = socket.create_connection(address, timeout=timeout)
        else:
            from pysteer.netns import call_in  # noqa: PLC0415 - only a lab's file names one

            raw = call_in(netns, socket.create_connection, address, timeout)  # stays there
        with (
            raw,
            context.wrap_socket(raw, server_hostname=node) as sock,
        ):
            peer_node(sock, {node, *names}, node)
            sock.sendall(request)
            head = _read_exactly(sock, 4)
            answer = msgpack.unpackb(_read_exactly(sock, int.from_bytes(head, "big")), raw=False)
    except TimeoutError:
        raise AgentDown(f"{where} did not answer within {timeout:g} s") from None
    except IdentityError as exc:  # an impostor, not a node that is down: say which
        raise AgentDown(f"{where}: refused its certificate: {exc}") from None
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
