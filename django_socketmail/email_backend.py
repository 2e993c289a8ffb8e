"""The Django email backend: Django's SMTP backend contract on django-socketmail's client.

``EMAIL_BACKEND = "django_socketmail.backend"`` or, on Django 6.1, a ``MAILERS`` entry with
``"BACKEND": "django_socketmail.backend"``.  Same options and behaviour as
``django.core.mail.backends.smtp.EmailBackend``: :meth:`open` returns True when it opened
the connection, False when one was open, None when it failed silently; a connection is
only kept once fully set up; :meth:`send_messages` holds a per-instance lock and returns how
many messages the server accepted for at least one recipient.

After sending, every ``EmailMessage`` carries a
:class:`~django_socketmail.smtp.SendResult` as ``message.socketmail_result``.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

import django
from django.core.exceptions import ImproperlyConfigured
from django.core.mail.backends.base import BaseEmailBackend

from .async_backend import AsyncBackendMixin
from .audit import AuditRecorder
from .conf import OPTIONS, BackendOptions, resolve_options
from .pool import POOL, PoolLimits
from .serializer import serialize, serialize_parts
from .session import Session, SessionKey
from .smtp import (
    InvalidAddressError,
    SendResult,
    SendStatus,
    SMTPClient,
    SocketMailError,
)
from .smtp.delivery import DeliveryOptions
from .smtp.engine import Batch
from .smtp.transaction import Transaction
from .smtp.transcript import Listener

if TYPE_CHECKING:
    from typing import TypeAlias

    from django.core.mail import EmailMessage

    _Refusal: TypeAlias = tuple[EmailMessage, SendResult, list[bytes], BaseException]
    """A message refused before sending (bad address, too large...): raised after the rest."""

__all__ = ["RESULT_ATTRIBUTE", "EmailBackend", "serialize"]

RESULT_ATTRIBUTE: Final = "socketmail_result"
"""Name of the attribute set on each sent ``EmailMessage``: its :class:`SendResult`."""
DELIVERY_ATTRIBUTE: Final = "socketmail_delivery"
"""Name of the attribute a caller may set on an ``EmailMessage``: its
:class:`~django_socketmail.smtp.delivery.DeliveryOptions` (DSN, REQUIRETLS, envelope sender)."""

BATCH_BYTES: Final = 1 << 20
"""Messages are serialized and pipelined in runs of about this many bytes..."""
BATCH_MESSAGES: Final = 500
"""...or this many messages, whichever comes first."""

MAX_RETRIES: Final = 2
"""Times a message that cannot have reached the server (its connection broke before its
content went out) is sent again on a new connection within one call."""

_HAS_MAILERS: Final = django.VERSION >= (6, 1)


_AGREEING: dict[tuple[int, int], tuple[BackendOptions, BackendOptions]] = {}
"""Pairs of (worker's, backend's) options found to agree, by identity."""


class EmailBackend(AsyncBackendMixin, BaseEmailBackend):
    """Send mail through django-socketmail's own SMTP client and record it in the audit log."""

    def __init__(
        self,
        host: str | None = None,
        port: int | None = None,
        username: str | None = None,
        password: str | None = None,
        use_tls: bool | None = None,
        fail_silently: bool = False,
        use_ssl: bool | None = None,
        timeout: float | None = None,
        ssl_keyfile: str | None = None,
        ssl_certfile: str | None = None,
        **kwargs: Any,
    ) -> None:
        alias = kwargs.get("alias")
        given: dict[str, Any] = {
            "host": host,
            "port": port,
            "username": username,
            "password": password,
            "use_tls": use_tls,
            "use_ssl": use_ssl,
            "timeout": timeout,
            "ssl_keyfile": ssl_keyfile,
            "ssl_certfile": ssl_certfile,
            "fail_silently": fail_silently,
        }
        for name in list(kwargs):
            if name in OPTIONS:
                given[name] = kwargs.pop(name)
        if _HAS_MAILERS:
            # Unknown options raise InvalidMailer (with an alias) from Django itself.
            if alias is None:
                self._refuse_unknown(kwargs)
            super().__init__(**kwargs)
        else:
            kwargs.pop("alias", None)
            self._refuse_unknown(kwargs)
            super().__init__(fail_silently=bool(fail_silently))
        source = f"MAILERS[{alias!r}]['OPTIONS']" if alias is not None else "the backend's options"
        self.options: BackendOptions = resolve_options(
            given, from_mailers=alias is not None, source=source
        )
        self.fail_silently = self.options.fail_silently
        self.mailer_alias: str = alias or ""
        if self.options.queue:
            self._refuse_options_the_worker_cannot_see()
        self.session: Session | None = None
        """The open session (None when closed)."""
        self.last_session: Session | None = None
        """The most recent session, open or not: what it negotiated stays readable."""
        self._lock = threading.RLock()
        self.transcript_listeners: list[Listener] = []
        """Called with every transcript line of every session (``sendtestmail`` prints)."""

    def _refuse_options_the_worker_cannot_see(self) -> None:
        """With ``queue=True`` the worker delivers with the options it reads from settings
        for this mailer (:func:`~django_socketmail.queue.settled_options`): an option whose
        value was given only to this backend would be dropped at delivery, so it raises
        ``ImproperlyConfigured`` naming the options (never their values) and where to set
        them."""
        from dataclasses import fields

        from .queue import settled_options

        settled = settled_options(self.mailer_alias)
        pair = (id(settled), id(self.options))
        if pair in _AGREEING:  # the same two (cached) option objects as before
            return
        differ = [
            f.name
            for f in fields(BackendOptions)
            if f.name not in ("queue", "fail_silently")
            and getattr(settled, f.name) != getattr(self.options, f.name)
        ]
        if not differ:
            if len(_AGREEING) >= 64:
                _AGREEING.clear()
            _AGREEING[pair] = (settled, self.options)  # kept alive: their ids stay theirs
        if differ:
            where = (
                f"MAILERS[{self.mailer_alias!r}]['OPTIONS']"
                if self.mailer_alias
                else "the EMAIL_* settings and SOCKETMAIL"
            )
            raise ImproperlyConfigured(
                f"queue=True: queued messages are delivered by a worker that builds the mailer "
                f"from settings, where {', '.join(map(repr, differ))} "
                f"{'has' if len(differ) == 1 else 'have'} another value than the one given to "
                f"this backend; set {'it' if len(differ) == 1 else 'them'} in {where} instead."
            )

    @staticmethod
    def _refuse_unknown(kwargs: dict[str, Any]) -> None:
        unknown = sorted(k for k in kwargs if not k.startswith("_"))
        if unknown:
            raise ImproperlyConfigured(
                f"Unknown django-socketmail option(s) {', '.join(map(repr, unknown))}; "
                f"known: {', '.join(OPTIONS)}."
            )

    # Django's SMTP backend exposes these; code in the wild reads them.
    @property
    def host(self) -> str:
        return self.options.host

    @property
    def port(self) -> int:
        return self.options.port

    @property
    def use_tls(self) -> bool:
        return self.options.use_tls

    @property
    def use_ssl(self) -> bool:
        return self.options.use_ssl

    @property
    def timeout(self) -> float:
        return self.options.timeout

    @property
    def client(self) -> SMTPClient | None:
        """The open session's client (None when closed)."""
        return self.session.client if self.session is not None else None

    @property
    def last_client(self) -> SMTPClient | None:
        """The most recent session's client, open or not."""
        return self.last_session.client if self.last_session is not None else None

    @property
    def connection(self) -> SMTPClient | None:
        """The open session, as Django's backend names it (None when closed)."""
        return self.client

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.options.host}:{self.options.port}>"

    # -- connection lifecycle -------------------------------------------------------------

    def open(self) -> bool | None:
        """Ensure an open, fully set-up session.

        Returns True if this call opened it, False if one was already open, None if opening
        failed and ``fail_silently`` is set.
        """
        with self._lock:
            if self.session is not None and self.session.is_open:
                return False
            self._end_session()
            if self.options.pool:
                pooled = POOL.acquire(SessionKey.of(self.options, self.mailer_alias), self._limits)
                if pooled is not None:
                    self.session = self.last_session = pooled
                    return True
            session = Session(self.options, self.mailer_alias, self.transcript_listeners)
            self.last_session = session
            try:
                session.open()
            except SocketMailError:
                if not self.fail_silently:
                    raise
                return None
            self.session = session
            return True

    def close(self) -> None:
        """Give the session back to the pool (``pool=True``), or QUIT (falling back to
        closing the socket) and record it.  Does not raise for a dead server."""
        with self._lock:
            self._end_session()

    def _end_session(self) -> None:
        session, self.session = self.session, None
        if session is None:
            return
        if self.options.pool:
            session.recorder.flush()
            POOL.release(session, self._limits)
        else:
            session.end()

    # -- sending ------------------------------------------------------------------------

    def send_messages(self, email_messages: Sequence[EmailMessage]) -> int:
        """Send the messages; return how many the server accepted for at least one recipient.

        The messages of one call travel pipelined (BDAT when the server offers CHUNKING).
        Per-message results land on ``message.socketmail_result``.  Unless
        ``fail_silently``, the first message that fails raises its error (after its result
        is recorded) and later messages are not started, as in Django's backend; with
        CHUNKING, messages already in flight alongside it are finished and reported
        truthfully on their results.  With ``fail_silently``, messages that cannot have
        reached the server when a connection broke (never started, or an envelope that rode
        behind a final dot on a server that died of it) go on a new connection, each at
        most :data:`MAX_RETRIES` times.  With ``queue=True`` the messages are stored for
        queued delivery instead (see :mod:`django_socketmail.queue`) and the number stored
        is returned.
        """
        if not email_messages:
            return 0
        if self.options.queue:
            from .queue import store

            return store(self, [m for m in email_messages if m.recipients()])
        with self._lock:
            opened = self.open()
            if self.session is None or opened is None:
                return 0
            try:
                return self._send_all([m for m in email_messages if m.recipients()])
            finally:
                if opened:
                    self.close()
                elif self.session is not None:
                    self.session.recorder.flush()

    def _send_all(self, messages: list[EmailMessage]) -> int:
        sent = 0
        queue = deque(messages)
        tries: dict[int, int] = {}
        while queue:
            # A session broken by an earlier batch: only messages that cannot have been
            # delivered come back here, and they go on a fresh connection.
            if (self.session is None or not self.session.is_open) and self.open() is None:
                return sent
            session = self.session
            assert session is not None
            batch, refused = self._next_batch(queue, session)
            outcome = session.send([t for _, t, _ in batch], stop_on_error=not self.fail_silently)
            accepted, retry = self._settle_batch(batch, outcome, session.recorder, tries)
            sent += accepted
            if outcome.errors and not self.fail_silently:
                raise outcome.errors[0][1]
            if refused is not None:
                self._record(session.recorder, *refused[:3])
                raise refused[3]
            del batch, outcome  # hold no sent message's bytes while the next run is serialized
            queue.extendleft(reversed(retry))
        return sent

    def _settle_batch(
        self,
        batch: list[tuple[EmailMessage, Transaction, list[bytes]]],
        outcome: Batch,
        recorder: AuditRecorder,
        tries: dict[int, int],
    ) -> tuple[int, list[EmailMessage]]:
        """Record every attempted message of a run; return how many the server accepted
        and the messages to send again on a new connection.  A message given back more than
        :data:`MAX_RETRIES` times fails with the connection's error."""
        accepted = 0
        retry: list[EmailMessage] = []
        unattempted = {id(tx.result) for tx in outcome.unattempted}
        for message, transaction, raw in batch:
            result = transaction.result
            if id(result) in unattempted:
                tries[id(message)] = tries.get(id(message), 0) + 1
                if outcome.errors and not self.fail_silently:
                    continue  # an earlier failure raises: not attempted, as Django does
                if tries[id(message)] <= MAX_RETRIES:
                    retry.append(message)
                    continue
                error = outcome.lost or SocketMailError("not sent: the connection kept failing")
                result.fail(error)
                outcome.errors.append((result, error))
            self._record(recorder, message, result, raw)
            accepted += result.status in (SendStatus.SENT, SendStatus.PARTIAL)
        return accepted, retry

    def _next_batch(
        self, queue: deque[EmailMessage], session: Session
    ) -> tuple[list[tuple[EmailMessage, Transaction, list[bytes]]], _Refusal | None]:
        """Take messages from ``queue`` for one pipelined run, up to :data:`BATCH_BYTES`
        (so that large messages are held in memory one at a time) or
        :data:`BATCH_MESSAGES`.  Stops at a message that must raise (returned apart)."""
        batch: list[tuple[EmailMessage, Transaction, list[bytes]]] = []
        size = 0
        while queue and size < BATCH_BYTES and len(batch) < BATCH_MESSAGES:
            message = queue.popleft()
            raw = serialize_parts(message)
            try:
                transaction = session.client.prepare(
                    message.from_email,
                    message.recipients(),
                    raw,
                    delivery_options(message) or self.options.delivery,
                )
            except InvalidAddressError as invalid:
                # Refused before a byte was sent; still an attempt worth a row.
                result = SendResult(str(message.from_email), [], size=sum(map(len, raw)))
                result.fail(invalid)
                return batch, (message, result, raw, invalid)
            unsendable = transaction.result.error
            if unsendable is not None and not self.fail_silently:
                return batch, (message, transaction.result, raw, unsendable)
            if unsendable is not None:
                self._record(session.recorder, message, transaction.result, raw)
                continue
            batch.append((message, transaction, raw))
            size += transaction.size
        return batch, None

    def _record(
        self,
        recorder: AuditRecorder,
        message: EmailMessage,
        result: SendResult,
        raw: list[bytes],
    ) -> None:
        setattr(message, RESULT_ATTRIBUTE, result)
        recorder.message_finished(message, result, raw)

    @property
    def _limits(self) -> PoolLimits:
        return PoolLimits(
            idle_timeout=self.options.pool_idle_timeout,
            max_age=self.options.pool_max_age,
            max_messages=self.options.pool_max_messages,
        )


def delivery_options(message: EmailMessage) -> DeliveryOptions | None:
    """The message's :data:`DELIVERY_ATTRIBUTE` (a mapping is read as keyword arguments)."""
    value = getattr(message, DELIVERY_ATTRIBUTE, None)
    if value is None or isinstance(value, DeliveryOptions):
        return value
    if isinstance(value, dict):
        return DeliveryOptions(**value)
    raise TypeError(
        f"message.{DELIVERY_ATTRIBUTE} must be a django_socketmail.DeliveryOptions or a dict, "
        f"not {type(value).__name__}"
    )
