"""No credential in Django's error reports, exception texts, reprs or transcripts, for every
mechanism and every way AUTH can end -- with DEBUG on (the technical 500 page, where
Django's ``sensitive_variables`` filter is off) and off (``AdminEmailHandler`` mails).

The password and everything derived from it must be absent: raw, base64 (LOGIN's line), the
PLAIN blob raw and in base64, CRAM-MD5's digest and its base64 response, SCRAM's
client-final-message (random per run: taken from what the server received) raw, in base64
and its proof.
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
    Connection,
    HostileSMTPServer,
    Response,
    auth,
    close,
    reply,
    sleep,
    standard_session,
)
from .test_oauth import oauth_auth
from .test_scram import ScramServer, scram_auth

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
TOKEN = "t0ken-for-reports"
FORMS += [TOKEN, base64.b64encode(TOKEN.encode()).decode()]

MECHANISMS = [
    "PLAIN",
    "LOGIN",
    "CRAM-MD5",
    "SCRAM-SHA-256",
    "SCRAM-SHA-1",
    "XOAUTH2",
    "OAUTHBEARER",
]
TOKEN_EXTENSIONS = ("PIPELINING", "ENHANCEDSTATUSCODES", "AUTH XOAUTH2 OAUTHBEARER PLAIN")


def token_provider(username: str, force_refresh: bool = False) -> str:
    """The token provider of the backends below (by dotted path)."""
    return TOKEN


SCRAM_EXTENSIONS = ("PIPELINING", "ENHANCEDSTATUSCODES", "AUTH SCRAM-SHA-256 SCRAM-SHA-1 PLAIN")


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
    if mechanism.startswith("SCRAM-"):

        def quote(conn: Connection, line: bytes) -> None:
            quoted = " ".join([*FORMS[:2], *scram_forms(conn.commands)])
            conn.reply(535, "5.7.8 bad credentials: " + quoted)

        return quote
    if mechanism in ("XOAUTH2", "OAUTHBEARER"):

        def quote_token(conn: Connection, line: bytes) -> None:
            initial = line.split()[2].decode()
            conn.reply(535, "5.7.8 bad token: " + " ".join([*FORMS[-2:], initial]))

        return quote_token
    sent = {"PLAIN": [FORMS[2]], "LOGIN": [], "CRAM-MD5": [FORMS[4], DIGEST]}[mechanism]
    return reply(535, "5.7.8 bad credentials: " + " ".join([*FORMS[:2], *sent]))


def _valid_tokens(end: str) -> set[str]:
    return {TOKEN} if end == "accepted" else set()


def _wire_forms(server: HostileSMTPServer, mechanism: str) -> list[str]:
    """The secret forms that crossed the wire and are not in FORMS: SCRAM's
    client-final-message (random), a token mechanism's initial response (it names the
    server's port)."""
    if mechanism in ("XOAUTH2", "OAUTHBEARER"):
        forms = [line.split()[2].decode() for line in server.commands if line.startswith(b"AUTH ")]
        assert forms and server.tokens_seen  # type: ignore[attr-defined]
        return forms
    forms = scram_forms(server.commands)
    assert bool(forms) == mechanism.startswith("SCRAM-")  # SCRAM got as far as its proof
    return forms


def scram_server() -> ScramServer:
    """A SCRAM server that knows the account (not a local of the fixture: the report of a
    frame whose locals held the password would show it)."""
    return ScramServer("sha256", {USER: PASSWORD})


def scram_forms(commands: list[bytes]) -> list[str]:
    """Each SCRAM client-final-message among ``commands``: base64, raw, and its proof."""
    forms: list[str] = []
    for line in commands:
        try:
            decoded = base64.b64decode(line, validate=True).decode()
        except ValueError:
            continue
        if decoded.startswith("c=") and ",p=" in decoded:
            forms += [line.decode(), decoded, decoded.rsplit(",p=", 1)[1]]
    return forms


def search(text: str, extra: list[str] | None = None) -> list[str]:
    return [form for form in [*FORMS, *(extra or [])] if form in text]


@pytest.fixture
def raised(request: pytest.FixtureRequest) -> Iterator[tuple[BaseException, list[str]]]:
    """The error a send ended with, and the secret forms that crossed the wire this run."""
    mechanism, end = request.param
    final, expected = (echo(mechanism), AuthenticationError) if end == "echo" else ending(end)
    scram = mechanism.startswith("SCRAM-")
    token = mechanism in ("XOAUTH2", "OAUTHBEARER")
    if token:
        # No local holding the token: this frame's locals are in the report.
        rule = oauth_auth(_valid_tokens(end), final=final if end != "535" else None)
    else:
        rule = scram_auth(scram_server, final=final) if scram else auth(final)
    rules: dict[str, Response] = {"AUTH": rule}
    if end == "accepted":
        rules["MAIL"] = reply(550, "5.7.1 sender not allowed")
    extensions = (
        {"extensions": SCRAM_EXTENSIONS}
        if scram
        else {"extensions": TOKEN_EXTENSIONS}
        if token
        else {}
    )
    server = HostileSMTPServer([standard_session(rules, **extensions)])
    server.scram_servers = []  # type: ignore[attr-defined]
    server.tokens_seen = []  # type: ignore[attr-defined]
    with server:
        backend = EmailBackend(
            host=server.host,
            port=server.port,
            username=USER,
            password=PASSWORD,
            timeout=0.5,
            auth_mechanisms=[mechanism],
            allow_cleartext_auth=True,
            token_provider="tests.test_secrets.token_provider",
            audit_log=False,
            local_hostname="client.example",
        )
        message = EmailMessage("s", "b", "from@example.com", ["to@example.com"])
        with pytest.raises(expected) as info:
            backend.send_messages([message])
        backend.close()
        server.wait_closed()
        # No local for the forms: this frame is in the traceback, its locals in the report.
        yield info.value, _wire_forms(server, mechanism)


CASES = [(m, e) for m in MECHANISMS for e in ("accepted", "535", "hang-up", "no-answer", "echo")]


@pytest.mark.parametrize("raised", CASES, indirect=True, ids=[f"{m}-{e}" for m, e in CASES])
@pytest.mark.parametrize("debug", [True, False], ids=["DEBUG", "production"])
def test_no_secret_in_django_error_reports(
    raised: tuple[BaseException, list[str]], debug: bool
) -> None:
    error, forms = raised
    with override_settings(DEBUG=debug):
        reporter = ExceptionReporter(None, type(error), error, error.__traceback__)
        html = reporter.get_traceback_html()
        text = reporter.get_traceback_text()
    assert "Traceback" in text and "Local vars" in html  # the report really shows locals
    assert search(html, forms) == []
    assert search(text, forms) == []


@pytest.mark.parametrize("raised", CASES, indirect=True, ids=[f"{m}-{e}" for m, e in CASES])
def test_no_secret_in_the_exception_chain_or_its_frames(
    raised: tuple[BaseException, list[str]],
) -> None:
    error, forms = raised
    seen: list[str] = []
    link: BaseException | None = error
    while link is not None:
        seen += [str(link), repr(link), repr(link.args)]
        tb = link.__traceback__
        while tb is not None:
            for value in tb.tb_frame.f_locals.values():
                seen.append(_safe_repr(value))
            tb = tb.tb_next
        link = link.__cause__ or link.__context__
    assert search("\n".join(seen), forms) == []


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
