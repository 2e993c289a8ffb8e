"""Queued delivery against the peers: enqueue a backlog, then time until Postfix has it all.

Run from the repository root, as root (the Postfix rig of ``tests/interop/rig.py`` and the
PostgreSQL of ``tests/pg.py`` start their own daemons on free ports of 127.0.0.1), with the
``test`` and ``bench`` extras installed (django-post-office 3.x and django-mailer 2.x)::

    .venv/bin/python bench/queue_peers.py                        # 2,000 messages, plain port
    .venv/bin/python bench/queue_peers.py --messages 2000 --messages 10000 --submission \\
        --mailer-processes 1 --mailer-processes 4 --rate-messages 1200
    .venv/bin/python bench/queue_peers.py --messages 200 --contender ours   # smoke run

One PostgreSQL server, one Postfix (its ``discard`` transport: what it accepts is queued,
logged and thrown away) and one ``bench/proxy.py`` process adding 10 ms of round trip
(5 ms each way; one route per case, so each case's connections and round trips are
counted apart) are shared by every case of the run.  Each *contender* runs in
subprocesses with a Django settings module of its own, generated into a temporary
directory, on a database of its own (migrated once, then copied per case with ``CREATE
DATABASE ... TEMPLATE``), so that the apps cannot interfere:

``ours``
    django-socketmail with ``queue=True``, the audit log on, ``max_connections=4``, the
    Tasks backend django-tasks-db's (``DatabaseBackend``); sent by 4 ``manage.py
    db_worker`` processes (``--no-startup-delay``, default poll interval), stopped with
    SIGTERM once everything has arrived.
``post-office``
    django-post-office with its ``EmailBackend`` queueing and Django's SMTP backend
    sending; ``manage.py send_queued_mail --processes 4`` (5 threads each, its default;
    its own lock file), which exits when the queue is empty.  Its log level is its default
    (2: a ``Log`` row per message).
``mailer``
    django-mailer with its ``DbBackend`` queueing and Django's SMTP backend sending;
    ``manage.py send_mail`` (one pass over the queue), in 1 process (its file lock on) or
    in N processes (``MAILER_USE_FILE_LOCK = False``, as several hosts would).  It writes a
    ``MessageLog`` row per message.

A *case*: ``--messages`` messages of 2 KB to one recipient each (a unique Message-ID
per message), enqueued through Django's ``get_connection().send_messages()`` in
transactions of 100 (not timed: reported apart), with no sender running; then the
sender processes are started and the clock runs until Postfix has accepted every one of
them.  Deliveries are counted at the server: Postfix's log (``cleanup``'s
``message-id=`` line of each accepted message), read every 50 ms and stamped with the
time it was read, not by trusting a contender's bookkeeping; a Message-ID seen twice is
a duplicate.  Reported per case: messages per second (enqueue excluded), the ratio to
ours, SMTP connections and client round trips (the proxy's count), CPU seconds of the
contender's processes (their ``RUSAGE_CHILDREN``) and of PostgreSQL per message, the
database's committed transactions and row writes per message (``pg_stat_database``),
and the contender's own account of the outcome.

``--rate-messages N`` adds a case for ours with ``rate_limit="600/min"`` (4 workers): the
measured rate over the whole run (first to last arrival) and the most arrivals in any
10 s window (at most 100 for the limit to hold).  ``--submission`` adds the same cases
on the submission port (STARTTLS + AUTH via Dovecot).  ``--rounds N`` repeats ours and
post-office at the smallest size (each round the other goes first; the ratio of each round
and their median are reported).  ``--live`` adds ours with the workers started 3 s before
the enqueue (the clock runs from the enqueue's start); ``--fan-out`` adds ours with 3 more
delivery tasks enqueued after the backlog (``deliver.enqueue("")``: 4 runs, as a fan-out
to ``max_connections`` would make); ``--profile DIR`` runs our workers under cProfile.

Bounded: every case has a deadline (``--case-timeout``, scaled with the message count),
no case starts after ``--budget`` minutes, every child is stopped by its pid (SIGTERM,
then SIGKILL after 15 s), the proxy stops at end of input, the rig and PostgreSQL are
stopped at the end whatever happens.  Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import sys
from pathlib import Path

if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    # Run as a script, bench/ comes first on sys.path, where a module of this directory
    # could shadow a standard library module.
    del sys.path[0]
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any, Final  # noqa: E402

from bench.proxy import ProxyProcess, Route  # noqa: E402

HOST: Final = "127.0.0.1"
DELAY: Final = 0.005
"""Seconds the proxy adds each way (10 ms round trip)."""
CHUNK: Final = 100
"""Messages per enqueue transaction."""
RECIPIENT: Final = "customer@example.test"
POLL: Final = 0.05
"""Seconds between reads of Postfix's log."""
STOP_GRACE: Final = 15.0
"""Seconds a child gets after SIGTERM before SIGKILL."""
LIVE_IDLE: Final = 3.0
"""Seconds the workers of a live case run before the first message is enqueued."""
WINDOW: Final = 10.0
"""Seconds of the sliding window the rate limit is checked over."""
MESSAGE_ID: Final = re.compile(
    r"cleanup\[\d+\]: [0-9A-F]+: message-id=<(\d+)\.([\w-]+)@([\w-]+)\.bench>"
)
DOMAIN = {"ours": "ours", "post-office": "postoffice", "mailer": "mailer"}


# -- the children ----------------------------------------------------------------------------
# ``python bench/queue_peers.py --child enqueue|stats ...`` with DJANGO_SETTINGS_MODULE set.


def child_enqueue(count: int, case: str, domain: str, extra_runs: int = 0) -> dict[str, Any]:
    """Store ``count`` messages through the settings' EMAIL_BACKEND, :data:`CHUNK` per
    transaction; each has the Message-ID ``<n.case@domain.bench>``.  ``extra_runs`` (ours
    only): then enqueue that many more delivery tasks for the default mailer, through the
    task's public API, as a fan-out to ``max_connections`` would."""
    from django.core.mail import EmailMessage, get_connection
    from django.db import transaction

    from bench.queue_cost import _body

    body = _body(2048)
    sender = f"{domain}@example.test"
    started = time.perf_counter()
    stored = 0
    for start in range(0, count, CHUNK):
        batch = [
            EmailMessage(
                f"Your order {n}",
                body,
                sender,
                [RECIPIENT],
                headers={"Message-ID": f"<{n}.{case}@{domain}.bench>"},
            )
            for n in range(start, min(count, start + CHUNK))
        ]
        with transaction.atomic():
            get_connection().send_messages(batch)
        stored += len(batch)
    if extra_runs:
        from django_socketmail.queue import deliver

        for _ in range(extra_runs):
            deliver.enqueue("")
    return {"stored": stored, "seconds": time.perf_counter() - started}


def child_stats(contender: str) -> dict[str, Any]:
    """The contender's own account of its queue after a case."""
    from django.db.models import Count

    if contender == "ours":
        from django_tasks_db.models import DBTaskResult

        from django_socketmail.models import MessageLog
        from django_socketmail.outbox import OutboxMessage

        rows = OutboxMessage.objects.values_list("status").annotate(n=Count("pk"))
        tasks = DBTaskResult.objects.values_list("status").annotate(n=Count("pk"))
        return {
            "status": {str(s): n for s, n in rows},
            "tasks": {str(s): n for s, n in tasks},
            "audit rows": MessageLog.objects.count(),
        }
    if contender == "post-office":
        from post_office.models import STATUS, Email, Log  # type: ignore[import-untyped]

        names = dict(zip(STATUS, STATUS._fields, strict=True))
        rows = Email.objects.values_list("status").annotate(n=Count("pk"))
        return {
            "status": {names.get(s, str(s)): n for s, n in rows},
            "log rows": Log.objects.count(),
        }
    from mailer.models import Message  # type: ignore[import-untyped]
    from mailer.models import MessageLog as MailerLog

    logs = MailerLog.objects.values_list("result").annotate(n=Count("pk"))
    return {"left in queue": Message.objects.count(), "log": {str(r): n for r, n in logs}}


def child_main(args: argparse.Namespace) -> int:
    import django

    django.setup()
    if args.child == "enqueue":
        result = child_enqueue(args.count, args.case, DOMAIN[args.contender], args.extra_runs)
    else:
        result = child_stats(args.contender)
    print(json.dumps(result))
    return 0


# -- settings --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """Where the contenders connect (the proxy's route), and how."""

    port: int
    starttls: bool = False
    username: str = ""
    password: str = ""
    cafile: str = ""


def settings_text(
    contender: str, database: dict[str, Any], endpoint: Endpoint, options: dict[str, Any]
) -> str:
    """A settings module for ``contender`` on ``database``, sending to ``endpoint``."""
    apps = ["django.contrib.contenttypes", "django.contrib.auth"]
    values: dict[str, Any] = {
        "SECRET_KEY": "bench-only",
        "USE_TZ": True,
        "DEBUG": False,
        "DATABASES": {"default": database},
        "DEFAULT_AUTO_FIELD": "django.db.models.BigAutoField",
        "EMAIL_HOST": HOST,
        "EMAIL_PORT": endpoint.port,
        "EMAIL_TIMEOUT": 30,
    }
    if endpoint.starttls:
        values.update(
            EMAIL_USE_TLS=True,
            EMAIL_HOST_USER=endpoint.username,
            EMAIL_HOST_PASSWORD=endpoint.password,
        )
    if contender == "ours":
        import django

        apps += ["django_socketmail", "django_tasks_db"]
        if django.VERSION < (6, 0):
            apps.append("django_tasks")
        socketmail: dict[str, Any] = {
            "queue": True,
            "audit_log": True,
            "local_hostname": "bench.example",
            "max_connections": 4,
        }
        if endpoint.cafile:
            socketmail["ssl_cafile"] = endpoint.cafile
        socketmail.update(options)
        values.update(
            EMAIL_BACKEND="django_socketmail.email_backend.EmailBackend",
            TASKS={"default": {"BACKEND": "django_tasks_db.DatabaseBackend"}},
            SOCKETMAIL=socketmail,
        )
    elif contender == "post-office":
        apps.append("post_office")
        values.update(
            TEMPLATES=[{"BACKEND": "django.template.backends.django.DjangoTemplates"}],
            EMAIL_BACKEND="post_office.EmailBackend",
            POST_OFFICE={"BACKENDS": {"default": "django.core.mail.backends.smtp.EmailBackend"}},
        )
    else:
        apps.append("mailer")
        values.update(
            EMAIL_BACKEND="mailer.backend.DbBackend",
            MAILER_EMAIL_BACKEND="django.core.mail.backends.smtp.EmailBackend",
            **options,
        )
    values["INSTALLED_APPS"] = apps
    lines = ["# Generated by bench/queue_peers.py for one case; removed at the end."]
    lines += [f"{name} = {value!r}" for name, value in values.items()]
    return "\n".join(lines) + "\n"


# -- processes -------------------------------------------------------------------------------


class Children:
    """Every child this benchmark starts (in ``cwd``: django-mailer leaves its lock files in
    the current directory), stopped by its pid."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.running: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            process = subprocess.Popen(
                argv,
                env=env,
                cwd=self.cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.running.append(process)
        return process

    def stop(self, process: subprocess.Popen[bytes], grace: float = STOP_GRACE) -> int:
        """SIGTERM, then SIGKILL after ``grace`` seconds; reap it; return its exit code."""
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                process.wait()
        if process in self.running:
            self.running.remove(process)
        return int(process.returncode)

    def stop_all(self) -> None:
        for process in list(self.running):
            self.stop(process, grace=5.0)


def run_child(argv: list[str], env: dict[str, str], timeout: float, log: Path) -> str:
    """Run a child to its end (killed after ``timeout``); its stdout, or RuntimeError."""
    with log.open("ab") as errors:
        result = subprocess.run(
            argv, env=env, stdout=subprocess.PIPE, stderr=errors, timeout=timeout, check=False
        )
    if result.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(argv[-4:])} exited {result.returncode}:\n{tail}")
    return result.stdout.decode()


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# -- the server's side -----------------------------------------------------------------------


class PostfixLog:
    """Postfix's log, read as it grows: each accepted message's Message-ID with the time
    (``time.monotonic()``) this process read it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0
        self.partial = b""
        self.arrivals: dict[str, list[tuple[float, str]]] = {}
        """Case key: (time read, message number) per accepted message, duplicates included."""

    def poll(self) -> None:
        now = time.monotonic()
        with self.path.open("rb") as log:
            log.seek(self.offset)
            data = log.read()
        self.offset += len(data)
        data = self.partial + data
        lines = data.split(b"\n")
        self.partial = lines.pop()
        for line in lines:
            match = MESSAGE_ID.search(line.decode(errors="replace"))
            if match:
                number, case, _domain = match.groups()
                self.arrivals.setdefault(case, []).append((now, number))

    def count(self, case: str) -> int:
        return len({number for _, number in self.arrivals.get(case, [])})


def pg_database_stats(server: Any, name: str) -> dict[str, int]:
    """Committed transactions and rows written so far in database ``name``."""
    with server.connect() as connection:
        connection.execute("SELECT pg_stat_clear_snapshot()")
        row = connection.execute(
            "SELECT xact_commit, tup_inserted, tup_updated, tup_deleted, tup_fetched "
            "FROM pg_stat_database WHERE datname = %s",
            [name],
        ).fetchone()
    keys = ("commits", "inserted", "updated", "deleted", "fetched")
    return dict(zip(keys, (int(v or 0) for v in row), strict=True)) if row else {}


# -- cases ---------------------------------------------------------------------------------


@dataclass
class Case:
    contender: str
    label: str
    messages: int
    port_kind: str
    processes: int = 1
    options: dict[str, Any] = field(default_factory=dict)
    rate: bool = False
    extra_runs: int = 0
    """Delivery tasks enqueued after the backlog besides the one the enqueue made (ours)."""
    live: bool = False
    """Senders started first (idle 3 s), then the enqueue: the clock runs from its start."""
    round: int = 1

    @property
    def key(self) -> str:
        text = f"{self.label}-{self.messages}-{self.port_kind}-r{self.round}".lower()
        return re.sub(r"[^a-z0-9]+", "-", text)


@dataclass
class Outcome:
    case: Case
    enqueue_seconds: float = 0.0
    seconds: float | None = None
    """From starting the senders to the last message at Postfix (None: not all arrived)."""
    arrived: int = 0
    duplicates: int = 0
    cpu: float = 0.0
    pg_cpu: float = 0.0
    db: dict[str, int] = field(default_factory=dict)
    proxy: dict[str, int] = field(default_factory=dict)
    own: dict[str, Any] = field(default_factory=dict)
    exit_codes: list[int] = field(default_factory=list)
    first: float | None = None
    """Seconds from the start to the first arrival."""
    rate_per_min: float | None = None
    max_window: int | None = None
    error: str = ""

    @property
    def per_second(self) -> float | None:
        return self.arrived / self.seconds if self.seconds else None


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.children = Children(workdir)
        self.server: Any = None
        self.postfix: Any = None
        self.proxy: ProxyProcess | None = None
        self.log: PostfixLog | None = None
        self.endpoints: dict[str, Endpoint] = {}
        self.templates: set[str] = set()

    def env(self, module: str, endpoint: Endpoint) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(self.workdir), str(REPO)])
        env["DJANGO_SETTINGS_MODULE"] = module
        if endpoint.cafile:  # Django's SMTP backend: ssl.create_default_context() reads it
            env["SSL_CERT_FILE"] = endpoint.cafile
        return env

    def write_settings(self, case: Case, database: str, endpoint: Endpoint) -> str:
        module = "s_" + re.sub(r"[^a-z0-9]", "_", database)
        text = settings_text(
            case.contender, self.server.settings_dict(database), endpoint, case.options
        )
        (self.workdir / f"{module}.py").write_text(text)
        return module

    def template(self, case: Case, endpoint: Endpoint) -> str:
        """A migrated database for the contender (made once), to copy per case."""
        name = "tmpl_" + DOMAIN[case.contender]
        if name not in self.templates:
            self.server.create_database(name)
            module = self.write_settings(case, name, endpoint)
            argv = [sys.executable, "-m", "django", "migrate", "-v", "0", "--no-input"]
            run_child(argv, self.env(module, endpoint), 300, self.workdir / f"{name}.log")
            self.templates.add(name)
        return name

    def run_case(self, case: Case) -> Outcome:
        outcome = Outcome(case)
        assert self.proxy is not None
        assert self.log is not None
        base = self.endpoints[case.port_kind]
        endpoint = Endpoint(
            self.proxy.port(case.key),
            base.starttls,
            base.username,
            base.password,
            base.cafile,
        )
        template = self.template(case, endpoint)
        database = "c_" + case.key.replace("-", "_")
        with self.server.connect() as connection:
            connection.execute(f'CREATE DATABASE "{database}" TEMPLATE "{template}"')
        module = self.write_settings(case, database, endpoint)
        env = self.env(module, endpoint)
        logfile = self.workdir / f"{database}.log"
        me = [sys.executable, str(Path(__file__).resolve())]
        common = ["--contender", case.contender, "--case", case.key]
        enqueue = [*me, "--child", "enqueue", "--count", str(case.messages), *common]
        enqueue += ["--extra-runs", str(case.extra_runs)]
        if not case.live:
            stored = json.loads(run_child(enqueue, env, 600, logfile))
            outcome.enqueue_seconds = stored["seconds"]
        self.proxy.reset()
        db_before = pg_database_stats(self.server, database)
        pg_before = server_cpu(self.server)
        cpu_before = children_cpu()
        deadline = self.args.case_timeout + case.messages / 10
        manage = [sys.executable, "-m", "django"]
        if case.contender == "ours":
            worker = ["django", "db_worker", "--no-startup-delay"]
            argvs = [[sys.executable, "-m", *worker]] * case.processes
            if self.args.profile:  # each worker under cProfile (wall clock), one file each
                self.args.profile.mkdir(parents=True, exist_ok=True)
                argvs = [
                    [sys.executable, "-m", "cProfile", "-o", str(profile), "-m", *worker]
                    for profile in (
                        self.args.profile / f"{case.key}-{n}.prof" for n in range(case.processes)
                    )
                ]
        elif case.contender == "post-office":
            lock = str(self.workdir / f"{database}.lock")
            argvs = [[*manage, "send_queued_mail", "--processes", str(case.processes), "-L", lock]]
        else:
            argvs = [[*manage, "send_mail"]] * case.processes
        started = time.monotonic()
        processes = [self.children.start(argv, env, logfile) for argv in argvs]
        if case.live:  # the workers wait for tasks; the requests come
            time.sleep(LIVE_IDLE)
            started = time.monotonic()
            stored = json.loads(run_child(enqueue, env, 600, logfile))
            outcome.enqueue_seconds = stored["seconds"]
        last_progress, last_count = started, 0
        try:
            while True:
                time.sleep(POLL)
                self.log.poll()
                count = self.log.count(case.key)
                now = time.monotonic()
                if count != last_count:
                    last_progress, last_count = now, count
                if count >= case.messages:
                    outcome.seconds = now - started
                    break
                if now - started > deadline:
                    outcome.error = f"deadline: {count} of {case.messages} after {deadline:.0f} s"
                    break
                exited = all(p.poll() is not None for p in processes)
                if exited and now - last_progress > 10:
                    outcome.error = f"senders exited with {count} of {case.messages} arrived"
                    break
        finally:
            for process in processes:
                if case.contender != "ours":  # the peers exit by themselves once done
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        process.wait(timeout=60)
                outcome.exit_codes.append(self.children.stop(process))
        time.sleep(1.5)  # exited backends' statistics, Postfix's last lines
        self.log.poll()
        outcome.cpu = children_cpu() - cpu_before
        outcome.pg_cpu = server_cpu(self.server) - pg_before
        after = pg_database_stats(self.server, database)
        outcome.db = {k: after[k] - db_before.get(k, 0) for k in after}
        outcome.proxy = self.proxy.stats(case.key)
        arrivals = self.log.arrivals.get(case.key, [])
        outcome.arrived = len({n for _, n in arrivals})
        outcome.duplicates = len(arrivals) - outcome.arrived
        if arrivals:
            outcome.first = min(t for t, _ in arrivals) - started
        stats = [*me, "--child", "stats", *common]
        try:
            outcome.own = json.loads(run_child(stats, env, 120, logfile))
        except (RuntimeError, subprocess.SubprocessError, ValueError) as error:
            outcome.own = {"error": str(error).strip().splitlines()[-1:]}
        if case.rate and len(arrivals) > 1:
            times = sorted(t for t, _ in arrivals)
            outcome.rate_per_min = (len(times) - 1) / (times[-1] - times[0]) * 60
            outcome.max_window = max_in_window(times, WINDOW)
        return outcome


def max_in_window(times: list[float], width: float) -> int:
    """The most of ``times`` (sorted) within any half-open window ``[t, t + width)``."""
    best, first = 0, 0
    for last, moment in enumerate(times):
        while times[first] <= moment - width:
            first += 1
        best = max(best, last - first + 1)
    return best


def server_cpu(server: Any) -> float:
    from bench.queue_cost import server_cpu as measured

    return measured(server)


# -- the run -------------------------------------------------------------------------------


def plan(args: argparse.Namespace) -> list[Case]:
    kinds = ["plain"] + (["submission"] if args.submission else [])
    cases: list[Case] = []
    for kind in kinds:
        for count in args.messages:
            rounds = args.rounds if count == min(args.messages) else 1
            for r in range(1, rounds + 1):
                # ours and post-office every round, in turn first; the slow mailer once
                order = args.contender if r % 2 else list(reversed(args.contender))
                for contender in order:
                    if contender == "ours":
                        cases.append(Case("ours", "ours 4 db_worker", count, kind, 4, round=r))
                        if args.fan_out:
                            label = "ours 4 runs"
                            cases.append(Case("ours", label, count, kind, 4, extra_runs=3, round=r))
                        if args.live:
                            label = "ours live"
                            cases.append(Case("ours", label, count, kind, 4, live=True, round=r))
                    elif contender == "post-office":
                        label = "post-office -p 4"
                        cases.append(Case("post-office", label, count, kind, 4, round=r))
                    elif r == 1 and count <= args.mailer_max_messages:  # a connection each
                        for n in args.mailer_processes:
                            options = {} if n == 1 else {"MAILER_USE_FILE_LOCK": False}
                            cases.append(Case("mailer", f"mailer x{n}", count, kind, n, options))
        if args.rate_messages and kind == "plain":  # after the plain cases
            limit: dict[str, Any] = {"rate_limit": "600/min"}
            rate = Case("ours", "ours 600-min", args.rate_messages, "plain", 4, limit, True)
            cases.append(rate)
    return cases


def machine() -> str:
    import django

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), Linux "
        f"{platform.release()}, Python {platform.python_version()}, Django {django.get_version()}"
        f", load average {load}"
    )


def report(outcomes: list[Outcome], facts: list[str]) -> str:
    lines = [*facts, ""]
    lines += [
        "| case | round | messages | port | enqueue | delivery | first | msg/s | vs ours | "
        "connections | round trips/msg | CPU ms/msg | PG CPU ms/msg | DB commits/msg | "
        "rows written/msg | dup | contender's account |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    ours = {
        (o.case.messages, o.case.port_kind, o.case.round): o.per_second
        for o in outcomes
        if o.case.label == "ours 4 db_worker"
    }
    ratios: dict[tuple[int, str, str], list[float]] = {}
    for o in outcomes:
        n = o.case.messages
        rate = o.per_second
        mine = ours.get((n, o.case.port_kind, o.case.round))
        versus = ""
        if rate and mine and o.case.contender != "ours":
            versus = f"{mine / rate:.2f}x"
        if rate and o.case.contender != "ours":
            for variant in outcomes:  # every ours of the same size, port and round
                same = (variant.case.messages, variant.case.port_kind, variant.case.round)
                if (
                    variant.case.contender == "ours"
                    and not (variant.case.rate or variant.case.live)
                    and same == (n, o.case.port_kind, o.case.round)
                    and variant.per_second
                ):
                    key = (n, o.case.port_kind, f"{variant.case.label} vs {o.case.label}")
                    ratios.setdefault(key, []).append(variant.per_second / rate)
        written = o.db.get("inserted", 0) + o.db.get("updated", 0) + o.db.get("deleted", 0)
        failed = o.error.strip().splitlines()[-1:] or ["?"]
        delivery = f"{o.seconds:.1f} s" if o.seconds is not None else f"({failed[0]})"
        lines.append(
            f"| {o.case.label} | {o.case.round} | {n:,} | {o.case.port_kind} | "
            f"{o.enqueue_seconds:.1f} s | {delivery} | "
            f"{'-' if o.first is None else f'{o.first:.1f} s'} | {rate or 0:.1f} | {versus} | "
            f"{o.proxy.get('connections', 0)} | {o.proxy.get('turns', 0) / n:.2f} | "
            f"{o.cpu / n * 1000:.2f} | {o.pg_cpu / n * 1000:.2f} | "
            f"{o.db.get('commits', 0) / n:.2f} | {written / n:.2f} | {o.duplicates} | "
            f"{json.dumps(o.own, sort_keys=True)} |"
        )
    lines += [""]
    for (n, port, label), found in ratios.items():
        each = ", ".join(f"{r:.2f}x" for r in found)
        median = statistics.median(found)
        lines.append(f"- {label}, {n:,} messages, {port}: {each} (median {median:.2f}x)")
    for o in outcomes:
        if o.case.rate and o.rate_per_min is not None:
            lines += [
                "",
                f"Rate limit 600/min, {o.case.messages} messages, 4 workers: measured "
                f"{o.rate_per_min:.1f}/min first to last arrival ({o.rate_per_min / 600:.3f} of "
                f"the limit), at most {o.max_window} arrivals in any {WINDOW:.0f} s window "
                f"(limit: {600 * WINDOW / 60:.0f}).",
            ]
    lines += [
        "",
        "vs ours: ours' msg/s divided by this case's (same size, port and round). delivery: "
        "from starting the senders (live: from the first enqueue) to the last arrival; "
        "first: to the first arrival. "
        "CPU: the contender's processes (live: the enqueue's too).",
    ]
    return "\n".join(lines)


@contextlib.contextmanager
def rig(bench: Bench, cases: list[Case], lifetime: float) -> Iterator[None]:
    """PostgreSQL, Postfix (discarding) and the proxy, with one route per case."""
    from bench.run import PostfixServer
    from tests.pg import start_postgres

    bench.server = start_postgres()
    try:
        bench.postfix = PostfixServer()
        try:
            plain, submission = bench.postfix.start()
            bench.endpoints["plain"] = Endpoint(plain.port)
            bench.endpoints["submission"] = Endpoint(
                submission.port,
                True,
                submission.username or "",
                submission.password or "",
                submission.cafile or "",
            )
            routes = [
                Route(case.key, (HOST, bench.endpoints[case.port_kind].port), delay=DELAY)
                for case in cases
            ]
            bench.proxy = ProxyProcess(routes, max_seconds=lifetime)
            bench.proxy.start()
            try:
                bench.log = PostfixLog(bench.postfix.rig.postfix_log_path)
                yield
            finally:
                bench.proxy.stop()
        finally:
            bench.children.stop_all()
            bench.postfix.stop()
    finally:
        bench.server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--messages", type=int, action="append", help="per case (repeatable)")
    parser.add_argument(
        "--contender",
        action="append",
        choices=["ours", "post-office", "mailer"],
        help="(repeatable; default: all three)",
    )
    parser.add_argument("--mailer-processes", type=int, action="append", help="default: 1")
    parser.add_argument(
        "--mailer-max-messages",
        type=int,
        default=2000,
        help="no django-mailer case above this size (it opens a connection per message, and "
        "the proxy accepts 2,000 per route)",
    )
    parser.add_argument("--submission", action="store_true", help="also STARTTLS + AUTH")
    parser.add_argument("--rounds", type=int, default=1, help="of ours and post-office")
    parser.add_argument(
        "--fan-out",
        action="store_true",
        help="also ours with 3 more delivery tasks enqueued after the backlog (4 runs)",
    )
    parser.add_argument(
        "--live", action="store_true", help="also ours with the workers running before enqueue"
    )
    parser.add_argument("--rate-messages", type=int, default=0, help="rate-limit case; 0: none")
    parser.add_argument("--case-timeout", type=float, default=120.0, help="+ 0.1 s per message")
    parser.add_argument("--budget", type=float, default=40.0, help="minutes; then no new case")
    parser.add_argument("--json", type=Path, help="also write the raw outcomes here")
    parser.add_argument(
        "--profile", type=Path, help="run our workers under cProfile, a .prof file each here"
    )
    parser.add_argument("--child", choices=["enqueue", "stats"], help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--case", default="", help=argparse.SUPPRESS)
    parser.add_argument("--extra-runs", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.contender = args.contender[0]
        return child_main(args)
    args.messages = args.messages or [2000]
    args.contender = args.contender or ["ours", "post-office", "mailer"]
    args.mailer_processes = args.mailer_processes or [1]
    cases = plan(args)
    facts = [f"Machine: {machine()} (at the start)."]
    began = time.monotonic()
    budget = args.budget * 60
    workdir = Path(tempfile.mkdtemp(prefix="socketmail-peers-"))
    bench = Bench(args, workdir)
    outcomes: list[Outcome] = []
    skipped: list[str] = []
    try:
        with rig(bench, cases, budget + 1800):
            assert bench.log is not None
            facts.append(f"Postfix {bench.postfix.version()} (discard transport), PostgreSQL 15.")
            for case in cases:
                if time.monotonic() - began > budget:
                    skipped.append(case.key)
                    continue
                print(f"-- {case.key}: enqueue {case.messages} ...", flush=True)
                try:
                    outcome = bench.run_case(case)
                except (RuntimeError, subprocess.SubprocessError, OSError) as error:
                    outcome = Outcome(case, error=f"{type(error).__name__}: {error}"[-2000:])
                outcomes.append(outcome)
                if outcome.error:
                    print(outcome.error, file=sys.stderr)
                print(
                    f"   {(outcome.seconds and f'{outcome.seconds:.1f} s') or outcome.error}, "
                    f"{outcome.per_second or 0:.1f} msg/s, arrived {outcome.arrived}, "
                    f"dup {outcome.duplicates}, connections "
                    f"{outcome.proxy.get('connections')}, own {outcome.own}",
                    flush=True,
                )
            facts.append(f"Load average at the end: {os.getloadavg()[0]:.2f}.")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if skipped:
        facts.append(f"Not run (budget): {', '.join(skipped)}.")
    print()
    print(report(outcomes, facts))
    if args.json:
        raw = [
            {**{k: v for k, v in vars(o).items() if k != "case"}, "case": vars(o.case)}
            for o in outcomes
        ]
        args.json.write_text(json.dumps(raw, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
