"""XOAUTH2 and OAUTHBEARER checked by a real server: Postfix's submission port with Dovecot
SASL, whose ``oauth2`` passdb validates each token at an introspection endpoint (RFC 7662)
served by this test.  An expired token must cost exactly one refresh and one retry.

Sessions run through :class:`SMTPClient` with a configuration carrying the token source
(``_Config``, until ``ClientConfig`` has the field)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl

import pytest

from django_socketmail.oauth_providers.cache import TokenCache
from django_socketmail.smtp import AuthenticationError, SMTPClient
from django_socketmail.smtp.config import ClientConfig, TLSMode
from django_socketmail.smtp.oauth import TokenSource
from tests.interop.conftest import require_rig
from tests.interop.rig import PostfixRig

ORIGINAL_MECHANISMS = "auth_mechanisms = plain login cram-md5\n"
ORIGINAL_PASSDB = "passdb {\n  driver = passwd-file\n"


class Introspection:
    """An RFC 7662 introspection endpoint on 127.0.0.1: tokens in ``active`` map to a user
    name; any other token is ``{"active": false}``.  Records every token it was asked."""

    def __init__(self) -> None:
        self.active: dict[str, str] = {}
        self.asked: list[str] = []
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                form = dict(parse_qsl(self.rfile.read(length).decode()))
                token = form.get("token", "")
                endpoint.asked.append(token)
                user = endpoint.active.get(token)
                body = {"active": True, "username": user} if user else {"active": False}
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/introspect"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


class OAuthRig(PostfixRig):
    """The rig, with XOAUTH2 and OAUTHBEARER through Dovecot's ``oauth2`` passdb."""

    introspection_url = ""

    def _write_dovecot(self) -> None:
        super()._write_dovecot()
        conf = self.dovecot_dir / "dovecot.conf"
        text = conf.read_text(encoding="utf-8")
        assert text.count(ORIGINAL_MECHANISMS) == 1 and text.count(ORIGINAL_PASSDB) == 1
        oauth2 = self.dovecot_dir / "oauth2.conf.ext"
        oauth2.write_text(
            f"introspection_mode = post\n"
            f"introspection_url = {self.introspection_url}\n"
            "force_introspection = yes\n"
            "username_attribute = username\n"
            "active_attribute = active\n"
            "active_value = true\n",
            encoding="utf-8",
        )
        text = text.replace(
            ORIGINAL_MECHANISMS,
            ORIGINAL_MECHANISMS.rstrip("\n") + " xoauth2 oauthbearer\n",
        ).replace(
            ORIGINAL_PASSDB,
            "passdb {\n  driver = oauth2\n  mechanisms = xoauth2 oauthbearer\n"
            f"  args = {oauth2}\n}}\n" + ORIGINAL_PASSDB,
        )
        conf.write_text(text, encoding="utf-8")


@pytest.fixture(scope="module")
def introspection() -> Iterator[Introspection]:
    endpoint = Introspection()
    yield endpoint
    endpoint.close()


@pytest.fixture(scope="module")
def oauth_rig(introspection: Introspection) -> Iterator[OAuthRig]:
    require_rig()
    rig = OAuthRig()
    rig.introspection_url = introspection.url
    rig.start()
    try:
        yield rig
    finally:
        rig.stop()


@dataclass(frozen=True, slots=True, kw_only=True)
class _Config(ClientConfig):
    token_provider: TokenSource | None = field(default=None, repr=False)


@dataclass
class Provider:
    tokens: list[str]
    calls: list[bool] = field(default_factory=list)

    def __call__(self, username: str, force_refresh: bool = False) -> str:
        self.calls.append(force_refresh)
        return self.tokens[min(len(self.calls), len(self.tokens)) - 1]


@pytest.fixture
def connect(oauth_rig: OAuthRig, introspection: Introspection) -> Iterator[Any]:
    clients: list[SMTPClient] = []
    introspection.asked.clear()
    introspection.active.clear()

    def make(provider: Provider, *mechanisms: str) -> SMTPClient:
        client = SMTPClient(
            _Config(
                host=oauth_rig.server_hostname,
                port=oauth_rig.submission_port,
                tls=TLSMode.STARTTLS,
                ssl_cafile=str(oauth_rig.ca_cert_path),
                username="alice",
                timeout=10,
                local_hostname="client.test",
                auth_mechanisms=mechanisms,
                token_provider=TokenCache(provider),
            )
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def _auth_lines(client: SMTPClient) -> list[str]:
    return [str(line) for line in client.transcript.lines if str(line).startswith("C: AUTH")]


@pytest.mark.parametrize("mechanism", ["XOAUTH2", "OAUTHBEARER"])
def test_dovecot_accepts_a_valid_token(
    connect: Any, introspection: Introspection, mechanism: str
) -> None:
    introspection.active["valid-token-1"] = "alice"
    provider = Provider(["valid-token-1"])
    client = connect(provider, mechanism)
    client.connect()
    assert client.info.auth_mechanism == mechanism
    client.quit()
    assert introspection.asked == ["valid-token-1"]
    assert provider.calls == [False]


@pytest.mark.parametrize("mechanism", ["XOAUTH2", "OAUTHBEARER"])
def test_an_expired_token_costs_one_refresh_and_one_retry(
    connect: Any, introspection: Introspection, mechanism: str
) -> None:
    introspection.active["fresh-token-2"] = "alice"
    provider = Provider(["expired-token-1", "fresh-token-2"])
    client = connect(provider, mechanism)
    client.connect()
    client.quit()
    assert introspection.asked == ["expired-token-1", "fresh-token-2"]
    assert provider.calls == [False, True]
    assert _auth_lines(client) == [f"C: AUTH {mechanism} [redacted]"] * 2
    text = "\n".join(str(line) for line in client.transcript.lines)
    assert "expired-token-1" not in text and "fresh-token-2" not in text
    # Dovecot's error challenge (RFC 7628 §3.2.2 JSON), answered, then its 535:
    said = "status '401', scope 'mail'" if mechanism == "XOAUTH2" else "status 'invalid_token'"
    assert f"the server refused the OAuth token ({said})" in text, text  # Dovecot 2.3's words
    answer = "C: [redacted]"  # the empty line (XOAUTH2) or AQ== (OAUTHBEARER), as sent
    assert text.count(answer) >= 1


def test_a_token_refused_twice_is_final(connect: Any, introspection: Introspection) -> None:
    provider = Provider(["revoked-1", "revoked-2", "revoked-3"])
    client = connect(provider, "XOAUTH2")
    with pytest.raises(AuthenticationError, match="also after a refresh") as info:
        client.connect()
    assert info.value.smtp_code == 535
    assert introspection.asked == ["revoked-1", "revoked-2"]
    assert provider.calls == [False, True]
