"""The audit log's writer thread, for backends with ``audit_background=True``.

:meth:`.audit.AuditRecorder.flush` hands its rows (plain values, taken in the caller's
thread) to :func:`submit`, which queues them and returns; one daemon thread per process
writes what is queued, the rows of several calls in one transaction (one commit for all:
on SQLite in Django's default mode a commit waits for the disk), after waiting
:data:`GROUP_WINDOW` seconds for more once work arrived.

Contract:

- the rows of one session are written in the order of its flushes (a session has at most
  one job waiting: a later flush is merged into it, and the thread writes one batch at a
  time);
- the thread writes with its own database connections (Django's are per thread), outside
  any transaction of the caller, so the rows survive the caller's rollback; it closes them
  after :data:`IDLE_CLOSE` seconds without work;
- a write follows the guarantees of :mod:`.audit` (bounded time per write, NULs escaped,
  no credential in a column; a failure is logged and its rows dropped, never resent); a
  batch that fails for another reason than a lock is written again one job at a time, so
  one bad row costs only its own call's rows;
- the queue holds at most :data:`MAX_PENDING` messages: past it, the caller writes its rows
  itself, as without the option (after the thread's write of the same session, if one is
  running), so rows are neither dropped nor waited for without bound;
- an in-memory SQLite database cannot be seen from another thread: its rows are written
  by the caller, as without the option;
- a forked child starts with an empty queue and no thread (the parent's thread writes the
  parent's rows; the child makes its own thread when it first needs one);
- at exit (:mod:`atexit`), what is queued is written within :data:`EXIT_BUDGET` seconds;
  after that every flush writes inline;
- :func:`drain` (:func:`.audit.drain_audit_log`) waits until the queue is empty and the
  thread idle: tests and scripts that read rows right after sending call it.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections import deque
from typing import Any, Final

from django.db import OperationalError, connections, router

from .audit import WRITE_BUDGET, AuditJob, log_failed, write_inline, write_retrying

__all__ = [
    "EXIT_BUDGET",
    "GROUP_WINDOW",
    "IDLE_CLOSE",
    "MAX_PENDING",
    "drain",
    "release_connections",
    "submit",
]

logger = logging.getLogger("django_socketmail")

MAX_PENDING: Final = 10_000
"""Messages (a job counts one more, for its session row) queued at most, per process."""
MAX_BATCH: Final = 500
"""Jobs written in one transaction at most."""
GROUP_WINDOW: Final = 0.05
"""Seconds the thread waits, once work arrived, for more calls' rows to share the commit
(none while :func:`drain` waits): the rows of a call appear at most this much later, and
the thread's work tends to fall while the callers wait for their servers."""
IDLE_CLOSE: Final = 5.0
"""Seconds without work after which the thread closes its database connections."""
EXIT_BUDGET: Final = 5.0
"""Seconds the exit handler waits for the queue to be written."""


def _weight(job: AuditJob) -> int:
    return 1 + len(job.messages)


class _Writer:
    """One process's queue and thread (a forked child makes its own)."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.work = threading.Condition(self.lock)
        """Notified when a job is queued (the thread waits on it)."""
        self.rest = threading.Condition(self.lock)
        """Notified when a batch is written (:func:`drain` waits on it)."""
        self.jobs: deque[AuditJob] = deque()
        self.waiting: dict[tuple[int, str | None], AuditJob] = {}
        """The queued job of each recorder (by its id) and database: later flushes merge."""
        self.pending = 0
        """Weight of the jobs queued or being written."""
        self.busy = False
        self.draining = 0
        """Callers of :func:`drain` waiting: the thread does not wait for more work."""
        self.release_wanted = False
        """Set by :func:`release_connections`: close the thread's connections when idle."""
        self.closing = False
        self.thread: threading.Thread | None = None

    def put(self, job: AuditJob) -> bool:
        """Queue ``job`` (or merge it into its recorder's waiting job); False when it must
        be written by the caller (queue full, closing, no thread to be had)."""
        key = (id(job.recorder), job.database)
        weight = _weight(job)
        with self.lock:
            full = self.pending + weight > MAX_PENDING
            if self.closing or full or not self._ensure_thread():
                # The caller writes, taking its own waiting rows along (in order).
                earlier = self.waiting.pop(key, None)
                if earlier is not None:
                    self.jobs.remove(earlier)
                    self.pending -= _weight(earlier)
                    earlier.merge(job)
                    job.messages, job.state = earlier.messages, earlier.state
                return False
            earlier = self.waiting.get(key)
            if earlier is not None:
                earlier.merge(job)  # its session row is counted already
                self.pending += len(job.messages)
            else:
                self.waiting[key] = job
                self.jobs.append(job)
                self.pending += weight
            self.work.notify()
            return True

    def _ensure_thread(self) -> bool:
        if self.thread is not None and self.thread.is_alive():
            return True
        thread = threading.Thread(target=self._run, name="django-socketmail-audit", daemon=True)
        try:
            thread.start()
        except RuntimeError:  # interpreter shutting down
            return False
        self.thread = thread
        return True

    def _run(self) -> None:
        connected = False
        while True:
            with self.lock:
                while not self.jobs and not self.release_wanted:
                    if not self.work.wait(IDLE_CLOSE if connected else None) and connected:
                        break
                window = time.monotonic() + GROUP_WINDOW
                while self.jobs and len(self.jobs) < MAX_BATCH and not self._hurried():
                    left = window - time.monotonic()
                    if left <= 0:
                        break
                    self.work.wait(left)
                if not self.jobs:
                    batch: list[AuditJob] = []
                else:
                    batch = [self.jobs.popleft() for _ in range(min(MAX_BATCH, len(self.jobs)))]
                    for job in batch:
                        del self.waiting[(id(job.recorder), job.database)]
                    self.busy = True
                weight = sum(_weight(job) for job in batch)  # before any merge
            if not batch:
                connections.close_all()  # this thread's own connections only
                connected = False
                with self.lock:
                    self.release_wanted = False
                    self.rest.notify_all()
                continue
            try:
                _write_batch(batch)
            except Exception:  # pragma: no cover - _write_batch logs its own failures
                logger.exception("django-socketmail: the audit writer thread failed")
            finally:
                connected = True
                with self.lock:
                    self.pending -= weight
                    self.busy = False
                    self.rest.notify_all()

    def _hurried(self) -> bool:
        return bool(self.draining or self.closing or self.release_wanted)

    def drain(self, timeout: float | None, *, release: bool = False) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.lock:
            if release and self.thread is not None and self.thread.is_alive():
                self.release_wanted = True
            self.draining += 1
            self.work.notify()
            try:
                while self.jobs or self.busy or (release and self.release_wanted):
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        return False
                    self.rest.wait(left)
            finally:
                self.draining -= 1
        return True


def _write_batch(batch: list[AuditJob]) -> None:
    """Write the batch, one transaction per database."""
    from .models import SessionLog

    by_alias: dict[str, dict[int, AuditJob]] = {}
    for job in batch:
        alias = job.database or router.db_for_write(SessionLog)
        group = by_alias.setdefault(alias, {})
        earlier = group.get(id(job.recorder))
        if earlier is not None:  # one recorder, two names of one database (None and its alias)
            earlier.merge(job)
        else:
            group[id(job.recorder)] = job
    for alias, group in by_alias.items():
        jobs = list(group.values())
        held = []
        try:
            for job in jobs:
                if job.recorder.writing.acquire(timeout=2 * WRITE_BUDGET):
                    held.append(job)
                else:
                    try:
                        raise TimeoutError("the caller is still writing this session's rows")
                    except TimeoutError:
                        log_failed(job)
            _write_jobs(alias, held)
        finally:
            for job in held:
                job.recorder.writing.release()


def _write_jobs(alias: str, jobs: list[AuditJob]) -> None:
    if not jobs:
        return
    try:
        write_retrying(alias, jobs, time.monotonic() + WRITE_BUDGET, retry=True)
        return
    except Exception as error:
        _close_broken(alias)
        if (isinstance(error, OperationalError) and "locked" in str(error)) or len(jobs) == 1:
            for job in jobs:
                log_failed(job)
            return
    for job in jobs:  # one bad row costs its own call's rows only
        try:
            write_retrying(alias, [job], time.monotonic() + WRITE_BUDGET, retry=True)
        except Exception:
            _close_broken(alias)
            log_failed(job)


def _close_broken(alias: str) -> None:
    """After a failed write: close this thread's connection unless it is still usable (the
    next write opens a new one).  A healthy connection is kept between batches (Django's
    ``CONN_MAX_AGE`` is about requests, which this thread does not serve) and closed when
    the thread has been idle for :data:`IDLE_CLOSE` seconds."""
    connection = connections[alias]
    if connection.connection is not None and not connection.is_usable():
        connection.close()


_writer: _Writer | None = None
_writer_lock = threading.Lock()


def _current() -> _Writer:
    global _writer
    writer = _writer
    if writer is not None and writer.pid == os.getpid():
        return writer
    with _writer_lock:
        if _writer is None or _writer.pid != os.getpid():
            _writer = _Writer()
        return _writer


def _in_memory(alias: str) -> bool:
    connection: Any = connections[alias]
    return connection.vendor == "sqlite" and bool(connection.is_in_memory_db())


def submit(job: AuditJob) -> None:
    """Queue ``job`` for the writer thread, or write it here (see the module's contract).
    Never raises."""
    from .models import SessionLog

    try:
        inline = _in_memory(job.database or router.db_for_write(SessionLog))
    except Exception:  # an unknown alias: the inline write reports it
        inline = True
    if inline or not _current().put(job):
        write_inline(job)


def drain(timeout: float | None = None) -> bool:
    """Wait until this process's queue is empty and its thread idle; False if that did not
    happen within ``timeout`` seconds (None: no limit)."""
    writer = _writer
    if writer is None or writer.pid != os.getpid():
        return True
    return writer.drain(timeout)


def release_connections(timeout: float | None = None) -> bool:
    """:func:`drain`, then have the thread close its database connections (it opens new ones
    when next needed): before deleting or replacing a database the thread has written to,
    or to leave no connection open while idle.  False if not done within ``timeout``."""
    writer = _writer
    if writer is None or writer.pid != os.getpid():
        return True
    return writer.drain(timeout, release=True)


def _at_exit() -> None:
    writer = _writer
    if writer is None or writer.pid != os.getpid():
        return
    with writer.lock:
        writer.closing = True  # from now on, each flush writes its own rows
    if not writer.drain(EXIT_BUDGET):
        logger.error(
            "django-socketmail: audit rows of %d messages or sessions were still unwritten "
            "%.0f s after exit began; they are lost",
            writer.pending,
            EXIT_BUDGET,
        )


def _after_fork_in_child() -> None:
    global _writer, _writer_lock
    _writer = None  # the parent's queue is the parent's to write
    _writer_lock = threading.Lock()  # the parent's thread may have held it at the fork


atexit.register(_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
