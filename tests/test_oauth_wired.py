"""Needs the proposed wiring: token_provider through EmailBackend; -PLUS over real TLS.

Each runs through the sync API and the async one (``send_messages()`` and
``await asend_messages()``; the blocking driver and the asyncio one for -PLUS), each async
run on a fresh event loop in asyncio's debug mode.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable
from typing import Any, TypeVar

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from django.core.mail import EmailMessage

from django_socketmail.email_backend import EmailBackend
from django_socketmail.oauth_providers.cache import shared_cache
from django_socketmail.smtp import AuthenticationError, SMTPClient
from django_socketmail.smtp.aio import AsyncSMTPClient
from django_socketmail.smtp.config import ClientConfig, TLSMode

from .audit_text import audit_text
from .hostile.server import HostileSMTPServer, standard_session
from .test_oauth import oauth_auth
from .test_scram import PASSWORD, USER, ScramServer, scram_auth

APIS = ["sync", "async"]
T = TypeVar("T")
CALLS: list[tuple[str, bool]] = []


def run(awaitable: Awaitable[T]) -> T:
    """Run in a fresh event loop in asyncio's debug mode."""

    async def main() -> T:
        return await awaitable

    return asyncio.run(main(), debug=True)


def send(api: str, backend: EmailBackend, message: EmailMessage) -> int:
    """``send_messages([message])`` or ``await asend_messages([message])``, by ``api``."""
    if api == "async":
        return run(backend.asend_messages([message]))
    return backend.send_messages([message])


def provider(username: str, force_refresh: bool = False) -> str:
    CALLS.append((username, force_refresh))
    return "stale-token" if len(CALLS) == 1 else "good-token"


@pytest.mark.parametrize("api", APIS)
def test_token_provider_through_the_backend(
    server_tls: ssl.SSLContext, ca: trustme.CA, tmp_path: Any, api: str
) -> None:
    CALLS.clear()
    shared_cache(provider).forget()  # the process-wide cache: each run starts without a token
    ca_path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    rules = {"AUTH": oauth_auth({"good-token"})}
    script = standard_session(rules, extensions=("STARTTLS", "AUTH LOGIN XOAUTH2"))
    server = HostileSMTPServer([script], tls_context=server_tls)
    server.tokens_seen = []  # type: ignore[attr-defined]
    with server:
        backend = EmailBackend(
            host=server.host, port=server.port, use_tls=True, ssl_cafile=str(ca_path),
            username="mailer@contoso.example",
            token_provider="tests.test_oauth_wired.provider", audit_log=False, timeout=3,
        )  # fmt: skip
        message = EmailMessage("s", "b", "f@example.com", ["t@example.com"])
        assert send(api, backend, message) == 1
        backend.close()
    assert CALLS == [("mailer@contoso.example", False), ("mailer@contoso.example", True)]
    assert server.tokens_seen == ["stale-token", "good-token"]  # type: ignore[attr-defined]


def _der(leaf: trustme.LeafCert) -> bytes:
    pem = leaf.cert_chain_pems[0].bytes()
    return x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("relay", [False, True], ids=["direct", "relayed"])
def test_scram_plus_over_real_tls(ca: trustme.CA, tmp_path: Any, relay: bool, api: str) -> None:
    leaf = ca.issue_cert("127.0.0.1")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(context)
    # Relayed: the server binds to its own certificate, the client saw the relay's.
    der = _der(ca.issue_cert("other.example") if relay else leaf)
    rule = scram_auth(
        lambda: ScramServer("sha256", {USER: PASSWORD}, certificate=der, offers_plus=True)
    )
    offered = ("STARTTLS", "AUTH SCRAM-SHA-256 SCRAM-SHA-256-PLUS")
    server = HostileSMTPServer(
        [standard_session({"AUTH": rule}, extensions=offered)], tls_context=context
    )
    server.scram_servers = []  # type: ignore[attr-defined]
    ca_path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    with server:
        config = ClientConfig(
            host=server.host, port=server.port, tls=TLSMode.STARTTLS, ssl_cafile=str(ca_path),
            username=USER, password=PASSWORD, timeout=3, auth_require_channel_binding=True,
        )  # fmt: skip
        if api == "sync":
            client = SMTPClient(config)
            if relay:
                with pytest.raises(AuthenticationError):
                    client.connect()
            else:
                client.connect()
                assert client.info.auth_mechanism == "SCRAM-SHA-256-PLUS"
                client.quit()
            client.close()
        else:
            run(_async_scram_plus(AsyncSMTPClient(config), relay=relay))
    assert server.scram_servers[0].flag == b"p=tls-server-end-point"  # type: ignore[attr-defined]


async def _async_scram_plus(client: AsyncSMTPClient, *, relay: bool) -> None:
    """The sync branch of the test above, on the asyncio driver."""
    try:
        if relay:
            with pytest.raises(AuthenticationError):
                await client.connect()
        else:
            await client.connect()
            assert client.info.auth_mechanism == "SCRAM-SHA-256-PLUS"
            await client.quit()
    finally:
        client.close()


AUDIT_TOKENS = ["audit-token-old", "audit-token-new"]


def audit_provider(username: str, force_refresh: bool = False) -> str:
    return AUDIT_TOKENS[1 if force_refresh else 0]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("api", APIS)
def test_no_token_in_any_audit_column(
    server_tls: ssl.SSLContext, ca: trustme.CA, tmp_path: Any, api: str
) -> None:
    """A token refused (and echoed back by the server), refreshed, accepted: no form of
    either token in any text column of the audit tables."""
    shared_cache(audit_provider).forget()  # each run starts without a token
    import base64

    from django_socketmail.models import SessionLog

    ca_path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    rules = {"AUTH": oauth_auth({AUDIT_TOKENS[1]}, echo=True)}
    script = standard_session(rules, extensions=("STARTTLS", "AUTH XOAUTH2"))
    server = HostileSMTPServer([script], tls_context=server_tls)
    server.tokens_seen = []  # type: ignore[attr-defined]
    with server:
        backend = EmailBackend(
            host=server.host, port=server.port, use_tls=True, ssl_cafile=str(ca_path),
            username="mailer@contoso.example", token_provider=audit_provider, timeout=3,
        )  # fmt: skip
        assert send(api, backend, EmailMessage("s", "b", "f@example.com", ["t@x.com"])) == 1
        backend.close()
    assert server.tokens_seen == AUDIT_TOKENS  # type: ignore[attr-defined]
    forms = [line.split()[2].decode() for line in server.commands if line.startswith(b"AUTH ")]
    for token in AUDIT_TOKENS:
        forms += [token, base64.b64encode(token.encode()).decode()]

    dump = audit_text()
    assert SessionLog.objects.filter(auth_mechanism="XOAUTH2").exists()
    assert [form for form in forms if form in dump] == []
