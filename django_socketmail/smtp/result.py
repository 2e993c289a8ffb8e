"""What happened to one message: its status, each recipient's fate, the server's final reply.

The status says only what the server said.  A message is ``sent`` when every recipient
was accepted and the server's final reply to the content was positive; ``unknown`` when
the content went out but the final reply never came (the server may or may not have
taken it: never report that as sent, never blindly resend it).
"""

from __future__ import annotations

import enum
import re
import time
from dataclasses import dataclass, field
from typing import Final

from .reply import Reply
from .transcript import TranscriptLine

__all__ = ["RecipientResult", "RecipientStatus", "SendResult", "SendStatus", "parse_queue_id"]


class SendStatus(str, enum.Enum):
    """The outcome of one message."""

    SENT = "sent"
    PARTIAL = "partial"
    REFUSED = "refused"
    FAILED = "failed"
    UNKNOWN = "unknown"
    QUEUED = "queued"
    """Stored for queued delivery (``queue=True``); the outbox row says what became of it."""

    @property
    def label(self) -> str:
        """Human wording: ``partially sent`` for PARTIAL."""
        return "partially sent" if self is SendStatus.PARTIAL else self.value


class RecipientStatus(str, enum.Enum):
    """The outcome for one recipient."""

    PENDING = "pending"
    DELIVERED = "delivered"
    """Accepted at RCPT and the content's final reply was positive."""
    REFUSED = "refused"
    """Refused at RCPT (see its reply for transient 4xx versus permanent 5xx)."""
    FAILED = "failed"
    """Accepted at RCPT but the transaction failed afterwards, or was never attempted."""
    UNKNOWN = "unknown"
    """Accepted at RCPT, content sent, final reply never received."""


@dataclass(slots=True)
class RecipientResult:
    """One envelope recipient: the RCPT reply (None if RCPT was never answered) and its fate."""

    address: str
    status: RecipientStatus = RecipientStatus.PENDING
    reply: Reply | None = None
    final_reply: Reply | None = None

    @property
    def delivered(self) -> bool:
        """True when the server took responsibility for this recipient."""
        return self.status is RecipientStatus.DELIVERED


@dataclass(slots=True)
class SendResult:
    """The outcome of one message; attached to the ``EmailMessage`` as ``socketmail_result``.

    ``final_replies`` holds the server's reply to the content of each transaction (one,
    unless a ``452 too many recipients`` split the recipients over several).  ``error`` is
    the exception describing why the message was not (fully) sent, or None.
    """

    mail_from: str
    recipients: list[RecipientResult]
    size: int = 0
    final_replies: list[Reply] = field(default_factory=list)
    error: BaseException | None = None
    started: float = field(default_factory=time.time)
    elapsed: float = 0.0
    transcript: list[TranscriptLine] = field(default_factory=list, repr=False)
    """The lines of the conversation that concern this message (redacted)."""
    envid: str | None = None
    """The DSN envelope id sent with it (RFC 3461 ENVID), which a bounce carries back."""
    dsn_sent: bool = False
    """True when DSN parameters went with it (the server offered DSN and some were asked)."""
    outbox_id: int | None = None
    """Its outbox row, when it was queued (``queue=True``) rather than sent."""

    @property
    def status(self) -> SendStatus:
        """Derived from the recipients' fates (see :class:`SendStatus`)."""
        fates = [r.status for r in self.recipients]
        if self.outbox_id is not None and all(f is RecipientStatus.PENDING for f in fates):
            return SendStatus.QUEUED
        delivered = fates.count(RecipientStatus.DELIVERED)
        if fates and delivered == len(fates):
            return SendStatus.SENT
        if delivered:
            return SendStatus.PARTIAL
        if RecipientStatus.UNKNOWN in fates:
            return SendStatus.UNKNOWN
        if fates and all(f is RecipientStatus.REFUSED for f in fates):
            return SendStatus.REFUSED
        return SendStatus.FAILED

    def fail(self, error: BaseException) -> None:
        """Record ``error``; recipients whose fate is still open become FAILED."""
        if self.error is None:
            self.error = error
        for recipient in self.recipients:
            if recipient.status is RecipientStatus.PENDING:
                recipient.status = RecipientStatus.FAILED

    @property
    def accepted(self) -> dict[str, Reply | None]:
        """Delivered recipients mapped to their RCPT reply."""
        return {r.address: r.reply for r in self.recipients if r.delivered}

    @property
    def refused(self) -> dict[str, Reply | None]:
        """Recipients not delivered mapped to their RCPT reply (None if never asked)."""
        return {r.address: r.reply for r in self.recipients if not r.delivered}

    @property
    def final_reply(self) -> Reply | None:
        """The server's reply to the (last) message content: it names the queue id."""
        return self.final_replies[-1] if self.final_replies else None

    @property
    def queue_id(self) -> str | None:
        """The queue id parsed from the final reply, when its format is recognized."""
        return parse_queue_id(self.final_reply.text) if self.final_reply else None


_QUEUE_ID_PATTERNS: Final = (
    re.compile(r"queued as ([0-9A-Za-z]+)"),  # Postfix
    re.compile(r"\bid=([0-9A-Za-z]+-[0-9A-Za-z]+-[0-9A-Za-z]+)"),  # Exim
    re.compile(r"^2\.0\.0:? ([0-9a-f]{8,16}) Message accepted for delivery"),  # OpenSMTPD
    re.compile(r"\[InternalId=(\d+)"),  # Microsoft 365
    re.compile(r"\bOK\s+\d+\s+(\S+) - gsmtp"),  # Gmail
    re.compile(r"^Ok (\S+)$"),  # Amazon SES: "250 Ok <message id>"
)


def parse_queue_id(text: str) -> str | None:
    """Return the queue id in a final reply's text for the formats we know, else None.

    >>> parse_queue_id("2.0.0 Ok: queued as 4Ab12")
    '4Ab12'
    """
    for pattern in _QUEUE_ID_PATTERNS:
        match = pattern.search(text)
        if match:
            return match.group(1)
    return None
