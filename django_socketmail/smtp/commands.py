"""The commands a client sends, as values that know their wire form and their transcript form.

Every argument is checked before anything is encoded: CR, LF and NUL are never allowed
inside a command line (that is how command injection works), and a command line is at
most :data:`MAX_COMMAND_LINE` octets.  Commands that carry credentials render as
``[redacted]`` in the transcript.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar, Final

from .errors import LocalProtocolError

__all__ = [
    "REDACTED",
    "Auth",
    "AuthCancel",
    "AuthResponse",
    "Bdat",
    "Command",
    "Data",
    "Ehlo",
    "Helo",
    "MailFrom",
    "Noop",
    "Quit",
    "RcptTo",
    "Rset",
    "StartTLS",
]

REDACTED: Final = "[redacted]"
"""What the transcript shows in place of a secret."""

MAX_COMMAND_LINE: Final = 2048
"""Longest command line we send, CRLF included.  RFC 5321 §4.5.3.1.4 says 512 plus room for
extension parameters; AUTH lines (RFC 4954) may be longer, so they have their own limit."""

MAX_AUTH_LINE: Final = 12288

_FORBIDDEN: Final = re.compile(r"[\x00-\x1f\x7f]")


def _check_argument(value: str, what: str) -> str:
    if _FORBIDDEN.search(value):
        raise LocalProtocolError(f"{what} contains a control character (CR, LF, NUL, ...)")
    return value


@dataclass(frozen=True, slots=True)
class Command:
    """Base of all commands.  ``ends_group`` marks commands that must be last in a pipelined
    group (RFC 2920 §3.1: EHLO, DATA, QUIT, NOOP...; STARTTLS and AUTH too)."""

    ends_group: ClassVar[bool] = False
    verb: ClassVar[str] = ""

    def arguments(self) -> str:
        """The text after the verb (without a leading space), or an empty string."""
        return ""

    def line(self) -> bytes:
        """The command as sent: one line ending in CRLF."""
        args = self.arguments()
        text = f"{self.verb} {args}" if args else self.verb
        _check_argument(text, self.verb)
        data = text.encode("utf-8") + b"\r\n"
        limit = MAX_AUTH_LINE if isinstance(self, (Auth, AuthResponse)) else MAX_COMMAND_LINE
        if len(data) > limit:
            raise LocalProtocolError(f"{self.verb} line is {len(data)} bytes, over {limit}")
        return data

    def transcript_text(self) -> str:
        """The command as the transcript shows it (secrets redacted)."""
        return self.line()[:-2].decode("utf-8")


@dataclass(frozen=True, slots=True)
class Ehlo(Command):
    """``EHLO <domain>``: open the session and ask for the extensions."""

    hostname: str
    verb: ClassVar[str] = "EHLO"
    ends_group: ClassVar[bool] = True

    def arguments(self) -> str:
        return self.hostname


@dataclass(frozen=True, slots=True)
class Helo(Command):
    """``HELO <domain>``: the fallback for servers that refuse EHLO."""

    hostname: str
    verb: ClassVar[str] = "HELO"
    ends_group: ClassVar[bool] = True

    def arguments(self) -> str:
        return self.hostname


@dataclass(frozen=True, slots=True)
class StartTLS(Command):
    """``STARTTLS`` (RFC 3207)."""

    verb: ClassVar[str] = "STARTTLS"
    ends_group: ClassVar[bool] = True


@dataclass(frozen=True, slots=True)
class Auth(Command):
    """``AUTH <mechanism> [initial-response]`` (RFC 4954).  The initial response is a secret."""

    mechanism: str
    initial_response: str | None = None
    verb: ClassVar[str] = "AUTH"
    ends_group: ClassVar[bool] = True

    def arguments(self) -> str:
        if self.initial_response is None:
            return self.mechanism
        return f"{self.mechanism} {self.initial_response}"

    def transcript_text(self) -> str:
        if self.initial_response is None:
            return f"AUTH {self.mechanism}"
        return f"AUTH {self.mechanism} {REDACTED}"


@dataclass(frozen=True, slots=True)
class AuthResponse(Command):
    """One base64 line answering a 334 challenge: always a secret."""

    payload: str
    ends_group: ClassVar[bool] = True

    def line(self) -> bytes:
        _check_argument(self.payload, "AUTH response")
        data = self.payload.encode("ascii") + b"\r\n"
        if len(data) > MAX_AUTH_LINE:
            raise LocalProtocolError(f"AUTH response is {len(data)} bytes, over {MAX_AUTH_LINE}")
        return data

    def transcript_text(self) -> str:
        return REDACTED


@dataclass(frozen=True, slots=True)
class AuthCancel(Command):
    """``*``: cancel an AUTH exchange (RFC 4954 §4); the server answers 501."""

    verb: ClassVar[str] = "*"
    ends_group: ClassVar[bool] = True


@dataclass(frozen=True, slots=True)
class MailFrom(Command):
    """``MAIL FROM:<address> [params]``; the address must already be prepared."""

    address: str
    parameters: tuple[str, ...] = ()
    verb: ClassVar[str] = "MAIL"

    def arguments(self) -> str:
        params = "".join(" " + p for p in self.parameters)
        return f"FROM:<{_check_path(self.address)}>{params}"


@dataclass(frozen=True, slots=True)
class RcptTo(Command):
    """``RCPT TO:<address> [params]``; the address must already be prepared."""

    address: str
    parameters: tuple[str, ...] = ()
    verb: ClassVar[str] = "RCPT"

    def arguments(self) -> str:
        params = "".join(" " + p for p in self.parameters)
        return f"TO:<{_check_path(self.address)}>{params}"


@dataclass(frozen=True, slots=True)
class Data(Command):
    """``DATA``: the server answers 354, then the content follows."""

    verb: ClassVar[str] = "DATA"
    ends_group: ClassVar[bool] = True


@dataclass(frozen=True, slots=True)
class Bdat(Command):
    """``BDAT <size> [LAST]`` (RFC 3030); exactly ``size`` octets follow the line."""

    size: int
    last: bool = True
    verb: ClassVar[str] = "BDAT"

    def arguments(self) -> str:
        return f"{self.size} LAST" if self.last else str(self.size)


@dataclass(frozen=True, slots=True)
class Rset(Command):
    """``RSET``: abandon the current transaction."""

    verb: ClassVar[str] = "RSET"


@dataclass(frozen=True, slots=True)
class Noop(Command):
    """``NOOP``."""

    verb: ClassVar[str] = "NOOP"
    ends_group: ClassVar[bool] = True


@dataclass(frozen=True, slots=True)
class Quit(Command):
    """``QUIT``: the server answers 221 and closes."""

    verb: ClassVar[str] = "QUIT"
    ends_group: ClassVar[bool] = True


def _check_path(address: str) -> str:
    if "<" in address or ">" in address:
        raise LocalProtocolError("an envelope address contains an angle bracket")
    return address
