"""Queued delivery on Django's Tasks framework: stored in the caller's transaction, sent by a
task, leased so that several workers (on several machines) send each message once.

``queue=True`` makes :meth:`EmailBackend.send_messages` call :func:`store`: each message's
exact bytes and envelope go into the outbox (:mod:`.outbox`) inside the caller's
transaction, and :func:`deliver` is enqueued on commit (``task_backend`` names the Tasks
backend).  A rolled-back transaction stores and sends nothing.

:func:`deliver` (the task) recovers expired leases, claims due messages for one mailer
(``select_for_update(skip_locked=True)`` where the database has it, a conditional UPDATE
elsewhere), sends them pipelined over one session of the engine, and records each outcome:

=============  ===============================================================
outcome        the row becomes
=============  ===============================================================
sent/partial   ``sent``/``partial``, with the queue id and final reply
5xx            ``refused`` or ``failed``: never retried
4xx, network   ``deferred``: retried after ``60 s x 2^(attempt-1)`` (at most an
               hour, with jitter) until ``queue_max_attempts`` or
               ``queue_max_age``; then ``failed``
lost reply     ``unknown``: not resent (``queue_resend_unknown`` re-queues it,
               with the same bytes, so the same Message-ID)
never started  ``queued`` again, the attempt not counted
=============  ===============================================================

Crash safety does not depend on the Tasks backend.  Before the write that carries a
message's content (its BDAT chunk, or its data after DATA's 354), its row is marked
``content_may_have_left`` (committed).  A worker killed at any
point leaves rows ``sending`` under a lease that expires; the next run of :func:`deliver`,
or ``manage.py socketmail_queue --recover`` from cron, turns each into:

- ``queued`` (sent again later) when its content was not written: killed after the claim,
  or while only its envelope was out (a server completes nothing without the content);
- ``unknown`` (never resent silently) when it may have reached the server: killed after
  the write of its content began and before its outcome was recorded.

A row whose outcome was recorded is final (or ``deferred``, to be retried as planned); a
crash between the caller's commit and the task leaves it ``queued`` for any later run.
Leases are renewed while a worker writes, so a slow server never makes a live worker's
messages look abandoned.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Final, cast

from django.core.signals import setting_changed
from django.db import IntegrityError, models, router, transaction
from django.db.models import F, Q
from django.utils import timezone

from . import signals
from .outbox import MailerState, OutboxContent, OutboxMessage, OutboxStatus
from .serializer import serialize_parts
from .smtp import RecipientResult, SendResult
from .smtp.address import prepare_address
from .smtp.delivery import DeliveryOptions

try:  # Django 6.0+
    from django.tasks import task, task_backends
except ImportError:  # Django 5.2: the django-tasks backport
    from django_tasks import task, task_backends  # type: ignore[no-redef,assignment]

if TYPE_CHECKING:
    from django.core.mail import EmailMessage

    from .conf import BackendOptions
    from .email_backend import EmailBackend

__all__ = [
    "LEASE",
    "can_defer",
    "deliver",
    "delivery_from_json",
    "enqueue",
    "kick",
    "open_requests",
    "recover",
    "sending_backend",
    "settled_options",
    "store",
]

logger = logging.getLogger("django_socketmail")

LEASE: Final = timedelta(minutes=5)
RUN_PENDING: Final = timedelta(seconds=60)
"""A run enqueued this recently and not yet started counts as pending (after that, as lost)."""
"""How long a claim holds before another worker may recover it (renewed while writing)."""


def store(backend: EmailBackend, messages: Sequence[EmailMessage]) -> int:
    """Store ``messages`` for delivery in the caller's transaction and enqueue the task on
    commit; return how many were stored.

    Every address is checked and every message serialized before the first statement: a
    bad address raises ``InvalidAddressError`` and nothing of this call is stored.  The
    rows then go in with one statement for one message on PostgreSQL, two statements
    whatever their number (the outbox rows, their contents) where the database returns the
    ids of a bulk insert (PostgreSQL, SQLite, MariaDB), in the caller's transaction without
    a savepoint of their own, or in one of their own in autocommit mode, except for one
    message on PostgreSQL with no ``message_queued`` receiver: its one statement is atomic
    by itself and runs without a transaction around it."""
    options = backend.options
    mailer = backend.mailer_alias
    alias = router.db_for_write(OutboxMessage)
    prepared: list[tuple[EmailMessage, OutboxMessage, bytes]] = []
    for message in messages:
        delivery = _delivery_of(message, options.delivery)
        sender = prepare_address(
            (delivery.envelope_sender if delivery else None) or message.from_email
        ).addr_spec
        recipients = list(dict.fromkeys(prepare_address(a).addr_spec for a in message.recipients()))
        data = b"".join(serialize_parts(message))
        row = OutboxMessage(
            mailer=mailer,
            sender=sender,
            recipients=recipients,
            message_id=_message_id(data),
            subject=str(message.subject)[:255],
            size=len(data),
            delivery=_delivery_json(delivery),
        )
        prepared.append((message, row, data))
    if not prepared:
        return 0
    tasks_alias = options.task_backend
    connection = transaction.get_connection(alias)
    # One message on PostgreSQL: one statement, which reads the pending run itself when it
    # can (and runs alone when nothing needs a transaction around it).
    single = len(prepared) == 1 and connection.vendor == "postgresql"
    counted_on = mailer if single and _reads_pending(alias, tasks_alias) else None
    if single and _alone(connection):
        message, row, data = prepared[0]
        if not _insert_with_content(connection, row, data, counted_on):
            enqueue(mailer, tasks_alias)
        _queued(message, row, data)
        return 1
    rows = [row for _, row, _ in prepared]
    with transaction.atomic(using=alias, savepoint=False):
        pending = False
        if single:
            _, row, data = prepared[0]
            pending = _insert_with_content(connection, row, data, counted_on)
        elif connection.features.can_return_rows_from_bulk_insert:
            OutboxMessage.objects.using(alias).bulk_create(rows)
            contents = [OutboxContent(message=row, data=data) for _, row, data in prepared]
            OutboxContent.objects.using(alias).bulk_create(contents)
        else:
            for _, row, data in prepared:
                row.save(using=alias, force_insert=True)
                OutboxContent.objects.using(alias).create(message=row, data=data)
        for message, row, _ in prepared:
            signals.message_queued.send(sender=OutboxMessage, outbox=row, message=message)
        if not pending:
            transaction.on_commit(lambda: enqueue(mailer, tasks_alias), using=alias)
    for message, row, data in prepared:
        _queued(message, row, data)
    return len(prepared)


def _reads_pending(alias: str, tasks_alias: str) -> bool:
    """Whether the statement storing one message on PostgreSQL may read the pending run
    itself (:func:`_insert_with_content`): the mailers' state rows are on ``alias`` too,
    and the Tasks backend ``tasks_alias`` can defer a task.  A run that ends while such a
    request is still open enqueues the next run for a little later; with a backend that
    cannot defer (Django's immediate one) it could only wait for the request, so there the
    check stays after the commit."""
    return router.db_for_write(MailerState) == alias and can_defer(tasks_alias)


def can_defer(tasks_alias: str) -> bool:
    """Whether the Tasks backend ``tasks_alias`` runs a task at a later time given to it."""
    return bool(getattr(task_backends[tasks_alias], "supports_defer", False))


def _alone(connection: Any) -> bool:
    """Whether one message may be stored by its one statement without a transaction:
    ``connection`` in autocommit mode (outside ``atomic()``), and no ``message_queued``
    receiver (which runs in the call's transaction, before the commit)."""
    return (
        not connection.in_atomic_block
        and connection.get_autocommit()
        and not signals.message_queued.has_listeners(OutboxMessage)
    )


def _queued(message: EmailMessage, row: OutboxMessage, data: bytes) -> None:
    """Put the result of a stored message on it: status ``queued`` and its outbox id."""
    from .email_backend import RESULT_ATTRIBUTE

    result = SendResult(row.sender, [RecipientResult(r) for r in row.recipients], size=len(data))
    result.outbox_id = row.pk
    setattr(message, RESULT_ATTRIBUTE, result)


def _insert_with_content(
    connection: Any, row: OutboxMessage, data: bytes, mailer: str | None
) -> bool:
    """Insert ``row`` and its content in one statement (PostgreSQL: a data-modifying
    ``WITH``), one round trip instead of two; ``row`` gets its id and counts as saved.
    The values are those ``save()`` would write: each field's ``pre_save()``, then its
    ``get_db_prep_save()`` (which gives a text, number or boolean field's value of that
    type back unchanged: those are passed as they are).

    With ``mailer``, the same statement reads whether a run of that mailer is pending
    (marked less than :data:`RUN_PENDING` ago and not started) and takes a ``FOR KEY
    SHARE`` lock on its state row, held until the caller's transaction ends; returns
    whether one is.  Then the caller counts on that run and enqueues nothing: a run that
    ends while the lock is held sees it and schedules the run that takes this message
    (:func:`open_requests`).  The lock waits for no other request nor for a run's
    updates of the row (``FOR NO KEY UPDATE``), and a locking read sees the row as last
    committed, whatever the statement's snapshot.  Without ``mailer``: False."""
    sql, fields = _insert_with_content_sql(connection, with_state=mailer is not None)
    params = [
        value
        if plain and type(value) in _PLAIN_TYPES
        else field.get_db_prep_save(value, connection)
        for field, plain in fields
        for value in (field.pre_save(row, True),)
    ]
    params.append(_CONTENT_DATA.get_db_prep_save(data, connection))
    if mailer is not None:
        cutoff = timezone.now() - RUN_PENDING
        params += [_RUN_REQUESTED.get_db_prep_value(cutoff, connection), mailer]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        pk, pending = cursor.fetchone()
    row.pk = pk
    row._state.adding = False
    row._state.db = connection.alias
    return bool(pending)


_INSERT_SQL: dict[tuple[str, bool], tuple[str, list[tuple[Any, bool]]]] = {}
_CONTENT_DATA: Final = cast("models.BinaryField[Any, Any]", OutboxContent._meta.get_field("data"))
_RUN_REQUESTED: Final = cast(
    "models.DateTimeField[Any, Any]", MailerState._meta.get_field("run_requested")
)
_PLAIN_TYPES: Final = (str, int, bool)
_PLAIN_FIELDS: Final = (
    models.CharField,
    models.TextField,
    models.IntegerField,
    models.BooleanField,
)


def _insert_with_content_sql(
    connection: Any, *, with_state: bool
) -> tuple[str, list[tuple[Any, bool]]]:
    """The statement of :func:`_insert_with_content` for ``connection`` (made once per
    database alias and variant) and the outbox fields whose values it takes, in order, each
    with whether it is a plain text, number or boolean field."""
    made = _INSERT_SQL.get((connection.alias, with_state))
    if made is not None:
        return made
    quote = connection.ops.quote_name
    meta = OutboxMessage._meta
    fields = [f for f in meta.concrete_fields if f is not meta.pk]
    content = OutboxContent._meta
    link, data = content.pk, _CONTENT_DATA
    state = MailerState._meta
    pending = "FALSE"
    if with_state:
        # Names from the models, values bound.
        pending = (
            f"(SELECT {quote(_RUN_REQUESTED.column)} >= %s "  # noqa: S608
            f"FROM {quote(state.db_table)} WHERE {quote(state.pk.column)} = %s FOR KEY SHARE)"
        )
    # Names from the models, values bound.
    sql = (
        f"WITH stored AS (INSERT INTO {quote(meta.db_table)} "  # noqa: S608
        f"({', '.join(quote(f.column) for f in fields)}) "
        f"VALUES ({', '.join(['%s'] * len(fields))}) RETURNING {quote(meta.pk.column)}), "
        f"kept AS (INSERT INTO {quote(content.db_table)} "
        f"({quote(link.column)}, {quote(data.column)}) "
        f"SELECT {quote(meta.pk.column)}, %s FROM stored RETURNING {quote(link.column)}) "
        f"SELECT (SELECT {quote(link.column)} FROM kept), {pending}"
    )
    made = _INSERT_SQL[(connection.alias, with_state)] = (
        sql,
        [(f, isinstance(f, _PLAIN_FIELDS)) for f in fields],
    )
    return made


def enqueue(mailer: str, tasks_alias: str, *, at: datetime | None = None) -> None:
    """Enqueue :func:`deliver` for ``mailer`` on the Tasks backend ``tasks_alias`` (at ``at``
    when the backend can defer).  A run to start now is enqueued only when none is pending
    (one enqueued less than :data:`RUN_PENDING` ago and not started yet will claim the new
    rows too), so a burst of requests makes one run, not one each.  An enqueue failure is
    logged: the rows wait for the next run or ``socketmail_queue --deliver``."""
    if at is None and not _request_run(mailer):
        return
    try:
        runner = deliver.using(backend=tasks_alias)
        if at is not None:
            runner = runner.using(run_after=at)
        runner.enqueue(mailer)
    except Exception:
        if at is None:
            run_started(mailer)  # let the next request try again
        logger.exception(
            "django-socketmail: could not enqueue delivery for mailer %r; the messages stay "
            "queued for the next run (or manage.py socketmail_queue --deliver)",
            mailer,
        )


def kick(mailer: str) -> None:
    """Enqueue a delivery run for ``mailer`` once the current transaction commits, on the
    Tasks backend its options name."""
    tasks_alias = sending_backend(mailer).options.task_backend
    alias = router.db_for_write(OutboxMessage)
    transaction.on_commit(lambda: enqueue(mailer, tasks_alias), using=alias)


def _request_run(mailer: str) -> bool:
    """Mark a run as pending for ``mailer``; False when one already is.

    On PostgreSQL this is one conditional UPDATE that also tells whether the row exists
    (while a run is pending it matches nothing, so it neither locks nor writes the row that
    every queued call of the mailer checks), then the upsert below once, when the row does
    not exist yet.  On SQLite 3.35+ it is that upsert (an INSERT whose update only happens
    when no run is pending, returning a row when it marked one).  Elsewhere the state row
    is made if missing, then marked by a conditional UPDATE."""
    alias = router.db_for_write(MailerState)
    now = timezone.now()
    cutoff = now - RUN_PENDING
    connection = transaction.get_connection(alias)
    if connection.vendor == "postgresql":
        marked = _request_run_update(connection, mailer, now, cutoff)
        if marked is not None:
            return marked
        return _request_run_upsert(connection, mailer, now, cutoff)  # no row yet
    if connection.vendor == "sqlite" and connection.features.can_return_columns_from_insert:
        return _request_run_upsert(connection, mailer, now, cutoff)
    states = MailerState.objects.using(alias)
    try:
        with transaction.atomic(using=alias):
            states.get_or_create(mailer=mailer)
    except IntegrityError:  # made at the same moment by another process
        pass
    free = Q(run_requested__isnull=True) | Q(run_requested__lt=cutoff)
    return bool(states.filter(free, mailer=mailer).update(run_requested=now))


def _request_run_update(
    connection: Any, mailer: str, now: datetime, cutoff: datetime
) -> bool | None:
    """PostgreSQL: mark the run pending with a conditional UPDATE; True when it did, False
    when one already was, None when the mailer has no state row yet."""
    requested = _RUN_REQUESTED
    when = requested.get_db_prep_value(now, connection)
    before = requested.get_db_prep_value(cutoff, connection)
    with connection.cursor() as cursor:
        cursor.execute(_request_run_update_sql(connection), [when, mailer, before, mailer])
        marked, exists = cursor.fetchone()
    if marked:
        return True
    return False if exists else None


_UPDATE_SQL: dict[str, str] = {}


def _request_run_update_sql(connection: Any) -> str:
    """The statement of :func:`_request_run_update`, made once per database alias."""
    sql = _UPDATE_SQL.get(connection.alias)
    if sql is None:
        meta = MailerState._meta
        quote = connection.ops.quote_name
        table = quote(meta.db_table)
        key = quote(meta.pk.column)
        column = quote(_RUN_REQUESTED.column)
        # Names from the model, values bound.
        sql = _UPDATE_SQL[connection.alias] = (
            f"WITH marked AS (UPDATE {table} SET {column} = %s "  # noqa: S608
            f"WHERE {key} = %s AND ({column} IS NULL OR {column} < %s) RETURNING 1) "
            f"SELECT EXISTS (SELECT 1 FROM marked), "
            f"EXISTS (SELECT 1 FROM {table} WHERE {key} = %s)"
        )
    return sql


def _request_run_upsert(connection: Any, mailer: str, now: datetime, cutoff: datetime) -> bool:
    """:func:`_request_run` in one ``INSERT ... ON CONFLICT DO UPDATE ... WHERE ...
    RETURNING`` (the new row's other columns take their model defaults)."""
    meta = MailerState._meta
    row = MailerState(mailer=mailer, run_requested=now)
    fields = list(meta.concrete_fields)
    requested = next(f for f in fields if f.name == "run_requested")
    quote = connection.ops.quote_name
    table = quote(meta.db_table)
    column = quote(requested.column)
    key = quote(meta.pk.column)
    columns = ", ".join(quote(f.column) for f in fields)
    # Names from the model, values bound.
    sql = (
        f"INSERT INTO {table} ({columns}) "  # noqa: S608
        f"VALUES ({', '.join(['%s'] * len(fields))}) "
        f"ON CONFLICT ({key}) DO UPDATE SET {column} = excluded.{column} "
        f"WHERE {table}.{column} IS NULL OR {table}.{column} < %s "
        f"RETURNING {key}"
    )
    params = [f.get_db_prep_save(getattr(row, f.attname), connection) for f in fields]
    params.append(requested.get_db_prep_value(cutoff, connection))
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchone() is not None


def run_started(mailer: str) -> None:
    """A run for ``mailer`` starts (before it claims): later commits enqueue again."""
    alias = router.db_for_write(MailerState)
    MailerState.objects.using(alias).filter(mailer=mailer).update(run_requested=None)


def open_requests(mailer: str) -> tuple[bool, bool]:
    """Whether a transaction that stored a message for ``mailer`` counting on a pending
    run may still be open, and whether a run is pending now; called by a run as it ends.

    Such a transaction holds a ``FOR KEY SHARE`` lock on the mailer's state row until it
    ends (:func:`_insert_with_content`); this tries ``FOR UPDATE SKIP LOCKED`` on the row,
    in one statement in autocommit mode, else in a savepoint of its own, rolled back: the
    row is not held after.
    A locked row counts as open (another run updating the row at that moment counts too:
    one run more, not one less).  Every such transaction found the run pending before
    the run now ending started, so once none is open, every message counted on it is
    committed and visible.  PostgreSQL only: elsewhere ``(False, False)`` (each call
    checks after its commit instead)."""
    alias = router.db_for_write(MailerState)
    connection = transaction.get_connection(alias)
    if connection.vendor != "postgresql":
        return False, False
    meta = MailerState._meta
    quote = connection.ops.quote_name
    table, key = quote(meta.db_table), quote(meta.pk.column)
    cutoff = _RUN_REQUESTED.get_db_prep_value(timezone.now() - RUN_PENDING, connection)
    # Names from the model, values bound.
    sql = (
        f"SELECT EXISTS (SELECT 1 FROM {table} WHERE {key} = %s) "  # noqa: S608
        f"AND NOT EXISTS (SELECT 1 FROM {table} WHERE {key} = %s FOR UPDATE SKIP LOCKED), "
        f"EXISTS (SELECT 1 FROM {table} WHERE {key} = %s "
        f"AND {quote(_RUN_REQUESTED.column)} >= %s)"
    )
    # In autocommit mode the statement's lock ends with it; in a transaction, with the
    # savepoint rolled back.
    inside = connection.in_atomic_block or not connection.get_autocommit()
    with (
        transaction.atomic(using=alias) if inside else nullcontext(),
        connection.cursor() as cursor,
    ):
        cursor.execute(sql, [mailer, mailer, mailer, cutoff])
        locked, pending = cursor.fetchone()
        if inside:
            transaction.set_rollback(True, using=alias)
    return bool(locked), bool(pending)


@task()
def deliver(mailer: str) -> dict[str, int]:
    """Send what is due for ``mailer``; return how many rows ended in each state."""
    from .worker import Worker

    return Worker(mailer).run()


def recover(
    mailer: str | None = None, *, now: datetime | None = None, owner: str | None = None
) -> dict[str, int]:
    """Turn rows whose lease expired (by ``now``) into ``unknown`` (their content may have
    reached the server) or ``queued`` and due (their content was not written).  ``mailer``
    None: every mailer.  ``owner``: instead, the rows that worker holds, expired or not
    (a worker giving up its own)."""
    now = now or timezone.now()
    alias = router.db_for_write(OutboxMessage)
    expired = OutboxMessage.objects.using(alias).filter(status=OutboxStatus.SENDING)
    if owner is not None:
        expired = expired.filter(lease_owner=owner)
    else:
        expired = expired.filter(lease_expires__lt=now)
    if mailer is not None:
        expired = expired.filter(mailer=mailer)
    unknown = expired.filter(content_may_have_left=True).update(
        status=OutboxStatus.UNKNOWN,
        lease_owner="",
        lease_expires=None,
        last_error="the worker sending it stopped after its content may have left",
    )
    requeued = expired.filter(content_may_have_left=False).update(
        status=OutboxStatus.QUEUED,
        lease_owner="",
        lease_expires=None,
        next_attempt=min(now, timezone.now()),
        attempts=F("attempts") - 1,
    )
    if unknown or requeued:
        logger.warning(
            "django-socketmail: recovered %d abandoned queued messages (%d unknown, %d queued "
            "again)",
            unknown + requeued,
            unknown,
            requeued,
        )
    return {"unknown": unknown, "queued": requeued}


def _message_id(data: bytes) -> str:
    from .audit import _header

    return _header(None, "Message-ID", data[: 64 * 1024])[:255]


def _delivery_of(message: EmailMessage, default: DeliveryOptions | None) -> DeliveryOptions | None:
    from .email_backend import delivery_options

    delivery = delivery_options(message) or default
    if delivery is not None and delivery.envid == "auto":
        # Fixed now, so that every attempt carries the same envelope id.
        fields = asdict(delivery) | {"envid": secrets.token_hex(16)}
        delivery = DeliveryOptions(**fields)
    return delivery


def _delivery_json(delivery: DeliveryOptions | None) -> dict[str, Any]:
    if delivery is None:
        return {}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(delivery).items()}


def delivery_from_json(data: dict[str, Any]) -> DeliveryOptions | None:
    if not data:
        return None
    if data.get("notify") is not None:
        data = data | {"notify": tuple(data["notify"])}
    return DeliveryOptions(**data)


def sending_backend(mailer: str) -> EmailBackend:
    """The mailer's backend as configured in settings, sending rather than queueing."""
    from django.conf import settings

    from .email_backend import EmailBackend

    mailers = getattr(settings, "MAILERS", None)
    if mailer and mailers and mailer in mailers:
        options = dict(mailers[mailer].get("OPTIONS", {}))
        options.update(queue=False, fail_silently=True)
        return EmailBackend(alias=mailer, **options)
    return EmailBackend(queue=False, fail_silently=True)


_SETTLED: dict[str, BackendOptions] = {}


def settled_options(mailer: str) -> BackendOptions:
    """The options the worker sends ``mailer``'s messages with (those of
    :func:`sending_backend`), resolved once per process and again after any change of
    settings (Django's ``setting_changed``, sent by ``override_settings``)."""
    try:
        return _SETTLED[mailer]
    except KeyError:
        options = _SETTLED[mailer] = sending_backend(mailer).options
        return options


def _forget_settled(**kwargs: Any) -> None:
    _SETTLED.clear()


setting_changed.connect(_forget_settled, dispatch_uid="django_socketmail.queue.settled")
