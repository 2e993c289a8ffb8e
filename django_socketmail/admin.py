"""The audit log in the Django admin: read-only for everyone, deletable with permission."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString
from django.utils.translation import gettext_lazy as _

from .models import MessageLog, RecipientLog, SessionLog

_SIDES = {"C": ("client", "→"), "S": ("server", "←"), "*": ("info", "·")}


def render_transcript(text: str) -> SafeString:
    """A stored transcript as a conversation: client and server lines told apart."""
    rows = []
    for line in text.splitlines():
        elapsed, _sep, rest = line.partition(" ")
        side, _sep, content = rest.partition(": ")
        kind, arrow = _SIDES.get(side, ("info", "·"))
        rows.append((kind, elapsed, arrow, kind, content))
    if not rows:
        return format_html("<p>{}</p>", _("(empty)"))
    body = format_html_join(
        "\n",
        '<tr class="socketmail-{}"><td class="t">{}</td><td class="d">{}</td>'
        '<td class="w">{}</td><td><code>{}</code></td></tr>',
        rows,
    )
    style = format_html(
        "<style>{}</style>",
        ".socketmail-transcript td{{padding:1px 6px;vertical-align:top;white-space:pre-wrap}}"
        ".socketmail-client code{{color:#0b5394}}.socketmail-server code{{color:#38761d}}"
        ".socketmail-info code{{color:#777;font-style:italic}}"
        ".socketmail-transcript .t{{color:#999}}",
    )
    return format_html('{}<table class="socketmail-transcript">{}</table>', style, body)


class ReadOnlyAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """No adding, no changing: an audit log is evidence.  Deleting needs the permission."""

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class ReadOnlyInline(admin.TabularInline):  # type: ignore[type-arg]
    """Rows shown under their parent, never added, changed or deleted there."""

    extra = 0
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class RecipientInline(ReadOnlyInline):
    model = RecipientLog
    fields = ("address", "status", "reply_code", "reply")
    readonly_fields = fields


@admin.register(MessageLog)
class MessageLogAdmin(ReadOnlyAdmin):
    list_display = (
        "created",
        "status",
        "subject",
        "sender",
        "short_recipients",
        "queue_id",
        "final_reply_code",
        "server",
    )
    list_filter = (
        "status",
        "session__host",
        "session__auth_mechanism",
        "session__tls_version",
        "transient",
    )
    search_fields = ("recipient_logs__address", "sender", "subject", "message_id", "queue_id")
    date_hierarchy = "created"
    list_select_related = ("session",)
    inlines = (RecipientInline,)
    show_full_result_count = False
    fields = (
        "created",
        "status",
        "session_link",
        "message_id",
        "sender",
        "recipients",
        "subject",
        "size",
        "final_reply_code",
        "final_reply",
        "queue_id",
        "duration",
        "error_class",
        "error",
        "transient",
        "conversation",
        "body",
    )
    readonly_fields = fields

    @admin.display(description=_("recipients"))
    def short_recipients(self, obj: MessageLog) -> str:
        text = obj.recipients
        return text if len(text) <= 60 else text[:59] + "…"

    @admin.display(description=_("server"), ordering="session__host")
    def server(self, obj: MessageLog) -> str:
        return f"{obj.session.host}:{obj.session.port}" if obj.session else "—"

    @admin.display(description=_("session"))
    def session_link(self, obj: MessageLog) -> SafeString | str:
        if obj.session is None:
            return "—"
        return format_html(
            '<a href="../../../sessionlog/{}/change/">{}</a>', obj.session.pk, obj.session
        )

    @admin.display(description=_("conversation"))
    def conversation(self, obj: MessageLog) -> SafeString:
        return render_transcript(obj.transcript)


class MessageInline(ReadOnlyInline):
    model = MessageLog
    fields = ("created", "status", "subject", "recipients", "queue_id", "final_reply")
    readonly_fields = fields
    show_change_link = True


@admin.register(SessionLog)
class SessionLogAdmin(ReadOnlyAdmin):
    list_display = (
        "created",
        "outcome",
        "host",
        "port",
        "tls_version",
        "auth_mechanism",
        "messages_sent",
        "error_class",
    )
    list_filter = ("outcome", "host", "auth_mechanism", "tls_version")
    search_fields = ("host", "auth_username", "error")
    date_hierarchy = "created"
    inlines = (MessageInline,)
    show_full_result_count = False
    fields = (
        "created",
        "ended",
        "mailer",
        "host",
        "port",
        "tls_version",
        "tls_cipher",
        "certificate",
        "auth_mechanism",
        "auth_username",
        "local_hostname",
        "greeting",
        "extensions",
        "outcome",
        "error_class",
        "error",
        "messages_sent",
        "conversation",
    )
    readonly_fields = fields

    @admin.display(description=_("conversation (outside messages)"))
    def conversation(self, obj: SessionLog) -> SafeString:
        return render_transcript(obj.transcript)
