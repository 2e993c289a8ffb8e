"""The bounded, incremental reply parser: bytes from the server in, :class:`~.reply.Reply` out.

RFC 5321 §4.2: a reply is a three-digit code, then ``-`` (more lines follow) or a space
(last line), then text, then CRLF.  The parser holds at most :data:`MAX_LINE_LENGTH` bytes
of an unfinished line and at most :data:`MAX_REPLY_LINES` lines of one reply, so a hostile
server cannot make us buffer without end (RFC 5321 §4.5.3.1 bounds a reply line at 512
octets; extensions exceed it, so we accept far more, but not without limit).  Every line is
escaped as it is decoded (:func:`~.reply.escape_controls`).
"""

from __future__ import annotations

import re
from typing import Final

from .errors import RemoteProtocolError
from .reply import Reply, escape_controls

__all__ = ["MAX_LINE_LENGTH", "MAX_REPLY_LINES", "ReplyParser"]

MAX_LINE_LENGTH: Final = 8192
"""Longest reply line we accept, CRLF included (RFC 5321 says 512; extensions say more)."""

MAX_REPLY_LINES: Final = 200
"""Most lines one reply may have; a server listing more is treated as hostile."""


_CODE_LINE: Final = re.compile(rb"([2-5][0-9][0-9])([ -]|$)")


class ReplyParser:
    """Incremental, bounded reply parser: :meth:`feed` bytes, take :meth:`next_reply`.

    Lines end in CRLF; a bare LF is tolerated (as most clients do), a CR before it is
    dropped.  Any other CR, and every control character, is escaped in the text (see
    :func:`escape_controls`): one line on the wire is one line of the reply.

    Raises :class:`RemoteProtocolError` for a line that is not a reply line, a
    multi-line reply whose codes disagree, a line longer than ``max_line_length`` or a reply
    longer than ``max_lines`` lines.  After an error the parser is unusable: the session
    must be abandoned.
    """

    def __init__(
        self, *, max_line_length: int = MAX_LINE_LENGTH, max_lines: int = MAX_REPLY_LINES
    ) -> None:
        self._buffer = bytearray()
        self._code: int | None = None
        self._lines: list[str] = []
        self._held = 0
        """Bytes received for the lines of the unfinished reply in ``_lines``."""
        self._max_line_length = max_line_length
        self._max_lines = max_lines
        self._failed: RemoteProtocolError | None = None

    @property
    def buffered(self) -> int:
        """How many received bytes are not yet part of a complete reply."""
        return len(self._buffer) + self._held

    def peek(self, count: int) -> bytes:
        """Up to ``count`` leading bytes of what is buffered, left in place."""
        if self._lines:  # inside a multi-line reply: its code is what comes first
            return str(self._code).encode()[:count]
        return bytes(self._buffer[:count])

    def feed(self, data: bytes) -> None:
        """Add bytes received from the server."""
        if self._failed:
            raise self._failed
        self._buffer += data

    def discard(self) -> bytes:
        """Drop and return everything buffered (used after STARTTLS's 220)."""
        pending = bytes(self._buffer)
        self._buffer.clear()
        self._code = None
        self._lines.clear()
        self._held = 0
        return pending

    def next_reply(self) -> Reply | None:
        """Return the next complete reply, or ``None`` if more data is needed."""
        if self._failed:
            raise self._failed
        try:
            return self._next_reply()
        except RemoteProtocolError as error:
            self._failed = error
            self._buffer.clear()
            raise

    def _next_reply(self) -> Reply | None:
        while True:
            end = self._buffer.find(b"\n", 0, self._max_line_length)
            if end < 0:
                if len(self._buffer) >= self._max_line_length:
                    raise RemoteProtocolError(
                        f"reply line longer than {self._max_line_length} bytes"
                    )
                return None
            raw = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            if raw.endswith(b"\r"):
                raw = raw[:-1]
            match = _CODE_LINE.match(raw)
            if not match:
                raise RemoteProtocolError(f"malformed reply line {_preview(raw)}")
            code = int(match.group(1))
            if self._code is not None and code != self._code:
                raise RemoteProtocolError(
                    f"reply line code {code} differs from {self._code} earlier in the same reply"
                )
            self._code = code
            self._lines.append(escape_controls(raw[4:].decode("utf-8", "replace")))
            self._held += len(raw)
            if match.group(2) != b"-":
                reply = Reply(code, tuple(self._lines))
                self._code = None
                self._lines = []
                self._held = 0
                return reply
            if len(self._lines) >= self._max_lines:
                raise RemoteProtocolError(f"reply longer than {self._max_lines} lines")


def _preview(raw: bytes, limit: int = 60) -> str:
    """A short, printable rendering of server bytes for an error message."""
    text = repr(raw[:limit])
    return text + ("..." if len(raw) > limit else "")
