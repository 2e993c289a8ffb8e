"""A process-wide pool of warm SMTP sessions, so that one ``send_mail()`` per web request does
not pay for connect, TLS and AUTH every time.

Opt-in (``pool=True``).  Sessions (:class:`~.session.Session`) are keyed by
:class:`~.session.SessionKey`: the full client configuration (host, port, TLS mode,
credentials, CA...), the mailer alias and the audit-log options, so a session is only
reused for exactly what opened it.  It is handed out again only if it is younger than
``pool_max_age``, was idle less than ``pool_idle_timeout``, has sent fewer than
``pool_max_messages`` messages, has no error, and the server has not spoken since (EOF or an
unsolicited ``421`` shows as readable data, which costs nothing to look at).  A server can
still close the connection between that look and our next write; what that does to a message
is what the engine says about any lost connection (never reported as sent).

Fork: the child forgets the parent's idle sessions the moment it is created
(``os.register_at_fork``), closing its copies of their sockets without a byte written, so
neither its exit nor its own pool ever touches the parent's conversations.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Final

from .session import Session, SessionKey
from .smtp.driver import QUIT_TIMEOUT

__all__ = ["POOL", "ConnectionPool", "PoolLimits", "close_pool"]

MAX_IDLE_PER_KEY: Final = 8


@dataclass(frozen=True, slots=True)
class PoolLimits:
    """When a pooled session is too old, too idle or too used to be handed out again."""

    idle_timeout: float = 30.0
    max_age: float = 300.0
    max_messages: int = 1000

    def allow(self, session: Session, now: float) -> bool:
        return session.usable(
            idle_timeout=self.idle_timeout,
            max_age=self.max_age,
            max_messages=self.max_messages,
            now=now,
        )


class ConnectionPool:
    """Idle sessions by key.  Thread-safe; fork-safe (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: dict[SessionKey, list[Session]] = {}
        ref = weakref.ref(self)

        def after_fork_in_child() -> None:
            pool = ref()
            if pool is not None:
                pool._after_fork()

        os.register_at_fork(after_in_child=after_fork_in_child)

    def acquire(self, key: SessionKey, limits: PoolLimits) -> Session | None:
        """A usable idle session for ``key``, or None.  Unusable ones met on the way are
        ended (outside the lock)."""
        stale: list[Session] = []
        found = None
        with self._lock:
            sessions = self._idle.get(key, [])
            now = time.monotonic()
            while sessions:
                candidate = sessions.pop()  # most recently used first: the warmest
                if limits.allow(candidate, now):
                    found = candidate
                    break
                stale.append(candidate)
        for session in stale:
            session.end()
        return found

    def release(self, session: Session, limits: PoolLimits) -> None:
        """Keep ``session`` for the next borrower, or end it if it cannot be kept (broken,
        worn out, or too many idle already)."""
        session.idle_since = time.monotonic()
        keep = limits.allow(session, session.idle_since)
        if keep:
            with self._lock:
                sessions = self._idle.setdefault(session.key, [])
                if len(sessions) < MAX_IDLE_PER_KEY:
                    sessions.append(session)
                else:
                    keep = False
        if not keep:
            session.end()

    def clear(self, budget: float = QUIT_TIMEOUT) -> None:
        """End every idle session, QUITting them within ``budget`` seconds in all (the
        sessions still waiting when it runs out are closed without QUIT)."""
        with self._lock:
            sessions = [s for group in self._idle.values() for s in group]
            self._idle.clear()
        deadline = time.monotonic() + budget
        for session in sessions:
            session.end(quit_budget=min(QUIT_TIMEOUT, deadline - time.monotonic()))

    def idle_count(self) -> int:
        """How many sessions wait in the pool."""
        with self._lock:
            return sum(len(group) for group in self._idle.values())

    def _after_fork(self) -> None:
        """In the child: the sockets belong to the parent; close our copies silently."""
        self._lock = threading.Lock()  # another thread may have held it at fork time
        sessions = [s for group in self._idle.values() for s in group]
        self._idle.clear()
        for session in sessions:
            session.forget()


POOL: Final = ConnectionPool()
"""The process-wide pool used by backends with ``pool=True``."""


def close_pool() -> None:
    """QUIT every idle pooled session (and write its audit record), within
    :data:`~.smtp.client.QUIT_TIMEOUT` seconds in all.  Runs at interpreter exit; call it
    yourself to drop warm connections earlier (tests, worker shutdown)."""
    POOL.clear()


atexit.register(close_pool)
