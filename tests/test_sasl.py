"""SASL mechanisms against their RFC vectors, then every mechanism in every TLS mode (none,
STARTTLS, implicit TLS) through the backend's sync and async APIs, which must send the same
bytes and get the same results."""

from __future__ import annotations

import asyncio
import base64
import secrets
import ssl
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

import pytest
import trustme
from django.core.mail import EmailMessage

from django_socketmail.email_backend import EmailBackend
from django_socketmail.smtp import SendResult, SendStatus
from django_socketmail.smtp.config import SessionInfo
from django_socketmail.smtp.sasl import MECHANISMS, CramMD5, Login, Plain, UnexpectedChallenge
from django_socketmail.smtp.secret import Secret

from .hostile.server import Connection, HostileSMTPServer, standard_session
from .test_oauth import oauth_auth
from .test_scram import PASSWORD as SCRAM_PASSWORD
from .test_scram import USER as SCRAM_USER
from .test_scram import ScramServer, scram_auth


def test_cram_md5_rfc2195_vector() -> None:
    mechanism = CramMD5("tim", Secret("tanstaaftanstaaf"))
    assert mechanism.initial_response() is None
    response = mechanism.respond(b"<1896.697170952@postoffice.reston.mci.net>").reveal()
    assert base64.b64encode(response) == b"dGltIGI5MTNhNjAyYzdlZGE3YTQ5NWI0ZTZlNzMzNGQzODkw"
    with pytest.raises(UnexpectedChallenge):
        mechanism.respond(b"again")


def test_plain_rfc4616_message() -> None:
    mechanism = Plain("tim", Secret("tanstaaftanstaaf"))
    assert mechanism.initial_response() == Secret(b"\0tim\0tanstaaftanstaaf")


def test_plain_after_empty_challenge_then_no_more() -> None:
    mechanism = Plain("u", Secret("p"))
    mechanism.initial_response()
    assert mechanism.respond(b"").reveal() == b"\0u\0p"
    with pytest.raises(UnexpectedChallenge):
        mechanism.respond(b"")


def test_login_answers_by_order_not_text() -> None:
    mechanism = Login("user", Secret("secret"))
    assert mechanism.respond(b"Password:").reveal() == b"user"  # the text is irrelevant
    assert mechanism.respond(b"whatever").reveal() == b"secret"
    with pytest.raises(UnexpectedChallenge):
        mechanism.respond(b"Username:")


def test_utf8_credentials() -> None:
    initial = Plain("jürgen", Secret("pässwörd")).initial_response()
    assert initial is not None and initial.reveal() == "\0jürgen\0pässwörd".encode()
    response = CramMD5("jürgen", Secret("pässwörd")).respond(b"<1@x>").reveal()
    assert response.startswith("jürgen ".encode())


def test_registry_and_cleartext_flags() -> None:
    assert list(MECHANISMS) == [
        "SCRAM-SHA-256-PLUS",
        "SCRAM-SHA-256",
        "SCRAM-SHA-1",
        "CRAM-MD5",
        "PLAIN",
        "LOGIN",
        "XOAUTH2",
        "OAUTHBEARER",
    ]
    assert not CramMD5.sends_password and Plain.sends_password and Login.sends_password


def test_repr_hides_credentials() -> None:
    assert "secret" not in repr(Plain("user", Secret("secret")))


def test_responses_are_secrets_that_do_not_print() -> None:
    for response in (
        Plain("user", Secret("hunter22")).initial_response(),
        Login("user", Secret("hunter22")).respond(b"Username:"),
        CramMD5("user", Secret("hunter22")).respond(b"<1@x>"),
    ):
        assert isinstance(response, Secret)
        assert "hunter22" not in repr(response) and "hunter22" not in str(response)
        assert "user" not in f"{response}"


# -- every mechanism in every TLS mode, through both APIs -----------------------------------

TLS_MODES = ["none", "starttls", "implicit"]
WIRE_MECHANISMS = [m for m in MECHANISMS if not m.endswith("-PLUS")]  # -PLUS: test_oauth_wired
TOKEN = "sasl-wire-token"
EXTENSIONS = (
    "PIPELINING",
    "SIZE 10240000",
    "ENHANCEDSTATUSCODES",
    "AUTH " + " ".join(WIRE_MECHANISMS),
)
APIS = ["sync", "async"]
T = TypeVar("T")


def token_provider(username: str, force_refresh: bool = False) -> str:
    """The token provider of the wire tests below (by dotted path)."""
    return TOKEN


def run(awaitable: Awaitable[T]) -> T:
    """Run in a fresh event loop in asyncio's debug mode."""

    async def main() -> T:
        return await awaitable

    return asyncio.run(main(), debug=True)


def any_auth(conn: Connection, line: bytes) -> None:
    """AUTH as a server offering every mechanism: SCRAM checks the proof (ScramServer),
    the token mechanisms the token's format and value, the others as ``auth()``."""
    words = line.split()
    if len(words) > 1 and words[1].upper().startswith(b"SCRAM-"):
        scram_auth(lambda: ScramServer("sha256", {SCRAM_USER: SCRAM_PASSWORD}))(conn, line)
    else:
        oauth_auth({TOKEN})(conn, line)


@pytest.fixture
def fixed_randomness(monkeypatch: pytest.MonkeyPatch) -> None:
    """SCRAM's nonces and salt made constant (the client's and the test server's), so two
    conversations can be compared byte for byte."""
    monkeypatch.setattr(secrets, "token_urlsafe", lambda n=None: "fixed-client-nonce")
    monkeypatch.setattr(secrets, "token_bytes", lambda n=None: b"\x42" * (n or 32))


def converse(
    api: str, server: HostileSMTPServer, mechanism: str, tls: str, ca_path: str
) -> tuple[int, SendResult, SessionInfo]:
    """One message sent the ``api`` way, authenticating with ``mechanism``; the count, the
    result and what the session negotiated."""
    backend = EmailBackend(
        host=server.host,
        port=server.port,
        username=SCRAM_USER,
        password=SCRAM_PASSWORD,
        use_tls=tls == "starttls",
        use_ssl=tls == "implicit",
        ssl_cafile=ca_path,
        auth_mechanisms=[mechanism],
        allow_cleartext_auth=tls == "none",
        token_provider="tests.test_sasl.token_provider",
        timeout=5,
        audit_log=False,
        local_hostname="client.example",
    )
    message = EmailMessage(
        "wire",
        "Hello.\n",
        "from@example.com",
        ["to@example.com"],
        headers={"Message-ID": "<wire@example.com>", "Date": "Thu, 03 Dec 2026 12:00:00 +0000"},
    )
    if api == "sync":
        count = backend.send_messages([message])
        client = backend.last_client
    else:
        count = run(backend.asend_messages([message]))
        session = backend.last_async_session
        assert session is not None
        client = session.client
    backend.close()
    result = message.socketmail_result  # type: ignore[attr-defined]
    assert isinstance(result, SendResult)
    assert client is not None
    return count, result, client.info


def facts(info: SessionInfo) -> tuple[object, ...]:
    """What a session negotiated, comparable across the two drivers."""
    return (
        info.local_hostname,
        info.greeting,
        info.extensions,
        info.tls_version,
        info.tls_cipher,
        info.peer_certificate,
        info.auth_mechanism,
        info.auth_username,
        info.messages_sent,
    )


@pytest.mark.parametrize("tls", TLS_MODES)
@pytest.mark.parametrize("mechanism", WIRE_MECHANISMS)
def test_every_mechanism_in_every_tls_mode_alike_through_both_apis(
    mechanism: str,
    tls: str,
    server_tls: ssl.SSLContext,
    ca: trustme.CA,
    tmp_path: Path,
    fixed_randomness: None,
) -> None:
    """The sync API is the reference: the async one sends the same bytes (after TLS), gets
    the same count and result, and negotiates the same mechanism and TLS."""
    ca_path = str(tmp_path / "ca.pem")
    ca.cert_pem.write_to_path(ca_path)
    extensions = (*EXTENSIONS, "STARTTLS") if tls == "starttls" else EXTENSIONS
    server = HostileSMTPServer(
        [standard_session({"AUTH": any_auth}, extensions=extensions)],
        tls_context=server_tls if tls != "none" else None,
        implicit_tls=tls == "implicit",
    )
    server.scram_servers = []  # type: ignore[attr-defined]
    server.tokens_seen = []  # type: ignore[attr-defined]
    outcomes: dict[str, tuple[int, SendResult, SessionInfo]] = {}
    with server:
        for api in APIS:
            outcomes[api] = converse(api, server, mechanism, tls, ca_path)
        assert server.wait_closed(count=2)
        first, second = server.connections
    for count, result, info in outcomes.values():
        assert count == 1
        assert result.status is SendStatus.SENT and result.error is None
        assert info.auth_mechanism == mechanism
        assert (info.tls_version is not None) is (tls != "none")
    (_, sync, sync_info), (_, async_, async_info) = outcomes["sync"], outcomes["async"]
    assert [r.status for r in async_.recipients] == [r.status for r in sync.recipients]
    assert async_.queue_id == sync.queue_id
    assert facts(async_info) == facts(sync_info)
    assert first.tls is second.tls is (tls != "none")
    auth_lines = [c for c in first.commands if c.upper().startswith(b"AUTH ")]
    assert [line.split()[1].decode() for line in auth_lines] == [mechanism]
    assert second.received == first.received  # byte for byte, the same conversation
    assert len(first.messages) == len(second.messages) == 1
    if mechanism.startswith("SCRAM-"):
        assert [s.failure for s in server.scram_servers] == ["", ""]  # type: ignore[attr-defined]
    if mechanism in ("XOAUTH2", "OAUTHBEARER"):
        assert server.tokens_seen == [TOKEN, TOKEN]  # type: ignore[attr-defined]
    assert server.errors == [] and server.violations == []
