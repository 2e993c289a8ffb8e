"""The exceptions raised by the SMTP client: one tree, rooted in ``smtplib.SMTPException``.

Code that already catches ``smtplib``'s exceptions keeps working: every error a server
reply causes subclasses the matching ``smtplib`` class and carries ``smtp_code`` and
``smtp_error`` like it.  On top of that every reply error carries the whole
:class:`~django_socketmail.smtp.reply.Reply`, says whether it is transient (4xx, worth a
retry) or permanent (5xx), and names the command the server was answering.

No message built here ever contains a credential: AUTH payloads are never part of an
exception's text.
"""

from __future__ import annotations

import smtplib
from collections.abc import Mapping

from .reply import Reply

__all__ = [
    "AuthenticationError",
    "CleartextAuthError",
    "ConnectError",
    "DataError",
    "HeloError",
    "InvalidAddressError",
    "LocalProtocolError",
    "MessageTooLargeError",
    "NotSupportedError",
    "RecipientsRefused",
    "RemoteProtocolError",
    "ReplyError",
    "SMTPTimeoutError",
    "SenderRefused",
    "ServerDisconnected",
    "SocketMailError",
    "TLSError",
]


class SocketMailError(smtplib.SMTPException):
    """Root of every SMTP or network error that django-socketmail raises."""


class ReplyError(SocketMailError, smtplib.SMTPResponseException):
    """The server answered a command with an error reply.

    ``smtp_code`` (int) and ``smtp_error`` (bytes) are set as ``smtplib`` sets them;
    ``reply`` is the full parsed reply and ``command`` the verb it answered.
    """

    def __init__(self, reply: Reply, command: str = "", note: str = "") -> None:
        smtplib.SMTPResponseException.__init__(self, reply.code, reply.text.encode())
        self.reply = reply
        self.command = command
        self.note = note

    @property
    def is_transient(self) -> bool:
        """True for a 4xx reply: the same attempt may succeed later."""
        return self.reply.is_transient

    @property
    def is_permanent(self) -> bool:
        """True for a 5xx reply: retrying the same thing will fail again."""
        return self.reply.is_permanent

    @property
    def enhanced_status(self) -> str | None:
        """The RFC 3463 enhanced status code of the reply (``"5.7.8"``), if it had one."""
        return self.reply.enhanced_status

    def __str__(self) -> str:
        where = f" to {self.command}" if self.command else ""
        note = f": {self.note}" if self.note else ""
        return f"server replied {self.reply.one_line()}{where}{note}"


class ConnectError(ReplyError, smtplib.SMTPConnectError):
    """The server refused the session in its greeting (421, 554) or gave no 220."""


class HeloError(ReplyError, smtplib.SMTPHeloError):
    """The server refused both EHLO and HELO."""


class AuthenticationError(ReplyError, smtplib.SMTPAuthenticationError):
    """Authentication failed (535 bad credentials, 454 temporary failure, ...)."""


class SenderRefused(ReplyError, smtplib.SMTPSenderRefused):
    """The server refused ``MAIL FROM``; ``sender`` is the refused address."""

    def __init__(self, reply: Reply, sender: str, command: str = "MAIL FROM") -> None:
        ReplyError.__init__(self, reply, command)
        self.sender = sender
        self.args = (reply.code, reply.text.encode(), sender)


class RecipientsRefused(SocketMailError, smtplib.SMTPRecipientsRefused):
    """The server refused every recipient of a message.

    ``recipients`` maps each refused address to ``(code, text_bytes)`` as in ``smtplib``;
    ``replies`` maps it to the full :class:`Reply`.
    """

    def __init__(self, replies: Mapping[str, Reply]) -> None:
        recipients = {addr: (r.code, r.text.encode()) for addr, r in replies.items()}
        smtplib.SMTPRecipientsRefused.__init__(self, recipients)
        self.replies = dict(replies)

    @property
    def is_transient(self) -> bool:
        """True when every refusal was a 4xx reply (all of them may work later)."""
        return all(r.is_transient for r in self.replies.values())

    def __str__(self) -> str:
        parts = [f"{addr}: {reply.one_line()}" for addr, reply in self.replies.items()]
        return "server refused every recipient (" + "; ".join(parts) + ")"


class DataError(ReplyError, smtplib.SMTPDataError):
    """The server refused ``DATA``/``BDAT`` or the message content."""


class NotSupportedError(SocketMailError, smtplib.SMTPNotSupportedError):
    """Something needed is not offered by the server (STARTTLS, AUTH, SMTPUTF8, ...)."""


class CleartextAuthError(NotSupportedError):
    """Only cleartext mechanisms are possible and the connection is not encrypted."""


class ServerDisconnected(SocketMailError, smtplib.SMTPServerDisconnected, ConnectionError):
    """The connection was closed or reset by the server (or the network)."""


class SMTPTimeoutError(SocketMailError, TimeoutError):
    """The server did not answer (or accept our bytes) before the deadline."""


class TLSError(SocketMailError, ConnectionError):
    """The TLS handshake failed: certificate not trusted, host name mismatch, ..."""


class RemoteProtocolError(SocketMailError):
    """The server broke the protocol: malformed or oversized reply, injected bytes, ..."""


class LocalProtocolError(SocketMailError):
    """We tried to do something the protocol forbids in the current state (a bug)."""


class MessageTooLargeError(SocketMailError):
    """The message is larger than the limit the server advertised with SIZE."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            f"message is {size} bytes, larger than the {limit} bytes the server accepts (SIZE)"
        )
        self.size = size
        self.limit = limit


class InvalidAddressError(ValueError):
    """An address cannot be used in the envelope; nothing was sent.

    A ``ValueError``, as Django's own backend raises for bad addresses.
    """
