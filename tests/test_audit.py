"""The audit log: truthful rows for every outcome, rollback survival, privacy, admin, retention."""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import logging
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import Permission, User
from django.core.management import call_command
from django.db import models, transaction
from django.test import Client
from django.utils import timezone

from django_socketmail.localserver import LocalSMTPServer
from django_socketmail.models import MessageLog, RecipientLog, SessionLog
from django_socketmail.smtp import AuthenticationError, ConnectionFailedError, ServerDisconnected

from .conftest import PASSWORD, USER, BackendFactory
from .hostile.server import HostileSMTPServer, close, reply, standard_session
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


def _all_text(model: type[models.Model]) -> str:
    fields = [
        f.name
        for f in model._meta.get_fields()
        if isinstance(f, (models.CharField, models.TextField))
    ]
    return "\n".join(str(v) for row in model.objects.values_list(*fields) for v in row)


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
