"""The process-wide OAuth 2.0 token cache: one per provider, shared by every session and
every backend instance that names it, refreshed with a single flight.

:func:`shared_cache` returns the same :class:`TokenCache` for the same provider for the
life of the process (``MAILERS`` builds a new backend on every access, so the cache cannot
live on the backend).  A cache keeps, per user name, the last token and when it expires:

- a token is reused until ``refresh_margin`` seconds (60) before its expiry; one given
  without an expiry is reused until a server refuses it;
- one refresh at a time per user name: callers that need a token while the provider is
  being called wait for that call instead of making their own;
- after a server refused a token, the caller names it (``rejected``): the provider is
  called with ``force_refresh=True`` unless another caller already replaced that token;
- the provider runs in its own daemon thread, so every caller waits at most its
  ``timeout`` (a provider that hangs costs each caller its timeout, not a hung worker; the
  call it is stuck in stays the one flight until it returns).

Tokens are held as :class:`~django_socketmail.smtp.secret.Secret`; nothing here logs, and
no exception text holds a token or the provider's own message (it is chained instead).
After ``fork()`` the child keeps the tokens and forgets the calls in flight and the lock.
"""

from __future__ import annotations

import datetime
import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from ..smtp.errors import SMTPTimeoutError
from ..smtp.oauth import TokenProviderError, check_token
from ..smtp.secret import Secret

__all__ = ["REFRESH_MARGIN", "TokenCache", "TokenProviderTimeout", "shared_cache"]

REFRESH_MARGIN: Final = 60.0
"""Seconds before its expiry at which a cached token is refreshed."""

Provider = Callable[..., Any]
"""``provider(username, force_refresh=False) -> token | (token, expires_at)``."""


class TokenProviderTimeout(TokenProviderError, SMTPTimeoutError):
    """The token provider did not answer within the session's timeout."""


@dataclass(slots=True)
class _Entry:
    token: Secret[str]
    expires_at: float | None


@dataclass(slots=True)
class _Flight:
    """One provider call in progress, awaited by every caller that needs its result."""

    done: threading.Event = field(default_factory=threading.Event)
    token: Secret[str] | None = None
    error: BaseException | None = None


class TokenCache:
    """Tokens from one provider, per user name, for this process; see the module docstring.

    ``clock`` (seconds since the epoch) is for tests.  Thread-safe.
    """

    def __init__(
        self,
        provider: Provider,
        *,
        refresh_margin: float = REFRESH_MARGIN,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.provider = provider
        self.refresh_margin = refresh_margin
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._flights: dict[str, _Flight] = {}
        _ALL.add(self)

    def __repr__(self) -> str:
        name = getattr(self.provider, "__qualname__", type(self.provider).__name__)
        return f"<TokenCache {name} users={len(self._entries)}>"

    def token(
        self, username: str, *, timeout: float, rejected: Secret[str] | None = None
    ) -> Secret[str]:
        """A token for ``username`` within ``timeout`` seconds (see the module docstring);
        raise :class:`~django_socketmail.smtp.oauth.TokenProviderError`, or
        :class:`TokenProviderTimeout` past the timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            entry = self._entries.get(username)
            if entry is not None and entry.token != rejected and self._fresh(entry):
                return entry.token  # fresh, and not the refused one (or none was refused)
            flight = self._flights.get(username)
            if flight is None:
                flight = _Flight()
                self._flights[username] = flight
                force = rejected is not None
                threading.Thread(
                    target=self._call,
                    args=(username, force, flight),
                    name=f"socketmail-token-{username[:40]}",
                    daemon=True,
                ).start()
        if not flight.done.wait(max(0.0, deadline - time.monotonic())):
            raise TokenProviderTimeout(
                f"the token provider did not answer within {timeout:g} s (the session's timeout)"
            )
        if isinstance(flight.error, TokenProviderError):
            # Its text is ours (a check of what the provider returned, or a ready provider's
            # safe summary); a new exception per waiter, so no traceback is shared.
            raise TokenProviderError(str(flight.error)) from flight.error
        if flight.error is not None:
            raise TokenProviderError(
                f"the token provider failed ({type(flight.error).__name__}; "
                "its message is in the chained exception)"
            ) from flight.error
        assert flight.token is not None
        return flight.token

    def forget(self, username: str | None = None) -> None:
        """Drop the cached token of ``username`` (every user's with None)."""
        with self._lock:
            if username is None:
                self._entries.clear()
            else:
                self._entries.pop(username, None)

    def _fresh(self, entry: _Entry) -> bool:
        return entry.expires_at is None or self._clock() < entry.expires_at - self.refresh_margin

    def _call(self, username: str, force: bool, flight: _Flight) -> None:
        try:
            token, expires_at = _parse(self.provider(username, force_refresh=force))
        except BaseException as error:  # the waiters get it, chained
            flight.error = error
        else:
            flight.token = token
            with self._lock:
                self._entries[username] = _Entry(token, expires_at)
        finally:
            with self._lock:
                if self._flights.get(username) is flight:
                    del self._flights[username]
            flight.done.set()

    def _after_fork(self) -> None:
        self._lock = threading.Lock()
        self._flights = {}


def _parse(result: object) -> tuple[Secret[str], float | None]:
    """A provider's answer as (token, expiry in epoch seconds or None)."""
    if isinstance(result, tuple):
        if len(result) != 2:
            raise TokenProviderError(
                f"the token provider returned a tuple of {len(result)} items; expected "
                "(token, expires_at)"
            )
        value, expires = result
        return check_token(value), _expiry(expires)
    return check_token(result), None


def _expiry(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            raise TokenProviderError(
                "the token provider returned a naive datetime as expires_at; give an aware "
                "one (datetime.timezone.utc) or seconds since the epoch"
            )
        return value.timestamp()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise TokenProviderError(
        f"the token provider returned {type(value).__name__} as expires_at; expected seconds "
        "since the epoch or an aware datetime"
    )


_ALL: weakref.WeakSet[TokenCache] = weakref.WeakSet()
_SHARED: dict[Provider, TokenCache] = {}
_SHARED_LOCK = threading.Lock()


def shared_cache(provider: Provider) -> TokenCache:
    """The process-wide :class:`TokenCache` of ``provider`` (the same object every time)."""
    with _SHARED_LOCK:
        cache = _SHARED.get(provider)
        if cache is None:
            cache = _SHARED[provider] = TokenCache(provider)
        return cache


def _after_fork_in_child() -> None:
    global _SHARED_LOCK
    _SHARED_LOCK = threading.Lock()
    for cache in list(_ALL):
        cache._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
