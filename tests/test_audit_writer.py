"""The audit log's writer thread (``audit_background=True``, django_socketmail/audit_writer.py).

Against real SQLite files in Django's default mode (rollback journal) and the real
PostgreSQL of tests/pg.py: the in-memory databases of the test settings cannot be seen
from another thread, which is itself a contract (their rows are written inline).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import sqlite3
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.core.management import call_command
from django.db import connections, transaction
from django.test import override_settings

from django_socketmail import audit, audit_writer
from django_socketmail.audit import AuditRecorder, drain_audit_log
from django_socketmail.email_backend import EmailBackend
from django_socketmail.localserver import LocalSMTPServer
from django_socketmail.models import MessageLog, RecipientLog, SessionLog
from django_socketmail.pool import close_pool
from django_socketmail.smtp import RecipientResult, RecipientStatus, SendResult, SMTPClient

from .conftest import BackendFactory
from .pg import PostgresServer
from .test_backend import message

MODELS = (SessionLog, MessageLog, RecipientLog)


FILE_A = "writer_file_a"
FILE_B = "writer_file_b"
"""Two SQLite file databases for the audit rows (B in WAL mode, A in Django's default mode:
rollback journal, synchronous=FULL), migrated once for the module and flushed after each
test like every database a test names."""
FILES = ["default", FILE_A, FILE_B]
pytestmark = pytest.mark.django_db(transaction=True, databases=FILES)


@pytest.fixture(scope="module", autouse=True)
def sqlite_files(
    tmp_path_factory: pytest.TempPathFactory, django_db_setup: None, django_db_blocker: Any
) -> Iterator[None]:
    directory = tmp_path_factory.mktemp("audit-writer")
    configured = connections.configure_settings(
        {
            "default": dict(connections.settings["default"]),
            **{
                alias: {"ENGINE": "django.db.backends.sqlite3", "NAME": str(directory / alias)}
                for alias in (FILE_A, FILE_B)
            },
        }
    )
    with django_db_blocker.unblock():
        for alias in (FILE_A, FILE_B):
            # Known to every thread (a connection object of this thread's only would not be).
            connections.settings[alias] = configured[alias]
            settings.DATABASES[alias] = configured[alias]
            call_command("migrate", database=alias, verbosity=0, interactive=False)
        with connections[FILE_B].cursor() as cursor:
            cursor.execute("PRAGMA journal_mode=WAL")
    try:
        yield
    finally:
        with django_db_blocker.unblock():
            assert audit_writer.release_connections(10)  # the thread's connections, closed
            for alias in (FILE_A, FILE_B):
                connections[alias].close()
                del connections[alias]
                connections.settings.pop(alias, None)
                settings.DATABASES.pop(alias, None)


def background(make_backend: BackendFactory, server: Any, **options: Any) -> EmailBackend:
    return make_backend(server, audit_log=True, audit_background=True, **options)


def _recorder(alias: str, **options: Any) -> AuditRecorder:
    backend = EmailBackend(
        host="127.0.0.1",
        port=25,
        audit_log=True,
        audit_background=True,
        audit_database=alias,
        **options,
    )
    return AuditRecorder(backend.options, "default", SMTPClient(backend.options.client_config()))


def _attempt(recorder: AuditRecorder, address: str, **result: Any) -> None:
    recipient = RecipientResult(address, RecipientStatus.DELIVERED)
    recorder.message_finished(
        None, SendResult("sender@example.com", [recipient], started=time.time(), **result), []
    )
    recorder.flush()


@contextlib.contextmanager
def writer_held(recorder: AuditRecorder) -> Iterator[None]:
    """Keep the writer thread busy: a job of ``recorder`` is taken and waits for the
    recorder's lock, held here, while the test queues more."""
    recorder.writing.acquire()
    try:
        _attempt(recorder, "held@example.com")
        deadline = time.monotonic() + 5
        while not audit_writer._current().busy:  # the thread took the job
            assert time.monotonic() < deadline
            time.sleep(0.005)
        yield
    finally:
        recorder.writing.release()


def _rows(alias: str) -> list[tuple[int, str, int | None]]:
    return list(
        MessageLog.objects.using(alias).order_by("pk").values_list("pk", "recipients", "session")
    )


def test_rows_are_written_by_the_thread_in_order_and_drain_waits_for_them(
    make_backend: BackendFactory,
    plain_server: LocalSMTPServer,
) -> None:
    alias = FILE_A
    addresses = [f"to{n}@example.com" for n in range(12)]
    for address in addresses:  # one backend per call, pooled: the pooled send_mail() case
        backend = background(make_backend, plain_server, audit_database=alias, pool=True)
        assert backend.send_messages([message([address])]) == 1
    assert drain_audit_log(10)
    rows = _rows(alias)
    assert [recipients for _pk, recipients, _session in rows] == addresses
    assert len({session for _pk, _recipients, session in rows}) == 1
    session = SessionLog.objects.using(alias).get()
    assert session.messages_sent == len(addresses)
    assert session.ended is None
    assert RecipientLog.objects.using(alias).count() == len(addresses)
    close_pool()  # the session's end, written by the thread too
    assert drain_audit_log(10)
    session = SessionLog.objects.using(alias).get()
    assert session.ended is not None and "C: QUIT" in session.transcript
    # Written by the thread, not by the caller: nothing was in the default database.
    assert not MessageLog.objects.exists()


def test_rows_of_several_calls_share_one_transaction(monkeypatch: pytest.MonkeyPatch) -> None:
    alias = FILE_A
    batches: list[int] = []
    write = audit_writer.write_retrying

    def counted(alias: str, jobs: Any, deadline: float, *, retry: bool) -> None:
        batches.append(len(jobs))
        write(alias, jobs, deadline, retry=retry)

    monkeypatch.setattr(audit_writer, "write_retrying", counted)
    held = _recorder(alias)
    recorders = [_recorder(alias) for _ in range(5)]
    with writer_held(held):
        for recorder in recorders:
            for n in range(3):  # a session's later flushes join its waiting job
                _attempt(recorder, f"r{id(recorder)}-{n}@example.com")
    assert drain_audit_log(10)
    assert batches == [1, 5]  # the held job, then the five sessions' in one commit
    assert audit_writer._current().pending == 0  # merged jobs are counted once, and freed
    assert MessageLog.objects.using(alias).count() == 1 + 5 * 3
    for recorder in recorders:  # each session: one row, its three messages in order
        rows = MessageLog.objects.using(alias).filter(recipients__startswith=f"r{id(recorder)}-")
        assert list(rows.order_by("pk").values_list("recipients", flat=True)) == [
            f"r{id(recorder)}-{n}@example.com" for n in range(3)
        ]
        assert len(set(rows.values_list("session", flat=True))) == 1


class ToFileA:
    """A router that sends the audit log to FILE_A."""

    def db_for_write(self, model: Any, **hints: Any) -> str | None:
        return FILE_A if model._meta.app_label == "django_socketmail" else None


def test_one_session_under_two_names_of_one_database(caplog: pytest.LogCaptureFixture) -> None:
    # A session whose rows went to the router's choice, then to the same database by its
    # alias (a borrower configured with audit_database): one session row, no wait for itself.
    held, recorder = _recorder(FILE_A), _recorder(FILE_A)
    with (
        override_settings(DATABASE_ROUTERS=[f"{__name__}.ToFileA"]),
        caplog.at_level(logging.ERROR, logger="django_socketmail"),
    ):
        with writer_held(held):
            recorder.options = dataclasses.replace(recorder.options, audit_database=None)
            _attempt(recorder, "routed@example.com")
            recorder.options = dataclasses.replace(recorder.options, audit_database=FILE_A)
            _attempt(recorder, "named@example.com")
        assert drain_audit_log(10)
    assert caplog.text == ""
    rows = _rows(FILE_A)
    assert [r for _pk, r, _s in rows] == [
        "held@example.com",
        "routed@example.com",
        "named@example.com",
    ]
    assert len({s for _pk, _r, s in rows[1:]}) == 1
    assert audit_writer._current().pending == 0


def test_rows_survive_the_callers_rollback_on_sqlite_even_after_it_wrote(
    make_backend: BackendFactory,
    plain_server: LocalSMTPServer,
) -> None:
    # Inline, the caller's transaction holds SQLite's one write lock once it wrote, so the
    # rows had to go inside it (and vanished with it).  The thread waits for the lock
    # instead, within its budget, and the rows survive.
    alias = FILE_A
    backend = background(make_backend, plain_server, audit_database=alias)
    with contextlib.suppress(RuntimeError), transaction.atomic(using=alias):
        SessionLog.objects.using(alias).create(host="caller.example", port=1)
        assert backend.send_messages([message()]) == 1
        raise RuntimeError("the view fails after sending")
    assert drain_audit_log(10)
    assert MessageLog.objects.using(alias).count() == 1
    assert list(SessionLog.objects.using(alias).values_list("host", flat=True)) == ["127.0.0.1"]


@pytest.mark.django_db(transaction=True, databases=["default", "postgres"])
@pytest.mark.postgres
def test_rows_survive_the_callers_rollback_on_postgres(
    make_backend: BackendFactory, plain_server: LocalSMTPServer, postgres_database: str
) -> None:
    backend = background(make_backend, plain_server, audit_database=postgres_database)
    with contextlib.suppress(RuntimeError), transaction.atomic(using=postgres_database):
        assert backend.send_messages([message(), message()]) == 2
        raise RuntimeError("rolled back")
    assert drain_audit_log(10)
    assert MessageLog.objects.using(postgres_database).count() == 2
    assert SessionLog.objects.using(postgres_database).get().ended is not None


@pytest.mark.django_db(transaction=True, databases=["default", "postgres"])
@pytest.mark.postgres
def test_the_thread_closes_its_postgres_connection_when_idle(
    make_backend: BackendFactory,
    plain_server: LocalSMTPServer,
    postgres_server: PostgresServer,
    postgres_database: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def backends() -> int:
        with postgres_server.connect("socketmail_tests") as other:
            row = other.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = 'socketmail_tests' "
                "AND pid <> pg_backend_pid()"
            ).fetchone()
        assert row is not None
        return int(row[0])

    connections[postgres_database].close()
    assert audit_writer.release_connections(10)
    before = backends()
    monkeypatch.setattr(audit_writer, "IDLE_CLOSE", 0.2)
    backend = background(make_backend, plain_server, audit_database=postgres_database)
    assert backend.send_messages([message()]) == 1
    assert drain_audit_log(10)
    assert MessageLog.objects.using(postgres_database).count() == 1
    connections[postgres_database].close()
    deadline = time.monotonic() + 5
    while backends() != before:  # the thread's connection goes once it has been idle
        assert time.monotonic() < deadline, "the writer thread kept its connection"
        time.sleep(0.05)


def test_a_failing_write_changes_no_send_result_and_sends_nothing_twice(
    make_backend: BackendFactory,
    plain_server: LocalSMTPServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Another process holds the database for longer than a write's budget: the thread
    # gives up within it (the rows of that write are dropped, on the logger), the send
    # results stand and nothing is resent; the next write goes through.
    other = sqlite3.connect(settings.DATABASES[FILE_A]["NAME"], isolation_level=None)
    try:
        other.execute("BEGIN EXCLUSIVE")
        backend = background(make_backend, plain_server, audit_database=FILE_A)
        with caplog.at_level(logging.ERROR, logger="django_socketmail"):
            assert backend.send_messages([message(), message()]) == 2
            started = time.monotonic()
            assert drain_audit_log(10)
            assert time.monotonic() - started < 2 * audit.WRITE_BUDGET
        other.execute("ROLLBACK")
    finally:
        other.close()
    assert "could not write the audit log" in caplog.text
    assert len(plain_server.wait_for_messages(2)) == 2
    assert backend.send_messages([message()]) == 1
    assert drain_audit_log(10)
    assert MessageLog.objects.using(FILE_A).count() == 1
    assert len(plain_server.messages) == 3  # nothing resent


def test_one_bad_row_costs_only_its_own_calls_rows(caplog: pytest.LogCaptureFixture) -> None:
    # A row the database refuses (a negative size: the column's CHECK constraint) fails the
    # shared transaction; the batch is written again job by job.
    alias = FILE_A
    held, good, bad, later = (_recorder(alias) for _ in range(4))
    with caplog.at_level(logging.ERROR, logger="django_socketmail"), writer_held(held):
        _attempt(good, "good@example.com")
        _attempt(bad, "bad@example.com", size=-1)
        _attempt(later, "later@example.com")
    assert drain_audit_log(10)
    recipients = MessageLog.objects.using(alias).values_list("recipients", flat=True)
    assert sorted(recipients) == ["good@example.com", "held@example.com", "later@example.com"]
    assert caplog.text.count("could not write the audit log") == 1
    assert "CHECK constraint" in caplog.text


def test_a_full_queue_makes_the_caller_write_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit_writer, "MAX_PENDING", 4)
    stuck, free = FILE_A, FILE_B
    held = _recorder(stuck)
    recorder = _recorder(free)
    with writer_held(held):  # the thread waits: held's job is being written (weight 2)
        _attempt(recorder, "first@example.com")  # queued (weight 2: the queue is full)
        assert not MessageLog.objects.using(free).exists()
        _attempt(recorder, "second@example.com")  # no room: written here, with the first
        # Back from flush(): both rows are there, in order, under one session row.
        assert [r for _pk, r, _s in _rows(free)] == ["first@example.com", "second@example.com"]
        assert SessionLog.objects.using(free).count() == 1
    assert drain_audit_log(10)
    _attempt(recorder, "third@example.com")  # room again: through the thread
    assert drain_audit_log(10)
    assert [r for _pk, r, _s in _rows(free)][-1] == "third@example.com"
    assert SessionLog.objects.using(free).count() == 1
    assert MessageLog.objects.using(stuck).count() == 1


def test_a_row_is_what_was_observed_when_the_attempt_finished() -> None:
    # The rows are written later, by the thread: a message or result changed by the caller
    # after send_messages() returned (a form's EmailMessage reused) does not change them.
    recorder = _recorder(FILE_A, audit_body_bytes=4096)
    email = message(["first@example.com"])
    email.subject = "as sent"
    result = SendResult(
        "sender@example.com",
        [RecipientResult("first@example.com", RecipientStatus.DELIVERED)],
        started=time.time(),
    )
    raw = [b"Message-ID: <sent@example.com>\r\nSubject: as sent\r\n\r\nthe body"]
    held = _recorder(FILE_A)
    with writer_held(held):
        recorder.message_finished(email, result, raw)
        recorder.flush()
        email.subject = "changed"
        result.recipients[0] = RecipientResult("other@example.com", RecipientStatus.REFUSED)
        raw[0] = b"Message-ID: <other@example.com>\r\n\r\nother"
    assert drain_audit_log(10)
    row = MessageLog.objects.using(FILE_A).get(subject="as sent")
    assert (row.recipients, row.status, row.message_id) == (
        "first@example.com",
        "sent",
        "<sent@example.com>",
    )
    assert row.body.endswith("the body")
    recipient = RecipientLog.objects.using(FILE_A).get(message=row)
    assert (recipient.address, recipient.status) == ("first@example.com", "delivered")


def test_async_sends_hand_their_rows_to_the_thread(
    make_backend: BackendFactory, plain_server: LocalSMTPServer
) -> None:
    backend = background(make_backend, plain_server, audit_database=FILE_A)

    async def send() -> int:
        async with backend:
            return await backend.asend_messages([message(), message()])

    assert asyncio.run(send()) == 2
    assert drain_audit_log(10)
    assert MessageLog.objects.using(FILE_A).count() == 2
    assert SessionLog.objects.using(FILE_A).get().ended is not None


def test_an_in_memory_database_is_written_inline(
    make_backend: BackendFactory, plain_server: LocalSMTPServer
) -> None:
    # The test settings' databases are in memory: another thread cannot see them, so the
    # rows are the caller's to write, and are there when send_messages() returns.
    backend = background(make_backend, plain_server)
    assert backend.send_messages([message()]) == 1
    assert MessageLog.objects.count() == 1
    assert SessionLog.objects.get().ended is not None


def test_concurrent_deletes_in_the_callers_thread(
    make_backend: BackendFactory,
    plain_server: LocalSMTPServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # What bench/run.py does between runs (DELETE every row from the main thread) while
    # the thread writes, on two file databases side by side (one in WAL mode, as the
    # benchmark's), each connection of each thread its own: no error, no row lost.
    alias = FILE_A
    wal = FILE_B
    with caplog.at_level(logging.ERROR, logger="django_socketmail"):
        for _ in range(5):
            for target in (alias, wal):
                backend = background(make_backend, plain_server, audit_database=target)
                assert backend.send_messages([message(), message()]) == 2
                for model in MODELS:
                    model.objects.using(target).all().delete()
        assert drain_audit_log(10)
    assert "could not write" not in caplog.text
    assert "disk I/O" not in caplog.text


FORK_CHILD_EXIT_CODE = 7


def test_a_forked_child_starts_with_an_empty_queue_and_writes_its_own_rows() -> None:
    alias = FILE_A
    held = _recorder(alias)
    parent = _recorder(alias)
    with writer_held(held):
        _attempt(parent, "parent@example.com")  # waiting in the parent's queue at the fork
        read, write = os.pipe()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads: 3.12+
            pid = os.fork()
        if pid == 0:  # the child
            code = 1
            try:
                os.close(read)
                connections.close_all()  # not the parent's sockets and files
                empty = drain_audit_log(0)  # nothing of the parent's to wait for
                child = _recorder(alias)
                _attempt(child, "child@example.com")  # through a thread of its own
                written = drain_audit_log(10)
                os.write(write, f"{empty} {written}".encode())
                code = FORK_CHILD_EXIT_CODE
            finally:
                os._exit(code)
        os.close(write)
        with os.fdopen(read) as pipe:
            child_said = pipe.read()
        assert os.waitpid(pid, 0)[1] >> 8 == FORK_CHILD_EXIT_CODE
    assert child_said == "True True"
    assert drain_audit_log(10)
    recipients = sorted(MessageLog.objects.using(alias).values_list("recipients", flat=True))
    # The parent's waiting row once (written by the parent), the child's own once.
    assert recipients == ["child@example.com", "held@example.com", "parent@example.com"]


EXIT_SCRIPT = """
import sys
import django
from django.conf import settings
settings.configure(
    INSTALLED_APPS=["django_socketmail"],
    DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": sys.argv[1]}},
    USE_TZ=True,
    DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
)
django.setup()
from django.core.management import call_command
call_command("migrate", "django_socketmail", verbosity=0)
from django.core.mail import EmailMessage
from django_socketmail import audit, audit_writer
from django_socketmail.email_backend import EmailBackend

audit_writer.IDLE_CLOSE = 60.0
for n in range(int(sys.argv[3])):
    backend = EmailBackend(
        host="127.0.0.1", port=int(sys.argv[2]), timeout=5, pool=True, audit_background=True
    )
    backend.send_messages([EmailMessage("s", "b", "a@example.com", [f"to{n}@example.com"])])
# No drain: exit with rows queued and a pooled session open (QUIT and its row at exit).
"""


def test_exit_writes_what_is_queued_and_the_pooled_sessions_end(
    plain_server: LocalSMTPServer, tmp_path: Path
) -> None:
    path = tmp_path / "exit.sqlite3"
    done = subprocess.run(
        [sys.executable, "-c", EXIT_SCRIPT, str(path), str(plain_server.port), "20"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parent.parent,
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    with contextlib.closing(sqlite3.connect(path)) as db:
        messages = db.execute(f"SELECT count(*) FROM {MessageLog._meta.db_table}").fetchone()
        ended, sent = db.execute(
            f"SELECT ended, messages_sent FROM {SessionLog._meta.db_table}"
        ).fetchone()
    assert messages[0] == 20
    assert ended is not None and sent == 20
