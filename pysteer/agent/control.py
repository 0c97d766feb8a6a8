"""The CLI's side of an agent: its local control socket (root only), or, from another
machine, its mutual-TLS peer listener (``ask_remote``). Both speak pysteer's RPC
(``pysteer.rpc``); its error map decides what an answer means."""

from __future__ import annotations

import socket
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pysteer.rpc.errors import Refused, RpcError, Unreachable

if TYPE_CHECKING:
    import ssl

    from pysteer.rpc.blocking import Client


class AgentDown(Unreachable):
    """No agent answers on the socket (or none that speaks this version)."""


class AgentSilent(AgentDown):
    """An agent is there (its socket takes the connection) but answers nothing in time:
    stopped (SIGSTOP), or overloaded."""


class AgentRefused(Refused):
    """The agent answered no; the message is its reason (``code``, the error map's)."""


def ask(path: Path, cmd: str, *, timeout: float = 10.0, **args: Any) -> dict[str, Any]:
    """One request, one answer."""
    stream = Stream(path, cmd, timeout=timeout, **args)
    try:
        return stream.next()
    finally:
        stream.close()


def _client(sock: socket.socket, where: str) -> Client:
    # Only once an agent is there: a command that finds none needs no msgpack.
    from pysteer.rpc.blocking import Client  # noqa: PLC0415

    return Client(sock, where)


def _mapped(exc: RpcError) -> AgentDown | AgentRefused:
    """The CLI's exception for what the RPC's error map said."""
    if isinstance(exc, Unreachable):
        return AgentDown(str(exc), exc.code)
    return AgentRefused(str(exc), exc.code)


class Stream:
    """A request on the local socket; its answers arrive one by one (a drain sends many)."""

    def __init__(self, path: Path, cmd: str, *, timeout: float | None = None, **args: Any) -> None:
        self.path, self.timeout = path, timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(path))
            self.client = _client(self.sock, f"the agent at {path}")
            self.client.send({"cmd": cmd, **args})
        except BaseException as exc:
            self.sock.close()
            raise self._error(exc) from None

    def _error(self, exc: BaseException) -> BaseException:
        if isinstance(exc, RpcError):
            return _mapped(exc)
        if isinstance(exc, FileNotFoundError | ConnectionRefusedError):
            return AgentDown(f"no agent at {self.path}")
        if isinstance(exc, PermissionError):
            return AgentRefused(f"{self.path}: permission denied (the control socket is root's)")
        if isinstance(exc, TimeoutError):
            return AgentSilent(
                f"the agent at {self.path} took the connection but answered nothing within "
                f"{self.timeout:g} s (stopped, or overloaded?)"
            )
        if isinstance(exc, OSError):
            return AgentDown(f"agent at {self.path}: {exc.strerror or exc}")
        return exc

    def next(self) -> dict[str, Any]:
        try:
            return self.client.receive()
        except (RpcError, OSError) as exc:
            raise self._error(exc) from None

    def stop(self) -> None:
        """Ask the agent to stop after what is in flight; answers keep coming."""
        self.client.send({"cmd": "stop"})

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
    # Only here: the local socket (every other request) needs no TLS or cryptography, and
    # the CLI starts faster without them.
    import ssl  # noqa: PLC0415

    from pysteer.identity import IdentityError, peer_node  # noqa: PLC0415

    where = f"agent {node} at {address[0]}:{address[1]}"
    if netns is not None:
        where += f" in namespace {netns}"
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
            request = {"op": "control", "request": {"cmd": cmd, **args}}
            return _client(sock, where).call(request)
    except RpcError as exc:
        raise _mapped(exc) from None
    except TimeoutError:
        raise AgentDown(f"{where} did not answer within {timeout:g} s") from None
    except IdentityError as exc:  # an impostor, not a node that is down: say which
        raise AgentDown(f"{where}: refused its certificate: {exc}") from None
    except (ssl.SSLError, OSError) as exc:
        raise AgentDown(f"{where}: {exc}") from None
