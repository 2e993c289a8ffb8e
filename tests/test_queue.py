"""Queued delivery (``queue=True``) on Django's Tasks framework, against the scripted server.

The test settings run tasks with the immediate backend (a task runs when enqueued, after
the commit) and offer a "dummy" one that only records them, for tests that run the worker
themselves.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.mail import EmailMessage
from django.db import transaction
from django.utils import timezone

from django_socketmail.email_backend import EmailBackend
from django_socketmail.outbox import OutboxContent, OutboxMessage, OutboxStatus
from django_socketmail.queue import LEASE, deliver, recover, sending_backend
from django_socketmail.smtp import SendResult, SendStatus
from django_socketmail.worker import Worker

from .hostile.server import HostileSMTPServer, Script, close, cycle, reply, standard_session
from .pg import ALIAS
from .queueing import MAILER, mailer_at, queued, socketmail

pytestmark = [pytest.mark.django_db(transaction=True)]


def message(subject: str = "queued", to: list[str] | None = None) -> EmailMessage:
    return EmailMessage(subject, "body\n", "shop@example.com", to or ["a@example.com"])


def result_of(msg: EmailMessage) -> SendResult:
    result = getattr(msg, "socketmail_result", None)
    assert isinstance(result, SendResult)
    return result


def rows() -> list[OutboxMessage]:
    return list(OutboxMessage.objects.order_by("pk"))


def test_a_rolled_back_transaction_stores_and_sends_nothing() -> None:
    with HostileSMTPServer([standard_session()]) as server, mailer_at(server):
        stored = []

        def order() -> None:
            with transaction.atomic():
                stored.append(queued().send_messages([message()]))
                raise RuntimeError("the order failed")

        with pytest.raises(RuntimeError):
            order()
        assert stored == [1]
        assert OutboxMessage.objects.count() == 0
        assert OutboxContent.objects.count() == 0
    assert server.connections == []


def test_committed_messages_are_sent_by_the_task() -> None:
    with HostileSMTPServer([standard_session()]) as server, mailer_at(server):
        msgs = [message("one"), message("two")]
        assert queued().send_messages(msgs) == 2
        assert server.wait_closed()
    for msg in msgs:
        result = result_of(msg)
        assert result.status is SendStatus.QUEUED
        assert result.outbox_id is not None
    assert [(r.status, r.attempts, r.queue_id) for r in rows()] == [
        ("sent", 1, "HOSTILE1"),
        ("sent", 1, "HOSTILE2"),
    ]
    assert len(server.connections) == 1  # one pipelined session for the batch
    stored = OutboxContent.objects.get(pk=rows()[0].pk)
    assert bytes(stored.data) == server.connections[0].messages[0]  # the exact bytes
    assert rows()[0].message_id.startswith("<") and rows()[0].subject == "one"


def test_a_5xx_is_never_retried() -> None:
    refuse = {"RCPT": reply(550, "5.1.1 no such user")}
    with (
        HostileSMTPServer([standard_session(refuse), standard_session()]) as server,
        mailer_at(server),
    ):
        queued().send_messages([message()])
        (row,) = rows()
        assert (row.status, row.attempts, row.last_reply_code) == ("refused", 1, 550)
        OutboxMessage.objects.update(next_attempt=timezone.now() - timedelta(days=1))
        assert deliver.call(MAILER) == {}
    assert len(server.connections) == 1


def test_a_4xx_is_deferred_with_backoff_then_sent() -> None:
    later = {"RCPT": reply(451, "4.3.0 local problem, try later")}
    with (
        HostileSMTPServer([standard_session(later), standard_session()]) as server,
        mailer_at(server),
    ):
        before = timezone.now()
        queued().send_messages([message()])
        (row,) = rows()
        assert (row.status, row.attempts, row.last_reply_code) == ("deferred", 1, 451)
        assert before + timedelta(seconds=29) < row.next_attempt < before + timedelta(seconds=91)
        assert deliver.call(MAILER) == {}  # not due yet
        OutboxMessage.objects.update(next_attempt=timezone.now())
        assert deliver.call(MAILER) == {"sent": 1}
        (row,) = rows()
        assert (row.status, row.attempts) == ("sent", 2)
    assert len(server.connections) == 2


def test_deferred_until_the_attempts_run_out() -> None:
    later = {"MAIL": reply(451, "4.3.0 try later")}
    with (
        HostileSMTPServer([standard_session(later)]) as server,
        mailer_at(server, queue_max_attempts=2),
    ):
        queued().send_messages([message()])
        OutboxMessage.objects.update(next_attempt=timezone.now())
        assert deliver.call(MAILER) == {"failed": 1}
        (row,) = rows()
        assert (row.status, row.attempts, row.last_reply_code) == ("failed", 2, 451)


def test_a_lost_final_reply_is_unknown_and_not_resent() -> None:
    with (
        HostileSMTPServer([standard_session({".": close()}), standard_session()]) as server,
        mailer_at(server),
    ):
        queued().send_messages([message()])
        (row,) = rows()
        assert (row.status, row.content_may_have_left) == ("unknown", True)
        OutboxMessage.objects.update(next_attempt=timezone.now())
        assert deliver.call(MAILER) == {}
    assert len(server.connections) == 1


def test_resend_unknown_sends_the_same_bytes_again() -> None:
    with (
        HostileSMTPServer([standard_session({".": close()}), standard_session()]) as server,
        mailer_at(server, queue_resend_unknown=True),
    ):
        queued().send_messages([message()])
        assert rows()[0].status == "deferred"
        OutboxMessage.objects.update(next_attempt=timezone.now())
        assert deliver.call(MAILER) == {"sent": 1}
        assert server.wait_closed(count=2)
    first, second = server.connections
    assert second.messages == [bytes(OutboxContent.objects.get().data)]
    assert first.received.count(b"Message-ID") == second.received.count(b"Message-ID") == 1


def test_expired_leases_are_recovered_by_what_may_have_left() -> None:
    with socketmail(task_backend="dummy"):
        queued().send_messages([message("written"), message("not written"), message("live")])
    written, unwritten, live = rows()
    past, future = timezone.now() - timedelta(seconds=1), timezone.now() + LEASE
    OutboxMessage.objects.filter(pk=written.pk).update(
        status="sending",
        lease_owner="dead",
        lease_expires=past,
        attempts=1,
        content_may_have_left=True,
    )
    OutboxMessage.objects.filter(pk=unwritten.pk).update(
        status="sending", lease_owner="dead", lease_expires=past, attempts=1
    )
    OutboxMessage.objects.filter(pk=live.pk).update(
        status="sending", lease_owner="alive", lease_expires=future, attempts=1
    )
    assert recover() == {"unknown": 1, "queued": 1}
    assert [(r.status, r.attempts, r.lease_owner) for r in rows()] == [
        ("unknown", 1, ""),
        ("queued", 0, ""),
        ("sending", 1, "alive"),
    ]


def test_two_workers_never_claim_the_same_row() -> None:
    with socketmail(task_backend="dummy"):
        queued().send_messages([message(f"m{n}") for n in range(10)])
    first, second = Worker(MAILER), Worker(MAILER)
    a = {r.pk for r in first.claim(6)}
    b = {r.pk for r in second.claim(6)}
    assert len(a) == 6 and len(b) == 4 and not a & b
    assert OutboxMessage.objects.filter(status=OutboxStatus.SENDING).count() == 10


def test_messages_never_started_go_back_to_the_queue_uncounted() -> None:
    """A 421 at the first message: the others were never started on that connection."""
    closing = {"MAIL": cycle([reply(421, "4.3.2 shutting down"), close()])}
    with HostileSMTPServer([standard_session(closing)]) as server, mailer_at(server):
        with socketmail(task_backend="dummy"):
            queued().send_messages([message("a"), message("b")])
        worker = Worker(MAILER)
        worker.options = sending_backend(MAILER).options
        claimed = worker.claim(10)
        worker.send(sending_backend(MAILER), claimed)
    first, second = rows()
    assert (first.status, first.attempts, first.last_reply_code) == ("deferred", 1, 421)
    assert (second.status, second.attempts) == ("queued", 0)


def test_the_management_command_recovers_delivers_and_reports() -> None:
    from io import StringIO

    from django.core.management import call_command

    with HostileSMTPServer([standard_session()]) as server, mailer_at(server):
        with socketmail(task_backend="dummy"):
            queued().send_messages([message("cron")])
        out = StringIO()
        call_command("socketmail_queue", "--recover", "--deliver", stdout=out)
        assert server.wait_closed()
    text = out.getvalue()
    assert "recovered: 0 unknown, 0 queued" in text
    assert f"mailer {MAILER!r}: 1 sent" in text
    assert f"{MAILER or '(default)'}\tsent\t1" in text
    assert rows()[0].queue_id == "HOSTILE1"


def test_signals_tell_each_step_and_pre_send_may_cancel() -> None:
    from django_socketmail import signals

    seen: list[tuple[str, str]] = []

    def record(name: str) -> Any:
        def receiver(sender: Any, outbox: OutboxMessage, **kwargs: Any) -> None:
            seen.append((name, outbox.subject))

        return receiver

    def veto(sender: Any, outbox: OutboxMessage, **kwargs: Any) -> None:
        if outbox.subject == "spam":
            raise signals.CancelSend

    receivers = {
        signals.message_queued: record("queued"),
        signals.message_sent: record("sent"),
        signals.message_deferred: record("deferred"),
        signals.message_failed: record("failed"),
    }
    later = {"RCPT": cycle(reply(250, "2.1.5 Ok"), reply(450, "4.2.1 busy"))}
    with HostileSMTPServer([standard_session(later)]) as server, mailer_at(server):
        for signal, receiver in receivers.items():
            signal.connect(receiver, dispatch_uid=id(receiver))
        signals.pre_send.connect(veto, dispatch_uid="veto")
        try:
            queued().send_messages([message("ham"), message("spam"), message("later")])
        finally:
            for signal, receiver in receivers.items():
                signal.disconnect(dispatch_uid=id(receiver))
            signals.pre_send.disconnect(dispatch_uid="veto")
    assert seen == [
        ("queued", "ham"),
        ("queued", "spam"),
        ("queued", "later"),
        ("sent", "ham"),
        ("deferred", "later"),
    ]
    assert [r.status for r in rows()] == ["sent", "cancelled", "deferred"]


def test_the_outbox_admin_lists_retries_and_cancels(client: Any) -> None:
    from django.contrib.auth.models import User

    User.objects.create_superuser("admin", "admin@example.com", "pw")
    client.force_login(User.objects.get())
    with socketmail(task_backend="dummy"):
        queued().send_messages([message("<b>keep</b>"), message("drop")])
        keep, drop = rows()
        OutboxMessage.objects.filter(pk=keep.pk).update(status="failed")
        url = "/admin/django_socketmail/outboxmessage/"
        page = client.get(url)
        assert page.status_code == 200
        assert b"&lt;b&gt;keep&lt;/b&gt;" in page.content and b"<b>keep</b>" not in page.content
        for action, pk in (("retry_now", keep.pk), ("cancel", drop.pk)):
            done = client.post(url, {"action": action, "_selected_action": [pk]}, follow=True)
            assert done.status_code == 200
        detail = client.get(f"{url}{keep.pk}/change/")
        assert b"attempts of this message" in detail.content
    assert [(r.status, r.subject) for r in rows()] == [
        ("queued", "<b>keep</b>"),
        ("cancelled", "drop"),
    ]


@pytest.mark.parametrize(
    "throttle",
    ["432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded", "450 4.2.1 rate limited"],
)
def test_a_throttle_reply_pauses_the_whole_mailer(throttle: str) -> None:
    from django_socketmail.outbox import MailerState

    code, text = throttle.split(" ", 1)
    slow_down = {
        "MAIL": cycle(reply(250, "2.1.0 Ok"), reply(int(code), text), reply(int(code), text))
    }
    with HostileSMTPServer([standard_session(slow_down)]) as server, mailer_at(server):
        with socketmail(task_backend="dummy"):
            queued().send_messages([message("one"), message("two"), message("three")])
        before = timezone.now()
        assert Worker(MAILER).run() == {"sent": 1, "deferred": 2}
        state = MailerState.objects.get()
        assert state.throttles == 2 and state.last_throttle_reply.startswith(code)
        assert state.paused_until is not None  # 60 s, then doubled by the second
        assert (
            before + timedelta(seconds=119) < state.paused_until < before + timedelta(seconds=130)
        )
        OutboxMessage.objects.update(next_attempt=timezone.now())
        assert Worker(MAILER).run() == {}  # paused: nothing claimed, however due
        MailerState.objects.update(paused_until=timezone.now())
        assert Worker(MAILER).run() == {"sent": 1, "deferred": 1}
        assert MailerState.objects.get().throttles == 1  # the success started the count again


def test_max_connections_is_shared_by_every_worker() -> None:
    from django_socketmail.limits import Limits

    def limits(token: str) -> Limits:
        return Limits(MAILER, token, max_connections=2, rate=None, lease=LEASE)

    first, second, third = limits("a"), limits("b"), limits("c")
    assert first.acquire_slot() and second.acquire_slot()
    assert not third.acquire_slot()
    with HostileSMTPServer([standard_session()]) as server, mailer_at(server, max_connections=2):
        with socketmail(task_backend="dummy", max_connections=2):
            queued().send_messages([message()])
        assert Worker(MAILER).run() == {}  # both slots held elsewhere: nothing sent
        first.release_slot()
        assert Worker(MAILER).run() == {"sent": 1}
    assert third.acquire_slot()  # the worker gave its slot back


def test_rate_limit_never_exceeds_the_limit_in_any_window_of_sends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``rate_limit="600/min"``, four workers, two simulated minutes: each worker takes
    turns and its messages reach the server up to 0.2 s later (a batch is not sent in an
    instant).  Counted by when the messages go out, no 10 s window holds more than 100
    and the rate is within 5 % of the limit.  (Turns of a whole second at once let a late
    batch and the next ones share a window: 109 measured against Postfix.)"""
    import random

    from django.utils import timezone as tz

    from django_socketmail.limits import Limits

    clock = [tz.now()]
    monkeypatch.setattr(tz, "now", lambda: clock[0])
    rng = random.Random(14)
    workers = [
        Limits(MAILER, t, max_connections=None, rate=(600, 60.0), lease=LEASE) for t in "abcd"
    ]
    start = clock[0]
    sends: list[float] = []
    wake = dict.fromkeys(range(len(workers)), 0.0)
    while (clock[0] - start).total_seconds() < 120:
        now = (clock[0] - start).total_seconds()
        for n, worker in enumerate(workers):
            if wake[n] > now:
                continue
            turns, wait = worker.take(100)
            if turns:
                spread = rng.uniform(0.0, 0.2)
                sends += [now + spread * (i + 1) / turns for i in range(turns)]
                wake[n] = now + spread
            else:
                assert 0 < wait <= 60
                wake[n] = now + wait
        clock[0] += timedelta(seconds=0.01)
    sends.sort()
    busiest = max(sum(1 for t in sends[i:] if t < first + 10.0) for i, first in enumerate(sends))
    assert busiest <= 100, busiest
    per_minute = sum(1 for t in sends if 30 <= t < 90)
    assert 570 <= per_minute <= 600, per_minute  # 576: PACE


def test_failover_while_the_primary_fails_and_back_after_the_retry_period() -> None:
    from django_socketmail.outbox import MailerState

    greeting_refused = Script([reply(554, "5.3.2 not today"), close()])
    with (
        HostileSMTPServer([greeting_refused, standard_session()]) as primary,
        HostileSMTPServer([standard_session()]) as backup,
        mailer_at(primary, failover=[{"host": backup.host, "port": backup.port}]),
    ):
        with socketmail(task_backend="dummy"):
            queued().send_messages([message("first")])
        assert Worker(MAILER).run() == {"sent": 1}  # through the backup
        assert primary.wait_closed() and len(primary.connections) == 1
        down = MailerState.objects.get().down_until
        assert down is not None and down > timezone.now() + timedelta(seconds=50)

        with socketmail(task_backend="dummy"):
            queued().send_messages([message("second")])
        assert Worker(MAILER).run() == {"sent": 1}
        assert len(primary.connections) == 1  # passed over while it is down

        MailerState.objects.update(down_until=timezone.now())
        with socketmail(task_backend="dummy"):
            queued().send_messages([message("third")])
        assert Worker(MAILER).run() == {"sent": 1}
        assert primary.wait_closed(count=2)
    assert len(primary.connections) == 2 and len(primary.connections[1].messages) == 1
    assert [len(c.messages) for c in backup.connections] == [1, 1]


def test_audit_rows_link_to_their_outbox_row() -> None:
    from django_socketmail.models import MessageLog

    first, then = standard_session({".": reply(451, "4.3.0 try later")}), standard_session()
    with HostileSMTPServer([first, then]) as server, mailer_at(server, audit_log=True):
        queued().send_messages([message()])
        OutboxMessage.objects.update(next_attempt=timezone.now())
        deliver.call(MAILER)
    (row,) = rows()
    attempts = list(MessageLog.objects.order_by("pk"))
    assert [(a.outbox_id, a.status) for a in attempts] == [(row.pk, "failed"), (row.pk, "sent")]
    assert list(row.logged_attempts.order_by("pk")) == attempts


def test_a_burst_of_requests_enqueues_one_run_until_it_starts() -> None:
    try:
        from django.tasks import task_backends
    except ImportError:
        from django_tasks import task_backends  # type: ignore[no-redef]

    dummy = task_backends["dummy"]
    dummy.clear()
    with HostileSMTPServer([standard_session()]) as server, mailer_at(server, task_backend="dummy"):
        for n in range(5):
            queued().send_messages([message(f"burst {n}")])
        assert len(dummy.results) == 1  # one pending run claims all five
        assert Worker(MAILER).run() == {"sent": 5}
        queued().send_messages([message("after")])
        assert len(dummy.results) == 2  # the run started: the next commit enqueues
    dummy.clear()


def test_options_the_worker_would_not_see_are_refused() -> None:
    """The worker rebuilds the mailer from settings: an option given only to the backend
    (a host, a port, a password...) would be silently dropped at delivery, so a queueing
    backend whose options differ from the settings' is refused, naming them and the fix."""
    with HostileSMTPServer([standard_session()]) as server, mailer_at(server):
        with pytest.raises(
            ImproperlyConfigured, match=r"from settings, where 'port', 'password' have"
        ) as caught:
            queued(port=server.port + 1, password="s3cret-given")
        assert "s3cret-given" not in str(caught.value)
        queued()  # what the settings say: accepted
    assert server.connections == []


def test_a_queued_call_costs_two_inserts_in_the_callers_transaction() -> None:
    """Every address checked and every message serialized before the first statement; then
    one INSERT of the rows and one of their contents, whatever their number, and no
    savepoint of their own.  A bad address anywhere: no statement at all."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from django_socketmail.smtp import InvalidAddressError

    with socketmail(task_backend="dummy"):
        backend = queued()
        with transaction.atomic(), CaptureQueriesContext(connection) as ran:
            assert backend.send_messages([message("one"), message("two"), message("three")]) == 3
        statements = [q["sql"].split()[0].upper() for q in ran.captured_queries]
        inserts = [q["sql"] for q in ran.captured_queries if q["sql"].startswith("INSERT")]
        assert "SAVEPOINT" not in statements
        assert len(inserts) == 2
        assert "socketmail_outbox" in inserts[0] and "content" in inserts[1]
        assert [r.subject for r in rows()] == ["one", "two", "three"]
        assert [bytes(r.content.data).count(b"Subject: ") for r in rows()] == [1, 1, 1]

        bad = message("bad", to=["not an address"])
        with CaptureQueriesContext(connection) as ran, pytest.raises(InvalidAddressError):
            backend.send_messages([message("fine"), bad])
        assert ran.captured_queries == []
    assert len(rows()) == 3


class OutboxOn:
    """Route the outbox's rows to ``alias``."""

    def __init__(self, alias: str) -> None:
        self.alias = alias

    def db_for_write(self, model: Any, **hints: Any) -> str | None:
        return self.alias if model._meta.model_name.startswith("outbox") else None

    db_for_read = db_for_write


@contextmanager
def queueing_on(alias: str) -> Iterator[EmailBackend]:
    """The queueing backend (the "dummy" Tasks backend) with the outbox routed to
    ``alias``, emptied before and after."""
    from django.test import override_settings

    with (
        override_settings(DATABASE_ROUTERS=[OutboxOn(alias)]),
        socketmail(task_backend="dummy"),
    ):
        OutboxMessage.objects.using(alias).all().delete()
        try:
            yield queued()
        finally:
            OutboxMessage.objects.using(alias).all().delete()


@pytest.mark.django_db(transaction=True, databases=["default", ALIAS])
def test_one_message_is_stored_in_one_statement_on_postgresql(postgres_database: str) -> None:
    """On PostgreSQL one message's row and content go in with one statement (a
    data-modifying WITH), holding what the two-statement path writes for the same message;
    a rollback still stores nothing."""
    from django.db import connections
    from django.test.utils import CaptureQueriesContext

    from django_socketmail import signals

    seen: list[OutboxMessage] = []

    def queued_signal(sender: Any, outbox: OutboxMessage, **kwargs: Any) -> None:
        seen.append(outbox)

    alias = postgres_database
    pg = connections[alias]
    with queueing_on(alias) as backend:
        alone, first, second = message("alone"), message("pair one"), message("pair two")
        signals.message_queued.connect(queued_signal)
        try:
            with transaction.atomic(using=alias), CaptureQueriesContext(pg) as ran:
                assert backend.send_messages([alone]) == 1
        finally:
            signals.message_queued.disconnect(queued_signal)
        assert [q["sql"].split()[0] for q in ran.captured_queries] == ["WITH"]
        with transaction.atomic(using=alias):
            assert backend.send_messages([first, second]) == 2

        def failing_view() -> None:
            with transaction.atomic(using=alias):
                backend.send_messages([message("rolled back")])
                raise RuntimeError("the view failed")

        with pytest.raises(RuntimeError):
            failing_view()

        stored = {r.subject: r for r in OutboxMessage.objects.using(alias).order_by("pk")}
        assert list(stored) == ["alone", "pair one", "pair two"]
        one, two = stored["alone"], stored["pair two"]
        assert result_of(alone).outbox_id == one.pk == seen[0].pk
        assert seen[0]._state.adding is False and seen[0]._state.db == alias
        skip = {"id", "subject", "size", "created", "next_attempt", "message_id"}
        for field in OutboxMessage._meta.concrete_fields:
            if field.name not in skip:
                assert getattr(one, field.name) == getattr(two, field.name), field.name
        assert one.created <= one.next_attempt and one.created <= two.created
        assert one.message_id.startswith("<") and one.message_id != two.message_id
        data = bytes(OutboxContent.objects.using(alias).get(message_id=one.pk).data)
        assert len(data) == one.size and b"Subject: alone\r\n" in data


@pytest.mark.django_db(transaction=True, databases=["default", ALIAS])
def test_outside_a_transaction_one_message_is_one_statement_on_postgresql(
    postgres_database: str,
) -> None:
    """In autocommit mode (Django's default: no ``ATOMIC_REQUESTS``, no ``atomic()``) one
    message on PostgreSQL is stored by its one statement, atomic by itself: no BEGIN, no
    COMMIT, no transaction of its own.  With a ``message_queued`` receiver (which runs
    before the commit, in the same transaction, by its contract) the call still opens
    one, and a receiver that raises leaves nothing stored."""
    from django.db import connections
    from django.test.utils import CaptureQueriesContext

    from django_socketmail import signals

    alias = postgres_database
    pg = connections[alias]
    with queueing_on(alias) as backend:
        with CaptureQueriesContext(pg) as ran:
            assert backend.send_messages([message("alone")]) == 1
        assert [q["sql"].split()[0].upper() for q in ran.captured_queries] == ["WITH"]

        def refuse(sender: Any, outbox: OutboxMessage, **kwargs: Any) -> None:
            assert pg.in_atomic_block  # before the commit, in the call's transaction
            raise RuntimeError("the receiver failed")

        signals.message_queued.connect(refuse)
        try:
            with CaptureQueriesContext(pg) as ran, pytest.raises(RuntimeError):
                backend.send_messages([message("refused")])
        finally:
            signals.message_queued.disconnect(refuse)
        sent = [q["sql"].split()[0].upper() for q in ran.captured_queries]
        assert sent[0] == "BEGIN" and "WITH" in sent and "COMMIT" not in sent
        subjects = OutboxMessage.objects.using(alias).values_list("subject", flat=True)
        assert list(subjects) == ["alone"]
        assert bytes(OutboxContent.objects.using(alias).get().data).count(b"Subject: alone") == 1


class StatesOn:
    """Route the mailers' state rows to ``alias``."""

    def __init__(self, alias: str) -> None:
        self.alias = alias

    def db_for_write(self, model: Any, **hints: Any) -> str | None:
        return self.alias if model._meta.model_name == "mailerstate" else None

    db_for_read = db_for_write


UPSERT = pytest.mark.parametrize("upsert", [True, False], ids=["one-statement", "portable"])


@UPSERT
def test_one_pending_run_per_mailer_on_sqlite(
    upsert: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    check_pending_runs("default", upsert, monkeypatch)


@UPSERT
@pytest.mark.django_db(transaction=True, databases=["default", ALIAS])
def test_one_pending_run_per_mailer_on_postgresql(
    upsert: bool, postgres_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    check_pending_runs(postgres_database, upsert, monkeypatch)


@pytest.mark.django_db(transaction=True, databases=["default", ALIAS])
def test_a_pending_run_is_found_without_locking_or_writing_on_postgresql(
    postgres_database: str,
) -> None:
    """While a run is pending, each request's check of the mailer's state row (one per
    queued call, the hottest row of a busy site) neither locks nor writes it: no WAL."""
    from django.db import connections
    from django.test import override_settings

    from django_socketmail import queue
    from django_socketmail.outbox import MailerState

    alias = postgres_database
    with override_settings(DATABASE_ROUTERS=[StatesOn(alias)]):
        MailerState.objects.using(alias).filter(mailer="hot").delete()
        assert queue._request_run("hot") is True
        with connections[alias].cursor() as cursor:
            cursor.execute("SELECT pg_current_wal_insert_lsn()")
            (before,) = cursor.fetchone()
            assert [queue._request_run("hot") for _ in range(20)] == [False] * 20
            cursor.execute("SELECT pg_current_wal_insert_lsn() - %s::pg_lsn", [before])
            (written,) = cursor.fetchone()
        assert written == 0
        MailerState.objects.using(alias).filter(mailer="hot").delete()


def check_pending_runs(alias: str, upsert: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both ways of marking a run pending (the upsert of PostgreSQL and SQLite, the
    get-or-create and conditional UPDATE of the other databases) agree: the first request
    marks it, the next ones find it pending, a run's start or :data:`RUN_PENDING` frees it."""
    from django.db import connections
    from django.test import override_settings
    from django.test.utils import CaptureQueriesContext

    from django_socketmail import queue
    from django_socketmail.outbox import MailerState

    vendor = connections[alias].vendor
    if not upsert:
        monkeypatch.setattr(connections[alias], "vendor", f"not-{vendor}")
    with override_settings(DATABASE_ROUTERS=[StatesOn(alias)]):
        states = MailerState.objects.using(alias)
        states.filter(mailer__in=["m", "n"]).delete()
        with CaptureQueriesContext(connections[alias]) as ran:
            first = queue._request_run("m")
        assert first is True
        # The first request makes the state row: the upsert on SQLite; on PostgreSQL the
        # conditional UPDATE finds no row, then the upsert; elsewhere get-or-create.
        assert len(ran.captured_queries) == ((2 if vendor == "postgresql" else 1) if upsert else 7)
        with CaptureQueriesContext(connections[alias]) as ran:
            assert [queue._request_run("m") for _ in range(3)] == [False, False, False]
        if upsert:
            assert len(ran.captured_queries) == 3  # one statement per request
        assert queue._request_run("n") is True  # another mailer: its own run
        queue.run_started("m")
        assert queue._request_run("m") is True
        states.filter(mailer="m").update(run_requested=timezone.now() - queue.RUN_PENDING * 2)
        assert queue._request_run("m") is True
        row = states.get(mailer="m")
        assert (row.throttles, row.last_throttle_reply, row.down_until) == (0, "", None)
        states.filter(mailer__in=["m", "n"]).delete()


def test_purge_deletes_old_terminal_messages_in_bounded_batches() -> None:
    """``socketmail_queue --purge-days`` at scale: terminal rows older than the cutoff go in
    batches of at most :data:`PURGE_BATCH` (each its own short transaction, memory bounded),
    with their contents; the count printed is of messages; due and recent rows stay."""
    from io import StringIO

    from django.core.management import call_command
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from django_socketmail.management.commands.socketmail_queue import PURGE_BATCH

    old = PURGE_BATCH * 2 + 500
    with socketmail(task_backend="dummy"):
        queued().send_messages([message(f"m{n}") for n in range(old + 2)])
    ids = [r.pk for r in rows()]
    long_ago = timezone.now() - timedelta(days=40)
    OutboxMessage.objects.filter(pk__in=ids[:old]).update(status="sent", created=long_ago)
    OutboxMessage.objects.filter(pk=ids[old]).update(status="sent")  # recent: kept
    out = StringIO()
    with CaptureQueriesContext(connection) as ran:
        call_command("socketmail_queue", "--purge-days", "30", stdout=out)
    assert f"purged {old} messages" in out.getvalue()
    assert sorted(r.pk for r in rows()) == ids[old:]
    assert OutboxContent.objects.count() == 2
    deletes = [q["sql"] for q in ran.captured_queries if q["sql"].startswith("DELETE")]
    assert deletes, "nothing deleted"
    assert max(d.count(",") for d in deletes) < PURGE_BATCH


def test_a_worker_whose_lease_was_taken_over_writes_no_content() -> None:
    """A worker stalled past its lease (the rows recovered and queued again by another
    worker's run) must not then write their content: the other worker will send them, so
    writing would deliver each twice.  It stops before the bytes go out; every message is
    delivered once, by the next run."""
    from django_socketmail import signals

    stalled: list[int] = []

    def stall_past_the_lease(sender: Any, outbox: OutboxMessage, **kwargs: Any) -> None:
        if not stalled:  # once, while this worker holds the batch
            stalled.append(outbox.pk)
            expired = timezone.now() - timedelta(seconds=1)
            OutboxMessage.objects.filter(status="sending").update(lease_expires=expired)
            assert recover(MAILER) == {"unknown": 0, "queued": 2}

    sessions = [standard_session(), standard_session()]
    with HostileSMTPServer(sessions) as server, mailer_at(server, task_backend="dummy"):
        queued().send_messages([message("first"), message("second")])
        signals.pre_send.connect(stall_past_the_lease, dispatch_uid="stall")
        try:
            Worker(MAILER).run()
        finally:
            signals.pre_send.disconnect(dispatch_uid="stall")
        assert [r.status for r in rows()] == ["queued", "queued"]
        assert Worker(MAILER).run() == {"sent": 2}
        assert server.wait_closed(count=2)
    delivered = [m for c in server.connections for m in c.messages]
    assert len(delivered) == 2
    assert [len(c.messages) for c in server.connections] == [0, 2]
