"""OAuth 2.0 token providers for the ``token_provider`` option, and the process-wide cache
that shares their tokens between sessions (:mod:`.cache`).

A provider is any callable ``provider(username, force_refresh=False)`` returning a token
string or a ``(token, expires_at)`` pair (``expires_at``: seconds since the epoch, or an
aware ``datetime``).  Ready ones for Microsoft's identity platform and Google need the
``oauth`` extra (``pip install django-socketmail[oauth]``); the cache needs nothing.
"""

from __future__ import annotations

from .cache import TokenCache, shared_cache

__all__ = ["TokenCache", "shared_cache"]
