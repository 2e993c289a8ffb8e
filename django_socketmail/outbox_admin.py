"""The outbox in the admin: read-only, with two actions (retry now, cancel) and a link to
each message's audit rows (by Message-ID)."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.http import urlencode

from .outbox import OutboxMessage, OutboxStatus

RETRYABLE = (
    OutboxStatus.QUEUED,
    OutboxStatus.DEFERRED,
    OutboxStatus.FAILED,
    OutboxStatus.UNKNOWN,
)
CANCELLABLE = (OutboxStatus.QUEUED, OutboxStatus.DEFERRED)


@admin.register(OutboxMessage)
class OutboxMessageAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = (
        "created",
        "status",
        "mailer",
        "sender",
        "subject",
        "attempts",
        "next_attempt",
        "last_reply_code",
        "queue_id",
    )
    list_filter = ("status", "mailer")
    search_fields = ("sender", "subject", "message_id", "queue_id")
    date_hierarchy = "created"
    actions = ("retry_now", "cancel")
    exclude = ("lease_owner",)

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        return [f.name for f in OutboxMessage._meta.fields] + ["audit_rows"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    @admin.display(description="audit rows")
    def audit_rows(self, obj: OutboxMessage) -> str:
        url = reverse("admin:django_socketmail_messagelog_changelist")
        query = urlencode({"outbox__id__exact": obj.pk})
        count = obj.attempts_logged if hasattr(obj, "attempts_logged") else obj.attempts
        return format_html('<a href="{}?{}">attempts of this message ({})</a>', url, query, count)

    @admin.action(description="Retry selected messages now", permissions=["change"])
    def retry_now(self, request: HttpRequest, queryset: QuerySet[OutboxMessage]) -> None:
        from .queue import kick

        chosen = queryset.filter(status__in=RETRYABLE)
        mailers = sorted(set(chosen.values_list("mailer", flat=True)))
        count = chosen.update(status=OutboxStatus.QUEUED, next_attempt=timezone.now())
        for mailer in mailers:
            kick(mailer)
        self.message_user(request, f"{count} messages queued again", messages.SUCCESS)

    @admin.action(description="Cancel selected messages", permissions=["change"])
    def cancel(self, request: HttpRequest, queryset: QuerySet[OutboxMessage]) -> None:
        count = queryset.filter(status__in=CANCELLABLE).update(status=OutboxStatus.CANCELLED)
        self.message_user(request, f"{count} messages cancelled", messages.SUCCESS)
