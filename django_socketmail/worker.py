"""One run of the delivery task for one mailer: claim, send, record (see :mod:`.queue`)."""

from __future__ import annotations

import logging
import random
import secrets
import time
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Final

from django.db import connections, router, transaction
from django.db.models import F
from django.utils import timezone

from . import signals
from .limits import Limits, is_throttle
from .outbox import DUE, OutboxContent, OutboxMessage, OutboxStatus
from .queue import (
    LEASE,
    can_defer,
    delivery_from_json,
    enqueue,
    open_requests,
    recover,
    run_started,
    sending_backend,
)
from .rows import update_row, update_rows
from .smtp import SendResult, SendStatus, SocketMailError
from .smtp.engine import Settled, Write
from .smtp.errors import ReplyError
from .smtp.transaction import Transaction

if TYPE_CHECKING:
    from .conf import BackendOptions
    from .email_backend import EmailBackend
    from .session import Session

__all__ = ["BATCH", "RUN_BUDGET", "Worker"]

logger = logging.getLogger("django_socketmail")

BATCH: Final = 100
"""Messages claimed and pipelined at once."""
RUN_BUDGET: Final = 60.0
"""Seconds one task run keeps claiming new batches (it finishes the batch in hand)."""
BACKOFF_BASE: Final = 60.0
BACKOFF_MAX: Final = 3600.0
CONNECT_PAUSE: Final = 30.0
"""Seconds a mailer waits after its server could not be reached (every worker)."""
FOLLOW_UP: Final = timedelta(seconds=1)
"""How long after a run ends the run it schedules for requests still open starts (with a
Tasks backend that can defer), or how long the run waits for them (one that cannot)."""
OPEN_POLL: Final = 0.02
"""Seconds between two looks at the requests still open, while waiting for them."""


class LeaseLost(Exception):
    """Rows this worker was about to write had been taken from it (its lease expired and
    another run recovered them): their content must not go out from here."""


class Worker:
    """One run of :func:`deliver` for one mailer."""

    def __init__(self, mailer: str) -> None:
        self.mailer = mailer
        self.alias = router.db_for_write(OutboxMessage)
        self.token = secrets.token_hex(16)
        self.counts: dict[str, int] = {}
        self.options: BackendOptions | None = None
        self.limits: Limits | None = None
        self._renew_at = 0.0
        self._next_run: Any = None
        self._sending: EmailBackend | None = None
        self._primary: EmailBackend | None = None

    def run(self) -> dict[str, int]:
        """Recover expired leases, then claim and send due messages for up to
        :data:`RUN_BUDGET` seconds, within the mailer's shared limits."""
        run_started(self.mailer)
        recover(self.mailer)
        backend = sending_backend(self.mailer)
        options = self.options = backend.options
        limits = self.limits = Limits(
            self.mailer,
            self.token,
            max_connections=options.max_connections,
            rate=options.rate_limit,
            lease=LEASE,
        )
        if not limits.acquire_slot():
            # Every slot is held by a live worker, which claims until nothing is due and
            # then enqueues what is left: nothing to schedule here (a chain per request
            # would follow).  A crashed holder's slot frees itself when its lease expires.
            return self.counts
        deadline = time.monotonic() + RUN_BUDGET
        try:
            while time.monotonic() < deadline:
                paused = limits.paused_until()
                if paused is not None:
                    self._next_run = paused
                    break
                turns, wait = limits.take(BATCH)
                if not turns:
                    if time.monotonic() + wait >= deadline:
                        self._next_run = timezone.now() + timedelta(seconds=wait)
                        break
                    time.sleep(wait)
                    continue
                rows = self.claim(turns)
                if not rows or not self.send(backend, rows):
                    break
        except LeaseLost as lost:
            # Stalled past the lease: what is still ours is given up as recovery would
            # (unknown if its content may have left, else queued); the run stops.
            logger.warning("django-socketmail: %s; the run stops", lost)
            backend.close()
            recover(self.mailer, owner=self.token)
        finally:
            backend.close()
            if self._sending is not backend and self._sending is not None:
                self._sending.close()
            limits.release_slot()
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

    def send(self, backend: EmailBackend, rows: list[OutboxMessage]) -> bool:
        """Send ``rows`` on one session, recording each outcome the moment it is known
        (so that a worker killed mid-batch leaves no row whose reply had come undecided).
        False when no session could be opened: the rows are deferred and the mailer paused
        briefly, and the run claims no more."""
        opened = self._open(backend)
        if opened is None:
            error = backend.last_session.error if backend.last_session else None
            for row in rows:
                self._finish(row, None, error or SocketMailError("could not connect"))
            if self.limits is not None:
                self.limits.pause(CONNECT_PAUSE)
                self._next_run = timezone.now() + timedelta(seconds=CONNECT_PAUSE)
            return False
        session = opened
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
                row.sender, row.recipients, contents[row.pk], delivery_from_json(row.delivery)
            )
            if tx.result.error is not None:
                self._finish(row, tx.result, tx.result.error)
                continue
            prepared.append((row, tx))
        by_result = {id(tx.result): row.pk for row, tx in prepared}
        pending = {id(tx.result): (row, tx) for row, tx in prepared}

        def record(row: OutboxMessage, tx: Transaction) -> None:
            pending.pop(id(tx.result), None)
            tx.result.outbox_id = row.pk
            shim: Any = _Subject(row.subject)
            session.recorder.message_finished(shim, tx.result, [contents[row.pk]])
            self._finish(row, tx.result, tx.result.error)

        def settled(action: Settled) -> None:
            for result in action.results:
                entry = pending.get(id(result))
                if entry is not None:
                    record(*entry)

        client = session.client
        client.before_write = lambda write: self._before_write(write, by_result)
        client.on_settled = settled
        try:
            batch = session.send([tx for _, tx in prepared], stop_on_error=False)
        finally:
            client.before_write = client.on_settled = None
        unattempted = {id(tx.result) for tx in batch.unattempted}
        for row, tx in list(pending.values()):
            if id(tx.result) in unattempted:
                self._release(row)
            else:
                record(row, tx)
        session.recorder.flush()
        return True

    def _open(self, backend: EmailBackend) -> Session | None:
        """A session on the mailer's server or, while it fails (refused connection, TLS,
        AUTH, a 421), on its ``failover`` mailers in order; None when none opens."""
        limits, options = self.limits, self.options or backend.options
        failover = options.failover if limits is not None else ()
        candidates: list[EmailBackend] = []
        if not (failover and limits is not None and limits.down_until() is not None):
            candidates.append(backend)
        candidates += [self._fallback(backend, entry) for entry in failover]
        for candidate in candidates:
            if candidate.open() is not None and candidate.session is not None:
                self._sending, self._primary = candidate, backend
                return candidate.session
            error = candidate.last_session.error if candidate.last_session else None
            if candidate is backend and limits is not None and failover and _server_failed(error):
                limits.down(options.failover_retry)
                logger.warning(
                    "django-socketmail: mailer %r failed (%s); sending through its failover "
                    "for %s s",
                    self.mailer,
                    error,
                    options.failover_retry,
                )
            if candidate is not backend:
                candidate.close()
        return None

    def _fallback(self, backend: EmailBackend, entry: Any) -> EmailBackend:
        if isinstance(entry, str):
            return sending_backend(entry)
        from .email_backend import EmailBackend

        given = {name: getattr(backend.options, name) for name in ("host", "port", "username")}
        return EmailBackend(**(given | dict(entry) | {"queue": False, "fail_silently": True}))

    def _before_write(self, write: Write, by_result: dict[int, int]) -> None:
        """Before bytes go out: record that these messages' content may leave (committed
        first), and renew the lease when a third of it has passed.  Raises
        :class:`LeaseLost` (nothing of the write goes out) when any of them is no longer
        this worker's."""
        ids = {by_result[id(r)] for r in write.content if id(r) in by_result}
        objects = OutboxMessage.objects.using(self.alias).filter(lease_owner=self.token)
        if ids:
            held = {"lease_owner": self.token, "status": OutboxStatus.SENDING}
            marked = update_rows(
                self.alias, OutboxMessage, sorted(ids), {"content_may_have_left": True}, where=held
            )
            if marked != len(ids):
                raise LeaseLost(
                    f"the lease on queued messages {sorted(ids)} was taken over by another "
                    f"run before their content was written (this worker stalled for more "
                    f"than {LEASE})"
                )
        if time.monotonic() >= self._renew_at:
            objects.filter(status=OutboxStatus.SENDING).update(lease_expires=timezone.now() + LEASE)
            if self.limits is not None:
                self.limits.renew()
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
        if self.limits is not None:
            if reply is not None and reply.code == 421 and self._on_primary():
                self.limits.down(options.failover_retry)
            if is_throttle(reply):
                self.limits.throttled(reply)
            elif status in (OutboxStatus.SENT, OutboxStatus.PARTIAL):
                self.limits.relieved()
        values.update(
            status=status,
            last_reply_code=reply.code if reply else None,
            last_reply=reply.text if reply else "",
            last_error=str(error) if error is not None else "",
            queue_id=(result.queue_id or "") if result is not None else "",
        )
        update_row(self.alias, OutboxMessage, row.pk, values, where={"lease_owner": self.token})
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

    def _on_primary(self) -> bool:
        """Sending through the mailer's own server, which has a failover."""
        return bool(self.options and self.options.failover) and self._sending is self._primary

    def _count(self, status: str) -> None:
        self.counts[str(status)] = self.counts.get(str(status), 0) + 1

    def _schedule_next(self, backend: EmailBackend) -> None:
        """Enqueue the next run: now if messages are due, else for the earliest retry (or
        the end of a pause, a wait for a turn or a slot), when the Tasks backend can defer;
        first, a run for the messages of requests still open (:meth:`_follow_open`)."""
        self._follow_open(backend.options.task_backend)
        upcoming = (
            OutboxMessage.objects.using(self.alias)
            .filter(mailer=self.mailer, status__in=DUE)
            .order_by("next_attempt")
            .values_list("next_attempt", flat=True)
            .first()
        )
        if upcoming is None:
            return
        if self._next_run is not None:
            upcoming = max(upcoming, self._next_run)
        tasks_alias = backend.options.task_backend
        if upcoming <= timezone.now():
            enqueue(self.mailer, tasks_alias)
        elif can_defer(tasks_alias):
            enqueue(self.mailer, tasks_alias, at=upcoming)

    def _follow_open(self, tasks_alias: str) -> None:
        """A request that found this run pending (PostgreSQL) stored its message without
        enqueueing anything; while its transaction is open, the message is invisible to
        this run's claims.  If one is open and no newer run is pending (that one would
        end with the same look): with a Tasks backend that can defer, enqueue a run
        :data:`FOLLOW_UP` from now; with one that cannot, wait for the requests to end, up
        to :data:`FOLLOW_UP`, looking every :data:`OPEN_POLL` seconds, and enqueue a run
        now if they have not (once they have, the due messages are found below)."""
        deadline = time.monotonic() + FOLLOW_UP.total_seconds()
        defer = None
        while True:
            still_open, pending = open_requests(self.mailer)
            if not still_open or pending:
                return
            if defer is None:
                defer = can_defer(tasks_alias)
            if defer:
                enqueue(self.mailer, tasks_alias, at=timezone.now() + FOLLOW_UP)
                return
            if time.monotonic() >= deadline:
                enqueue(self.mailer, tasks_alias)
                return
            time.sleep(OPEN_POLL)


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


def _server_failed(error: BaseException | None) -> bool:
    """A failure of the server rather than of a message: worth its failover."""
    from .smtp.errors import AuthenticationError, ConnectError, NotSupportedError, TLSError

    return isinstance(
        error,
        (
            ConnectionError,
            TimeoutError,
            TLSError,
            AuthenticationError,
            ConnectError,
            NotSupportedError,
        ),
    )
