"""What ``timeout`` covers beyond replies: the name lookup and the EHLO name, each bounded
(round one waited on the resolver without limit: 6 s for a call with ``timeout=2``).

No resolver that hangs on demand can be had here, so ``getaddrinfo``/``getfqdn`` are
replaced by slow stand-ins; the SMTP server is real.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import pytest
from django.core.mail import EmailMessage
from django.core.mail.utils import DNS_NAME

from django_socketmail.email_backend import EmailBackend
from django_socketmail.smtp import SMTPTimeoutError, transport

from .hostile.server import HostileSMTPServer, standard_session

TIMEOUT = 0.5


def test_a_hanging_name_lookup_ends_within_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    real = socket.getaddrinfo

    def slow(host: str, *args: Any, **kwargs: Any) -> Any:
        if host == "slow.example":
            time.sleep(3)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", slow)
    backend = EmailBackend(host="slow.example", port=25, timeout=TIMEOUT, audit_log=False)
    started = time.monotonic()
    with pytest.raises(SMTPTimeoutError, match="name lookup and connect"):
        backend.send_messages([EmailMessage("s", "b", "f@example.com", ["t@example.com"])])
    assert time.monotonic() - started < TIMEOUT + 0.3


def test_a_hanging_lookup_of_our_own_name_falls_back_to_the_address(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def slow_fqdn(name: str = "") -> str:
        time.sleep(3)
        return "late.example"

    str(DNS_NAME)  # Django's own Message-ID name lookup, done before the resolver slows
    monkeypatch.setattr(transport, "_FQDN", [])
    monkeypatch.setattr(socket, "getfqdn", slow_fqdn)
    with HostileSMTPServer([standard_session()]) as server:
        backend = EmailBackend(host=server.host, port=server.port, timeout=TIMEOUT, audit_log=False)
        started = time.monotonic()
        assert (
            backend.send_messages([EmailMessage("s", "b", "f@example.com", ["t@example.com"])]) == 1
        )
        assert time.monotonic() - started < TIMEOUT + 0.5
        assert server.wait_closed()
    assert server.connections[0].commands[0] == b"EHLO [127.0.0.1]"


def test_a_non_ascii_host_is_looked_up_by_its_idna_2008_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``socket`` would look up ``faß.example`` as IDNA 2003's ``fass.example``, another
    domain."""
    asked: list[str] = []
    real = socket.getaddrinfo

    def record(host: str, *args: Any, **kwargs: Any) -> Any:
        asked.append(host)
        return real("127.0.0.1", *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", record)
    with HostileSMTPServer([standard_session()]) as server:
        backend = EmailBackend(host="faß.example", port=server.port, timeout=2, audit_log=False)
        assert (
            backend.send_messages([EmailMessage("s", "b", "f@example.com", ["t@example.com"])]) == 1
        )
    assert asked == ["xn--fa-hia.example"]
