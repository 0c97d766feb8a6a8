"""The steering daemon's control protocol: pysteer's RPC (``pysteer.rpc``), over a unix
socket (root's) or, for agents, the daemon's mutual-TLS listener.

Request ``{"cmd": ..., ...}``; answer ``{"ok": true, ...}`` or ``{"ok": false, "error": ...}``.
Commands: flows, hosts, stats, park FLOW (answers what it did before), to FLOW HOST,
pass FLOW [HOST] (replays parked packets to HOST, the host it routes to), forget FLOW,
divert ADDRESS HOST|null (new connections to ADDRESS go to HOST), diversions.
"""

from __future__ import annotations

import socket
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pysteer.paths import RUN_DIR
from pysteer.rpc.errors import RpcError, Unreachable

if TYPE_CHECKING:
    import ssl


def socket_path(name: str) -> Path:
    return RUN_DIR / f"steer-{name}.sock"


class ControlError(RpcError, RuntimeError):
    """The daemon could not be reached, or refused the request (its message is kept;
    ``code`` is the error map's, see ``pysteer.rpc.errors``)."""


class SteerDown(ControlError):
    """No steering daemon answers there: it is not running, or does not answer in time."""


class RequestError(ControlError):
    """A request the daemon cannot take (a field of the wrong type or out of range); the
    message says what is wrong and never quotes the request, so it is safe to send back
    as the answer's error."""


MAX_REQUEST = 1 << 20  # the daemon's bound on a request frame (a sync part fits)


def _call(sock: socket.socket, where: str, cmd: str, args: dict[str, Any]) -> dict[str, Any]:
    """One request on a connected socket, its answer through the RPC's error map."""
    # Only here, once a daemon is there: a command that finds none needs no msgpack.
    from pysteer.rpc.blocking import Client  # noqa: PLC0415

    try:
        return Client(sock, f"steering daemon at {where}").call({"cmd": cmd, **args})
    except Unreachable as exc:  # hung up, or broke the protocol
        raise SteerDown(str(exc), exc.code) from None
    except RpcError as exc:
        raise ControlError(str(exc), exc.code) from None
    except TimeoutError:
        timeout = sock.gettimeout()
        raise SteerDown(
            f"steering daemon at {where}: no answer within {timeout or 0:g} s"
        ) from None


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
            return _call(sock, where, cmd, args)
    except ssl.SSLError as exc:  # it answered, and one side refused the other
        raise ControlError(f"steering daemon at {where}: {exc}") from None
    except OSError as exc:
        raise SteerDown(f"steering daemon at {where}: {exc}") from None


def request(path: Path, cmd: str, timeout: float = 10.0, **args: Any) -> dict[str, Any]:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            return _call(sock, str(path), cmd, args)
    except (FileNotFoundError, ConnectionRefusedError):
        raise SteerDown(f"no steering daemon at {path} (is `pysteer steer run` up?)") from None
    except PermissionError as exc:
        raise ControlError(f"steering daemon at {path}: {exc.strerror}") from None
    except OSError as exc:
        raise SteerDown(f"steering daemon at {path}: {exc.strerror or exc}") from None
