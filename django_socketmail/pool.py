"""A process-wide pool of warm SMTP sessions, so that one ``send_mail()`` per web request does
not pay for connect, TLS and AUTH every time.

Opt-in (``pool=True``).  Sessions are keyed by the full client configuration (host, port,
TLS mode, credentials, CA, ...), so a session is only ever reused for exactly the
configuration that opened it.  A session is handed out again only if it is younger than
``pool_max_age``, was idle less than ``pool_idle_timeout``, has sent fewer than
``pool_max_messages`` messages, and looks alive: a server that closed an idle connection
(EOF, or an unsolicited ``421``) shows it as readable data, which costs nothing to look at,
so no message is ever sent into a dead session.  After ``fork()`` the child never uses
the parent's sessions (their sockets are shared with the parent): it drops them and starts
afresh.

The pool holds each session's :class:`~django_socketmail.audit.AuditRecorder` with it, so
that one physical connection stays one ``SessionLog`` row however many borrowers it has.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from .audit import AuditRecorder
from .smtp import ClientConfig, SMTPClient

__all__ = ["POOL", "ConnectionPool", "PoolLimits", "PooledSession", "close_pool", "retire"]

MAX_IDLE_PER_KEY: Final = 8


@dataclass(frozen=True, slots=True)
class PoolLimits:
    """When a pooled session is too old, too idle or too used to be handed out again."""

    idle_timeout: float = 30.0
    max_age: float = 300.0
    max_messages: int = 1000


@dataclass(slots=True)
class PooledSession:
    """A live session with its audit recorder and its timestamps."""

    client: SMTPClient
    recorder: AuditRecorder
    created: float = field(default_factory=time.monotonic)
    idle_since: float = field(default_factory=time.monotonic)

    def usable(self, limits: PoolLimits, now: float) -> bool:
        """Young, recently used, not worn out, and the server has not hung up."""
        return (
            now - self.created < limits.max_age
            and now - self.idle_since < limits.idle_timeout
            and self.client.info.messages_sent < limits.max_messages
            and self.client.is_connected
            and not self.client.peer_has_spoken()
        )


Closer = Callable[[PooledSession], None]


class ConnectionPool:
    """Idle sessions by configuration.  Thread-safe; fork-safe (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: dict[ClientConfig, list[PooledSession]] = {}
        self._pid = os.getpid()

    def acquire(
        self, config: ClientConfig, limits: PoolLimits, close: Closer
    ) -> PooledSession | None:
        """A usable idle session for ``config``, or None.  Unusable ones met on the way are
        passed to ``close`` (outside the lock)."""
        stale: list[PooledSession] = []
        found = None
        with self._lock:
            self._forget_after_fork()
            sessions = self._idle.get(config, [])
            now = time.monotonic()
            while sessions:
                candidate = sessions.pop()  # most recently used first: the warmest
                if candidate.usable(limits, now):
                    found = candidate
                    break
                stale.append(candidate)
        for session in stale:
            close(session)
        return found

    def release(self, session: PooledSession, limits: PoolLimits, close: Closer) -> None:
        """Keep ``session`` for the next borrower, or pass it to ``close`` if it cannot be
        kept (broken, worn out, or too many idle already)."""
        session.idle_since = time.monotonic()
        keep = session.usable(limits, session.idle_since)
        if keep:
            with self._lock:
                self._forget_after_fork()
                sessions = self._idle.setdefault(session.client.config, [])
                if len(sessions) < MAX_IDLE_PER_KEY:
                    sessions.append(session)
                else:
                    keep = False
        if not keep:
            close(session)

    def clear(self, close: Closer) -> None:
        """Close every idle session (for tests and shutdown)."""
        with self._lock:
            sessions = [s for group in self._idle.values() for s in group]
            self._idle.clear()
        for session in sessions:
            close(session)

    def idle_count(self) -> int:
        """How many sessions wait in the pool."""
        with self._lock:
            return sum(len(group) for group in self._idle.values())

    def _forget_after_fork(self) -> None:
        if os.getpid() != self._pid:
            # The sockets belong to the parent too: close our copies without a word.
            for group in self._idle.values():
                for session in group:
                    session.client.close()
            self._idle.clear()
            self._pid = os.getpid()


POOL: Final = ConnectionPool()
"""The process-wide pool used by backends with ``pool=True``."""


def retire(session: PooledSession) -> None:
    """End a pooled session for good: QUIT, then its audit record."""
    session.client.quit()
    session.recorder.session_ended(None)
    session.recorder.flush()


def close_pool() -> None:
    """QUIT every idle pooled session (and write its audit record).  Runs at interpreter
    exit; call it yourself to drop warm connections earlier (tests, worker shutdown)."""
    POOL.clear(retire)


atexit.register(close_pool)
