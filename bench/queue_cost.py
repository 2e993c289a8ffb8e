"""What queued delivery (``queue=True``) costs: in the request, and per message delivered.

Run from the repository root (PostgreSQL 15 from Debian, psycopg, aiosmtpd and the
django-tasks backport on Django 5.2)::

    .venv/bin/python bench/queue_cost.py                       # 500 calls, 200 at 10 ms, 1,000 msgs
    .venv/bin/python bench/queue_cost.py --calls 200 --slow-calls 100 --messages 500

It starts a private PostgreSQL (``tests/pg.py``'s :func:`start_postgres`, stopped at the end),
configures Django in this process (``settings.configure``: that database, the app, the
audit log on, and as the Tasks backend django-tasks-db's, in the same database, as the
scale-out setup has it: each enqueue is a row; nothing runs those tasks but us; ``--tasks
dummy`` keeps them in memory instead), migrates, and measures:

a. **The request.**  ``send_mail()`` of a 2 KB message to one recipient, each call in its
   own ``transaction.atomic()`` as a view under ``ATOMIC_REQUESTS`` does (commit included),
   then each call on its own as a view in Django's default autocommit mode does (each
   kind of view in rounds of its own), with ``EMAIL_BACKEND`` our backend and
   ``SOCKETMAIL["queue"] = True``; against Django's
   own SMTP backend's ``send_mail()`` (a new connection per call, as ``send_mail()`` makes
   one) to aiosmtpd's ``Sink`` in a process of its own (:func:`smtp_process`, plain port:
   an in-process server thread would compete for the GIL with the calls measured), directly
   and through ``bench/proxy.py``'s :class:`ProxyProcess` with 5 ms each way (10 ms round
   trip).  The two kinds of call alternate, so both see the same machine; medians and
   p95 over ``--calls`` (``--slow-calls`` at 10 ms) after 20 warm-up calls of each.
b. **Delivery.**  The outbox emptied, ``--messages`` messages stored, then one
   ``Worker("").run()`` (the task's body) sends them all to the local server (plain port,
   no delay), audit log on.  Counted on the worker's connection with
   ``connection.execute_wrapper``: statements by kind and table, their client-side time,
   and the commits of atomic blocks (each also costs a ``BEGIN``: round trips are about
   statements + 2 x commits); the worker thread's CPU (``time.thread_time``: the SMTP
   server's thread excluded) and the PostgreSQL server's CPU (every postgres process's
   utime + stime from ``/proc``); WAL written (``pg_current_wal_lsn``; the server runs
   with ``full_page_writes=off``, so production writes more); and each table's size
   (``pg_total_relation_size``) after the run and after ``VACUUM FULL``; then the
   statements of a run that finds nothing due.
c. **Claiming from a large outbox.**  ``--history`` sent rows and ``--backlog`` due rows
   inserted by SQL, then ``--claims`` claims of a batch (``Worker.claim``) timed, with the
   plan of the claim's SELECT; then the same with a partial index on the due rows (created
   for the measurement, dropped after it).
d. **Runs that find every connection slot held.**  ``max_connections=1`` with its slot
   leased by another worker, ``--chain-requests`` requests of one message each, then three
   rounds of running every pending task: how many are pending after each round.

Not a test: nothing here asserts a time.  It prints the tables that ``docs/benchmarks.md``
("Queued delivery (round two)") quotes.
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file is named like the standard library's ``queue``: take its folder off the path
# before anything imports ``queue``, and put the repository root there instead.
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import argparse  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any, Final  # noqa: E402

from bench.proxy import ProxyProcess, Route  # noqa: E402
from bench.run import free_port, wait_for_greeting  # noqa: E402
from tests.pg import PostgresServer, start_postgres  # noqa: E402

DATABASE: Final = "socketmail_bench"


def _body(size: int, seed: int = 20261203) -> str:
    """``size`` characters of pseudo-random lowercase words in lines of about 70: text
    that PostgreSQL's TOAST compression cannot shrink to almost nothing, as it would a
    repeated line (which would flatter the outbox's size)."""
    import random

    pick = random.Random(seed)
    lines: list[str] = []
    line = ""
    while sum(len(x) + 1 for x in lines) < size:
        word = "".join(pick.choice("etaoinshrdlcumwfgypbvk") for _ in range(pick.randint(1, 9)))
        if len(line) + len(word) >= 70:
            lines.append(line)
            line = ""
        line = f"{line} {word}" if line else word
    return ("\n".join(lines) + "\n")[:size]


BODY: Final = _body(2048)
SENDER: Final = "shop@example.com"
RECIPIENT: Final = "customer@example.com"
WARMUP: Final = 20
STORE_CHUNK: Final = 100
"""Messages stored per transaction before the delivery run (not timed)."""


def configure(server: PostgresServer, smtp_port: int, tasks_backend: str) -> None:
    """Django in this process: PostgreSQL, the app, queue on; the Tasks backend is
    django-tasks-db's (``"db"``: each enqueue is a row in the same database) or the dummy
    one (``"dummy"``: enqueued tasks are kept in memory)."""
    import django
    from django.conf import settings

    tasks = "django.tasks" if django.VERSION >= (6, 0) else "django_tasks"
    backend = f"{tasks}.backends.dummy.DummyBackend"
    apps = ["django.contrib.contenttypes", "django.contrib.auth", "django_socketmail"]
    if tasks_backend == "db":
        backend = "django_tasks_db.DatabaseBackend"
        apps.append("django_tasks_db")
    settings.configure(
        SECRET_KEY="bench-only",
        USE_TZ=True,
        DEBUG=False,
        INSTALLED_APPS=apps,
        DATABASES={"default": server.settings_dict(DATABASE)},
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
        TASKS={"default": {"BACKEND": backend}},
        EMAIL_BACKEND="django_socketmail.email_backend.EmailBackend",
        EMAIL_HOST="127.0.0.1",
        EMAIL_PORT=smtp_port,
        EMAIL_TIMEOUT=30,
        SOCKETMAIL={
            "queue": True,
            "audit_log": True,
            "local_hostname": "bench.example",
        },
        LOGGING_CONFIG=None,
    )
    django.setup()


def migrate() -> None:
    from django.core.management import call_command

    call_command("migrate", verbosity=0, interactive=False)


def truncate_app_tables() -> None:
    """Empty every table of the app (outbox, limits, audit log)."""
    from django.apps import apps
    from django.db import connection

    tables = [m._meta.db_table for m in apps.get_app_config("django_socketmail").get_models()]
    with connection.cursor() as cursor:
        cursor.execute(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE")


# -- a. the request ----------------------------------------------------------------------


def queued_call() -> None:
    """What a view under ATOMIC_REQUESTS does: send_mail() inside the request's transaction."""
    from django.core.mail import send_mail
    from django.db import transaction

    with transaction.atomic():
        send_mail("Your order", BODY, SENDER, [RECIPIENT])


def queued_call_autocommit() -> None:
    """What a view does in Django's default autocommit mode: send_mail(), no transaction."""
    from django.core.mail import send_mail

    send_mail("Your order", BODY, SENDER, [RECIPIENT])


VIEWS: Final = (
    ("ATOMIC_REQUESTS", queued_call, True),
    ("autocommit", queued_call_autocommit, False),
)
"""The two kinds of view measured: name, our call, whether Django's call is made in a
transaction too."""


def django_call(port: int, *, atomic: bool = True) -> Callable[[], None]:
    """Django's SMTP backend: send_mail() with a new connection, as send_mail() makes one
    (in a transaction when ``atomic``, as the view's other call is)."""
    from contextlib import nullcontext

    from django.core.mail import get_connection, send_mail
    from django.db import transaction

    def call() -> None:
        connection = get_connection(
            "django.core.mail.backends.smtp.EmailBackend", host="127.0.0.1", port=port
        )
        with transaction.atomic() if atomic else nullcontext():
            send_mail("Your order", BODY, SENDER, [RECIPIENT], connection=connection)

    return call


@contextmanager
def smtp_process() -> Iterator[int]:
    """aiosmtpd's ``Sink`` (accepts every message and drops it) in a process of its own, on a
    free port of 127.0.0.1: the server's work does not compete for this process's GIL with
    the calls measured (an in-process server thread does, and slows the calls that follow
    Django's).  Stopped at the end, by its pid."""
    port = free_port()
    command = [sys.executable, "-m", "aiosmtpd", "-n", "-l", f"127.0.0.1:{port}"]
    process = subprocess.Popen(
        [*command, "-c", "aiosmtpd.handlers.Sink"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_greeting(port, time.monotonic() + 20)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@dataclass
class Timings:
    label: str
    seconds: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    """This process's CPU seconds per call."""

    @property
    def cpu_median_ms(self) -> float:
        return statistics.median(self.cpu) * 1000

    @property
    def median_ms(self) -> float:
        return statistics.median(self.seconds) * 1000

    @property
    def p95_ms(self) -> float:
        ordered = sorted(self.seconds)
        return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))] * 1000


def alternate(
    calls: int,
    first: tuple[str, Callable[[], None]],
    second: tuple[str, Callable[[], None]],
    count: StatementCount,
) -> tuple[Timings, Timings]:
    """Time ``calls`` calls of each, alternating, after :data:`WARMUP` of each; ``count``
    counts the first one's timed calls only."""
    timings = (Timings(first[0]), Timings(second[0]))
    for index in range(WARMUP + calls):
        for position, ((_, call), timing) in enumerate(zip((first, second), timings, strict=True)):
            count.enabled = position == 0 and index >= WARMUP
            started, cpu = time.perf_counter(), time.process_time()
            call()
            elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
            count.enabled = True
            if index >= WARMUP:
                timing.seconds.append(elapsed)
                timing.cpu.append(cpu)
    count.calls = calls
    return timings


@dataclass
class StatementCount:
    enabled: bool = True
    calls: int = 0
    statements: int = 0
    seconds: float = 0.0
    commits: int = 0
    commit_seconds: float = 0.0
    kinds: Counter[str] = field(default_factory=Counter)


TABLE: Final = re.compile(r'(?:FROM|INTO|UPDATE|JOIN)\s+"?([a-z_]+)"?', re.IGNORECASE)


def _kind(sql: str) -> str:
    words = sql.lstrip().split(None, 1)
    verb = words[0].upper() if words else "?"
    if verb in ("SAVEPOINT", "RELEASE", "ROLLBACK"):
        return verb
    match = TABLE.search(sql)
    return f"{verb} {match.group(1) if match else '?'}"


@contextmanager
def counted() -> Iterator[StatementCount]:
    """Count the default connection's statements (and their time) and its commits."""
    from django.db import connection

    count = StatementCount()

    def wrapper(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        started = time.perf_counter()
        if not count.enabled:
            return execute(sql, params, many, context)
        try:
            return execute(sql, params, many, context)
        finally:
            count.seconds += time.perf_counter() - started
            count.statements += 1
            count.kinds[_kind(sql)] += 1

    original = connection.commit

    def commit() -> None:
        if not count.enabled:
            original()
            return
        started = time.perf_counter()
        try:
            original()
        finally:
            count.commit_seconds += time.perf_counter() - started
            count.commits += 1

    connection.commit = commit  # type: ignore[method-assign]
    try:
        with connection.execute_wrapper(wrapper):
            yield count
    finally:
        del connection.commit


# -- b. delivery ---------------------------------------------------------------------------


def store_messages(count: int) -> None:
    from django.core.mail import EmailMessage, get_connection
    from django.db import transaction

    backend = get_connection()
    for start in range(0, count, STORE_CHUNK):
        with transaction.atomic():
            backend.send_messages(
                [
                    EmailMessage(f"Your order {n}", BODY, SENDER, [RECIPIENT])
                    for n in range(start, min(count, start + STORE_CHUNK))
                ]
            )


def server_cpu(server: PostgresServer) -> float:
    """CPU seconds (user + system) of the postmaster and of every child of it so far, those
    that exited included."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid, ppid = int(entry), int(fields[1])
        if pid == server.pid:  # with its children that exited (cutime, cstime)
            total += sum(int(value) for value in fields[11:15])
        elif ppid == server.pid:
            total += int(fields[11]) + int(fields[12])
    return total / ticks


def wal_position() -> str:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_current_wal_lsn()")
        return str(cursor.fetchone()[0])


def wal_bytes(since: str) -> int:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)", [since])
        return int(cursor.fetchone()[0])


def outbox_updates() -> tuple[int, int]:
    """The outbox table's (updates, HOT updates) so far, as the statistics have them."""
    from django.db import connection

    from django_socketmail.outbox import OutboxMessage

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_stat_force_next_flush()")
        time.sleep(1.1)  # a backend reports its counters at most once a second
        cursor.execute("SELECT pg_stat_clear_snapshot()")
        cursor.execute(
            "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relid = %s::regclass",
            [OutboxMessage._meta.db_table],
        )
        updated, hot = cursor.fetchone()
    return int(updated), int(hot)


@dataclass
class TableSize:
    table: str
    rows: int
    total: int
    heap: int
    toast: int
    indexes: int
    compact_total: int = 0


def table_sizes() -> list[TableSize]:
    from django.apps import apps
    from django.db import connection

    models = list(apps.get_app_config("django_socketmail").get_models())
    if apps.is_installed("django_tasks_db"):
        models += apps.get_app_config("django_tasks_database").get_models()
    sizes = []
    with connection.cursor() as cursor:
        for model in models:
            table = model._meta.db_table
            cursor.execute(
                "SELECT (SELECT count(*) FROM " + table + "), pg_total_relation_size(%s), "
                "pg_relation_size(%s), coalesce(pg_total_relation_size(NULLIF(reltoastrelid, 0)),"
                " 0), pg_indexes_size(%s) FROM pg_class WHERE oid = %s::regclass",
                [table] * 4,
            )
            rows, total, heap, toast, indexes = cursor.fetchone()
            sizes.append(TableSize(table, rows, total, heap, toast, indexes))
    return sizes


def compact_sizes(sizes: list[TableSize]) -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        for size in sizes:
            cursor.execute("VACUUM FULL " + size.table)
            cursor.execute("SELECT pg_total_relation_size(%s)", [size.table])
            size.compact_total = int(cursor.fetchone()[0])


@dataclass
class Delivery:
    messages: int
    counts: dict[str, int]
    wall: float
    worker_cpu: float
    process_cpu: float
    server_cpu: float
    wal: int
    statements: StatementCount
    store_statements: StatementCount
    store_wall: float
    store_wal: int
    store_server_cpu: float
    hot: tuple[int, int]
    empty: StatementCount
    empty_wall: float
    received: int
    sizes: list[TableSize]
    message_bytes: int


def deliver(server: PostgresServer, smtp: Any, messages: int) -> Delivery:
    from django.db.models import Avg

    from django_socketmail.outbox import OutboxMessage
    from django_socketmail.worker import Worker

    truncate_app_tables()
    received_before = len(smtp.messages)
    wal_start = wal_position()
    started, store_cpu = time.perf_counter(), server_cpu(server)
    with counted() as store_count:
        store_messages(messages)
    store_wall = time.perf_counter() - started
    store_cpu = server_cpu(server) - store_cpu
    store_wal = wal_bytes(wal_start)
    updates_before = outbox_updates()
    wal_start = wal_position()
    cpu_server, cpu_process = server_cpu(server), time.process_time()
    cpu_thread, started = time.thread_time(), time.perf_counter()
    with counted() as count:
        outcome = Worker("").run()
    wall = time.perf_counter() - started
    cpu_thread, cpu_process = time.thread_time() - cpu_thread, time.process_time() - cpu_process
    cpu_server = server_cpu(server) - cpu_server
    wal = wal_bytes(wal_start)
    updates = outbox_updates()
    hot = (updates[0] - updates_before[0], updates[1] - updates_before[1])
    started = time.perf_counter()
    with counted() as empty:  # a run that finds nothing due (a task per commit does this)
        Worker("").run()
    empty_wall = time.perf_counter() - started
    sizes = table_sizes()
    compact_sizes(sizes)
    size = OutboxMessage.objects.aggregate(size=Avg("size"))["size"] or 0
    return Delivery(
        message_bytes=round(size),
        messages=messages,
        counts=outcome,
        wall=wall,
        worker_cpu=cpu_thread,
        process_cpu=cpu_process,
        server_cpu=cpu_server,
        wal=wal,
        statements=count,
        store_statements=store_count,
        store_wall=store_wall,
        store_wal=store_wal,
        store_server_cpu=store_cpu,
        hot=hot,
        empty=empty,
        empty_wall=empty_wall,
        received=len(smtp.messages) - received_before,
        sizes=sizes,
    )


# -- c. claiming from a large outbox -----------------------------------------------------


@dataclass
class Backlog:
    queued: int
    history: int
    load_seconds: float
    claims: list[float]
    plan: str
    indexed_claims: list[float]
    indexed_plan: str


def claim_at_backlog(queued: int, history: int, claims: int) -> Backlog:
    """Fill the outbox by SQL with ``history`` sent rows and ``queued`` due ones (no
    content: claiming never reads it), then time ``claims`` claims of a batch by
    ``Worker.claim`` and show the plan of its SELECT (run, then rolled back); then the same
    with a partial index on the due rows (:data:`PARTIAL_INDEX`, dropped afterwards)."""
    from django.db import connection

    from django_socketmail.outbox import OutboxMessage

    truncate_app_tables()
    table = OutboxMessage._meta.db_table
    started = time.perf_counter()
    with connection.cursor() as cursor:
        for status, count, age in (("sent", history, "86400"), ("queued", queued, "600")):
            cursor.execute(
                "INSERT INTO " + table + " (mailer, status, created, next_attempt, attempts, "
                "lease_owner, content_may_have_left, sender, recipients, message_id, subject, "
                "size, delivery, last_reply, last_error, queue_id) "
                "SELECT '', %s, now() - random() * %s * interval '1 second', "
                "now() - random() * %s * interval '1 second', 0, '', false, %s, "
                "jsonb_build_array(%s), '<' || n || '@bench.example>', 'Your order ' || n, "
                "2352, '{}'::jsonb, '', '', '' FROM generate_series(1, %s) AS n",
                [status, age, age, SENDER, RECIPIENT, count],
            )
        cursor.execute("ANALYZE " + table)
    load_seconds = time.perf_counter() - started
    first = _claims(claims)
    with connection.cursor() as cursor:
        cursor.execute(
            f"CREATE INDEX {PARTIAL_INDEX} ON {table} (mailer, next_attempt, id) "
            "WHERE status IN ('queued', 'deferred')"
        )
        cursor.execute("ANALYZE " + table)
    second = _claims(claims)
    with connection.cursor() as cursor:
        cursor.execute(f"DROP INDEX {PARTIAL_INDEX}")
    return Backlog(queued, history, load_seconds, *first, *second)


PARTIAL_INDEX: Final = "bench_outbox_due_partial"
"""The index part c tries: the due rows only, in the order the claim takes them."""


def _claims(claims: int) -> tuple[list[float], str]:
    """Time ``claims`` claims of a batch, each by a new :class:`Worker`; the plan of the
    last one's SELECT, run again in a transaction that is rolled back."""
    from django.db import connection, transaction

    from django_socketmail.worker import BATCH, Worker

    timings = []
    statements: list[tuple[str, Any]] = []

    def capture(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        if "FOR UPDATE" in sql:
            statements.append((sql, params))
        return execute(sql, params, many, context)

    for _ in range(claims):
        worker = Worker("")  # a run of its own, as on another machine
        started = time.perf_counter()
        with connection.execute_wrapper(capture):
            rows = worker.claim(BATCH)
        timings.append(time.perf_counter() - started)
        assert len(rows) == BATCH, len(rows)
    sql, params = statements[-1]
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + sql, params)
        plan = "\n".join(line for (line,) in cursor.fetchall())
        transaction.set_rollback(True)
    return timings, plan


# -- d. runs that find every connection slot held ----------------------------------------


def chains(requests: int, rounds: int) -> list[tuple[int, int]]:
    """With ``max_connections=1`` and the one slot held by another (live) worker: store
    ``requests`` messages, one per request, then ``rounds`` times run every pending task
    (``Worker("").run()`` in-process, as ``db_worker`` would, then marked done); return
    (tasks run, tasks pending after) per round.  Needs the django-tasks-db backend."""
    from datetime import timedelta

    from django.conf import settings
    from django.test import override_settings
    from django.utils import timezone
    from django_tasks_db.models import DBTaskResult

    from django_socketmail.outbox import MailerSlot
    from django_socketmail.worker import Worker

    truncate_app_tables()
    DBTaskResult.objects.all().delete()
    socketmail: dict[str, Any] = getattr(settings, "SOCKETMAIL")  # noqa: B009
    # Through override_settings, whose signal makes the worker's options be read again.
    with override_settings(SOCKETMAIL={**socketmail, "max_connections": 1}):
        expires = timezone.now() + timedelta(minutes=5)
        MailerSlot.objects.create(mailer="", number=0, holder="another-worker", expires=expires)
        for _ in range(requests):
            queued_call()
        counts = []
        for _ in range(rounds):
            pending = list(DBTaskResult.objects.filter(status="READY"))
            for task in pending:
                Worker("").run()
                DBTaskResult.objects.filter(pk=task.pk).update(status="SUCCESSFUL")
            counts.append((len(pending), DBTaskResult.objects.filter(status="READY").count()))
        return counts


# -- report --------------------------------------------------------------------------------


def report(
    rounds: list[tuple[str, Timings, Timings, StatementCount]],
    delivery: Delivery,
    calls: str,
    load: tuple[float, float],
    backlog: Backlog | None,
    chained: tuple[int, list[tuple[int, int]]] | None,
) -> str:
    n = delivery.messages
    s = delivery.statements
    lines = [
        f"Machine: {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"PostgreSQL 15 (private, on the same machine, fsync off), Django "
        f"{_django_version()}; {calls}; load average {load[0]:.1f} at the start, "
        f"{load[1]:.1f} at the end.",
        "",
        "**a. `send_mail()` in the request** (2 KB, one recipient; a view under "
        "`ATOMIC_REQUESTS`, the call in its transaction, and one in Django's default "
        "autocommit mode):",
        "",
        "| round trip | `queue=True` median | p95 | CPU | Django SMTP median | p95 | CPU "
        "| ratio (medians) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, ours, theirs, _ in rounds:
        lines.append(
            f"| {label} | {ours.median_ms:.2f} ms | {ours.p95_ms:.2f} ms | "
            f"{ours.cpu_median_ms:.2f} ms | {theirs.median_ms:.2f} ms | "
            f"{theirs.p95_ms:.2f} ms | {theirs.cpu_median_ms:.2f} ms | "
            f"{theirs.median_ms / ours.median_ms:.1f}x |"
        )
    lines += [
        "",
        "CPU: this process's CPU time per call (median); the SMTP server runs in a process "
        "of its own.",
    ]
    for label, _, _, stored in rounds:
        if not label.endswith("(loopback)"):
            continue
        per_call = stored.calls
        in_db = (stored.seconds + stored.commit_seconds) / per_call * 1000
        lines += [
            "",
            f"Per queued call ({label}): {stored.statements / per_call:.1f} statements "
            f"({_kinds(stored.kinds, per_call)}) and {stored.commits / per_call:.1f} commit "
            f"(each with its BEGIN); {in_db:.2f} ms of the call is spent in them (client "
            "side), the rest is Python (the backend, the message, serializing it).",
        ]
    lines += [
        "",
        f"**b. Delivery by one `Worker('').run()`**: {n} messages stored, "
        f"{delivery.received} received by the server, outcome {delivery.counts}.",
        "",
        "| per message | value |",
        "|---|---:|",
        f"| wall time (one worker, loopback SMTP, audit on) | {delivery.wall / n * 1000:.2f} ms "
        f"({n / delivery.wall:.0f} msg/s) |",
        f"| statements | {s.statements / n:.2f} |",
        f"| commits (each also a BEGIN) | {s.commits / n:.3f} |",
        f"| time in statements + commits (client side) | "
        f"{(s.seconds + s.commit_seconds) / n * 1000:.3f} ms |",
        f"| worker CPU (its thread) | {delivery.worker_cpu / n * 1000:.3f} ms |",
        f"| worker process CPU (with the SMTP server's thread) | "
        f"{delivery.process_cpu / n * 1000:.3f} ms |",
        f"| PostgreSQL CPU (all its processes) | {delivery.server_cpu / n * 1000:.3f} ms |",
        f"| WAL written | {delivery.wal / n:.0f} bytes |",
        "",
        f"Statements of the run by kind (per message): {_kinds(s.kinds, n)}.",
        "",
        f"Outbox row updates in the run: {delivery.hot[0] / n:.2f} per message, "
        f"{delivery.hot[1] / n:.2f} of them HOT (no index entries written).",
        "",
        f"A run that finds nothing due (with {n} sent rows in the outbox): "
        f"{delivery.empty.statements} statements and {delivery.empty.commits} commits "
        f"({_kinds(delivery.empty.kinds, 1)}), {delivery.empty_wall * 1000:.1f} ms.",
        "",
        f"Storing them (the request side, {STORE_CHUNK} per transaction): "
        f"{delivery.store_statements.statements / n:.2f} statements, "
        f"{delivery.store_server_cpu / n * 1000:.3f} ms of PostgreSQL CPU and "
        f"{delivery.store_wal / n:.0f} bytes of WAL per message.",
        "",
        f"Each message is {delivery.message_bytes} bytes as serialized (headers + the 2 KB "
        "body); the audit log keeps no body (`audit_body_bytes=0`, the default).",
        "",
        "| table | rows | total after run | per row | after VACUUM FULL | per row | "
        "heap / TOAST / indexes after run |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for size in delivery.sizes:
        many = size.rows >= 10
        per_row = f"{size.total / size.rows:.0f} B" if many else "-"
        compact = f"{size.compact_total / size.rows:.0f} B" if many else "-"
        lines.append(
            f"| {size.table} | {size.rows} | {_bytes(size.total)} | {per_row} | "
            f"{_bytes(size.compact_total)} | {compact} | "
            f"{_bytes(size.heap)} / {_bytes(size.toast)} / {_bytes(size.indexes)} |"
        )
    if backlog is not None:
        ms = sorted(t * 1000 for t in backlog.claims)
        indexed = sorted(t * 1000 for t in backlog.indexed_claims)
        lines += [
            "",
            f"**c. Claiming from a large outbox**: {backlog.history:,} sent rows and "
            f"{backlog.queued:,} due ones (inserted by SQL in {backlog.load_seconds:.1f} s), "
            f"{len(ms)} claims of 100 by `Worker.claim` (SELECT ... FOR UPDATE SKIP LOCKED, "
            f"then UPDATE, then the rows read back): median {statistics.median(ms):.1f} ms, "
            f"slowest {ms[-1]:.1f} ms. The SELECT's plan (the last claim's, run again and "
            "rolled back):",
            "",
            "```",
            backlog.plan,
            "```",
            "",
            f"The same {len(indexed)} claims with a partial index added, `CREATE INDEX ON "
            "outboxmessage (mailer, next_attempt, id) WHERE status IN ('queued', "
            f"'deferred')`: median {statistics.median(indexed):.1f} ms, slowest "
            f"{indexed[-1]:.1f} ms; plan:",
            "",
            "```",
            backlog.indexed_plan,
            "```",
        ]
    if chained:
        requests, counts = chained
        steps = "; ".join(f"ran {ran}, then {left} pending" for ran, left in counts)
        lines += [
            "",
            f"**d. Runs that find the only connection slot held** (`max_connections=1`, the "
            f"slot leased by another worker; {requests} requests of one message, then "
            f"every pending task run in turn): {steps}.",
        ]
    return "\n".join(lines)


def _kinds(kinds: Counter[str], per: int) -> str:
    return ", ".join(f"{kind} {count / per:.2f}" for kind, count in kinds.most_common())


def _bytes(value: int) -> str:
    return f"{value / 1024:.0f} KiB" if value < 1024 * 1024 else f"{value / 1048576:.1f} MiB"


def _django_version() -> str:
    import django

    return django.get_version()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--calls", type=int, default=500, help="timed calls at 0 ms")
    parser.add_argument("--slow-calls", type=int, default=200, help="timed calls at 10 ms")
    parser.add_argument("--messages", type=int, default=1000, help="messages delivered")
    parser.add_argument("--backlog", type=int, default=100_000, help="due rows for c; 0: skip c")
    parser.add_argument("--history", type=int, default=400_000, help="sent rows for c")
    parser.add_argument("--claims", type=int, default=20, help="claims timed in c")
    parser.add_argument("--chain-requests", type=int, default=5, help="requests for d; 0: skip")
    parser.add_argument(
        "--tasks",
        choices=["db", "dummy"],
        default="db",
        help="the Tasks backend: django-tasks-db (default) or the in-memory dummy",
    )
    args = parser.parse_args(argv)

    from django_socketmail.localserver import LocalSMTPServer

    load_before = os.getloadavg()[0]
    server = start_postgres()
    try:
        server.create_database(DATABASE)
        with LocalSMTPServer(tls="none", pipelining=True) as smtp:
            configure(server, smtp.port, args.tasks)
            migrate()
            rounds = []
            with smtp_process() as sink_port:
                for view, ours_call, atomic in VIEWS:
                    with counted() as stored:
                        ours, theirs = alternate(
                            args.calls,
                            ("queue=True", ours_call),
                            ("django", django_call(sink_port, atomic=atomic)),
                            stored,
                        )
                    rounds.append((f"{view}, 0 ms (loopback)", ours, theirs, stored))
                    print(
                        f"{view}, 0 ms: ours {ours.median_ms:.2f} ms, "
                        f"Django {theirs.median_ms:.2f} ms"
                    )
                route = Route("smtp", ("127.0.0.1", sink_port), delay=0.005)
                with ProxyProcess([route], max_seconds=900) as proxy:
                    for view, ours_call, atomic in VIEWS:
                        with counted() as stored_slow:
                            ours, theirs = alternate(
                                args.slow_calls,
                                ("queue=True", ours_call),
                                ("django", django_call(proxy.port("smtp"), atomic=atomic)),
                                stored_slow,
                            )
                        rounds.append((f"{view}, 10 ms (proxy)", ours, theirs, stored_slow))
                        print(
                            f"{view}, 10 ms: ours {ours.median_ms:.2f} ms, "
                            f"Django {theirs.median_ms:.2f} ms"
                        )
            delivery = deliver(server, smtp, args.messages)
            backlog = None
            if args.backlog:
                backlog = claim_at_backlog(args.backlog, args.history, args.claims)
            chained = None
            if args.chain_requests and args.tasks == "db":
                chained = (args.chain_requests, chains(args.chain_requests, 3))
            calls = (
                f"{args.calls} calls at 0 ms and {args.slow_calls} at 10 ms after {WARMUP} "
                f"warm-up calls of each, {args.messages} messages delivered; Tasks backend: "
                f"{'django-tasks-db' if args.tasks == 'db' else 'dummy (in memory)'}"
            )
            print()
            load = (load_before, os.getloadavg()[0])
            print(report(rounds, delivery, calls, load, backlog, chained))
    finally:
        from django.conf import settings

        if settings.configured:
            from django.db import connections

            connections.close_all()
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
