"""Writes the audit log from what the SMTP client observed: the transcript and the results.

One :class:`AuditRecorder` follows one SMTP session of a backend.  The backend tells it
about each message attempt and about the session's end; it buffers plain values and
writes them in one transaction per :meth:`AuditRecorder.flush` (the backend flushes once
per ``send_messages()`` call and when the session ends), so logging costs a few queries
per call, not per message.

Guarantees:

- a failed write never changes the send result and never causes a resend: it is reported
  on the ``django_socketmail`` logger and dropped;
- rows survive the caller's rollback: when the audit database's connection is inside an
  atomic block, rows are written through a separate connection to the same database, or
  to the ``audit_database`` alias when one is set.  SQLite has a single writer: if the
  caller's transaction already wrote, the rows are written inside it (with a warning),
  so on SQLite set ``audit_database`` to a database of its own;
- nothing written comes from anything but the redacted transcript, the results and the
  message headers: no credential can reach a column.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

from django.db import OperationalError, connections, router, transaction
from django.utils import timezone

from .smtp import SendResult, SendStatus, SMTPClient
from .smtp.errors import ReplyError
from .smtp.transcript import TranscriptLine

if TYPE_CHECKING:
    from django.core.mail import EmailMessage

    from .conf import BackendOptions

__all__ = ["AuditRecorder", "render_lines"]

logger = logging.getLogger("django_socketmail")

CLONE_SUFFIX = "__socketmail_audit"
LOCKED_RETRY_PAUSES = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5)
"""Pauses between tries of a write that found the database locked (about 1.5 s in all)."""
MAX_SESSION_LINES = 2000
"""The session's own transcript (outside messages) keeps its latest lines only."""
_HEAD_BYTES: Final = 64 * 1024
"""The Message-ID header is looked for in this many leading bytes of the message."""


def render_lines(lines: list[TranscriptLine]) -> str:
    """Transcript lines as stored: ``+0.012 C: EHLO web1``, one per line."""
    return "\n".join(f"+{line.elapsed:.3f} {line}" for line in lines)


@dataclass(slots=True)
class _MessageRecord:
    created: datetime
    result: SendResult
    message_id: str
    subject: str
    transcript: str
    body: str


@dataclass(slots=True)
class AuditRecorder:
    """Buffers one session's audit records and writes them in batches."""

    options: BackendOptions
    mailer: str
    client: SMTPClient
    started: datetime = field(default_factory=timezone.now)
    _session_pk: int | None = None
    _session_lines: list[TranscriptLine] = field(default_factory=list)
    _messages: list[_MessageRecord] = field(default_factory=list)
    _ended: datetime | None = None
    _error: BaseException | None = None

    def message_finished(
        self, message: EmailMessage | None, result: SendResult, raw: Sequence[bytes]
    ) -> None:
        """Record one attempt, with its own part of the transcript (``result.transcript``)."""
        body_bytes = self.options.audit_body_bytes
        self._messages.append(
            _MessageRecord(
                created=timezone.now() - timedelta(seconds=result.elapsed),
                result=result,
                message_id=_header(message, "Message-ID", _leading(raw, _HEAD_BYTES)),
                subject=str(message.subject) if message is not None else "",
                transcript=render_lines(result.transcript),
                body=_leading(raw, body_bytes).decode("utf-8", "replace") if body_bytes else "",
            )
        )

    def session_ended(self, error: BaseException | None) -> None:
        """The session is over (closed, or failed to open or to go on)."""
        self._ended = timezone.now()
        self._error = error

    def flush(self) -> None:
        """Write what is buffered; never raises."""
        self._session_lines += self.client.transcript.take_untapped()
        del self._session_lines[:-MAX_SESSION_LINES]
        if not self.options.audit_log:
            self._messages.clear()
            return
        try:
            self._write()
        except Exception:
            logger.exception(
                "django-socketmail could not write the audit log for %s:%s; the send "
                "results stand and nothing will be resent",
                self.options.host,
                self.options.port,
            )
        finally:
            self._messages.clear()

    def _write(self) -> None:
        alias, clone = _audit_alias(self.options.audit_database)
        try:
            self._write_rows_retrying(alias, retry=clone is None)
        except OperationalError:
            if clone is None or clone.vendor != "sqlite":
                raise
            # SQLite has one writer: the caller's open transaction holds it.  Write with the
            # caller's connection instead; the rows then share that transaction's fate.
            logger.warning(
                "django-socketmail: SQLite is locked by the open transaction, so the audit "
                "rows are written inside it and will vanish if it rolls back; set "
                "SOCKETMAIL['audit_database'] to a separate database to keep them."
            )
            self._write_rows(alias.removesuffix(CLONE_SUFFIX))
        finally:
            if clone is not None:
                _close_clone(clone)

    def _write_rows_retrying(self, alias: str, *, retry: bool) -> None:
        """Write; a database that is briefly locked by another writer (SQLite) is retried a
        few times (with jitter, so writers do not collide again) rather than losing rows."""
        for pause in (*LOCKED_RETRY_PAUSES, None) if retry else (None,):
            try:
                self._write_rows(alias)
                return
            except OperationalError as error:
                if pause is None or "locked" not in str(error):
                    raise
                time.sleep(pause * random.uniform(0.5, 1.5))

    def _write_rows(self, alias: str) -> None:
        from .models import MessageLog, RecipientLog, SessionLog

        with transaction.atomic(using=alias):
            session = self._save_session(SessionLog, alias)
            if not self._messages:
                return
            connection = connections[alias]
            created: Any = MessageLog._meta.get_field("created")
            rows = [
                self._message_row(
                    MessageLog, session.pk, created.get_db_prep_save(r.created, connection), r
                )
                for r in self._messages
            ]
            _insert_many(alias, MessageLog, _MESSAGE_COLUMNS, rows)
            ids = _newest_ids(alias, MessageLog, session.pk, len(rows))
            recipient_rows = [
                (
                    message_id,
                    _cut(RecipientLog, "address", r.address),
                    r.status.value,
                    r.reply.code if r.reply else None,
                    r.reply.text if r.reply else "",
                )
                for message_id, record in zip(ids, self._messages, strict=True)
                for r in record.result.recipients
            ]
            _insert_many(alias, RecipientLog, _RECIPIENT_COLUMNS, recipient_rows)

    def _save_session(self, model: Any, alias: str) -> Any:
        info = self.client.info
        error = self._error
        values: dict[str, Any] = {
            "mailer": self.mailer,
            "host": self.options.host,
            "port": self.options.port,
            "tls_version": info.tls_version or "",
            "tls_cipher": info.tls_cipher or "",
            "certificate": _cut(model, "certificate", info.peer_certificate),
            "auth_mechanism": info.auth_mechanism or "",
            "auth_username": _cut(model, "auth_username", info.auth_username),
            "local_hostname": _cut(model, "local_hostname", info.local_hostname),
            "greeting": str(info.greeting) if info.greeting else "",
            "extensions": "\n".join(
                f"{k} {v}".strip() for k, v in info.extensions.keywords.items()
            ),
            "outcome": "failed" if error is not None else "ok",
            "error_class": _cut(model, "error_class", _class_name(error)),
            "error": str(error) if error is not None else "",
            "messages_sent": info.messages_sent,
            "ended": self._ended,
            "transcript": render_lines(self._session_lines),
        }
        if self._session_pk is None:
            session = model.objects.using(alias).create(created=self.started, **values)
            # Known only once the transaction commits (a retry must create it again).
            transaction.on_commit(lambda: setattr(self, "_session_pk", session.pk), using=alias)
            return session
        model.objects.using(alias).filter(pk=self._session_pk).update(**values)
        return model(pk=self._session_pk)

    @staticmethod
    def _message_row(
        model: Any, session_id: int, created: Any, record: _MessageRecord
    ) -> tuple[Any, ...]:
        """A MessageLog row, in the order of :data:`_MESSAGE_COLUMNS`."""
        result = record.result
        error = result.error
        final = result.final_reply
        return (
            session_id,
            created,
            result.status.value,
            _cut(model, "message_id", record.message_id),
            _cut(model, "sender", result.mail_from),
            ", ".join(r.address for r in result.recipients),
            _cut(model, "subject", record.subject),
            result.size,
            final.code if final else None,
            final.text if final else "",
            _cut(model, "queue_id", result.queue_id),
            result.elapsed,
            _cut(model, "error_class", _class_name(error)),
            str(error) if error is not None else "",
            _transient(result),
            record.transcript,
            record.body,
        )


_MESSAGE_COLUMNS: Final = (
    "session",
    "created",
    "status",
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
    "transcript",
    "body",
)
_RECIPIENT_COLUMNS: Final = ("message", "address", "status", "reply_code", "reply")


def _newest_ids(alias: str, model: Any, session_id: int, count: int) -> list[int]:
    """The ids of the session's ``count`` newest rows of ``model``, oldest first: the rows
    just inserted (ids grow with insertion order, and only this recorder writes rows of
    its session)."""
    connection = connections[alias]
    quote = connection.ops.quote_name
    meta = model._meta
    sql = (
        f"SELECT {quote(meta.pk.column)} FROM {quote(meta.db_table)} "  # noqa: S608 - names from the model
        f"WHERE {quote(meta.get_field('session').column)} = %s "
        f"ORDER BY {quote(meta.pk.column)} DESC"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [session_id])
        ids = [row[0] for row in cursor.fetchmany(count)]
    if len(ids) != count:
        raise RuntimeError(f"wrote {count} audit rows but found {len(ids)}")
    return ids[::-1]


def _audit_alias(configured: str | None) -> tuple[str, Any]:
    """The alias to write with, and the connection we opened for it (None if not ours).

    A configured alias is used as is.  Otherwise the router's alias, unless its connection
    is inside an atomic block: then a new connection to the same database, registered for
    this thread only and closed after the write, so that a rollback of the caller's
    transaction does not take the audit rows with it.
    """
    if configured:
        return configured, None
    from .models import SessionLog

    alias = router.db_for_write(SessionLog)
    base = connections[alias]
    if not base.in_atomic_block:
        return alias, None
    clone_alias = alias + CLONE_SUFFIX
    settings_dict = dict(base.settings_dict)
    if base.vendor == "sqlite":
        # Never wait for the lock the caller may hold: fall back at once (see _write).
        settings_dict["OPTIONS"] = {**settings_dict.get("OPTIONS", {}), "timeout": 0.05}
    clone = type(base)(settings_dict, alias=clone_alias)
    connections[clone_alias] = clone
    return clone_alias, clone


def _insert_many(
    alias: str, model: Any, names: tuple[str, ...], rows: list[tuple[Any, ...]]
) -> None:
    """INSERT plain rows (values ready for the database) with one ``executemany``: the
    ORM's per-object and per-value preparation would be most of the audit log's cost."""
    if not rows:
        return
    connection = connections[alias]
    quote = connection.ops.quote_name
    columns = ", ".join(quote(model._meta.get_field(name).column) for name in names)
    placeholders = ", ".join(["%s"] * len(names))
    sql = f"INSERT INTO {quote(model._meta.db_table)} ({columns}) VALUES ({placeholders})"  # noqa: S608 - names from the model, values bound
    with connection.cursor() as cursor:
        cursor.executemany(sql, rows)


def _close_clone(clone: Any) -> None:
    """Close our own connection, even to an in-memory SQLite database (whose wrapper ignores
    close() to protect the data: the caller's connection keeps it alive)."""
    try:
        clone.close()
        if clone.connection is not None:
            clone.connection.close()
            clone.connection = None
    finally:
        del connections[clone.alias]


def _cut(model: Any, name: str, value: Any) -> str:
    from .models import truncate

    return truncate(value, model._meta.get_field(name))


def _class_name(error: BaseException | None) -> str:
    if error is None:
        return ""
    return f"{type(error).__module__}.{type(error).__qualname__}"


def _transient(result: SendResult) -> bool | None:
    if result.status in (SendStatus.SENT,):
        return None
    error = result.error
    if isinstance(error, ReplyError):
        return error.is_transient
    transient = getattr(error, "is_transient", None)
    if isinstance(transient, bool):
        return transient
    return None


def _leading(parts: Sequence[bytes], limit: int) -> bytes:
    """The first ``limit`` bytes of the message sent as ``parts``."""
    taken: list[bytes] = []
    for part in parts:
        if limit <= 0:
            break
        taken.append(part[:limit])
        limit -= len(taken[-1])
    return b"".join(taken)


def _header(message: EmailMessage | None, name: str, raw: bytes) -> str:
    """A header's value from the serialized message (the one actually sent)."""
    end = raw.find(b"\r\n\r\n")
    head = raw[: end if end >= 0 else len(raw)]
    prefix = name.lower().encode() + b":"
    for line in head.split(b"\r\n"):
        if line.lower().startswith(prefix):
            return line[len(prefix) :].strip().decode("ascii", "replace")
    return ""
