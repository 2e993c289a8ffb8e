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
import random
import secrets
import time
from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

from django.db import connections, router, transaction
from django.db.models import F
from django.utils import timezone

from . import signals
from .outbox import DUE, OutboxContent, OutboxMessage, OutboxStatus
from .serializer import serialize_parts
from .smtp import RecipientResult, SendResult, SendStatus, SocketMailError
from .smtp.address import prepare_address
from .smtp.delivery import DeliveryOptions
from .smtp.engine import Write
from .smtp.errors import ReplyError

try:  # Django 6.0+
    from django.tasks import task
except ImportError:  # Django 5.2: the django-tasks backport
    from django_tasks import task  # type: ignore[no-redef]

if TYPE_CHECKING:
    from django.core.mail import EmailMessage

    from .conf import BackendOptions
    from .email_backend import EmailBackend

__all__ = ["LEASE", "Worker", "deliver", "enqueue", "kick", "recover", "store"]

logger = logging.getLogger("django_socketmail")

LEASE: Final = timedelta(minutes=5)
"""How long a claim holds before another worker may recover it (renewed while writing)."""
BATCH: Final = 100
"""Messages claimed and pipelined at once."""
RUN_BUDGET: Final = 60.0
"""Seconds one task run keeps claiming new batches (it finishes the batch in hand)."""
BACKOFF_BASE: Final = 60.0
BACKOFF_MAX: Final = 3600.0


def store(backend: EmailBackend, messages: Sequence[EmailMessage]) -> int:
    """Store ``messages`` for delivery in the caller's transaction and enqueue the task on
    commit; return how many were stored.  Addresses are checked now (a bad one raises
    ``InvalidAddressError`` and nothing of this call is stored)."""
    options = backend.options
    alias = router.db_for_write(OutboxMessage)
    stored: list[tuple[EmailMessage, OutboxMessage, list[str], int]] = []
    with transaction.atomic(using=alias):
        for message in messages:
            delivery = _delivery_of(message)
            sender = prepare_address(
                (delivery.envelope_sender if delivery else None) or message.from_email
            ).addr_spec
            recipients = list(
                dict.fromkeys(prepare_address(a).addr_spec for a in message.recipients())
            )
            data = b"".join(serialize_parts(message))
            row = OutboxMessage.objects.using(alias).create(
                mailer=backend.mailer_alias,
                sender=sender,
                recipients=recipients,
                message_id=_message_id(data),
                subject=str(message.subject)[:255],
                size=len(data),
                delivery=_delivery_json(delivery),
            )
            OutboxContent.objects.using(alias).create(message=row, data=data)
            stored.append((message, row, recipients, len(data)))
            signals.message_queued.send(sender=OutboxMessage, outbox=row, message=message)
        mailer, tasks_alias = backend.mailer_alias, options.task_backend
        transaction.on_commit(lambda: enqueue(mailer, tasks_alias), using=alias)
    from .email_backend import RESULT_ATTRIBUTE

    for message, row, recipients, size in stored:
        result = SendResult(row.sender, [RecipientResult(r) for r in recipients], size=size)
        result.outbox_id = row.pk
        setattr(message, RESULT_ATTRIBUTE, result)
    return len(stored)


def enqueue(mailer: str, tasks_alias: str, *, at: datetime | None = None) -> None:
    """Enqueue :func:`deliver` for ``mailer`` on the Tasks backend ``tasks_alias`` (at ``at``
    when the backend can defer); an enqueue failure is logged: the rows wait for the next
    run or ``socketmail_queue --deliver``."""
    try:
        runner = deliver.using(backend=tasks_alias)
        if at is not None:
            runner = runner.using(run_after=at)
        runner.enqueue(mailer)
    except Exception:
        logger.exception(
            "django-socketmail: could not enqueue delivery for mailer %r; the messages stay "
            "queued for the next run (or manage.py socketmail_queue --deliver)",
            mailer,
        )


def kick(mailer: str) -> None:
    """Enqueue a delivery run for ``mailer`` once the current transaction commits, on the
    Tasks backend its options name."""
    tasks_alias = _sending_backend(mailer).options.task_backend
    alias = router.db_for_write(OutboxMessage)
    transaction.on_commit(lambda: enqueue(mailer, tasks_alias), using=alias)


@task()
def deliver(mailer: str) -> dict[str, int]:
    """Send what is due for ``mailer``; return how many rows ended in each state."""
    return Worker(mailer).run()


def recover(mailer: str | None = None, *, now: datetime | None = None) -> dict[str, int]:
    """Turn rows whose lease expired (by ``now``) into ``unknown`` (their content may have
    reached the server) or ``queued`` and due (their content was not written).  ``mailer``
    None: every mailer."""
    now = now or timezone.now()
    alias = router.db_for_write(OutboxMessage)
    expired = OutboxMessage.objects.using(alias).filter(
        status=OutboxStatus.SENDING, lease_expires__lt=now
    )
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


class Worker:
    """One run of :func:`deliver` for one mailer."""

    def __init__(self, mailer: str) -> None:
        self.mailer = mailer
        self.alias = router.db_for_write(OutboxMessage)
        self.token = secrets.token_hex(16)
        self.counts: dict[str, int] = {}
        self.options: BackendOptions | None = None
        self._renew_at = 0.0

    def run(self) -> dict[str, int]:
        recover(self.mailer)
        backend = _sending_backend(self.mailer)
        self.options = backend.options
        deadline = time.monotonic() + RUN_BUDGET
        try:
            while time.monotonic() < deadline:
                rows = self.claim(BATCH)
                if not rows:
                    break
                self.send(backend, rows)
        finally:
            backend.close()
        self._schedule_next(backend)
        return self.counts

    def claim(self, count: int) -> list[OutboxMessage]:
        now = timezone.now()
        objects = OutboxMessage.objects.using(self.alias)
        due = objects.filter(mailer=self.mailer, status__in=DUE, next_attempt__lte=now)
        due = due.order_by("next_attempt", "pk")
        with transaction.atomic(using=self.alias):
            if connections[self.alias].features.has_select_for_update_skip_locked:
                due = due.select_for_update(skip_locked=True)
            ids = list(due.values_list("pk", flat=True)[:count])
            objects.filter(pk__in=ids, status__in=DUE).update(
                status=OutboxStatus.SENDING,
                lease_owner=self.token,
                lease_expires=now + LEASE,
                attempts=F("attempts") + 1,
                last_attempt=now,
                content_may_have_left=False,
            )
        self._renew_at = time.monotonic() + LEASE.total_seconds() / 3
        return list(
            objects.filter(lease_owner=self.token, status=OutboxStatus.SENDING).order_by("pk")
        )

    def send(self, backend: EmailBackend, rows: list[OutboxMessage]) -> None:
        if backend.open() is None or backend.session is None:
            error = backend.last_session.error if backend.last_session else None
            for row in rows:
                self._finish(row, None, error or SocketMailError("could not connect"))
            return
        session = backend.session
        contents = {
            c.pk: bytes(c.data)
            for c in OutboxContent.objects.using(self.alias).filter(pk__in=[r.pk for r in rows])
        }
        prepared = []
        for row in rows:
            try:
                signals.pre_send.send(sender=OutboxMessage, outbox=row)
            except signals.CancelSend:
                self._cancel(row)
                continue
            tx = session.client.prepare(
                row.sender, row.recipients, contents[row.pk], _delivery_from_json(row.delivery)
            )
            if tx.result.error is not None:
                self._finish(row, tx.result, tx.result.error)
                continue
            prepared.append((row, tx))
        by_result = {id(tx.result): row.pk for row, tx in prepared}
        session.client.before_write = lambda write: self._before_write(write, by_result)
        try:
            batch = session.send([tx for _, tx in prepared], stop_on_error=False)
        finally:
            session.client.before_write = None
        unattempted = {id(tx.result) for tx in batch.unattempted}
        for row, tx in prepared:
            if id(tx.result) in unattempted:
                self._release(row)
                continue
            shim: Any = _Subject(row.subject)
            session.recorder.message_finished(shim, tx.result, [contents[row.pk]])
            self._finish(row, tx.result, tx.result.error)
        session.recorder.flush()

    def _before_write(self, write: Write, by_result: dict[int, int]) -> None:
        """Before bytes go out: record that these messages' content may leave (committed
        first), and renew the lease when a third of it has passed."""
        ids = [by_result[id(r)] for r in write.content if id(r) in by_result]
        objects = OutboxMessage.objects.using(self.alias).filter(lease_owner=self.token)
        if ids:
            objects.filter(pk__in=ids).update(content_may_have_left=True)
        if time.monotonic() >= self._renew_at:
            objects.filter(status=OutboxStatus.SENDING).update(lease_expires=timezone.now() + LEASE)
            self._renew_at = time.monotonic() + LEASE.total_seconds() / 3

    def _cancel(self, row: OutboxMessage) -> None:
        OutboxMessage.objects.using(self.alias).filter(pk=row.pk, lease_owner=self.token).update(
            status=OutboxStatus.CANCELLED,
            lease_owner="",
            lease_expires=None,
            last_error="cancelled by a pre_send receiver",
        )
        self._count(OutboxStatus.CANCELLED)

    def _release(self, row: OutboxMessage) -> None:
        OutboxMessage.objects.using(self.alias).filter(pk=row.pk, lease_owner=self.token).update(
            status=OutboxStatus.QUEUED,
            lease_owner="",
            lease_expires=None,
            content_may_have_left=False,
            attempts=F("attempts") - 1,
        )
        self._count(OutboxStatus.QUEUED)

    def _finish(
        self, row: OutboxMessage, result: SendResult | None, error: BaseException | None
    ) -> None:
        now = timezone.now()
        status, retry = _verdict(result, error)
        options = self.options
        assert options is not None, "run() first"
        values: dict[str, Any] = {"lease_owner": "", "lease_expires": None}
        if status == OutboxStatus.UNKNOWN and options.queue_resend_unknown:
            status, retry = OutboxStatus.DEFERRED, True
        if retry:
            too_old = now - row.created > timedelta(seconds=options.queue_max_age)
            if row.attempts >= options.queue_max_attempts or too_old:
                status = OutboxStatus.FAILED
            else:
                delay = min(BACKOFF_MAX, BACKOFF_BASE * 2 ** max(0, row.attempts - 1))
                values["next_attempt"] = now + timedelta(seconds=delay * random.uniform(0.5, 1.5))
        final = result.final_reply if result is not None else None
        reply = final or _reply_of(error)
        values.update(
            status=status,
            last_reply_code=reply.code if reply else None,
            last_reply=reply.text if reply else "",
            last_error=str(error) if error is not None else "",
            queue_id=(result.queue_id or "") if result is not None else "",
        )
        OutboxMessage.objects.using(self.alias).filter(pk=row.pk, lease_owner=self.token).update(
            **values
        )
        self._count(status)
        if status in (OutboxStatus.SENT, OutboxStatus.PARTIAL):
            signal = signals.message_sent
        elif status == OutboxStatus.DEFERRED:
            signal = signals.message_deferred
        else:
            signal = signals.message_failed
        if signal.has_listeners(OutboxMessage):
            row.refresh_from_db(using=self.alias)
            for _receiver, failure in signal.send_robust(
                sender=OutboxMessage, outbox=row, result=result
            ):
                if isinstance(failure, Exception):
                    logger.error("django-socketmail: a %s receiver failed: %r", status, failure)

    def _count(self, status: str) -> None:
        self.counts[str(status)] = self.counts.get(str(status), 0) + 1

    def _schedule_next(self, backend: EmailBackend) -> None:
        """Enqueue the next run for the earliest retry, when the Tasks backend can defer."""
        upcoming = (
            OutboxMessage.objects.using(self.alias)
            .filter(mailer=self.mailer, status__in=DUE)
            .order_by("next_attempt")
            .values_list("next_attempt", flat=True)
            .first()
        )
        if upcoming is None:
            return
        tasks_alias = backend.options.task_backend
        if upcoming <= timezone.now():
            enqueue(self.mailer, tasks_alias)
        elif _can_defer(tasks_alias):
            enqueue(self.mailer, tasks_alias, at=upcoming)


class _Subject:
    """What the audit recorder reads of a message it has only the bytes of."""

    def __init__(self, subject: str) -> None:
        self.subject = subject


def _verdict(result: SendResult | None, error: BaseException | None) -> tuple[str, bool]:
    """The row's new status, and whether it is a retry (4xx or network)."""
    status = result.status if result is not None else SendStatus.FAILED
    if status is SendStatus.SENT:
        return OutboxStatus.SENT, False
    if status is SendStatus.PARTIAL:
        return OutboxStatus.PARTIAL, False
    if status is SendStatus.UNKNOWN:
        return OutboxStatus.UNKNOWN, False
    transient = getattr(error, "is_transient", None)
    if transient is None:
        transient = isinstance(error, (ConnectionError, TimeoutError))
    if transient:
        return OutboxStatus.DEFERRED, True
    if status is SendStatus.REFUSED:
        return OutboxStatus.REFUSED, False
    return OutboxStatus.FAILED, False


def _reply_of(error: BaseException | None) -> Any:
    if isinstance(error, ReplyError):
        return error.reply
    replies = getattr(error, "replies", None)
    if replies:
        return next(iter(replies.values()))
    return None


def _message_id(data: bytes) -> str:
    from .audit import _header

    return _header(None, "Message-ID", data[: 64 * 1024])[:255]


def _delivery_of(message: EmailMessage) -> DeliveryOptions | None:
    from .email_backend import delivery_options

    delivery = delivery_options(message)
    if delivery is not None and delivery.envid == "auto":
        # Fixed now, so that every attempt carries the same envelope id.
        fields = asdict(delivery) | {"envid": secrets.token_hex(16)}
        delivery = DeliveryOptions(**fields)
    return delivery


def _delivery_json(delivery: DeliveryOptions | None) -> dict[str, Any]:
    if delivery is None:
        return {}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(delivery).items()}


def _delivery_from_json(data: dict[str, Any]) -> DeliveryOptions | None:
    if not data:
        return None
    if data.get("notify") is not None:
        data = data | {"notify": tuple(data["notify"])}
    return DeliveryOptions(**data)


def _sending_backend(mailer: str) -> EmailBackend:
    """The mailer's backend as configured in settings, sending rather than queueing."""
    from django.conf import settings

    from .email_backend import EmailBackend

    mailers = getattr(settings, "MAILERS", None)
    if mailer and mailers and mailer in mailers:
        options = dict(mailers[mailer].get("OPTIONS", {}))
        options.update(queue=False, fail_silently=True)
        return EmailBackend(alias=mailer, **options)
    return EmailBackend(queue=False, fail_silently=True)


def _can_defer(tasks_alias: str) -> bool:
    try:
        from django.tasks import task_backends
    except ImportError:
        from django_tasks import task_backends  # type: ignore[assignment]
    return bool(getattr(task_backends[tasks_alias], "supports_defer", False))
