"""Opaque holders for credentials: nothing prints them until the wire bytes are built.

:class:`Secret` wraps a password, a token or a SASL response; its ``repr()`` and ``str()``
say ``[redacted]``, it refuses to be pickled, and it compares in constant time.  Only a SASL
mechanism (:mod:`.sasl`) and the command that frames it (:mod:`.commands`) call
:meth:`Secret.reveal`.  The framed line is a :class:`SecretBytes`: real ``bytes`` for the
socket, redacted for ``repr()``/``str()``, so a traceback that shows a driver's locals shows
``[redacted]`` where the AUTH line was.
"""

from __future__ import annotations

import hmac
from typing import Any, Final, Generic, NoReturn, TypeVar

__all__ = ["REDACTED", "Secret", "SecretBytes"]

REDACTED: Final = "[redacted]"
"""What the transcript, errors and ``repr()`` show in place of a secret."""

_V = TypeVar("_V", str, bytes)


class Secret(Generic[_V]):
    """A credential (``str`` or ``bytes``) that does not print itself."""

    __slots__ = ("_value",)

    def __init__(self, value: _V) -> None:
        self._value: _V = value

    def reveal(self) -> _V:
        """The value itself: call this only where the wire bytes are built."""
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __len__(self) -> int:
        return len(self._value)

    def __repr__(self) -> str:
        return f"Secret({REDACTED!r})"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return format(repr(self), spec)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        mine, theirs = self._value, other._value
        if isinstance(mine, str) != isinstance(theirs, str):
            return False
        a = mine.encode() if isinstance(mine, str) else mine
        b = theirs.encode() if isinstance(theirs, str) else theirs
        return hmac.compare_digest(a, b)

    def __hash__(self) -> int:
        return hash((Secret, self._value))

    def __reduce__(self) -> NoReturn:
        raise TypeError("a Secret cannot be pickled")

    def __deepcopy__(self, memo: dict[int, Any]) -> Secret[_V]:
        return self


class SecretBytes(bytes):
    """Bytes for the socket whose ``repr()`` and ``str()`` are redacted."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"SecretBytes({REDACTED!r})"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("SecretBytes cannot be pickled")
