"""The RPC's one error map: an answer's ``code`` <-> the exception a client raises.

Every client turns an answer into its result or an exception with ``check`` (and a hello's
answer with ``codec.check_hello``); every server turns a protocol failure into its answer
with ``answer_for``. No client parses answers on its own.

=============  ===================  ===================================================
code           exception            meaning (and what became of the request)
=============  ===================  ===================================================
(none sent)    ``Unreachable``      no connection, no answer in time, or the connection
                                    was lost: not run, or not known to have run
``protocol``   ``ProtocolError``    garbage, a frame over a bound, a hang-up or a stall
                                    inside a frame: the connection ends; not run
``version``    ``VersionMismatch``  the hello named a version the other end does not
                                    speak (the message names both): not run
``busy``       ``Busy``             the server serves as many connections as it may;
                                    try again shortly: not run
``bad-request``  ``BadRequest``     a frame that holds no valid request (not msgpack,
                                    not a map, over a bound): not run; the connection
                                    goes on
anything else  ``Refused``          the server ran the request and said no; ``code``
or nothing                          (e.g. ``committed``, ``aborted``, ``pending``,
                                    ``absent``) is for the caller's logic
=============  ===================  ===================================================

``Unreachable`` and its subclasses are ``ConnectionError``s: the request did not get an
answer, so a caller that must know whether it ran asks again. ``Refused`` is a
``RuntimeError``: the other side answered. Messages come from the servers' answers and
the clients' own checks; neither ever quotes a request's contents or a secret.
"""

from __future__ import annotations

from typing import Any

MAX_ERROR = 2000  # characters of a server's error text a client keeps


class RpcError(Exception):
    """Any failure of an RPC; ``code`` is its code in the map above."""

    code: str | None = None

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class Unreachable(RpcError, ConnectionError):
    """No answer: the other side could not be reached, did not answer in time, or the
    connection was lost."""

    code = "unreachable"


class ProtocolError(Unreachable):
    """The other side broke the protocol; the connection cannot go on."""

    code = "protocol"


class BadFrame(ProtocolError):
    """One frame's body is no valid message. Its length was fine, so the stream holds
    together: a server answers it as a bad request and reads on; a client, whose answer
    it was, drops the connection."""


class Stalled(ProtocolError):
    """The other side sent part of a frame, then nothing more in time."""


class VersionMismatch(ProtocolError):
    """The other side speaks another version of the protocol (the message names both)."""

    code = "version"


class LegacyJson(VersionMismatch):
    """The other side sent a JSON line: pysteer's protocol from before this RPC."""


class Busy(Unreachable):
    """The server serves as many connections as it may; try again shortly."""

    code = "busy"


class Refused(RpcError, RuntimeError):
    """The other side answered, and said no (its reason is the message; ``code``, when it
    gives one, is for the caller's logic: e.g. ``committed``, ``aborted``, ``pending``)."""


class BadRequest(Refused):
    """The server could not read a frame as a request; the connection goes on."""

    code = "bad-request"


#: The codes a server sends, and the exception each one raises at the client. Any other
#: code (or none) raises ``Refused`` with that code.
CODES: dict[str, type[RpcError]] = {
    "protocol": ProtocolError,
    "version": VersionMismatch,
    "busy": Busy,
    "bad-request": BadRequest,
}


def check(answer: dict[str, Any], where: str | None = None) -> dict[str, Any]:
    """``answer`` if it says yes; else the exception its code maps to, with its error
    text (after ``where``, if given, and ": ")."""
    if answer.get("ok") is True:
        return answer
    error, code = answer.get("error"), answer.get("code")
    text = error[:MAX_ERROR] if isinstance(error, str) and error else "refused"
    code = code[:64] if isinstance(code, str) else None
    raise CODES.get(code or "", Refused)(f"{where}: {text}" if where else text, code)


def answer_for(exc: RpcError) -> dict[str, Any]:
    """The answer that tells a client about ``exc`` (the inverse of ``check``)."""
    code = BadRequest.code if isinstance(exc, BadFrame) else exc.code
    answer: dict[str, Any] = {"ok": False, "error": str(exc)}
    if code is not None:
        answer["code"] = code
    return answer
