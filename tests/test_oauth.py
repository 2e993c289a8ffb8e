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


def test_every_waiter_gets_its_own_error_from_one_failed_call() -> None:
    provider = Provider([TokenProviderError("Microsoft identity platform: invalid_client")])
    provider.delay = 0.2
    cache = TokenCache(provider)
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            cache.token("u", timeout=5)
        except TokenProviderError as error:
            errors.append(error)

    threads = [threading.Thread(target=wait) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(provider.calls) == 1
    assert [str(e) for e in errors] == ["Microsoft identity platform: invalid_client"] * 3
    assert len({id(e) for e in errors}) == 3


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


def oauth_auth(
    valid: set[str],
    *,
    error_twice: bool = False,
    echo: bool = False,
    hang_up: bool = False,
    final: Any = None,
) -> Any:
    """A rule for AUTH XOAUTH2/OAUTHBEARER that checks the initial response's exact format,
    accepts the tokens in ``valid``, and otherwise answers like Gmail: a 334 error JSON, then
    535 (or, with ``error_twice``, a second 334 error JSON; with ``final``, that response).
    Other mechanisms go to the standard ``auth()`` rule."""

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
        if hang_up:
            conn.close()
            return
        if token in valid:
            conn.reply(235, "2.7.0 Accepted")
            return
        for _ in range(2 if error_twice else 1):
            conn.reply(334, base64.b64encode(ERROR_JSON))
            answer = conn.readline().strip()
            if answer == b"*":
                conn.reply(501, "5.7.0 Authentication cancelled")
                return
        if final is not None:  # a hostile ending instead of the 535 (a Response)
            conn.run(final, line)
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
        hang_up: bool = False,
        tls: bool = True,
        **config: Any,
    ) -> tuple[HostileSMTPServer, SMTPClient]:
        rule = oauth_auth(set(valid), error_twice=error_twice, echo=echo, hang_up=hang_up)
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


# -- the option -----------------------------------------------------------------------------


def module_provider(username: str, force_refresh: bool = False) -> str:
    """A provider importable by dotted path."""
    return "module-token"


def test_token_provider_option_takes_a_callable_or_its_dotted_path() -> None:
    from django.core.exceptions import ImproperlyConfigured

    from django_socketmail.conf import resolve_options
    from django_socketmail.email_backend import EmailBackend

    source = "MAILERS['ms365']['OPTIONS']"
    for value in (module_provider, "tests.test_oauth.module_provider", None):
        resolve_options({"token_provider": value}, from_mailers=True, source=source)
    EmailBackend(token_provider="tests.test_oauth.module_provider").close()
    with pytest.raises(ImproperlyConfigured, match=r"\['token_provider'\]: cannot import"):
        resolve_options({"token_provider": "tests.nowhere.f"}, from_mailers=True, source=source)
    with pytest.raises(ImproperlyConfigured, match="expected a callable or its dotted path"):
        resolve_options({"token_provider": 42}, from_mailers=True, source=source)


# -- ready providers (the oauth extra) against a local token endpoint -----------------------


class TokenEndpoint:
    """A local HTTPS server that answers like Microsoft Entra's (OpenID discovery, the v2.0
    token endpoint: client credentials and refresh tokens, rotated) and Google's (refresh
    token, and a service account's signed JWT, checked with its public key)."""

    CLIENT = ("app-id", "app-secret")

    def __init__(self, cert: trustme.LeafCert, google_key: Any) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.requests: list[tuple[str, dict[str, str]]] = []
        self.issued: list[str] = []
        self.refresh_tokens = {"rt-1"}
        self.google_key = google_key
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                endpoint.answer(self, "GET", {})

            def do_POST(self) -> None:
                from urllib.parse import parse_qsl

                length = int(self.headers.get("Content-Length") or 0)
                form = dict(parse_qsl(self.rfile.read(length).decode()))
                endpoint.answer(self, "POST", form)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        cert.configure_cert(context)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.base = f"https://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()

    def _issue(self, prefix: str) -> str:
        token = f"{prefix}-{len(self.issued) + 1}"
        self.issued.append(token)
        return token

    def answer(self, handler: Any, method: str, form: dict[str, str]) -> None:
        path = handler.path.split("?")[0]
        self.requests.append((path, form))
        status, body = self._route(method, path, form)
        data = json.dumps(body).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def _route(self, method: str, path: str, form: dict[str, str]) -> tuple[int, Any]:
        parts = path.strip("/").split("/")
        if method == "GET" and path.endswith("/v2.0/.well-known/openid-configuration"):
            tenant = f"{self.base}/{parts[0]}"
            return 200, {
                "token_endpoint": f"{tenant}/oauth2/v2.0/token",
                "authorization_endpoint": f"{tenant}/oauth2/v2.0/authorize",
                "issuer": f"{tenant}/v2.0",
            }
        if method == "POST" and path.endswith("/oauth2/v2.0/token"):
            return self._entra(form)
        if method == "POST" and path == "/google/token":
            return self._google(form)
        return 404, {"error": "not_found"}

    def _entra(self, form: dict[str, str]) -> tuple[int, Any]:
        grant = form.get("grant_type")
        if grant == "client_credentials":
            if (form.get("client_id"), form.get("client_secret")) != self.CLIENT:
                return 401, {
                    "error": "invalid_client",
                    "error_description": "AADSTS7000215: Invalid client secret provided.\r\n"
                    "Trace ID: 0000",
                }
            assert form.get("scope") == "https://outlook.office365.com/.default"
            return 200, {
                "token_type": "Bearer",
                "expires_in": 3599,
                "access_token": self._issue("ms"),
            }
        if grant == "refresh_token":
            if form.get("refresh_token") not in self.refresh_tokens:
                return 400, {
                    "error": "invalid_grant",
                    "error_description": "AADSTS70008: The refresh token has expired.",
                }
            self.refresh_tokens = {f"rt-{len(self.issued) + 2}"}
            return 200, {
                "token_type": "Bearer",
                "expires_in": 3599,
                "scope": "https://outlook.office.com/SMTP.Send",
                "access_token": self._issue("msd"),
                "refresh_token": next(iter(self.refresh_tokens)),
            }
        return 400, {"error": "unsupported_grant_type"}

    def _google(self, form: dict[str, str]) -> tuple[int, Any]:
        grant = form.get("grant_type")
        if grant == "refresh_token":
            if form.get("refresh_token") != "g-refresh" or form.get("client_secret") != "g-secret":
                return 400, {
                    "error": "invalid_grant",
                    "error_description": "Token has been expired or revoked.",
                }
            return 200, {
                "access_token": self._issue("ya29.g"),
                "expires_in": 3599,
                "token_type": "Bearer",
            }
        if grant == "urn:ietf:params:oauth:grant-type:jwt-bearer":
            claims = self._verified_jwt(form["assertion"])
            assert claims["scope"] == "https://mail.google.com/"
            assert claims["aud"] == "https://oauth2.googleapis.com/token"  # as Google wants
            return 200, {
                "access_token": self._issue(f"ya29.sa.{claims['sub']}"),
                "expires_in": 3599,
            }
        return 400, {"error": "unsupported_grant_type"}

    def _verified_jwt(self, assertion: str) -> dict[str, Any]:
        header, payload, signature = assertion.split(".")

        def unb64(part: str) -> bytes:
            return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))

        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        self.google_key.public_key().verify(
            unb64(signature), f"{header}.{payload}".encode(), padding.PKCS1v15(), hashes.SHA256()
        )
        return dict(json.loads(unb64(payload)))


@pytest.fixture(scope="module")
def google_key() -> Any:
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def endpoint(
    ca: trustme.CA, google_key: Any, monkeypatch: pytest.MonkeyPatch
) -> Iterator[TokenEndpoint]:
    # requests lets these override a session's own CA bundle (``verify=``).
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    server = TokenEndpoint(ca.issue_cert("127.0.0.1"), google_key)
    yield server
    server.close()


def test_microsoft_client_credentials_through_msal(endpoint: TokenEndpoint, ca_file: str) -> None:
    from django_socketmail.oauth_providers import microsoft

    provider = microsoft.client_credentials(
        tenant_id="contoso-tenant",
        client_id="app-id",
        client_secret="app-secret",
        authority=f"{endpoint.base}/contoso-tenant",
        validate_authority=False,
        instance_discovery=False,
        verify=ca_file,
    )
    token, expires_at = provider(USER)
    assert token == "ms-1" and 3500 < expires_at - time.time() <= 3600
    assert provider(USER)[0] == "ms-1"  # MSAL's own cache
    assert provider(USER, force_refresh=True)[0] == "ms-2"
    posts = [form for path, form in endpoint.requests if form]
    assert [form["grant_type"] for form in posts] == ["client_credentials"] * 2


def test_microsoft_wrong_secret_is_entras_error_without_the_secret(
    endpoint: TokenEndpoint, ca_file: str
) -> None:
    from django_socketmail.oauth_providers import microsoft

    provider = microsoft.client_credentials(
        tenant_id="t",
        client_id="app-id",
        client_secret="not-the-secret",
        authority=f"{endpoint.base}/t",
        validate_authority=False,
        instance_discovery=False,
        verify=ca_file,
    )
    with pytest.raises(TokenProviderError) as info:
        TokenCache(provider).token(USER, timeout=10)
    assert str(info.value) == (
        "Microsoft identity platform: invalid_client: "
        "AADSTS7000215: Invalid client secret provided."
    )
    assert "not-the-secret" not in str(info.value)


def test_microsoft_refresh_token_rotates(endpoint: TokenEndpoint, ca_file: str) -> None:
    from django_socketmail.oauth_providers import microsoft

    provider = microsoft.refresh_token(
        client_id="public-app",
        refresh_token="rt-1",
        authority=f"{endpoint.base}/organizations",
        validate_authority=False,
        instance_discovery=False,
        verify=ca_file,
    )
    assert provider(USER)[0] == "msd-1"
    assert provider(USER)[0] == "msd-2"  # the rotated refresh token was used
    sent = [form["refresh_token"] for _, form in endpoint.requests if form]
    assert sent == ["rt-1", "rt-2"]


def test_google_refresh_token_and_service_account(
    endpoint: TokenEndpoint, google_key: Any, ca_file: str
) -> None:
    import requests
    from cryptography.hazmat.primitives import serialization
    from google.auth.transport.requests import Request

    from django_socketmail.oauth_providers import google

    session = requests.Session()
    session.verify = ca_file
    request = Request(session)
    provider = google.refresh_token(
        client_id="g-client",
        client_secret="g-secret",
        refresh_token="g-refresh",
        token_uri=f"{endpoint.base}/google/token",
        request=request,
    )
    token, expiry = provider(USER)
    assert token == "ya29.g-1" and expiry is not None and expiry.tzinfo is not None
    cache = TokenCache(provider)
    assert cache.token(USER, timeout=10).reveal() == "ya29.g-2"
    pem = google_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    info = {
        "type": "service_account",
        "client_email": "mailer@project.iam.gserviceaccount.com",
        "private_key": pem,
        "private_key_id": "k1",
        "token_uri": f"{endpoint.base}/google/token",
    }
    delegated = google.service_account(info=info, request=request)
    assert delegated("alice@example.com")[0] == "ya29.sa.alice@example.com-3"
    bad = google.refresh_token(
        client_id="g-client",
        client_secret="wrong",
        refresh_token="g-refresh",
        token_uri=f"{endpoint.base}/google/token",
        request=request,
    )
    with pytest.raises(TokenProviderError, match="invalid_grant") as error:
        bad(USER)
    assert "wrong" not in str(error.value)


def test_microsoft_token_through_an_m365_shaped_session(
    endpoint: TokenEndpoint, ca_file: str, session: Start
) -> None:
    """The whole path: MSAL gets a token from the (local) token endpoint, the cache keeps
    it, XOAUTH2 carries it, and the server accepts exactly what the endpoint issued."""
    from django_socketmail.oauth_providers import microsoft

    provider = microsoft.client_credentials(
        tenant_id="t",
        client_id="app-id",
        client_secret="app-secret",
        authority=f"{endpoint.base}/t",
        validate_authority=False,
        instance_discovery=False,
        verify=ca_file,
    )
    server, client = session(None, valid=frozenset({"ms-1"}), token_provider=TokenCache(provider))
    client.connect()
    client.quit()
    assert server.tokens_seen == ["ms-1"]  # type: ignore[attr-defined]
    assert _auths(server) == [b"XOAUTH2"]


def _connect(client: SMTPClient) -> BaseException:
    """The error ``client.connect()`` raises, caught here so that the traceback starts in
    this frame, whose only local is the client (a test's locals would show its tokens)."""
    try:
        client.connect()
    except Exception as error:
        return error
    raise AssertionError("connect() succeeded")


@pytest.mark.parametrize("debug", [True, False], ids=["DEBUG", "production"])
@pytest.mark.parametrize("ending", ["refused twice", "hang-up after the token"])
def test_no_token_in_django_error_reports(session: Start, debug: bool, ending: str) -> None:
    """Django's technical 500 page and AdminEmailHandler's report, locals included, hold no
    form of either token (raw, base64, the base64 initial response).  The tokens are random,
    so the report's source excerpts cannot hold them either."""
    import secrets

    from django.test import override_settings
    from django.views.debug import ExceptionReporter

    tokens = [f"report-{secrets.token_hex(8)}" for _ in range(2)]
    if ending == "refused twice":
        server, client = session(Provider(list(tokens)), echo=True)
    else:
        server, client = session(Provider(list(tokens)), hang_up=True)
    error = _connect(client)
    assert server.tokens_seen  # type: ignore[attr-defined]  # a token did cross the wire
    with override_settings(DEBUG=debug):
        reporter = ExceptionReporter(None, type(error), error, error.__traceback__)
        html, text = reporter.get_traceback_html(), reporter.get_traceback_text()
    assert "Local vars" in html
    forms = [
        form
        for token in tokens
        for form in _forms(token, f"user={USER}\x01auth=Bearer {token}\x01\x01".encode())
    ]
    found = [form for form in forms if form in html or form in text]
    assert found == []


# -- a command as the provider (sendtestmail --token-command) -------------------------------


def test_token_command_prints_the_token_and_sees_the_user_and_refresh(tmp_path: Any) -> None:
    import sys

    from django_socketmail.oauth_providers.command import command

    script = tmp_path / "token.py"
    script.write_text(
        "import os\nprint(f\"cmd-{os.environ['SOCKETMAIL_USER'].split('@')[0]}-"
        "{os.environ['SOCKETMAIL_FORCE_REFRESH']}\")\n"
    )
    provider = command(f"{sys.executable} {script}")
    assert provider("alice@example.com") == "cmd-alice-0"
    assert provider("alice@example.com", force_refresh=True) == "cmd-alice-1"
    assert TokenCache(provider).token("bob", timeout=10).reveal() == "cmd-bob-0"


@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("import sys; print('s3cr3t', file=sys.stderr); sys.exit(3)", "exited with status 3"),
        ("pass", "printed nothing"),
        ("import time; time.sleep(5)", "did not finish within 0.5 s"),
    ],
)
def test_token_command_failures_are_clear_and_quiet(code: str, message: str) -> None:
    import sys

    from django_socketmail.oauth_providers.command import command

    provider = command(f"{sys.executable} -c {json.dumps(code)}", timeout=0.5)
    with pytest.raises(TokenProviderError, match=message) as info:
        TokenCache(provider).token("u", timeout=10)
    assert "s3cr3t" not in str(info.value)


def test_token_command_not_found_or_empty() -> None:
    from django_socketmail.oauth_providers.command import command

    with pytest.raises(TokenProviderError, match="was not found"):
        command("/nonexistent/token-helper --json")("u")
    with pytest.raises(ValueError, match="empty"):
        command("  ")


def test_microsoft_providers_reach_the_network_only_when_a_token_is_asked_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """MSAL looks the authority up over HTTP when its application is made: at settings load
    (the README's ``myproject.mail_tokens`` module) that made the backend's construction
    fail without the network.  The application is made at the first token request now."""
    import msal

    from django_socketmail.oauth_providers import microsoft
    from django_socketmail.smtp.oauth import TokenProviderError

    made: list[str] = []

    class Unreachable:
        def __init__(self, client_id: str, **kwargs: object) -> None:
            made.append(client_id)
            raise ConnectionError("login.microsoftonline.com: name not known")

    monkeypatch.setattr(msal, "ConfidentialClientApplication", Unreachable)
    monkeypatch.setattr(msal, "PublicClientApplication", Unreachable)
    app_only = microsoft.client_credentials(tenant_id="t", client_id="app", client_secret="s")
    delegated = microsoft.refresh_token(client_id="user-app", refresh_token="r")
    assert made == []  # nothing at import time
    for provider in (app_only, delegated):
        with pytest.raises(TokenProviderError, match="not reachable: ConnectionError"):
            provider("mailer@contoso.example")
    assert made == ["app", "user-app"]


def test_the_token_provider_does_not_hold_the_event_loop(
    server_tls: ssl.SSLContext, ca_file: str
) -> None:
    """The async driver asks the provider in a thread, for the first token and for a newer
    one after a 535 (a sans-I/O request of the engine, not a call inside the reply's
    handling on the loop), so the loop keeps turning during the provider's (HTTP)
    requests; the refresh used to run on the loop."""
    import asyncio
    import contextlib

    from django_socketmail.smtp.aio import AsyncSMTPClient

    provider = Provider(["expired-token", "good-token"], delay=0.4)
    rule = oauth_auth({"good-token"})
    with HostileSMTPServer(
        [standard_session({"AUTH": rule}, extensions=("AUTH XOAUTH2",))]
    ) as server:
        server.tokens_seen = []  # type: ignore[attr-defined]
        config = _Config(
            host=server.host,
            port=server.port,
            tls=TLSMode.NONE,
            timeout=3.0,
            username=USER,
            local_hostname="client.example",
            allow_cleartext_auth=True,
            token_provider=TokenCache(provider),
        )

        async def main() -> tuple[int, float]:
            gaps: list[float] = []

            async def ticker() -> None:
                loop = asyncio.get_running_loop()
                last = loop.time()
                while True:
                    await asyncio.sleep(0.01)
                    now = loop.time()
                    gaps.append(now - last)
                    last = now

            ticking = asyncio.create_task(ticker())
            client = AsyncSMTPClient(config)
            try:
                await client.connect()
                await client.quit()
            finally:
                client.close()
                ticking.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ticking
            return len(gaps), max(gaps)

        ticks, longest = asyncio.run(main())
    assert provider.calls == [(USER, False), (USER, True)]
    assert server.tokens_seen == ["expired-token", "good-token"]  # type: ignore[attr-defined]
    assert longest < 0.2, f"the loop stood still for {longest:.2f} s"
    assert ticks >= 40
