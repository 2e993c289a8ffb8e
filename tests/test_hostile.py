"""The Django backend against hostile SMTP servers: every failure is fast, exact and safe.

Each test plays one broken or malicious server (`tests/hostile/server.py`) against
:class:`EmailBackend` and checks, besides the scenario's own outcome, what every scenario
shares (see :class:`Scenario`):

- the attempt ends within ``TIMEOUT`` plus ``MARGIN`` seconds;
- ``send_messages()``'s count and ``message.socketmail_result.status`` are exact;
- with ``fail_silently=True`` the same happens without an exception (``quiet``);
- the password never reaches the server unless the mechanism legitimately sent it, and
  never an exception's text or the transcript (logged at DEBUG on ``django_socketmail``);
- the client breaks no protocol rule the server watches (``violations``);
- afterwards ``backend.close()`` works and the same backend delivers on a good connection.

Every scenario runs through both APIs (the ``api`` fixture, a parameter of ``scenario``):
``send_messages()``, and ``await backend.asend_messages()`` on an event loop of the
scenario's own in asyncio's debug mode (one loop per scenario, so an ``aopen()`` and the
sends after it share it; closed, with its executor, before the scenario's server stops).
The same counts, results, exceptions, time bounds and wire checks hold for both.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import smtplib
import ssl
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
import trustme
from django.core.mail import EmailMessage

from django_socketmail.email_backend import EmailBackend
from django_socketmail.smtp import (
    AuthenticationError,
    ConnectError,
    DataError,
    InvalidAddressError,
    MessageTooLargeError,
    NotSupportedError,
    RecipientsRefused,
    RecipientStatus,
    RemoteProtocolError,
    SenderRefused,
    SendResult,
    SendStatus,
    ServerDisconnected,
    SMTPTimeoutError,
    TLSError,
)

from .hostile.server import (
    DEFAULT_EXTENSIONS,
    Connection,
    HostileSMTPServer,
    Response,
    Script,
    auth,
    close,
    cycle,
    drain,
    drip,
    ehlo,
    endless_multiline,
    expect,
    flood,
    greet,
    read_bytes,
    reply,
    respond,
    send,
    standard_session,
    starttls,
)

TIMEOUT = 1.0
"""The backend's timeout in every scenario: seconds allowed for each reply."""
MARGIN = 0.5
"""How much longer than TIMEOUT an attempt may take, all included."""
PROBE = 0.03
"""How long the server looks for pipelined bytes before each reply, where that is checked."""
LOCAL_HOSTNAME = "client.example"
USER = "hostile-user"
PASSWORD = "Qx7-distinctive-hostile-pa55word"
SECRET_FORMS = (
    PASSWORD.encode(),
    base64.b64encode(PASSWORD.encode()),  # the LOGIN password line
    base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()),  # the PLAIN blob
)
"""The password as it would cross the wire, raw or in each mechanism's encoding."""
CREDENTIALS: dict[str, Any] = {"username": USER, "password": PASSWORD}
TO = ["a@example.com", "b@example.com", "c@example.com", "d@example.com", "e@example.com"]
BODY = "Hello,\n.a line that starts with a dot\n..two\nend\n"
STARTTLS_EXTENSIONS = [*DEFAULT_EXTENSIONS, "STARTTLS"]
NO_PIPELINING = [e for e in DEFAULT_EXTENSIONS if e != "PIPELINING"]

T = TypeVar("T")
APIS = ["sync", "async"]
"""How a scenario sends: ``send_messages()``, or ``await asend_messages()``."""

quiet_or_not = pytest.mark.parametrize("quiet", [False, True], ids=["raises", "fail_silently"])


def message(to: Sequence[str] = TO[:1], body: str = BODY, subject: str = "hostile") -> EmailMessage:
    return EmailMessage(subject, body, "sender@example.com", list(to))


def result_of(msg: EmailMessage) -> SendResult:
    result = getattr(msg, "socketmail_result", None)
    assert isinstance(result, SendResult), "the message was never attempted"
    return result


def secret_hits(data: bytes) -> int:
    """How many times the password crossed the wire in ``data``, in any encoding."""
    return sum(data.count(form) for form in SECRET_FORMS)


def assert_no_secret_in_text(text: str) -> None:
    for form in SECRET_FORMS:
        assert form.decode() not in text


def good_session(extensions: Sequence[str] = DEFAULT_EXTENSIONS) -> Script:
    """A well-behaved server: the connection a backend gets after the hostile one."""
    return standard_session(extensions=extensions)


def verbs(conn: Connection) -> list[bytes]:
    return [line.split()[0].upper() if line.split() else b"" for line in conn.commands]


@pytest.fixture(autouse=True)
def _no_leaks(no_leaks: None) -> None:
    """Every test ends with the threads and file descriptors it started with."""


@pytest.fixture(scope="module")
def ca_path(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("hostile-ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
def starttls_options(server_tls: ssl.SSLContext, ca_path: str) -> dict[str, Any]:
    """Scenario options for a server offering STARTTLS and a backend using it with AUTH."""
    return {"tls_context": server_tls, "use_tls": True, "ssl_cafile": ca_path, **CREDENTIALS}


@dataclass
class Scenario:
    """One hostile server, one backend pointed at it, and the checks all scenarios share."""

    server: HostileSMTPServer
    backend: EmailBackend
    caplog: pytest.LogCaptureFixture
    api: str = "sync"
    elapsed: float = 0.0
    loop: asyncio.AbstractEventLoop | None = None

    def run(self, awaitable: Awaitable[T]) -> T:
        """Run on the scenario's event loop (made on first use, in asyncio's debug mode)."""
        if self.loop is None:
            self.loop = asyncio.new_event_loop()
            self.loop.set_debug(True)

        async def main() -> T:
            return await awaitable

        return self.loop.run_until_complete(main())

    def deliver(self, messages: Sequence[EmailMessage]) -> int:
        """``send_messages(messages)`` or ``await asend_messages(messages)``, by ``api``."""
        if self.api == "sync":
            return self.backend.send_messages(messages)
        return self.run(self.backend.asend_messages(messages))

    def open(self) -> bool | None:
        """``backend.open()`` or ``await backend.aopen()``."""
        if self.api == "sync":
            return self.backend.open()
        return self.run(self.backend.aopen())

    def close(self) -> None:
        """``backend.close()`` or ``await backend.aclose()``."""
        if self.api == "sync":
            self.backend.close()
        else:
            self.run(self.backend.aclose())

    @property
    def session_client(self) -> Any:
        """The client of the backend's open session (``backend.client``, or the async
        session's), None when closed."""
        if self.api == "sync":
            return self.backend.client
        session = self.backend.async_session
        return None if session is None else session.client

    def end_loop(self) -> None:
        """Close the scenario's event loop (async generators and executor first)."""
        loop, self.loop = self.loop, None
        if loop is None:
            return
        try:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()

    @property
    def quiet(self) -> bool:
        return self.backend.fail_silently

    @property
    def first(self) -> Connection:
        return self.server.connections[0]

    def send(
        self,
        messages: Sequence[EmailMessage],
        *,
        count: int,
        raises: type[BaseException] | None = None,
    ) -> BaseException | None:
        """``send_messages(messages)`` (or ``asend_messages``): it returns ``count``, or
        raises ``raises`` unless quiet; either way within TIMEOUT + MARGIN.  Returns the
        error (raised, or else on the last attempted message's result), which must not
        contain the password."""
        error: BaseException | None = None
        started = time.monotonic()
        try:
            if raises is None or self.quiet:
                assert self.deliver(messages) == count
            else:
                with pytest.raises(raises) as info:
                    self.deliver(messages)
                error = info.value
        finally:
            self.elapsed = time.monotonic() - started
        assert self.elapsed < TIMEOUT + MARGIN, f"took {self.elapsed:.2f} s"
        if error is None:
            attempted = [getattr(m, "socketmail_result", None) for m in messages]
            errors = [r.error for r in attempted if r is not None and r.error is not None]
            error = errors[-1] if errors else None
        if raises is not None and error is not None:
            assert isinstance(error, raises)
            assert isinstance(error, (smtplib.SMTPException, InvalidAddressError))
        link: BaseException | None = error
        while link is not None:
            assert_no_secret_in_text(str(link))
            assert_no_secret_in_text(repr(link.args))
            link = link.__cause__ or link.__context__
        return error

    def finish(self, *, secret_on_wire: int = 0) -> None:
        """Close, check what reached the server and the log, then prove the backend reusable:
        it delivers a new message on the next connection (the server's last script)."""
        self.close()
        assert self.session_client is None
        self.close()  # idempotent
        before = len(self.server.connections)
        assert self.server.wait_closed(count=before)
        wire = b"".join(conn.received for conn in self.server.connections)
        assert secret_hits(wire) == secret_on_wire
        assert "*: connecting to" in self.caplog.text  # the transcript was captured...
        assert_no_secret_in_text(self.caplog.text)  # ...and holds no credential
        assert self.server.violations == []
        assert self.server.errors == []

        msg = message(subject="reuse after failure")
        assert self.deliver([msg]) == 1
        assert result_of(msg).status is SendStatus.SENT
        assert self.session_client is None
        assert self.server.wait_closed(count=before + 1)
        last = self.server.connections[-1]
        assert last.index == before
        assert len(last.messages) == 1 and b"Subject: reuse after failure" in last.messages[0]
        assert self.server.violations == []
        assert self.server.errors == []


ScenarioFactory = Callable[..., Scenario]


@pytest.fixture(params=APIS)
def api(request: pytest.FixtureRequest) -> str:
    """How the scenario sends: ``"sync"`` or ``"async"``."""
    return str(request.param)


@pytest.fixture
def scenario(caplog: pytest.LogCaptureFixture, api: str) -> Iterator[ScenarioFactory]:
    """``scenario(script, ..., quiet=..., tls_context=..., **backend_options)``: the n-th
    connection plays the n-th script (the last one for any further connections); the
    scenario sends through ``api``."""
    caplog.set_level(logging.DEBUG, logger="django_socketmail")
    made: list[Scenario] = []

    def make(
        *scripts: Script,
        quiet: bool = False,
        tls_context: ssl.SSLContext | None = None,
        implicit_tls: bool = False,
        probe: float = 0.0,
        **options: Any,
    ) -> Scenario:
        server = HostileSMTPServer(
            list(scripts),
            tls_context=tls_context,
            implicit_tls=implicit_tls,
            pipelining_probe=probe,
            max_received=16 * 1024 * 1024,
        ).start()
        try:
            backend = EmailBackend(
                host=server.host,
                port=server.port,
                timeout=TIMEOUT,
                fail_silently=quiet,
                local_hostname=LOCAL_HOSTNAME,
                audit_log=False,
                **options,
            )
        except BaseException:
            server.stop()
            raise
        made.append(Scenario(server, backend, caplog, api))
        return made[-1]

    yield make
    for made_scenario in made:
        try:
            try:
                made_scenario.backend.close()
                if made_scenario.backend.async_session is not None:
                    made_scenario.run(made_scenario.backend.aclose())
            finally:
                made_scenario.end_loop()
        finally:
            made_scenario.server.stop()


# -- opening -------------------------------------------------------------------------------


@quiet_or_not
@pytest.mark.parametrize("code", [421, 554])
def test_greeting_refused(scenario: ScenarioFactory, quiet: bool, code: int) -> None:
    hostile = Script([reply(code, f"{code // 100}.3.2 go away"), close()])
    sc = scenario(hostile, good_session(), quiet=quiet, **CREDENTIALS)
    msg = message()
    error = sc.send([msg], count=0, raises=ConnectError)
    if not quiet:
        assert isinstance(error, smtplib.SMTPConnectError)
        assert isinstance(error, ConnectError)
        assert error.smtp_code == code
        assert error.is_transient is (code == 421)
        assert error.is_permanent is (code == 554)
    assert not hasattr(msg, "socketmail_result")  # never attempted: no session
    assert sc.server.wait_closed()
    assert sc.first.received == b""
    sc.finish()


@quiet_or_not
def test_never_greets(scenario: ScenarioFactory, quiet: bool) -> None:
    sc = scenario(Script([drain()]), good_session(), quiet=quiet, **CREDENTIALS)
    error = sc.send([message()], count=0, raises=SMTPTimeoutError)
    assert sc.elapsed >= TIMEOUT * 0.95
    if not quiet:
        assert isinstance(error, TimeoutError)
    assert sc.server.wait_closed()
    assert sc.first.received == b""
    sc.finish()


@quiet_or_not
@pytest.mark.parametrize("where", ["greeting", "final-reply"])
def test_reply_drips_one_byte_at_a_time(scenario: ScenarioFactory, quiet: bool, where: str) -> None:
    """A byte every 0.25 s: each recv() succeeds well within TIMEOUT, so only a deadline for
    the whole reply (not a timeout per read) ends the attempt in time."""
    if where == "greeting":
        hostile = Script([drip(b"220 hostile.test ESMTP slowly\r\n", 0.25)])
    else:
        hostile = standard_session({".": drip(b"250 2.0.0 Ok: queued as SLOW\r\n", 0.25)})
    sc = scenario(hostile, good_session(), quiet=quiet, **CREDENTIALS)
    msg = message()
    error = sc.send([msg], count=0, raises=SMTPTimeoutError)
    assert sc.elapsed >= TIMEOUT * 0.95
    if where == "greeting":
        assert not hasattr(msg, "socketmail_result")
        if not quiet:
            assert isinstance(error, SMTPTimeoutError)
    else:
        # The content went out and the final reply never completed: maybe delivered.
        result = result_of(msg)
        assert result.status is SendStatus.UNKNOWN
        assert isinstance(result.error, SMTPTimeoutError)
        assert len(sc.first.messages) == 1
    sc.finish()


@quiet_or_not
def test_ten_megabyte_reply_line(scenario: ScenarioFactory, quiet: bool) -> None:
    hostile = Script([send(b"220 "), flood(10 * 1024 * 1024)])
    sc = scenario(hostile, good_session(), quiet=quiet, **CREDENTIALS)
    tracemalloc.start()
    try:
        error = sc.send([message()], count=0, raises=RemoteProtocolError)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 512 * 1024, f"peak {peak} bytes while refusing a 10 MB line"
    if not quiet:
        assert error is not None and "longer than" in str(error)
    sc.finish()


@quiet_or_not
def test_endless_multiline_reply(scenario: ScenarioFactory, quiet: bool) -> None:
    hostile = Script([greet(), expect(b"EHLO"), endless_multiline(250)])
    sc = scenario(hostile, good_session(), quiet=quiet, **CREDENTIALS)
    error = sc.send([message()], count=0, raises=RemoteProtocolError)
    if not quiet:
        assert error is not None and "lines" in str(error)
    assert verbs(sc.first) == [b"EHLO"]
    sc.finish()


MALFORMED: dict[str, Script] = {
    "greeting-not-numeric": Script([send(b"2x0 hostile.test ESMTP\r\n")]),
    "greeting-no-separator": Script([send(b"220hostile.test\r\n")]),
    "EHLO-codes-differ": Script(
        [greet(), expect(b"EHLO"), send(b"250-hostile.test\r\n251 PIPELINING\r\n")]
    ),
    "RCPT-not-numeric": standard_session({"RCPT": send(b"OK fine\r\n")}),
    "RCPT-codes-differ": standard_session({"RCPT": send(b"250-2.1.5 Ok\r\n550 5.1.1 no\r\n")}),
}


@quiet_or_not
@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_reply(scenario: ScenarioFactory, quiet: bool, case: str) -> None:
    sc = scenario(MALFORMED[case], good_session(), quiet=quiet, **CREDENTIALS)
    msg = message()
    error = sc.send([msg], count=0, raises=RemoteProtocolError)
    if case.startswith("RCPT"):
        result = result_of(msg)
        assert result.status is SendStatus.FAILED
        assert isinstance(result.error, RemoteProtocolError)
        assert sc.first.messages == []
    else:
        assert not hasattr(msg, "socketmail_result")
        if not quiet:
            assert isinstance(error, RemoteProtocolError)
    sc.finish()


def test_non_utf8_replies(scenario: ScenarioFactory) -> None:
    hostile = Script(
        [
            send(b"220 h\xf6stile.test ESMTP \xff\xfe\r\n"),
            respond(
                {
                    "EHLO": send(b"250-h\xf6stile.test\r\n250-X-\xff\xfe\r\n250 PIPELINING\r\n"),
                    ".": send(b"250 2.0.0 caf\xe9 queued as \xff1\r\n"),
                }
            ),
        ]
    )
    sc = scenario(hostile, good_session())
    msg = message()
    sc.send([msg], count=1)
    result = result_of(msg)
    assert result.status is SendStatus.SENT
    assert result.final_reply is not None
    assert result.final_reply.text == "2.0.0 caf\ufffd queued as \ufffd1"
    assert "h\ufffdstile.test ESMTP \ufffd\ufffd" in sc.caplog.text
    assert len(sc.first.messages) == 1
    sc.finish()


def test_ehlo_refused_falls_back_to_helo(scenario: ScenarioFactory) -> None:
    hostile = standard_session({"EHLO": reply(502, "5.5.2 Error: command not recognized")})
    sc = scenario(hostile, good_session(), probe=PROBE)
    msg = message(TO[:3])
    sc.send([msg], count=1)
    assert result_of(msg).status is SendStatus.SENT
    assert sc.server.wait_closed()
    assert verbs(sc.first) == [b"EHLO", b"HELO", b"MAIL", *[b"RCPT"] * 3, b"DATA", b"QUIT"]
    assert sc.first.commands[1] == b"HELO " + LOCAL_HOSTNAME.encode()
    (delivered,) = sc.first.messages
    assert delivered.endswith(b"\r\n.a line that starts with a dot\r\n..two\r\nend\r\n")
    assert sc.first.pipelined == []  # HELO means no extensions: nothing pipelined
    assert not sc.first.pipelined_violation
    sc.finish()


# -- authentication ------------------------------------------------------------------------


@quiet_or_not
@pytest.mark.parametrize("code", [535, 454])
@pytest.mark.parametrize(
    "mechanisms",
    [["CRAM-MD5", "PLAIN", "LOGIN"], ["PLAIN", "LOGIN"]],
    ids=["cram-md5-first", "plain-first"],
)
def test_auth_refused_is_never_retried(
    scenario: ScenarioFactory, quiet: bool, code: int, mechanisms: list[str]
) -> None:
    """535 (bad credentials) and 454 (try later): one AUTH only, never another mechanism."""
    final = reply(code, f"{code // 100}.7.8 Error: authentication failed")
    hostile = standard_session({"AUTH": auth(final=final)})
    sc = scenario(
        hostile,
        good_session(),
        quiet=quiet,
        auth_mechanisms=mechanisms,
        allow_cleartext_auth=True,
        **CREDENTIALS,
    )
    msg = message()
    error = sc.send([msg], count=0, raises=AuthenticationError)
    if not quiet:
        assert isinstance(error, AuthenticationError)
        assert isinstance(error, smtplib.SMTPAuthenticationError)
        assert error.smtp_code == code
        assert error.is_transient is (code == 454)
        assert error.enhanced_status == f"{code // 100}.7.8"
    assert not hasattr(msg, "socketmail_result")
    assert sc.server.wait_closed()
    assert sc.first.count("AUTH") == 1
    assert verbs(sc.first)[:2] == [b"EHLO", b"AUTH"]
    assert b"MAIL" not in sc.first.received
    # CRAM-MD5 keeps the password off the wire; PLAIN (allowed in clear here) sends it once.
    sc.finish(secret_on_wire=0 if mechanisms[0] == "CRAM-MD5" else 1)


@quiet_or_not
def test_cram_md5_challenge_not_base64(scenario: ScenarioFactory, quiet: bool) -> None:
    hostile = standard_session({"AUTH": auth(cram_challenge="!!not*base64!!")})
    sc = scenario(hostile, good_session(), quiet=quiet, **CREDENTIALS)
    error = sc.send([message()], count=0, raises=AuthenticationError)
    if not quiet:
        assert isinstance(error, AuthenticationError)
        assert error.smtp_code == 501  # the server's answer to our "*"
        assert "not valid base64" in str(error)
    assert sc.server.wait_closed()
    assert sc.first.received.endswith(b"AUTH CRAM-MD5\r\n*\r\n")
    assert USER.encode() not in sc.first.received
    sc.finish()


@quiet_or_not
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_extra_334_step_after_password(
    scenario: ScenarioFactory, quiet: bool, mechanism: str
) -> None:
    """After the password the server asks for more: the client cancels, never resends."""
    rule = auth(
        extra=[reply(334, "bW9yZT8="), expect(b"*")],  # "more?"
        final=reply(501, "5.7.0 Authentication cancelled"),
    )
    sc = scenario(
        standard_session({"AUTH": rule}),
        good_session(),
        quiet=quiet,
        auth_mechanisms=[mechanism],
        allow_cleartext_auth=True,
        **CREDENTIALS,
    )
    error = sc.send([message()], count=0, raises=AuthenticationError)
    if not quiet:
        assert isinstance(error, AuthenticationError)
        assert error.smtp_code == 501
        assert "unexpected extra step" in str(error)
    assert sc.server.wait_closed()
    assert secret_hits(sc.first.received) == 1
    assert sc.first.received.endswith(b"\r\n*\r\n")
    assert b"MAIL" not in sc.first.received
    sc.finish(secret_on_wire=1)


# -- STARTTLS ------------------------------------------------------------------------------


@quiet_or_not
def test_starttls_refused(
    scenario: ScenarioFactory, quiet: bool, starttls_options: dict[str, Any]
) -> None:
    hostile = standard_session(
        {"STARTTLS": reply(454, "4.7.0 TLS not available")}, extensions=STARTTLS_EXTENSIONS
    )
    sc = scenario(
        hostile,
        good_session(STARTTLS_EXTENSIONS),
        quiet=quiet,
        **starttls_options,
    )
    error = sc.send([message()], count=0, raises=NotSupportedError)
    if not quiet:
        assert error is not None and "454" in str(error)
    assert sc.server.wait_closed()
    assert verbs(sc.first) == [b"EHLO", b"STARTTLS"]
    assert b"AUTH" not in sc.first.received and b"MAIL" not in sc.first.received
    sc.finish()


@quiet_or_not
def test_starttls_response_injection(
    scenario: ScenarioFactory, quiet: bool, starttls_options: dict[str, Any]
) -> None:
    """Plaintext right after the 220 would be read as if it came under TLS: fail."""
    hostile = Script(
        [
            greet(),
            ehlo(STARTTLS_EXTENSIONS),
            expect(b"STARTTLS"),
            send(b"220 2.0.0 Ready to start TLS\r\n250-injected\r\n250 AUTH PLAIN\r\n"),
            starttls(),
            respond(extensions=STARTTLS_EXTENSIONS),
        ]
    )
    sc = scenario(
        hostile,
        good_session(STARTTLS_EXTENSIONS),
        quiet=quiet,
        **starttls_options,
    )
    error = sc.send([message()], count=0, raises=RemoteProtocolError)
    if not quiet:
        assert error is not None and "injection" in str(error)
    assert sc.server.wait_closed()
    assert verbs(sc.first) == [b"EHLO", b"STARTTLS"]
    assert not sc.first.tls
    assert b"AUTH" not in sc.first.received and b"MAIL" not in sc.first.received
    sc.finish()


@quiet_or_not
def test_starttls_not_advertised_but_required(
    scenario: ScenarioFactory, quiet: bool, starttls_options: dict[str, Any]
) -> None:
    sc = scenario(
        standard_session(),
        good_session(STARTTLS_EXTENSIONS),
        quiet=quiet,
        **starttls_options,
    )
    error = sc.send([message()], count=0, raises=NotSupportedError)
    if not quiet:
        assert error is not None and "does not offer STARTTLS" in str(error)
    assert sc.server.wait_closed()
    assert sc.first.received == b"EHLO " + LOCAL_HOSTNAME.encode() + b"\r\n"
    sc.finish()


# -- recipients ----------------------------------------------------------------------------


def test_every_second_recipient_refused(scenario: ScenarioFactory) -> None:
    rule = cycle(reply(250, "2.1.5 Ok"), reply(550, "5.1.1 No such user"))
    sc = scenario(standard_session({"RCPT": rule}), good_session(), **CREDENTIALS)
    msg = message(TO[:4])
    sc.send([msg], count=1)
    result = result_of(msg)
    assert result.status is SendStatus.PARTIAL
    assert result.error is None
    assert set(result.accepted) == {TO[0], TO[2]}
    assert set(result.refused) == {TO[1], TO[3]}
    assert {reply.code for reply in result.refused.values() if reply} == {550}
    assert sc.server.wait_closed()
    assert len(sc.first.messages) == 1
    sc.finish()


@quiet_or_not
@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "lockstep"])
def test_all_recipients_refused(scenario: ScenarioFactory, quiet: bool, pipelining: bool) -> None:
    """This server even answers DATA with 354 after refusing everyone (RFC 2920 allows it):
    the client ends the content at once, sending nothing of the message."""
    extensions = DEFAULT_EXTENSIONS if pipelining else NO_PIPELINING
    hostile = standard_session({"RCPT": reply(550, "5.1.1 No such user")}, extensions=extensions)
    sc = scenario(hostile, good_session(), quiet=quiet, **CREDENTIALS)
    msg = message(TO[:3])
    error = sc.send([msg], count=0, raises=RecipientsRefused)
    result = result_of(msg)
    assert result.status is SendStatus.REFUSED
    assert isinstance(error, RecipientsRefused)
    assert set(error.recipients) == set(TO[:3])
    assert {code for code, _ in error.recipients.values()} == {550}
    assert sc.server.wait_closed()
    assert all(content == b"" for content in sc.first.messages)
    assert b"Subject:" not in sc.first.received
    if not pipelining:
        assert b"DATA" not in sc.first.received
    sc.finish()


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "lockstep"])
def test_too_many_recipients_per_transaction(scenario: ScenarioFactory, pipelining: bool) -> None:
    def two_per_transaction(conn: Connection, line: bytes) -> None:
        if conn.txn_count("RCPT") > 2:
            conn.reply(452, "4.5.3 Error: too many recipients")
        else:
            conn.reply(250, "2.1.5 Ok")

    extensions = DEFAULT_EXTENSIONS if pipelining else NO_PIPELINING
    hostile = standard_session({"RCPT": two_per_transaction}, extensions=extensions)
    sc = scenario(hostile, good_session(), **CREDENTIALS)
    msg = message(TO)
    sc.send([msg], count=1)
    result = result_of(msg)
    assert result.status is SendStatus.SENT
    assert [r.status for r in result.recipients] == [RecipientStatus.DELIVERED] * len(TO)
    assert len(result.final_replies) == 3
    assert sc.server.wait_closed()
    assert len(sc.first.messages) == 3
    assert len(set(sc.first.messages)) == 1  # the same content each time
    accepted: list[list[bytes]] = []
    for line in sc.first.commands:
        if line.upper().startswith(b"MAIL"):
            accepted.append([])
        elif line.upper().startswith(b"RCPT"):
            accepted[-1].append(line.split(b"<")[1].rstrip(b">"))
    delivered = [b for group in accepted for b in group[:2]]
    assert sorted(delivered) == sorted(t.encode() for t in TO)
    sc.finish()


# -- end of data and disconnections --------------------------------------------------------


@quiet_or_not
@pytest.mark.parametrize("code", [554, 451])
def test_refused_at_end_of_data(scenario: ScenarioFactory, quiet: bool, code: int) -> None:
    hostile = standard_session({".": reply(code, f"{code // 100}.6.0 Message rejected")})
    sc = scenario(hostile, good_session(), quiet=quiet, **CREDENTIALS)
    msg = message(TO[:2])
    error = sc.send([msg], count=0, raises=DataError)
    result = result_of(msg)
    assert result.status is SendStatus.FAILED
    assert isinstance(error, DataError)
    assert isinstance(error, smtplib.SMTPDataError)
    assert error.smtp_code == code
    assert error.is_transient is (code == 451)
    assert error.is_permanent is (code == 554)
    assert [r.status for r in result.recipients] == [RecipientStatus.FAILED] * 2
    assert sc.server.wait_closed()
    assert len(sc.first.messages) == 1  # the server read it, then refused it
    sc.finish()


@quiet_or_not
def test_disconnect_after_mail(scenario: ScenarioFactory, quiet: bool) -> None:
    sc = scenario(standard_session({"MAIL": close()}), good_session(), quiet=quiet, **CREDENTIALS)
    msg = message()
    error = sc.send([msg], count=0, raises=ServerDisconnected)
    assert isinstance(error, ServerDisconnected)
    assert result_of(msg).status is SendStatus.FAILED
    assert sc.server.wait_closed()
    assert sc.first.messages == []
    assert sc.first.ended_by == "server"
    sc.finish()


@quiet_or_not
@pytest.mark.parametrize("size", ["64KB", "8MB"])
def test_disconnect_while_content_is_sent(
    scenario: ScenarioFactory, quiet: bool, size: str
) -> None:
    """The server resets the connection after 1000 bytes of content.  A small message may
    be all in the socket buffers by then (maybe received: unknown); a large one cannot."""
    rules: dict[str, Response] = {
        "DATA": [reply(354, "End data with <CR><LF>.<CR><LF>"), read_bytes(1000), close(reset=True)]
    }
    sc = scenario(standard_session(rules), good_session(), quiet=quiet, **CREDENTIALS)
    lines = 64 * 1024 // 79 if size == "64KB" else 8 * 1024 * 1024 // 79
    msg = message(body=("y" * 78 + "\n") * lines)
    error = sc.send([msg], count=0, raises=ServerDisconnected)
    assert isinstance(error, ServerDisconnected)
    status = result_of(msg).status
    if size == "8MB":
        assert status is SendStatus.FAILED
    else:
        assert status in (SendStatus.FAILED, SendStatus.UNKNOWN)
    assert sc.server.wait_closed()
    assert sc.first.messages == []
    sc.finish()


@quiet_or_not
def test_disconnect_after_content_before_final_reply(
    scenario: ScenarioFactory, quiet: bool
) -> None:
    sc = scenario(standard_session({".": close()}), good_session(), quiet=quiet, **CREDENTIALS)
    msg = message(TO[:2])
    error = sc.send([msg], count=0, raises=ServerDisconnected)
    result = result_of(msg)
    assert result.status is SendStatus.UNKNOWN  # maybe delivered: never "sent", never resent
    assert [r.status for r in result.recipients] == [RecipientStatus.UNKNOWN] * 2
    assert isinstance(error, ServerDisconnected)
    assert sc.server.wait_closed()
    assert len(sc.first.messages) == 1  # read in full, never acknowledged
    sc.finish()


MID_SESSION_421: dict[str, tuple[type[BaseException], SendStatus]] = {
    "MAIL": (SenderRefused, SendStatus.FAILED),
    "RCPT": (RecipientsRefused, SendStatus.REFUSED),
    "DATA": (DataError, SendStatus.FAILED),
}


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "lockstep"])
@pytest.mark.parametrize("verb", list(MID_SESSION_421))
def test_421_mid_session(scenario: ScenarioFactory, verb: str, pipelining: bool) -> None:
    """The server says 421 and hangs up: the error carries the 421, the session is over,
    and the same (open) backend goes on over a new connection."""
    extensions = DEFAULT_EXTENSIONS if pipelining else NO_PIPELINING
    rules: dict[str, Response] = {verb: [reply(421, "4.3.2 Service shutting down"), close()]}
    sc = scenario(standard_session(rules, extensions=extensions), good_session(), **CREDENTIALS)
    expected_error, expected_status = MID_SESSION_421[verb]
    assert sc.open() is True
    msg = message()
    error = sc.send([msg], count=0, raises=expected_error)
    result = result_of(msg)
    assert result.status is expected_status
    if isinstance(error, RecipientsRefused):
        assert error.recipients == {TO[0]: (421, b"4.3.2 Service shutting down")}
    else:
        assert isinstance(error, (SenderRefused, DataError))
        assert error.smtp_code == 421
    assert error.is_transient
    assert sc.session_client is not None and not sc.session_client.is_connected
    assert sc.server.wait_closed()
    assert b"Subject:" not in sc.first.received

    again = message(subject="after 421")
    sc.send([again], count=1)
    assert result_of(again).status is SendStatus.SENT
    assert len(sc.server.connections) == 2
    assert sc.server.connections[1].messages[0].count(b"Subject: after 421") == 1
    sc.finish()


@quiet_or_not
@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "lockstep"])
def test_421_after_some_recipients_were_accepted(
    scenario: ScenarioFactory, quiet: bool, pipelining: bool
) -> None:
    """421 at the second RCPT: no DATA can follow; the 421 stands for every later reply."""
    extensions = DEFAULT_EXTENSIONS if pipelining else NO_PIPELINING
    rule = cycle(reply(250, "2.1.5 Ok"), [reply(421, "4.3.2 Service shutting down"), close()])
    hostile = standard_session({"RCPT": rule}, extensions=extensions)
    sc = scenario(hostile, good_session(), quiet=quiet, **CREDENTIALS)
    msg = message(TO[:3])
    error = sc.send([msg], count=0, raises=DataError)
    assert isinstance(error, DataError)
    assert error.smtp_code == 421 and error.is_transient
    result = result_of(msg)
    assert result.status is SendStatus.FAILED
    assert [r.status for r in result.recipients] == [
        RecipientStatus.FAILED,
        RecipientStatus.REFUSED,
        RecipientStatus.REFUSED,
    ]
    assert [r.reply.code if r.reply else None for r in result.recipients] == [250, 421, 421]
    assert sc.server.wait_closed()
    assert sc.first.messages == []
    assert b"Subject:" not in sc.first.received
    sc.finish()


@pytest.mark.parametrize("verb", ["RCPT", "DATA"])
def test_421_mid_session_fail_silently_reconnects_for_next_message(
    scenario: ScenarioFactory, verb: str
) -> None:
    rules: dict[str, Response] = {verb: [reply(421, "4.3.2 Service shutting down"), close()]}
    sc = scenario(standard_session(rules), good_session(), quiet=True, **CREDENTIALS)
    first, second = message(subject="first"), message(subject="second")
    error = sc.send([first, second], count=1)
    assert isinstance(error, (RecipientsRefused, DataError))
    assert result_of(first).status is not SendStatus.SENT
    assert result_of(second).status is SendStatus.SENT
    assert sc.server.wait_closed(count=2)
    assert [len(c.messages) for c in sc.server.connections] == [0, 1]
    sc.finish()


@quiet_or_not
def test_size_exceeded(scenario: ScenarioFactory, quiet: bool) -> None:
    extensions = [e for e in DEFAULT_EXTENSIONS if not e.startswith("SIZE")] + ["SIZE 1000"]
    sc = scenario(
        standard_session(extensions=extensions),
        good_session(extensions),
        quiet=quiet,
        **CREDENTIALS,
    )
    msg = message(body="x" * 2000)
    error = sc.send([msg], count=0, raises=MessageTooLargeError)
    assert isinstance(error, MessageTooLargeError)
    assert error.limit == 1000 and error.size > 2000
    assert result_of(msg).status is SendStatus.FAILED
    assert sc.server.wait_closed()
    assert b"MAIL" not in sc.first.received
    sc.finish()


@quiet_or_not
@pytest.mark.parametrize(
    "address",
    ["a@", "a@[b", "x@example.com>\r\nRCPT TO:<evil@example.com", '"a\0b"@example.com'],
    ids=["no-domain", "unclosed-literal", "injection", "NUL"],
)
def test_unusable_envelope_address(scenario: ScenarioFactory, quiet: bool, address: str) -> None:
    """Refused before any byte of the transaction, even with fail_silently (as Django does:
    a bad address is the caller's error, not the server's); the session stays usable."""
    sc = scenario(standard_session(), quiet=quiet, **CREDENTIALS)
    msg = EmailMessage("s", BODY, "sender@example.com", [TO[0]], bcc=[address])
    started = time.monotonic()
    with pytest.raises(InvalidAddressError, match="Invalid address") as info:
        sc.deliver([msg])
    assert time.monotonic() - started < TIMEOUT + MARGIN
    assert isinstance(info.value, ValueError)
    result = result_of(msg)
    assert result.status is SendStatus.FAILED and result.error is info.value
    assert sc.server.wait_closed()
    assert b"MAIL" not in sc.first.received and b"evil" not in sc.first.received
    sc.finish()


# -- pipelining ----------------------------------------------------------------------------


def test_no_pipelining_unless_advertised(scenario: ScenarioFactory) -> None:
    sc = scenario(standard_session(extensions=NO_PIPELINING), probe=PROBE, **CREDENTIALS)
    messages = [message(TO[:3]), message(TO[3:])]
    sc.send(messages, count=2)
    assert [result_of(m).status for m in messages] == [SendStatus.SENT] * 2
    assert sc.server.wait_closed()
    assert not sc.first.pipelining_advertised
    assert sc.first.pipelined == []
    assert not sc.server.pipelined_violation
    assert len(sc.first.messages) == 2
    sc.finish()


def test_pipelining_when_advertised(scenario: ScenarioFactory) -> None:
    sc = scenario(standard_session(), probe=PROBE, **CREDENTIALS)
    msg = message(TO[:3])
    sc.send([msg], count=1)
    assert result_of(msg).status is SendStatus.SENT
    assert sc.server.wait_closed()
    assert sc.first.pipelining_advertised
    # MAIL, RCPT, RCPT, RCPT and DATA in one group: all but the last went before a reply.
    assert sc.first.pipelined == [b"MAIL", b"RCPT", b"RCPT", b"RCPT"]
    assert not sc.server.pipelined_violation
    sc.finish()


# -- implicit TLS --------------------------------------------------------------------------


def test_implicit_tls(scenario: ScenarioFactory, server_tls: ssl.SSLContext, ca_path: str) -> None:
    sc = scenario(
        standard_session(),
        tls_context=server_tls,
        implicit_tls=True,
        use_ssl=True,
        ssl_cafile=ca_path,
        auth_mechanisms=["PLAIN"],
        **CREDENTIALS,
    )
    msg = message(TO[:2])
    sc.send([msg], count=1)
    assert result_of(msg).status is SendStatus.SENT
    assert sc.server.wait_closed()
    assert sc.first.tls
    assert len(sc.first.messages) == 1
    assert secret_hits(sc.first.received) == 1  # PLAIN under TLS: sent once, legitimately
    assert "AUTH PLAIN [redacted]" in sc.caplog.text
    sc.finish(secret_on_wire=1)


@quiet_or_not
def test_implicit_tls_untrusted_certificate(
    scenario: ScenarioFactory, quiet: bool, server_tls: ssl.SSLContext, ca_path: str
) -> None:
    sc = scenario(
        standard_session(),
        tls_context=server_tls,
        implicit_tls=True,
        quiet=quiet,
        use_ssl=True,
        ssl_cafile=None,
        auth_mechanisms=["PLAIN"],
        **CREDENTIALS,
    )
    error = sc.send([message()], count=0, raises=TLSError)
    if not quiet:
        assert error is not None and "ssl_cafile" in str(error)
    assert sc.server.wait_closed()
    assert sc.first.tls_error is not None
    assert sc.first.received == b""
    # Reusable once told which CA to trust: a new backend, same server.
    sc.backend = EmailBackend(
        host=sc.server.host,
        port=sc.server.port,
        timeout=TIMEOUT,
        local_hostname=LOCAL_HOSTNAME,
        audit_log=False,
        use_ssl=True,
        ssl_cafile=ca_path,
        **CREDENTIALS,
    )
    sc.finish()
