"""SMTP replies: the value, the status codes, and the escaping of server text.

RFC 5321 §4.2: a reply is a three-digit code, then ``-`` (more lines follow) or a space
(last line), then text, then CRLF.  A bare code with no text (``250``) is a legal last line.
Every line of a multi-line reply carries the same code.  RFC 2034 / RFC 3463 add an
enhanced status code (``2.0.0``) at the start of the text when the server advertised
ENHANCEDSTATUSCODES.

The bounded parser that makes replies from bytes is :mod:`.parser`.

Server text is data: the parser passes every reply line through :func:`escape_controls` as
it is decoded, so whoever reads a :class:`Reply` parsed here (transcript, exceptions, results,
audit rows, admin, terminal) gets a line with no control character, no line separator, no
NUL and no bidirectional override in it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

__all__ = ["Reply", "SMTPStatus", "escape_controls"]


_ESCAPED: Final = re.compile(
    "[\x00-\x08\x0a-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]"
)
"""What :func:`escape_controls` rewrites: C0 controls except TAB, DEL, C1 controls (NEL and
CSI among them), U+2028/U+2029 (line and paragraph separators) and the bidirectional
marks, embeddings, overrides and isolates (U+061C, U+200E/F, U+202A-E, U+2066-9)."""

_SHORT_ESCAPES: Final = {"\n": "\\n", "\r": "\\r"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_controls(text: str) -> str:
    """Return ``text`` with each character of :data:`_ESCAPED` written as a visible escape.

    CR and LF become ``\\r`` and ``\\n``, other characters below U+0100 ``\\xNN``
    (``\\x1b``, ``\\x00``, ``\\x85``), the others ``\\uNNNN`` (``\\u2028``).  TAB and
    every printable character, backslash included, are kept as they are: the result is meant
    to be read, not decoded, and escaping it again changes nothing (a test proves both).  So
    the result holds no line break for ``str.splitlines()``, no terminal control sequence
    introducer and no NUL.
    """
    if _ESCAPED.search(text) is None:
        return text
    return _ESCAPED.sub(_escape, text)


class SMTPStatus(IntEnum):
    """Reply codes the client acts on, by their meaning (RFC 5321 §4.2.3, RFC 4954)."""

    service_ready = 220
    closing = 221
    auth_successful = 235
    completed = 250
    will_forward = 251
    cannot_verify = 252
    auth_continue = 334
    start_input = 354
    domain_unavailable = 421
    mailbox_unavailable = 450
    local_error = 451
    insufficient_storage = 452
    tls_not_available = 454
    unrecognized_command = 500
    unrecognized_parameters = 501
    command_not_implemented = 502
    bad_command_sequence = 503
    parameter_not_implemented = 504
    auth_required = 530
    auth_too_weak = 534
    auth_failed = 535
    encryption_required = 538
    mailbox_unavailable_permanent = 550
    user_not_local = 551
    storage_exceeded = 552
    mailbox_name_invalid = 553
    transaction_failed = 554


_ENHANCED_STATUS: Final = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")


@dataclass(frozen=True, slots=True)
class Reply:
    """One complete server reply.

    ``lines`` holds the text of each line after the code and its separator.  Replies made by
    :class:`ReplyParser` have it decoded as UTF-8 with undecodable bytes replaced (servers
    may send anything) and passed through :func:`escape_controls`.  ``str(reply)`` is
    the reply as it stood on the wire, one line per line, without CRLF.
    """

    code: int
    lines: tuple[str, ...] = ("",)

    @property
    def text(self) -> str:
        """The reply text, lines joined by newlines."""
        return "\n".join(self.lines)

    @property
    def is_positive(self) -> bool:
        """2xx: the command succeeded."""
        return 200 <= self.code < 300

    @property
    def is_intermediate(self) -> bool:
        """3xx: go on (334 AUTH challenge, 354 send the data)."""
        return 300 <= self.code < 400

    @property
    def is_transient(self) -> bool:
        """4xx: failed this time; the same attempt may succeed later."""
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        """5xx: failed; repeating it will fail again."""
        return 500 <= self.code < 600

    @property
    def enhanced_status(self) -> str | None:
        """The enhanced status code at the start of the text (``"2.0.0"``), if any.

        Only accepted when its class digit matches the reply code's first digit.
        """
        match = _ENHANCED_STATUS.match(self.lines[0])
        if match and match.group(1) == str(self.code)[0]:
            return match.group(0)
        return None

    def one_line(self) -> str:
        """Code and text on one line, for messages: ``550 5.1.1 No such user``."""
        text = " ".join(line for line in self.lines if line)
        return f"{self.code} {text}".rstrip()

    def __str__(self) -> str:
        last = len(self.lines) - 1
        return "\n".join(
            f"{self.code}{' ' if i == last else '-'}{line}".rstrip()
            for i, line in enumerate(self.lines)
        )
