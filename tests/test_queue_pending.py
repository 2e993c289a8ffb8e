"""A queued call counts on a pending run from inside the caller's transaction (PostgreSQL).

On PostgreSQL one queued message is stored by one statement that also reads whether a run
of its mailer is pending, taking a ``FOR KEY SHARE`` lock on the mailer's state row until
the caller's transaction ends.  While a run is pending nothing follows the commit.  A run
that ends while such a transaction is still open finds that lock and makes sure another run
follows the commit: the message it could not see yet is not left behind.

Each test routes the queue's tables (outbox, contents, mailer state and slots) to the
PostgreSQL alias; requests that must stay open run in threads of their own (each with its
own connection), with a ``lock_timeout`` so that a lock they wrongly wait for fails the test
instead of hanging it.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from django.core.mail import EmailMessage
from django.db import connections, transaction
from django.test import override_settings
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from django_socketmail import queue, worker
from django_socketmail.outbox import MailerSlot, MailerState, OutboxMessage
from django_socketmail.serializer import serialize
from django_socketmail.worker import Worker

from .hostile.server import HostileSMTPServer, standard_session
from .pg import ALIAS
from .queueing import MAILER, mailer_at, queued, socketmail

pytestmark = [pytest.mark.django_db(transaction=True, databases=["default", ALIAS])]

try:
    from django.tasks import task_backends
except ImportError:  # Django 5.2: the backport
    from django_tasks import task_backends  # type: ignore[no-redef]

QUEUE_MODELS = ("outboxmessage", "outboxcontent", "mailerstate", "mailerslot")


class QueueOn:
    """Route every table of the queue to ``alias``."""

    def __init__(self, alias: str) -> None:
        self.alias = alias

    def db_for_write(self, model: Any, **hints: Any) -> str | None:
        return self.alias if model._meta.model_name in QUEUE_MODELS else None

    db_for_read = db_for_write


@contextmanager
def queue_on(alias: str) -> Iterator[None]:
    """The queue's tables on ``alias``, emptied before and after."""

    def empty() -> None:
        OutboxMessage.objects.using(alias).all().delete()
        MailerState.objects.using(alias).all().delete()
        MailerSlot.objects.using(alias).all().delete()

    with override_settings(DATABASE_ROUTERS=[QueueOn(alias)]):
        empty()
        try:
            yield
        finally:
            for request in OpenRequest.started:
                request.release.set()
                request.thread.join(10)
            OpenRequest.started.clear()
            with connections[alias].cursor() as cursor:
                cursor.execute("RESET lock_timeout")
            empty()


def message(subject: str) -> EmailMessage:
    return EmailMessage(subject, "body\n", "shop@example.com", ["a@example.com"])


def dummy_runs() -> list[Any]:
    """What the "dummy" Tasks backend holds: the runs enqueued, in order."""
    return list(task_backends["dummy"].results)


class OpenRequest:
    """A request in a thread of its own that queues one message in its transaction and
    holds the transaction open until :meth:`commit` (or the end of :func:`queue_on`).

    ``counting``: the message is stored as a call counting on the pending run does (the
    statement that reads the run and locks the state row, nothing enqueued), whatever the
    Tasks backend configured."""

    started: list[OpenRequest] = []

    def __init__(self, alias: str, subject: str, *, counting: bool = False) -> None:
        self.alias = alias
        self.subject = subject
        self.counting = counting
        self.stored = threading.Event()
        self.release = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"request {subject}")
        self.thread.start()
        self.started.append(self)
        assert self.stored.wait(10), "the request did not store its message"
        assert self.error is None, self.error

    def _run(self) -> None:
        try:
            connection = connections[self.alias]
            with connection.cursor() as cursor:
                cursor.execute("SET lock_timeout = '3s'")
            with transaction.atomic(using=self.alias):
                if self.counting:
                    self._store_counting(connection)
                else:
                    assert queued().send_messages([message(self.subject)]) == 1
                self.stored.set()
                self.release.wait(10)
        except BaseException as error:  # reported by the test's thread
            self.error = error
            self.stored.set()
        finally:
            connections.close_all()

    def _store_counting(self, connection: Any) -> None:
        data = serialize(message(self.subject))
        row = OutboxMessage(
            mailer=MAILER,
            sender="shop@example.com",
            recipients=["a@example.com"],
            subject=self.subject,
            size=len(data),
        )
        assert queue._insert_with_content(connection, row, data, MAILER) is True

    def commit(self) -> None:
        self.release.set()
        self.thread.join(10)
        assert not self.thread.is_alive()
        assert self.error is None, self.error


def row_locked_by_another(alias: str, *, exclusive: bool) -> bool:
    """Whether another connection finds the mailer's state row locked against ``FOR
    UPDATE NOWAIT`` (``exclusive``) or ``FOR KEY SHARE NOWAIT`` (what a request takes)."""
    found: list[bool] = []
    mode = "UPDATE" if exclusive else "KEY SHARE"

    def look() -> None:
        from django.db import OperationalError

        try:
            with transaction.atomic(using=alias), connections[alias].cursor() as cursor:
                table = MailerState._meta.db_table
                cursor.execute(
                    f"SELECT 1 FROM {table} WHERE mailer = %s FOR {mode} NOWAIT",
                    [MAILER],
                )
            found.append(False)
        except OperationalError:
            found.append(True)
        finally:
            connections.close_all()

    thread = threading.Thread(target=look)
    thread.start()
    thread.join(10)
    return found == [True]


def worker_waits_for_no_lock(alias: str) -> None:
    with connections[alias].cursor() as cursor:
        cursor.execute("SET lock_timeout = '3s'")


def test_a_call_while_a_run_is_pending_is_one_statement_and_nothing_after_the_commit(
    postgres_database: str,
) -> None:
    alias = postgres_database
    task_backends["dummy"].clear()
    with queue_on(alias), socketmail(task_backend="dummy"):
        backend = queued()
        with transaction.atomic(using=alias):
            backend.send_messages([message("first")])
        assert len(dummy_runs()) == 1  # no run was pending: the commit enqueued one
        with CaptureQueriesContext(connections[alias]) as ran, transaction.atomic(using=alias):
            assert backend.send_messages([message("second")]) == 1
        # Everything the call sent, the commit's hooks included: one statement (Django
        # 5.2+ also logs the transaction's BEGIN and COMMIT).
        sent = [q["sql"].split()[0].upper() for q in ran.captured_queries]
        assert [kind for kind in sent if kind not in ("BEGIN", "COMMIT")] == ["WITH"]
        assert len(dummy_runs()) == 1
        queue.run_started(MAILER)  # the run starts: the next commit enqueues another
        with transaction.atomic(using=alias):
            backend.send_messages([message("third")])
        assert len(dummy_runs()) == 2
        # Outside a transaction of the caller's, the same: stored, then enqueued or not.
        assert backend.send_messages([message("fourth")]) == 1
        assert len(dummy_runs()) == 2
        subjects = OutboxMessage.objects.using(alias).order_by("pk").values_list("subject")
        assert [s for (s,) in subjects] == ["first", "second", "third", "fourth"]
    task_backends["dummy"].clear()


def test_a_run_ending_while_requests_that_counted_on_it_are_open_defers_another(
    postgres_database: str,
) -> None:
    """The run starts (clearing the pending mark), claims, and ends while two requests
    that found it pending are still open: their messages are invisible to it.  It enqueues
    a run ``worker.FOLLOW_UP`` later, which sends both.  Neither request waited for
    the other or for the run, nor the run for them."""
    alias = postgres_database
    task_backends["dummy"].clear()
    with (
        queue_on(alias),
        HostileSMTPServer([standard_session()]) as server,
        mailer_at(server, task_backend="dummy"),
    ):
        assert queue._request_run(MAILER) is True  # a run is pending, not started
        first, second = OpenRequest(alias, "open one"), OpenRequest(alias, "open two")
        worker_waits_for_no_lock(alias)
        before = timezone.now()
        assert Worker(MAILER).run() == {}  # nothing it could see was due
        runs = dummy_runs()
        assert len(runs) == 1
        assert runs[0].args == [MAILER]
        run_after = runs[0].task.run_after
        assert run_after is not None
        assert before + worker.FOLLOW_UP <= run_after <= timezone.now() + worker.FOLLOW_UP
        # The same look from inside a transaction: in a savepoint, rolled back, so the row
        # is not held by it afterwards.
        with transaction.atomic(using=alias):
            assert queue.open_requests(MAILER) == (True, False)
            assert not row_locked_by_another(alias, exclusive=False)
        first.commit()
        second.commit()
        with transaction.atomic(using=alias):
            assert queue.open_requests(MAILER) == (False, False)
            assert not row_locked_by_another(alias, exclusive=True)
        assert len(dummy_runs()) == 1  # the commits enqueued nothing: the run follows
        assert Worker(MAILER).run() == {"sent": 2}
        assert server.wait_closed()
        assert len(server.connections[0].messages) == 2
        # That run found no request open: nothing more is scheduled.
        assert len(dummy_runs()) == 1
    task_backends["dummy"].clear()


def test_a_run_found_pending_again_takes_over_the_open_requests(
    postgres_database: str,
) -> None:
    """When a newer run is pending as the run ends, that run (which starts after every
    request now open found its run pending) ends with the same check: no run is added."""
    alias = postgres_database
    task_backends["dummy"].clear()
    with queue_on(alias), socketmail(task_backend="dummy"):
        assert queue._request_run(MAILER) is True
        request = OpenRequest(alias, "open")
        worker = Worker(MAILER)
        worker_waits_for_no_lock(alias)
        original: Callable[..., Any] = worker._schedule_next

        def newer_run_pending(backend: Any) -> None:
            assert queue._request_run(MAILER) is True  # as a committed request would
            original(backend)

        worker._schedule_next = newer_run_pending  # type: ignore[method-assign]
        assert worker.run() == {}
        assert dummy_runs() == []
        request.commit()
        assert OutboxMessage.objects.using(alias).get().subject == "open"
    task_backends["dummy"].clear()


@contextmanager
def immediate_mailer_pending(alias: str) -> Iterator[HostileSMTPServer]:
    """The queue on ``alias``, the mailer sending to a scripted server for one session,
    with the immediate Tasks backend (which cannot defer), and a run marked pending."""
    with (
        queue_on(alias),
        HostileSMTPServer([standard_session()]) as server,
        mailer_at(server, task_backend="default"),
    ):
        assert queue._request_run(MAILER) is True
        yield server


def test_without_deferral_the_call_checks_after_its_commit(postgres_database: str) -> None:
    """With a Tasks backend that cannot defer (the immediate one, which runs a task when
    it is enqueued), a run that found a request open could only wait for it: the call does
    not count on a pending run, and checks after its commit as on other databases."""
    alias = postgres_database
    with immediate_mailer_pending(alias):
        with CaptureQueriesContext(connections[alias]) as ran, transaction.atomic(using=alias):
            assert queued().send_messages([message("immediate")]) == 1
            stored = [q["sql"] for q in ran.captured_queries if q["sql"].startswith("WITH")]
            assert len(stored) == 1 and "FOR KEY SHARE" not in stored[0]
        after = [q["sql"] for q in ran.captured_queries[len(stored) :]]
        assert any("run_requested" in sql for sql in after)  # the check after the commit
        assert queue._reads_pending(alias, "dummy") is True
        assert queue._reads_pending(alias, "default") is False


def test_without_deferral_the_run_waits_for_the_open_request_then_enqueues(
    postgres_database: str,
) -> None:
    """If a request counting on a pending run is open anyway when a run ends, with a Tasks
    backend that cannot defer (here the immediate one) the run waits for it, up to
    ``worker.FOLLOW_UP``, then enqueues a run at once: the message is sent by the time
    the run returns."""
    alias = postgres_database
    with immediate_mailer_pending(alias) as server:
        request = OpenRequest(alias, "open", counting=True)
        timer = threading.Timer(0.3, request.release.set)
        timer.start()
        worker_waits_for_no_lock(alias)
        try:
            Worker(MAILER).run()
        finally:
            timer.cancel()
            request.commit()
        row = OutboxMessage.objects.using(alias).get()
        assert (row.subject, row.status) == ("open", "sent")
        assert server.wait_closed()
        assert len(server.connections) == 1


REQUEST_THREADS = 4
MESSAGES_PER_THREAD = 15


def test_requests_racing_runs_strand_nothing(postgres_database: str) -> None:
    """Four request threads each queue 15 messages, one per transaction, holding each
    transaction open a random few milliseconds after the store (the last one 100 to 200
    ms: the runs it counted on are over by then), while this thread runs
    every run the "dummy" Tasks backend was given, once due (as a worker honouring
    ``run_after`` would).  When the requests are done and no run is left to run, every
    message has been sent, once; runs are counted (printed with ``-s``)."""
    from django_socketmail.localserver import LocalSMTPServer

    alias = postgres_database
    seed = random.randrange(1 << 32)
    print(f"seed {seed}")
    task_backends["dummy"].clear()
    with (
        queue_on(alias),
        LocalSMTPServer(tls="none", pipelining=True) as server,
        mailer_at(server, task_backend="dummy"),
    ):
        worker_waits_for_no_lock(alias)
        errors: list[BaseException] = []
        shared = task_backends["dummy"]  # each thread has its own instance otherwise

        def requests(number: int) -> None:
            chance = random.Random(seed + number)
            task_backends["dummy"] = shared
            try:
                with connections[alias].cursor() as cursor:
                    cursor.execute("SET lock_timeout = '3s'")
                backend = queued()
                for index in range(MESSAGES_PER_THREAD):
                    with transaction.atomic(using=alias):
                        backend.send_messages([message(f"r{number} m{index}")])
                        last = index == MESSAGES_PER_THREAD - 1
                        time.sleep(chance.uniform(0.1, 0.2) if last else chance.uniform(0, 0.03))
                    time.sleep(chance.uniform(0, 0.01))
            except BaseException as error:  # reported by the test's thread
                errors.append(error)
            finally:
                connections.close_all()

        threads = [
            threading.Thread(target=requests, args=(n,), name=f"requests {n}")
            for n in range(REQUEST_THREADS)
        ]
        for thread in threads:
            thread.start()
        taken = 0
        runs = 0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            waiting = dummy_runs()[taken:]
            due = [
                r for r in waiting if r.task.run_after is None or r.task.run_after <= timezone.now()
            ]
            if due:
                taken += 1  # the oldest first: results are in the order they came
                Worker(MAILER).run()
                runs += 1
                continue
            if not waiting and not any(t.is_alive() for t in threads):
                break
            time.sleep(0.005)
        for thread in threads:
            thread.join(10)
        assert errors == []
        statuses = Counter(OutboxMessage.objects.using(alias).values_list("status", flat=True))
        total = REQUEST_THREADS * MESSAGES_PER_THREAD
        print(f"{runs} runs for {total} messages; {statuses}")
        assert statuses == {"sent": total}
        received = [
            line
            for m in server.messages
            for line in m.data.split(b"\r\n")
            if line.startswith(b"Subject: ")
        ]
        assert len(received) == total and len(set(received)) == total
    task_backends["dummy"].clear()
