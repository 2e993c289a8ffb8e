"""Message content on the wire: CRLF normalization, dot-stuffing, DATA and BDAT framing.

RFC 5321 §2.3.8 and §4.1.1.4: every line ends in CRLF and a bare CR or LF is never sent;
§4.5.2: a line that starts with ``.`` gets one more ``.``; the content ends with
``CRLF . CRLF``.  Normalizing before stuffing is what defeats "SMTP smuggling"
(CVE-2023-51764/5/6): a body holding ``\\n.\\n`` becomes ``\\r\\n..\\r\\n``, which no
receiver reads as the end of the message.  RFC 3030 BDAT carries the same CRLF-normalized
bytes but neither stuffs dots nor ends with a dot.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final

__all__ = [
    "Content",
    "as_parts",
    "crlf_line_breaks",
    "data_parts",
    "has_8bit",
    "normalize_line_endings",
    "split_canonical",
    "stuffed_parts",
]

_LINE_ENDING: Final = re.compile(rb"\r\n|\r|\n")


def crlf_line_breaks(data: bytes) -> bytes:
    """``data`` with every CRLF, bare CR and bare LF as CRLF; nothing added at the end.
    Data already in that form comes back as the same object (no copy)."""
    if b"\r" not in data:
        return data.replace(b"\n", b"\r\n")
    if _is_canonical(data):
        return data
    return _LINE_ENDING.sub(b"\r\n", data)


def normalize_line_endings(message: bytes) -> bytes:
    """Return ``message`` with every CRLF, bare CR and bare LF turned into CRLF, ending in CRLF.

    An empty message stays empty.
    """
    normalized = crlf_line_breaks(message)
    if normalized and not normalized.endswith(b"\r\n"):
        normalized += b"\r\n"
    return normalized


Content = bytes | Sequence[bytes]
"""A message as one byte string or as parts to send one after the other."""


def as_parts(content: Content) -> tuple[bytes, ...]:
    """``content`` as a tuple of its non-empty parts."""
    if isinstance(content, bytes):
        return (content,) if content else ()
    return tuple(part for part in content if part)


def _is_canonical(part: bytes) -> bool:
    """No bare CR or LF in ``part`` (nor a CR at its end, whose LF would be elsewhere)."""
    return part.count(b"\r\n") == part.count(b"\n") == part.count(b"\r")


def split_canonical(message: Content) -> tuple[tuple[bytes, ...], bytes]:
    """``message`` as (content parts, tail) whose concatenation is the CRLF-normalized
    message (see :func:`normalize_line_endings`), copying nothing when every part is
    already in CRLF form: a missing final CRLF comes back as the tail (written as a part of
    its own).  Otherwise the parts are joined and normalized into one."""
    parts = as_parts(message)
    if all(_is_canonical(part) for part in parts):
        missing = bool(parts) and not parts[-1].endswith(b"\r\n")
        return parts, b"\r\n" if missing else b""
    normalized = normalize_line_endings(b"".join(parts))
    return ((normalized,) if normalized else ()), b""


def stuffed_parts(parts: Sequence[bytes]) -> list[bytes]:
    """CRLF-normalized content parts with the leading dot of every line doubled, copying
    no part without such a dot: a dot that starts a part gets a part of its own.  A part
    must not end between a CR and its LF (:func:`split_canonical` ensures it)."""
    stuffed: list[bytes] = []
    at_line_start = True
    for part in parts:
        if at_line_start and part.startswith(b"."):
            stuffed.append(b".")
        stuffed.append(part.replace(b"\r\n.", b"\r\n.."))
        at_line_start = part.endswith(b"\n")
    return stuffed


def data_parts(normalized: Content, tail: bytes = b"") -> list[bytes]:
    """The DATA payload for CRLF-normalized content (``normalized + tail``, see
    :func:`split_canonical`) as parts to write one after the other: the stuffed content
    (the same objects where no line starts with a dot), then ``tail`` with ``.CRLF``.  No
    copy of a large message is made to glue them."""
    return [*stuffed_parts(as_parts(normalized)), tail + b".\r\n"]


def has_8bit(message: Content) -> bool:
    """True when any byte has its high bit set (needs ``BODY=8BITMIME``, RFC 6152)."""
    return not all(part.isascii() for part in as_parts(message))
