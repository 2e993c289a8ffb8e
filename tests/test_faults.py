"""Round two's regression tests: the faults an outside review found in round one, each played
by the scripted hostile server against the whole backend (each of these failed on round
one's code)."""

from __future__ import annotations

import logging
import os
import resource
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from django.core.mail import EmailMessage

from django_socketmail import session as session_module
from django_socketmail.email_backend import EmailBackend
from django_socketmail.models import MessageLog, RecipientLog, SessionLog
from django_socketmail.pool import POOL, close_pool
from django_socketmail.smtp import (
    RecipientStatus,
    RemoteProtocolError,
    SenderRefused,
    SendResult,
    SendStatus,
)

from .hostile.server import (
    DEFAULT_EXTENSIONS,
    Connection,
    HostileSMTPServer,
    Response,
    Script,
    close,
    cycle,
    greet,
    read_data,
    reply,
    respond,
    send,
    sleep,
    standard_session,
)

CHUNKING = [*DEFAULT_EXTENSIONS, "CHUNKING"]
NO_PIPELINING = [e for e in DEFAULT_EXTENSIONS if e != "PIPELINING"]


def nth_message(*responses: Response) -> Callable[[Connection, bytes], None]:
    """A rule for the end of a message: the n-th message on a connection gets
    ``responses[n]`` (the last one for any further)."""

    def run(conn: Connection, line: bytes) -> None:
        conn.run(responses[min(len(conn.messages), len(responses)) - 1], line)

    return run


def backend(server: HostileSMTPServer, **options: Any) -> EmailBackend:
    defaults: dict[str, Any] = {
        "host": server.host,
        "port": server.port,
        "timeout": 2,
        "local_hostname": "client.example",
        "audit_log": False,
        "fail_silently": True,
    }
    return EmailBackend(**(defaults | options))


def message(to: list[str] | None = None, subject: str = "fault") -> EmailMessage:
    return EmailMessage(subject, "body\n", "sender@example.com", to or ["a@example.com"])


def result_of(msg: EmailMessage) -> SendResult:
    result = getattr(msg, "socketmail_result", None)
    assert isinstance(result, SendResult)
    return result


@pytest.fixture(autouse=True)
def _empty_pool() -> Iterator[None]:
    close_pool()
    yield
    close_pool()


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("chunking", [True, False], ids=["bdat", "data"])
def test_a_lost_final_reply_keeps_every_rcpt_outcome_in_results_and_audit(chunking: bool) -> None:
    extensions = CHUNKING if chunking else DEFAULT_EXTENSIONS
    rules = {
        "RCPT": cycle(reply(250, "2.1.5 Ok"), reply(550, "5.1.1 <b@example.com>: unknown")),
        ".": close(),
    }
    with HostileSMTPServer([standard_session(rules, extensions=extensions)]) as server:
        msg = message(["a@example.com", "b@example.com"])
        assert backend(server, audit_log=True).send_messages([msg]) == 0
    result = result_of(msg)
    assert result.status is SendStatus.UNKNOWN
    first, second = result.recipients
    assert (first.status, first.reply and first.reply.code) == (RecipientStatus.UNKNOWN, 250)
    assert (second.status, second.reply and second.reply.code) == (RecipientStatus.REFUSED, 550)
    rows = {r.address: (r.status, r.reply_code) for r in RecipientLog.objects.all()}
    assert rows == {"a@example.com": ("unknown", 250), "b@example.com": ("refused", 550)}
    assert MessageLog.objects.get().status == "unknown"


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("pool", [True, False], ids=["pooled", "not-pooled"])
def test_a_session_that_broke_is_recorded_failed_pooled_or_not(pool: bool) -> None:
    rules = {".": nth_message(reply(250, "2.0.0 Ok: queued as ONE"), close())}
    scripts = (
        [standard_session(rules)]
        if pool
        else [standard_session(), standard_session({".": close()})]
    )
    with HostileSMTPServer(scripts) as server:
        mailer = backend(server, audit_log=True, pool=pool)
        assert mailer.send_messages([message()]) == 1
        assert mailer.send_messages([message()]) == 0  # the server hangs up before its reply
        close_pool()
    rows = list(SessionLog.objects.order_by("pk"))
    assert [row.outcome for row in rows] == (["failed"] if pool else ["ok", "failed"])
    assert "closed the connection" in rows[-1].error


def test_pool_liveness_works_past_1024_file_descriptors() -> None:
    """select.select() raised ValueError for fds >= 1024 in the pool's liveness check, after
    the server had taken the message: a retrying caller sent it twice."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip(f"the hard limit on open files is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), hard))
    filler = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        with HostileSMTPServer([standard_session()]) as server:
            mailer = backend(server, pool=True, fail_silently=False)
            assert mailer.send_messages([message(subject="one")]) == 1
            assert mailer.send_messages([message(subject="two")]) == 1  # reuses, after a look
            assert mailer.client is None
            close_pool()
            assert server.wait_closed()
            (conn,) = server.connections
            assert [m.count(b"Subject: one") + m.count(b"Subject: two") for m in conn.messages] == [
                1,
                1,
            ]
    finally:
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_lockstep_421_leaves_later_messages_for_a_new_connection() -> None:
    rules = {"MAIL": cycle(reply(250, "2.1.0 Ok"), [reply(421, "4.3.2 shutting down"), close()])}
    hostile = standard_session(rules, extensions=NO_PIPELINING)
    with HostileSMTPServer([hostile, standard_session(extensions=NO_PIPELINING)]) as server:
        msgs = [message(subject=f"m{n}") for n in range(3)]
        assert backend(server).send_messages(msgs) == 2
        assert server.wait_closed(count=2)
    statuses = [result_of(m).status for m in msgs]
    assert statuses == [SendStatus.SENT, SendStatus.FAILED, SendStatus.SENT]
    error = result_of(msgs[1]).error
    assert isinstance(error, SenderRefused) and error.smtp_code == 421
    assert result_of(msgs[2]).error is None
    first, second = server.connections
    assert len(first.messages) == 1 and len(second.messages) == 1
    assert b"Subject: m2" in second.messages[0]


def test_rset_after_a_failed_bdat_before_the_next_borrowers_mail() -> None:
    rules = {
        ".": nth_message(reply(554, "5.6.0 content rejected"), reply(250, "2.0.0 Ok: queued as 2"))
    }
    with HostileSMTPServer([standard_session(rules, extensions=CHUNKING)]) as server:
        assert backend(server, pool=True).send_messages([message()]) == 0
        assert backend(server, pool=True).send_messages([message()]) == 1
        close_pool()
        assert server.wait_closed()
    verbs = [line.split()[0].upper() for line in server.connections[0].commands if line.split()]
    between = verbs[verbs.index(b"BDAT") + 1 : len(verbs) - 1 - verbs[::-1].index(b"MAIL")]
    assert between == [b"RSET"]


@pytest.mark.parametrize(
    "extensions", [DEFAULT_EXTENSIONS, NO_PIPELINING], ids=["pipelined", "lockstep"]
)
def test_an_early_reply_glued_to_354_is_never_taken_as_the_final_reply(
    extensions: list[str],
) -> None:
    early = [
        send(b"354 go ahead\r\n250 2.0.0 Ok: queued as FAKE\r\n"),
        read_data(),
        reply(554, "5.7.1 no"),
    ]
    hostile = standard_session({"DATA": early}, extensions=extensions)
    with HostileSMTPServer([hostile, standard_session(extensions=extensions)]) as server:
        first = message(subject="first")
        assert backend(server).send_messages([first]) == 0
        assert server.wait_closed()
    result = result_of(first)
    assert result.status is SendStatus.FAILED
    assert isinstance(result.error, RemoteProtocolError)
    assert result.final_reply is None
    assert server.connections[0].messages == []


def test_each_message_has_its_own_timing() -> None:
    slow_second = nth_message(
        reply(250, "2.0.0 Ok: queued as A"), [sleep(0.4), reply(250, "2.0.0 Ok: queued as B")]
    )
    with HostileSMTPServer([standard_session({".": slow_second})]) as server:
        msgs = [message(subject="fast"), message(subject="slow")]
        before = time.time()
        assert backend(server).send_messages(msgs) == 2
    fast, slow = (result_of(m) for m in msgs)
    assert fast.elapsed < 0.3 <= slow.elapsed
    assert before <= fast.started <= slow.started


def test_an_envelope_behind_the_dot_that_kills_the_server_is_learned_and_resent(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Dovecot submission 2.3's panic, played: it reads the dot and the next envelope, then
    drops.  The message in flight is UNKNOWN; the rest go on a new connection that no longer
    pipelines behind the dot; the lesson is logged once."""

    def crash(conn: Any, line: bytes) -> None:
        conn.readline()  # the MAIL pipelined behind the dot
        conn.close()

    hostile = standard_session({".": crash})
    with HostileSMTPServer([hostile, standard_session()]) as server:
        msgs = [message(subject=f"m{n}") for n in range(4)]
        with caplog.at_level(logging.WARNING, logger="django_socketmail"):
            assert backend(server).send_messages(msgs) == 3
            assert backend(server).send_messages([message(subject="later")]) == 1
        assert server.wait_closed(count=3)
    assert [result_of(m).status for m in msgs] == [SendStatus.UNKNOWN] + [SendStatus.SENT] * 3
    assert session_module.learned_no_dot_pipelining(server.host, server.port)
    assert caplog.text.count("no longer pipelining across messages") == 1
    second = server.connections[1]
    assert second.pipelined.count(b".") == 0  # nothing rode behind a dot any more
    assert len(second.messages) == 3


def test_a_rotated_ca_file_is_read_again(tmp_path: Path) -> None:
    """The TLS context was cached by file path for the life of the process."""
    path = tmp_path / "ca.pem"
    sessions = []
    for authority in (trustme.CA(), trustme.CA()):
        authority.cert_pem.write_to_path(str(path))
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        authority.issue_cert("127.0.0.1").configure_cert(context)
        script = standard_session(extensions=[*DEFAULT_EXTENSIONS, "STARTTLS"])
        with HostileSMTPServer([script], tls_context=context) as server:
            mailer = backend(server, use_tls=True, ssl_cafile=str(path), fail_silently=False)
            sessions.append(mailer.send_messages([message()]))
    assert sessions == [1, 1]


def test_close_pool_shares_one_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Eight idle sessions to a server that never answers QUIT: one budget for all of them
    (round one waited 5 s each)."""
    mute = Script([greet(), respond({"QUIT": sleep(30)})])
    with HostileSMTPServer([mute]) as server:
        for _ in range(8):
            session = session_module.Session(backend(server, pool=True).options, "")
            session.open()
            POOL.release(session, backend(server, pool=True)._limits)
        assert POOL.idle_count() == 8
        started = time.monotonic()
        POOL.clear(budget=1.0)
        assert time.monotonic() - started < 2.0
        assert POOL.idle_count() == 0


def test_quit_is_bounded_even_when_the_server_stops_reading() -> None:
    """QUIT's write waited the full timeout in round one (its read was capped at 5 s)."""
    stalled = Script([greet(), respond({"NOOP": sleep(30)})])
    with HostileSMTPServer([stalled]) as server:
        mailer = backend(server, timeout=30, fail_silently=False)
        mailer.open()
        client = mailer.client
        assert client is not None
        sock = client._sock
        assert sock is not None
        sock.sendall(b"NOOP\r\n")  # the server sleeps from here on and reads nothing
        sock.setblocking(False)
        try:
            while True:
                sock.send(b"x" * 65536)
        except BlockingIOError:
            pass
        started = time.monotonic()
        mailer.close()
        assert time.monotonic() - started < 5.5
