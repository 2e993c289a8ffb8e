"""The commands a client sends, as values that know their wire form and their transcript form.

Every argument is checked before anything is encoded: CR, LF and NUL are never allowed
inside a command line (that is how command injection works), and a command line is at
most :data:`MAX_COMMAND_LINE` octets.  Commands that carry credentials render as
``[redacted]`` in the transcript.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from typing import ClassVar, Final

from .errors import LocalProtocolError
from .secret import REDACTED, Secret, SecretBytes

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
        if len(data) > MAX_COMMAND_LINE:
            raise LocalProtocolError(
                f"{self.verb} line is {len(data)} bytes, over {MAX_COMMAND_LINE}"
            )
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
    """``AUTH <mechanism> [initial-response]`` (RFC 4954).  The initial response is a
    :class:`~.secret.Secret` holding the raw bytes; the line is built, base64 and all, only
    by :meth:`line`, and comes back as :class:`~.secret.SecretBytes`."""

    mechanism: str
    initial_response: Secret[bytes] | None = field(default=None, repr=False)
    verb: ClassVar[str] = "AUTH"
    ends_group: ClassVar[bool] = True

    def arguments(self) -> str:
        return self.mechanism

    def line(self) -> bytes:
        if self.initial_response is None:
            return super(Auth, self).line()
        _check_argument(self.mechanism, "AUTH mechanism")
        # RFC 4954 §4: an empty initial response is sent as "=".
        return _secret_line(f"AUTH {self.mechanism} ".encode("ascii"), self.initial_response, b"=")

    def transcript_text(self) -> str:
        if self.initial_response is None:
            return f"AUTH {self.mechanism}"
        return f"AUTH {self.mechanism} {REDACTED}"


@dataclass(frozen=True, slots=True)
class AuthResponse(Command):
    """One base64 line answering a 334 challenge: a secret, whatever it holds."""

    payload: Secret[bytes] = field(repr=False)
    ends_group: ClassVar[bool] = True

    def line(self) -> bytes:
        return _secret_line(b"", self.payload, b"")

    def transcript_text(self) -> str:
        return REDACTED


def _secret_line(prefix: bytes, secret: Secret[bytes], empty: bytes) -> SecretBytes:
    """``prefix`` + base64 of the secret (``empty`` when it is empty) + CRLF, as bytes
    that do not print themselves."""
    encoded = base64.b64encode(secret.reveal()) or empty
    line = SecretBytes(prefix + encoded + b"\r\n")
    if len(line) > MAX_AUTH_LINE:
        raise LocalProtocolError(f"AUTH line is {len(line)} bytes, over {MAX_AUTH_LINE}")
    return line


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
