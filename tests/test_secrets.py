"""No credential in Django's error reports, exception texts, reprs or transcripts, for every
mechanism and every way AUTH can end -- with DEBUG on (the technical 500 page, where
Django's ``sensitive_variables`` filter is off) and off (``AdminEmailHandler`` mails).

The password and everything derived from it must be absent: raw, base64 (LOGIN's line), the
PLAIN blob raw and in base64, CRAM-MD5's digest and its base64 response.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterator
from typing import Any

import pytest
from django.core.mail import EmailMessage
from django.test import override_settings
from django.views.debug import ExceptionReporter

from django_socketmail.email_backend import EmailBackend
from django_socketmail.smtp import AuthenticationError, SocketMailError

from .hostile.server import (
    RFC2195_CHALLENGE,
    HostileSMTPServer,
    Response,
    auth,
    close,
    reply,
    sleep,
    standard_session,
)

USER = "mallory-user"
PASSWORD = "s3cret-Pa55-for-reports"
DIGEST = hmac.new(PASSWORD.encode(), RFC2195_CHALLENGE, hashlib.md5).hexdigest()
FORMS = [
    PASSWORD,
    base64.b64encode(PASSWORD.encode()).decode(),
    base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode(),
    DIGEST,
    base64.b64encode(f"{USER} {DIGEST}".encode()).decode(),
]
"""Every form of the secret that may cross the wire or sit in memory."""

MECHANISMS = ["PLAIN", "LOGIN", "CRAM-MD5"]


def ending(name: str) -> tuple[Response | None, type[BaseException]]:
    """How the server ends the exchange, and what the caller then gets."""
    if name == "accepted":
        return None, SocketMailError  # then MAIL is refused: SenderRefused
    if name == "535":
        return reply(535, "5.7.8 Authentication credentials invalid"), AuthenticationError
    if name == "hang-up":
        return close(), SocketMailError
    if name == "no-answer":
        return sleep(3), SocketMailError
    raise AssertionError(name)


def echo(mechanism: str) -> Response:
    """A server that quotes back what we sent, and the password raw and in base64."""
    sent = {"PLAIN": [FORMS[2]], "LOGIN": [], "CRAM-MD5": [FORMS[4], DIGEST]}[mechanism]
    return reply(535, "5.7.8 bad credentials: " + " ".join([*FORMS[:2], *sent]))


def search(text: str) -> list[str]:
    return [form for form in FORMS if form in text]


@pytest.fixture
def raised(request: pytest.FixtureRequest) -> Iterator[BaseException]:
    mechanism, end = request.param
    final, expected = (echo(mechanism), AuthenticationError) if end == "echo" else ending(end)
    rules: dict[str, Response] = {"AUTH": auth(final)}
    if end == "accepted":
        rules["MAIL"] = reply(550, "5.7.1 sender not allowed")
    with HostileSMTPServer([standard_session(rules)]) as server:
        backend = EmailBackend(
            host=server.host,
            port=server.port,
            username=USER,
            password=PASSWORD,
            timeout=0.5,
            auth_mechanisms=[mechanism],
            allow_cleartext_auth=True,
            audit_log=False,
            local_hostname="client.example",
        )
        message = EmailMessage("s", "b", "from@example.com", ["to@example.com"])
        with pytest.raises(expected) as info:
            backend.send_messages([message])
        yield info.value
        backend.close()


CASES = [(m, e) for m in MECHANISMS for e in ("accepted", "535", "hang-up", "no-answer", "echo")]


@pytest.mark.parametrize("raised", CASES, indirect=True, ids=[f"{m}-{e}" for m, e in CASES])
@pytest.mark.parametrize("debug", [True, False], ids=["DEBUG", "production"])
def test_no_secret_in_django_error_reports(raised: BaseException, debug: bool) -> None:
    with override_settings(DEBUG=debug):
        reporter = ExceptionReporter(None, type(raised), raised, raised.__traceback__)
        html = reporter.get_traceback_html()
        text = reporter.get_traceback_text()
    assert "Traceback" in text and "Local vars" in html  # the report really shows locals
    assert search(html) == []
    assert search(text) == []


@pytest.mark.parametrize("raised", CASES, indirect=True, ids=[f"{m}-{e}" for m, e in CASES])
def test_no_secret_in_the_exception_chain_or_its_frames(raised: BaseException) -> None:
    seen: list[str] = []
    link: BaseException | None = raised
    while link is not None:
        seen += [str(link), repr(link), repr(link.args)]
        tb = link.__traceback__
        while tb is not None:
            for value in tb.tb_frame.f_locals.values():
                seen.append(_safe_repr(value))
            tb = tb.tb_next
        link = link.__cause__ or link.__context__
    assert search("\n".join(seen)) == []


def _safe_repr(value: Any) -> str:
    try:
        return repr(value)
    except Exception as error:  # a half-built object: its repr may fail; that is no leak
        return f"<repr failed: {type(error).__name__}>"


def test_echoed_secrets_are_redacted_from_replies_and_transcript() -> None:
    final = echo("PLAIN")
    lines: list[str] = []
    with HostileSMTPServer([standard_session({"AUTH": auth(final)})]) as server:
        backend = EmailBackend(
            host=server.host,
            port=server.port,
            username=USER,
            password=PASSWORD,
            auth_mechanisms=["PLAIN"],
            allow_cleartext_auth=True,
            audit_log=False,
            timeout=2,
        )
        backend.transcript_listeners.append(lambda line: lines.append(str(line)))
        with pytest.raises(AuthenticationError) as info:
            backend.send_messages([EmailMessage("s", "b", "f@example.com", ["t@example.com"])])
    assert "[redacted]" in str(info.value)
    assert search(str(info.value)) == []
    assert search("\n".join(lines)) == []
    assert any("bad credentials: [redacted]" in line for line in lines)
