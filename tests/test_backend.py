"""The Django backend against real in-process SMTP servers (STARTTLS, implicit TLS, plain)."""

from __future__ import annotations

import logging
import smtplib
import threading

import django
import pytest
from django.core import mail
from django.core.exceptions import ImproperlyConfigured
from django.core.mail import EmailMessage
from django.test import override_settings

from django_socketmail.email_backend import EmailBackend
from django_socketmail.localserver import LocalSMTPServer
from django_socketmail.smtp import (
    AuthenticationError,
    CleartextAuthError,
    ConnectionFailedError,
    MessageTooLargeError,
    NotSupportedError,
    RecipientsRefused,
    RecipientStatus,
    SendStatus,
    TLSError,
)

from .conftest import PASSWORD, USER, UTF8_PASSWORD, UTF8_USER, BackendFactory

BODY = "Hello,\n.a line that starts with a dot\n..two dots\nünïcödé\n.\nend\n"


def message(to: list[str] | None = None, body: str = BODY, **kwargs: object) -> EmailMessage:
    return EmailMessage(
        "Test ✓ subject", body, "sender@example.com", to or ["rcpt@example.com"], **kwargs
    )


def delivered_body(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[1]


@pytest.mark.parametrize("mechanism", ["CRAM-MD5", "PLAIN", "LOGIN"])
@pytest.mark.parametrize("server_name", ["starttls_server", "implicit_server"])
def test_each_mechanism_over_tls_delivers_exact_bytes(
    make_backend: BackendFactory, request: pytest.FixtureRequest, server_name: str, mechanism: str
) -> None:
    server: LocalSMTPServer = request.getfixturevalue(server_name)
    backend = make_backend(server, username=USER, password=PASSWORD, auth_mechanisms=[mechanism])
    msg = message()
    assert backend.send_messages([msg]) == 1
    (received,) = server.wait_for_messages(1)
    assert received.auth_user == USER and received.tls
    assert received.mail_from == "sender@example.com"
    assert received.rcpt_tos == ("rcpt@example.com",)
    assert delivered_body(received.data) == BODY.replace("\n", "\r\n").encode()
    result = msg.socketmail_result  # type: ignore[attr-defined]
    assert result.status is SendStatus.SENT
    assert result.final_reply is not None and result.final_reply.code == 250
    assert b"\r\nSubject: " in received.data and b"\n" not in received.data.replace(b"\r\n", b"")


def test_utf8_credentials_with_each_mechanism(
    make_backend: BackendFactory, starttls_server: LocalSMTPServer
) -> None:
    for mechanism in ("CRAM-MD5", "PLAIN", "LOGIN"):
        backend = make_backend(
            starttls_server,
            username=UTF8_USER,
            password=UTF8_PASSWORD,
            auth_mechanisms=[mechanism],
        )
        assert backend.send_messages([message()]) == 1
    assert [m.auth_user for m in starttls_server.wait_for_messages(3)] == [UTF8_USER] * 3


def test_default_preference_picks_cram_md5(
    make_backend: BackendFactory, starttls_server: LocalSMTPServer
) -> None:
    backend = make_backend(starttls_server, username=USER, password=PASSWORD)
    assert backend.open() is True
    assert backend.client is not None and backend.client.info.auth_mechanism == "CRAM-MD5"
    assert backend.client.info.tls_version in ("TLSv1.2", "TLSv1.3")
    assert backend.open() is False
    backend.close()
    assert backend.client is None


def test_cleartext_auth_refused_without_tls_names_the_option(
    make_backend: BackendFactory, plain_server: LocalSMTPServer
) -> None:
    backend = make_backend(
        plain_server, username=USER, password=PASSWORD, auth_mechanisms=["PLAIN", "LOGIN"]
    )
    with pytest.raises(CleartextAuthError, match="allow_cleartext_auth") as info:
        backend.open()
    assert PASSWORD not in str(info.value)
    assert isinstance(info.value, smtplib.SMTPNotSupportedError)


def test_cram_md5_allowed_without_tls(
    make_backend: BackendFactory, plain_server: LocalSMTPServer
) -> None:
    backend = make_backend(plain_server, username=USER, password=PASSWORD)
    assert backend.send_messages([message()]) == 1
    assert backend_mechanism(plain_server) == USER


def backend_mechanism(server: LocalSMTPServer) -> str | None:
    return server.wait_for_messages(1)[0].auth_user


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_cleartext_auth_when_explicitly_allowed(
    make_backend: BackendFactory, plain_server: LocalSMTPServer, mechanism: str
) -> None:
    backend = make_backend(
        plain_server,
        username=USER,
        password=PASSWORD,
        auth_mechanisms=[mechanism],
        allow_cleartext_auth=True,
    )
    assert backend.send_messages([message()]) == 1


def test_wrong_password_raises_without_leaking(
    make_backend: BackendFactory, starttls_server: LocalSMTPServer, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "Wr0ng-Pa55word"
    backend = make_backend(starttls_server, username=USER, password=secret)
    with (
        caplog.at_level(logging.DEBUG, logger="django_socketmail"),
        pytest.raises(AuthenticationError) as info,
    ):
        backend.send_messages([message()])
    error = info.value
    assert isinstance(error, smtplib.SMTPAuthenticationError)
    assert error.smtp_code == 535 and error.is_permanent
    assert secret not in str(error) and secret not in repr(error.args)
    assert secret not in caplog.text
    assert "[redacted]" in caplog.text
    assert starttls_server.messages == []
    # fail_silently swallows it: nothing sent, count 0.
    quiet = make_backend(starttls_server, username=USER, password=secret, fail_silently=True)
    assert quiet.send_messages([message()]) == 0


def test_starttls_required_but_not_offered_sends_nothing_else(
    make_backend: BackendFactory, plain_server: LocalSMTPServer
) -> None:
    backend = make_backend(plain_server, use_tls=True, username=USER, password=PASSWORD)
    with pytest.raises(NotSupportedError, match="does not offer STARTTLS"):
        backend.send_messages([message()])
    assert plain_server.messages == []


def test_untrusted_certificate(
    make_backend: BackendFactory, starttls_server: LocalSMTPServer
) -> None:
    backend = make_backend(starttls_server, ssl_cafile=None)
    with pytest.raises(TLSError, match="ssl_cafile"):
        backend.open()
    unverified = make_backend(starttls_server, ssl_cafile=None, ssl_verify=False)
    assert unverified.send_messages([message()]) == 1


def test_host_name_mismatch(make_backend: BackendFactory, starttls_server: LocalSMTPServer) -> None:
    backend = make_backend(starttls_server, host="127.0.0.2")
    with pytest.raises((TLSError, ConnectionFailedError)):
        backend.open()


def test_partial_acceptance_reports_refusals(
    make_backend: BackendFactory, starttls_server: LocalSMTPServer
) -> None:
    backend = make_backend(starttls_server)
    msg = message(["ok@example.com", "nobody@example.com", "later@example.com"])
    assert backend.send_messages([msg]) == 1
    result = msg.socketmail_result  # type: ignore[attr-defined]
    assert result.status is SendStatus.PARTIAL
    assert list(result.accepted) == ["ok@example.com"]
    assert result.refused["nobody@example.com"].code == 550
    assert result.refused["later@example.com"].is_transient
    (received,) = starttls_server.wait_for_messages(1)
    assert received.rcpt_tos == ("ok@example.com",)


def test_all_refused_raises_recipients_refused(
    make_backend: BackendFactory, starttls_server: LocalSMTPServer
) -> None:
    backend = make_backend(starttls_server)
    msg = message(["nobody1@example.com", "nobody2@example.com"])
    with pytest.raises(RecipientsRefused) as info:
        backend.send_messages([msg])
    assert isinstance(info.value, smtplib.SMTPRecipientsRefused)
    assert set(info.value.recipients) == {"nobody1@example.com", "nobody2@example.com"}
    assert msg.socketmail_result.status is SendStatus.REFUSED  # type: ignore[attr-defined]
    quiet = make_backend(starttls_server, fail_silently=True)
    assert quiet.send_messages([message(["nobody@example.com"]), message()]) == 1
    assert len(starttls_server.wait_for_messages(1)) == 1


def test_connection_reused_across_messages_and_calls(
    make_backend: BackendFactory, starttls_server: LocalSMTPServer
) -> None:
    backend = make_backend(starttls_server)
    assert backend.send_messages([]) == 0
    with backend:
        client = backend.client
        assert backend.send_messages([message(), message()]) == 2
        assert backend.send_messages([message()]) == 1
        assert backend.client is client
    assert backend.client is None
    assert len(starttls_server.wait_for_messages(3)) == 3


def test_size_limit_checked_before_sending(make_backend: BackendFactory) -> None:
    with LocalSMTPServer(tls="none", size_limit=1000) as server:
        backend = make_backend(server)
        msg = message(body="x" * 2000)
        with pytest.raises(MessageTooLargeError, match="1000"):
            backend.send_messages([msg])
        assert msg.socketmail_result.status is SendStatus.FAILED  # type: ignore[attr-defined]
        assert server.messages == []
        assert backend.send_messages([message()]) == 1  # the session survived


def test_smtputf8_recipient(make_backend: BackendFactory, starttls_server: LocalSMTPServer) -> None:
    backend = make_backend(starttls_server)
    assert backend.send_messages([message(["jörg@exämple.com"])]) == 1
    (received,) = starttls_server.wait_for_messages(1)
    assert received.rcpt_tos == ("jörg@xn--exmple-cua.com",)
    assert "SMTPUTF8" in received.mail_options


def test_non_ascii_local_part_without_smtputf8(make_backend: BackendFactory) -> None:
    with LocalSMTPServer(tls="none", smtputf8=False) as server:
        backend = make_backend(server)
        with pytest.raises(NotSupportedError, match="SMTPUTF8"):
            backend.send_messages([message(["jörg@example.com"])])
        assert server.messages == []


def test_invalid_address_refused_before_any_byte(
    make_backend: BackendFactory, starttls_server: LocalSMTPServer
) -> None:
    backend = make_backend(starttls_server)
    evil = "a@example.com\nRCPT TO:<evil@example.com>"
    with pytest.raises(ValueError, match=r"newline|linefeed"):  # Django refuses it in a header
        backend.send_messages([message([evil])])
    with pytest.raises(ValueError, match="Invalid address"):  # and we in the envelope
        backend.send_messages([message(bcc=[evil])])
    assert starttls_server.messages == []


def test_connection_refused_and_fail_silently(make_backend: BackendFactory) -> None:
    with LocalSMTPServer(tls="none") as server:
        port = server.port
    backend = EmailBackend(host="127.0.0.1", port=port, timeout=2, audit_log=False)
    with pytest.raises(ConnectionFailedError) as info:
        backend.send_messages([message()])
    assert isinstance(info.value, smtplib.SMTPException) and isinstance(info.value, OSError)
    quiet = EmailBackend(host="127.0.0.1", port=port, fail_silently=True, audit_log=False)
    assert quiet.open() is None
    assert quiet.send_messages([message()]) == 0


def test_threads_share_one_backend(
    make_backend: BackendFactory, starttls_server: LocalSMTPServer
) -> None:
    backend = make_backend(starttls_server, username=USER, password=PASSWORD)
    counts: list[int] = []

    def worker(n: int) -> None:
        for i in range(5):
            counts.append(backend.send_messages([message([f"t{n}-{i}@example.com"])]))

    with backend:
        threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert sum(counts) == 40
    received = starttls_server.wait_for_messages(40)
    assert sorted(r for m in received for r in m.rcpt_tos) == sorted(
        f"t{n}-{i}@example.com" for n in range(8) for i in range(5)
    )


def test_pipelined_envelope_is_one_write(
    make_backend: BackendFactory, starttls_server: LocalSMTPServer
) -> None:
    backend = make_backend(starttls_server)
    with backend:
        assert backend.client is not None and backend.client.protocol.pipelining
        msg = message(["a@example.com", "nobody@example.com", "b@example.com"])
        assert backend.send_messages([msg]) == 1
    assert msg.socketmail_result.status is SendStatus.PARTIAL  # type: ignore[attr-defined]
    fates = {r.address: r.status for r in msg.socketmail_result.recipients}  # type: ignore[attr-defined]
    assert fates["nobody@example.com"] is RecipientStatus.REFUSED
    assert fates["a@example.com"] is RecipientStatus.DELIVERED


def test_options_validation() -> None:
    with pytest.raises(ImproperlyConfigured, match="mutually exclusive"):
        EmailBackend(use_tls=True, use_ssl=True)
    with pytest.raises(ImproperlyConfigured, match="'timeout'"):
        EmailBackend(timeout=-1)
    with pytest.raises(ImproperlyConfigured, match="XOAUTH9"):
        EmailBackend(auth_mechanisms=["XOAUTH9"])
    with pytest.raises(ImproperlyConfigured, match="'bogus'"):
        EmailBackend(bogus=1)
    with pytest.raises(ImproperlyConfigured, match="value not shown") as info:
        EmailBackend(password=12345)
    assert "12345" not in str(info.value)


def test_defaults_and_precedence() -> None:
    assert EmailBackend().options.timeout == 30.0
    # Outside MAILERS, EMAIL_PORT (default 25) applies as in Django's backend; on 6.1 the
    # EMAIL_* settings are unavailable once MAILERS is defined (as in these tests).
    expected = 25 if django.VERSION < (6, 1) else 465
    assert EmailBackend(use_ssl=True).port == expected
    with override_settings(SOCKETMAIL={"pipelining": False}):
        assert EmailBackend().options.pipelining is False
        assert EmailBackend(pipelining=True).options.pipelining is True
    # SOCKETMAIL holds our own options only; Django's come from EMAIL_* or OPTIONS.
    with override_settings(SOCKETMAIL={"timeout": 9}), pytest.raises(ImproperlyConfigured):
        EmailBackend()
    with (
        override_settings(SOCKETMAIL={"nonsense": 1}),
        pytest.raises(ImproperlyConfigured, match="nonsense"),
    ):
        EmailBackend()


@pytest.mark.skipif(django.VERSION >= (6, 1), reason="EMAIL_* settings are deprecated on 6.1")
def test_email_settings_fill_django_options() -> None:
    with override_settings(EMAIL_HOST="mail.example.com", EMAIL_TIMEOUT=7, EMAIL_USE_TLS=True):
        assert EmailBackend().host == "mail.example.com"
        assert EmailBackend().timeout == 7.0
        assert EmailBackend(timeout=3).timeout == 3.0
        assert EmailBackend().use_tls is True


def test_repr_hides_password() -> None:
    backend = EmailBackend(username="u", password="hunter2")
    assert "hunter2" not in repr(backend.options)
    assert "hunter2" not in repr(backend.options.client_config())


@pytest.mark.skipif(django.VERSION >= (6, 1), reason="EMAIL_BACKEND path is deprecated on 6.1")
def test_email_backend_setting(starttls_server: LocalSMTPServer) -> None:
    with override_settings(
        EMAIL_BACKEND="django_socketmail.backend",
        EMAIL_HOST="127.0.0.1",
        EMAIL_PORT=starttls_server.port,
        EMAIL_USE_TLS=True,
        EMAIL_HOST_USER=USER,
        EMAIL_HOST_PASSWORD=PASSWORD,
        SOCKETMAIL={"ssl_cafile": starttls_server.ca_cert_path, "audit_log": False},
    ):
        assert mail.send_mail("s", "b", "sender@example.com", ["x@example.com"]) == 1
    assert starttls_server.wait_for_messages(1)[0].auth_user == USER


@pytest.mark.skipif(django.VERSION < (6, 1), reason="MAILERS is new in Django 6.1")
def test_mailers_aliases_with_different_servers(
    starttls_server: LocalSMTPServer, implicit_server: LocalSMTPServer
) -> None:
    common = {"host": "127.0.0.1", "username": USER, "password": PASSWORD, "audit_log": False}
    mailers = {
        "default": {
            "BACKEND": "django_socketmail.backend",
            "OPTIONS": common
            | {
                "port": starttls_server.port,
                "use_tls": True,
                "ssl_cafile": starttls_server.ca_cert_path,
            },
        },
        "bulk": {
            "BACKEND": "django_socketmail.backend",
            "OPTIONS": common
            | {
                "port": implicit_server.port,
                "use_ssl": True,
                "ssl_cafile": implicit_server.ca_cert_path,
                "fail_silently": True,
            },
        },
    }
    with override_settings(MAILERS=mailers):
        assert mail.send_mail("s", "b", "sender@example.com", ["x@example.com"]) == 1
        assert mail.send_mail("s", "b", "sender@example.com", ["y@example.com"], using="bulk") == 1
        backend = mail.mailers["bulk"]
        assert isinstance(backend, EmailBackend) and backend.fail_silently
    assert starttls_server.wait_for_messages(1)[0].rcpt_tos == ("x@example.com",)
    assert implicit_server.wait_for_messages(1)[0].rcpt_tos == ("y@example.com",)


@pytest.mark.skipif(django.VERSION < (6, 1), reason="MAILERS is new in Django 6.1")
def test_mailers_unknown_option_is_invalid_mailer() -> None:
    from django.core.mail import InvalidMailer  # type: ignore[attr-defined]

    mailers = {"default": {"BACKEND": "django_socketmail.backend", "OPTIONS": {"hots": "x"}}}
    with override_settings(MAILERS=mailers), pytest.raises(InvalidMailer, match="'hots'"):
        mail.mailers["default"]
    mailers = {"default": {"BACKEND": "django_socketmail.backend", "OPTIONS": {"port": 2525}}}
    with override_settings(MAILERS=mailers):
        backend = mail.mailers["default"]
        assert backend.port == 2525 and backend.host == "localhost"
    mailers = {"default": {"BACKEND": "django_socketmail.backend", "OPTIONS": {"use_ssl": True}}}
    with override_settings(MAILERS=mailers):
        assert mail.mailers["default"].port == 465
