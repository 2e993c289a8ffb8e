"""OAuth 2.0 bearer tokens for SMTP AUTH, without I/O: what the opening asks of a token
source, what a token may hold, and what a server's error challenge says.

The opening asks a :class:`TokenSource` (in practice a
:class:`django_socketmail.oauth_providers.cache.TokenCache`, which keeps the clock, the
lock and the provider's thread) for a token when it starts XOAUTH2 or OAUTHBEARER, and
once more, naming the token the server refused, after a ``535``.  A token is checked
against RFC 6750 §2.1's ``b64token`` before it is framed, so it cannot smuggle a ``\\x01``
into the SASL message.  Tokens are :class:`~.secret.Secret` values throughout.
"""

from __future__ import annotations

import json
import re
from typing import Final, Protocol

from .errors import SocketMailError
from .secret import Secret

__all__ = ["TokenProviderError", "TokenSource", "check_token", "describe_error_challenge"]

_B64TOKEN: Final = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
"""RFC 6750 §2.1: the characters a bearer token may hold."""


class TokenProviderError(SocketMailError):
    """The token provider failed (raised, answered nothing usable, or not in time); nothing
    was sent with a token.  The text never holds a token."""


class TokenSource(Protocol):
    """Where the opening gets bearer tokens."""

    def token(
        self, username: str, *, timeout: float, rejected: Secret[str] | None = None
    ) -> Secret[str]:
        """A token for ``username`` within ``timeout`` seconds.  ``rejected``: the token the
        server just refused; a source returns a newer one (refreshing once for every caller
        that saw the same refusal).  Raise :class:`TokenProviderError` on failure."""
        ...


def check_token(value: object) -> Secret[str]:
    """The provider's token as a :class:`~.secret.Secret`, after checking it is a
    ``b64token`` (RFC 6750 §2.1); :class:`TokenProviderError` (not naming it) otherwise."""
    if isinstance(value, Secret):
        value = value.reveal()
    if not isinstance(value, str):
        raise TokenProviderError(
            f"the token provider returned {type(value).__name__}, not a token string"
        )
    if not _B64TOKEN.fullmatch(value):
        raise TokenProviderError(
            "the token provider returned a string that is not a bearer token (empty, or "
            "holding characters RFC 6750 §2.1 does not allow: spaces, control characters...)"
        )
    return Secret(value)


def describe_error_challenge(challenge: bytes) -> str:
    """What a server's OAuth error challenge (RFC 7628 §3.2.2: JSON with ``status``,
    ``scope``, ``openid-configuration``; Google and Microsoft send it for XOAUTH2 too)
    says, as safe text: ``status "invalid_token", scope "https://mail.google.com/"``.
    ``challenge`` is already base64-decoded.  Unparseable input gives a short note."""
    try:
        document = json.loads(challenge.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return "an error challenge that is not JSON"
    if not isinstance(document, dict):
        return "an error challenge that is not a JSON object"
    parts = [
        f"{key} {_safe(str(document[key]))!r}"
        for key in ("status", "scope")
        if isinstance(document.get(key), (str, int))
    ]
    return ", ".join(parts) or "an error challenge without a status"


def _safe(text: str) -> str:
    return re.sub(r"[^\x20-\x7e]", "?", text[:80])
