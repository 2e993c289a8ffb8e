"""Benchmark the async API of issue 13: bursts of concurrent ``asend_mail()`` calls.

Run from the repository root, as root (the Postfix + Dovecot rig of ``tests/interop/rig.py``
needs it; ``apt-get install postfix dovecot-core``), with the ``bench`` extra installed
(``.venv/bin/pip install -e ".[test,bench]"``: aiosmtplib)::

    .venv/bin/python bench/async_bench.py --quick   # smoke run: under a minute, writes nothing
    .venv/bin/python bench/async_bench.py           # full run: 4 to 6 minutes, rewrites its
                                                    # block of docs/benchmarks.md

Every contender sends the same 200 messages of 2 KB (``bench/run.py``'s 1-recipient
messages), all started at once from one event loop, to the rig's Postfix submission port
(STARTTLS required, then AUTH via Dovecot, CHUNKING offered; Postfix discards what it
accepts, as ``bench/run.py`` sets it up) through ``bench/proxy.py`` with a 10 ms round
trip, which counts the connections and the client's round trips (turns):

- ``django``: Django's SMTP backend, ``send_mail(..., connection=<a new backend>)`` (what
  ``send_mail()`` does with ``get_connection()``) called through
  ``asgiref.sync.sync_to_async`` with its default ``thread_sensitive=True``: what an async
  view can do today.  200 calls in one ``asyncio.gather``.
- ``ours, N connection(s)``: ``django_socketmail.asend_mail()`` with the backend from the
  settings (``EMAIL_*`` plus ``SOCKETMAIL = {"pool": True, "chunking": True, "audit_log":
  False, ...}``), at most N connections for the mailer (see :func:`apply_cap`), 200 calls in
  one ``asyncio.gather``.  One variant has the audit log on (SQLite, as ``bench/run.py``
  opens it) for information; the targets use the audit log off.
- ``aiosmtplib, 3 clients``: aiosmtplib at its best, 3 persistent ``aiosmtplib.SMTP``
  clients (STARTTLS + AUTH, one TLS context made before the clock starts) behind a
  semaphore; each call takes a free client, sends with ``sendmail()`` the bytes Django's
  backend would send (``message().as_bytes()``), and gives the client back.

Each timed repetition runs in a fresh event loop (``asyncio.run``), so the first burst,
*cold*, includes opening the connections (TCP, STARTTLS, AUTH); a second burst in the same
loop, *warm*, finds them open (our loop's pool, aiosmtplib's connected clients; Django's
backend opens a connection per call either way, so it runs cold only).  Then single
``await asend_mail()`` calls on a warm pool, each counted alone at the proxy.

Bounded: every socket operation has a 30 s timeout, every burst a timeout, no new
repetition starts after ``--budget`` minutes, and after the budget plus 10 minutes the
process dumps its stacks and exits; the proxy and the rig stop at end of input.  Not a
test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import faulthandler
import gc
import importlib.metadata
import os
import pstats
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol, cast

if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    # Run as a script, bench/ comes first on sys.path, where a module of this directory
    # could shadow a standard library module.
    del sys.path[0]
REPO: Final = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from asgiref.sync import sync_to_async  # noqa: E402
from django.core.mail import EmailMessage, send_mail  # noqa: E402
from django.test.utils import override_settings  # noqa: E402

from bench.proxy import ProxyProcess, Route, measure_rtt  # noqa: E402
from bench.run import (  # noqa: E402
    DASH,
    HOST,
    SCENARIOS,
    TIMEOUT,
    DjangoBackend,
    Endpoint,
    PostfixServer,
    Run,
    _table,
    build_messages,
    configure_django,
    connection_options,
    machine_facts,
    wire_size,
    write_docs,
)

RTT_MS: Final = 10.0
BURST: Final = {"full": 200, "quick": 20}
SINGLE_CALLS: Final = {"full": 30, "quick": 5}
REPS: Final = {"full": 3, "quick": 1}
BUDGET_MINUTES: Final = {"full": 12.0, "quick": 3.0}
BURST_TIMEOUT: Final = 240.0
"""Seconds one burst may take (Django's backend needs about 50 s for 200 at 10 ms)."""
MESSAGES: Final = SCENARIOS["1rcpt"]
"""2 KB to one recipient, as ``bench/run.py`` sends them."""
X: Final = "\N{MULTIPLICATION SIGN}"
DOCS_START: Final = "<!-- bench:async:start -->"
DOCS_END: Final = "<!-- bench:async:end -->"
DOCS_HEADING: Final = "Async sending (round two)"

Call = tuple[str, str, str, list[str]]
"""``(subject, body, from_email, recipient_list)``: the arguments of one ``send_mail()``."""


def make_calls(count: int) -> list[Call]:
    return [
        (str(m.subject), str(m.body), m.from_email, list(m.to))
        for m in build_messages(MESSAGES, count)
    ]


# -- contenders ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Contender:
    key: str
    label: str
    kind: str
    """``django``, ``ours`` or ``aiosmtplib``."""
    connections: int
    """Ours: the cap per mailer; aiosmtplib: its clients; Django: one per call (0)."""
    audit_log: bool = False

    @property
    def warm(self) -> bool:
        """Whether a second burst in the same loop finds connections open."""
        return self.kind != "django"


CONTENDERS: Final = (
    Contender("django", "django (send_mail via sync_to_async)", "django", 0),
    Contender("ours-1", "ours, 1 connection", "ours", 1),
    Contender("ours-3", "ours, 3 connections", "ours", 3),
    Contender("ours-3-audit", "ours, 3 connections, audit log on", "ours", 3, audit_log=True),
    Contender("aiosmtplib-3", "aiosmtplib, 3 clients", "aiosmtplib", 3),
)


@dataclass(slots=True)
class Env:
    """What every sender needs: the endpoint, the proxy and its routes."""

    endpoint: Endpoint
    proxy: ProxyProcess
    tls_context: ssl.SSLContext
    """For aiosmtplib, made once (as a long-lived application would)."""
    cap_notes: set[str] = field(default_factory=set)

    def port(self, kind: str) -> int:
        return self.proxy.port("django" if kind == "django" else "async")

    def route(self, kind: str) -> str:
        return "django" if kind == "django" else "async"


def ours_settings(env: Env, contender: Contender) -> override_settings:
    """Settings under which ``asend_mail()`` (``get_connection()``) builds our backend."""
    endpoint = env.endpoint
    return override_settings(
        EMAIL_BACKEND="django_socketmail.email_backend.EmailBackend",
        EMAIL_HOST=endpoint.host,
        EMAIL_PORT=env.port("ours"),
        EMAIL_USE_TLS=True,
        EMAIL_HOST_USER=endpoint.username,
        EMAIL_HOST_PASSWORD=endpoint.password,
        EMAIL_TIMEOUT=TIMEOUT,
        SOCKETMAIL={
            "pool": True,
            "pipelining": True,
            "chunking": True,
            "audit_log": contender.audit_log,
            "ssl_cafile": endpoint.cafile,
            "max_connections": contender.connections,
        },
    )


def apply_cap(cap: int) -> str:
    """Let the running loop's coalescer of the configured mailer use at most ``cap``
    connections; says how.  Call it in a fresh loop, before the first send.

    The settings pass ``max_connections`` (documented for queued delivery).  Whether the
    coalescer takes its cap from that option is probed with an unusual value (``cap +
    100``) on the loop's new coalescer; either way the cap is then set on the coalescer
    itself (``async_backend._coalescer``: private, the only way while no option sets it)."""
    from django.core.mail import get_connection

    from django_socketmail import async_backend

    probe = cap + 100
    coalescer = async_backend._coalescer(cast(Any, get_connection(max_connections=probe)))
    honoured = coalescer.max_connections == probe
    coalescer.max_connections = cap
    if honoured:
        return "the backend option max_connections"
    return (
        "set on the loop's Coalescer (its max_connections attribute): no backend option "
        "sets it (max_connections is read by queued delivery only)"
    )


class Sender(Protocol):
    async def burst(self, calls: Sequence[Call]) -> int: ...

    async def close(self) -> None: ...


class DjangoSender:
    """Django's ``send_mail()`` with a new Django SMTP backend per call, in
    ``sync_to_async`` (``thread_sensitive=True``: one thread for all, Django's default)."""

    def __init__(self, env: Env) -> None:
        self.options = connection_options(DjangoBackend, env.endpoint, env.port("django"))

    def _one(self, call: Call) -> int:
        backend = DjangoBackend(**self.options)
        return int(send_mail(*call, connection=backend))

    async def burst(self, calls: Sequence[Call]) -> int:
        one = sync_to_async(self._one)
        return sum(await asyncio.gather(*(one(call) for call in calls)))

    async def close(self) -> None:
        return None


class OursSender:
    """``django_socketmail.asend_mail()``, the backend from the settings."""

    def __init__(self, env: Env, contender: Contender) -> None:
        env.cap_notes.add(apply_cap(contender.connections))

    async def burst(self, calls: Sequence[Call]) -> int:
        from django_socketmail import asend_mail

        return sum(await asyncio.gather(*(asend_mail(*call) for call in calls)))

    async def close(self) -> None:
        return None  # the loop's pool QUITs its sessions when asyncio.run ends


class AiosmtplibSender:
    """aiosmtplib at its best: ``clients`` persistent connections behind a semaphore."""

    def __init__(self, env: Env, clients: int) -> None:
        import aiosmtplib

        endpoint = env.endpoint
        self.clients = [
            aiosmtplib.SMTP(
                hostname=endpoint.host,
                port=env.port("aiosmtplib"),
                start_tls=True,
                username=endpoint.username,
                password=endpoint.password,
                tls_context=env.tls_context,
                timeout=TIMEOUT,
            )
            for _ in range(clients)
        ]
        self.free: list[aiosmtplib.SMTP] = []
        self.semaphore = asyncio.Semaphore(clients)

    async def burst(self, calls: Sequence[Call]) -> int:
        if not self.free:
            await asyncio.gather(*(client.connect() for client in self.clients))
            self.free = list(self.clients)
        return sum(await asyncio.gather(*(self._one(call) for call in calls)))

    async def _one(self, call: Call) -> int:
        subject, body, sender, recipients = call
        message = EmailMessage(subject, body, sender, recipients).message()
        # As Django's SMTP backend serializes it (Django's message classes take linesep).
        data = message.as_bytes(linesep="\r\n")  # type: ignore[call-arg]
        async with self.semaphore:
            client = self.free.pop()
            try:
                await client.sendmail(sender, recipients, data)
            finally:
                self.free.append(client)
        return 1

    async def close(self) -> None:
        for client in self.clients:
            if client.is_connected:
                try:
                    await asyncio.wait_for(client.quit(), 5)
                except Exception:
                    client.close()


def make_sender(env: Env, contender: Contender) -> Sender:
    if contender.kind == "django":
        return DjangoSender(env)
    if contender.kind == "ours":
        return OursSender(env, contender)
    return AiosmtplibSender(env, contender.connections)


# -- measuring -------------------------------------------------------------------------------


@dataclass(slots=True)
class Outcome:
    contender: Contender
    count: int
    cold: list[Run] = field(default_factory=list)
    warm: list[Run] = field(default_factory=list)
    error: str | None = None

    def runs(self, start: str) -> list[Run]:
        return self.cold if start == "cold" else self.warm

    def rate(self, start: str) -> float | None:
        runs = self.runs(start)
        return statistics.median(self.count / r.wall for r in runs) if runs else None

    def median(self, start: str, get: Callable[[Run], float | None]) -> float | None:
        values = [v for v in map(get, self.runs(start)) if v is not None]
        return statistics.median(values) if values else None


async def timed_burst(sender: Sender, env: Env, kind: str, calls: Sequence[Call]) -> Run:
    """One burst, timed from the first call to the last return; proxy counts alongside."""
    if env.endpoint.settle is not None:
        env.endpoint.settle()
    env.proxy.reset()
    gc.collect()
    cpu, wall = time.process_time(), time.perf_counter()
    sent = await asyncio.wait_for(sender.burst(calls), BURST_TIMEOUT)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if sent != len(calls):
        raise RuntimeError(f"only {sent} of {len(calls)} messages were accepted")
    stats = env.proxy.stats(env.route(kind))
    return Run(wall, cpu, sent, turns=stats["turns"], connections=stats["connections"])


async def repetition(
    env: Env, contender: Contender, calls: Sequence[Call]
) -> tuple[Run, Run | None]:
    """In the running (fresh) loop: a cold burst, then a warm one if that means anything."""
    sender = make_sender(env, contender)
    try:
        cold = await timed_burst(sender, env, contender.kind, calls)
        warm = await timed_burst(sender, env, contender.kind, calls) if contender.warm else None
    finally:
        await sender.close()
    return cold, warm


def run_repetition(env: Env, contender: Contender, calls: Sequence[Call]) -> tuple[Run, Run | None]:
    """:func:`repetition` in a fresh event loop (a cold pool), our settings on for ours."""
    coroutine = repetition(env, contender, calls)
    if contender.kind != "ours":
        return asyncio.run(coroutine)
    with ours_settings(env, contender):
        return asyncio.run(coroutine)


@dataclass(slots=True)
class Single:
    """Single calls, each alone on a warm pool (or, for Django, its own connection)."""

    label: str
    latencies: list[float] = field(default_factory=list)
    turns: list[int] = field(default_factory=list)
    connections: list[int] = field(default_factory=list)


async def single_calls(env: Env, contender: Contender, calls: Sequence[Call]) -> Single:
    """One untimed call to warm up, then each call alone, counted at the proxy."""
    sender = make_sender(env, contender)
    single = Single(contender.label)
    try:
        await sender.burst(calls[:1])
        for call in calls[1:]:
            env.proxy.reset()
            started = time.perf_counter()
            sent = await asyncio.wait_for(sender.burst([call]), BURST_TIMEOUT)
            single.latencies.append(time.perf_counter() - started)
            if sent != 1:
                raise RuntimeError("the message was not accepted")
            stats = env.proxy.stats(env.route(contender.kind))
            single.turns.append(stats["turns"])
            single.connections.append(stats["connections"])
    finally:
        await sender.close()
    return single


def run_single_calls(env: Env, contender: Contender, calls: Sequence[Call]) -> Single:
    coroutine = single_calls(env, contender, calls)
    if contender.kind != "ours":
        return asyncio.run(coroutine)
    with ours_settings(env, contender):
        return asyncio.run(coroutine)


def profile_burst(env: Env, contender: Contender, calls: Sequence[Call], top: int) -> None:
    """cProfile of one cold and one warm burst of ``contender`` (untimed; printed)."""
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        run_repetition(env, contender, calls)
    finally:
        profiler.disable()
    stats = pstats.Stats(profiler, stream=sys.stdout)
    print(f"\n--- cProfile of {contender.label}: a cold and a warm burst of {len(calls)} ---")
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)


# -- reporting -------------------------------------------------------------------------------


@dataclass(slots=True)
class Report:
    facts: dict[str, str]
    mode: str
    reps: int
    count: int
    outcomes: dict[str, Outcome]
    singles: list[Single] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    loads: list[float] = field(default_factory=list)
    elapsed: float = 0.0

    def rate(self, key: str, start: str = "cold") -> float | None:
        outcome = self.outcomes.get(key)
        return outcome.rate(start) if outcome is not None else None

    def ratio(self, key: str, versus: str, start: str = "cold") -> float | None:
        mine = self.rate(key, start)
        # Django's backend opens a connection per call: its cold run is its only one.
        theirs = self.rate(versus, "cold" if versus == "django" else start)
        return mine / theirs if mine and theirs else None

    def targets(self) -> tuple[list[list[str]], int]:
        rows: list[list[str]] = []
        met_count = 0

        def row(case: str, target: str, measured: str, met: bool) -> None:
            nonlocal met_count
            met_count += met
            rows.append([case, target, measured, "yes" if met else "**no**"])

        n = self.count
        r1 = self.ratio("ours-1", "django")
        turns1 = self.outcomes["ours-1"].median("cold", lambda r: r.turns)
        row(
            f"{n} concurrent `asend_mail()`, 1 connection allowed, vs Django's backend via "
            "`sync_to_async`",
            f"≥ 20{X}, burst in ≤ 15 round trips",
            f"{_ratio(r1)}, {_num(turns1, '.0f')} round trips (cold: connection set-up "
            f"included); warm {_ratio(self.ratio('ours-1', 'django', 'warm'))}, "
            f"{_num(self.outcomes['ours-1'].median('warm', lambda r: r.turns), '.0f')} round trips",
            r1 is not None and r1 >= 20 and turns1 is not None and turns1 <= 15,
        )
        r3 = self.ratio("ours-3", "django")
        row(
            "the same, 3 connections allowed",
            f"≥ 40{X}",
            f"{_ratio(r3)} (cold); warm {_ratio(self.ratio('ours-3', 'django', 'warm'))}",
            r3 is not None and r3 >= 40,
        )
        ra = self.ratio("ours-3", "aiosmtplib-3")
        row(
            "the same, vs aiosmtplib's 3 persistent clients behind a semaphore",
            f"≥ 5{X}",
            f"{_ratio(ra)} (both cold); warm vs warm "
            f"{_ratio(self.ratio('ours-3', 'aiosmtplib-3', 'warm'))}",
            ra is not None and ra >= 5,
        )
        ours = next((s for s in self.singles if s.label.startswith("ours")), None)
        if ours is not None and ours.turns:
            turns = statistics.median(ours.turns)
            row(
                "single `await asend_mail()` on a warm pool",
                "1 round trip",
                f"{turns:g} (median of {len(ours.turns)} calls; most {max(ours.turns)}), "
                f"{statistics.median(ours.latencies) * 1000:.1f} ms",
                turns <= 1 and max(ours.turns) <= 1,
            )
        else:
            row("single `await asend_mail()` on a warm pool", "1 round trip", "not measured", False)
        return rows, met_count

    def markdown(self) -> str:
        out = [
            f"Run of {self.facts['date']} ({self.mode}; median of {self.reps} timed "
            f"repetition(s) per contender; {self.elapsed / 60:.1f} minutes in all).",
            "",
        ]
        out += _table(["machine", ""], [[k, v] for k, v in self.facts.items() if k != "date"])
        rows, met = self.targets()
        out += ["", "### Targets (issue 13)", ""]
        out += _table(["case", "target", "measured", "met"], rows)
        out += ["", f"{met} of {len(rows)} targets met."]
        out += [
            "",
            f"### Bursts of {self.count} concurrent sends (10 ms RTT, STARTTLS + AUTH)",
            "",
        ]
        header = [
            "contender",
            "start",
            "msg/s",
            f"{X} django",
            "wall s",
            "round trips",
            "connections",
            "CPU s",
            "CPU µs/msg",
        ]
        body: list[list[str]] = []
        for outcome in self.outcomes.values():
            if outcome.error is not None and not outcome.cold:
                body.append(
                    [f"`{outcome.contender.label}`", f"failed: {outcome.error}"] + [DASH] * 7
                )
                continue
            for start in ("cold", "warm"):
                rate = outcome.rate(start)
                if rate is None:
                    continue
                cpu = outcome.median(start, lambda r: r.cpu)
                body.append(
                    [
                        f"`{outcome.contender.label}`",
                        start,
                        f"{rate:.1f}",
                        _ratio(self.ratio(outcome.contender.key, "django", start)),
                        _num(outcome.median(start, lambda r: r.wall), ".3f"),
                        _num(outcome.median(start, lambda r: r.turns), ".0f"),
                        _num(outcome.median(start, lambda r: r.connections), ".0f"),
                        _num(cpu, ".3f"),
                        _num(None if cpu is None else cpu / outcome.count * 1e6, ".0f"),
                    ]
                )
        out += _table(header, body)
        if self.singles:
            out += ["", "### Single calls, each alone (10 ms RTT)", ""]
            rows2 = [
                [
                    f"`{s.label}`",
                    str(len(s.latencies)),
                    f"{statistics.median(s.latencies) * 1000:.1f}",
                    f"{max(s.latencies) * 1000:.1f}",
                    f"{statistics.median(s.turns):g} / {max(s.turns)}",
                    str(sum(s.connections)),
                ]
                for s in self.singles
                if s.latencies
            ]
            out += _table(
                [
                    "contender",
                    "calls",
                    "median ms",
                    "slowest ms",
                    "round trips (median / most)",
                    "connections opened",
                ],
                rows2,
            )
        out += ["", "### Notes", ""]
        out += [f"- {note}" for note in self.notes]
        return "\n".join(out) + "\n"


def _num(value: float | None, spec: str) -> str:
    return DASH if value is None else format(value, spec)


def _ratio(value: float | None) -> str:
    return DASH if value is None else f"{value:.2f}{X}"


# -- main ------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 20 per burst, 1 rep")
    parser.add_argument("--reps", type=int, help="timed repetitions per contender (default 3)")
    parser.add_argument("--count", type=int, help="calls per burst (default 200)")
    parser.add_argument(
        "--only", action="append", default=[], help="contender keys to run (django always runs)"
    )
    parser.add_argument("--no-docs", action="store_true", help="do not update docs/benchmarks.md")
    parser.add_argument("--budget", type=float, help="minutes after which no repetition starts")
    parser.add_argument(
        "--profile",
        metavar="KEY",
        help="instead of measuring: cProfile one cold + warm burst of this contender",
    )
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full"
    count = args.count or BURST[mode]
    reps = args.reps or REPS[mode]
    budget = (args.budget or BUDGET_MINUTES[mode]) * 60
    hard_limit = budget + 10 * 60
    began, load = time.monotonic(), os.getloadavg()
    faulthandler.dump_traceback_later(hard_limit, exit=True)

    def log(text: str) -> None:
        print(f"[{time.monotonic() - began:6.1f}s] {text}", flush=True)

    contenders = [c for c in CONTENDERS if not args.only or c.key == "django" or c.key in args.only]
    calls = make_calls(count)
    with tempfile.TemporaryDirectory(prefix="socketmail-async-bench-") as temp:
        configure_django(Path(temp))
        postfix = PostfixServer()
        try:
            _, submission = postfix.start()
            log(f"Postfix rig: submission {submission.port} (discarding)")
            assert submission.cafile is not None
            routes = [
                Route(name, (submission.host, submission.port), RTT_MS / 2000)
                for name in ("django", "async", "rtt")
            ]
            with ProxyProcess(routes, max_seconds=hard_limit + 60) as proxy:
                env = Env(submission, proxy, ssl.create_default_context(cafile=submission.cafile))
                if args.profile:
                    chosen = next(c for c in CONTENDERS if c.key == args.profile)
                    profile_burst(env, chosen, calls, 30)
                    return 0
                rtt = measure_rtt(HOST, proxy.port("rtt"))
                log(f"round trip through the proxy (NOOP): {rtt * 1000:.2f} ms")
                facts = machine_facts(postfix.version(), load)
                facts["aiosmtplib"] = importlib.metadata.version("aiosmtplib")
                report = Report(facts, mode, reps, count, {})
                report.notes.append(
                    f"round trip through the proxy, measured with NOOP: {rtt * 1000:.2f} ms; "
                    f"messages of {wire_size(MESSAGES)} bytes on the wire, 1 recipient each"
                )
                outcomes = report.outcomes = {c.key: Outcome(c, count) for c in contenders}
                # Untimed warm-up of each contender (imports, TLS contexts, first connections).
                for contender in contenders:
                    try:
                        run_repetition(env, contender, calls[:3])
                    except Exception as error:
                        outcomes[contender.key].error = f"{type(error).__name__}: {error}"
                        log(f"{contender.label}: warm-up failed: {outcomes[contender.key].error}")
                log("warmed up; single calls")
                single_count = SINGLE_CALLS[mode] + 1
                for key in ("ours-3", "django"):
                    contender = next(c for c in CONTENDERS if c.key == key)
                    if key not in outcomes or outcomes[key].error is not None:
                        continue
                    single = run_single_calls(env, contender, make_calls(single_count))
                    report.singles.append(single)
                    median_ms = statistics.median(single.latencies) * 1000
                    log(f"  {contender.label}: {median_ms:.1f} ms, round trips {single.turns}")
                for rep in range(reps):
                    report.loads.append(os.getloadavg()[0])
                    order = (
                        contenders[rep % len(contenders) :] + contenders[: rep % len(contenders)]
                    )
                    for contender in order:
                        outcome = outcomes[contender.key]
                        if outcome.error is not None:
                            continue
                        if time.monotonic() - began > budget:
                            report.notes.append(
                                f"time budget reached: {contender.label} ran "
                                f"{len(outcome.cold)} of {reps} repetitions"
                            )
                            continue
                        try:
                            cold, warm = run_repetition(env, contender, calls)
                        except Exception as error:
                            outcome.error = f"{type(error).__name__}: {error}"
                            log(f"{contender.label}: failed: {outcome.error}")
                            continue
                        outcome.cold.append(cold)
                        if warm is not None:
                            outcome.warm.append(warm)
                        log(
                            f"rep {rep + 1} {contender.label:<36} cold {cold.wall:7.3f} s "
                            f"RT {cold.turns} conn {cold.connections} CPU {cold.cpu:.3f}"
                            + (
                                f" | warm {warm.wall:7.3f} s RT {warm.turns} "
                                f"conn {warm.connections} CPU {warm.cpu:.3f}"
                                if warm is not None
                                else ""
                            )
                        )
        finally:
            postfix.stop()
    report.notes += [
        "audit log off for every contender of ours except the one labelled "
        "`audit log on` (SQLite file database as Django opens it)",
        f"per-mailer connection cap: {'; '.join(sorted(env.cap_notes)) or DASH}",
        "load average (1 min) at the start of each repetition round: "
        + ", ".join(f"{v:.2f}" for v in report.loads),
        "load average at the end (1, 5, 15 min): " + ", ".join(f"{v:.2f}" for v in os.getloadavg()),
    ]
    report.notes += [
        f"{o.contender.label}: {o.error}" for o in report.outcomes.values() if o.error is not None
    ]
    report.elapsed = time.monotonic() - began
    faulthandler.cancel_dump_traceback_later()
    markdown = report.markdown()
    print()
    print(markdown)
    if not args.quick and not args.no_docs and not args.only and args.count is None:
        write_docs(markdown, start=DOCS_START, end=DOCS_END, heading=DOCS_HEADING)
        print("results written to docs/benchmarks.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
