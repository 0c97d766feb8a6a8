"""Bad values shown in error messages without showing what they may hold.

State decoders (TCP queues, TLS keys) name a bad field's value in their errors; an error
can reach a log or a peer, so the value is shown only as far as it is harmless.
"""

from __future__ import annotations

from typing import Any


def show(value: Any) -> str:
    """A bad value for an error message: short scalars as repr, anything else by its type.

    Never bytes (they may be queue data or keys), never a huge int (``str`` refuses over
    4300 digits) and never a container (its repr recurses, and a deep one raises
    RecursionError).
    """
    if value is None or isinstance(value, bool | float):
        return repr(value)
    if isinstance(value, int):
        return repr(value) if value.bit_length() <= 64 else "a huge integer"
    if isinstance(value, str):
        return repr(value) if len(value) <= 64 else f"{value[:64]!r}..."
    if isinstance(value, bytes | bytearray):
        return f"{len(value)} bytes"
    return f"a {type(value).__name__}"


def name(key: Any) -> str:
    """A map key for an error message: a string as itself, anything else as ``show`` has it."""
    return key if isinstance(key, str) and len(key) <= 64 else show(key)
