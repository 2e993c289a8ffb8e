"""One SMTP session with everything it owns: the connection, its audit recorder, its error.

The backend opens and ends sessions; the pool (:mod:`.pool`) stores, hands out and retires
them.  Nobody else holds a session's parts, so a session is recorded the same way however it
ends: :meth:`Session.end` writes its ``SessionLog`` outcome from :attr:`Session.error`,
pooled or not.  A session belongs to the process that opened it: in a forked child,
:meth:`Session.forget` closes the child's copy of the socket without writing a byte to it
and without recording anything (the parent still owns the conversation).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, cast

from django.views.decorators.debug import sensitive_variables

from .audit import AuditRecorder
from .smtp import ClientConfig, SMTPClient, SocketMailError, Transcript
from .smtp.driver import QUIT_TIMEOUT
from .smtp.engine import Batch
from .smtp.transaction import Transaction
from .smtp.transcript import Listener

if TYPE_CHECKING:
    from .conf import BackendOptions
    from .smtp.aio import AsyncSMTPClient

__all__ = [
    "Session",
    "SessionCore",
    "SessionKey",
    "forget_no_dot_pipelining",
    "learned_no_dot_pipelining",
]

logger = logging.getLogger("django_socketmail")


@dataclass(frozen=True, slots=True)
class SessionKey:
    """What a pooled session may be reused for: exactly this client configuration, mailer
    and audit-log configuration (so no borrower changes a shared recorder)."""

    config: ClientConfig
    mailer: str
    audit_log: bool
    audit_database: str | None
    audit_body_bytes: int
    audit_background: bool

    @classmethod
    def of(cls, options: BackendOptions, mailer: str) -> SessionKey:
        return cls(
            options.client_config(),
            mailer,
            options.audit_log,
            options.audit_database,
            options.audit_body_bytes,
            options.audit_background,
        )


_NO_DOT_PIPELINING: set[tuple[str, int]] = set()
_NO_DOT_PIPELINING_LOCK: Final = threading.Lock()


def learned_no_dot_pipelining(host: str, port: int) -> bool:
    """True once a server at ``host:port`` dropped a connection right after an envelope we
    pipelined behind a final dot (Dovecot's submission server 2.3 does): from then on, for
    the life of the process, the next envelope waits for the final reply."""
    return (host, port) in _NO_DOT_PIPELINING


def forget_no_dot_pipelining() -> None:
    """Forget every lesson of :func:`learned_no_dot_pipelining` (tests; a server upgraded)."""
    with _NO_DOT_PIPELINING_LOCK:
        _NO_DOT_PIPELINING.clear()


def _learn_no_dot_pipelining(host: str, port: int) -> None:
    with _NO_DOT_PIPELINING_LOCK:
        if (host, port) in _NO_DOT_PIPELINING:
            return
        _NO_DOT_PIPELINING.add((host, port))
    logger.warning(
        "django-socketmail: %s:%s closed the connection right after a message envelope "
        "pipelined behind the end of the previous message (allowed by RFC 2920); no longer "
        "pipelining across messages to it in this process",
        host,
        port,
    )


class SessionCore:
    """What a session is whichever driver moves its bytes: its key, recorder, error, age and
    the send bookkeeping that does not wait (the sync :class:`Session` and the asyncio
    :class:`~.async_backend.AsyncSession` add opening, sending and ending)."""

    client: SMTPClient | AsyncSMTPClient

    def __init__(
        self,
        options: BackendOptions,
        mailer: str,
        listeners: Iterable[Listener],
        driver: Callable[..., SMTPClient | AsyncSMTPClient],
    ) -> None:
        self.key = SessionKey.of(options, mailer)
        config = self.key.config
        transcript = Transcript()
        for listener in listeners:
            transcript.subscribe(listener)
        self.client = driver(
            config,
            transcript=transcript,
            pipeline_after_dot=not learned_no_dot_pipelining(config.host, config.port),
        )
        # The recorder reads the client's transcript and info, which both drivers have.
        self.recorder = AuditRecorder(options, mailer, cast("SMTPClient", self.client))
        self.error: BaseException | None = None
        """Why the session failed or broke (None while it is healthy)."""
        self.created = time.monotonic()
        self.idle_since = self.created
        self._pid = os.getpid()
        self._ended = False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.client!r}>"

    def _before_send(self) -> None:
        """Take a lesson learned since this session opened (by another session of the
        process): no pipelining behind the final dot on this server."""
        config = self.key.config
        if learned_no_dot_pipelining(config.host, config.port):
            self.client.engine.pipeline_after_dot = False

    def _after_send(self, batch: Batch) -> Batch:
        """A broken connection becomes the session's error; a server that dropped what was
        pipelined behind a dot is learned for the process."""
        if batch.lost is not None and not self.client.is_connected:
            self.error = self.error or batch.lost
        if batch.lost_behind_dot:
            config = self.key.config
            _learn_no_dot_pipelining(config.host, config.port)
        return batch

    def usable(self, *, idle_timeout: float, max_age: float, max_messages: int, now: float) -> bool:
        """Young, recently used, not worn out, healthy, and the server has not hung up (EOF
        or an unsolicited reply waiting, seen without a round trip)."""
        return (
            self.error is None
            and now - self.created < max_age
            and now - self.idle_since < idle_timeout
            and self.client.info.messages_sent < max_messages
            and self.is_open
            and not self.client.peer_has_spoken()
        )

    @property
    def is_open(self) -> bool:
        raise NotImplementedError


class Session(SessionCore):
    """A connection on the blocking driver, its recorder and its error, from open to end."""

    client: SMTPClient

    def __init__(
        self, options: BackendOptions, mailer: str, listeners: Iterable[Listener] = ()
    ) -> None:
        super().__init__(options, mailer, listeners, SMTPClient)

    @property
    def is_open(self) -> bool:
        """Connected and usable, in the process that opened it."""
        return self.client.is_connected and os.getpid() == self._pid

    @sensitive_variables()
    def open(self) -> None:
        """Connect, TLS, AUTH; on failure record the session and raise.  Marked with Django's
        ``sensitive_variables``: error reports hide the locals of every frame below it."""
        try:
            self.client.connect()
        except SocketMailError as error:
            self.error = error
            self.end()
            raise

    def send(self, transactions: Sequence[Transaction], *, stop_on_error: bool) -> Batch:
        """Send on this session; a broken connection becomes the session's error."""
        self._before_send()
        return self._after_send(self.client.send(transactions, stop_on_error=stop_on_error))

    def end(self, *, quit_budget: float = QUIT_TIMEOUT) -> None:
        """QUIT (within ``quit_budget`` seconds; none left: just close), then write the
        session's record with its error.  Idempotent; never raises."""
        if self._ended:
            return
        if os.getpid() != self._pid:
            self.forget()
            return
        self._ended = True
        try:
            if quit_budget > 0:
                self.client.quit(budget=quit_budget)
            else:
                self.client.close()
        except Exception:  # closing must not turn a sent message into an exception
            logger.exception("django-socketmail: error while closing %r", self)
            self.client.close()
        self.recorder.session_ended(self.error)
        self.recorder.flush()

    def forget(self) -> None:
        """Close this process's copy of the socket without a word and record nothing: for a
        session inherited across ``fork()``."""
        self._ended = True
        self.client.close()
