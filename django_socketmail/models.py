"""The audit log: one row per SMTP session, one per message attempt, one per recipient.

Built for the questions people ask of it:

- "did the message to x@y go out, and what did the server say?" — :class:`RecipientLog`
  by ``address`` (indexed), with its RCPT reply and the message's final reply;
- "what failed last night and why?" — :class:`MessageLog` by ``created`` and ``status``
  (both indexed), with the error class and text, and :class:`SessionLog` for connections
  that failed before any message;
- "which queue id matches this bounce?" — ``MessageLog.queue_id`` (indexed) next to the
  raw final reply.

Rows are written by :mod:`.audit` only, in batches; every text value passes through
:func:`storable` (NUL escaped, cut to fit its column), and no column ever holds a credential.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Final

from django.db import models
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from .outbox import (  # the queue's tables, same app
    MailerSlot,
    MailerState,
    OutboxContent,
    OutboxMessage,
)
from .smtp.result import RecipientStatus, SendStatus

__all__ = [
    "MailerSlot",
    "MailerState",
    "MessageLog",
    "OutboxContent",
    "OutboxMessage",
    "RecipientLog",
    "SessionLog",
    "storable",
]


class SessionOutcome(models.TextChoices):
    """How an SMTP session ended."""

    OK = "ok", _("ok")
    FAILED = "failed", _("failed")


class SessionLog(models.Model):
    """One SMTP connection attempt, from connect to QUIT (or failure)."""

    created = models.DateTimeField(_("started"), default=timezone.now, editable=False)
    ended = models.DateTimeField(_("ended"), null=True, blank=True)
    mailer = models.CharField(_("mailer alias"), max_length=100, blank=True)
    host = models.CharField(_("server host"), max_length=255)
    port = models.PositiveIntegerField(_("server port"))
    tls_version = models.CharField(_("TLS version"), max_length=32, blank=True)
    tls_cipher = models.CharField(_("TLS cipher"), max_length=128, blank=True)
    certificate = models.CharField(_("certificate subject"), max_length=255, blank=True)
    auth_mechanism = models.CharField(_("AUTH mechanism"), max_length=32, blank=True)
    auth_username = models.CharField(_("AUTH user name"), max_length=255, blank=True)
    local_hostname = models.CharField(_("EHLO name"), max_length=255, blank=True)
    greeting = models.TextField(_("greeting"), blank=True)
    extensions = models.TextField(_("advertised extensions"), blank=True)
    outcome = models.CharField(_("outcome"), max_length=16, choices=SessionOutcome.choices)
    error_class = models.CharField(_("error class"), max_length=128, blank=True)
    error = models.TextField(_("error"), blank=True)
    messages_sent = models.PositiveIntegerField(_("messages sent"), default=0)
    transcript = models.TextField(_("transcript"), blank=True)

    class Meta:
        verbose_name = _("SMTP session")
        verbose_name_plural = _("SMTP sessions")
        ordering: ClassVar[list[str]] = ["-created"]
        indexes: ClassVar[list[models.Index]] = [
            models.Index(fields=["created"], name="socketmail_session_created"),
            models.Index(fields=["outcome", "created"], name="socketmail_session_outcome"),
            models.Index(fields=["host", "created"], name="socketmail_session_host"),
        ]

    def __str__(self) -> str:
        return f"{self.host}:{self.port} at {self.created:%Y-%m-%d %H:%M:%S} ({self.outcome})"

    @property
    def tls(self) -> str:
        """``TLSv1.3 TLS_AES_256_GCM_SHA384`` or ``none``."""
        return f"{self.tls_version} {self.tls_cipher}".strip() or "none"


class MessageLog(models.Model):
    """One attempt to send one message, with the server's final reply."""

    session = models.ForeignKey(
        SessionLog, on_delete=models.CASCADE, related_name="messages", null=True, blank=True
    )
    created = models.DateTimeField(_("attempted"), default=timezone.now, editable=False)
    status = models.CharField(
        _("status"),
        max_length=16,
        choices=[(s.value, s.label) for s in SendStatus],
    )
    message_id = models.CharField(_("Message-ID"), max_length=255, blank=True)
    sender = models.CharField(_("envelope sender"), max_length=320)
    recipients = models.TextField(_("envelope recipients"), blank=True)
    subject = models.CharField(_("subject"), max_length=255, blank=True)
    size = models.PositiveIntegerField(_("size in bytes"), default=0)
    final_reply_code = models.PositiveSmallIntegerField(_("final reply code"), null=True)
    final_reply = models.TextField(_("final reply"), blank=True)
    queue_id = models.CharField(_("queue id"), max_length=128, blank=True)
    duration = models.FloatField(_("seconds"), default=0.0)
    error_class = models.CharField(_("error class"), max_length=128, blank=True)
    error = models.TextField(_("error"), blank=True)
    transient = models.BooleanField(
        _("transient failure"), null=True, help_text=_("4xx: worth retrying; 5xx: permanent.")
    )
    transcript = models.TextField(_("transcript"), blank=True)
    body = models.TextField(_("message (start)"), blank=True)
    outbox = models.ForeignKey(
        OutboxMessage,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="logged_attempts",
        verbose_name=_("queued message"),
        help_text=_("The outbox row this attempt sent, for queued delivery."),
        db_constraint=False,  # the audit log may live in another database (audit_database)
    )

    class Meta:
        verbose_name = _("message")
        verbose_name_plural = _("messages")
        ordering: ClassVar[list[str]] = ["-created"]
        indexes: ClassVar[list[models.Index]] = [
            models.Index(fields=["created"], name="socketmail_message_created"),
            models.Index(fields=["status", "created"], name="socketmail_message_status"),
            models.Index(fields=["queue_id"], name="socketmail_message_queue_id"),
            models.Index(fields=["message_id"], name="socketmail_message_msgid"),
            models.Index(fields=["sender"], name="socketmail_message_sender"),
            # A session's page and the list filtered by session: its newest messages.
            models.Index(fields=["session", "created"], name="socketmail_message_session"),
        ]

    def __str__(self) -> str:
        return f"{self.subject or '(no subject)'} → {self.recipients[:60]} ({self.status})"


class RecipientLog(models.Model):
    """One envelope recipient of one message attempt, with its RCPT reply and fate."""

    message = models.ForeignKey(MessageLog, on_delete=models.CASCADE, related_name="recipient_logs")
    address = models.CharField(_("address"), max_length=320)
    status = models.CharField(
        _("status"), max_length=16, choices=[(s.value, s.value) for s in RecipientStatus]
    )
    reply_code = models.PositiveSmallIntegerField(_("RCPT reply code"), null=True)
    reply = models.TextField(_("RCPT reply"), blank=True)

    class Meta:
        verbose_name = _("recipient")
        verbose_name_plural = _("recipients")
        indexes: ClassVar[list[models.Index]] = [
            models.Index(fields=["address"], name="socketmail_recipient_address"),
        ]

    def __str__(self) -> str:
        return f"{self.address}: {self.status}"


_UNSTORABLE: Final = re.compile("[\x00\ud800-\udfff]")
"""Characters some database refuses in text: NUL (PostgreSQL) and lone surrogates (no UTF-8
encoder takes them: psycopg and sqlite3 both raise)."""


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def storable(value: Any, field: models.Field[Any, Any]) -> str:
    """``value`` as text that SQLite and PostgreSQL store in ``field``.

    ``None`` is ``""``; anything else is ``str(value)`` with each NUL written as the visible
    escape ``\\x00`` and each lone surrogate as ``\\udXXX`` (the form of
    :func:`.smtp.reply.escape_controls`, which server lines have been through already), then
    cut to the field's ``max_length`` with an ellipsis (after escaping, which lengthens).
    A value without those characters that fits is returned unchanged.
    """
    text = "" if value is None else str(value)
    if _UNSTORABLE.search(text) is not None:
        text = _UNSTORABLE.sub(_escape, text)
    limit = field.max_length
    if limit is not None and len(text) > limit:
        return text[: limit - 1] + "…"
    return text
