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

__all__ = ["data_parts", "dot_stuff", "has_8bit", "normalize_line_endings", "terminate_data"]

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


def dot_stuff(normalized: bytes) -> bytes:
    """Double the leading dot of every line of CRLF-normalized content (RFC 5321 §4.5.2)."""
    stuffed = normalized.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed


def data_parts(normalized: bytes) -> tuple[bytes, bytes]:
    """The DATA payload for CRLF-normalized content as two parts to write one after the
    other: the stuffed content (the same object when no line starts with a dot) and
    ``.CRLF``.  No copy of a large message is made to glue them."""
    return dot_stuff(normalized), b".\r\n"


def terminate_data(normalized: bytes) -> bytes:
    """The full DATA payload for CRLF-normalized content, as one byte string."""
    return b"".join(data_parts(normalized))


def has_8bit(message: bytes) -> bool:
    """True when any byte has its high bit set (needs ``BODY=8BITMIME``, RFC 6152)."""
    return not message.isascii()
