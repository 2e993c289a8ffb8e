"""OAuth 2.0 for SMTP AUTH: XOAUTH2 and OAUTHBEARER (RFC 7628) byte for byte, the token
cache (single flight, refresh before expiry, refresh once after a refusal), and whole
sessions against hostile servers: Microsoft 365's ``AUTH LOGIN XOAUTH2``, an error
challenge then 535, an error challenge twice, a provider that raises or hangs.

Sessions run through :class:`SMTPClient` with a configuration that carries the token
source (``_Config`` below, until ``ClientConfig`` has the field).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import json
import os
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import trustme

from django_socketmail.oauth_providers.cache import (
    TokenCache,
    TokenProviderTimeout,
    shared_cache,
)
from django_socketmail.smtp import (
    AuthenticationError,
    CleartextAuthError,
    NotSupportedError,
    SMTPClient,
)
from django_socketmail.smtp.config import ClientConfig, TLSMode
from django_socketmail.smtp.oauth import (
    TokenProviderError,
    TokenSource,
    check_token,
    describe_error_challenge,
)
from django_socketmail.smtp.sasl import AuthContext, OAuthBearer, XOAuth2
from django_socketmail.smtp.secret import Secret

from .hostile.server import Connection, HostileSMTPServer, auth, standard_session

# -- wire formats ---------------------------------------------------------------------------


def test_xoauth2_initial_response_matches_googles_example() -> None:
    token = Secret("ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg")
    initial = XOAuth2("someuser@example.com", token).initial_response()
    assert initial is not None
    assert initial.reveal() == (
        b"user=someuser@example.com\x01auth=Bearer ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg"
        b"\x01\x01"
    )
    assert base64.b64encode(initial.reveal()) == (
        b"dXNlcj1zb21ldXNlckBleGFtcGxlLmNvbQFhdXRoPUJlYXJlciB5YTI5LnZGOWRmdDRxbVRjMk52YjNSbGNr"
        b"QmhkSFJoZG1semRHRXVZMjl0Q2cBAQ=="
    )


def test_oauthbearer_initial_response_matches_rfc7628_section_4_1() -> None:
    context = AuthContext("server.example.com", 143)
    token = Secret("vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==")
    initial = OAuthBearer("user@example.com", token, context).initial_response()
    assert initial is not None
    assert base64.b64encode(initial.reveal()) == (
        b"bixhPXVzZXJAZXhhbXBsZS5jb20sAWhvc3Q9c2VydmVyLmV4YW1wbGUuY29tAXBvcnQ9MTQzAWF1dGg9QmVh"
        b"cmVyIHZGOWRmdDRxbVRjMk52YjNSbGNrQmhiSFJoZG1semRHRXVZMjl0Q2c9PQEB"
    )


def test_oauthbearer_escapes_the_user_name() -> None:
    initial = OAuthBearer("a,b=c", Secret("t"), AuthContext("h", 25)).initial_response()
    assert initial is not None and initial.reveal().startswith(b"n,a=a=2Cb=3Dc,\x01host=h\x01")


def test_error_challenge_answers_and_no_second_answer() -> None:
    error = base64.b64decode(
        "eyJzdGF0dXMiOiJpbnZhbGlkX3Rva2VuIiwic2NvcGUiOiJleGFtcGxlX3Njb3BlIiwib3BlbmlkLWNvbmZp"
        "Z3VyYXRpb24iOiJodHRwczovL2V4YW1wbGUuY29tLy53ZWxsLWtub3duL29wZW5pZC1jb25maWd1cmF0aW9u"
        "In0="
    )
    bearer = OAuthBearer("u", Secret("t"), AuthContext("h", 25))
    bearer.initial_response()
    assert bearer.respond(error).reveal() == b"\x01"  # RFC 7628 §3.2.3: AQ== on the wire
    assert bearer.error == "status 'invalid_token', scope 'example_scope'"
    xoauth2 = XOAuth2("u", Secret("t"))
    xoauth2.initial_response()
    assert xoauth2.respond(b'{"status":"401","schemes":"bearer"}').reveal() == b""
    assert xoauth2.error == "status '401'"
    from django_socketmail.smtp.sasl import UnexpectedChallenge

    for mechanism in (bearer, xoauth2):
        with pytest.raises(UnexpectedChallenge):
            mechanism.respond(error)


@pytest.mark.parametrize(
    ("payload", "said"),
    [
        (b"not json", "not JSON"),
        (b"[1]", "not a JSON object"),
        (b"{}", "without a status"),
        (b'{"status":"invalid\\u001b[31m"}', "status 'invalid?[31m'"),
    ],
)
def test_error_challenge_text_is_safe(payload: bytes, said: str) -> None:
    assert said in describe_error_challenge(payload)


@pytest.mark.parametrize(
    "bad", ["", "has space", "ctl\x01char", "new\nline", "é-accent", 42, None, b"bytes"]
)
def test_a_token_that_could_break_the_framing_is_refused(bad: object) -> None:
    with pytest.raises(TokenProviderError) as info:
        check_token(bad)
    if isinstance(bad, str) and bad:
        assert bad not in str(info.value)


def test_flags() -> None:
    for cls in (XOAuth2, OAuthBearer):
        assert cls.uses_token and cls.sends_password  # a bearer token needs TLS too
    assert "t0ken-value" not in repr(XOAuth2("u", Secret("t0ken-value")))


# -- the cache ------------------------------------------------------------------------------


@dataclass
class Provider:
    """A token provider that records its calls; ``tokens`` are returned in turn."""

    tokens: list[Any]
    delay: float = 0.0
    calls: list[tuple[str, bool]] = field(default_factory=list)
    release: threading.Event | None = None

    def __call__(self, username: str, force_refresh: bool = False) -> Any:
        self.calls.append((username, force_refresh))
        if self.release is not None:
            self.release.wait(10)
        if self.delay:
            time.sleep(self.delay)
        value = self.tokens[min(len(self.calls), len(self.tokens)) - 1]
        if isinstance(value, BaseException):
            raise value
        return value


def test_single_flight_many_callers_one_call() -> None:
    provider = Provider(["tok-1"], delay=0.3)
    cache = TokenCache(provider)
    got: list[Secret[str]] = []
    threads = [
        threading.Thread(target=lambda: got.append(cache.token("u", timeout=5))) for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert provider.calls == [("u", False)]
    assert [token.reveal() for token in got] == ["tok-1"] * 8
    assert cache.token("u", timeout=1).reveal() == "tok-1" and len(provider.calls) == 1


def test_refreshed_before_expiry() -> None:
    now = [1_000_000.0]
    provider = Provider([("tok-1", now[0] + 120), ("tok-2", now[0] + 3720)])
    cache = TokenCache(provider, clock=lambda: now[0])
    assert cache.token("u", timeout=1).reveal() == "tok-1"
    now[0] += 59  # 61 s left: still fresh
    assert cache.token("u", timeout=1).reveal() == "tok-1"
    now[0] += 2  # 59 s left: inside the 60 s margin
    assert cache.token("u", timeout=1).reveal() == "tok-2"
    assert provider.calls == [("u", False), ("u", False)]


def test_aware_datetime_expiry_and_per_user_tokens() -> None:
    soon = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=30)
    provider = Provider([("tok-a", soon), "tok-b", "tok-c"])
    cache = TokenCache(provider)
    assert cache.token("a", timeout=1).reveal() == "tok-a"
    assert cache.token("b", timeout=1).reveal() == "tok-b"
    assert cache.token("a", timeout=1).reveal() == "tok-c"  # 30 s left: refreshed
    assert [user for user, _ in provider.calls] == ["a", "b", "a"]


def test_a_rejected_token_is_refreshed_once_for_everyone() -> None:
    provider = Provider(["old", "new"], delay=0.2)
    cache = TokenCache(provider)
    old = cache.token("u", timeout=1)
    got: list[str] = []
    threads = [
        threading.Thread(
            target=lambda: got.append(cache.token("u", timeout=5, rejected=old).reveal())
        )
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert got == ["new"] * 4
    assert provider.calls == [("u", False), ("u", True)]
    # A caller that saw the old token refused later gets the new one without a call.
    assert cache.token("u", timeout=1, rejected=old).reveal() == "new"
    assert len(provider.calls) == 2


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        (("tok", "tomorrow"), "str as expires_at"),
        (("tok", datetime.datetime(2030, 1, 1)), "naive datetime"),
        (("tok", 1, 2), "tuple of 3 items"),
        ("tok with space", "not a bearer token"),
        (None, "returned NoneType"),
    ],
)
def test_unusable_answers_are_clear_errors(returned: object, message: str) -> None:
    with pytest.raises(TokenProviderError, match=message):
        TokenCache(Provider([returned])).token("u", timeout=1)


def test_a_provider_that_raises_is_chained_not_quoted() -> None:
    cache = TokenCache(Provider([RuntimeError("AADSTS7000215: client secret s3cr3t-value")]))
    with pytest.raises(TokenProviderError) as info:
        cache.token("u", timeout=1)
    assert "s3cr3t-value" not in str(info.value) and "RuntimeError" in str(info.value)
    assert isinstance(info.value.__cause__, RuntimeError)


def test_a_provider_that_hangs_costs_each_caller_its_timeout() -> None:
    release = threading.Event()
    provider = Provider(["late"], release=release)
    cache = TokenCache(provider)
    try:
        for _ in range(2):
            started = time.monotonic()
            with pytest.raises(TokenProviderTimeout, match=r"within 0\.3 s"):
                cache.token("u", timeout=0.3)
            assert 0.25 < time.monotonic() - started < 1.0
        assert len(provider.calls) == 1  # the second caller joined the same flight
        assert isinstance(TokenProviderTimeout("x"), TimeoutError)
    finally:
        release.set()
    deadline = time.monotonic() + 5
    while cache.token("u", timeout=1).reveal() != "late" and time.monotonic() < deadline:
        time.sleep(0.01)


def test_shared_cache_is_one_per_provider_and_hides_tokens() -> None:
    def provider(username: str, force_refresh: bool = False) -> str:
        return "hidden-token-value"

    cache = shared_cache(provider)
    assert shared_cache(provider) is cache
    assert cache.token("u", timeout=1).reveal() == "hidden-token-value"
    assert "hidden-token-value" not in repr(cache)
    assert "hidden-token-value" not in repr(cache.token("u", timeout=1))
    cache.forget("u")


def test_after_fork_the_child_does_not_wait_for_the_parents_flight() -> None:
    parent = os.getpid()
    release = threading.Event()

    def provider(username: str, force_refresh: bool = False) -> str:
        if os.getpid() == parent:
            release.wait(10)  # the parent's call hangs across the fork
            return "parent-token"
        return "child-token"

    cache = TokenCache(provider)
    waiter = threading.Thread(target=lambda: _swallow(lambda: cache.token("u", timeout=5)))
    waiter.start()
    while not cache._flights:
        time.sleep(0.01)
    pid = os.fork()
    if pid == 0:  # the child: its own flight, not the parent's dead one
        try:
            ok = cache.token("u", timeout=2).reveal() == "child-token"
        except BaseException:
            ok = False
        os._exit(0 if ok else 1)
    try:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        release.set()
        waiter.join()


def _swallow(call: Callable[[], object]) -> None:
    with contextlib.suppress(Exception):
        call()


# -- whole sessions against hostile servers -------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class _Config(ClientConfig):
    """ClientConfig with ``token_provider`` until the lead adds the field."""

    token_provider: TokenSource | None = field(default=None, repr=False)


USER = "mailer@contoso.example"
ERROR_JSON = json.dumps({"status": "401", "schemes": "bearer", "scope": "https://x/"}).encode()
_XOAUTH2 = re.compile(rb"user=([^\x01]*)\x01auth=Bearer ([^\x01]+)\x01\x01")
_OAUTHBEARER = re.compile(
    rb"n,a=([^,]*),\x01host=([^\x01]*)\x01port=([0-9]+)\x01auth=Bearer ([^\x01]+)\x01\x01"
)


def oauth_auth(valid: set[str], *, error_twice: bool = False, echo: bool = False) -> Any:
    """A rule for AUTH XOAUTH2/OAUTHBEARER that checks the initial response's exact format,
    accepts the tokens in ``valid``, and otherwise answers like Gmail: a 334 error JSON, then
    535 (or, with ``error_twice``, a second 334 error JSON)."""

    def run(conn: Connection, line: bytes) -> None:
        words = line.split()
        mechanism = words[1].upper() if len(words) > 1 else b""
        if mechanism not in (b"XOAUTH2", b"OAUTHBEARER"):
            auth()(conn, line)  # PLAIN, LOGIN, CRAM-MD5 as the standard server does
            return
        if len(words) != 3:
            conn.errors.append("no initial response")
            conn.reply(501, "5.5.2 initial response expected")
            return
        initial = base64.b64decode(words[2])
        match = (_XOAUTH2 if mechanism == b"XOAUTH2" else _OAUTHBEARER).fullmatch(initial)
        if match is None:
            conn.errors.append(f"malformed {mechanism!r} initial response")
            conn.reply(501, "5.5.2 malformed")
            return
        token = match.group(match.lastindex or 0).decode()
        conn.server.tokens_seen.append(token)  # type: ignore[attr-defined]
        if token in valid:
            conn.reply(235, "2.7.0 Accepted")
            return
        for _ in range(2 if error_twice else 1):
            conn.reply(334, base64.b64encode(ERROR_JSON))
            answer = conn.readline().strip()
            if answer == b"*":
                conn.reply(501, "5.7.0 Authentication cancelled")
                return
        quoted = f" {token} {words[2].decode()}" if echo else ""
        conn.reply(535, "5.7.8 Username and Password not accepted" + quoted)

    return run


@pytest.fixture(scope="module")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("oauth-ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


Start = Callable[..., tuple[HostileSMTPServer, SMTPClient]]


@pytest.fixture
def session(server_tls: ssl.SSLContext, ca_file: str) -> Iterator[Start]:
    """``session(provider, extensions=..., valid=..., **config)``: a hostile server that
    offers STARTTLS, and a connected-or-failed client; both closed after the test."""
    made: list[tuple[HostileSMTPServer, SMTPClient]] = []

    def start(
        provider: Provider | None,
        *,
        extensions: tuple[str, ...] = ("STARTTLS", "AUTH LOGIN XOAUTH2"),
        valid: frozenset[str] = frozenset({"good-token"}),
        error_twice: bool = False,
        echo: bool = False,
        tls: bool = True,
        **config: Any,
    ) -> tuple[HostileSMTPServer, SMTPClient]:
        rule = oauth_auth(set(valid), error_twice=error_twice, echo=echo)
        server = HostileSMTPServer(
            [standard_session({"AUTH": rule}, extensions=extensions)],
            tls_context=server_tls if tls else None,
        )
        server.tokens_seen = []  # type: ignore[attr-defined]
        server.start()
        options: dict[str, Any] = {
            "host": server.host,
            "port": server.port,
            "tls": TLSMode.STARTTLS if tls else TLSMode.NONE,
            "ssl_cafile": ca_file,
            "timeout": 2.0,
            "username": USER,
            "local_hostname": "client.example",
            "token_provider": TokenCache(provider) if provider is not None else None,
        }
        client = SMTPClient(_Config(**(options | config)))
        made.append((server, client))
        return server, client

    yield start
    for server, client in made:
        client.close()
        server.stop()


def _auths(server: HostileSMTPServer) -> list[bytes]:
    return [line.split()[1] for line in server.commands if line.upper().startswith(b"AUTH")]


def _forms(token: str, *initials: bytes) -> list[str]:
    return [token, base64.b64encode(token.encode()).decode()] + [
        base64.b64encode(initial).decode() for initial in initials
    ]


def _assert_hidden(client: SMTPClient, forms: list[str], *texts: str) -> None:
    transcript = "\n".join(str(line) for line in client.transcript.lines)
    for text in (transcript, *texts):
        for form in forms:
            assert form not in text


def test_microsoft_365_shape_uses_xoauth2_with_the_token(session: Start) -> None:
    provider = Provider(["good-token"])
    server, client = session(provider)
    client.connect()
    client.quit()
    assert _auths(server) == [b"XOAUTH2"]
    assert client.info.auth_mechanism == "XOAUTH2"
    assert provider.calls == [(USER, False)]
    assert server.tokens_seen == ["good-token"]  # type: ignore[attr-defined]
    initial = f"user={USER}\x01auth=Bearer good-token\x01\x01".encode()
    _assert_hidden(client, _forms("good-token", initial))
    assert any("AUTH XOAUTH2 [redacted]" in str(line) for line in client.transcript.lines)
    assert server.errors == [] and server.violations == []


def test_error_json_then_535_refreshes_once_and_retries_once(session: Start) -> None:
    provider = Provider(["expired-token", "good-token"])
    server, client = session(provider)
    client.connect()
    client.quit()
    assert _auths(server) == [b"XOAUTH2", b"XOAUTH2"]
    assert provider.calls == [(USER, False), (USER, True)]
    after_first = server.commands[
        server.commands.index(next(c for c in server.commands if c.startswith(b"AUTH"))) + 1
    ]
    assert after_first == b""  # XOAUTH2 answers the error challenge with an empty line
    assert server.tokens_seen == ["expired-token", "good-token"]  # type: ignore[attr-defined]
    transcript = "\n".join(str(line) for line in client.transcript.lines)
    assert "refused the OAuth token (status '401', scope 'https://x/')" in transcript
    _assert_hidden(client, _forms("expired-token") + _forms("good-token"))


def test_refused_twice_is_final_after_exactly_two_auths(session: Start) -> None:
    provider = Provider(["bad-1", "bad-2", "bad-3"])
    server, client = session(provider)
    with pytest.raises(AuthenticationError, match="also after a refresh") as info:
        client.connect()
    assert info.value.smtp_code == 535
    assert _auths(server) == [b"XOAUTH2", b"XOAUTH2"]
    assert provider.calls == [(USER, False), (USER, True)]
    assert server.wait_closed()
    _assert_hidden(client, _forms("bad-1") + _forms("bad-2"), str(info.value))


def test_oauthbearer_answers_the_error_with_aq(session: Start) -> None:
    provider = Provider(["expired-token", "good-token"])
    server, client = session(provider, extensions=("STARTTLS", "AUTH OAUTHBEARER PLAIN"))
    client.connect()
    client.quit()
    assert _auths(server) == [b"OAUTHBEARER", b"OAUTHBEARER"]
    assert b"AQ==" in server.commands
    assert server.errors == []


def test_error_json_twice_does_not_loop(session: Start) -> None:
    provider = Provider(["bad-1", "good-token"])
    server, client = session(provider, error_twice=True)
    with pytest.raises(AuthenticationError, match="unexpected extra step") as info:
        client.connect()
    assert info.value.smtp_code == 501
    assert _auths(server) == [b"XOAUTH2"]  # cancelled: no retry, no loop
    after = server.commands[[c[:4] for c in server.commands].index(b"AUTH") + 1 :]
    assert after[:2] == [b"", b"*"]
    assert provider.calls == [(USER, False)]


def test_a_provider_that_raises_sends_no_auth(session: Start) -> None:
    server, client = session(Provider([RuntimeError("boom s3cr3t")]))
    with pytest.raises(TokenProviderError) as info:
        client.connect()
    assert "s3cr3t" not in str(info.value)
    assert server.wait_closed()
    assert _auths(server) == []


def test_a_provider_that_hangs_is_bounded_by_the_timeout(session: Start) -> None:
    release = threading.Event()
    server, client = session(Provider(["late"], release=release), timeout=0.5)
    started = time.monotonic()
    try:
        with pytest.raises(TokenProviderTimeout):
            client.connect()
        assert time.monotonic() - started < 0.5 + 1.0  # the handshake and EHLOs, then 0.5 s
    finally:
        release.set()
    assert server.wait_closed()
    assert _auths(server) == []


def test_token_mechanisms_first_but_auth_mechanisms_restricts(session: Start) -> None:
    extensions = ("STARTTLS", "AUTH PLAIN LOGIN XOAUTH2")
    server, client = session(Provider(["good-token"]), extensions=extensions, password="pw")
    client.connect()
    client.quit()
    assert _auths(server) == [b"XOAUTH2"]
    server, client = session(
        Provider(["good-token"]), extensions=extensions, password="pw", auth_mechanisms=("PLAIN",)
    )
    client.connect()
    client.quit()
    assert _auths(server) == [b"PLAIN"]
    server, client = session(None, extensions=extensions, password="pw")
    client.connect()
    client.quit()
    assert _auths(server) == [b"PLAIN"]  # no token source: XOAUTH2 is not a candidate


def test_only_xoauth2_offered_without_a_token_provider_says_so(session: Start) -> None:
    server, client = session(None, extensions=("STARTTLS", "AUTH XOAUTH2"), password="pw")
    with pytest.raises(
        NotSupportedError, match=r"XOAUTH2 needs an OAuth 2\.0 token: set token_provider"
    ):
        client.connect()
    assert _auths(server) == []


def test_a_token_is_not_sent_without_tls(session: Start) -> None:
    provider = Provider(["good-token"])
    server, client = session(provider, extensions=("AUTH XOAUTH2",), tls=False)
    with pytest.raises(CleartextAuthError, match="an OAuth token unencrypted"):
        client.connect()
    assert _auths(server) == [] and provider.calls == []


def test_an_echoed_token_is_redacted(session: Start) -> None:
    provider = Provider(["echo-token-1", "echo-token-2"])
    _server, client = session(provider, echo=True)
    with pytest.raises(AuthenticationError) as info:
        client.connect()
    assert "[redacted]" in str(info.value)
    initials = [
        f"user={USER}\x01auth=Bearer {t}\x01\x01".encode() for t in ("echo-token-1", "echo-token-2")
    ]
    _assert_hidden(
        client,
        _forms("echo-token-1", initials[0]) + _forms("echo-token-2", initials[1]),
        str(info.value),
        repr(info.value.args),
    )
