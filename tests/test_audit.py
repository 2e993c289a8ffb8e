"""The audit log: truthful rows for every outcome, rollback survival, privacy, admin, retention."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import hmac
import io
import logging
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from email.generator import BytesGenerator
from pathlib import Path
from typing import Any, Final

import pytest
from django.conf import settings
from django.contrib.auth.models import Permission, User
from django.core.mail import EmailMessage
from django.core.mail.message import make_msgid
from django.core.management import call_command
from django.db import connections, models, transaction
from django.db.backends.sqlite3.base import DatabaseWrapper as SQLiteWrapper
from django.test import Client, override_settings
from django.utils import timezone

from django_socketmail import audit
from django_socketmail.audit import AuditRecorder, _header
from django_socketmail.email_backend import EmailBackend
from django_socketmail.localserver import LocalSMTPServer
from django_socketmail.models import MessageLog, RecipientLog, SessionLog, storable
from django_socketmail.pool import close_pool
from django_socketmail.smtp import (
    AuthenticationError,
    ConnectionFailedError,
    RecipientResult,
    RecipientStatus,
    SendResult,
    ServerDisconnected,
    SMTPClient,
)

from .conftest import PASSWORD, USER, BackendFactory
from .hostile.server import HostileSMTPServer, close, reply, standard_session
from .pg import PostgresServer
from .test_backend import message

pytestmark = pytest.mark.django_db(transaction=True)


def audited(make_backend: BackendFactory, server: Any, **options: Any) -> Any:
    return make_backend(server, audit_log=True, **options)


def test_sent_message_rows(make_backend: BackendFactory, starttls_server: LocalSMTPServer) -> None:
    backend = audited(make_backend, starttls_server, username=USER, password=PASSWORD)
    msg = message(["ok@example.com", "nobody@example.com"])
    assert backend.send_messages([msg]) == 1
    session = SessionLog.objects.get()
    assert session.outcome == "ok"
    assert session.host == "127.0.0.1"
    assert session.port == starttls_server.port
    assert session.tls_version.startswith("TLSv1.")
    assert session.auth_mechanism == "CRAM-MD5"
    assert session.auth_username == USER
    assert session.greeting.startswith("220 ")
    assert "PIPELINING" in session.extensions
    assert session.messages_sent == 1
    assert session.ended is not None
    assert "C: EHLO client.example" in session.transcript
    assert "C: QUIT" in session.transcript
    log = MessageLog.objects.get()
    received = starttls_server.wait_for_messages(1)[0]
    assert log.session == session
    assert log.status == "partial"
    assert log.sender == "sender@example.com"
    assert log.subject == "Test ✓ subject"
    assert log.message_id.startswith("<") and log.message_id in received.data.decode()
    assert log.queue_id == received.queue_id
    assert log.final_reply_code == 250
    assert received.queue_id in log.final_reply
    assert log.size == len(received.data)
    assert "C: MAIL FROM:<sender@example.com>" in log.transcript
    assert "C: [message content:" in log.transcript
    assert log.body == ""  # no body unless asked for
    recipients = {r.address: r for r in RecipientLog.objects.filter(message=log)}
    assert recipients["ok@example.com"].status == "delivered"
    assert recipients["ok@example.com"].reply_code == 250
    assert recipients["nobody@example.com"].status == "refused"
    assert recipients["nobody@example.com"].reply_code == 550
    assert "User unknown" in recipients["nobody@example.com"].reply


def test_each_flush_links_recipients_to_their_own_messages(
    make_backend: BackendFactory, starttls_server: LocalSMTPServer
) -> None:
    # Message rows go in with one executemany and their ids are read back as the
    # session's newest rows: several calls on one open session (one flush each), with
    # different recipient counts, must each find their own.
    backend = audited(make_backend, starttls_server)
    backend.open()
    calls = [[["a1@example.com"], ["b1@example.com", "b2@example.com"]], [["c1@example.com"]]]
    calls.append([["d1@example.com", "nobody@example.com", "d3@example.com"]])
    for call in calls:
        sent = [message(recipients) for recipients in call]
        for msg, recipients in zip(sent, call, strict=True):
            msg.subject = " ".join(recipients)
        assert backend.send_messages(sent) == len(sent)
    backend.close()
    session = SessionLog.objects.get()
    logs = list(MessageLog.objects.filter(session=session).order_by("id"))
    assert [log.subject for log in logs] == [" ".join(r) for call in calls for r in call]
    for log in logs:
        addresses = sorted(r.address for r in RecipientLog.objects.filter(message=log))
        assert addresses == sorted(log.subject.split())
        assert log.recipients == ", ".join(log.subject.split())
    assert RecipientLog.objects.filter(status="refused").get().message.subject.startswith("d1@")


def test_refused_and_connection_failures_are_rows(
    make_backend: BackendFactory, starttls_server: LocalSMTPServer
) -> None:
    backend = audited(make_backend, starttls_server, fail_silently=True)
    assert backend.send_messages([message(["nobody@example.com"])]) == 0
    assert MessageLog.objects.get().status == "refused"
    assert MessageLog.objects.get().error_class.endswith("RecipientsRefused")
    with LocalSMTPServer(tls="none") as gone:
        port = gone.port
    dead = make_backend(gone, port=port, audit_log=True, use_tls=False)
    with pytest.raises(ConnectionFailedError):
        dead.send_messages([message()])
    failed = SessionLog.objects.get(port=port)
    assert failed.outcome == "failed"
    assert failed.error_class.endswith("ConnectionFailedError")
    assert "could not connect" in failed.error
    assert failed.messages.count() == 0


def test_wrong_password_is_a_failed_session(
    make_backend: BackendFactory, starttls_server: LocalSMTPServer
) -> None:
    backend = audited(make_backend, starttls_server, username=USER, password="bad-Secret-9")
    with pytest.raises(AuthenticationError):
        backend.send_messages([message()])
    session = SessionLog.objects.get()
    assert session.outcome == "failed"
    assert "535" in session.error
    assert "C: AUTH CRAM-MD5" in session.transcript
    assert "bad-Secret-9" not in session.transcript


def test_failed_at_data_and_unknown(make_backend: BackendFactory) -> None:
    scripts = [standard_session({".": reply(554, "5.7.1 rejected as spam")})]
    with HostileSMTPServer(scripts) as server:
        backend = audited(make_backend, server, fail_silently=True)
        assert backend.send_messages([message()]) == 0
    log = MessageLog.objects.get()
    assert log.status == "failed"
    assert log.final_reply_code == 554
    assert log.transient is False
    with HostileSMTPServer(standard_session({".": close()})) as server:
        backend = audited(make_backend, server)
        with pytest.raises(ServerDisconnected):
            backend.send_messages([message()])
    unknown = MessageLog.objects.latest("pk")
    assert unknown.status == "unknown"
    assert unknown.final_reply == ""
    assert RecipientLog.objects.get(message=unknown).status == "unknown"
    assert unknown.session is not None
    assert unknown.session.outcome == "failed"


class Rollback(Exception):
    pass


def send_then_roll_back(backend: Any, *, write_first: bool) -> None:
    """Send inside ``transaction.atomic()`` (after a write of our own, if asked), then fail."""
    with transaction.atomic():
        if write_first:
            User.objects.create(username="made-in-the-transaction")
        assert backend.send_messages([message()]) == 1
        raise Rollback


@pytest.mark.django_db(transaction=True, databases=["default", "audit"])
def test_rows_survive_the_callers_rollback_with_an_audit_database(
    make_backend: BackendFactory, starttls_server: LocalSMTPServer
) -> None:
    backend = audited(make_backend, starttls_server, audit_database="audit")
    with pytest.raises(Rollback):
        send_then_roll_back(backend, write_first=True)
    assert not User.objects.filter(username="made-in-the-transaction").exists()
    assert MessageLog.objects.using("audit").get().status == "sent"
    assert SessionLog.objects.using("audit").count() == 1


def test_rows_survive_the_callers_rollback_on_a_separate_connection(
    make_backend: BackendFactory, starttls_server: LocalSMTPServer
) -> None:
    backend = audited(make_backend, starttls_server)
    with pytest.raises(Rollback):
        send_then_roll_back(backend, write_first=False)
    assert MessageLog.objects.get().status == "sent"
    assert SessionLog.objects.count() == 1


def test_sqlite_single_writer_falls_back_with_a_warning(
    make_backend: BackendFactory,
    starttls_server: LocalSMTPServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend = audited(make_backend, starttls_server)
    with transaction.atomic():
        User.objects.create(username="writer")
        with caplog.at_level(logging.WARNING, logger="django_socketmail"):
            assert backend.send_messages([message()]) == 1
        assert MessageLog.objects.get().status == "sent"  # written, inside the transaction
    assert "audit_database" in caplog.text


def test_audit_failure_never_breaks_sending(
    make_backend: BackendFactory,
    starttls_server: LocalSMTPServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend = audited(make_backend, starttls_server, audit_database="no-such-database")
    with caplog.at_level(logging.ERROR, logger="django_socketmail"):
        assert backend.send_messages([message(), message()]) == 2
    assert "could not write the audit log" in caplog.text
    assert len(starttls_server.wait_for_messages(2)) == 2  # sent once each, not again


def test_body_capture_is_opt_in_and_capped(
    make_backend: BackendFactory, starttls_server: LocalSMTPServer
) -> None:
    backend = audited(make_backend, starttls_server, audit_body_bytes=40)
    backend.send_messages([message()])
    body = MessageLog.objects.get().body
    assert 0 < len(body.encode()) <= 40


def test_streamed_message_rows_read_across_parts(
    make_backend: BackendFactory, starttls_server: LocalSMTPServer
) -> None:
    # A 300 KB body goes out as many parts: the Message-ID comes from the first and the
    # captured start of the message spans several.
    body = "".join(f"line {n:06d} of a long body\n" for n in range(12_000))
    backend = audited(make_backend, starttls_server, audit_body_bytes=200_000)
    assert backend.send_messages([message(body=body)]) == 1
    received = starttls_server.wait_for_messages(1)[0].data
    log = MessageLog.objects.get()
    assert log.size == len(received) > 300_000
    assert log.message_id and log.message_id.encode() in received
    assert log.body.encode() == received[:200_000]


@pytest.mark.parametrize("mechanism", ["CRAM-MD5", "PLAIN", "LOGIN"])
def test_no_credential_in_any_column(
    make_backend: BackendFactory, starttls_server: LocalSMTPServer, mechanism: str
) -> None:
    backend = audited(
        make_backend,
        starttls_server,
        username=USER,
        password=PASSWORD,
        auth_mechanisms=[mechanism],
        audit_body_bytes=100_000,
    )
    backend.send_messages([message()])
    bad = audited(
        make_backend,
        starttls_server,
        username=USER,
        password=PASSWORD + "x",
        auth_mechanisms=[mechanism],
        fail_silently=True,
    )
    bad.send_messages([message()])
    forbidden = _credential_forms(USER, PASSWORD) + _credential_forms(USER, PASSWORD + "x")
    dump = _all_text(SessionLog) + _all_text(MessageLog) + _all_text(RecipientLog)
    assert SessionLog.objects.filter(auth_mechanism=mechanism).exists()
    for secret in forbidden:
        assert secret not in dump, f"credential form {secret!r} stored"


def _credential_forms(user: str, password: str) -> list[str]:
    b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
    forms = [password, b64(password.encode()), b64(f"\0{user}\0{password}".encode())]
    forms.append(b64(user.encode()))  # the LOGIN user-name line is redacted too
    challenge_free = hmac.new(password.encode(), b"", hashlib.md5).hexdigest()
    forms.append(challenge_free[:12])
    return forms


def _send_some(make_backend: BackendFactory, server: LocalSMTPServer) -> None:
    backend = audited(make_backend, server, username=USER, password=PASSWORD, fail_silently=True)
    backend.send_messages(
        [message(["alpha@example.com"]), message(["nobody@example.com"]), message()]
    )


def test_admin_pages(make_backend: BackendFactory, starttls_server: LocalSMTPServer) -> None:
    _send_some(make_backend, starttls_server)
    admin = User.objects.create_superuser("admin", "admin@example.com", "pw")
    client = Client()
    client.force_login(admin)
    base = "/admin/django_socketmail/"
    page = client.get(base + "messagelog/")
    assert page.status_code == 200
    assert page.context["cl"].result_count == 3
    assert b"Test \xe2\x9c\x93 subject" in page.content
    found = client.get(base + "messagelog/", {"q": "alpha@example.com"})
    assert found.status_code == 200
    assert b"alpha@example.com" in found.content
    assert found.context["cl"].result_count == 1
    refused = client.get(base + "messagelog/", {"status__exact": "refused"})
    assert b"nobody@example.com" in refused.content
    assert b"alpha@example.com" not in refused.content
    assert (
        client.get(base + "messagelog/", {"session__auth_mechanism": "CRAM-MD5"}).status_code == 200
    )
    log = MessageLog.objects.get(recipients="alpha@example.com")
    detail = client.get(f"{base}messagelog/{log.pk}/change/")
    assert detail.status_code == 200
    assert b"socketmail-client" in detail.content
    assert b"socketmail-server" in detail.content
    assert b"MAIL FROM:&lt;sender@example.com&gt;" in detail.content
    assert log.queue_id.encode() in detail.content
    session = SessionLog.objects.get()
    assert client.get(f"{base}sessionlog/{session.pk}/change/").status_code == 200
    assert client.get(base + "sessionlog/", {"outcome__exact": "ok"}).status_code == 200
    assert client.get(base + "messagelog/add/").status_code == 403
    post = client.post(f"{base}messagelog/{log.pk}/change/", {"subject": "forged"})
    assert post.status_code == 403
    log.refresh_from_db()
    assert log.subject != "forged"


def test_admin_permissions(make_backend: BackendFactory, starttls_server: LocalSMTPServer) -> None:
    _send_some(make_backend, starttls_server)
    log = MessageLog.objects.first()
    assert log is not None
    staff = User.objects.create_user("staff", password="pw", is_staff=True)
    client = Client()
    client.force_login(staff)
    url = f"/admin/django_socketmail/messagelog/{log.pk}/"
    assert client.get("/admin/django_socketmail/messagelog/").status_code == 403
    staff.user_permissions.add(Permission.objects.get(codename="view_messagelog"))
    assert client.get("/admin/django_socketmail/messagelog/").status_code == 200
    assert client.get(url + "change/").status_code == 200
    assert client.post(url + "delete/", {"post": "yes"}).status_code == 403
    staff.user_permissions.add(Permission.objects.get(codename="delete_messagelog"))
    assert client.post(url + "delete/", {"post": "yes"}).status_code == 302
    assert not MessageLog.objects.filter(pk=log.pk).exists()


def test_retention_command(make_backend: BackendFactory, starttls_server: LocalSMTPServer) -> None:
    _send_some(make_backend, starttls_server)
    _send_some(make_backend, starttls_server)
    old = timezone.now() - timedelta(days=100)
    first = SessionLog.objects.order_by("pk").first()
    assert first is not None
    SessionLog.objects.filter(pk=first.pk).update(created=old)
    out = io.StringIO()
    call_command("socketmail_prune", "--dry-run", stdout=out)
    assert "Would delete 1 sessions and 3 of their messages" in out.getvalue()
    assert SessionLog.objects.count() == 2
    call_command("socketmail_prune", "--batch-size", "1", stdout=out)
    assert "Deleted 1 sessions" in out.getvalue()
    assert SessionLog.objects.count() == 1
    assert MessageLog.objects.count() == 3
    call_command("socketmail_prune", "--days", "1", stdout=out)
    assert SessionLog.objects.count() == 1


def test_no_missing_migrations() -> None:
    call_command(
        "makemigrations", "django_socketmail", "--check", "--dry-run", stdout=io.StringIO()
    )


# -- faults of round two: hostile text, a locked database, folded headers, setup, timing --


@pytest.fixture(
    scope="session",
    params=[
        "default",
        pytest.param(
            "postgres",
            marks=[
                pytest.mark.django_db(transaction=True, databases=["default", "postgres"]),
                pytest.mark.postgres,
            ],
        ),
    ],
)
def alias(request: pytest.FixtureRequest) -> str:
    """The audit database of a test run on each kind: SQLite (the suite's default database)
    and the real PostgreSQL of tests/pg.py.  Session-scoped, so the alias exists before
    pytest-django sets the test's databases up."""
    if request.param == "postgres":
        request.getfixturevalue("postgres_database")
    name: str = request.param
    return name


def test_nul_from_a_user_or_a_server_costs_no_row(make_backend: BackendFactory, alias: str) -> None:
    # A NUL typed into a contact form's Subject (Django lets it through), one in the body,
    # and a server that puts NUL into its RCPT and final replies: PostgreSQL refuses text
    # with NUL, and the whole transaction (every row of the call) used to be lost with it.
    rules = {
        "RCPT": reply(250, b"2.1.5 Ok\x00 recipient"),
        ".": reply(250, b"2.0.0 Ok: queued as ABC\x00DEF"),
    }
    with HostileSMTPServer(standard_session(rules)) as server:
        backend = audited(make_backend, server, audit_database=alias, audit_body_bytes=4096)
        form = message(["a@example.com"], body="line one\x00line two\n")
        form.subject = "Contact form: hello\x00world"
        assert backend.send_messages([form, message(["b@example.com"])]) == 2
    rows = MessageLog.objects.using(alias).order_by("pk")
    assert [row.status for row in rows] == ["sent", "sent"]
    assert rows[0].subject == "Contact form: hello\\x00world"
    assert "line one\\x00line two" in rows[0].body
    assert all(row.final_reply == "2.0.0 Ok: queued as ABC\\x00DEF" for row in rows)
    recipients = RecipientLog.objects.using(alias).order_by("pk")
    assert [r.reply for r in recipients] == ["2.1.5 Ok\\x00 recipient"] * 2
    assert SessionLog.objects.using(alias).get().messages_sent == 2
    dump = _all_text(SessionLog, alias) + _all_text(MessageLog, alias)
    assert "\x00" not in dump + _all_text(RecipientLog, alias)


def test_escaped_values_still_fit_their_columns(make_backend: BackendFactory, alias: str) -> None:
    # A NUL escape is four characters: a Subject at the column's limit grows past it, and
    # PostgreSQL refuses a value longer than a varchar (SQLite would keep it whole).
    limit = MessageLog._meta.get_field("subject").max_length
    assert limit is not None
    with HostileSMTPServer(standard_session()) as server:
        backend = audited(make_backend, server, audit_database=alias)
        form = message()
        form.subject = "\x00" * limit
        assert backend.send_messages([form]) == 1
    subject = MessageLog.objects.using(alias).get().subject
    assert len(subject) == limit
    assert subject.startswith("\\x00\\x00") and subject.endswith("…")


def _all_text(model: type[models.Model], alias: str = "default") -> str:
    fields = [
        f.name
        for f in model._meta.get_fields()
        if isinstance(f, (models.CharField, models.TextField))
    ]
    rows = model.objects.using(alias).values_list(*fields)
    return "\n".join(str(v) for row in rows for v in row)


@contextlib.contextmanager
def file_database(path: Path, alias: str) -> Iterator[str]:
    """A Django alias (this thread only) for an SQLite file database holding the audit
    tables, with Django's default options (Python's 5 s busy timeout); removed afterwards."""
    entry = connections.configure_settings(
        {"default": dict(connections.settings["default"]), alias: {"NAME": str(path)}}
    )[alias]
    entry["ENGINE"] = "django.db.backends.sqlite3"
    connections[alias] = SQLiteWrapper(entry, alias=alias)
    try:
        with connections[alias].schema_editor() as editor:
            for model in (SessionLog, MessageLog, RecipientLog):
                editor.create_model(model)
        yield alias
    finally:
        connections[alias].close()
        del connections[alias]


def test_a_locked_sqlite_database_costs_at_most_the_documented_time(
    make_backend: BackendFactory,
    starttls_server: LocalSMTPServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A backup, or a long transaction in another process, holds the database: the audit
    # write gives up within its documented total (about 1.5 s) and the send result stands.
    path = tmp_path / "audit.sqlite3"
    with file_database(path, "locked_file") as alias:
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN EXCLUSIVE")
            backend = audited(make_backend, starttls_server, audit_database=alias)
            started = time.monotonic()
            with caplog.at_level(logging.ERROR, logger="django_socketmail"):
                assert backend.send_messages([message(), message()]) == 2
            elapsed = time.monotonic() - started
            assert elapsed < 3.0, f"send_messages() took {elapsed:.1f} s on a locked database"
            assert "could not write the audit log" in caplog.text
            assert len(starttls_server.wait_for_messages(2)) == 2  # sent once each
            other.execute("ROLLBACK")
        finally:
            other.close()
        # The lock is gone: the next call writes its rows (the busy timeout is restored).
        assert backend.send_messages([message()]) == 1
        assert MessageLog.objects.using(alias).count() == 1
        with connections[alias].cursor() as cursor:
            cursor.execute("PRAGMA busy_timeout")
            assert cursor.fetchone()[0] == 5000


LONG_MSGID_DOMAIN: Final = "ip-10-0-1-23.eu-west-1.compute.internal"


def django_bytes(email: EmailMessage) -> bytes:
    """The message as Django's own backend serializes it (CRLF line ends), on every version."""
    out = io.BytesIO()
    BytesGenerator(out, mangle_from_=False).flatten(email.message(), linesep="\r\n")
    return out.getvalue()


def test_a_folded_message_id_is_unfolded() -> None:
    # Django 5.2 folds a Message-ID over 66 characters onto a continuation line; 6.1 does
    # not.  Either way the header's value is the id (RFC 5322 §2.2.3: unfold, then read).
    msgid = make_msgid(domain=LONG_MSGID_DOMAIN)
    raw = django_bytes(message(headers={"Message-ID": msgid}))
    assert _header(None, "Message-ID", raw) == msgid
    folded = b"Subject: x\r\nMessage-ID:\r\n <a.b@example.com>\r\nTo: y@example.com\r\n\r\nbody"
    assert _header(None, "Message-ID", folded) == "<a.b@example.com>"
    tabbed = b"Message-Id:\r\n\t<part-one\r\n  .part-two@example.com>\r\nX: 1\r\n\r\n"
    assert _header(None, "Message-ID", tabbed) == "<part-one  .part-two@example.com>"
    assert _header(None, "Message-ID", b"Message-ID-X: <no@example.com>\r\n\r\n") == ""
    assert _header(None, "Message-ID", b"To: a@example.com\r\n\r\nMessage-ID: <body>") == ""


def test_a_long_message_id_is_stored_whole(
    make_backend: BackendFactory, starttls_server: LocalSMTPServer
) -> None:
    msgid = make_msgid(domain=LONG_MSGID_DOMAIN)
    backend = audited(make_backend, starttls_server)
    assert backend.send_messages([message(headers={"Message-ID": msgid})]) == 1
    assert msgid.encode() in starttls_server.wait_for_messages(1)[0].data
    assert MessageLog.objects.get().message_id == msgid


WITHOUT_THE_APP: Final = [app for app in settings.INSTALLED_APPS if app != "django_socketmail"]


def test_without_the_app_installed_the_audit_log_is_off_with_one_warning(
    make_backend: BackendFactory,
    starttls_server: LocalSMTPServer,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The README's first lines set EMAIL_BACKEND only.  The backend must work; the audit
    # log is off, said once per process with the fix, not a traceback on every send.
    monkeypatch.setattr(audit, "_warned_not_installed", False, raising=False)
    with (
        override_settings(INSTALLED_APPS=WITHOUT_THE_APP),
        caplog.at_level(logging.DEBUG, logger="django_socketmail"),
    ):
        for _ in range(3):
            assert make_backend(starttls_server, audit_log=True).send_messages([message()]) == 1
        pooled = make_backend(starttls_server, audit_log=True, pool=True)
        assert pooled.send_messages([message(), message()]) == 2
        close_pool()  # its end too, while the app is not installed (no row for a later test)
    assert len(starttls_server.wait_for_messages(5)) == 5
    records = [r for r in caplog.records if r.name.startswith("django_socketmail")]
    assert not [r for r in records if r.exc_info is not None]  # no traceback at any level
    (warning,) = [r for r in records if r.levelno >= logging.WARNING]
    assert warning.levelno == logging.WARNING
    text = warning.getMessage()
    assert "INSTALLED_APPS" in text and "audit_log" in text
    assert SessionLog.objects.count() == MessageLog.objects.count() == 0
    # Installed again: logging resumes.
    assert make_backend(starttls_server, audit_log=True).send_messages([message()]) == 1
    assert MessageLog.objects.count() == 1


def _recorder(**options: Any) -> AuditRecorder:
    backend = EmailBackend(host="127.0.0.1", port=25, audit_log=True, **options)
    return AuditRecorder(backend.options, "default", SMTPClient(backend.options.client_config()))


def _result(address: str, *, started: float, elapsed: float) -> SendResult:
    recipient = RecipientResult(address, RecipientStatus.DELIVERED)
    return SendResult("sender@example.com", [recipient], started=started, elapsed=elapsed)


def test_each_row_has_its_own_start_and_duration() -> None:
    # Each message's own wall-clock start (when its first command was written) and its own
    # seconds until its outcome: not the batch's average, not back-dated from "now".
    recorder = _recorder()
    first = _result("a@example.com", started=1_700_000_000.25, elapsed=0.5)
    second = _result("b@example.com", started=1_700_000_003.125, elapsed=0.0625)
    raw = [django_bytes(message())]
    recorder.message_finished(None, first, raw)
    recorder.message_finished(None, second, raw)
    recorder.flush()
    rows = MessageLog.objects.order_by("pk")
    assert [(row.created, row.duration) for row in rows] == [
        (datetime(2023, 11, 14, 22, 13, 20, 250000, tzinfo=dt_timezone.utc), 0.5),
        (datetime(2023, 11, 14, 22, 13, 23, 125000, tzinfo=dt_timezone.utc), 0.0625),
    ]


@pytest.mark.django_db(transaction=True, databases=["default", "audit"])
def test_a_session_row_is_never_updated_in_another_database() -> None:
    # The recorder's row lives in the database it was created in.  Asked to write to another
    # alias (a borrower with another audit_database, a router that moved), it creates a row
    # there rather than updating whatever row has the same primary key.
    recorder = _recorder(audit_database="default")
    recorder.flush()
    mine = SessionLog.objects.using("default").get()
    # The collision the old code fell into: a row of the same primary key over there.
    unrelated = SessionLog.objects.using("audit").create(pk=mine.pk, host="other.example", port=1)
    recorder.options = dataclasses.replace(recorder.options, audit_database="audit")
    recorder.message_finished(None, _result("a@example.com", started=time.time(), elapsed=0), [])
    recorder.session_ended(None)
    recorder.flush()
    assert SessionLog.objects.using("audit").get(pk=unrelated.pk).host == "other.example"
    moved = SessionLog.objects.using("audit").exclude(pk=unrelated.pk).get()
    assert moved.host == "127.0.0.1" and moved.ended is not None
    assert MessageLog.objects.using("audit").get().session_id == moved.pk
    # Back in the first database: its own row again, not a new one.
    recorder.options = dataclasses.replace(recorder.options, audit_database="default")
    recorder.flush()
    assert SessionLog.objects.using("default").get().pk == mine.pk
    assert SessionLog.objects.using("default").get().ended is not None


@pytest.mark.django_db(transaction=True, databases=["default", "postgres"])
@pytest.mark.postgres
def test_a_locked_postgres_table_costs_at_most_the_documented_time(
    make_backend: BackendFactory,
    starttls_server: LocalSMTPServer,
    postgres_server: PostgresServer,
    postgres_database: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A migration or a maintenance job holds the message table: the write waits for the
    # lock no longer than the budget (PostgreSQL would wait for ever), and the send stands.
    with postgres_server.connect("socketmail_tests") as other:
        other.autocommit = False
        other.execute(f"LOCK TABLE {MessageLog._meta.db_table} IN ACCESS EXCLUSIVE MODE")
        backend = audited(make_backend, starttls_server, audit_database=postgres_database)
        started = time.monotonic()
        with caplog.at_level(logging.ERROR, logger="django_socketmail"):
            assert backend.send_messages([message(), message()]) == 2
        elapsed = time.monotonic() - started
        other.rollback()
    assert elapsed < 3.0, f"send_messages() took {elapsed:.1f} s on a locked table"
    assert "could not write the audit log" in caplog.text
    assert len(starttls_server.wait_for_messages(2)) == 2
    assert backend.send_messages([message()]) == 1
    assert MessageLog.objects.using(postgres_database).count() == 1


WITHOUT_THE_APP_SCRIPT: Final = """
import logging, sys
import django
from django.conf import settings
settings.configure(
    INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth"],
    DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
    USE_TZ=True,
)
django.setup()
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
from django.core.mail import EmailMessage
from django_socketmail.email_backend import EmailBackend

for _ in range(3):
    backend = EmailBackend(host="127.0.0.1", port=int(sys.argv[1]), timeout=5)
    message = EmailMessage("s", "b", "a@example.com", ["b@example.com"])
    print(backend.send_messages([message]))
"""


def test_a_project_without_the_app_sends_with_one_warning_and_no_traceback(
    plain_server: LocalSMTPServer,
) -> None:
    # What a new user does after the README's first lines: EMAIL_BACKEND set, the app not
    # in INSTALLED_APPS, so no tables.  Each send used to log a full traceback.
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_THE_APP_SCRIPT, str(plain_server.port)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parent.parent,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "1", "1"]
    assert len(plain_server.wait_for_messages(3)) == 3
    assert "Traceback" not in done.stderr
    warnings = [line for line in done.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1, done.stderr
    assert "INSTALLED_APPS" in warnings[0] and "audit_log=False" in warnings[0]


def test_storable_text() -> None:
    subject = MessageLog._meta.get_field("subject")
    body = MessageLog._meta.get_field("body")
    assert storable(None, body) == ""
    assert storable("plain ✓ text", subject) == "plain ✓ text"
    assert storable("a\x00b", body) == "a\\x00b"
    assert storable("lone \udc80 surrogate", body) == "lone \\udc80 surrogate"
    assert storable("x" * 300, subject) == "x" * 254 + "…"
    assert storable(ValueError("bad\x00value"), body) == "bad\\x00value"


def test_start_times_follow_use_tz_false() -> None:
    # Without USE_TZ Django stores naive local times (timezone.now() is datetime.now()).
    started = 1_700_000_000.5
    with override_settings(USE_TZ=False):
        recorder = _recorder()
        recorder.message_finished(None, _result("a@example.com", started=started, elapsed=1), [])
        recorder.flush()
        row = MessageLog.objects.get()
    assert row.created.replace(tzinfo=None) == datetime.fromtimestamp(started)
