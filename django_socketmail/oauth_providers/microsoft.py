"""Token providers for Microsoft 365 (Exchange Online SMTP AUTH) through MSAL.

Needs the ``oauth`` extra (``msal``).  Both return a ``provider(username,
force_refresh=False)`` for the ``token_provider`` option:

- :func:`client_credentials`: an app registration with a client secret (no user present;
  the app is given ``SMTP.SendAsApp`` and the mailbox through Exchange's service-principal
  permissions).  Scope ``https://outlook.office365.com/.default``.
- :func:`refresh_token`: a delegated refresh token obtained once by a user sign-in, for
  scope ``https://outlook.office.com/SMTP.Send``; a rotated refresh token is kept in
  memory for the life of the process.

An answer without a token raises :class:`~django_socketmail.smtp.oauth.TokenProviderError`
with Entra's error code and the first line of its description (``AADSTS7000215: Invalid
client secret provided``), never a secret.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

from ..smtp.oauth import TokenProviderError

__all__ = ["APP_SCOPE", "DELEGATED_SCOPE", "client_credentials", "refresh_token"]

APP_SCOPE: Final = "https://outlook.office365.com/.default"
DELEGATED_SCOPE: Final = "https://outlook.office.com/SMTP.Send"
LOGIN_HOST: Final = "https://login.microsoftonline.com"

Provider = Callable[..., tuple[str, float]]


def client_credentials(
    *,
    tenant_id: str,
    client_id: str,
    client_secret: str,
    scope: str = APP_SCOPE,
    authority: str | None = None,
    **msal_options: Any,
) -> Provider:
    """A provider for an app registration's own token (OAuth 2.0 client credentials).
    ``authority`` defaults to ``https://login.microsoftonline.com/<tenant_id>``;
    ``msal_options`` go to ``msal.ConfidentialClientApplication`` (``verify``, ``proxies``,
    ``timeout``...).  With ``force_refresh`` MSAL's cached token is dropped first."""
    import msal  # type: ignore[import-untyped,import-not-found,unused-ignore]

    app = _lazy(
        lambda: msal.ConfidentialClientApplication(
            client_id,
            client_credential=client_secret,
            authority=authority or f"{LOGIN_HOST}/{tenant_id}",
            **msal_options,
        )
    )

    def provider(username: str, force_refresh: bool = False) -> tuple[str, float]:
        if force_refresh:
            app().remove_tokens_for_client()
        return _token(app().acquire_token_for_client(scopes=[scope]))

    return provider


def refresh_token(
    *,
    client_id: str,
    refresh_token: str,
    tenant_id: str = "organizations",
    client_secret: str | None = None,
    scopes: Sequence[str] = (DELEGATED_SCOPE,),
    authority: str | None = None,
    **msal_options: Any,
) -> Provider:
    """A provider that redeems a user's refresh token (delegated ``SMTP.Send``); the
    refresh token Entra rotates in is used for the next call.  A confidential app passes
    ``client_secret``; a public one does not."""
    import msal  # type: ignore[import-untyped,import-not-found,unused-ignore]

    where = authority or f"{LOGIN_HOST}/{tenant_id}"

    def make() -> Any:
        if client_secret is not None:
            return msal.ConfidentialClientApplication(
                client_id, client_credential=client_secret, authority=where, **msal_options
            )
        return msal.PublicClientApplication(client_id, authority=where, **msal_options)

    app = _lazy(make)
    lock = threading.Lock()
    current = [refresh_token]

    def provider(username: str, force_refresh: bool = False) -> tuple[str, float]:
        with lock:
            result = app().acquire_token_by_refresh_token(current[0], scopes=list(scopes))
            if isinstance(result, dict) and result.get("refresh_token"):
                current[0] = result["refresh_token"]
        return _token(result)

    return provider


def _lazy(factory: Callable[[], Any]) -> Callable[[], Any]:
    """The MSAL application, made at the first token request, not at import: MSAL looks the
    authority up over HTTP when it is made, which must not happen while settings load (and
    is then bounded by the backend's timeout, like every token request)."""
    lock = threading.Lock()
    made: list[Any] = []

    def get() -> Any:
        with lock:
            if not made:
                try:
                    made.append(factory())
                except TokenProviderError:
                    raise
                except Exception as error:
                    raise TokenProviderError(
                        f"Microsoft identity platform not reachable: {type(error).__name__}"
                    ) from error
            return made[0]

    return get


def _token(result: object) -> tuple[str, float]:
    """MSAL's answer as (access token, expiry in epoch seconds)."""
    if not isinstance(result, dict):
        raise TokenProviderError("MSAL returned no answer")
    token = result.get("access_token")
    if not isinstance(token, str):
        error = str(result.get("error") or "no access_token")
        description = str(result.get("error_description") or "").strip().splitlines()
        raise TokenProviderError(
            f"Microsoft identity platform: {error}" + (f": {description[0]}" if description else "")
        )
    return token, time.time() + float(result.get("expires_in") or 0)
