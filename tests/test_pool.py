"""The warm-connection pool: reuse, expiry, a server that hung up while idle, audit rows, fork."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from typing import Any

import pytest

from django_socketmail.email_backend import EmailBackend
from django_socketmail.models import MessageLog, SessionLog
from django_socketmail.pool import POOL, close_pool
from django_socketmail.smtp import SendStatus

from .hostile.server import HostileSMTPServer, close, reply, standard_session
from .test_backend import message


@pytest.fixture(autouse=True)
def empty_pool() -> Iterator[None]:
    close_pool()
    yield
    close_pool()


def pooled(server: HostileSMTPServer, **options: Any) -> EmailBackend:
    defaults: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": server.port,
        "timeout": 2,
        "pool": True,
        "audit_log": False,
        "local_hostname": "client.example",
    }
    return EmailBackend(**(defaults | options))


def test_separate_calls_share_one_connection() -> None:
    with HostileSMTPServer(standard_session()) as server:
        for _ in range(3):
            assert pooled(server).send_messages([message()]) == 1
        assert len(server.connections) == 1
        assert len(server.messages) == 3
        assert POOL.idle_count() == 1
    close_pool()


def test_a_different_configuration_gets_its_own_connection() -> None:
    with HostileSMTPServer(standard_session()) as server:
        pooled(server).send_messages([message()])
        pooled(server, local_hostname="other.example").send_messages([message()])
        assert len(server.connections) == 2


def test_server_closed_while_idle_is_detected_without_sending_into_it() -> None:
    first = standard_session({".": [reply(250, "2.0.0 Ok: queued as A"), close()]})
    with HostileSMTPServer([first, standard_session()]) as server:
        assert pooled(server).send_messages([message()]) == 1
        assert server.wait_closed(count=1)
        msg = message()
        assert pooled(server).send_messages([msg]) == 1
        assert msg.socketmail_result.status is SendStatus.SENT  # type: ignore[attr-defined]
        first_conn, second_conn = server.connections
        assert first_conn.received.count(b"MAIL FROM") == 1  # nothing sent into the dead one
        assert second_conn.received.count(b"MAIL FROM") == 1


def test_unsolicited_421_while_idle_retires_the_session() -> None:
    first = standard_session({".": [reply(250, "2.0.0 Ok"), reply(421, "4.4.2 idle timeout")]})
    with HostileSMTPServer([first, standard_session()]) as server:
        pooled(server).send_messages([message()])
        server.wait_closed(timeout=0.3)
        assert pooled(server).send_messages([message()]) == 1
        assert len(server.connections) == 2
        assert server.connections[0].received.count(b"MAIL FROM") == 1


def test_max_messages_and_idle_timeout() -> None:
    with HostileSMTPServer(standard_session()) as server:
        for _ in range(3):
            pooled(server, pool_max_messages=2).send_messages([message()])
        assert len(server.connections) == 2
    with HostileSMTPServer(standard_session()) as server:
        for _ in range(2):
            pooled(server, pool_idle_timeout=0.0001).send_messages([message()])
        assert len(server.connections) == 2


def test_after_fork_the_child_never_reuses_the_parents_sessions() -> None:
    """A real fork: the child's pool starts empty (so it connects anew) and its exit, which
    runs close_pool(), writes nothing into the parent's connection; the parent's session
    goes on untouched."""
    with HostileSMTPServer(standard_session()) as server:
        assert pooled(server).send_messages([message()]) == 1
        assert POOL.idle_count() == 1
        read, write = os.pipe()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads: 3.12+
            pid = os.fork()
        if pid == 0:  # the child: report what it sees, then exit as a worker would
            try:
                os.close(read)
                os.write(write, str(POOL.idle_count()).encode())
                close_pool()  # what atexit runs when a gunicorn/Celery child exits
            finally:
                os._exit(0)
        os.close(write)
        with os.fdopen(read) as pipe:
            child_saw = pipe.read()
        assert os.waitpid(pid, 0)[1] == 0
        assert child_saw == "0"
        for _ in range(3):  # the parent keeps sending on the same connection
            assert pooled(server).send_messages([message()]) == 1
        assert len(server.connections) == 1
        stream = server.connections[0].received
        assert b"QUIT" not in stream
        assert stream.count(b"MAIL FROM") == 4
        close_pool()
        assert server.wait_closed()
        assert server.connections[0].received.count(b"QUIT") == 1


@pytest.mark.django_db(transaction=True)
def test_one_session_row_per_physical_connection() -> None:
    with HostileSMTPServer(standard_session()) as server:
        for n in range(1, 4):
            assert pooled(server, audit_log=True).send_messages([message()]) == 1
            # The row is brought up to date by every call (only what changed is written).
            assert SessionLog.objects.get().messages_sent == n
            assert MessageLog.objects.count() == n
        assert MessageLog.objects.count() == 3
        assert SessionLog.objects.count() == 1
        close_pool()
        session = SessionLog.objects.get()
        assert session.ended is not None
        assert session.messages_sent == 3
        assert "C: QUIT" in session.transcript


@pytest.mark.django_db(transaction=True)
def test_the_audit_log_follows_each_borrowers_options() -> None:
    """Sessions are pooled per audit configuration: a borrower never changes the recorder
    another borrower's session writes with."""
    with HostileSMTPServer(standard_session()) as server:
        assert pooled(server, audit_log=False).send_messages([message()]) == 1
        assert pooled(server, audit_log=True).send_messages([message()]) == 1
        assert pooled(server, audit_log=False).send_messages([message()]) == 1
        assert pooled(server, audit_log=True).send_messages([message()]) == 1
        assert len(server.connections) == 2
        assert MessageLog.objects.count() == 2
        assert SessionLog.objects.count() == 1


def test_a_borrower_with_the_other_audit_background_gets_its_own_session() -> None:
    """``audit_background`` is part of a pooled session's key: a borrower never has its rows
    written the other way (in the writer thread, or inline) by another's recorder."""
    with HostileSMTPServer(standard_session()) as server:
        for background in (False, True, False, True):
            backend = pooled(server, audit_log=True, audit_background=background)
            assert backend.send_messages([message()]) == 1
            assert backend.last_session is not None
            assert backend.last_session.recorder.options.audit_background is background
        assert len(server.connections) == 2
