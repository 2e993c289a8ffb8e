"""The audit log in the Django admin: read-only for everyone, deletable with permission.

Server text is shown as data: every field a server wrote is escaped as HTML by Django and
its control characters are written as visible escapes; stored transcripts are split into
rows on ``\n`` only.  A session's page lists its latest :data:`INLINE_MESSAGES` messages
and links to the message list filtered by that session for the rest.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Final

from django.contrib import admin
from django.contrib.admin.options import IncorrectLookupParameters
from django.db import models, router
from django.db.models import Model, QuerySet
from django.forms.models import BaseInlineFormSet
from django.http import HttpRequest
from django.urls import reverse
from django.utils.formats import number_format
from django.utils.functional import cached_property
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString
from django.utils.text import capfirst
from django.utils.translation import gettext_lazy as _

from .models import MessageLog, RecipientLog, SessionLog
from .smtp.reply import escape_controls

if TYPE_CHECKING:
    from django_stubs_ext import StrOrPromise

INLINE_MESSAGES: Final = 50
"""Messages shown on a session's page (the latest ones); the others are a link away."""

DELETION_LISTED: Final = 50
"""Rows a delete confirmation lists one by one; above that it lists counts per model."""

_SIDES: Final = {"C": ("client", "→"), "S": ("server", "←"), "*": ("info", "·")}
_ROW: Final = re.compile(r"\+(?P<elapsed>[0-9]+\.[0-9]+) (?P<side>[CS*]): (?P<text>.*)", re.DOTALL)
"""One stored transcript row, as :func:`.audit.render_lines` writes it: ``+0.012 C: EHLO``."""


def format_duration(seconds: float) -> str:
    """``seconds`` for people: ``45.4 ms`` below a second, ``1.23 s`` below a minute,
    ``1 min 15.5 s`` above (rounded as shown, so 0.99996 reads ``1.00 s``)."""
    if seconds < 0:
        return "-" + format_duration(-seconds)
    if seconds == 0:
        return "0 ms"
    if round(seconds * 1000, 1) < 1000:
        return f"{seconds * 1000:.1f} ms"
    if round(seconds, 2) < 60:
        return f"{seconds:.2f} s"
    minutes, rest = divmod(round(seconds, 1), 60)
    return f"{int(minutes)} min {rest:.1f} s"


def server_text(text: str) -> SafeString:
    """Text a server wrote, shown as data: HTML escaped, control characters and line
    separators written as visible escapes, its ``\n`` line breaks kept (the stylesheet
    shows them with ``white-space: pre-wrap`` and wraps long unbroken lines)."""
    lines = (escape_controls(line) for line in text.split("\n"))
    return format_html('<span class="socketmail-text">{}</span>', "\n".join(lines))


def render_transcript(text: str) -> SafeString:
    """A stored transcript as a conversation: one table row per ``\n``-separated line.

    Only ``\n`` separates rows (``str.splitlines()`` also splits on CR, VT, FF, FS, GS,
    RS, NEL, U+2028 and U+2029, which a server can put inside one line).  A row's side
    comes from its own ``+elapsed C:``/``S:``/``*:`` prefix; a line without that prefix is
    shown whole as ``unparsed``.  Control characters in a row are shown as escapes.
    """
    if not text:
        return format_html("<p>{}</p>", _("(empty)"))
    rows = []
    for line in text.split("\n"):
        match = _ROW.fullmatch(line)
        if match is None:
            rows.append(("unparsed", "", "?", "unparsed", escape_controls(line)))
            continue
        kind, arrow = _SIDES[match["side"]]
        rows.append((kind, match["elapsed"], arrow, kind, escape_controls(match["text"])))
    body = format_html_join(
        "\n",
        '<tr class="socketmail-{}"><td class="t">{}</td><td class="d">{}</td>'
        '<td class="w">{}</td><td><code>{}</code></td></tr>',
        rows,
    )
    return format_html('<table class="socketmail-transcript">{}</table>', body)


def _server_text_display(field: str, label: StrOrPromise) -> Any:
    """A read-only admin column showing the model field ``field`` through
    :func:`server_text`."""

    @admin.display(description=label)
    def show(model_admin: Any, obj: Any) -> SafeString | str:
        value = getattr(obj, field)
        return server_text(value) if value else model_admin.get_empty_value_display()

    return show


def _cascade(model: type[Model], lookup: str = "") -> list[tuple[type[Model], str]] | None:
    """The models whose rows are deleted with ``model``'s (``CASCADE``), each with the
    lookup from it to ``model``'s primary key; ``None`` when a relation on the way can
    refuse or change a deletion (``PROTECT``, ``RESTRICT``, ``SET(...)``)."""
    found: list[tuple[type[Model], str]] = []
    for relation in model._meta.related_objects:
        on_delete = getattr(relation, "on_delete", None)
        if on_delete in (models.SET_NULL, models.SET_DEFAULT, models.DO_NOTHING):
            continue
        related = relation.related_model
        if on_delete is not models.CASCADE or not isinstance(related, type):
            return None
        path = f"{relation.field.name}__{lookup}" if lookup else relation.field.name
        below = _cascade(related, path)
        if below is None:
            return None
        found += [(related, path), *below]
    return found


class ReadOnlyAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """No adding, no changing: an audit log is evidence.  Deleting needs the permission.

    Deleting many rows (a session with its messages, or messages selected by the
    thousand) is confirmed on a page that lists the first objects and counts the rest
    per model, with the same permission rules as Django's listing.
    """

    class Media:
        css: ClassVar = {"all": ("django_socketmail/admin.css",)}

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def get_deleted_objects(
        self, objs: Sequence[Model] | QuerySet[Model], request: HttpRequest
    ) -> tuple[list[Any], dict[Any, int], set[Any], list[Any]]:
        """Django's listing when at most :data:`DELETION_LISTED` rows go, else a bounded
        summary: ``(objects to list, count per model, permissions lacking, protected)``."""
        cascade = _cascade(self.model)
        if cascade is None:
            return super().get_deleted_objects(objs, request)
        using = router.db_for_write(self.model)
        keys: QuerySet[Model, dict[str, Any]] | list[Any]
        if isinstance(objs, QuerySet):
            total, keys = objs.count(), objs.values("pk")
        else:
            total, keys = len(objs), [obj.pk for obj in objs]
        counts = {
            model: model._default_manager.using(using).filter(**{f"{path}__in": keys}).count()
            for model, path in cascade
        }
        if total + sum(counts.values()) <= DELETION_LISTED:
            return super().get_deleted_objects(objs, request)
        perms_needed: set[Any] = set()
        if not self.has_delete_permission(request):
            perms_needed.add(self.opts.verbose_name)
        for model, count in counts.items():
            model_admin = self.admin_site._registry.get(model)
            if count and model_admin is not None and not model_admin.has_delete_permission(request):
                perms_needed.add(model._meta.verbose_name)
        first = list(objs[:DELETION_LISTED])
        listed: list[Any] = [self._deleted_object(obj) for obj in first]
        if total > len(first):
            listed.append(
                _("… and %(count)s more %(name)s")
                % {
                    "count": number_format(total - len(first), force_grouping=True),
                    "name": self.opts.verbose_name_plural,
                }
            )
        with_them = [
            self._deleted_count(model, count, first) for model, count in counts.items() if count
        ]
        if with_them:
            listed.append(with_them)
        model_count = {self.opts.verbose_name_plural: total} | {
            model._meta.verbose_name_plural: count for model, count in counts.items() if count
        }
        return listed, model_count, perms_needed, []

    def _deleted_object(self, obj: Model) -> SafeString:
        url = reverse(
            f"admin:{self.opts.app_label}_{self.opts.model_name}_change",
            args=[obj.pk],
            current_app=self.admin_site.name,
        )
        return format_html('{}: <a href="{}">{}</a>', capfirst(self.opts.verbose_name), url, obj)

    def _deleted_count(self, model: type[Model], count: int, first: list[Model]) -> SafeString:
        """``20,000 messages``, a link to them when they are one session's messages."""
        shown = f"{number_format(count, force_grouping=True)} {model._meta.verbose_name_plural}"
        if model is MessageLog and self.model is SessionLog and len(first) == 1:
            url = reverse(
                "admin:django_socketmail_messagelog_changelist", current_app=self.admin_site.name
            )
            return format_html('<a href="{}?session__id__exact={}">{}</a>', url, first[0].pk, shown)
        return format_html("{}", shown)


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
    fields = ("address", "status", "reply_code", "reply_text")
    readonly_fields = fields
    reply_text = _server_text_display("reply", _("RCPT reply"))


class SessionFilter(admin.SimpleListFilter):
    """The messages of one session: the filter behind the link on a session's page.  It
    offers only the session already chosen, never a list of all sessions."""

    title = _("session")
    parameter_name = "session__id__exact"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        value = self.value()
        if not value:
            return []
        if not value.isdigit():
            return [(value, value)]  # shown so that queryset() runs and refuses it
        session = SessionLog.objects.filter(pk=int(value)).first()
        return [(value, str(session) if session else value)]

    def queryset(
        self, request: HttpRequest, queryset: QuerySet[MessageLog]
    ) -> QuerySet[MessageLog]:
        value = self.value()
        if value is None:
            return queryset
        if not value.isdigit():
            raise IncorrectLookupParameters(value)
        filtered: QuerySet[MessageLog] = queryset.filter(session_id=int(value))
        return filtered


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
        "elapsed",
        "server",
    )
    list_filter = (
        SessionFilter,
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
        "final_reply_text",
        "queue_id",
        "elapsed",
        "error_class",
        "error_text",
        "transient",
        "conversation",
        "body",
    )
    readonly_fields = fields
    final_reply_text = _server_text_display("final_reply", _("final reply"))
    error_text = _server_text_display("error", _("error"))

    @admin.display(description=_("recipients"))
    def short_recipients(self, obj: MessageLog) -> str:
        text = obj.recipients
        return text if len(text) <= 60 else text[:59] + "…"

    @admin.display(description=_("server"), ordering="session__host")
    def server(self, obj: MessageLog) -> str:
        return f"{obj.session.host}:{obj.session.port}" if obj.session else "—"

    @admin.display(description=_("duration"), ordering="duration")
    def elapsed(self, obj: MessageLog) -> str:
        return format_duration(obj.duration)

    @admin.display(description=_("session"))
    def session_link(self, obj: MessageLog) -> SafeString | str:
        if obj.session is None:
            return "—"
        url = reverse(
            "admin:django_socketmail_sessionlog_change",
            args=[obj.session.pk],
            current_app=self.admin_site.name,
        )
        return format_html('<a href="{}">{}</a>', url, obj.session)

    @admin.display(description=_("conversation"))
    def conversation(self, obj: MessageLog) -> SafeString:
        return render_transcript(obj.transcript)


class LatestMessagesFormSet(BaseInlineFormSet):  # type: ignore[type-arg]
    """The session's latest :data:`INLINE_MESSAGES` messages, with the count of all.

    ``total`` costs one ``COUNT`` query, and only when the page is full.
    """

    _latest: QuerySet[MessageLog] | None = None

    def get_queryset(self) -> QuerySet[MessageLog]:
        if self._latest is None:
            self._latest = super().get_queryset()[:INLINE_MESSAGES]
        return self._latest

    @cached_property
    def total(self) -> int:
        """How many messages the session has."""
        shown = len(self.get_queryset())
        if shown < INLINE_MESSAGES:
            return shown
        session: SessionLog = self.instance
        return session.messages.count()

    @property
    def total_display(self) -> str:
        """``total`` with thousands grouped for the active locale (``20,000``)."""
        return number_format(self.total, force_grouping=True)

    @property
    def is_bounded(self) -> bool:
        """Whether some of the session's messages are not shown."""
        return self.total > len(self.get_queryset())


class MessageInline(ReadOnlyInline):
    """The latest messages of a session, and a link to all of them."""

    model = MessageLog
    formset = LatestMessagesFormSet
    template = "django_socketmail/admin/latest_messages.html"
    ordering = ("-created", "-pk")
    fields = ("created", "status", "subject", "recipients", "queue_id", "final_reply_text")
    readonly_fields = fields
    show_change_link = True
    final_reply_text = _server_text_display("final_reply", _("final reply"))


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
        "certificate_text",
        "auth_mechanism",
        "auth_username",
        "local_hostname",
        "greeting_text",
        "extensions_text",
        "outcome",
        "error_class",
        "error_text",
        "messages_sent",
        "conversation",
    )
    readonly_fields = fields
    certificate_text = _server_text_display("certificate", _("certificate subject"))
    greeting_text = _server_text_display("greeting", _("greeting"))
    extensions_text = _server_text_display("extensions", _("advertised extensions"))
    error_text = _server_text_display("error", _("error"))

    @admin.display(description=_("conversation (outside messages)"))
    def conversation(self, obj: SessionLog) -> SafeString:
        return render_transcript(obj.transcript)
