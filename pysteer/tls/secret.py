"""``Secret``: key material that never shows itself in a repr, str, log or exception."""

from __future__ import annotations

import hmac


class Secret:
    """Bytes that must stay secret. ``reveal()`` is the one, greppable, way to get them."""

    __slots__ = ("_value",)

    def __init__(self, value: bytes) -> None:
        self._value = bytes(value)

    def reveal(self) -> bytes:
        return self._value

    def __len__(self) -> int:
        return len(self._value)

    def __repr__(self) -> str:
        return f"Secret(<{len(self._value)} bytes redacted>)"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and hmac.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        return hash(("Secret", len(self._value)))

    def __reduce__(self) -> None:  # no pickling by accident
        raise TypeError("a Secret cannot be pickled; export it explicitly")
