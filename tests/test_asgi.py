"""The test project's async views under a real ASGI server, end to end, as a user tries them.

A real uvicorn process serves ``testproject.asgi:application`` on 127.0.0.1, with a
throwaway SQLite file (migrated first, with a superuser) and its mail settings from
environment variables (``testproject/testproject/settings.py``) pointing, through a TCP
relay that counts connections, at a :class:`LocalSMTPServer` with STARTTLS and AUTH.  The
tests POST to the views over HTTP, check what the SMTP server received and what the views
answered, read the audit rows in the SQLite file, log into the admin served by the same
uvicorn and find the rows on its message list.

The module starts three uvicorn processes (one shared, one for the burst, one stopped by
the shutdown tests) and runs ``manage.py`` twice: about 10 s in all on an idle machine,
most of it interpreter start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import http.cookiejar
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import django
import pytest

from django_socketmail.localserver import LocalSMTPServer, ReceivedMessage

pytest.importorskip("uvicorn", reason="the test extra's uvicorn serves the test project")

REPO = Path(__file__).resolve().parent.parent
TESTPROJECT = REPO / "testproject"
SMTP_USER = "asgi-user"
SMTP_PASSWORD = "asgi password ü"  # a throwaway server's
ADMIN_USER = "admin"
ADMIN_PASSWORD = "admin-password-for-the-asgi-test"  # a throwaway database's
# Characters that HTML escapes, in valid addresses (' and & are atext, RFC 5322 §3.2.3).
TRICKY = ("o'brien@example.com", "r&d@example.com")
START_TIMEOUT = 30.0

T = TypeVar("T")


# -- a TCP relay that counts the connections the SMTP server gets ----------------------------


class CountingRelay:
    """Relays TCP connections from 127.0.0.1:``port`` to 127.0.0.1:``target``, counting them.

    ``accepted`` is how many connections were made through it, ``open`` how many are open
    now, ``peak`` the most that were open at once.  TLS passes through untouched (the
    server's certificate names 127.0.0.1, which is what the client connects to).
    """

    def __init__(self, target: int) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port: int = self._listener.getsockname()[1]
        self.accepted = 0
        self.open = 0
        self.peak = 0
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._acceptor = threading.Thread(target=self._accept, name="relay-accept")
        self._acceptor.start()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            upstream = socket.create_connection(("127.0.0.1", self.target))
            with self._lock:
                self.accepted += 1
                self.open += 1
                self.peak = max(self.peak, self.open)
                self._sockets += [client, upstream]
            worker = threading.Thread(target=self._relay, args=(client, upstream))
            self._threads.append(worker)
            worker.start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)

    def _relay(self, client: socket.socket, upstream: socket.socket) -> None:
        back = threading.Thread(target=self._pump, args=(upstream, client))
        back.start()
        self._pump(client, upstream)
        back.join()
        client.close()
        upstream.close()
        with self._lock:
            self.open -= 1

    def wait_closed(self, timeout: float) -> bool:
        """Wait until no relayed connection is open; True if so within *timeout*."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self.open == 0:
                    return True
            time.sleep(0.02)
        return False

    def stop(self) -> None:
        """Stop accepting, cut every relayed connection, join every thread."""
        self._stopping.set()
        self._acceptor.join()
        self._listener.close()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for worker in self._threads:
            worker.join()
        for sock in sockets:
            sock.close()


# -- the test project: its database, its settings, uvicorn -----------------------------------


def project_env(database: Path, smtp_port: int, server: LocalSMTPServer) -> dict[str, str]:
    """The environment the test project reads its settings from (mail to *smtp_port*, the
    relay's, with the server's CA and user), and none of ours."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SOCKETMAIL_", "DJANGO_")) and k != "PYTHONPATH"
    }
    env.update(
        DJANGO_SETTINGS_MODULE="testproject.settings",
        PYTHONPATH=os.pathsep.join([str(TESTPROJECT), str(REPO)]),
        SOCKETMAIL_DB=str(database),
        SOCKETMAIL_HOST="127.0.0.1",
        SOCKETMAIL_PORT=str(smtp_port),
        SOCKETMAIL_USE_TLS="1",
        SOCKETMAIL_CA_FILE=server.ca_cert_path,
        SOCKETMAIL_USERNAME=SMTP_USER,
        SOCKETMAIL_PASSWORD=SMTP_PASSWORD,
        SOCKETMAIL_FROM="asgi-test@example.com",
        SOCKETMAIL_POOL="1",
    )
    return env


def manage(env: dict[str, str], *args: str) -> None:
    """``manage.py *args`` in the test project, as its user runs it."""
    done = subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=TESTPROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Uvicorn:
    """``python -m uvicorn testproject.asgi:application`` on a free 127.0.0.1 port.

    Its output goes to ``log``; ResourceWarnings are shown there (``-W always``), so an
    unclosed socket in the served process is seen.  :meth:`stop` sends SIGINT (uvicorn's
    graceful shutdown, as Ctrl+C) and waits, then kills what is left.
    """

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.log = log
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        command = [
            sys.executable,
            "-W",
            "always::ResourceWarning",
            "-m",
            "uvicorn",
            "testproject.asgi:application",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--lifespan",
            "off",
        ]
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                command, cwd=TESTPROJECT, env=env, stdout=out, stderr=subprocess.STDOUT
            )
        self.returncode: int | None = None
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"uvicorn exited at start:\n{self.output()}")
            try:
                with urllib.request.urlopen(f"{self.base}/admin/login/", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"uvicorn did not answer within {START_TIMEOUT}s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        """Stop it gracefully (SIGINT), kill it after 15 s; return its exit status."""
        if self.returncode is None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGINT)
            try:
                self.returncode = self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                self.returncode = -9
        return self.returncode


class Site:
    """What a test needs: the SMTP server, the relay, the database file and uvicorn."""

    def __init__(
        self, server: LocalSMTPServer, relay: CountingRelay, database: Path, uvicorn: Uvicorn
    ) -> None:
        self.server = server
        self.relay = relay
        self.database = database
        self.uvicorn = uvicorn

    def post(self, path: str, to: list[str], **fields: str) -> tuple[int, dict[str, Any]]:
        """POST a form to the site; the HTTP status and the JSON answer."""
        body = urllib.parse.urlencode([("to", a) for a in to] + list(fields.items())).encode()
        request = urllib.request.Request(f"{self.uvicorn.base}{path}", data=body)
        try:
            with urllib.request.urlopen(request, timeout=30) as reply:
                return reply.status, json.load(reply)
        except urllib.error.HTTPError as error:
            with error:
                return error.code, json.load(error)

    def rows(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        """Rows of the test project's SQLite file, read as anyone could."""
        with sqlite3.connect(self.database, timeout=10) as db:
            found = db.execute(query, params).fetchall()
        db.close()
        return found


def received_by(server: LocalSMTPServer, address: str) -> list[ReceivedMessage]:
    return [m for m in list(server.messages) if address in m.rcpt_tos]


def eventually(check: Callable[[], T], timeout: float = 10.0) -> T:
    """``check()``'s first true value within *timeout* seconds (the audit rows are written
    in a worker thread of the served process); its last value otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


@pytest.fixture(scope="module")
def smtp() -> Iterator[LocalSMTPServer]:
    with LocalSMTPServer(
        tls="starttls",
        users={SMTP_USER: SMTP_PASSWORD},
        auth_required=True,
        pipelining=True,
    ) as server:
        yield server


@pytest.fixture(scope="module")
def database(smtp: LocalSMTPServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test project's SQLite file, migrated, with a superuser."""
    path = tmp_path_factory.mktemp("asgi") / "db.sqlite3"
    env = project_env(path, smtp.port, smtp)
    manage(env, "migrate", "--verbosity", "0")
    env["DJANGO_SUPERUSER_PASSWORD"] = ADMIN_PASSWORD
    manage(
        env,
        "createsuperuser",
        "--noinput",
        "--username",
        ADMIN_USER,
        "--email",
        "admin@example.com",
    )
    return path


def start_site(smtp: LocalSMTPServer, database: Path, log: Path) -> tuple[CountingRelay, Uvicorn]:
    relay = CountingRelay(smtp.port)
    try:
        return relay, Uvicorn(project_env(database, relay.port, smtp), log)
    except BaseException:
        relay.stop()
        raise


@pytest.fixture(scope="module")
def site(
    smtp: LocalSMTPServer, database: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Site]:
    relay, uvicorn = start_site(smtp, database, tmp_path_factory.mktemp("uvicorn") / "log")
    try:
        yield Site(smtp, relay, database, uvicorn)
    finally:
        uvicorn.stop()
        relay.stop()


# -- the tests --------------------------------------------------------------------------------


def test_asend_mail_view_sends_one_message_to_the_recipients(site: Site) -> None:
    to = ["first@example.com", "second@example.com"]
    status, answer = site.post("/send/", to, subject="asend_mail under uvicorn")
    assert (status, answer) == (200, {"sent": 1})
    [message] = received_by(site.server, "first@example.com")
    assert message.rcpt_tos == tuple(to)
    assert message.mail_from == "asgi-test@example.com"
    assert message.auth_user == SMTP_USER
    assert message.tls
    assert b"Subject: asend_mail under uvicorn" in message.data


def test_send_message_view_answers_the_servers_result(site: Site) -> None:
    status, answer = site.post("/send-message/", list(TRICKY), subject="the result")
    assert status == 200, answer
    [message] = [m for m in received_by(site.server, TRICKY[0]) if b"the result" in m.data]
    assert message.rcpt_tos == TRICKY
    assert answer == {
        "sent": 1,
        "status": "sent",
        "queue_id": message.queue_id,
        "recipients": [
            {"address": address, "status": "delivered", "reply_code": 250} for address in TRICKY
        ],
    }


def test_bad_requests_send_nothing(site: Site) -> None:
    before = len(site.server.messages)
    assert site.post("/send/", [])[0] == 400
    status, answer = site.post("/send-message/", ["not an address"])
    assert status == 400
    assert answer["error"] == "InvalidAddressError"
    assert len(site.server.messages) == before


def test_audit_rows_in_the_database_and_on_the_admin_list(site: Site) -> None:
    site.post("/send-message/", list(TRICKY), subject="audited <b>")
    [message] = [m for m in received_by(site.server, TRICKY[0]) if b"audited" in m.data]
    rows = eventually(
        lambda: site.rows(
            "SELECT m.status, m.recipients, m.subject, m.final_reply_code, s.auth_username,"
            " s.tls_version, s.port FROM django_socketmail_messagelog m"
            " JOIN django_socketmail_sessionlog s ON m.session_id = s.id WHERE m.queue_id = ?",
            message.queue_id,
        )
    )
    [(status, recipients, subject, code, auth_user, tls_version, port)] = rows
    assert (status, subject, code, auth_user, port) == (
        "sent",
        "audited <b>",
        250,
        SMTP_USER,
        site.relay.port,
    )
    assert all(address in recipients for address in TRICKY)
    assert tls_version.startswith("TLS")

    # The admin, as a user sees it: log in, open the message list, find the row.
    opener = urllib.request.build_opener(
        urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar())
    )
    login = f"{site.uvicorn.base}/admin/login/"
    with opener.open(login, timeout=10) as reply:
        form = reply.read().decode()
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form)
    assert token is not None
    credentials = {
        "csrfmiddlewaretoken": token.group(1),
        "username": ADMIN_USER,
        "password": ADMIN_PASSWORD,
        "next": "/admin/django_socketmail/messagelog/",
    }
    with opener.open(login, urllib.parse.urlencode(credentials).encode(), timeout=10) as reply:
        assert reply.url.endswith("/admin/django_socketmail/messagelog/"), reply.url
        page = reply.read().decode()
    rows_html = re.findall(r"<tr[^>]*>.*?</tr>", page, flags=re.DOTALL)
    [row] = [r for r in rows_html if f">{message.queue_id}<" in r]
    assert 'class="field-status">sent<' in row
    assert html.escape(", ".join(TRICKY)) in row  # o&#x27;brien@..., r&amp;d@...
    assert "audited &lt;b&gt;" in row
    assert "<b>" not in row


@pytest.fixture
def fresh_site(smtp: LocalSMTPServer, database: Path, tmp_path: Path) -> Iterator[Site]:
    """A uvicorn of its own (an empty pool) behind a relay of its own (counts from zero)."""
    relay, uvicorn = start_site(smtp, database, tmp_path / "log")
    try:
        yield Site(smtp, relay, database, uvicorn)
    finally:
        uvicorn.stop()
        relay.stop()


def test_concurrent_requests_are_each_delivered_once_on_few_connections(
    fresh_site: Site,
) -> None:
    site = fresh_site
    burst = [f"burst-{i}@example.com" for i in range(20)]
    with ThreadPoolExecutor(max_workers=len(burst)) as pool:
        answers = list(pool.map(lambda a: site.post("/send-message/", [a]), burst))
    for address, (status, answer) in zip(burst, answers, strict=True):
        assert status == 200, answer
        [message] = received_by(site.server, address)  # exactly once
        assert message.rcpt_tos == (address,)
        assert answer["status"] == "sent"
        assert answer["queue_id"] == message.queue_id
    # Coalesced on pooled connections: at most 3 for the mailer, ever opened or open at once.
    assert 1 <= site.relay.accepted <= 3
    assert site.relay.peak <= 3
    sent_rows = f"""SELECT COUNT(*) FROM django_socketmail_messagelog
        WHERE status = 'sent' AND recipients IN ({", ".join("?" * len(burst))})"""
    assert eventually(lambda: site.rows(sent_rows, *burst) == [(len(burst),)])
    # One session row per connection the server saw, each with its share of the messages.
    [[sessions, messages]] = site.rows(
        "SELECT COUNT(*), SUM(messages_sent) FROM django_socketmail_sessionlog WHERE port = ?",
        site.relay.port,
    )
    assert (sessions, messages) == (site.relay.accepted, len(burst))


@pytest.fixture(scope="module")
def stopped_site(
    smtp: LocalSMTPServer, database: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Site, tuple[int, dict[str, Any]], bool]]:
    """A site that sent one message (its answer) and was then stopped with SIGINT, as
    Ctrl+C stops it; and whether the relay saw every connection closed within 5 s."""
    relay, uvicorn = start_site(smtp, database, tmp_path_factory.mktemp("stopped") / "log")
    site = Site(smtp, relay, database, uvicorn)
    try:
        answer = site.post("/send-message/", ["shutdown@example.com"])
        uvicorn.stop()
        closed = relay.wait_closed(5)
        yield site, answer, closed
    finally:
        uvicorn.stop()
        relay.stop()


def test_shutdown_quits_the_pooled_connections(
    stopped_site: tuple[Site, tuple[int, dict[str, Any]], bool],
) -> None:
    """Ctrl+C ends the server's loop, and with it the loop's pooled connection: it is
    closed and its session row ended, the process exits 0 without a traceback."""
    site, (status, answer), closed = stopped_site
    assert (status, answer["status"]) == (200, "sent")
    assert site.uvicorn.returncode == 0
    assert closed
    sessions = site.rows(
        "SELECT outcome, ended IS NOT NULL, messages_sent FROM django_socketmail_sessionlog"
        " WHERE port = ?",
        site.relay.port,
    )
    assert site.relay.accepted == 1
    assert sessions == [("ok", 1, 1)]
    log = site.uvicorn.output()
    assert "Traceback" not in log, log
    assert "unclosed <socket" not in log, log  # ResourceWarnings are shown (-W always)
    assert "unclosed transport" not in log, log


def test_served_process_leaves_no_database_connection_open(
    stopped_site: tuple[Site, tuple[int, dict[str, Any]], bool],
) -> None:
    """The audit rows of async sends are written from executor threads; each closes its
    database connection after the write (as at a request's end), so none is left open for
    the process's life (Python 3.13's sqlite3 reports one at exit: 'unclosed database')."""
    site, (status, _), _ = stopped_site
    assert status == 200
    log = site.uvicorn.output()
    assert "unclosed database" not in log, log


# -- Django 6.1: asend_mail() without using= as send_mail() without it -----------------------

needs_61 = pytest.mark.skipif(
    django.VERSION < (6, 1), reason="MAILERS and get_connection()'s deprecation: Django 6.1"
)


def default_mailer(server: LocalSMTPServer) -> dict[str, Any]:
    """A ``MAILERS`` setting whose default mailer is *server*, with a user's credentials."""
    from .conftest import PASSWORD, USER

    options = {
        "host": "127.0.0.1",
        "port": server.port,
        "use_tls": True,
        "ssl_cafile": server.ca_cert_path,
        "username": USER,
        "password": PASSWORD,
        "audit_log": False,
        "timeout": 5,
    }
    return {"default": {"BACKEND": "django_socketmail.backend", "OPTIONS": options}}


@needs_61
def test_django_send_mail_without_using_uses_the_default_mailer_as_configured(
    starttls_server: LocalSMTPServer,
) -> None:
    """The reference: Django's own ``send_mail()``, ``MAILERS`` set, no ``using=``: it
    authenticates with the mailer's credentials, and warns nothing."""
    from django.core import mail
    from django.test import override_settings

    from .conftest import USER

    with override_settings(MAILERS=default_mailer(starttls_server)), warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mail.send_mail("s", "b", "f@example.com", ["t@example.com"]) == 1
    [message] = starttls_server.wait_for_messages(1)
    assert message.auth_user == USER


@needs_61
def test_asend_mail_without_using_authenticates_as_the_default_mailer_says(
    starttls_server: LocalSMTPServer,
) -> None:
    """As ``send_mail()``: the default mailer's credentials are used (they were dropped
    when ``asend_mail()`` passed ``username=None, password=None`` to ``get_connection()``,
    which Django 6.1 merges over the mailer's ``OPTIONS``), and nothing warns."""
    from django.test import override_settings

    from django_socketmail import asend_mail

    from .conftest import USER

    with override_settings(MAILERS=default_mailer(starttls_server)), warnings.catch_warnings():
        warnings.simplefilter("error")
        count = asyncio.run(asend_mail("s", "b", "f@example.com", ["t@example.com"]))
    assert count == 1
    [message] = starttls_server.wait_for_messages(1)
    assert message.auth_user == USER
