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
from typing import Final

__all__ = [
    "data_parts",
    "dot_stuff",
    "has_8bit",
    "normalize_line_endings",
    "split_canonical",
    "terminate_data",
]

_LINE_ENDING: Final = re.compile(rb"\r\n|\r|\n")


def normalize_line_endings(message: bytes) -> bytes:
    """Return ``message`` with every CRLF, bare CR and bare LF turned into CRLF, ending in CRLF.

    An empty message stays empty.
    """
    crlf = message.count(b"\r\n")
    if crlf == message.count(b"\n") == message.count(b"\r"):
        normalized = message  # already canonical (Django's output): no copy
    elif b"\r" not in message:
        normalized = message.replace(b"\n", b"\r\n")
    else:
        normalized = _LINE_ENDING.sub(b"\r\n", message)
    if normalized and not normalized.endswith(b"\r\n"):
        normalized += b"\r\n"
    return normalized


def split_canonical(message: bytes) -> tuple[bytes, bytes]:
    """``message`` as (content, tail) whose concatenation is
    ``normalize_line_endings(message)``, copying nothing when the message is already in CRLF
    form: a missing final CRLF comes back as the tail (written as a part of its own)."""
    crlf = message.count(b"\r\n")
    if crlf == message.count(b"\n") == message.count(b"\r"):
        missing = bool(message) and not message.endswith(b"\r\n")
        return message, b"\r\n" if missing else b""
    return normalize_line_endings(message), b""


def dot_stuff(normalized: bytes) -> bytes:
    """Double the leading dot of every line of CRLF-normalized content (RFC 5321 §4.5.2)."""
    stuffed = normalized.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed


def data_parts(normalized: bytes, tail: bytes = b"") -> tuple[bytes, bytes]:
    """The DATA payload for CRLF-normalized content (``normalized + tail``, see
    :func:`split_canonical`) as two parts to write one after the other: the stuffed content
    (the same object when no line starts with a dot) and ``tail`` with ``.CRLF``.  No copy
    of a large message is made to glue them."""
    return dot_stuff(normalized), tail + b".\r\n"


def terminate_data(normalized: bytes) -> bytes:
    """The full DATA payload for CRLF-normalized content, as one byte string."""
    return b"".join(data_parts(normalized))


def has_8bit(message: bytes) -> bool:
    """True when any byte has its high bit set (needs ``BODY=8BITMIME``, RFC 6152)."""
    return not message.isascii()
