"""Random cancellation of concurrent async sends: what is reported SENT, the pool, leaks.

Many concurrent callers on one event loop, each with its own backend (as
``get_connection()`` gives every ``asend_mail()`` call), all with ``pool=True``: most send
one message (coalesced runs, :class:`~django_socketmail.async_backend.Coalescer`), some send
two in one ``asend_messages()`` call and some two calls in an ``async with`` block (both on
sessions of the loop's pool, cancelled on the driver itself).  The scripted server pauses
before every reply, sends some in two parts a pause apart and sometimes waits before reading
a message's content; a quarter of the messages are large and the client's send buffer is
narrow; so the cancellations (``task.cancel()`` at random moments) land while connecting,
mid-command, mid-content (DATA, or BDAT when the server offers CHUNKING) and mid-reply (over
the five seeds, as counted in the driver once: about 8 while connecting, 17 waiting for a
reply, 2 with part of a reply read, and 4 while writing a message's content).

Then, per Message-ID: nothing the server did not accept is SENT (in ``socketmail_result``
or in the audit log), nothing it accepted is without a result, FAILED or REFUSED, nothing is
accepted twice; a caller that was not cancelled gets its count and SENT results, and a
cancelled one ``CancelledError`` (the README's contract) and nothing else.  The server saw
only well-formed commands and whole messages, each exactly as serialized (a half-written
command followed by anything would show as a malformed line or a mangled message), and no
pipelining violation.  After the cancellations the pool holds only healthy sessions, every
connection still open is one of them, and a coalesced send and an ``asend_messages([a, b])``
on it succeed.  No task is left once the callers and the runs are done, and no socket or
thread once the loop is closed.  A second test ends the loop itself at a random moment of
the burst (every caller and every run cancelled at once), and a third cancels a caller at
the one moment the random ones rarely hit: while its session is given back to the pool.

The random generator's seed is printed; ``SOCKETMAIL_CANCEL_SEED=<n>`` runs that one seed
instead of the five parametrized ones.  The module takes about 12 s (a random seed 1.5 to
2.5 s, a loop's end about 1 s).
"""

from __future__ import annotations

import asyncio
import gc
import os
import random
import re
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Final

import pytest
from asgiref.sync import SyncToAsync
from django.core.mail import EmailMessage

from django_socketmail import async_backend
from django_socketmail.audit import AuditRecorder
from django_socketmail.email_backend import EmailBackend
from django_socketmail.models import MessageLog
from django_socketmail.serializer import serialize
from django_socketmail.smtp import RecipientsRefused, SendResult, SendStatus, transport

from .hostile.server import (
    DEFAULT_EXTENSIONS,
    Connection,
    HostileSMTPServer,
    Script,
    greet,
    respond,
)

SEED_VARIABLE: Final = "SOCKETMAIL_CANCEL_SEED"
SEEDS: Final = (
    [int(os.environ[SEED_VARIABLE])] if os.environ.get(SEED_VARIABLE) else [1, 2, 3, 4, 5]
)
CALLERS: Final = 40
CANCELLED_SHARE: Final = 0.5
LATEST_START: Final = 0.05
"""Seconds: callers start at random within this."""
LATEST_CANCEL: Final = 0.25
"""Seconds after its start: a caller's cancellation falls within this."""
MAX_PAUSE: Final = 0.006
"""Seconds the server may wait before a reply."""
SPLIT_SHARE: Final = 0.2
"""Replies sent in two parts, a pause apart: cancellations land mid-reply."""
STALLED_SHARE: Final = 0.3
MAX_STALL: Final = 0.03
"""Seconds the server may wait before reading a message's content (in that share)."""
LARGE_SHARE: Final = 0.25
LARGE_BODY_LINES: Final = 2000
"""About 140 kB: more than the socket buffers take at once (see :func:`narrow_send_buffer`)."""
SEND_BUFFER: Final = 16384
"""The client socket's send buffer, in bytes."""
REFUSED_SHARE: Final = 0.1
"""Coalesced messages whose one recipient the server refuses (550)."""
LOOP_ENDS_WITHIN: Final = (0.1, 0.8)
"""Seconds after the burst's start: when the loop ends, in the test that ends it."""
DATE: Final = "Thu, 01 Jan 2026 12:00:00 +0000"
TIMEOUT: Final = 5.0
FD_DIR: Final = "/proc/self/fd"
WELL_FORMED: Final = re.compile(
    rb"EHLO [\w.\[\]:-]+"
    rb"|MAIL FROM:<[^<>\s]*>(?: [A-Z0-9-]+(?:=\S+)?)*"
    rb"|RCPT TO:<[^<>\s]*>(?: [A-Z0-9-]+(?:=\S+)?)*"
    rb"|DATA|BDAT \d+(?: LAST)?|RSET|NOOP|QUIT"
)
MESSAGE_ID: Final = re.compile(rb"(?im)^Message-ID: (<[^>]+>)\r$")


@dataclass
class SlowServer:
    """The rules of a server that pauses before each reply and splits some: what it accepted
    (the Message-IDs it answered 250 to at the end of a message, recorded before the reply
    is sent, as a real server queues the message before it replies)."""

    rng: random.Random
    accepted: list[str] = field(default_factory=list)
    valid_rcpts: dict[int, int] = field(default_factory=dict)
    rng_lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, conn: Connection, code: int, text: str) -> None:
        """Pause, then reply; some replies in two parts, a pause apart."""
        data = f"{code} {text}\r\n".encode()
        with self.rng_lock:
            pause = self.rng.uniform(0, MAX_PAUSE)
            split = self.rng.randrange(1, len(data)) if self.rng.random() < SPLIT_SHARE else 0
            gap = self.rng.uniform(0, MAX_PAUSE)
        conn.sleep(pause)
        if split:
            conn.send(data[:split])
            conn.sleep(gap)
        conn.send(data[split:])

    def stall(self, conn: Connection) -> None:
        """Sometimes wait before reading a message's content: the client's writes block."""
        with self.rng_lock:
            stalled = self.rng.random() < STALLED_SHARE
            pause = self.rng.uniform(0, MAX_STALL)
        if stalled:
            conn.sleep(pause)

    def mail(self, conn: Connection, line: bytes) -> None:
        self.valid_rcpts[conn.index] = 0
        self.answer(conn, 250, "2.1.0 Ok")

    def rcpt(self, conn: Connection, line: bytes) -> None:
        if b"nobody" in line:
            self.answer(conn, 550, "5.1.1 User unknown")
        else:
            self.valid_rcpts[conn.index] += 1
            self.answer(conn, 250, "2.1.5 Ok")

    def data(self, conn: Connection, line: bytes) -> None:
        if not self.valid_rcpts.get(conn.index):
            self.answer(conn, 554, "5.5.1 No valid recipients")
            return
        self.answer(conn, 354, "End data with <CR><LF>.<CR><LF>")
        self.stall(conn)
        conn.read_data()
        self.queued(conn)

    def bdat(self, conn: Connection, line: bytes) -> None:
        words = line.split()
        self.stall(conn)
        conn.read_bytes(int(words[1]))
        if len(words) < 3:
            self.answer(conn, 250, f"2.0.0 {words[1].decode()} octets received")
        elif not self.valid_rcpts.get(conn.index):
            conn.end_transaction()  # no recipient took it: not a message the server has
            self.answer(conn, 554, "5.5.1 No valid recipients")
        else:
            conn.end_bdat()
            self.queued(conn)

    def queued(self, conn: Connection) -> None:
        [mid] = MESSAGE_ID.findall(conn.messages[-1])
        with self.rng_lock:
            self.accepted.append(mid.decode())
        self.answer(conn, 250, f"2.0.0 Ok: queued as C{conn.index}N{len(conn.messages)}")

    def script(self, *, chunking: bool) -> Script:
        rules = {"MAIL": self.mail, "RCPT": self.rcpt, "DATA": self.data, "BDAT": self.bdat}
        extensions = [*DEFAULT_EXTENSIONS, *(["CHUNKING"] if chunking else [])]
        return Script([greet(), respond(rules, extensions=extensions)])


@dataclass
class Caller:
    """One caller: how it sends, what, when it starts and when (if at all) it is cancelled."""

    kind: str
    """``coalesced`` (one message), ``batch`` (two in one call), ``block`` (two calls in an
    ``async with`` block)."""
    messages: list[EmailMessage]
    start: float
    cancel_at: float | None
    cancelled: bool = False
    """``task.cancel()`` was called while the task was not done yet."""
    outcome: Any = None


def make_message(rng: random.Random, seed: int, index: int, *, refusable: bool) -> EmailMessage:
    tag = f"s{seed}-m{index:03d}"
    refused = refusable and rng.random() < REFUSED_SHARE
    body = f"Body of {tag}.\n"
    if rng.random() < LARGE_SHARE:
        body += "".join(f"{tag} line {n:05d} {'x' * 50}\n" for n in range(LARGE_BODY_LINES))
    return EmailMessage(
        f"cancel {tag}",
        body,
        "sender@example.com",
        [f"nobody-{tag}@example.com" if refused else f"{tag}@example.com"],
        headers={"Message-ID": f"<{tag}@cancel.test>", "Date": DATE},
    )


def make_callers(rng: random.Random, seed: int) -> list[Caller]:
    callers: list[Caller] = []
    index = 0
    for _ in range(CALLERS):
        kind = rng.choices(["coalesced", "batch", "block"], weights=[6, 2, 2])[0]
        messages = []
        for _ in range(1 if kind == "coalesced" else 2):
            messages.append(make_message(rng, seed, index, refusable=kind == "coalesced"))
            index += 1
        start = rng.uniform(0, LATEST_START)
        cancelled = rng.random() < CANCELLED_SHARE
        cancel_at = start + rng.uniform(0, LATEST_CANCEL) if cancelled else None
        callers.append(Caller(kind, messages, start, cancel_at))
    return callers


def expected_bytes(msg: EmailMessage) -> bytes:
    """The content the server must have received for ``msg``: its serialization, ending in
    CRLF."""
    data = serialize(msg)
    return data if data.endswith(b"\r\n") else data + b"\r\n"


def mid(msg: EmailMessage) -> str:
    return str(msg.extra_headers["Message-ID"])


def result_of(msg: EmailMessage) -> SendResult | None:
    result = getattr(msg, "socketmail_result", None)
    assert result is None or isinstance(result, SendResult)
    return result


def server_options(server: HostileSMTPServer, **options: Any) -> dict[str, Any]:
    """A backend's options for ``server``: the pool (and so coalescing), the audit log."""
    return {
        "host": server.host,
        "port": server.port,
        "timeout": TIMEOUT,
        "local_hostname": "client.example",
        "pool": True,
        "audit_log": True,
        **options,
    }


def open_fds() -> int:
    return len(os.listdir(FD_DIR))


@pytest.fixture
def narrow_send_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    """A slow link: the kernel takes at most :data:`SEND_BUFFER` bytes of the client's
    writes at once (on loopback it takes about 4 MB, and no cancellation could land in the
    middle of writing a message), so a large message's content is written over many turns
    of the loop.  Set on each connected socket where the driver tunes it."""
    tune = transport.quickack

    def narrow(sock: socket.socket) -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        tune(sock)

    monkeypatch.setattr("django_socketmail.smtp.aio.quickack", narrow)


@pytest.fixture
def baseline() -> tuple[int, int]:
    """File descriptors and threads before the test (asgiref's one thread for
    ``thread_sensitive`` calls lives for the process: started first)."""
    SyncToAsync.single_thread_executor.submit(lambda: None).result()
    gc.collect()
    return open_fds(), threading.active_count()


async def play(caller: Caller, options: dict[str, Any]) -> int | list[int]:
    await asyncio.sleep(caller.start)
    backend = EmailBackend(**options)  # what get_connection() gives each call
    if caller.kind == "block":
        async with backend:
            return [await backend.asend_messages([m]) for m in caller.messages]
    return await backend.asend_messages(caller.messages)


def launch(callers: list[Caller], options: dict[str, Any]) -> list[asyncio.Task[Any]]:
    """Start every caller; cancel the chosen ones on time."""
    loop = asyncio.get_running_loop()
    tasks = [asyncio.ensure_future(play(c, options)) for c in callers]

    def cancel(caller: Caller, task: asyncio.Task[Any]) -> None:
        caller.cancelled = not task.done()
        task.cancel()

    for caller, task in zip(callers, tasks, strict=True):
        if caller.cancel_at is not None:
            loop.call_later(caller.cancel_at, cancel, caller, task)
    return tasks


async def burst(callers: list[Caller], options: dict[str, Any]) -> None:
    """Start every caller, cancel the chosen ones on time, wait for all and for the runs."""
    tasks = launch(callers, options)
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    for caller, outcome in zip(callers, outcomes, strict=True):
        caller.outcome = outcome
    await asyncio.sleep(LATEST_START + LATEST_CANCEL)  # every cancel_at has passed
    deadline = time.monotonic() + TIMEOUT
    while asyncio.all_tasks() - {asyncio.current_task()}:  # the coalesced runs finish
        assert time.monotonic() < deadline, asyncio.all_tasks()
        await asyncio.sleep(0.01)


async def after(options: dict[str, Any], seed: int) -> list[EmailMessage]:
    """The pool after the cancellations: only healthy sessions; a coalesced send and a
    two-message call on it succeed."""
    pool = await async_backend.loop_pool()
    for group in pool._idle.values():
        for session in group:
            assert session.error is None, session.error
            assert session.client.is_connected
            assert not session.client.peer_has_spoken()
    # Every connection still open is one of the pool's: none was dropped on the floor (its
    # socket would only close when the garbage collector finds its transport).
    still_open = open_transports()
    assert len(still_open) == pool.idle_count(), still_open
    rng = random.Random(seed)
    one = make_message(rng, seed, 900, refusable=False)
    two = [make_message(rng, seed, 901 + n, refusable=False) for n in range(2)]
    assert await EmailBackend(**options).asend_messages([one]) == 1
    assert await EmailBackend(**options).asend_messages(two) == 2
    return [one, *two]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.usefixtures("narrow_send_buffer")
def test_random_cancellations(seed: int, baseline: tuple[int, int]) -> None:
    print(f"seed {seed} (run it alone: {SEED_VARIABLE}={seed})")
    rng = random.Random(seed)
    chunking = seed % 2 == 0
    server_rules = SlowServer(random.Random(rng.random()))
    callers = make_callers(rng, seed)
    with HostileSMTPServer(
        server_rules.script(chunking=chunking), max_received=256 * 1024 * 1024
    ) as server:
        options = server_options(server)

        async def main() -> list[EmailMessage]:
            await burst(callers, options)
            return await after(options, seed)

        extra = asyncio.run(main(), debug=True)
        assert server.wait_closed(count=len(server.connections), timeout=TIMEOUT)
    connections = server.connections
    accepted = Counter(server_rules.accepted)

    # Each caller: its count, or CancelledError if (and only if) it was cancelled.
    outcomes = Counter[str]()
    for caller in callers:
        outcome = caller.outcome
        if isinstance(outcome, asyncio.CancelledError):
            assert caller.cancelled, caller
            outcomes["cancelled"] += 1
            continue
        got = [getattr(result_of(m), "status", None) for m in caller.messages]
        if caller.kind == "coalesced" and "nobody" in caller.messages[0].to[0]:
            assert isinstance(outcome, RecipientsRefused), (caller, outcome)
            assert got == [SendStatus.REFUSED]
            outcomes["refused"] += 1
            continue
        expected = [1, 1] if caller.kind == "block" else len(caller.messages)
        assert outcome == expected, (caller, outcome)
        assert got == [SendStatus.SENT] * len(caller.messages)
        outcomes["sent"] += 1
    print(f"callers: {dict(outcomes)}; connections: {len(connections)}")
    assert outcomes["cancelled"] > 0

    messages = [m for c in callers for m in c.messages] + extra
    statuses = check_results(messages, accepted)
    assert statuses["sent"] > 0
    check_server(connections, messages, accepted)
    assert not server.pipelined_violation
    check_nothing_left_open(baseline)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.usefixtures("narrow_send_buffer")
def test_the_loop_ending_mid_burst(seed: int, baseline: tuple[int, int]) -> None:
    """The same burst, and the loop ends at a random moment of it (``asyncio.run``'s
    coroutine returns), so the loop cancels every caller still waiting and every coalesced
    run in flight.  The same truths hold, and each message the server accepted has its
    result (SENT, or UNKNOWN when its reply had not been read) and its audit row."""
    print(f"seed {seed} (run it alone: {SEED_VARIABLE}={seed})")
    rng = random.Random(seed)
    server_rules = SlowServer(random.Random(rng.random()))
    callers = make_callers(rng, seed)
    end_at = rng.uniform(*LOOP_ENDS_WITHIN)
    with HostileSMTPServer(
        server_rules.script(chunking=seed % 2 == 1), max_received=256 * 1024 * 1024
    ) as server:
        options = server_options(server)

        async def main() -> None:
            launch(callers, options)
            await asyncio.sleep(end_at)

        asyncio.run(main(), debug=True)
        assert server.wait_closed(count=len(server.connections), timeout=TIMEOUT)
    accepted = Counter(server_rules.accepted)
    messages = [m for c in callers for m in c.messages]
    print(f"loop ended after {end_at:.3f} s; {sum(accepted.values())} messages accepted")
    check_results(messages, accepted)
    check_server(server.connections, messages, accepted)
    assert not server.pipelined_violation
    check_nothing_left_open(baseline)


def check_results(messages: list[EmailMessage], accepted: Counter[str]) -> Counter[str]:
    """Per Message-ID: nothing SENT that the server did not accept, nothing it accepted
    without a result nor FAILED or REFUSED, nothing accepted twice; the audit log says what
    the results say.  Returns how many messages ended in each status."""
    rows = Counter[tuple[str, str]](MessageLog.objects.values_list("message_id", "status"))
    statuses = Counter[str]()
    for msg in messages:
        result = result_of(msg)
        status = "none" if result is None else result.status.value
        statuses[status] += 1
        assert accepted[mid(msg)] <= 1, mid(msg)
        if status == "sent":
            assert accepted[mid(msg)] == 1, (mid(msg), result)
            assert result is not None
            assert result.queue_id
        elif status in ("none", "failed", "refused"):
            assert accepted[mid(msg)] == 0, (mid(msg), result)
        else:
            assert status == "unknown", (mid(msg), result)
        logged = {s: n for (m, s), n in rows.items() if m == mid(msg)}
        assert logged == ({} if result is None else {status: 1}), (mid(msg), logged, result)
    print(f"messages: {dict(statuses)}")
    assert set(accepted) <= {mid(m) for m in messages}
    return statuses


def check_server(
    connections: list[Connection], messages: list[EmailMessage], accepted: Counter[str]
) -> None:
    """The server saw well-formed commands only, and each message whole, as serialized."""
    by_id = {mid(m): expected_bytes(m) for m in messages}
    for conn in connections:
        assert conn.errors == []
        assert conn.violations == []
        for command in conn.commands:
            assert WELL_FORMED.fullmatch(command), (conn, command)
        for content in conn.messages:
            [found] = MESSAGE_ID.findall(content)
            assert content == by_id[found.decode()], conn
    assert sum(len(conn.messages) for conn in connections) == sum(accepted.values())


def check_nothing_left_open(baseline: tuple[int, int]) -> None:
    """No more file descriptors or threads than before, once the loop and the server are
    closed (polled for up to 2 s: the server's threads end on their own)."""
    fds, threads = baseline
    gc.collect()
    deadline = time.monotonic() + 2.0
    while open_fds() > fds or threading.active_count() > threads:
        assert time.monotonic() < deadline, (open_fds(), fds, threading.active_count(), threads)
        time.sleep(0.01)


def open_transports() -> list[asyncio.Transport]:
    """The asyncio transports not closed (nor closing), found by the garbage collector.
    (``type()``, not ``isinstance()``: that would set up any of Django's lazy objects.)"""
    gc.collect()
    transports = [t for t in gc.get_objects() if issubclass(type(t), asyncio.Transport)]
    return [t for t in transports if not t.is_closing()]


@pytest.mark.parametrize("kind", ["batch", "block"])
def test_a_caller_cancelled_while_giving_its_connection_back_does_not_drop_it(
    kind: str, baseline: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The send is done and the backend is giving the session back to the loop's pool
    (writing its audit rows in a thread first) when the caller is cancelled: the caller gets
    CancelledError, its messages stay SENT, and the connection is closed at once (it was
    left open outside the pool, until the garbage collector found its transport); the next
    call opens a new one.  ``batch``: the end of a two-message ``asend_messages()``;
    ``block``: ``async with``'s exit."""
    flushes: list[int] = []
    entered, go_on = threading.Event(), threading.Event()
    flush = AuditRecorder.flush
    hold_at = 1 if kind == "batch" else 2  # a block's first flush ends the call inside it

    def held(self: AuditRecorder) -> None:
        flushes.append(1)
        if len(flushes) == hold_at:
            entered.set()
            go_on.wait(TIMEOUT)
        flush(self)

    monkeypatch.setattr(AuditRecorder, "flush", held)
    rng = random.Random(0)
    first = [make_message(rng, 0, n, refusable=False) for n in range(2)]
    then = [make_message(rng, 0, n, refusable=False) for n in range(2, 4)]
    with HostileSMTPServer(Script([greet(), respond({})])) as server:
        options = server_options(server, audit_log=False)

        async def send(backend: EmailBackend) -> int:
            if kind == "block":
                async with backend:
                    return await backend.asend_messages(first)
            return await backend.asend_messages(first)

        async def main() -> None:
            task = asyncio.ensure_future(send(EmailBackend(**options)))
            while not entered.is_set():
                assert not task.done(), task
                await asyncio.sleep(0.001)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            go_on.set()
            deadline = time.monotonic() + TIMEOUT
            while asyncio.all_tasks() - {asyncio.current_task()}:
                assert time.monotonic() < deadline, asyncio.all_tasks()
                await asyncio.sleep(0.01)
            pool = await async_backend.loop_pool()
            assert pool.idle_count() == 0
            assert open_transports() == []
            assert await EmailBackend(**options).asend_messages(then) == 2

        asyncio.run(main(), debug=True)
        assert server.wait_closed(count=2, timeout=TIMEOUT)
    assert [getattr(result_of(m), "status", None) for m in first + then] == [SendStatus.SENT] * 4
    cut, fresh = server.connections
    assert (len(cut.messages), cut.ended_by, cut.count("QUIT")) == (2, "client", 0)
    assert (len(fresh.messages), fresh.commands[-1]) == (2, b"QUIT")  # the loop's end QUIT it
    check_nothing_left_open(baseline)


def test_a_run_ended_by_the_loops_shutdown_starts_no_other(baseline: tuple[int, int]) -> None:
    """The loop's end cancels every task it has, the coalesced runs and their callers
    alike, in an order of its own.  Here: two runs in flight (the cap), ten more callers
    waiting; the callers and one run end first, then the other run.  A run ended so
    starts no other run for the messages still waiting: that run's task would not be among
    those the loop cancels and waits for, and its connection would be left open when the
    loop closes (``test_the_loop_ending_mid_burst`` failed now and then that way)."""
    stalls: list[Connection] = []

    def sit(conn: Connection, line: bytes) -> None:  # on the final dot: no reply for now
        stalls.append(conn)
        conn.sleep(TIMEOUT)
        conn.close()

    rng = random.Random(0)
    msgs = [make_message(rng, 0, n, refusable=False) for n in range(12)]
    with HostileSMTPServer(Script([greet(), respond({".": sit})])) as server:
        options = server_options(server, audit_log=False, max_connections=2)

        async def stalled(count: int) -> None:
            while len(stalls) < count:
                await asyncio.sleep(0.005)

        async def main() -> None:
            me = asyncio.current_task()
            first = asyncio.ensure_future(EmailBackend(**options).asend_messages(msgs[:1]))
            await stalled(1)
            (run_a,) = asyncio.all_tasks() - {me, first}
            second = asyncio.ensure_future(EmailBackend(**options).asend_messages(msgs[1:2]))
            await stalled(2)
            (run_b,) = asyncio.all_tasks() - {me, first, second, run_a}
            waiting = [
                asyncio.ensure_future(EmailBackend(**options).asend_messages([m])) for m in msgs[2:]
            ]
            await asyncio.sleep(0.05)  # each has queued its message (no third run: the cap)
            assert asyncio.all_tasks() == {me, first, second, run_a, run_b, *waiting}
            callers = [first, second, *waiting]
            for task in [*callers, run_b]:
                task.cancel()
            await asyncio.wait([*callers, run_b])
            await asyncio.sleep(0)  # the ended run leaves the coalescer's runners
            run_a.cancel()
            await asyncio.wait([run_a])
            await asyncio.sleep(0)
            assert asyncio.all_tasks() == {me}

        asyncio.run(main(), debug=True)
        assert server.wait_closed(count=2, timeout=TIMEOUT)
    assert len(server.connections) == 2
    assert [result_of(m) for m in msgs[2:]] == [None] * 10  # never attempted
    check_nothing_left_open(baseline)


@pytest.mark.django_db(transaction=True)
def test_a_caller_cancelled_before_its_audit_write_starts_still_gets_its_rows(
    baseline: tuple[int, int],
) -> None:
    """The audit rows are written in a worker thread.  When every thread is busy the write
    waits for one; a caller cancelled meanwhile still gets its rows: the write runs once a
    thread is free (the loop's end waits for it), as one cancelled while it runs."""
    free = threading.Event()
    msg = make_message(random.Random(0), 0, 0, refusable=False)
    with HostileSMTPServer(Script([greet(), respond({})])) as server:
        options = server_options(server, pool=False)

        async def main() -> None:
            loop = asyncio.get_running_loop()
            loop.set_default_executor(ThreadPoolExecutor(max_workers=1))
            busy = loop.run_in_executor(None, free.wait, TIMEOUT)
            task = asyncio.ensure_future(EmailBackend(**options).asend_messages([msg]))
            while not any(conn.count("QUIT") for conn in server.connections):
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.05)  # the session's end: its rows wait for the thread
            assert not task.done()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            free.set()
            await busy

        asyncio.run(main(), debug=True)
        assert server.wait_closed(count=1, timeout=TIMEOUT)
    result = result_of(msg)
    assert result is not None
    assert result.status is SendStatus.SENT
    assert list(MessageLog.objects.values_list("status", flat=True)) == ["sent"]
    check_nothing_left_open(baseline)
