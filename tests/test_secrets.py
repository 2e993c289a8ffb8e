"""No credential in Django's error reports, exception texts, reprs or transcripts, for every
mechanism and every way AUTH can end -- with DEBUG on (the technical 500 page, where
Django's ``sensitive_variables`` filter is off) and off (``AdminEmailHandler`` mails).

The password and everything derived from it must be absent: raw, base64 (LOGIN's line), the
PLAIN blob raw and in base64, CRAM-MD5's digest and its base64 response, SCRAM's
client-final-message (random per run: taken from what the server received) raw, in base64
and its proof.

Every search runs for each way of sending (``APIS``): ``backend.send_messages()``, Django's
``send_mail()`` with the credentials in the settings, and their async twins
``await backend.asend_messages()`` and ``await asend_mail()`` (each on a fresh event loop in
asyncio's debug mode): the async traceback has coroutine and asyncio frames of its own.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
from collections.abc import Awaitable, Iterator
from typing import Any, TypeVar

import django
import pytest
from django.core import mail
from django.core.mail import EmailMessage
from django.test import override_settings
from django.views.debug import ExceptionReporter

import django_socketmail
from django_socketmail.email_backend import EmailBackend
from django_socketmail.smtp import AuthenticationError, SocketMailError

from .audit_text import audit_text
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


T = TypeVar("T")
APIS = ["send_messages", "send_mail", "asend_messages", "asend_mail"]
"""How the failing send is made: the backend's method or Django's function, sync or async."""
BACKEND = "django_socketmail.email_backend.EmailBackend"


def run(awaitable: Awaitable[T]) -> T:
    """Run in a fresh event loop in asyncio's debug mode."""

    async def main() -> T:
        return await awaitable

    return asyncio.run(main(), debug=True)


def mailer_settings(port: int, **options: Any) -> dict[str, Any]:
    """Our backend as the default mailer with these credentials and options, in the
    installed Django's terms: ``MAILERS`` on Django 6.1, ``EMAIL_*`` + ``SOCKETMAIL`` before
    (the password then sits in the settings, which Django's reports must hide as well)."""
    if django.VERSION >= (6, 1):
        given = {"host": "127.0.0.1", "port": port, "username": USER, "password": PASSWORD}
        return {"MAILERS": {"default": {"BACKEND": BACKEND, "OPTIONS": given | options}}}
    own = {name: value for name, value in options.items() if name != "timeout"}
    return {
        "EMAIL_BACKEND": BACKEND,
        "EMAIL_HOST": "127.0.0.1",
        "EMAIL_PORT": port,
        "EMAIL_HOST_USER": USER,
        "EMAIL_HOST_PASSWORD": PASSWORD,
        "EMAIL_TIMEOUT": options["timeout"],
        "SOCKETMAIL": own,
    }


def send_one(api: str, backend: EmailBackend) -> int:
    """One message, sent the ``api`` way (the functions take the settings' mailer)."""
    if api == "send_mail":
        return mail.send_mail("s", "b", "from@example.com", ["to@example.com"])
    if api == "asend_mail":
        return run(django_socketmail.asend_mail("s", "b", "from@example.com", ["to@example.com"]))
    message = EmailMessage("s", "b", "from@example.com", ["to@example.com"])
    if api == "asend_messages":
        return run(backend.asend_messages([message]))
    return backend.send_messages([message])


ROUTES = {
    "send_messages": {"send_messages"},
    "send_mail": {"send_mail", "send_messages"},
    "asend_messages": {"asend_messages", "run"},
    "asend_mail": {"asend_mail", "asend_messages", "run"},
}
"""Functions each way's traceback passes through."""


def frames_of(error: BaseException) -> set[str]:
    names: set[str] = set()
    tb = error.__traceback__
    while tb is not None:
        names.add(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    return names


def search(text: str, extra: list[str] | None = None) -> list[str]:
    return [form for form in [*FORMS, *(extra or [])] if form in text]


Raised = tuple[BaseException, list[str], str]
"""A failed send's error, the secret forms that crossed the wire, and what was logged."""
LOGGERS = ("django_socketmail", "asyncio")


class LogRecords(logging.Handler):
    """Every record of ``LOGGERS`` at DEBUG while in the ``with`` block, formatted as a log
    file would have it (tracebacks included)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
        self.lines: list[str] = []
        self._levels: list[int] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def text(self) -> str:
        return "\n".join(self.lines)

    def __enter__(self) -> LogRecords:
        for name in LOGGERS:
            logger = logging.getLogger(name)
            self._levels.append(logger.level)
            logger.setLevel(logging.DEBUG)
            logger.addHandler(self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for name, level in zip(LOGGERS, self._levels, strict=True):
            logger = logging.getLogger(name)
            logger.removeHandler(self)
            logger.setLevel(level)


def server_for(mechanism: str, end: str) -> tuple[HostileSMTPServer, type[BaseException]]:
    """A server offering ``mechanism`` whose AUTH ends as ``end`` says (see ``ending``;
    ``"echo"``: refused, quoting the secrets back), and the error a send then raises."""
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
    return server, expected


@pytest.fixture(scope="module")
def raised(request: pytest.FixtureRequest) -> Iterator[Raised]:
    """The error a send ended with, the secret forms that crossed the wire this run and
    what was logged meanwhile (module-scoped: the tests of one case share one failed
    send)."""
    api, mechanism, end = request.param
    server, expected = server_for(mechanism, end)
    options: dict[str, Any] = {
        "timeout": 0.5,
        "auth_mechanisms": [mechanism],
        "allow_cleartext_auth": True,
        "token_provider": "tests.test_secrets.token_provider",
        "audit_log": False,
        "local_hostname": "client.example",
    }
    with (
        server,
        override_settings(**mailer_settings(server.port, **options)),
        LogRecords() as logged,
    ):
        backend = EmailBackend(
            host=server.host, port=server.port, username=USER, password=PASSWORD, **options
        )
        with pytest.raises(expected) as info:
            send_one(api, backend)
        backend.close()
        assert ROUTES[api] <= frames_of(info.value)  # it came the way it was sent
        server.wait_closed()
        # No local for the forms: this frame is in the traceback, its locals in the report.
        yield info.value, _wire_forms(server, mechanism), logged.text()


ENDINGS = ("accepted", "535", "hang-up", "no-answer", "echo")
AUTH_REFUSED = ("535", "echo")
CASES = [
    (a, m, e)
    for a in APIS
    for m in MECHANISMS
    for e in (ENDINGS if a.endswith("send_messages") else AUTH_REFUSED)
]
"""Every mechanism and ending through the backend's methods, sync and async; through the
functions (whose frames only add to the top of the same traceback), the AUTH refusals."""
IDS = [f"{a}-{m}-{e}" for a, m, e in CASES]


@pytest.mark.parametrize("raised", CASES, indirect=True, ids=IDS, scope="module")
@pytest.mark.parametrize("debug", [True, False], ids=["DEBUG", "production"])
def test_no_secret_in_django_error_reports(raised: Raised, debug: bool) -> None:
    error, forms, _ = raised
    with override_settings(DEBUG=debug):
        reporter = ExceptionReporter(None, type(error), error, error.__traceback__)
        html = reporter.get_traceback_html()
        text = reporter.get_traceback_text()
    assert "Traceback" in text and "Local vars" in html  # the report really shows locals
    assert search(html, forms) == []
    assert search(text, forms) == []


@pytest.mark.parametrize("raised", CASES, indirect=True, ids=IDS, scope="module")
def test_no_secret_in_the_exception_chain_or_its_frames(
    raised: Raised,
) -> None:
    error, forms, _ = raised
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


@pytest.mark.parametrize("raised", CASES, indirect=True, ids=IDS, scope="module")
def test_no_secret_in_the_logs(raised: Raised) -> None:
    """Everything django_socketmail and asyncio (in debug mode) logged during the failed
    send, at DEBUG, tracebacks included: the transcript is there, no secret is."""
    _, forms, logged = raised
    assert "connecting to" in logged  # the transcript was logged...
    assert search(logged, forms) == []  # ...and holds no credential


def _safe_repr(value: Any) -> str:
    try:
        return repr(value)
    except Exception as error:  # a half-built object: its repr may fail; that is no leak
        return f"<repr failed: {type(error).__name__}>"


@pytest.mark.parametrize("api", ["send_messages", "asend_messages"])
def test_echoed_secrets_are_redacted_from_replies_and_transcript(api: str) -> None:
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
            send_one(api, backend)
    assert "[redacted]" in str(info.value)
    assert search(str(info.value)) == []
    assert search("\n".join(lines)) == []
    assert any("bad credentials: [redacted]" in line for line in lines)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest.mark.parametrize("api", ["send_messages", "asend_messages"])
def test_no_secret_in_any_audit_column(api: str, mechanism: str) -> None:
    """With the audit log on, a session whose AUTH is accepted (then MAIL is refused) and
    one whose AUTH is refused by a server quoting the secrets back: no form of the secret
    in any text column of the audit tables, whichever API sent (the async one writes its
    rows from a worker thread)."""
    from django_socketmail.models import SessionLog

    forms: list[str] = []
    for end in ("accepted", "echo"):
        server, expected = server_for(mechanism, end)
        with server:
            backend = EmailBackend(
                host=server.host,
                port=server.port,
                username=USER,
                password=PASSWORD,
                timeout=2,
                auth_mechanisms=[mechanism],
                allow_cleartext_auth=True,
                token_provider="tests.test_secrets.token_provider",
                audit_log=True,
                local_hostname="client.example",
            )
            with pytest.raises(expected):
                send_one(api, backend)
            backend.close()
            assert server.wait_closed()
            forms += _wire_forms(server, mechanism)

    dump = audit_text()
    assert SessionLog.objects.count() == 2
    assert SessionLog.objects.filter(auth_mechanism=mechanism).exists()
    assert "[redacted]" in dump  # the refusal that quoted the secrets was recorded, redacted
    assert search(dump, forms) == []
