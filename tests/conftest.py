"""Shared fixtures: real in-process SMTP servers on 127.0.0.1 and a backend factory."""

from __future__ import annotations

import os
import ssl
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import trustme

from django_socketmail.email_backend import EmailBackend
from django_socketmail.localserver import LocalSMTPServer

from .pg import postgres_database, postgres_server  # noqa: F401 - fixtures (see tests/pg.py)

USER = "alice"
PASSWORD = "correct horse battery staple"
UTF8_USER = "jürgen"
UTF8_PASSWORD = "pässwörd-€"
USERS = {USER: PASSWORD, UTF8_USER: UTF8_PASSWORD}


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    """A throwaway certificate authority for the hostile servers' TLS."""
    return trustme.CA()


@pytest.fixture(scope="session")
def server_tls(ca: trustme.CA) -> ssl.SSLContext:
    """A server-side TLS context with a certificate for 127.0.0.1 and localhost."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return context


def refuse_nobody(address: str) -> tuple[int, str] | None:
    """Recipients whose local part starts with ``nobody`` are refused, ``later`` deferred (450)."""
    if address.startswith("nobody"):
        return 550, f"5.1.1 <{address}>: Recipient address rejected: User unknown"
    if address.startswith("later"):
        return 450, f"4.2.1 <{address}>: Mailbox busy, try later"
    return None


def _server(**options: Any) -> Iterator[LocalSMTPServer]:
    server = LocalSMTPServer(users=USERS, refuse_recipients=refuse_nobody, **options)
    with server:
        yield server


@pytest.fixture(scope="session")
def _starttls_server() -> Iterator[LocalSMTPServer]:
    """STARTTLS offered, AUTH only under TLS (like a submission port)."""
    yield from _server(tls="starttls", pipelining=True)


@pytest.fixture(scope="session")
def _implicit_server() -> Iterator[LocalSMTPServer]:
    yield from _server(tls="implicit")


@pytest.fixture(scope="session")
def _plain_server() -> Iterator[LocalSMTPServer]:
    """No TLS at all; AUTH offered in the clear (the old port-25 style)."""
    yield from _server(tls="none", allow_cleartext_auth=True)


@pytest.fixture
def starttls_server(_starttls_server: LocalSMTPServer) -> LocalSMTPServer:
    _starttls_server.messages.clear()
    return _starttls_server


@pytest.fixture
def implicit_server(_implicit_server: LocalSMTPServer) -> LocalSMTPServer:
    _implicit_server.messages.clear()
    return _implicit_server


@pytest.fixture
def plain_server(_plain_server: LocalSMTPServer) -> LocalSMTPServer:
    _plain_server.messages.clear()
    return _plain_server


@pytest.fixture
def no_leaks() -> Iterator[None]:
    """The test ends with the threads and file descriptors it started with."""
    fd_dir = "/proc/self/fd"
    fds = len(os.listdir(fd_dir)) if os.path.isdir(fd_dir) else None
    threads = threading.active_count()
    yield
    assert threading.active_count() == threads
    if fds is not None:
        assert len(os.listdir(fd_dir)) == fds


BackendFactory = Callable[..., EmailBackend]


@pytest.fixture
def make_backend() -> Iterator[BackendFactory]:
    """Build an :class:`EmailBackend` for a local server; every backend is closed after the
    test.  Audit logging is off unless asked for (most tests do not need the database)."""
    made: list[EmailBackend] = []

    def make(server: Any, **options: Any) -> EmailBackend:
        """``server`` is a :class:`LocalSMTPServer` or any object with a ``port`` (plain)."""
        tls = server.tls if isinstance(server, LocalSMTPServer) else "none"
        defaults: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": server.port,
            "use_tls": tls == "starttls",
            "use_ssl": tls == "implicit",
            "timeout": 5,
            "local_hostname": "client.example",
            "audit_log": False,
        }
        if tls != "none":
            defaults["ssl_cafile"] = server.ca_cert_path
        backend = EmailBackend(**(defaults | options))
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()
