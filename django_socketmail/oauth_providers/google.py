"""Token providers for Gmail and Google Workspace SMTP through ``google-auth``.

Needs the ``oauth`` extra (``google-auth``, ``requests``).  Both return a
``provider(username, force_refresh=False)`` for the ``token_provider`` option, with scope
``https://mail.google.com/`` by default:

- :func:`refresh_token`: an OAuth client's refresh token, obtained once by a user consent;
- :func:`service_account`: a service account with domain-wide delegation, impersonating
  the SMTP user name (Workspace only).

A refused refresh raises :class:`~django_socketmail.smtp.oauth.TokenProviderError` with
Google's error (``invalid_grant: Token has been expired or revoked.``), never a secret.
"""

from __future__ import annotations

import datetime
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from ..smtp.oauth import TokenProviderError

__all__ = ["MAIL_SCOPE", "TOKEN_URI", "refresh_token", "service_account"]

MAIL_SCOPE: Final = "https://mail.google.com/"
TOKEN_URI: Final = "https://oauth2.googleapis.com/token"  # noqa: S105 (a URL)

Provider = Callable[..., tuple[str, datetime.datetime | None]]


def refresh_token(
    *,
    client_id: str,
    client_secret: str,
    refresh_token: str,
    token_uri: str = TOKEN_URI,
    scopes: Sequence[str] = (MAIL_SCOPE,),
    request: Any = None,
) -> Provider:
    """A provider that redeems an OAuth client's refresh token.  ``request``: a
    ``google.auth.transport.requests.Request`` (for a proxy or a private CA)."""
    from google.oauth2.credentials import Credentials  # type: ignore[import-untyped,import-not-found,unused-ignore]

    credentials = Credentials(  # type: ignore[no-untyped-call,unused-ignore]
        None,
        refresh_token=refresh_token,
        client_id=client_id,
        client_secret=client_secret,
        token_uri=token_uri,
        scopes=list(scopes),
    )
    lock = threading.Lock()

    def provider(username: str, force_refresh: bool = False) -> tuple[str, Any]:
        with lock:
            return _refresh(credentials, request)

    return provider


def service_account(
    *,
    info: Mapping[str, Any] | None = None,
    filename: str | None = None,
    scopes: Sequence[str] = (MAIL_SCOPE,),
    request: Any = None,
) -> Provider:
    """A provider for a service account with domain-wide delegation, given as its JSON key
    (``info``, the parsed file, or ``filename``); each SMTP user name is impersonated."""
    from google.oauth2 import service_account as sa  # type: ignore[import-untyped,import-not-found,unused-ignore]

    if (info is None) == (filename is None):
        raise ValueError("give the service account key as info= or filename=, not both")
    if info is not None:
        base = sa.Credentials.from_service_account_info(dict(info), scopes=list(scopes))  # type: ignore[no-untyped-call,unused-ignore]
    else:
        base = sa.Credentials.from_service_account_file(filename, scopes=list(scopes))  # type: ignore[no-untyped-call,unused-ignore]
    lock = threading.Lock()
    per_user: dict[str, Any] = {}

    def provider(username: str, force_refresh: bool = False) -> tuple[str, Any]:
        with lock:
            credentials = per_user.get(username)
            if credentials is None:
                credentials = per_user[username] = base.with_subject(username)
            return _refresh(credentials, request)

    return provider


def _refresh(credentials: Any, request: Any) -> tuple[str, datetime.datetime | None]:
    from google.auth.exceptions import RefreshError  # type: ignore[import-untyped,import-not-found,unused-ignore]
    from google.auth.transport.requests import Request  # type: ignore[import-untyped,import-not-found,unused-ignore]

    try:
        credentials.refresh(request or Request())
    except RefreshError as error:
        raise TokenProviderError(f"Google token endpoint: {_first_line(error)}") from None
    expiry = credentials.expiry
    if expiry is not None and expiry.tzinfo is None:  # google-auth's expiry is naive UTC
        expiry = expiry.replace(tzinfo=datetime.timezone.utc)
    return credentials.token, expiry


def _first_line(error: BaseException) -> str:
    text = str(error.args[0]) if error.args else type(error).__name__
    return text.strip().splitlines()[0][:200] if text.strip() else type(error).__name__
