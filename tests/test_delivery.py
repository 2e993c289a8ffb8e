"""Per-message delivery options on the wire: DSN (RFC 3461), REQUIRETLS (RFC 8689) and an
envelope sender other than ``From`` (Django ticket #9214)."""

from __future__ import annotations

import ssl
from typing import Any

import pytest
import trustme
from django.core.mail import EmailMessage

from django_socketmail import DeliveryOptions
from django_socketmail.email_backend import EmailBackend
from django_socketmail.smtp import NotSupportedError, SendResult, SendStatus
from django_socketmail.smtp.delivery import xtext

from .hostile.server import DEFAULT_EXTENSIONS, HostileSMTPServer, standard_session

DSN = [*DEFAULT_EXTENSIONS, "DSN"]


def message(**delivery: Any) -> EmailMessage:
    msg = EmailMessage(
        "dsn", "body\n", "Shop <shop@example.com>", ["a@example.com", "b@example.com"]
    )
    if delivery:
        msg.socketmail_delivery = DeliveryOptions(**delivery)  # type: ignore[attr-defined]
    return msg


def result_of(msg: EmailMessage) -> SendResult:
    result = getattr(msg, "socketmail_result", None)
    assert isinstance(result, SendResult)
    return result


def send(server: HostileSMTPServer, msg: EmailMessage, **options: Any) -> int:
    backend = EmailBackend(
        host=server.host,
        port=server.port,
        timeout=2,
        audit_log=False,
        fail_silently=True,
        **options,
    )
    return backend.send_messages([msg])


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        ("abc-123_x.y", "abc-123_x.y"),
        ("a+b=c", "a+2Bb+3Dc"),
        ("two words", "two+20words"),
        ("é", "+C3+A9"),
        ("<id@host>", "<id@host>"),
    ],
)
def test_xtext(value: str, encoded: str) -> None:
    assert xtext(value) == encoded


@pytest.mark.parametrize(
    "bad",
    [
        {"notify": ()},
        {"notify": ("NEVER", "SUCCESS")},
        {"notify": ("SOMETIMES",)},
        {"ret": "BODY"},
        {"envid": "x" * 101},
    ],
)
def test_bad_options_are_refused_when_made(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each message names its own problem
        DeliveryOptions(**bad)


def test_dsn_parameters_and_envelope_sender_on_the_wire() -> None:
    with HostileSMTPServer([standard_session(extensions=DSN)]) as server:
        msg = message(
            notify=("success", "failure"),
            ret="HDRS",
            envid="order-42+retry",
            orcpt=True,
            envelope_sender="bounces+42@example.com",
        )
        assert send(server, msg) == 1
        assert server.wait_closed()
    commands = server.connections[0].commands
    mail = next(c for c in commands if c.startswith(b"MAIL"))
    assert mail.startswith(b"MAIL FROM:<bounces+42@example.com> SIZE=")
    assert mail.endswith(b" RET=HDRS ENVID=order-42+2Bretry")
    assert [c for c in commands if c.startswith(b"RCPT")] == [
        b"RCPT TO:<a@example.com> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a@example.com",
        b"RCPT TO:<b@example.com> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b@example.com",
    ]
    assert b"From: Shop <shop@example.com>" in server.connections[0].messages[0]
    result = result_of(msg)
    assert (result.mail_from, result.envid, result.dsn_sent) == (
        "bounces+42@example.com",
        "order-42+retry",
        True,
    )
    assert "ENVID=order-42+2Bretry" in "\n".join(str(line) for line in result.transcript)


def test_an_auto_envid_is_fresh_per_message_and_on_its_result() -> None:
    with HostileSMTPServer([standard_session(extensions=DSN)]) as server:
        first, second = message(envid="auto"), message(envid="auto")
        backend = EmailBackend(host=server.host, port=server.port, timeout=2, audit_log=False)
        assert backend.send_messages([first, second]) == 2
    ids = [result_of(m).envid for m in (first, second)]
    assert all(ids) and ids[0] != ids[1]


def test_without_dsn_offered_the_message_goes_without_it() -> None:
    with HostileSMTPServer([standard_session()]) as server:
        msg = message(notify=("NEVER",), ret="FULL", envid="x")
        assert send(server, msg) == 1
        assert server.wait_closed()
    commands = server.connections[0].commands
    assert not any(b"NOTIFY" in c or b"RET=" in c or b"ENVID" in c for c in commands)
    result = result_of(msg)
    assert result.status is SendStatus.SENT
    assert (result.envid, result.dsn_sent) == (None, False)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, str]:
    authority = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(context)
    path = tmp_path_factory.mktemp("requiretls") / "ca.pem"
    authority.cert_pem.write_to_path(str(path))
    return context, str(path)


@pytest.mark.parametrize("offered", [True, False], ids=["offered", "not-offered"])
def test_requiretls_only_over_tls_to_a_server_that_offers_it(
    tls: tuple[ssl.SSLContext, str], offered: bool
) -> None:
    context, ca = tls
    extensions = [*DEFAULT_EXTENSIONS, "STARTTLS", *(["REQUIRETLS"] if offered else [])]
    with HostileSMTPServer(
        [standard_session(extensions=extensions)], tls_context=context
    ) as server:
        msg = message(require_tls=True)
        assert send(server, msg, use_tls=True, ssl_cafile=ca) == (1 if offered else 0)
        assert server.wait_closed()
    mails = [c for c in server.connections[0].commands if c.startswith(b"MAIL")]
    if offered:
        assert mails[0].endswith(b" REQUIRETLS")
        assert result_of(msg).status is SendStatus.SENT
    else:
        assert mails == []  # refused before MAIL
        error = result_of(msg).error
        assert isinstance(error, NotSupportedError)
        assert "does not offer it" in str(error)


def test_requiretls_is_refused_on_a_plain_session() -> None:
    extensions = [*DEFAULT_EXTENSIONS, "REQUIRETLS"]
    with HostileSMTPServer([standard_session(extensions=extensions)]) as server:
        msg = message(require_tls=True)
        assert send(server, msg) == 0
        assert server.wait_closed()
    assert not any(c.startswith(b"MAIL") for c in server.connections[0].commands)
    assert "not encrypted" in str(result_of(msg).error)


def test_a_mailers_default_delivery_options_and_a_messages_own() -> None:
    with HostileSMTPServer([standard_session(extensions=DSN)]) as server:
        backend = EmailBackend(
            host=server.host,
            port=server.port,
            timeout=2,
            audit_log=False,
            delivery={"notify": ["FAILURE"], "ret": "HDRS"},
        )
        assert backend.send_messages([message(), message(notify=("NEVER",))]) == 2
        assert server.wait_closed()
    rcpts = [c for c in server.connections[0].commands if c.startswith(b"RCPT")]
    assert rcpts == [
        b"RCPT TO:<a@example.com> NOTIFY=FAILURE",
        b"RCPT TO:<b@example.com> NOTIFY=FAILURE",
        b"RCPT TO:<a@example.com> NOTIFY=NEVER",
        b"RCPT TO:<b@example.com> NOTIFY=NEVER",
    ]
    mails = [c for c in server.connections[0].commands if c.startswith(b"MAIL")]
    assert mails[0].endswith(b" RET=HDRS") and not mails[1].endswith(b" RET=HDRS")


def test_a_bad_default_is_a_configuration_error() -> None:
    from django.core.exceptions import ImproperlyConfigured

    with pytest.raises(ImproperlyConfigured, match="delivery"):
        EmailBackend(delivery={"notify": ["SOMETIMES"]})
