"""Benchmark django-socketmail's email backend against Django's own SMTP backend.

Run from the repository root (Postfix and Dovecot installed: ``apt-get install postfix
dovecot-core``; run as root, as the interop rig needs)::

    .venv/bin/python bench/run.py          # full run, under 10 minutes; updates docs/benchmarks.md
    .venv/bin/python bench/run.py --quick  # smoke run, under a minute; writes nothing

Everything runs in this one process, side by side and in the same moment: for each
*cell* (a server, a round-trip time, a scenario) every *contender* (a label, a backend
class and its options) is warmed up, then the timed runs go round the contenders in turn
(rotating the order), and the median is reported.

Servers, all on 127.0.0.1: Postfix's ``smtp-sink`` (PIPELINING, no CHUNKING), a real
Postfix from ``tests/interop/rig.py`` reconfigured to discard what it accepts (PIPELINING
and CHUNKING; its submission port with STARTTLS and Dovecot AUTH for the
``send_mail()`` scenario).  Round-trip time: 0 (direct) and 10 ms through
``bench/proxy.py`` (5 ms each way), which also counts round trips.

Reported per contender: messages per second, the ratio to Django's backend in the same
cell, round trips per message (turns counted by the proxy), CPU seconds of this process
(``time.process_time``) per run, and the peak of memory allocated during the send
(``tracemalloc``, in an untimed pass).  Then the issue's targets with the measured ratio.

Contenders are one line each in :data:`CONTENDERS`.  An option the backend does not
(yet) accept is reported and the contender skipped; an option wrapped in
:class:`IfSupported` is passed only when the backend knows it.  Not a test: nothing here
asserts a time.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import faulthandler
import gc
import json
import os
import platform
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    # Run as a script, bench/ comes first on sys.path, where a module of this directory
    # could shadow a standard library module (a bench/queue.py once shadowed queue, which
    # asgiref and concurrent.futures import).
    del sys.path[0]
REPO: Final = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import django  # noqa: E402
from django.conf import settings  # noqa: E402
from django.core.exceptions import ImproperlyConfigured  # noqa: E402
from django.core.mail import EmailMessage  # noqa: E402
from django.core.mail.backends.base import BaseEmailBackend  # noqa: E402
from django.core.mail.backends.smtp import EmailBackend as DjangoSMTPBackend  # noqa: E402
from django.utils.functional import cached_property  # noqa: E402

from bench.proxy import ProxyProcess, Route, end_child, measure_rtt  # noqa: E402

HOST: Final = "127.0.0.1"
SBIN: Final = "/usr/sbin:/sbin:/usr/bin:/bin"
SMTP_SINK: Final = "/usr/sbin/smtp-sink"
TIMEOUT: Final = 30.0
"""Seconds allowed per reply, for every backend (Django's default is no limit at all)."""
SENDER: Final = "bench@example.test"
X: Final = "\N{MULTIPLICATION SIGN}"
DASH: Final = "\N{EN DASH}"
DOCS: Final = REPO / "docs" / "benchmarks.md"
RESULTS_START: Final = "<!-- bench:results:start -->"
RESULTS_END: Final = "<!-- bench:results:end -->"
SOFT_LIMIT: Final = {"full": 12 * 60.0, "quick": 3 * 60.0}
"""Seconds after which no new cell is started (the rest is reported as not run)."""
HARD_LIMIT: Final = 25 * 60.0
"""Seconds after which the process dumps its stacks and exits (children stop on EOF)."""


# -- contenders ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IfSupported:
    """An option value passed only when the backend accepts the option.

    ``IfSupported(False)`` says "and not this feature": before the backend has the feature,
    leaving the option out means the same.
    """

    value: Any


class DjangoBackend(DjangoSMTPBackend):
    """Django's SMTP backend as it is, except that it also trusts the rig's test CA.

    Like Django, it builds a fresh default context (the system's CAs) for every backend
    instance, so the per-call cost of ``send_mail()`` stays what it is in production.
    """

    def __init__(self, *args: Any, bench_cafile: str | None = None, **kwargs: Any) -> None:
        self.bench_cafile = bench_cafile
        super().__init__(*args, **kwargs)

    @cached_property
    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        if self.bench_cafile:
            context.load_verify_locations(self.bench_cafile)
        return context


def _socketmail_backend() -> type[BaseEmailBackend]:
    from django_socketmail.email_backend import EmailBackend

    return EmailBackend


@dataclass(frozen=True, slots=True)
class Contender:
    """One way of sending: a label, a backend class (or a function returning it), options."""

    label: str
    backend: type[BaseEmailBackend] | Callable[[], type[BaseEmailBackend]]
    options: Mapping[str, Any] = field(default_factory=dict)
    scenarios: frozenset[str] | None = None
    """Only these scenarios (None: all)."""

    def backend_class(self) -> type[BaseEmailBackend]:
        backend = self.backend
        if isinstance(backend, type):
            return backend
        return backend()


OFF: Final = IfSupported(False)
SEND_MAIL_ONLY: Final = frozenset({"send_mail"})
SEND_MAIL_ANY: Final = frozenset({"send_mail", "send_mail_pool"})
PLAIN: Final = {"pipelining": True, "chunking": OFF, "pool": OFF, "audit_log": False}
ALL_ON: Final = {**PLAIN, "chunking": True, "pool": True}
ALL_ON_AUDIT: Final = {**ALL_ON, "audit_log": True}
WAL_ALIAS: Final = "audit_wal"
"""A second SQLite file database in WAL mode with ``synchronous=NORMAL`` (a commit does not
wait for the disk), for the audit log through the backend's ``audit_database`` option."""
ALL_ON_AUDIT_WAL: Final = {**ALL_ON_AUDIT, "audit_database": WAL_ALIAS}
ALL_ON_AUDIT_THREAD: Final = {**ALL_ON_AUDIT, "audit_background": True}
"""The audit rows written by the writer thread (``audit_background``), several calls per
commit; the timed region ends with ``drain_audit_log()``, so it includes every write."""

CONTENDERS: Final[tuple[Contender, ...]] = (
    Contender("django", DjangoBackend),
    Contender("ours lock-step", _socketmail_backend, {**PLAIN, "pipelining": False}),
    Contender("ours", _socketmail_backend, PLAIN),
    Contender("ours +audit", _socketmail_backend, {**PLAIN, "audit_log": True}),
    Contender("ours +chunking", _socketmail_backend, {**PLAIN, "chunking": True}),
    Contender("ours +pool", _socketmail_backend, {**PLAIN, "pool": True}, SEND_MAIL_ONLY),
    Contender("ours +chunking +pool", _socketmail_backend, ALL_ON, SEND_MAIL_ANY),
    Contender("ours +chunking +pool +audit", _socketmail_backend, ALL_ON_AUDIT, SEND_MAIL_ANY),
    Contender(
        "ours +chunking +pool +audit (WAL)",
        _socketmail_backend,
        ALL_ON_AUDIT_WAL,
        frozenset({"send_mail_pool"}),
    ),
    Contender(
        "ours +chunking +pool +audit (writer thread)",
        _socketmail_backend,
        ALL_ON_AUDIT_THREAD,
        frozenset({"send_mail_pool"}),
    ),
)
BASELINE: Final = "django"


@dataclass(slots=True)
class Ready:
    """A contender whose options the backend accepted."""

    contender: Contender
    backend: type[BaseEmailBackend]
    options: dict[str, Any]
    dropped: list[str]
    """``IfSupported`` options left out because the backend does not know them."""

    @property
    def label(self) -> str:
        return self.contender.label

    def make(self, endpoint: Endpoint, port: int) -> BaseEmailBackend:
        return self.backend(**connection_options(self.backend, endpoint, port), **self.options)


def connection_options(
    backend: type[BaseEmailBackend], endpoint: Endpoint, port: int
) -> dict[str, Any]:
    """Host, port, timeout, STARTTLS, AUTH and the CA to trust, as ``backend`` spells them."""
    options: dict[str, Any] = {"host": endpoint.host, "port": port, "timeout": TIMEOUT}
    if endpoint.starttls:
        options.update(use_tls=True, username=endpoint.username, password=endpoint.password)
    if issubclass(backend, DjangoBackend):
        # Django 6.1 deprecates building it without an alias; 5.2 ignores the keyword.
        options.update(alias="bench", bench_cafile=endpoint.cafile)
    elif endpoint.cafile:
        options["ssl_cafile"] = endpoint.cafile
    return options


def prepare_contenders(
    contenders: Sequence[Contender], *, log: Callable[[str], None]
) -> tuple[list[Ready], list[tuple[str, str]]]:
    """Build each contender's backend once, offline; skip the ones whose options fail.

    Returns the usable contenders and ``(label, reason)`` for each skipped one.
    """
    probe = Endpoint("probe", "probe", HOST, 25)
    ready: list[Ready] = []
    skipped: list[tuple[str, str]] = []
    for contender in contenders:
        backend = contender.backend_class()
        base = connection_options(backend, probe, probe.port)
        options: dict[str, Any] = {}
        dropped: list[str] = []
        for name, value in contender.options.items():
            if isinstance(value, IfSupported):
                try:
                    backend(**base, **{name: value.value})
                except ImproperlyConfigured:
                    dropped.append(name)
                    continue
                value = value.value
            options[name] = value
        try:
            backend(**base, **options)
        except ImproperlyConfigured as error:
            reason = f"ImproperlyConfigured: {str(error).partition('; known:')[0]}"
            log(f"skipping contender {contender.label!r}: {reason}")
            skipped.append((contender.label, reason))
            continue
        ready.append(Ready(contender, backend, options, dropped))
    return ready, skipped


# -- servers ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A server port to send to, and how."""

    name: str
    title: str
    host: str
    port: int
    starttls: bool = False
    username: str | None = None
    password: str | None = None
    cafile: str | None = None
    in_process: bool = False
    """The server runs in this process: its CPU time counts as ours (fallback only)."""
    settle: Callable[[], None] | None = None
    """Called before each timed run: let the server finish the previous run's work."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_for_greeting(port: int, deadline: float) -> None:
    while True:
        try:
            with socket.create_connection((HOST, port), timeout=2) as sock:
                if sock.recv(512).startswith(b"220"):
                    sock.sendall(b"QUIT\r\n")
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"no SMTP greeting on {HOST}:{port}")
        time.sleep(0.05)


class SmtpSink:
    """Postfix's ``smtp-sink`` on a free port: accepts and throws away, PIPELINING on.

    Flags: ``-u postfix`` (it refuses to run as root), ``-4``, backlog 256.  It runs under
    a shell that kills it when our pipe to it ends (``stop()``, or this process dying), all
    under ``timeout`` as a last bound.
    """

    def __init__(self, lifetime: float) -> None:
        self.port = 0
        self._lifetime = lifetime
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> Endpoint:
        if not os.access(SMTP_SINK, os.X_OK):
            raise RuntimeError(f"{SMTP_SINK} not found: apt-get install postfix")
        self.port = free_port()
        user = ["-u", "postfix"] if os.geteuid() == 0 else []
        sink = " ".join([SMTP_SINK, *user, "-4", f"{HOST}:{self.port}", "256"])
        script = f"{sink} </dev/null & pid=$!; cat >/dev/null; kill $pid; wait $pid 2>/dev/null"
        self._process = subprocess.Popen(
            ["timeout", "-k", "5", str(int(self._lifetime)), "sh", "-c", script],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
        )
        wait_for_greeting(self.port, time.monotonic() + 10)
        return Endpoint("smtp-sink", "smtp-sink", HOST, self.port)

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            end_child(process)


class PostfixServer:
    """The interop rig's Postfix + Dovecot, told to discard what it accepts.

    Discarding keeps Maildir writes (a file and an fsync per recipient) from competing with
    the client for this machine's two cores: what is measured is SMTP acceptance (smtpd,
    cleanup and the queue file, as in production), not local delivery.  Done with
    ``postconf -e`` and ``postfix reload`` on the rig's own configuration directory; the
    rig itself is not changed.
    """

    def __init__(self) -> None:
        self.rig: Any = None

    def start(self) -> tuple[Endpoint, Endpoint]:
        from tests.interop.rig import PostfixRig

        rig = PostfixRig()
        rig.start()
        self.rig = rig
        config = str(rig.postfix_dir)
        discard = [f"{name}_transport=discard:bench" for name in ("virtual", "default", "relay")]
        postconf = shutil.which("postconf", path=SBIN) or "postconf"
        postfix = shutil.which("postfix", path=SBIN) or "postfix"
        subprocess.run(
            [postconf, "-c", config, "-e", *discard],
            check=True,
            capture_output=True,
        )
        subprocess.run([postfix, "-c", config, "reload"], check=True, capture_output=True)
        time.sleep(1.0)  # the master restarts qmgr and new smtpd processes read main.cf
        user, password = next(iter(rig.users.items()))
        settle = self._settle
        plain = Endpoint("postfix", "Postfix", HOST, rig.plain_port, settle=settle)
        submission = Endpoint(
            "postfix-submission",
            "Postfix submission (STARTTLS + AUTH via Dovecot)",
            HOST,
            rig.submission_port,
            starttls=True,
            username=user,
            password=password,
            cafile=str(rig.ca_cert_path),
            settle=settle,
        )
        return plain, submission

    def _settle(self) -> None:
        with contextlib.suppress(TimeoutError):
            self.rig.wait_for_queue_empty(timeout=30)

    def delivered(self) -> int:
        return len(self.rig.message_paths()) if self.rig is not None else 0

    def version(self) -> str:
        postconf = shutil.which("postconf", path=SBIN) or "postconf"
        result = subprocess.run(
            [postconf, "-d", "-h", "mail_version"], capture_output=True, text=True, check=False
        )
        return result.stdout.strip() or "unknown"

    def stop(self) -> None:
        rig, self.rig = self.rig, None
        if rig is not None:
            rig.stop()


class LocalServer:
    """Fallback for the ``send_mail()`` scenario when the rig cannot start: our aiosmtpd
    server with STARTTLS and AUTH, in this process (so its CPU time counts as ours)."""

    def __init__(self) -> None:
        self.server: Any = None

    def start(self) -> Endpoint:
        from django_socketmail.localserver import LocalSMTPServer

        self.server = LocalSMTPServer(tls="starttls", require_tls=True)
        self.server.start()
        user, password = next(iter(self.server.users.items()))
        return Endpoint(
            "postfix-submission",
            "aiosmtpd LocalSMTPServer (STARTTLS + AUTH), in-process fallback",
            self.server.host,
            self.server.port,
            starttls=True,
            username=user,
            password=password,
            cafile=str(self.server.ca_cert_path),
            in_process=True,
        )

    def stop(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            server.stop()


# -- scenarios and cells ---------------------------------------------------------------------


SHORT_RUN_REPS: Final = 11
"""Timed runs per contender for the 2 KB scenarios at 0 ms: a run takes a quarter of a
second there, and with 5 runs the median still moved by 20 % from one benchmark to the
next on this machine."""


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    title: str
    messages: int
    """How many at 0 ms round-trip time."""
    delayed: int
    """How many at 10 ms (lock-step senders need seconds per hundred: see the docs)."""
    recipients: int
    body_size: int
    per_call: bool = False
    """Each message its own backend and connection, like ``send_mail()``."""
    loopback_reps: int = 3
    """Timed runs at 0 ms (:data:`SHORT_RUN_REPS` where a run takes a fraction of a second)."""
    rtts: tuple[float, ...] = (0.0, 10.0)
    """The round-trip times (ms) at which it runs."""
    contenders: frozenset[str] | None = None
    """Only the contenders with these labels (None: every contender for the scenario)."""

    def count(self, rtt_ms: float, quick: bool) -> int:
        count = self.delayed if rtt_ms else self.messages
        return max(3, count // 10) if quick else count

    def reps(self, rtt_ms: float, quick: bool) -> int:
        return 1 if quick else 3 if rtt_ms else self.loopback_reps


SCENARIOS: Final[dict[str, Scenario]] = {
    s.name: s
    for s in (
        Scenario(
            "1rcpt",
            "messages of 2 KB to 1 recipient, one connection",
            500,
            100,
            1,
            1700,
            loopback_reps=SHORT_RUN_REPS,
        ),
        Scenario(
            "10rcpt",
            "messages of 2 KB to 10 recipients, one connection",
            200,
            40,
            10,
            1500,
            loopback_reps=SHORT_RUN_REPS,
        ),
        Scenario("1MB", "messages of 1 MB to 1 recipient, one connection", 50, 20, 1, 1 << 20),
        Scenario(
            "send_mail",
            "send_mail() calls, each its own connection, STARTTLS + AUTH",
            100,
            30,
            1,
            1700,
            per_call=True,
        ),
        Scenario(
            "send_mail_pool",
            "send_mail() calls with STARTTLS + AUTH, pool on: audit log on vs off",
            100,
            100,
            1,
            1700,
            per_call=True,
            rtts=(10.0,),
            contenders=frozenset(
                {
                    BASELINE,
                    "ours +chunking +pool",
                    "ours +chunking +pool +audit",
                    "ours +chunking +pool +audit (WAL)",
                    "ours +chunking +pool +audit (writer thread)",
                }
            ),
        ),
    )
}
RTTS: Final = (0.0, 10.0)
PLAN: Final = (
    ("smtp-sink", ("1rcpt", "10rcpt", "1MB")),
    ("postfix", ("1rcpt", "10rcpt", "1MB")),
    ("postfix-submission", ("send_mail", "send_mail_pool")),
)


@dataclass(frozen=True, slots=True)
class Cell:
    endpoint: str
    rtt_ms: float
    scenario: str

    @property
    def key(self) -> str:
        return f"{self.endpoint}/{self.rtt_ms:g}ms/{self.scenario}"


_BODIES: dict[int, str] = {}


def build_messages(scenario: Scenario, count: int) -> list[EmailMessage]:
    body = _BODIES.get(scenario.body_size)
    if body is None:
        line = "The quick brown fox jumps over the lazy dog; pack my box with five dozen.\n"
        body = (line * (scenario.body_size // len(line) + 1))[: scenario.body_size]
        _BODIES[scenario.body_size] = body
    recipients = [f"rcpt{n}@example.test" for n in range(scenario.recipients)]
    return [
        EmailMessage(f"bench {scenario.name} {n}", body, SENDER, recipients) for n in range(count)
    ]


def wire_size(scenario: Scenario) -> int:
    from django_socketmail.email_backend import serialize

    return len(serialize(build_messages(scenario, 1)[0]))


# -- measuring -------------------------------------------------------------------------------


@dataclass(slots=True)
class Run:
    wall: float
    cpu: float
    sent: int
    turns: int | None = None
    connections: int | None = None
    peak: int | None = None


@dataclass(slots=True)
class Outcome:
    """A contender's results in one cell."""

    label: str
    count: int
    runs: list[Run] = field(default_factory=list)
    warmup: Run | None = None
    error: str | None = None

    @property
    def rate(self) -> float | None:
        if not self.runs:
            return None
        return statistics.median(self.count / run.wall for run in self.runs)

    @property
    def cpu(self) -> float | None:
        return statistics.median(run.cpu for run in self.runs) if self.runs else None

    @property
    def round_trips(self) -> float | None:
        counted = [run for run in self.runs if run.turns is not None]
        if not counted and self.warmup is not None and self.warmup.turns is not None:
            counted = [self.warmup]
        if not counted:
            return None
        return statistics.median((run.turns or 0) / run.sent for run in counted if run.sent)

    @property
    def peak(self) -> int | None:
        return self.warmup.peak if self.warmup is not None else None


def send(
    ready: Ready, endpoint: Endpoint, port: int, messages: list[EmailMessage], per_call: bool
) -> int:
    """Send ``messages``: one backend and connection for all, or one each like send_mail()."""
    if not per_call:
        return int(ready.make(endpoint, port).send_messages(messages))
    sent = 0
    for message in messages:
        sent += int(ready.make(endpoint, port).send_messages([message]))
    return sent


def close_pooled_sessions() -> None:
    """QUIT the sessions the process-wide pool keeps (if the backend has a pool)."""
    try:
        from django_socketmail.pool import close_pool
    except ImportError:
        return
    close_pool()


def wait_for_audit_rows() -> None:
    """Inside the timed region: if the backend writes audit rows off the caller's path
    (``django_socketmail.audit.drain_audit_log``, when it exists), wait until they are
    written, so that a run's time includes its audit log."""
    try:
        from django_socketmail.audit import drain_audit_log  # type: ignore[attr-defined,unused-ignore]
    except ImportError:
        return
    if not drain_audit_log(TIMEOUT):
        raise RuntimeError("audit rows still unwritten after the timeout")


def clear_audit_log(alias: str | None) -> None:
    from django_socketmail.models import MessageLog, RecipientLog, SessionLog

    for model in (RecipientLog, MessageLog, SessionLog):
        model.objects.using(alias or "default").all().delete()


def measure(
    ready: Ready,
    endpoint: Endpoint,
    port: int,
    scenario: Scenario,
    count: int,
    *,
    proxy: ProxyProcess | None,
    route: str | None,
    trace_memory: bool,
) -> Run:
    messages = build_messages(scenario, count)
    if ready.options.get("audit_log"):
        clear_audit_log(ready.options.get("audit_database"))
    if ready.options.get("pool"):
        # Steady state of a web process, but with a session of this contender's own: the
        # pool is keyed by the client configuration, which contenders may share.
        close_pooled_sessions()
        send(ready, endpoint, port, build_messages(scenario, 1), scenario.per_call)
    if endpoint.settle is not None:
        endpoint.settle()
    if proxy is not None:
        proxy.reset()
    gc.collect()
    if trace_memory:
        tracemalloc.start()
    cpu, wall = time.process_time(), time.perf_counter()
    try:
        sent = send(ready, endpoint, port, messages, scenario.per_call)
        if ready.options.get("audit_log"):
            wait_for_audit_rows()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        peak = None
        if trace_memory:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
    if sent != count:
        raise RuntimeError(f"only {sent} of {count} messages were accepted")
    run = Run(wall, cpu, sent, peak=peak)
    if proxy is not None and route is not None:
        stats = proxy.stats(route)
        run.turns, run.connections = stats["turns"], stats["connections"]
    return run


def run_cell(
    cell: Cell,
    endpoint: Endpoint,
    contenders: list[Ready],
    proxy: ProxyProcess,
    *,
    quick: bool,
    reps: int | None,
    log: Callable[[str], None],
) -> list[Outcome]:
    """Warm up every contender, then ``reps`` timed runs of each, interleaved."""
    scenario = SCENARIOS[cell.scenario]
    count = scenario.count(cell.rtt_ms, quick)
    reps = reps or scenario.reps(cell.rtt_ms, quick)
    delayed = cell.rtt_ms > 0
    counting_route = route_name(endpoint.name, 0.0)
    timed_route = route_name(endpoint.name, cell.rtt_ms) if delayed else None
    timed_port = proxy.port(timed_route) if timed_route else endpoint.port
    outcomes = [Outcome(ready.label, count) for ready in contenders]
    log(f"{cell.key}: {count} messages, {len(contenders)} contenders, {reps} runs each")
    for ready, outcome in zip(contenders, outcomes, strict=True):
        # Untimed.  At 0 ms the whole workload through the proxy (round trips) with
        # tracemalloc on (peak memory); at 10 ms a tenth of it, which only warms up.
        warm_count = min(count, max(3, count // 10)) if delayed else count
        warm_route = timed_route if delayed else counting_route
        assert warm_route is not None
        try:
            outcome.warmup = measure(
                ready,
                endpoint,
                proxy.port(warm_route),
                scenario,
                warm_count,
                proxy=proxy,
                route=warm_route,
                trace_memory=not delayed,
            )
        except Exception as error:
            outcome.error = f"{type(error).__name__}: {error}"
            log(f"  {ready.label}: warm-up failed: {outcome.error}")
    for rep in range(reps):
        shift = rep % len(contenders)
        order = list(zip(contenders, outcomes, strict=True))
        for ready, outcome in order[shift:] + order[:shift]:
            if outcome.error is not None:
                continue
            try:
                run = measure(
                    ready,
                    endpoint,
                    timed_port,
                    scenario,
                    count,
                    proxy=proxy if delayed else None,
                    route=timed_route,
                    trace_memory=False,
                )
            except Exception as error:
                outcome.error = f"{type(error).__name__}: {error}"
                log(f"  {ready.label}: run failed: {outcome.error}")
                continue
            outcome.runs.append(run)
    close_pooled_sessions()  # the next cell starts cold, and nothing is left open at exit
    for outcome in outcomes:
        if outcome.rate is not None:
            log(
                f"  {outcome.label:<28} {outcome.rate:9.1f} msg/s  "
                f"RT/msg {_fmt(outcome.round_trips, '.2f')}  CPU {_fmt(outcome.cpu, '.3f')} s"
            )
    return outcomes


def route_name(endpoint: str, rtt_ms: float) -> str:
    return f"{endpoint}@{rtt_ms:g}"


# -- reporting -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    case: str
    target: str
    cell: Cell
    contenders: tuple[str, ...]
    """The contender measured, first one that ran (later ones: fallbacks)."""
    minimum: float
    versus: str = BASELINE
    peak_factor: float | None = None
    """Also: peak memory under this many times the message size."""


TARGETS: Final = (
    Target(
        "10 ms RTT, smtp-sink, 1 recipient",
        f"≥ 3.5{X} (1 round trip per message)",
        Cell("smtp-sink", 10.0, "1rcpt"),
        ("ours",),
        3.5,
    ),
    Target(
        "10 ms RTT, smtp-sink, 10 recipients",
        f"≥ 9{X}",
        Cell("smtp-sink", 10.0, "10rcpt"),
        ("ours",),
        9.0,
    ),
    Target(
        "10 ms RTT, Postfix with CHUNKING, 1 recipient",
        f"≥ 10{X}",
        Cell("postfix", 10.0, "1rcpt"),
        ("ours +chunking", "ours"),
        10.0,
    ),
    Target(
        "10 ms RTT, 30 single send_mail() calls with STARTTLS + AUTH, pool on",
        f"≥ 8{X}",
        Cell("postfix-submission", 10.0, "send_mail"),
        ("ours +chunking +pool", "ours +pool", "ours"),
        8.0,
    ),
    Target(
        "10 ms RTT, 100 single send_mail() calls with STARTTLS + AUTH, pool on, audit log on "
        "(round two)",
        f"≥ 11{X}",
        Cell("postfix-submission", 10.0, "send_mail_pool"),
        ("ours +chunking +pool +audit",),
        11.0,
    ),
    Target(
        "the same 100 calls: audit log on vs off (round two)",
        f"≥ 0.95{X}",
        Cell("postfix-submission", 10.0, "send_mail_pool"),
        ("ours +chunking +pool +audit",),
        0.95,
        versus="ours +chunking +pool",
    ),
    Target(
        "the same, audit rows by the writer thread (`audit_background=True`)",
        f"≥ 0.95{X}",
        Cell("postfix-submission", 10.0, "send_mail_pool"),
        ("ours +chunking +pool +audit (writer thread)",),
        0.95,
        versus="ours +chunking +pool",
    ),
    Target("loopback, 1 recipient", f"≥ 1.3{X}", Cell("smtp-sink", 0.0, "1rcpt"), ("ours",), 1.3),
    Target(
        "loopback, 10 recipients", f"≥ 1.5{X}", Cell("smtp-sink", 0.0, "10rcpt"), ("ours",), 1.5
    ),
    Target(
        "loopback, 1 MB",
        f"≥ 1.1{X}, and peak memory under 3{X} the message size",
        Cell("smtp-sink", 0.0, "1MB"),
        ("ours",),
        1.1,
        peak_factor=3.0,
    ),
    Target(
        "audit log on vs off, loopback",
        f"≥ 0.8{X}",
        Cell("smtp-sink", 0.0, "1rcpt"),
        ("ours +audit",),
        0.8,
        versus="ours",
    ),
)


def _fmt(value: float | None, spec: str) -> str:
    return DASH if value is None else format(value, spec)


def _size(value: int | None) -> str:
    if value is None:
        return DASH
    if value >= 1 << 20:
        return f"{value / (1 << 20):.1f} MiB"
    return f"{value / 1024:.0f} KiB"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


@dataclass(slots=True)
class Report:
    facts: dict[str, str]
    mode: str
    reps: int | None
    skipped: list[tuple[str, str]]
    dropped: dict[str, list[str]]
    notes: list[str] = field(default_factory=list)
    cells: dict[Cell, list[Outcome]] = field(default_factory=dict)
    endpoints: dict[str, Endpoint] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    not_run: list[str] = field(default_factory=list)
    loads: dict[Cell, float] = field(default_factory=dict)
    """The 1-minute load average when each cell started (other processes count too)."""
    elapsed: float = 0.0

    def outcome(self, cell: Cell, label: str) -> Outcome | None:
        for outcome in self.cells.get(cell, []):
            if outcome.label == label and outcome.rate is not None:
                return outcome
        return None

    def ratio(self, cell: Cell, label: str, versus: str = BASELINE) -> float | None:
        mine, theirs = self.outcome(cell, label), self.outcome(cell, versus)
        if mine is None or theirs is None or not theirs.rate or mine.rate is None:
            return None
        return mine.rate / theirs.rate

    def targets(self) -> tuple[list[list[str]], int]:
        rows, met_count = [], 0
        for target in TARGETS:
            label = next(
                (name for name in target.contenders if self.outcome(target.cell, name)), None
            )
            ratio = self.ratio(target.cell, label, target.versus) if label else None
            notes = []
            met = ratio is not None and ratio >= target.minimum
            measured = "not measured" if ratio is None else f"{ratio:.2f}{X}"
            if label is not None and label != target.contenders[0]:
                notes.append(f"{target.contenders[0]!r} not available, measured {label!r}")
                met = False
            outcome = self.outcome(target.cell, label) if label else None
            if outcome is not None and outcome.round_trips is not None and target.cell.rtt_ms:
                measured += f", {outcome.round_trips:.2f} RT/msg"
            if target.peak_factor is not None and outcome is not None:
                size = self.sizes.get(target.cell.scenario, 0)
                if outcome.peak is None or not size:
                    met = False
                else:
                    factor = outcome.peak / size
                    measured += f", peak {factor:.1f}{X} message size"
                    met = met and factor < target.peak_factor
            met_count += met
            rows.append(
                [
                    target.case,
                    target.target,
                    measured,
                    f"`{label}`" if label else DASH,
                    ("yes" if met else "**no**") + (f" ({'; '.join(notes)})" if notes else ""),
                ]
            )
        return rows, met_count

    def markdown(self) -> str:
        if self.reps:
            runs = str(self.reps)
        elif self.mode == "quick":
            runs = "1"
        else:
            runs = f"{SHORT_RUN_REPS} (2 KB scenarios at 0 ms) or 3"
        out = [
            f"Run of {self.facts['date']} ({self.mode}; median of {runs} timed runs per "
            f"contender; {self.elapsed / 60:.1f} minutes in all).",
            "",
        ]
        out += _table(["machine", ""], [[k, v] for k, v in self.facts.items() if k != "date"])
        out += ["", "### Targets (ratio to Django's backend in the same cell)", ""]
        rows, met = self.targets()
        out += _table(["case", "target", "measured", "contender", "met"], rows)
        out += ["", f"{met} of {len(TARGETS)} targets met."]
        if self.skipped or self.dropped or self.not_run or self.notes:
            out += ["", "### Skipped and notes", ""]
            out += [f"- contender `{label}` skipped: {why}" for label, why in self.skipped]
            out += [
                f"- `{label}`: option(s) {', '.join(names)} not supported yet, left out"
                for label, names in self.dropped.items()
            ]
            out += [f"- not run (time budget): {key}" for key in self.not_run]
            out += [f"- {note}" for note in self.notes]
        for cell, outcomes in self.cells.items():
            scenario = SCENARIOS[cell.scenario]
            endpoint = self.endpoints[cell.endpoint]
            rtt = f"{cell.rtt_ms:g} ms RTT (proxy)" if cell.rtt_ms else "loopback, direct"
            size = self.sizes.get(cell.scenario, 0)
            count = outcomes[0].count if outcomes else 0
            load = self.loads.get(cell)
            out += [
                "",
                f"### {endpoint.title} · {rtt} · {count} {scenario.title} (≈{_size(size)} each)",
                "",
            ]
            if load is not None:
                out += [f"Load average (1 min) when the cell started: {load:.2f}.", ""]
            base = self.outcome(cell, BASELINE)
            rows = []
            for outcome in outcomes:
                if outcome.rate is None:
                    rows.append([f"`{outcome.label}`", f"failed: {outcome.error}", *[DASH] * 5])
                    continue
                ratio = outcome.rate / base.rate if base is not None and base.rate else None
                cpu = outcome.cpu
                rows.append(
                    [
                        f"`{outcome.label}`",
                        f"{outcome.rate:.1f}",
                        _fmt(ratio, ".2f") + (X if ratio is not None else ""),
                        _fmt(outcome.round_trips, ".2f"),
                        _fmt(cpu, ".3f"),
                        _fmt(None if cpu is None else cpu / outcome.count * 1e6, ".0f"),
                        _size(outcome.peak),
                    ]
                )
            out += _table(
                ["contender", "msg/s", f"{X} django", "RT/msg", "CPU s", "CPU µs/msg", "peak mem"],
                rows,
            )
        return "\n".join(out) + "\n"


def machine_facts(postfix_version: str, load: tuple[float, float, float]) -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    commit = subprocess.run(
        ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "load average at start (1, 5, 15 min)": ", ".join(f"{v:.2f}" for v in load),
        "CPUs (nproc)": str(len(os.sched_getaffinity(0))),
        "CPU model": model,
        "kernel": platform.release(),
        "Python": platform.python_version(),
        "Django": django.get_version(),
        "Postfix (smtpd and smtp-sink)": postfix_version,
        "OpenSSL": ssl.OPENSSL_VERSION,
        "commit": commit or "unknown",
    }


def write_docs(
    markdown: str,
    path: Path = DOCS,
    *,
    start: str = RESULTS_START,
    end: str = RESULTS_END,
    heading: str = "Results",
) -> None:
    """Replace the generated block of ``docs/benchmarks.md`` (between the markers ``start``
    and ``end``; without them, append it under a new section ``heading``)."""
    text = path.read_text() if path.exists() else ""
    block = f"{start}\n{markdown}{end}"
    if start in text and end in text:
        head, _, rest = text.partition(start)
        _, _, tail = rest.partition(end)
        text = head + block + tail
    else:
        text += f"\n## {heading}\n\n{block}\n"
    path.write_text(text)


# -- main ------------------------------------------------------------------------------------


WAL_INIT: Final = "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL"


def configure_django(directory: Path) -> None:
    """Settings for this process: django_socketmail installed, fresh SQLite file databases
    for the audit log, migrated: ``default`` as Django makes it (rollback journal, SQLite's
    default ``synchronous=FULL``: every commit waits for the disk) and :data:`WAL_ALIAS`."""
    settings.configure(
        SECRET_KEY="bench-only",
        USE_TZ=True,
        INSTALLED_APPS=["django_socketmail"],
        DATABASES={
            "default": {"ENGINE": "django.db.backends.sqlite3", "NAME": str(directory / "db")},
            WAL_ALIAS: {
                "ENGINE": "django.db.backends.sqlite3",
                # Not "db-wal": SQLite takes that name for the WAL file of "db" (a
                # connection to "db" would read this database as its log).
                "NAME": str(directory / "audit-wal.sqlite3"),
                "OPTIONS": {"init_command": WAL_INIT},
            },
        },
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
        DEFAULT_FROM_EMAIL=SENDER,
        LOGGING_CONFIG=None,
    )
    django.setup()
    from django.core.management import call_command

    call_command("migrate", "django_socketmail", verbosity=0)
    call_command("migrate", "django_socketmail", database=WAL_ALIAS, verbosity=0)


def sqlite_commit_ms(directory: Path, init: str = "", commits: int = 40) -> float:
    """Median milliseconds of one small INSERT + COMMIT into a SQLite file in ``directory``
    (``init``: pragmas run first): what a commit of the audit log waits for on this disk."""
    import sqlite3

    path = directory / f"commit-probe-{len(init)}"
    times = []
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        for pragma in filter(None, (p.strip() for p in init.split(";"))):
            db.execute(pragma)
        db.execute("CREATE TABLE t (a)")
        for n in range(commits):
            start = time.perf_counter()
            db.execute("BEGIN")
            db.execute("INSERT INTO t VALUES (?)", (n,))
            db.execute("COMMIT")
            times.append(time.perf_counter() - start)
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return statistics.median(times) * 1000


@contextlib.contextmanager
def servers(log: Callable[[str], None], lifetime: float, notes: list[str]) -> Iterator[Any]:
    """Start smtp-sink and Postfix (or the in-process fallback); stop all on the way out."""
    sink, postfix, local = SmtpSink(lifetime), PostfixServer(), LocalServer()
    endpoints: dict[str, Endpoint] = {}
    try:
        endpoints["smtp-sink"] = sink.start()
        log(f"smtp-sink listening on {HOST}:{sink.port}")
        try:
            plain, submission = postfix.start()
            endpoints[plain.name], endpoints[submission.name] = plain, submission
            log(f"Postfix rig: plain {plain.port}, submission {submission.port} (discarding)")
        except Exception as error:
            postfix.stop()
            message = f"Postfix rig unavailable ({type(error).__name__}: {error})"
            notes.append(message + "; send_mail() scenario on the in-process aiosmtpd server")
            log(message)
            endpoints["postfix-submission"] = local.start()
        yield endpoints, postfix
    finally:
        local.stop()
        postfix.stop()
        sink.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: ~10x fewer messages")
    parser.add_argument(
        "--reps", type=int, help="timed runs per contender (default 5 or 3, see docs; quick 1)"
    )
    parser.add_argument("--only", action="append", default=[], help="run cells whose key has this")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--no-docs", action="store_true", help="do not update docs/benchmarks.md")
    parser.add_argument(
        "--budget",
        type=float,
        help="minutes after which no new cell starts (default 12, quick 3); on a loaded "
        "machine a full run needs more",
    )
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full"
    soft_limit = args.budget * 60 if args.budget else SOFT_LIMIT[mode]
    hard_limit = max(HARD_LIMIT, soft_limit + 10 * 60)
    reps: int | None = args.reps
    began, load = time.monotonic(), os.getloadavg()
    faulthandler.dump_traceback_later(hard_limit, exit=True)

    def log(text: str) -> None:
        print(f"[{time.monotonic() - began:6.1f}s] {text}", flush=True)

    with tempfile.TemporaryDirectory(prefix="socketmail-bench-") as temp:
        configure_django(Path(temp))
        contenders, skipped = prepare_contenders(CONTENDERS, log=log)
        dropped = {r.label: r.dropped for r in contenders if r.dropped}
        for label, names in dropped.items():
            log(f"{label!r}: not supported yet, left out: {', '.join(names)}")
        notes: list[str] = [
            "SQLite commit (one small INSERT) on this disk, median of 40: "
            f"{sqlite_commit_ms(Path(temp)):.2f} ms as Django opens it (rollback journal, "
            f"synchronous=FULL), {sqlite_commit_ms(Path(temp), WAL_INIT):.2f} ms in WAL mode "
            "with synchronous=NORMAL"
        ]
        with servers(log, hard_limit + 60, notes) as (endpoints, postfix):
            routes = [
                Route(route_name(name, rtt), (endpoint.host, endpoint.port), rtt / 2000)
                for name, endpoint in endpoints.items()
                for rtt in RTTS
            ]
            with ProxyProcess(routes, max_seconds=hard_limit + 60) as proxy:
                rtt = measure_rtt(HOST, proxy.port(route_name("smtp-sink", 10.0)))
                log(f"measured round trip through the 10 ms proxy: {rtt * 1000:.2f} ms")
                notes.append(
                    f"round trip through the proxy, measured with NOOP: {rtt * 1000:.2f} ms"
                )
                report = Report(
                    machine_facts(postfix.version(), load), mode, reps, skipped, dropped, notes
                )
                report.endpoints = endpoints
                report.sizes = {name: wire_size(s) for name, s in SCENARIOS.items()}
                cells = [
                    Cell(name, rtt_ms, scenario)
                    for rtt_ms in RTTS
                    for name, scenarios in PLAN
                    for scenario in scenarios
                    if rtt_ms in SCENARIOS[scenario].rtts
                ]
                for cell in cells:
                    if args.only and not any(part in cell.key for part in args.only):
                        continue
                    if cell.endpoint not in endpoints:
                        continue
                    if time.monotonic() - began > soft_limit:
                        report.not_run.append(cell.key)
                        continue
                    endpoint = endpoints[cell.endpoint]
                    if endpoint.in_process:
                        notes.append(f"{cell.key}: server in this process, CPU s includes it")
                    wanted = SCENARIOS[cell.scenario].contenders
                    chosen = [
                        r
                        for r in contenders
                        if (r.contender.scenarios is None or cell.scenario in r.contender.scenarios)
                        and (wanted is None or r.label in wanted)
                    ]
                    report.loads[cell] = os.getloadavg()[0]
                    report.cells[cell] = run_cell(
                        cell, endpoint, chosen, proxy, quick=args.quick, reps=reps, log=log
                    )
            notes.append(
                "load average at the end (1, 5, 15 min): "
                + ", ".join(f"{v:.2f}" for v in os.getloadavg())
            )
            if postfix.rig is not None and postfix.delivered():
                notes.append(f"{postfix.delivered()} messages reached Maildirs (not discarded)")
    report.elapsed = time.monotonic() - began
    faulthandler.cancel_dump_traceback_later()
    markdown = report.markdown()
    print()
    print(markdown)
    if args.json:
        args.json.write_text(json.dumps(_raw(report), indent=1, default=str))
    if not args.quick and not args.no_docs and not args.only:
        write_docs(markdown)
        print(f"results written to {DOCS.relative_to(REPO)}")
    return 0


def _raw(report: Report) -> dict[str, Any]:
    return {
        "facts": report.facts,
        "cells": {
            cell.key: [dataclasses.asdict(outcome) for outcome in outcomes]
            for cell, outcomes in report.cells.items()
        },
        "skipped": report.skipped,
        "notes": report.notes,
    }


if __name__ == "__main__":
    sys.exit(main())
