"""The async API against the sync one: the same behaviours, parametrized over both.

``send_messages()`` and ``await asend_messages()`` (and ``send_mail`` / ``asend_mail``...)
must return the same counts, set the same ``socketmail_result``, raise the same exception
classes and keep the same time bounds.  Every async run uses ``asyncio.run(..., debug=True)``
(asyncio's debug mode: slow callbacks, never-awaited coroutines and unclosed transports
reported), and the suite runs with ``-W error::ResourceWarning``.  Cancellation, which only
the async API has, is tested at several points of a send.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import sqlite3
import threading
import time
import warnings
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import django
import pytest
from asgiref.sync import SyncToAsync
from django.contrib.auth.models import User
from django.core import mail
from django.core.mail import EmailMessage
from django.db import connections, transaction
from django.test import override_settings

import django_socketmail
from django_socketmail import async_backend
from django_socketmail.async_backend import AsyncBackendMixin
from django_socketmail.audit import AuditRecorder
from django_socketmail.email_backend import EmailBackend
from django_socketmail.localserver import LocalSMTPServer
from django_socketmail.models import MessageLog, SessionLog
from django_socketmail.smtp import (
    ConnectError,
    RecipientsRefused,
    RecipientStatus,
    SendResult,
    SendStatus,
    ServerDisconnected,
    SMTPTimeoutError,
)
from django_socketmail.smtp.aio import SendCancelledError

from .conftest import PASSWORD, USER
from .hostile.server import (
    Connection,
    HostileSMTPServer,
    Script,
    close,
    drip,
    greet,
    reply,
    respond,
    sleep,
)

T = TypeVar("T")
TIMEOUT = 1.0
MARGIN = 0.5
APIS = ["sync", "async"]
FD_DIR = "/proc/self/fd"


def run(awaitable: Awaitable[T]) -> T:
    """Run in a fresh event loop in asyncio's debug mode."""

    async def main() -> T:
        return await awaitable

    return asyncio.run(main(), debug=True)


def message(to: list[str] | None = None, subject: str = "async") -> EmailMessage:
    return EmailMessage(subject, "Hello.\n", "sender@example.com", to or ["rcpt@example.com"])


def result_of(msg: EmailMessage) -> SendResult:
    result = getattr(msg, "socketmail_result", None)
    assert isinstance(result, SendResult), "the message was never attempted"
    return result


def send(api: str, backend: Any, messages: list[EmailMessage]) -> int:
    if api == "sync":
        return int(backend.send_messages(messages))
    return run(backend.asend_messages(messages))


def backend_class() -> type[EmailBackend]:
    return async_backend.AsyncEmailBackend


@pytest.fixture
def make(make_backend: Callable[..., EmailBackend]) -> Iterator[Callable[..., Any]]:
    """A backend with the async methods, for a server (closed after the test)."""
    made: list[Any] = []

    def build(server: Any, **options: Any) -> Any:
        base = make_backend(server, **options)  # the defaults conftest gives every backend
        backend = backend_class()(**(_options_of(base) | options))
        made.append(backend)
        return backend

    yield build
    for backend in made:
        backend.close()
        if backend.async_session is not None:
            run(backend.aclose())


def _options_of(backend: EmailBackend) -> dict[str, Any]:
    o = backend.options
    return {
        "host": o.host,
        "port": o.port,
        "use_tls": o.use_tls,
        "use_ssl": o.use_ssl,
        "timeout": o.timeout,
        "local_hostname": o.local_hostname,
        "ssl_cafile": o.ssl_cafile,
        "audit_log": o.audit_log,
    }


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    """Every test ends with no more threads and file descriptors than it started with,
    once the in-process servers have closed their side (polled for up to 2 s).  Garbage
    of earlier tests is collected first (its sockets may close at any time otherwise).
    asgiref's one thread for ``sync_to_async(thread_sensitive=True)`` lives for the
    process: started before counting."""
    SyncToAsync.single_thread_executor.submit(lambda: None).result()
    gc.collect()
    fds = len(os.listdir(FD_DIR))
    threads = threading.active_count()
    yield
    deadline = time.monotonic() + 2.0
    while len(os.listdir(FD_DIR)) > fds or threading.active_count() > threads:
        if time.monotonic() > deadline:
            assert threading.active_count() <= threads
            assert len(os.listdir(FD_DIR)) <= fds
        time.sleep(0.01)


# -- the same behaviour through both APIs ---------------------------------------------------


@pytest.mark.parametrize("api", APIS)
def test_success(api: str, make: Any, starttls_server: LocalSMTPServer) -> None:
    backend = make(starttls_server, username=USER, password=PASSWORD)
    msgs = [message(subject="one"), message(subject="two")]
    assert send(api, backend, msgs) == 2
    for msg in msgs:
        result = result_of(msg)
        assert result.status is SendStatus.SENT
        assert result.error is None
        assert result.queue_id is not None
        assert result.elapsed > 0
    assert len(starttls_server.wait_for_messages(2)) == 2
    info = backend.last_async_session.client.info if api == "async" else backend.last_client.info
    assert info.tls_version is not None
    assert info.auth_mechanism is not None


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("quiet", [False, True], ids=["raises", "fail_silently"])
def test_refusal(api: str, quiet: bool, make: Any, plain_server: LocalSMTPServer) -> None:
    backend = make(plain_server, fail_silently=quiet)
    msg = message(["nobody@example.com"])
    if quiet:
        assert send(api, backend, [msg]) == 0
    else:
        with pytest.raises(RecipientsRefused) as info:
            send(api, backend, [msg])
        assert "nobody@example.com" in info.value.recipients
    result = result_of(msg)
    assert result.status is SendStatus.REFUSED
    assert isinstance(result.error, RecipientsRefused)
    assert result.recipients[0].reply is not None
    assert result.recipients[0].reply.code == 550


@pytest.mark.parametrize("api", APIS)
def test_partial(api: str, make: Any, plain_server: LocalSMTPServer) -> None:
    backend = make(plain_server)
    msg = message(["ok@example.com", "nobody@example.com", "later@example.com"])
    assert send(api, backend, [msg]) == 1
    result = result_of(msg)
    assert result.status is SendStatus.PARTIAL
    assert [r.status for r in result.recipients] == [
        RecipientStatus.DELIVERED,
        RecipientStatus.REFUSED,
        RecipientStatus.REFUSED,
    ]
    assert [r.reply.code for r in result.recipients if r.reply] == [250, 550, 450]
    (delivered,) = plain_server.wait_for_messages(1)
    assert list(delivered.rcpt_tos) == ["ok@example.com"]


@pytest.mark.parametrize("api", APIS)
def test_unknown_after_a_lost_final_reply(api: str, make: Any) -> None:
    """The content went out and the server hung up before its final reply: maybe
    delivered, so UNKNOWN (never SENT, never resent), and the connection's error raised."""
    with HostileSMTPServer(Script([greet(), respond({".": close()})])) as server:
        backend = make(server, timeout=TIMEOUT)
        msg = message()
        with pytest.raises(ServerDisconnected):
            send(api, backend, [msg])
        assert server.wait_closed()
        assert len(server.messages) == 1  # sent once, not again
    result = result_of(msg)
    assert result.status is SendStatus.UNKNOWN
    assert isinstance(result.error, ServerDisconnected)
    assert result.recipients[0].status is RecipientStatus.UNKNOWN


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("tls", ["starttls", "implicit"])
def test_a_message_larger_than_one_write_over_tls(
    api: str,
    tls: str,
    make: Any,
    starttls_server: LocalSMTPServer,
    implicit_server: LocalSMTPServer,
) -> None:
    """Two 230 KB messages over TLS, with a 2 s timeout: asyncio's SSL transport reports
    "paused" with nothing buffered when the high-water mark is 0, and the async driver
    waited for a reply that never came (SMTPTimeoutError; the sync driver: 0.2 s)."""
    server = starttls_server if tls == "starttls" else implicit_server
    backend = make(server, username=USER, password=PASSWORD, timeout=2)
    body = ("x" * 75 + "\n") * 3000
    msgs = [EmailMessage(f"large {n}", body, "s@example.com", ["r@example.com"]) for n in (1, 2)]
    assert send(api, backend, msgs) == 2
    assert [result_of(m).status for m in msgs] == [SendStatus.SENT, SendStatus.SENT]
    assert len(server.wait_for_messages(2)) == 2


@pytest.mark.parametrize("api", APIS)
def test_timeout_bound_on_a_dripping_final_reply(api: str, make: Any) -> None:
    """A byte every 0.25 s: only a deadline per reply (not per read) ends it in time."""
    script = Script([greet(), respond({".": drip(b"250 2.0.0 Ok: queued as SLOW\r\n", 0.25)})])
    with HostileSMTPServer(script) as server:
        backend = make(server, timeout=TIMEOUT)
        msg = message()
        started = time.monotonic()
        with pytest.raises(SMTPTimeoutError):
            send(api, backend, [msg])
        elapsed = time.monotonic() - started
        assert server.wait_closed()
    assert TIMEOUT * 0.95 <= elapsed < TIMEOUT + MARGIN
    result = result_of(msg)
    assert result.status is SendStatus.UNKNOWN
    assert isinstance(result.error, SMTPTimeoutError)


@pytest.mark.parametrize("api", APIS)
def test_never_greets_is_a_timeout_within_the_bound(api: str, make: Any) -> None:
    with HostileSMTPServer(Script([sleep(5)])) as server:
        backend = make(server, timeout=TIMEOUT)
        msg = message()
        started = time.monotonic()
        with pytest.raises(SMTPTimeoutError):
            send(api, backend, [msg])
        assert time.monotonic() - started < TIMEOUT + MARGIN
    assert not hasattr(msg, "socketmail_result")  # never attempted: no session


# -- Django's function names -----------------------------------------------------------------


SOCKETMAIL = "django_socketmail.async_backend.AsyncEmailBackend"


def server_addresses(*pairs: tuple[str, str]) -> list[Any]:
    """``ADMINS``/``MANAGERS`` in the installed Django's own form: pairs before 6.0, address
    strings from 6.0 (where pairs are deprecated and warn)."""
    if django.VERSION < (6, 0):
        return list(pairs)
    return [address for _, address in pairs]


def settings_for(server: LocalSMTPServer) -> dict[str, Any]:
    """Our backend as the default mailer, in the installed Django's own terms: ``MAILERS``
    on Django 6.1 (where the ``EMAIL_*`` settings are deprecated), ``EMAIL_*`` before."""
    options = {"audit_log": False, "local_hostname": "client.example"}
    site = {
        "ADMINS": server_addresses(("Admin", "admin@example.com")),
        "MANAGERS": server_addresses(("Manager", "manager@example.com")),
        "SERVER_EMAIL": "server@example.com",
        "EMAIL_SUBJECT_PREFIX": "[site] ",
    }
    if django.VERSION >= (6, 1):
        mailer = {"BACKEND": SOCKETMAIL, "OPTIONS": {"host": "127.0.0.1", "port": server.port}}
        mailer["OPTIONS"].update(options)
        quiet = {"BACKEND": SOCKETMAIL, "OPTIONS": {**mailer["OPTIONS"], "fail_silently": True}}
        return {"MAILERS": {"default": mailer, "quiet": quiet}, **site}
    return {
        "EMAIL_BACKEND": SOCKETMAIL,
        "EMAIL_HOST": "127.0.0.1",
        "EMAIL_PORT": server.port,
        "SOCKETMAIL": options,
        **site,
    }


# fail_silently=True as the installed Django wants it said: an argument before Django 6.1, a
# MAILERS alias whose OPTIONS say it on 6.1 (where the argument is deprecated).
QUIETLY: dict[str, Any] = (
    {"using": "quiet"} if django.VERSION >= (6, 1) else {"fail_silently": True}
)


def locmem_settings(**values: Any) -> dict[str, Any]:
    """Django's locmem backend as the default mailer (the test settings' own default mailer
    on Django 6.1)."""
    if django.VERSION >= (6, 1):
        return values
    return {"EMAIL_BACKEND": "django.core.mail.backends.locmem.EmailBackend", **values}


@pytest.mark.parametrize("api", APIS)
def test_send_mail_and_its_twins(api: str, plain_server: LocalSMTPServer) -> None:
    with override_settings(**settings_for(plain_server)):
        if api == "sync":
            count = mail.send_mail("s", "body", "from@example.com", ["a@example.com"])
            mass = mail.send_mass_mail(
                [
                    ("m1", "b", "from@example.com", ["b@example.com"]),
                    ("m2", "b", "from@example.com", ["nobody@example.com"]),
                ],
                **QUIETLY,
            )
            mail.mail_admins("admins", "body", html_message="<p>body</p>")
            mail.mail_managers("managers", "body")
        else:
            count = run(
                django_socketmail.asend_mail("s", "body", "from@example.com", ["a@example.com"])
            )
            mass = run(
                django_socketmail.asend_mass_mail(
                    [
                        ("m1", "b", "from@example.com", ["b@example.com"]),
                        ("m2", "b", "from@example.com", ["nobody@example.com"]),
                    ],
                    **QUIETLY,
                )
            )
            run(django_socketmail.amail_admins("admins", "body", html_message="<p>body</p>"))
            run(django_socketmail.amail_managers("managers", "body"))
    assert (count, mass) == (1, 1)
    got = plain_server.wait_for_messages(4)
    assert [list(m.rcpt_tos) for m in got] == [
        ["a@example.com"],
        ["b@example.com"],
        ["admin@example.com"],
        ["manager@example.com"],
    ]
    admins = got[2].data
    assert b"Subject: [site] admins" in admins
    assert b"From: server@example.com" in admins
    assert b"text/html" in admins


@pytest.mark.parametrize(
    "admins",
    [
        [("Admin", "admin@example.com")],
        ["admin@example.com"],
        [("Admin", "admin@example.com"), "other@example.com"],
        "admin@example.com",
    ],
    ids=["pairs", "strings", "mixed", "bare-string"],
)
def test_amail_admins_judges_the_setting_as_mail_admins_does(admins: Any) -> None:
    """Same warning, same error, same recipients as the installed Django's ``mail_admins``."""

    with override_settings(**locmem_settings(ADMINS=admins)):
        sync = outcome_of(lambda: mail.mail_admins("s", "b"))
        async_ = outcome_of(lambda: run(django_socketmail.amail_admins("s", "b")))
    assert async_ == sync


def outcome_of(call: Callable[[], Any]) -> tuple[Any, ...]:
    """What a call to a mail function did: raised (class, text), or returned (value, the
    recipients of each message in ``mail.outbox``, the warnings as (class, text))."""
    mail.outbox = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            value = call()
        except Exception as exc:
            return ("raised", type(exc), str(exc))
    return (
        "returned",
        value,
        [m.to for m in mail.outbox],
        [(w.category, str(w.message)) for w in caught],
    )


ARGUMENTS = {
    "none": {},
    "fail_silently": {"fail_silently": True},
    "credentials": {"auth_user": "u", "auth_password": "p"},
    "connection": {"connection": "locmem"},
    "connection+fail_silently": {"connection": "locmem", "fail_silently": True},
}


@pytest.mark.parametrize("arguments", ARGUMENTS.values(), ids=ARGUMENTS.keys())
def test_asend_mail_takes_its_arguments_as_send_mail_does(arguments: dict[str, Any]) -> None:
    """Same warnings (Django 6.1 deprecates ``fail_silently``, the credentials and
    ``connection``), same refusals, same count as the installed Django's ``send_mail``."""
    from django.core.mail.backends.locmem import EmailBackend as LocmemBackend

    def kwargs() -> dict[str, Any]:
        given = dict(arguments)
        if given.get("connection") == "locmem":
            given["connection"] = LocmemBackend()
        return given

    args = ("s", "b", "from@example.com", ["to@example.com"])
    with override_settings(**locmem_settings()):
        sync = outcome_of(lambda: mail.send_mail(*args, **kwargs()))
        async_ = outcome_of(lambda: run(django_socketmail.asend_mail(*args, **kwargs())))
        sync_mass = outcome_of(lambda: mail.send_mass_mail([args], **kwargs()))
        async_mass = outcome_of(lambda: run(django_socketmail.asend_mass_mail([args], **kwargs())))
    assert async_ == sync
    assert async_mass == sync_mass


def test_asend_mail_raises_as_send_mail_does(plain_server: LocalSMTPServer) -> None:
    with override_settings(**settings_for(plain_server)):
        with pytest.raises(RecipientsRefused):
            mail.send_mail("s", "b", "from@example.com", ["nobody@example.com"])
        with pytest.raises(RecipientsRefused):
            run(django_socketmail.asend_mail("s", "b", "from@example.com", ["nobody@example.com"]))
        assert run(django_socketmail.asend_mail("s", "b", "f@example.com", [])) == 0
        quiet = django_socketmail.asend_mail(
            "s", "b", "from@example.com", ["nobody@example.com"], **QUIETLY
        )
        assert run(quiet) == 0


def test_any_other_backend_runs_in_a_thread() -> None:
    """Django's test runner swaps in locmem: the async functions still work (through
    ``sync_to_async``) and fill ``mail.outbox``."""
    with override_settings(**locmem_settings(ADMINS=server_addresses(("A", "a@example.com")))):
        mail.outbox = []
        assert run(django_socketmail.asend_mail("s", "b", "f@example.com", ["x@example.com"])) == 1
        run(django_socketmail.amail_admins("oops", "b"))
        assert [m.to for m in mail.outbox] == [["x@example.com"], ["a@example.com"]]


def test_using_needs_mailers_and_excludes_connection() -> None:
    if django.VERSION < (6, 1):
        with pytest.raises(TypeError, match=r"6\.1"):
            run(django_socketmail.asend_mail("s", "b", "f@example.com", ["x@x.com"], using="x"))
    else:  # pragma: no cover - Django 6.1: the same warning and error as send_mail()
        args = ("s", "b", "f@example.com", ["x@x.com"])
        sync = outcome_of(lambda: mail.send_mail(*args, connection=object(), using="x"))
        async_ = outcome_of(
            lambda: run(django_socketmail.asend_mail(*args, connection=object(), using="x"))
        )
        assert async_ == sync
        assert sync == ("raised", TypeError, "'connection' is not compatible with 'using'.")


# -- async only: the backend as a context manager, cancellation, the audit log --------------


def test_async_with_keeps_one_connection_for_several_calls(
    make: Any, plain_server: LocalSMTPServer
) -> None:
    backend = make(plain_server)

    async def main() -> list[int]:
        async with backend:
            first = backend.async_session
            counts = [await backend.asend_messages([message()]) for _ in range(3)]
            assert backend.async_session is first
        assert backend.async_session is None
        return counts

    assert run(main()) == [1, 1, 1]
    assert len(plain_server.wait_for_messages(3)) == 3


def cancel_when(
    backend: Any, msgs: list[EmailMessage], ready: Callable[[], bool], within: float = 3.0
) -> None:
    """Start ``asend_messages(msgs)``, cancel it 0.2 s after ``ready()`` (polled), and check
    it raised CancelledError."""

    async def main() -> None:
        task = asyncio.ensure_future(backend.asend_messages(msgs))
        deadline = time.monotonic() + within
        while not ready():
            assert time.monotonic() < deadline, "never got ready to cancel"
            assert not task.done(), task
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.2)  # the client reads what the server sent before it stalled
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main())


def stalling(after: int = 0) -> tuple[Callable[[Connection, bytes], None], threading.Event]:
    """A rule that answers its first ``after`` commands well, then sits on the next reply
    (1.5 s) and hangs up; the event is set when it starts sitting."""
    stalled = threading.Event()
    seen: list[bytes] = []

    def rule(conn: Connection, line: bytes) -> None:
        seen.append(line)
        if len(seen) <= after:
            conn.reply(250, "2.0.0 Ok: queued as EARLY" if line == b"." else "2.1.5 Ok")
            return
        stalled.set()
        conn.sleep(1.5)
        conn.close()

    return rule, stalled


@pytest.mark.parametrize("where", ["RCPT", "final"])
def test_cancelled_send_reports_nothing_unaccepted_as_sent(make: Any, where: str) -> None:
    """Cancelled while the server sits on a reply: the connection is dropped at once (no
    QUIT, nothing more written), the message in flight is not SENT (UNKNOWN once its
    content went out, else FAILED) and carries the cancellation; a message the server
    accepted before stays SENT; the same backend then sends on a new connection."""
    rule, stalled = stalling(after=1)
    stuck = Script([greet(), respond({"RCPT" if where == "RCPT" else ".": rule})])
    with HostileSMTPServer([stuck, Script([greet(), respond({})])]) as server:
        backend = make(server, timeout=5)
        before, msg = message(subject="before"), message(subject="stuck")
        cancel_when(backend, [before, msg], stalled.is_set)
        assert backend.async_session is None
        assert server.wait_closed(timeout=4)
        stuck_conn = server.connections[0]
        # It sees the hang-up at once unless our pipelined commands wait unread before it.
        assert stuck_conn.ended_by in ("client", "server")
        assert b"QUIT" not in stuck_conn.received
        ok = message(subject="after")
        assert run(backend.asend_messages([ok])) == 1
        assert result_of(ok).status is SendStatus.SENT
        assert server.connections[1].messages[0].count(b"Subject: after") == 1
    assert result_of(before).status is SendStatus.SENT
    result = result_of(msg)
    expected = SendStatus.UNKNOWN if where == "final" else SendStatus.FAILED
    assert result.status is expected
    assert isinstance(result.error, SendCancelledError)


class Rollback(Exception):
    pass


def in_rolled_back_transaction(send_one: Callable[[], int], *, write_first: bool = False) -> None:
    """Send inside ``transaction.atomic()`` (after a write of our own, if asked), then fail."""
    with transaction.atomic():
        if write_first:
            User.objects.create(username="made-in-the-transaction")
        assert send_one() == 1
        raise Rollback


@pytest.mark.django_db(transaction=True, databases=["default", "audit"])
@pytest.mark.parametrize("api", APIS)
def test_audit_rows_survive_the_callers_rollback(
    api: str, make: Any, plain_server: LocalSMTPServer
) -> None:
    backend = make(plain_server, audit_log=True, audit_database="audit")
    with pytest.raises(Rollback):
        in_rolled_back_transaction(lambda: send(api, backend, [message()]), write_first=True)
    assert not User.objects.filter(username="made-in-the-transaction").exists()
    assert MessageLog.objects.using("audit").get().status == "sent"
    assert SessionLog.objects.using("audit").count() == 1


@pytest.mark.django_db(transaction=True)
def test_async_audit_log_is_written_off_the_loop_and_survives_a_rollback(
    make: Any, plain_server: LocalSMTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The flush runs in a worker thread (the loop's thread never writes), with that
    thread's own connection: outside the caller's atomic block, so its rows stay."""
    threads: list[threading.Thread] = []
    flush = AuditRecorder.flush

    def spy(self: AuditRecorder) -> None:
        threads.append(threading.current_thread())
        flush(self)

    monkeypatch.setattr(AuditRecorder, "flush", spy)
    backend = make(plain_server, audit_log=True)
    with pytest.raises(Rollback):
        in_rolled_back_transaction(lambda: run(backend.asend_messages([message()])))
    assert threads
    assert threading.current_thread() not in threads
    assert MessageLog.objects.get().status == "sent"
    assert SessionLog.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_async_audit_write_leaves_its_thread_no_open_connection(
    make: Any, plain_server: LocalSMTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker thread that wrote the rows keeps no database connection open afterwards,
    not even to an in-memory SQLite database (the suite's; Django's SQLite ``close()``
    ignores those): else the executor thread holds it until it ends, and then drops it
    open (Python 3.13: ``ResourceWarning: unclosed database``)."""
    opened: list[sqlite3.Connection] = []
    flush = AuditRecorder.flush

    def spy(self: AuditRecorder) -> None:
        flush(self)
        live = [c.connection for c in connections.all(initialized_only=True)]
        opened.extend(raw for raw in live if raw is not None)

    monkeypatch.setattr(AuditRecorder, "flush", spy)
    backend = make(plain_server, audit_log=True)
    assert run(backend.asend_messages([message()])) == 1
    assert MessageLog.objects.get().status == "sent"
    assert opened  # the write used a connection of the worker thread's
    for raw in opened:
        with pytest.raises(sqlite3.ProgrammingError, match="closed"):
            raw.execute("SELECT 1")


@pytest.mark.django_db(transaction=True)
def test_async_audit_log_of_a_cancelled_send(make: Any, caplog: pytest.LogCaptureFixture) -> None:
    rule, stalled = stalling()
    with HostileSMTPServer(Script([greet(), respond({".": rule})])) as server:
        backend = make(server, audit_log=True, timeout=5)
        msg = message()
        with caplog.at_level(logging.ERROR, logger="django_socketmail"):
            cancel_when(backend, [msg], stalled.is_set)
        assert server.wait_closed(timeout=4)
    row = MessageLog.objects.get()
    assert row.status == "unknown"
    assert row.session is not None
    assert row.session.outcome == "failed"
    assert "cancelled" in row.session.error
    assert caplog.text == ""


def test_the_mixin_is_what_the_stand_in_adds() -> None:
    cls = backend_class()
    assert issubclass(cls, EmailBackend)
    assert issubclass(cls, AsyncBackendMixin)
    assert cls is async_backend.AsyncEmailBackend  # one class, made once


# -- the async pool: one per event loop ----------------------------------------------------


def test_the_pool_keeps_one_warm_connection_per_loop_and_quits_it_with_the_loop(
    make: Any,
) -> None:
    """Three calls on one loop share one connection; the loop's end QUITs it; a second
    loop (``asyncio.run`` again) never gets the first loop's session: it opens its own."""
    with HostileSMTPServer(Script([greet(), respond({})])) as server:
        backend = make(server, pool=True)

        async def three() -> list[int]:
            counts = [await backend.asend_messages([message()]) for _ in range(3)]
            pool = await async_backend.loop_pool()
            assert pool.idle_count() == 1
            return counts

        assert run(three()) == [1, 1, 1]
        assert server.wait_closed(count=1)
        assert len(server.connections) == 1
        assert server.connections[0].commands[-1] == b"QUIT"  # the loop's end QUIT it
        assert run(three()) == [1, 1, 1]
        assert server.wait_closed(count=2)
        assert len(server.connections) == 2
        assert [len(c.messages) for c in server.connections] == [3, 3]


def test_a_caller_cancelled_in_a_coalesced_run_does_not_cut_the_shared_connection(
    make: Any,
) -> None:
    """With ``pool=True`` the run is the mailer's, not the caller's: cancelling the caller
    leaves the run going; the server then hangs up without a final reply, so the message
    is UNKNOWN (not SENT), the broken connection is not pooled, and the next call opens a
    new one."""
    rule, stalled = stalling()
    scripts = [Script([greet(), respond({".": rule})]), Script([greet(), respond({})])]
    with HostileSMTPServer(scripts) as server:
        backend = make(server, pool=True, timeout=5)
        cut = message(subject="cut")

        async def main() -> None:
            task = asyncio.ensure_future(backend.asend_messages([cut]))
            while not stalled.is_set():
                await asyncio.sleep(0.005)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            while not hasattr(cut, "socketmail_result"):  # the run goes on without it
                await asyncio.sleep(0.01)
            assert (await async_backend.loop_pool()).idle_count() == 0
            assert await backend.asend_messages([message(subject="next")]) == 1

        run(main())
        assert server.wait_closed(count=2, timeout=4)
        first, second = server.connections
        assert b"Subject: next" not in first.received
        assert len(second.messages) == 1
    assert result_of(cut).status is SendStatus.UNKNOWN
    assert isinstance(result_of(cut).error, ServerDisconnected)


def rcpt_refusing_nobody(conn: Connection, line: bytes) -> None:
    if b"nobody" in line:
        conn.reply(550, "5.1.1 User unknown")
    else:
        conn.reply(250, "2.1.5 Ok")


@pytest.fixture
def runs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of transactions of each run sent on an async session, in order."""
    counts: list[int] = []
    send = async_backend.AsyncSession.send

    async def counting(self: Any, transactions: Any, *, stop_on_error: bool) -> Any:
        counts.append(len(transactions))
        return await send(self, transactions, stop_on_error=stop_on_error)

    monkeypatch.setattr(async_backend.AsyncSession, "send", counting)
    return counts


@pytest.mark.parametrize("cap", [1, 3])
def test_concurrent_sends_coalesce_into_few_runs_within_the_connection_cap(
    make: Any, cap: int, runs: list[int]
) -> None:
    """One call, then 59 more while its run is under way (one message each; every fifth to a
    refused recipient): at most ``cap`` connections, a handful of pipelined runs, not 60,
    every message delivered once, and each caller gets its own count or its own
    ``RecipientsRefused``."""
    script = Script([greet(), respond({"RCPT": rcpt_refusing_nobody})])
    with HostileSMTPServer(script) as server:
        backend = make(server, pool=True, max_connections=cap)
        to = [["nobody@example.com"] if i % 5 == 4 else [f"r{i}@example.com"] for i in range(60)]
        msgs = [message(t, subject=f"n{i}") for i, t in enumerate(to)]

        async def main() -> list[Any]:
            first = asyncio.ensure_future(backend.asend_messages(msgs[:1]))
            await asyncio.sleep(0.005)  # the first run is under way: the rest must wait
            rest = [backend.asend_messages([m]) for m in msgs[1:]]
            return await asyncio.gather(first, *rest, return_exceptions=True)

        outcomes = run(main())
        assert server.wait_closed(count=len(server.connections))
    assert 1 <= len(server.connections) <= cap
    if cap == 1:  # the 59 that came while the first run was under way: one run after it
        assert runs == [1, 59]
    assert sum(runs) == 60
    assert len(runs) <= 2 * cap + 2, runs
    for i, outcome in enumerate(outcomes):
        if i % 5 == 4:
            assert isinstance(outcome, RecipientsRefused), outcome
            assert result_of(msgs[i]).status is SendStatus.REFUSED
        else:
            assert outcome == 1, outcome
            assert result_of(msgs[i]).status is SendStatus.SENT
    # (a transaction whose recipients were all refused sends no content: nothing to count)
    delivered = [m for c in server.connections for m in c.messages if b"Subject: n" in m]
    subjects = sorted(int(m.split(b"Subject: n")[1].split(b"\r\n")[0]) for m in delivered)
    assert subjects == [i for i in range(60) if i % 5 != 4]


@pytest.mark.parametrize("cap", [1, 3])
def test_a_burst_arriving_at_once_is_spread_over_the_connection_cap(
    make: Any, cap: int, runs: list[int]
) -> None:
    """60 calls started together (one ``gather``), ``max_connections=cap``: the burst is
    shared out over ``cap`` connections in runs of about equal size (it all went on one
    connection, whatever the cap), each message delivered once."""
    with HostileSMTPServer(Script([greet(), respond({})])) as server:
        backend = make(server, pool=True, max_connections=cap)
        msgs = [message([f"r{i}@example.com"], subject=f"n{i}") for i in range(60)]

        async def main() -> list[Any]:
            return await asyncio.gather(*(backend.asend_messages([m]) for m in msgs))

        assert run(main()) == [1] * 60
        assert server.wait_closed(count=len(server.connections))
    assert len(server.connections) == cap
    assert sorted(runs) == sorted([60 // cap] * cap)
    assert [len(c.messages) for c in server.connections] == [60 // cap] * cap


def test_coalesced_callers_each_hear_an_opening_failure(make: Any) -> None:
    """The connection of a coalesced run cannot be opened: each caller gets the error
    (or 0 with ``fail_silently``), as ``asend_messages`` alone would give it."""
    with HostileSMTPServer(Script([reply(554, "5.3.2 go away"), close()])) as server:
        loud, quiet = make(server, pool=True), make(server, pool=True, fail_silently=True)

        async def main() -> list[Any]:
            calls = [loud.asend_messages([message()]), quiet.asend_messages([message()])]
            return await asyncio.gather(*calls, return_exceptions=True)

        outcomes = run(main())
    assert isinstance(outcomes[0], ConnectError)
    assert outcomes[0].smtp_code == 554
    assert outcomes[1] == 0


def test_a_failing_run_never_leaves_its_callers_waiting(
    make: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(self: Any, transactions: Any, *, stop_on_error: bool) -> Any:
        raise RuntimeError("a bug in a run")

    monkeypatch.setattr(async_backend.AsyncSession, "send", broken)
    with HostileSMTPServer(Script([greet(), respond({})])) as server:
        backend = make(server, pool=True)

        async def main() -> list[Any]:
            calls = [backend.asend_messages([message()]) for _ in range(3)]
            return await asyncio.gather(*calls, return_exceptions=True)

        outcomes = run(main())
    assert [type(o) for o in outcomes] == [RuntimeError] * 3


@pytest.mark.parametrize("api", APIS)
def test_an_open_session_stops_pipelining_behind_the_dot_once_another_learned_it(
    api: str, make: Any, plain_server: LocalSMTPServer
) -> None:
    """A server that drops what is pipelined behind a final dot is learned once per process
    (by whichever session hit it); a session already open takes the lesson at its next send,
    whichever driver it uses (the async session kept pipelining)."""
    from django_socketmail import session as session_module

    backend = make(plain_server, pool=False)
    session_module.forget_no_dot_pipelining()
    try:

        async def async_case() -> bool:
            async with backend:
                session = backend.async_session
                assert session.client.engine.pipeline_after_dot
                session_module._learn_no_dot_pipelining(plain_server.host, plain_server.port)
                await backend.asend_messages([message()])
                return bool(session.client.engine.pipeline_after_dot)

        if api == "async":
            still_pipelining = run(async_case())
        else:
            backend.open()
            session = backend.session
            assert session.client.engine.pipeline_after_dot
            session_module._learn_no_dot_pipelining(plain_server.host, plain_server.port)
            backend.send_messages([message()])
            still_pipelining = bool(session.client.engine.pipeline_after_dot)
            backend.close()
        assert not still_pipelining
    finally:
        session_module.forget_no_dot_pipelining()
