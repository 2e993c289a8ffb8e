"""The backend's async side: ``await backend.asend_messages(messages)`` and ``async with
backend:``, on the asyncio driver (:mod:`.smtp.aio`) and the same engine as the sync side.

:class:`AsyncBackendMixin` is mixed into :class:`~.email_backend.EmailBackend`; it reuses the
sync backend's options, batching (:meth:`EmailBackend._next_batch`), settlement
(:meth:`EmailBackend._settle_batch`) and recording, so an async call returns the same
count, sets the same ``message.socketmail_result`` and raises the same exception classes as
``send_messages()``.  Only the waiting differs: connecting, sending and QUIT are awaited on
the running loop, and the audit log is written in a worker thread (the loop's default
executor, as ``sync_to_async(..., thread_sensitive=False)``) with that thread's own database
connection, so it neither blocks the loop nor shares the fate of a transaction the caller
holds elsewhere.

:class:`AsyncSession` is :class:`~.session.Session`'s twin for the asyncio driver: the
connection, its recorder and its error, from open to end.  A session belongs to the event
loop that opened it; on another loop it is not reused.

Cancellation: cancelling ``asend_messages()`` abandons its connection (the driver tells the
engine, so no message is reported SENT that the server did not accept), records every
message of the run in flight with its truthful result, ends the session and re-raises.
With ``pool=True`` outside ``async with``, sends are coalesced (:class:`Coalescer`): the
run belongs to the mailer, so a cancelled caller stops waiting while its message finishes
(and is recorded) with the others'.  A caller cancelled while its session is given back to
the pool (``async with``'s exit too) closes the session rather than pool it.  When the loop
shuts down, the runs in flight are cancelled like a caller's send: each message of the run
is recorded with its truthful result.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import time
import weakref
from collections import deque
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol, cast

from asgiref.sync import sync_to_async
from django.db import close_old_connections, connections
from django.views.decorators.debug import sensitive_variables

from .audit import AuditRecorder
from .pool import MAX_IDLE_PER_KEY
from .session import SessionCore, SessionKey
from .smtp import RecipientStatus, SocketMailError
from .smtp.aio import AsyncSMTPClient, SendCancelledError
from .smtp.driver import QUIT_TIMEOUT
from .smtp.engine import Batch
from .smtp.transaction import Transaction
from .smtp.transcript import Listener

if TYPE_CHECKING:
    from django.core.mail import EmailMessage

    from .audit import AuditRecorder as Recorder
    from .conf import BackendOptions
    from .email_backend import EmailBackend
    from .pool import PoolLimits
    from .session import Session

__all__ = ["AsyncBackendMixin", "AsyncEmailBackend", "AsyncSession", "flush_in_thread"]

logger = logging.getLogger("django_socketmail")

BATCH_MESSAGES: Final = 500
"""Most messages in one coalesced run (as the sync backend's runs)."""


async def flush_in_thread(recorder: Recorder) -> None:
    """``recorder.flush()`` in a worker thread (never raises, like the flush itself): the
    loop goes on meanwhile.  The thread writes with its own database connection, outside
    any atomic block of the caller's, so the rows survive the caller's rollback; after
    the write that connection is closed unless ``CONN_MAX_AGE`` keeps it (as Django does
    at the end of a request), so executor threads do not each hold one for good.  A
    connection to an in-memory SQLite database is closed too (Django's ``close()`` keeps
    those, lest the data go; the connection that made the database keeps it alive).

    Cancelling the caller does not stop the write, even one still waiting for a free thread
    (``sync_to_async`` would drop that one): it runs to its end in the loop's default
    executor, whose threads the loop's end waits for."""
    loop = asyncio.get_running_loop()
    context = contextvars.copy_context()
    await asyncio.shield(loop.run_in_executor(None, context.run, _flush_then_tidy, recorder))


def _flush_then_tidy(recorder: Recorder) -> None:
    try:
        recorder.flush()
    finally:
        close_old_connections()
        opened: Sequence[Any] = connections.all(initialized_only=True)
        for connection in opened:
            raw = connection.connection
            if raw is not None and connection.vendor == "sqlite" and connection.is_in_memory_db():
                raw.close()
                connection.connection = None


class AsyncSession(SessionCore):
    """A connection on the asyncio driver, its recorder and its error, from open to end."""

    client: AsyncSMTPClient

    def __init__(
        self, options: BackendOptions, mailer: str, listeners: Iterable[Listener] = ()
    ) -> None:
        super().__init__(options, mailer, listeners, AsyncSMTPClient)
        self.loop = asyncio.get_running_loop()

    @property
    def is_open(self) -> bool:
        """Connected and usable, in the process and on the event loop that opened it."""
        return (
            self.client.is_connected and os.getpid() == self._pid and _running_loop() is self.loop
        )

    @sensitive_variables()
    async def open(self) -> None:
        """Connect, TLS, AUTH; on failure (or cancellation) record the session and raise."""
        try:
            await self.client.connect()
        except SocketMailError as error:
            self.error = error
            await self.end()
            raise
        except asyncio.CancelledError:
            self.error = SendCancelledError("cancelled while opening the session")
            await self.end(quit_budget=0)
            raise

    async def send(self, transactions: Sequence[Transaction], *, stop_on_error: bool) -> Batch:
        """Send on this session; a broken connection becomes the session's error."""
        self._before_send()
        try:
            batch = await self.client.send(transactions, stop_on_error=stop_on_error)
        except asyncio.CancelledError:
            self.error = self.error or SendCancelledError("cancelled while sending")
            raise
        return self._after_send(batch)

    async def end(self, *, quit_budget: float = QUIT_TIMEOUT) -> None:
        """QUIT (within ``quit_budget`` seconds; none left, or another loop: just close),
        then write the session's record with its error.  Idempotent; raises nothing but
        a cancellation of the caller."""
        if self._ended:
            return
        self._ended = True
        if os.getpid() != self._pid:
            self.client.close()
            return
        try:
            if quit_budget > 0 and _running_loop() is self.loop:
                await self.client.quit(budget=quit_budget)
            else:
                self.client.close()
        except asyncio.CancelledError:
            self.client.close()
            raise
        except Exception:  # closing must not turn a sent message into an exception
            logger.exception("django-socketmail: error while closing %r", self)
            self.client.close()
        self.recorder.session_ended(self.error)
        await flush_in_thread(self.recorder)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class AsyncPool:
    """Idle async sessions of one event loop, by :class:`~.session.SessionKey` (as the sync
    pool keys them), handed out under the same :class:`~.pool.PoolLimits` and liveness
    check.  One per loop (so never shared across loops or threads): :func:`loop_pool`.
    When the loop shuts down (``asyncio.run`` ending, or ``loop.shutdown_asyncgens()``),
    every idle session is QUIT within :data:`~.smtp.client.QUIT_TIMEOUT` in all."""

    def __init__(self) -> None:
        self._idle: dict[SessionKey, list[AsyncSession]] = {}
        self._keeper: Any = None

    async def acquire(self, key: SessionKey, limits: PoolLimits) -> AsyncSession | None:
        """A usable idle session for ``key``, or None; unusable ones met are ended."""
        sessions = self._idle.get(key, [])
        while sessions:
            candidate = sessions.pop()  # most recently used first
            if limits.allow(cast("Session", candidate), time.monotonic()):
                return candidate
            await candidate.end()
        return None

    async def release(self, session: AsyncSession, limits: PoolLimits) -> None:
        """Keep ``session`` for the next borrower, or end it (broken, worn out, cancelled
        mid-command, or too many idle already)."""
        session.idle_since = time.monotonic()
        sessions = self._idle.setdefault(session.key, [])
        if limits.allow(cast("Session", session), session.idle_since) and (
            len(sessions) < MAX_IDLE_PER_KEY
        ):
            sessions.append(session)
            return
        await session.end()

    async def clear(self, budget: float = QUIT_TIMEOUT) -> None:
        """End every idle session, QUITting within ``budget`` seconds in all."""
        sessions = [s for group in self._idle.values() for s in group]
        self._idle.clear()
        deadline = time.monotonic() + budget
        for session in sessions:
            await session.end(quit_budget=min(QUIT_TIMEOUT, deadline - time.monotonic()))

    def idle_count(self) -> int:
        """How many sessions wait in the pool."""
        return sum(len(group) for group in self._idle.values())


_POOLS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncPool] = (
    weakref.WeakKeyDictionary()
)


async def _closing_with_the_loop(pool: AsyncPool) -> Any:
    """An async generator the loop finalizes at shutdown (``shutdown_asyncgens``): the
    one hook asyncio gives for "this loop is ending", used to QUIT the pool's sessions."""
    try:
        yield
    finally:
        await pool.clear()


async def loop_pool() -> AsyncPool:
    """The running loop's pool (made on first use, ended with the loop)."""
    loop = asyncio.get_running_loop()
    pool = _POOLS.get(loop)
    if pool is None:
        pool = _POOLS[loop] = AsyncPool()
        pool._keeper = _closing_with_the_loop(pool)
        await pool._keeper.__anext__()  # registers it with the loop's asyncgen hooks
    return pool


DEFAULT_MAX_CONNECTIONS: Final = 3
"""Most connections the coalesced runs of one mailer use at once on one event loop when
``max_connections`` is not set (Microsoft 365 allows 3 concurrent connections per
mailbox)."""
MIN_SHARE: Final = 8
"""Fewest waiting messages per runner for which another connection is opened."""


class _Request:
    """One caller's message waiting for (or in) a coalesced run."""

    __slots__ = ("accepted", "backend", "future", "message", "tries")

    def __init__(self, backend: _Host, message: EmailMessage) -> None:
        self.backend = backend
        self.message = message
        self.future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.tries: dict[int, int] = {}
        self.accepted = 0


class Coalescer:
    """Concurrent sends of one mailer (one :class:`~.session.SessionKey`) on one event loop,
    joined into pipelined runs: each run takes every message waiting when it starts and
    sends them in one :meth:`AsyncSession.send` on a pooled connection, while the next
    callers queue for the run after it.  At most ``max_connections`` runs are in flight at
    once, each on its own connection.  Each caller gets its own count, its own
    ``socketmail_result`` and its own exception (as ``asend_messages([message])`` alone
    would give it); a message whose connection broke before it can have been delivered
    joins a later run (at most :data:`~.email_backend.MAX_RETRIES` times).  The runs are
    tasks of their own: a caller cancelled while its message is in a run does not cut the
    connection the others share (the message finishes and is recorded)."""

    def __init__(self, key: SessionKey, max_connections: int = DEFAULT_MAX_CONNECTIONS) -> None:
        self.key = key
        self.max_connections = max_connections
        self.waiting: deque[_Request] = deque()
        self.runners: set[asyncio.Task[None]] = set()
        self.busy = 0
        self.connections_opened = 0

    async def submit(self, backend: _Host, messages: Sequence[EmailMessage]) -> int:
        """Send ``messages`` (one, or any number with ``fail_silently``) in the next runs;
        the count the server accepted, or the first error unless ``fail_silently``."""
        requests = [_Request(backend, m) for m in messages]
        self.waiting.extend(requests)
        self._spawn()
        counts = await asyncio.gather(*(r.future for r in requests))
        return sum(counts)

    def _spawn(self) -> None:
        """Start runners, up to the cap: one when every runner is busy, and more while the
        messages waiting exceed :data:`MIN_SHARE` for each runner about to take some (a
        new connection costs a few round trips: worth it only for enough messages)."""
        while self.waiting and len(self.runners) < self.max_connections:
            idle_runners = len(self.runners) - self.busy
            if idle_runners > 0 and len(self.waiting) <= idle_runners * MIN_SHARE:
                return
            task = asyncio.ensure_future(self._runner())
            self.runners.add(task)
            task.add_done_callback(self.runners.discard)

    async def _runner(self) -> None:
        session: AsyncSession | None = None
        backend: _Host | None = None
        try:
            while self.waiting:
                # An equal share for each runner about to take some (itself included).
                idle_runners = max(1, len(self.runners) - self.busy)
                share = min(-(-len(self.waiting) // idle_runners), BATCH_MESSAGES)
                run = [self.waiting.popleft() for _ in range(share)]
                backend = run[0].backend
                self.busy += 1
                finished: list[tuple[_Request, BaseException | None]] = []
                cancelled = False
                try:
                    if session is None or not session.is_open:
                        if session is not None:
                            await _release(backend, session)
                        session = await self._session(backend, run, finished)
                    if session is not None:
                        await self._run(session, run, finished)
                        if not self.waiting or not session.is_open:
                            # Back in the pool before the callers hear: a caller that
                            # returns finds its connection pooled.
                            held, session = session, None
                            await _release(backend, held)
                except BaseException as failure:
                    # A bug or the loop's shutdown: nobody may wait for ever.
                    told = {id(request) for request, _ in finished}
                    finished += [(r, failure) for r in run if id(r) not in told]
                    cancelled = isinstance(failure, asyncio.CancelledError)
                    raise
                finally:
                    self.busy -= 1
                    for request, error in finished:
                        _finish(request, error)
                    # Cancelled by the loop's end (which cancels the callers too): a run
                    # started now would not be waited for, and its connection left open.
                    if not cancelled:
                        self._spawn()
        finally:
            if session is not None and backend is not None:
                await _release(backend, session)

    async def _session(
        self,
        backend: _Host,
        run: list[_Request],
        finished: list[tuple[_Request, BaseException | None]],
    ) -> AsyncSession | None:
        pool = await loop_pool()
        session = await pool.acquire(self.key, backend._limits)
        if session is not None:
            return session
        session = AsyncSession(backend.options, backend.mailer_alias, backend.transcript_listeners)
        self.connections_opened += 1
        try:
            await session.open()
        except SocketMailError as error:
            for request in run:
                finished.append((request, None if request.backend.fail_silently else error))
            return None
        return session

    async def _run(
        self,
        session: AsyncSession,
        run: list[_Request],
        finished: list[tuple[_Request, BaseException | None]],
    ) -> None:
        items: list[tuple[_Request, tuple[EmailMessage, Transaction, list[bytes]]]] = []
        for request in run:
            batch, refused = request.backend._next_batch(
                deque([request.message]), cast("Session", session)
            )
            if refused is not None:
                request.backend._record(session.recorder, *refused[:3])
                finished.append((request, refused[3]))
            elif not batch:
                finished.append((request, None))  # unsendable and fail_silently: recorded
            else:
                items.append((request, batch[0]))
        if not items:
            return
        try:
            outcome = await session.send([item[1] for _, item in items], stop_on_error=False)
        except asyncio.CancelledError:  # the loop's shutdown: the run ends as a caller's would
            for request, item in items:
                _record_cancelled(request.backend, session, [item])
            raise
        for request, item in items:
            result = item[1].result
            mine = Batch(
                stop_on_error=False,
                errors=[(r, e) for r, e in outcome.errors if r is result],
                unattempted=[t for t in outcome.unattempted if t.result is result],
                lost=outcome.lost,
                lost_behind_dot=outcome.lost_behind_dot,
            )
            accepted, retry = request.backend._settle_batch(
                [item], mine, session.recorder, request.tries
            )
            request.accepted += accepted
            if retry:
                self.waiting.append(request)
            elif mine.errors and not request.backend.fail_silently:
                finished.append((request, mine.errors[0][1]))
            else:
                finished.append((request, None))


def _finish(request: _Request, error: BaseException | None) -> None:
    if request.future.done():
        return  # the caller was cancelled: the result is on its message all the same
    if isinstance(error, asyncio.CancelledError):
        request.future.cancel()
    elif error is not None:
        request.future.set_exception(error)
    else:
        request.future.set_result(request.accepted)


async def _release(backend: _Host, session: AsyncSession) -> None:
    """Write the session's audit rows (in a thread), then give it to the loop's pool, which
    keeps or ends it.  Cancelled while the rows are written (the write goes on in its
    thread), the session is closed at once, not dropped open, and the cancellation
    propagates: it may not be pooled while that thread still reads its recorder."""
    try:
        await flush_in_thread(session.recorder)
    except asyncio.CancelledError:
        session.client.close()
        raise
    await (await loop_pool()).release(session, backend._limits)


_COALESCERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[SessionKey, Coalescer]] = (
    weakref.WeakKeyDictionary()
)


def _coalescer(backend: _Host) -> Coalescer:
    """The running loop's coalescer for the backend's mailer."""
    loop = asyncio.get_running_loop()
    by_key = _COALESCERS.setdefault(loop, {})
    key = SessionKey.of(backend.options, backend.mailer_alias)
    coalescer = by_key.get(key)
    if coalescer is None:
        coalescer = by_key[key] = Coalescer(key)
    coalescer.max_connections = backend.options.max_connections or DEFAULT_MAX_CONNECTIONS
    return coalescer


class _Host(Protocol):
    """What the mixin needs from the backend it is mixed into."""

    options: BackendOptions
    mailer_alias: str
    fail_silently: bool
    transcript_listeners: list[Listener]

    def send_messages(self, email_messages: Sequence[EmailMessage]) -> int: ...

    def _next_batch(self, queue: deque[EmailMessage], session: Session) -> tuple[Any, Any]: ...

    def _settle_batch(
        self, batch: Any, outcome: Batch, recorder: AuditRecorder, tries: dict[int, int]
    ) -> tuple[int, list[EmailMessage]]: ...

    def _record(
        self, recorder: AuditRecorder, message: EmailMessage, result: Any, raw: list[bytes]
    ) -> None: ...

    @property
    def _limits(self) -> PoolLimits: ...


class _AsyncState:
    """A backend's async side: its open session and a lock per event loop."""

    def __init__(self) -> None:
        self.session: AsyncSession | None = None
        self.last_session: AsyncSession | None = None
        self.locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary()
        )

    def lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        lock = self.locks.get(loop)
        if lock is None:
            lock = self.locks[loop] = asyncio.Lock()
        return lock


def _state(backend: object) -> _AsyncState:
    """The backend's async state, kept in its instance dictionary."""
    state: _AsyncState = vars(backend).setdefault("_socketmail_async", _AsyncState())
    return state


class AsyncBackendMixin:
    """``asend_messages()``, ``aopen()``, ``aclose()`` and ``async with`` for
    :class:`~.email_backend.EmailBackend`; see the module docstring."""

    @property
    def async_session(self) -> AsyncSession | None:
        """The open async session (None when closed)."""
        return _state(self).session

    @property
    def last_async_session(self) -> AsyncSession | None:
        """The most recent async session, open or not: what it negotiated stays readable."""
        return _state(self).last_session

    async def __aenter__(self: _Host) -> Any:
        await AsyncBackendMixin.aopen(self)
        return self

    async def __aexit__(self: _Host, *exc_info: object) -> None:
        await AsyncBackendMixin.aclose(self)

    async def aopen(self: _Host) -> bool | None:
        """Ensure an open, fully set-up async session: True if this call opened it, False
        if one was open, None if opening failed and ``fail_silently`` is set."""
        state = _state(self)
        session = state.session
        if session is not None and session.is_open:
            return False
        await _end_session(self, state)
        if self.options.pool:
            pool = await loop_pool()
            pooled = await pool.acquire(
                SessionKey.of(self.options, self.mailer_alias), self._limits
            )
            if pooled is not None:
                state.session = state.last_session = pooled
                return True
        session = AsyncSession(self.options, self.mailer_alias, self.transcript_listeners)
        state.last_session = session
        try:
            await session.open()
        except SocketMailError:
            if not self.fail_silently:
                raise
            return None
        state.session = session
        return True

    async def aclose(self: _Host) -> None:
        """QUIT (falling back to closing) and record the session.  Does not raise for a
        dead server."""
        await _end_session(self, _state(self))

    async def asend_messages(self: _Host, email_messages: Sequence[EmailMessage]) -> int:
        """``send_messages()``, awaited: the same count, results, audit rows and exceptions
        (see :meth:`.email_backend.EmailBackend.send_messages`).  With ``queue=True`` the sync
        method runs in a thread (it only stores the messages)."""
        if not email_messages:
            return 0
        if getattr(self.options, "queue", False):
            return await sync_to_async(self.send_messages)(email_messages)
        state = _state(self)
        if (
            self.options.pool
            and state.session is None
            and (len(email_messages) == 1 or self.fail_silently)
        ):
            # Outside ``async with``: join the mailer's next pipelined run (see Coalescer).
            return await _coalescer(self).submit(
                self, [m for m in email_messages if m.recipients()]
            )
        async with state.lock():
            opened = await AsyncBackendMixin.aopen(self)
            if state.session is None or opened is None:
                return 0
            try:
                return await _send_all(self, state, [m for m in email_messages if m.recipients()])
            finally:
                if opened:
                    await _end_session(self, state)
                elif state.session is not None:
                    await flush_in_thread(state.session.recorder)


async def _end_session(backend: _Host, state: _AsyncState) -> None:
    """Give the session back to the loop's pool (``pool=True``), or end it.  A cancellation
    meanwhile closes it at once (see :func:`_release`): it is not left open outside the
    pool."""
    session, state.session = state.session, None
    if session is None:
        return
    if backend.options.pool and session.loop is _running_loop():
        await _release(backend, session)
    else:
        await session.end()


async def _send_all(backend: _Host, state: _AsyncState, messages: list[EmailMessage]) -> int:
    """:meth:`EmailBackend._send_all`, awaited (same runs, retries and raising)."""
    sent = 0
    queue = deque(messages)
    tries: dict[int, int] = {}
    while queue:
        if (state.session is None or not state.session.is_open) and (
            await AsyncBackendMixin.aopen(backend) is None
        ):
            return sent
        session = state.session
        assert session is not None
        # The batching reads only session.client.prepare and session.recorder.
        batch, refused = backend._next_batch(queue, cast("Session", session))
        try:
            outcome = await session.send(
                [t for _, t, _ in batch], stop_on_error=not backend.fail_silently
            )
        except asyncio.CancelledError:
            _record_cancelled(backend, session, batch)
            raise
        accepted, retry = backend._settle_batch(batch, outcome, session.recorder, tries)
        sent += accepted
        if outcome.errors and not backend.fail_silently:
            raise outcome.errors[0][1]
        if refused is not None:
            backend._record(session.recorder, *refused[:3])
            raise refused[3]
        del batch, outcome
        queue.extendleft(reversed(retry))
    return sent


def _record_cancelled(
    backend: _Host,
    session: AsyncSession,
    batch: list[tuple[EmailMessage, Transaction, list[bytes]]],
) -> None:
    """The run was cancelled: each message keeps what the server's replies said (the driver
    told the engine the connection was lost); one never started fails with the
    cancellation.  Each is recorded, so the audit log and ``socketmail_result`` stay true."""
    error = session.error or SendCancelledError("cancelled while sending")
    for message, transaction, raw in batch:
        result = transaction.result
        if any(r.status is RecipientStatus.PENDING for r in result.recipients):
            result.fail(error)
        backend._record(session.recorder, message, result, raw)


if TYPE_CHECKING:
    AsyncEmailBackend: type[EmailBackend]
    """:class:`~.email_backend.EmailBackend` with the async methods (itself, once the
    mixin is in its bases)."""


_standin: list[type] = []


def __getattr__(name: str) -> Any:
    """``AsyncEmailBackend``, resolved lazily (importing this module does not import the
    backend, so the backend may import the mixin from here)."""
    if name != "AsyncEmailBackend":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from .email_backend import EmailBackend

    if issubclass(EmailBackend, AsyncBackendMixin):
        return EmailBackend
    if not _standin:
        _standin.append(
            type(
                "AsyncEmailBackend",
                (AsyncBackendMixin, EmailBackend),
                {"__module__": __name__, "__doc__": EmailBackend.__doc__},
            )
        )
    return _standin[0]
