"""The outbox: messages stored for queued delivery (``queue=True``), one row each.

:class:`OutboxMessage` holds the envelope, the state and the last reply, and is what the
admin lists; the exact bytes to send live apart in :class:`OutboxContent`, so that large
bodies never weigh on those lists.  :class:`MailerState` (one row per mailer: its pace and
its pause after a throttle reply) and :class:`MailerSlot` (one row per allowed connection)
hold the limits that every worker process, on every machine, shares through the database.
Rows are written by :mod:`.queue` only.
"""

from __future__ import annotations

from typing import Any, ClassVar, Final

from django.db import models
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

__all__ = [
    "DUE",
    "TERMINAL",
    "MailerSlot",
    "MailerState",
    "OutboxContent",
    "OutboxMessage",
    "OutboxStatus",
]


class OutboxStatus(models.TextChoices):
    """Where a queued message stands (see :mod:`.queue` for every transition)."""

    QUEUED = "queued"
    SENDING = "sending"
    DEFERRED = "deferred"
    SENT = "sent"
    PARTIAL = "partial"
    REFUSED = "refused"
    UNKNOWN = "unknown"
    FAILED = "failed"
    CANCELLED = "cancelled"


_LABELS: Final = {
    OutboxStatus.QUEUED: _("queued"),
    OutboxStatus.SENDING: _("sending (leased by a worker)"),
    OutboxStatus.DEFERRED: _("deferred (4xx: will retry)"),
    OutboxStatus.SENT: _("sent"),
    OutboxStatus.PARTIAL: _("partially sent"),
    OutboxStatus.REFUSED: _("refused (5xx)"),
    OutboxStatus.UNKNOWN: _("unknown (may have been delivered)"),
    OutboxStatus.FAILED: _("failed"),
    OutboxStatus.CANCELLED: _("cancelled"),
}


DUE: Final = (OutboxStatus.QUEUED, OutboxStatus.DEFERRED)
"""States a worker may claim (once ``next_attempt`` has come)."""
TERMINAL: Final = frozenset(
    {
        OutboxStatus.SENT,
        OutboxStatus.PARTIAL,
        OutboxStatus.REFUSED,
        OutboxStatus.UNKNOWN,
        OutboxStatus.FAILED,
        OutboxStatus.CANCELLED,
    }
)


class OutboxMessage(models.Model):
    """One queued message: its envelope, its state, its last reply."""

    mailer = models.CharField(_("mailer"), max_length=100, blank=True)
    status = models.CharField(
        _("status"),
        max_length=16,
        choices=[(str(status), label) for status, label in _LABELS.items()],
        default=OutboxStatus.QUEUED,
    )
    created = models.DateTimeField(_("queued at"), default=timezone.now, editable=False)
    next_attempt = models.DateTimeField(_("next attempt"), default=timezone.now)
    attempts = models.PositiveIntegerField(_("attempts"), default=0)
    last_attempt = models.DateTimeField(_("last attempt"), null=True, blank=True)
    lease_owner = models.CharField(_("leased by"), max_length=64, blank=True)
    lease_expires = models.DateTimeField(_("lease expires"), null=True, blank=True)
    content_may_have_left = models.BooleanField(
        _("content may have reached the server"),
        default=False,
        help_text=_("Set before its content is written: a crash then means unknown."),
    )
    sender = models.CharField(_("envelope sender"), max_length=320)
    recipients: models.JSONField[Any, Any] = models.JSONField(
        _("envelope recipients"), default=list
    )
    message_id = models.CharField(_("Message-ID"), max_length=255, blank=True)
    subject = models.CharField(_("subject"), max_length=255, blank=True)
    size = models.PositiveIntegerField(_("size in bytes"), default=0)
    delivery: models.JSONField[Any, Any] = models.JSONField(
        _("delivery options"), default=dict, blank=True
    )
    last_reply_code = models.PositiveSmallIntegerField(_("last reply code"), null=True, blank=True)
    last_reply = models.TextField(_("last reply"), blank=True)
    last_error = models.TextField(_("last error"), blank=True)
    queue_id = models.CharField(_("queue id"), max_length=128, blank=True)

    class Meta:
        verbose_name = _("queued message")
        verbose_name_plural = _("outbox")
        ordering: ClassVar[list[str]] = ["-created"]
        indexes: ClassVar[list[models.Index]] = [
            # The claim: due rows of one mailer, oldest first; partial, so that sent rows
            # (most of the table) are not in it and no sort of the backlog is needed.
            models.Index(
                fields=["mailer", "next_attempt", "id"],
                condition=models.Q(status__in=["queued", "deferred"]),
                name="socketmail_outbox_due",
            ),
            models.Index(fields=["status", "lease_expires"], name="socketmail_outbox_lease"),
            models.Index(fields=["created"], name="socketmail_outbox_created"),
            models.Index(fields=["message_id"], name="socketmail_outbox_msgid"),
        ]

    def __str__(self) -> str:
        return f"{self.subject or '(no subject)'} ({self.status})"


class OutboxContent(models.Model):
    """The exact bytes of a queued message, as the serializer produced them."""

    message = models.OneToOneField(
        OutboxMessage, on_delete=models.CASCADE, primary_key=True, related_name="content"
    )
    data = models.BinaryField(_("message"))

    class Meta:
        verbose_name = _("queued message content")

    def __str__(self) -> str:
        return f"content of queued message #{self.pk}"


class MailerState(models.Model):
    """What all workers of one mailer share: when the next message may go (``rate_limit``),
    until when the server asked us to slow down (a throttle reply), and until when its
    server is passed over for the ``failover`` mailers."""

    mailer = models.CharField(_("mailer"), max_length=100, primary_key=True)
    next_send = models.DateTimeField(_("next message allowed at"), null=True, blank=True)
    paused_until = models.DateTimeField(_("paused until"), null=True, blank=True)
    throttles = models.PositiveIntegerField(_("throttle replies in a row"), default=0)
    down_until = models.DateTimeField(
        _("server skipped for its fallbacks until"), null=True, blank=True
    )
    run_requested = models.DateTimeField(
        _("delivery run enqueued at"),
        null=True,
        blank=True,
        help_text=_("Set when a run is enqueued, cleared when it starts."),
    )
    last_throttle_reply = models.TextField(_("last throttle reply"), blank=True)

    class Meta:
        verbose_name = _("mailer state")

    def __str__(self) -> str:
        return self.mailer or "(default)"


class MailerSlot(models.Model):
    """One of a mailer's ``max_connections``: held by one worker (under a lease) while it
    has a session open."""

    mailer = models.CharField(_("mailer"), max_length=100)
    number = models.PositiveSmallIntegerField(_("slot"))
    holder = models.CharField(_("held by"), max_length=64, blank=True)
    expires = models.DateTimeField(_("lease expires"), null=True, blank=True)

    class Meta:
        verbose_name = _("connection slot")
        constraints: ClassVar[list[models.BaseConstraint]] = [
            models.UniqueConstraint(fields=["mailer", "number"], name="socketmail_slot_unique")
        ]

    def __str__(self) -> str:
        return f"{self.mailer or '(default)'} #{self.number}"
