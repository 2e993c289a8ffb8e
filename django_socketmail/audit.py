"""Writes the audit log from what the SMTP client observed: the transcript and the results.

One :class:`AuditRecorder` follows one SMTP session of a backend.  The backend tells it
about each message attempt and about the session's end; it buffers plain values and
writes them in one transaction per :meth:`AuditRecorder.flush` (the backend flushes once
per ``send_messages()`` call and when the session ends), so logging costs a few queries
per call, not per message.  With ``audit_background=True`` a flush takes the values and
hands them to one writer thread per process (:mod:`.audit_writer`), which writes the rows
of several flushes per transaction; :func:`drain_audit_log` waits for them.  The
guarantees below hold either way.

Guarantees:

- a failed write never changes the send result and never causes a resend: it is reported
  on the ``django_socketmail`` logger and dropped;
- one flush spends at most about :data:`WRITE_BUDGET` seconds on SQLite, waits for a
  lock held elsewhere and retries included (a backup or a long transaction in another
  process costs the rows of that flush, not the caller's time); on PostgreSQL each wait
  for a lock held elsewhere is cut at what was left of the budget when the write began;
- every text value goes through :func:`~.models.storable`: a NUL (which PostgreSQL refuses
  in text) is stored as the visible escape ``\\x00`` and every value fits its column, so
  nothing a server or a user writes (a reply line, a Subject typed into a form) costs rows;
- without ``"django_socketmail"`` in ``INSTALLED_APPS`` there are no tables to write to:
  the audit log is off, with one warning per process that names the fix;
- a session row is only ever updated in the database it was created in;
- rows survive the caller's rollback: when the audit database's connection is inside an
  atomic block, rows are written through a separate connection to the same database, or
  to the ``audit_database`` alias when one is set.  SQLite has a single writer: if the
  caller's transaction already wrote, the rows are written inside it (with a warning),
  so on SQLite set ``audit_database`` to a database of its own;
- nothing written comes from anything but the redacted transcript, the results and the
  message headers: no credential can reach a column.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from datetime import timezone as dt_timezone
from typing import TYPE_CHECKING, Any, Final

from django.apps import apps
from django.conf import settings
from django.core.exceptions import AppRegistryNotReady
from django.core.signals import setting_changed
from django.db import OperationalError, connections, router, transaction
from django.utils import timezone

from .rows import insert_many, update_row
from .smtp import SendResult, SendStatus, SMTPClient
from .smtp.errors import ReplyError
from .smtp.transcript import TranscriptLine

if TYPE_CHECKING:
    from django.core.mail import EmailMessage

    from .conf import BackendOptions

__all__ = ["AuditJob", "AuditRecorder", "drain_audit_log", "render_lines"]

logger = logging.getLogger("django_socketmail")

CLONE_SUFFIX = "__socketmail_audit"
WRITE_BUDGET: Final = 1.5
"""Most seconds one flush spends writing, tries, pauses and SQLite's waits for a lock
included (the busy timeout of each try is cut to what is left)."""
LOCKED_RETRY_PAUSES: Final = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5)
"""Pauses between tries of a write that found the database locked, within the budget."""
APP_LABEL: Final = "django_socketmail"
MAX_SESSION_LINES = 2000
"""The session's own transcript (outside messages) keeps its latest lines only."""
_HEAD_BYTES: Final = 64 * 1024
"""The Message-ID header is looked for in this many leading bytes of the message."""


_installed: bool | None = None
"""Whether the app is in INSTALLED_APPS, once looked up (reset when the setting changes)."""
_warned_not_installed = False
_warn_lock: Final = threading.Lock()


def _app_installed() -> bool:
    """Whether ``"django_socketmail"`` is installed (its tables can exist): a cached check,
    with one warning per process when it is not."""
    global _installed, _warned_not_installed
    installed = _installed
    if installed is None:
        try:
            installed = _installed = apps.is_installed(APP_LABEL)
        except AppRegistryNotReady:
            return False
    if installed or _warned_not_installed:
        return installed
    with _warn_lock:
        if _warned_not_installed:
            return False
        _warned_not_installed = True
    logger.warning(
        "django-socketmail: the audit log is off because %r is not in INSTALLED_APPS, so "
        "its tables cannot exist. Add %r to INSTALLED_APPS and run migrate to keep the "
        "log of every SMTP conversation, or set audit_log=False (SOCKETMAIL or the "
        "backend's OPTIONS) to say you do not want it. Mail is sent either way.",
        APP_LABEL,
        APP_LABEL,
    )
    return False


def _forget_installed(*, setting: str, **kwargs: Any) -> None:
    global _installed
    if setting == "INSTALLED_APPS":
        _installed = None


setting_changed.connect(_forget_installed, dispatch_uid="django_socketmail.audit.installed")


def render_lines(lines: Sequence[TranscriptLine]) -> str:
    """Transcript lines as stored: ``+0.012 C: EHLO web1``, one per line."""
    return "\n".join(f"+{line.elapsed:.3f} {line}" for line in lines)


@dataclass(slots=True)
class _MessageRecord:
    """One attempt as it finished, in plain values taken at once (cheap: the row's text is
    built when it is written, in the caller's thread or the writer's)."""

    started: float
    status: str
    mail_from: str
    recipients: tuple[tuple[str, str, int | None, str], ...]
    size: int
    final: Any
    queue_id: str | None
    elapsed: float
    error: BaseException | None
    transient: bool | None
    outbox_id: int | None
    transcript: tuple[TranscriptLine, ...]
    subject: str
    message_id: str
    body: bytes
    """The message's leading ``audit_body_bytes`` (decoded when written)."""


@dataclass(slots=True)
class _SessionState:
    """The session's facts at one flush (a later flush brings newer ones)."""

    info: tuple[Any, ...]
    messages_sent: int
    lines: tuple[TranscriptLine, ...]
    ended: datetime | None
    error: BaseException | None


@dataclass(slots=True, eq=False)  # compared by identity (the writer's queue)
class AuditJob:
    """What one :meth:`AuditRecorder.flush` hands over: plain values, written in one
    transaction (inline, or by :mod:`.audit_writer`, which may merge the jobs of one recorder
    that are still waiting)."""

    recorder: AuditRecorder
    database: str | None
    """``audit_database`` at the flush (None: the router's choice)."""
    messages: list[_MessageRecord]
    state: _SessionState

    def merge(self, later: AuditJob) -> None:
        """Take a later job of the same recorder and database into this one."""
        self.messages += later.messages
        self.state = later.state


@dataclass(slots=True)
class AuditRecorder:
    """Buffers one session's audit records and writes them in batches."""

    options: BackendOptions
    mailer: str
    client: SMTPClient
    started: datetime = field(default_factory=timezone.now)
    _session_pks: dict[str, int] = field(default_factory=dict)
    """The session's row in each database written to, by alias (committed rows only)."""
    _session_lines: list[TranscriptLine] = field(default_factory=list)
    _written: dict[str, dict[str, Any]] = field(default_factory=dict)
    """The session row's values as last committed, by database: a later flush updates only
    the columns that changed (for a pooled call, ``messages_sent``)."""
    _rendered: tuple[int, str] = (0, "")
    """The session transcript as last rendered, and how many lines it had then."""
    _facts: tuple[tuple[Any, ...], dict[str, Any]] = ((), {})
    """The session row's columns that come from the connection's facts, as last made
    storable, and those facts (they change only while the session opens)."""
    _messages: list[_MessageRecord] = field(default_factory=list)
    _ended: datetime | None = None
    _error: BaseException | None = None
    writing: threading.Lock = field(default_factory=threading.Lock)
    """Held while a job of this recorder is written (by the caller or the writer thread):
    the recorder's bookkeeping of its rows is touched under it only."""

    def message_finished(
        self, message: EmailMessage | None, result: SendResult, raw: Sequence[bytes]
    ) -> None:
        """Record one attempt, with its own part of the transcript (``result.transcript``).

        The row's ``created`` is ``result.started`` (the wall-clock time its first command
        was written) and its ``duration`` is ``result.elapsed``.  Nothing is kept when the
        audit log is off.  The values are taken now (a result or message changed later does
        not change the row).
        """
        if not self._enabled():
            return
        final = result.final_reply
        self._messages.append(
            _MessageRecord(
                started=result.started,
                status=result.status.value,
                mail_from=result.mail_from,
                recipients=tuple(
                    (
                        r.address,
                        r.status.value,
                        r.reply.code if r.reply else None,
                        r.reply.text if r.reply else "",
                    )
                    for r in result.recipients
                ),
                size=result.size,
                final=final,
                queue_id=result.queue_id,
                elapsed=result.elapsed,
                error=result.error,
                transient=_transient(result),
                outbox_id=result.outbox_id,
                transcript=tuple(result.transcript),
                subject=str(message.subject) if message is not None else "",
                message_id=_header(message, "Message-ID", _leading(raw, _HEAD_BYTES)),
                body=_leading(raw, self.options.audit_body_bytes),
            )
        )

    def session_ended(self, error: BaseException | None) -> None:
        """The session is over (closed, or failed to open or to go on)."""
        self._ended = timezone.now()
        self._error = error

    def flush(self) -> None:
        """Write what is buffered, in at most about :data:`WRITE_BUDGET` seconds on SQLite;
        never raises (a failed write is logged and its rows dropped).  Returns at once when
        the audit log is off or the app is not installed.

        With ``audit_background=True`` the rows are handed to the process's writer thread
        (:mod:`.audit_writer`) instead, unless the audit database is an in-memory SQLite
        database (which other threads cannot see) or the writer's queue is full: then they
        are written here, as without the option."""
        self._session_lines += self.client.transcript.take_untapped()
        del self._session_lines[:-MAX_SESSION_LINES]
        if not self._enabled():
            self._messages.clear()
            return
        messages, self._messages = self._messages, []
        info = self.client.info
        job = AuditJob(
            self,
            self.options.audit_database,
            messages,
            _SessionState(
                (
                    info.tls_version,
                    info.tls_cipher,
                    info.peer_certificate,
                    info.auth_mechanism,
                    info.auth_username,
                    info.local_hostname,
                    info.greeting,
                    tuple(info.extensions.keywords.items()),
                ),
                info.messages_sent,
                tuple(self._session_lines),
                self._ended,
                self._error,
            ),
        )
        if self.options.audit_background:
            from .audit_writer import submit

            submit(job)
            return
        write_inline(job)

    def _enabled(self) -> bool:
        return self.options.audit_log and _app_installed()

    def write(self, job: AuditJob, alias: str, connection: Any) -> None:
        """Write ``job``'s rows with ``connection`` (of ``alias``), inside the caller's
        transaction: the caller holds :attr:`writing`."""
        from .models import MessageLog, RecipientLog, SessionLog

        session_pk = self._save_session(SessionLog, alias, job.state)
        if not job.messages:
            return
        created: Any = MessageLog._meta.get_field("created")
        rows = [
            self._message_row(
                MessageLog,
                session_pk,
                created.get_db_prep_save(_wall_clock(r.started), connection),
                r,
                self.options.audit_body_bytes,
            )
            for r in job.messages
        ]
        last_id = insert_many(alias, MessageLog, _MESSAGE_COLUMNS, rows)
        if len(rows) == 1 and last_id is not None:
            ids = [last_id]  # one row (a pooled call): no read-back query
        else:
            ids = _newest_ids(alias, MessageLog, session_pk, len(rows))
        recipient_rows = [
            (
                message_id,
                _text(RecipientLog, "address", address),
                status,
                code,
                _text(RecipientLog, "reply", text),
            )
            for message_id, record in zip(ids, job.messages, strict=True)
            for address, status, code, text in record.recipients
        ]
        insert_many(alias, RecipientLog, _RECIPIENT_COLUMNS, recipient_rows)

    def _save_session(self, model: Any, alias: str, state: _SessionState) -> int:
        """Create the session's row in ``alias``'s database, or update the one created there
        before (a row in another database is never touched); returns its primary key."""
        error = state.error
        values: dict[str, Any] = {
            **self._fact_columns(model, state.info),
            "outcome": "failed" if error is not None else "ok",
            "error_class": _text(model, "error_class", _class_name(error)),
            "error": _text(model, "error", error),
            "messages_sent": state.messages_sent,
            "ended": state.ended,
            "transcript": self._session_transcript(model, state.lines),
        }
        database = alias.removesuffix(CLONE_SUFFIX)  # our clone reaches the same database
        pk = self._session_pks.get(database)

        def committed(pk: int) -> None:
            # Known only once the transaction commits (a retry must write it again).
            self._session_pks[database] = pk
            self._written[database] = values

        if pk is None:
            session = model.objects.using(alias).create(created=self.started, **values)
            transaction.on_commit(lambda: committed(session.pk), using=alias)
            return int(session.pk)
        before = self._written.get(database, {})
        changed = {k: v for k, v in values.items() if k not in before or before[k] != v}
        if changed:
            update_row(alias, model, pk, changed)
            transaction.on_commit(lambda: committed(pk), using=alias)
        return pk

    def _fact_columns(self, model: Any, info: tuple[Any, ...]) -> dict[str, Any]:
        """The session row's columns from the connection's facts, made again only when
        those changed (a pooled session's calls share them)."""
        if self._facts[1] and self._facts[0] == info:
            return self._facts[1]
        tls_version, tls_cipher, certificate, mechanism, username, local, greeting, ext = info
        columns = {
            "mailer": _text(model, "mailer", self.mailer),
            "host": _text(model, "host", self.options.host),
            "port": self.options.port,
            "tls_version": _text(model, "tls_version", tls_version),
            "tls_cipher": _text(model, "tls_cipher", tls_cipher),
            "certificate": _text(model, "certificate", certificate),
            "auth_mechanism": _text(model, "auth_mechanism", mechanism),
            "auth_username": _text(model, "auth_username", username),
            "local_hostname": _text(model, "local_hostname", local),
            "greeting": _text(model, "greeting", greeting),
            "extensions": _text(model, "extensions", "\n".join(f"{k} {v}".strip() for k, v in ext)),
        }
        self._facts = (info, columns)
        return columns

    def _session_transcript(self, model: Any, lines: tuple[TranscriptLine, ...]) -> str:
        """The session's own transcript as stored, rendered again only when it changed."""
        count = len(lines)
        if self._rendered[0] != count or count == MAX_SESSION_LINES:
            self._rendered = (count, _text(model, "transcript", render_lines(lines)))
        return self._rendered[1]

    @staticmethod
    def _message_row(
        model: Any, session_id: int, created: Any, record: _MessageRecord, body_bytes: int
    ) -> tuple[Any, ...]:
        """A MessageLog row, in the order of :data:`_MESSAGE_COLUMNS`."""
        error = record.error
        final = record.final
        return (
            session_id,
            created,
            record.status,
            _text(model, "message_id", record.message_id),
            _text(model, "sender", record.mail_from),
            _text(model, "recipients", ", ".join(r[0] for r in record.recipients)),
            _text(model, "subject", record.subject),
            record.size,
            final.code if final else None,
            _text(model, "final_reply", final.text if final else ""),
            _text(model, "queue_id", record.queue_id),
            record.elapsed,
            _text(model, "error_class", _class_name(error)),
            _text(model, "error", error),
            record.transient,
            _text(model, "transcript", render_lines(record.transcript)),
            _text(
                model,
                "body",
                record.body[:body_bytes].decode("utf-8", "replace") if body_bytes else "",
            ),
            record.outbox_id,
        )


def write_inline(job: AuditJob) -> None:
    """Write ``job`` in this thread, in at most about :data:`WRITE_BUDGET` seconds on
    SQLite (with a separate connection when the caller's is inside an atomic block); never
    raises: a failed write is logged and its rows dropped."""
    lock = job.recorder.writing
    # Held elsewhere only by the writer thread, while it writes this recorder's earlier rows
    # (bounded like this write); past twice the budget, these rows are dropped and logged.
    if not lock.acquire(timeout=2 * WRITE_BUDGET):
        try:
            raise TimeoutError("an earlier write of this session's audit rows is still running")
        except TimeoutError:
            log_failed(job)
        return
    try:
        _write(job)
    except Exception:
        log_failed(job)
    finally:
        lock.release()


def log_failed(job: AuditJob) -> None:
    """Report on the logger that ``job``'s rows could not be written (with the traceback)."""
    options = job.recorder.options
    logger.exception(
        "django-socketmail could not write the audit log for %s:%s; the send "
        "results stand and nothing will be resent",
        options.host,
        options.port,
    )


def _write(job: AuditJob) -> None:
    deadline = time.monotonic() + WRITE_BUDGET
    alias, clone = _audit_alias(job.database)
    try:
        write_retrying(alias, [job], deadline, retry=clone is None)
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
        write_retrying(alias.removesuffix(CLONE_SUFFIX), [job], deadline, retry=False)
    finally:
        if clone is not None:
            _close_clone(clone)


def write_retrying(alias: str, jobs: Sequence[AuditJob], deadline: float, *, retry: bool) -> None:
    """Write ``jobs`` in one transaction before ``deadline`` (a :func:`time.monotonic`
    value); a database that is briefly locked by another writer (SQLite) is retried a few
    times (with jitter, so writers do not collide again) while time is left, rather than
    losing rows.  The caller holds each job's recorder's ``writing`` lock."""
    pauses = iter(LOCKED_RETRY_PAUSES if retry else ())
    while True:
        try:
            connection = connections[alias]
            with _busy_timeout(connection, deadline), transaction.atomic(using=alias):
                _bound_lock_waits(connection, deadline)
                for job in jobs:
                    job.recorder.write(job, alias, connection)
            return
        except OperationalError as error:
            pause = next(pauses, None)
            left = deadline - time.monotonic()
            if pause is None or left <= 0 or "locked" not in str(error):
                raise
            time.sleep(min(left, pause * random.uniform(0.5, 1.5)))


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
    "outbox",
)
_RECIPIENT_COLUMNS: Final = ("message", "address", "status", "reply_code", "reply")


def drain_audit_log(timeout: float | None = None) -> bool:
    """Wait until the audit rows handed to this process's writer thread
    (``audit_background=True``) are written, or dropped with an error on the logger; True
    when its queue was empty and the thread idle before ``timeout`` seconds (None: no
    limit).  True at once when nothing is waiting (the option off, or in a forked child).
    While other threads keep sending, the queue may not come to rest: then False."""
    import sys

    if "django_socketmail.audit_writer" not in sys.modules:
        return True
    from .audit_writer import drain

    return drain(timeout)


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


@contextlib.contextmanager
def _busy_timeout(connection: Any, deadline: float) -> Iterator[None]:
    """On SQLite, wait for another writer's lock at most until ``deadline``, then put the
    connection's own busy timeout back.  Other databases: nothing to do."""
    if connection.vendor != "sqlite":
        yield
        return
    if connection.connection is None:
        connection.ensure_connection()
    raw = connection.connection
    # The connection's own timeout (its OPTIONS, or a PRAGMA of the project's), read once.
    known = getattr(connection, "_socketmail_busy_timeout", None)
    if known is not None and known[0] is raw:
        configured: int = known[1]
    else:
        configured = int(raw.execute("PRAGMA busy_timeout").fetchone()[0])
        connection._socketmail_busy_timeout = (raw, configured)
    # Rounded down to 50 ms: the same few statements, which sqlite3 keeps prepared.
    left_ms = max(0, int((deadline - time.monotonic()) * 20) * 50)
    raw.execute(f"PRAGMA busy_timeout = {min(left_ms, configured)}")
    try:
        yield
    finally:
        if connection.connection is raw:
            raw.execute(f"PRAGMA busy_timeout = {configured}")


def _bound_lock_waits(connection: Any, deadline: float) -> None:
    """On PostgreSQL, within the current transaction, wait for each lock (a table locked by a
    migration or a maintenance job) at most until ``deadline``.  Other databases: nothing."""
    if connection.vendor != "postgresql":
        return
    left_ms = max(1, int((deadline - time.monotonic()) * 1000))
    with connection.cursor() as cursor:
        cursor.execute("SELECT set_config('lock_timeout', %s, true)", [f"{left_ms}ms"])


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


def _text(model: Any, name: str, value: Any) -> str:
    """``value`` made storable in the column ``name`` of ``model``: every text value the
    recorder writes goes through here (see :func:`.models.storable`)."""
    return _column(model, name)(value)


@functools.cache
def _column(model: Any, name: str) -> Callable[[Any], str]:
    from .models import storable

    return functools.partial(storable, field=model._meta.get_field(name))


def _wall_clock(timestamp: float) -> datetime:
    """A :func:`time.time` value as Django stores a datetime (aware UTC with ``USE_TZ``,
    else naive local time, like :func:`django.utils.timezone.now`)."""
    if settings.USE_TZ:
        return datetime.fromtimestamp(timestamp, tz=dt_timezone.utc)
    return datetime.fromtimestamp(timestamp)


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
    """The first ``name`` header's value in the serialized message (the one actually sent),
    unfolded (RFC 5322 §2.2.3: a CRLF followed by a space or a tab is removed) and stripped;
    ``""`` when the header section has none.  Django 5.2 folds a Message-ID longer than 66
    characters: ``Message-ID: \\r\\n <...>``."""
    end = raw.find(b"\r\n\r\n")
    head = raw[: end if end >= 0 else len(raw)]
    prefix = name.lower().encode() + b":"
    lines = head.split(b"\r\n")
    for index, line in enumerate(lines):
        if line.lower().startswith(prefix):
            value = [line[len(prefix) :]]
            for continuation in lines[index + 1 :]:
                if not continuation.startswith((b" ", b"\t")):
                    break
                value.append(continuation)
            return b"".join(value).strip().decode("ascii", "replace")
    return ""
