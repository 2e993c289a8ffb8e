"""Where the CPU of one pooled ``send_mail()``-style call goes, audit log on and off.

Run from the repository root, as for ``bench/run.py`` (it starts the same Postfix + Dovecot
rig, told to discard, and sends to its submission port: STARTTLS + AUTH)::

    .venv/bin/python bench/profile_call.py                 # 300 calls per variant, direct
    .venv/bin/python bench/profile_call.py --calls 500 --rtt 10

Each variant is the backend of ``bench/run.py``'s contender of that label (``ours
+chunking +pool`` and ``ours +chunking +pool +audit``: the defaults plus ``pool=True``;
and the latter with ``audit_background=True``, whose rows the writer thread writes),
warmed with one call, then ``--calls`` calls of a new backend instance sending one message
built beforehand (as the benchmark times them).  Reported, per call:

The first line of each variant is the process's CPU per call (``time.process_time``: every
thread, the writer's included; the timed loop ends with ``drain_audit_log()``).

1. *stage timers*: CPU seconds of the calling thread (``time.thread_time``: the writer
   thread's own stages count its own CPU only) spent inside a few entry points,
   wrapped at run time in this process only (nothing in ``django_socketmail`` is changed):
   building the backend, ``open()`` (pool acquire), serializing, ``prepare()``, the
   driver's ``send()`` (engine and socket work), recording the message, the audit
   ``flush()`` and the pool release.  Nested stages are not subtracted from each other:
   see the rows' notes.
2. *cProfile by area*: a third pass under ``cProfile`` timing the calling thread's CPU
   (``thread_time``, not the waits for replies or for the disk; the writer thread is not
   profiled), each function's own time added to an area by
   its file (a C function's time goes to the area of the Python function that called it
   most).  cProfile slows Python code more than C code: read the shares, not the absolute
   numbers.

Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import functools
import gc
import pstats
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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

from bench.proxy import ProxyProcess, Route  # noqa: E402
from bench.run import (  # noqa: E402
    CONTENDERS,
    SCENARIOS,
    Endpoint,
    PostfixServer,
    Ready,
    build_messages,
    clear_audit_log,
    close_pooled_sessions,
    configure_django,
    prepare_contenders,
)

VARIANTS: Final = ("ours +chunking +pool", "ours +chunking +pool +audit")
BACKGROUND: Final = "ours +chunking +pool +audit +audit_background"
"""The audited contender with ``audit_background=True`` (the writer thread): its calls are
followed by ``drain_audit_log()``, so their CPU includes the thread's."""

AREAS: Final = (
    ("driver (smtp/client.py)", ("django_socketmail/smtp/client.py",)),
    ("transcript (smtp/transcript.py)", ("django_socketmail/smtp/transcript.py",)),
    ("engine (the rest of smtp/)", ("django_socketmail/smtp/",)),
    ("serializer", ("django_socketmail/serializer.py",)),
    ("audit recorder (audit.py)", ("django_socketmail/audit.py", "django_socketmail/models.py")),
    ("Django ORM + sqlite3", ("django/db/", "sqlite3")),
    ("backend, session, pool, conf", ("django_socketmail/",)),
    ("Django mail + stdlib email", ("django/core/mail", "/email/")),
    ("ssl, socket, selectors", ("/ssl.py", "/socket.py", "/selectors.py", "_ssl", "_socket")),
    ("Django (other)", ("django/",)),
)


def area_of(filename: str, name: str) -> str | None:
    where = f"{filename} {name}"
    for area, needles in AREAS:
        if any(needle in where for needle in needles):
            return area
    return None


# -- stage timers ------------------------------------------------------------------------------


class Stages:
    """CPU seconds and calls per named stage, from wrappers installed at run time."""

    def __init__(self) -> None:
        self.cpu: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._undo: list[Callable[[], None]] = []

    def wrap(self, owner: Any, attribute: str, stage: str) -> None:
        # The class that defines it (a method may live on a base class, e.g. the drivers').
        owner = next(klass for klass in owner.__mro__ if attribute in klass.__dict__)
        original = owner.__dict__[attribute]
        function = original.__func__ if isinstance(original, staticmethod) else original

        @functools.wraps(function)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.thread_time()
            try:
                return function(*args, **kwargs)
            finally:
                self.cpu[stage] += time.thread_time() - start
                self.calls[stage] += 1

        replacement: Any = staticmethod(timed) if isinstance(original, staticmethod) else timed
        setattr(owner, attribute, replacement)
        self._undo.append(lambda: setattr(owner, attribute, original))

    def wrap_module_function(self, module: Any, name: str, stage: str) -> None:
        original = getattr(module, name)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.thread_time()
            try:
                return original(*args, **kwargs)
            finally:
                self.cpu[stage] += time.thread_time() - start
                self.calls[stage] += 1

        setattr(module, name, timed)
        self._undo.append(lambda: setattr(module, name, original))

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()


@contextmanager
def stage_timers() -> Iterator[Stages]:
    from django_socketmail import audit, audit_writer, email_backend, pool, session
    from django_socketmail.smtp import client

    stages = Stages()
    stages.wrap(email_backend.EmailBackend, "__init__", "backend __init__ (options)")
    stages.wrap(email_backend.EmailBackend, "open", "open() (pool acquire + liveness look)")
    stages.wrap_module_function(email_backend, "serialize_parts", "serialize_parts()")
    stages.wrap(client.SMTPClient, "prepare", "client.prepare() (envelope checks)")
    stages.wrap(session.Session, "send", "Session.send() (engine + driver + socket)")
    stages.wrap(audit.AuditRecorder, "message_finished", "recorder.message_finished() (buffer row)")
    stages.wrap(audit.AuditRecorder, "flush", "recorder.flush() (audit transaction)")
    stages.wrap(audit.AuditRecorder, "write", "  AuditRecorder.write() (SQL, any thread)")
    stages.wrap_module_function(audit, "write_retrying", "  write_retrying(), inline")
    stages.wrap_module_function(
        audit_writer, "write_retrying", "  write_retrying(), in the writer thread"
    )
    stages.wrap(pool.ConnectionPool, "release", "pool release (liveness + keep)")
    try:
        yield stages
    finally:
        stages.undo()


# -- running -----------------------------------------------------------------------------------


def calls(ready: Ready, endpoint: Endpoint, port: int, count: int) -> float:
    """``count`` calls, one new backend each; returns the CPU seconds."""
    scenario = SCENARIOS["send_mail_pool"]
    messages = build_messages(scenario, count)
    from django_socketmail.audit import drain_audit_log

    if ready.options.get("audit_log"):
        clear_audit_log(ready.options.get("audit_database"))
    close_pooled_sessions()
    ready.make(endpoint, port).send_messages(build_messages(scenario, 1))
    drain_audit_log(30)
    gc.collect()
    start = time.process_time()
    for message in messages:
        if ready.make(endpoint, port).send_messages([message]) != 1:
            raise RuntimeError("a message was not accepted")
    if not drain_audit_log(30):  # the writer thread's rows (audit_background=True)
        raise RuntimeError("audit rows still unwritten after 30 s")
    return time.process_time() - start


def by_area(profile: cProfile.Profile) -> dict[str, float]:
    """Own time per area; a C function's own time goes to its heaviest Python caller."""
    stats: dict[Any, Any] = getattr(pstats.Stats(profile), "stats")  # noqa: B009 - untyped
    totals: dict[str, float] = defaultdict(float)
    for (filename, _line, name), (_cc, _nc, own, _cum, callers) in stats.items():
        area = area_of(filename, name) if filename != "~" else None
        if area is None and filename == "~":
            area = area_of("", name)
            if area is None and callers:
                heaviest = max(callers.items(), key=lambda item: item[1][2])[0]
                area = area_of(heaviest[0], heaviest[2])
        totals[area or "other (stdlib, interpreter)"] += own
    return dict(totals)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--rtt", type=float, default=0.0, help="ms, through bench/proxy.py")
    parser.add_argument("--top", type=int, default=25, help="functions listed per variant")
    parser.add_argument(
        "--callees",
        action="append",
        default=[],
        help="also list what functions whose name has this text call (repeatable)",
    )
    parser.add_argument("--dump", type=Path, help="write each variant's pstats file here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="socketmail-profile-") as temp:
        configure_django(Path(temp))
        wanted = [c for c in CONTENDERS if c.label in VARIANTS]
        audited = next(c for c in wanted if c.label == VARIANTS[1])
        options = {**audited.options, "audit_background": True}
        wanted.append(dataclasses.replace(audited, label=BACKGROUND, options=options))
        contenders, skipped = prepare_contenders(wanted, log=print)
        if skipped:
            raise SystemExit(f"contenders skipped: {skipped}")
        postfix = PostfixServer()
        try:
            _plain, endpoint = postfix.start()
            route = Route("submission", (endpoint.host, endpoint.port), args.rtt / 2000)
            with ProxyProcess([route], max_seconds=1800) as proxy:
                port = proxy.port("submission") if args.rtt else endpoint.port
                for ready in contenders:
                    report(ready, endpoint, port, args)
        finally:
            close_pooled_sessions()
            postfix.stop()
    return 0


def report(ready: Ready, endpoint: Endpoint, port: int, args: argparse.Namespace) -> None:
    count = args.calls
    print(f"\n## {ready.label}: {count} calls, {args.rtt:g} ms RTT\n")
    wall = time.perf_counter()
    plain_cpu = calls(ready, endpoint, port, count)
    wall = time.perf_counter() - wall
    print(f"no instrumentation: {plain_cpu / count * 1e6:.0f} µs CPU per call, ", end="")
    print(f"{count / wall:.1f} calls/s (wall, incl. warm-up)\n")
    with stage_timers() as stages:
        cpu = calls(ready, endpoint, port, count)
    print(f"stage timers ({cpu / count * 1e6:.0f} µs CPU per call with the wrappers):\n")
    print("| stage | calls per call | µs CPU per call |\n|---|---|---|")
    for stage, seconds in stages.cpu.items():
        per = stages.calls[stage] / count
        print(f"| {stage} | {per:.2f} | {seconds / count * 1e6:.0f} |")
    profile = cProfile.Profile(time.thread_time)  # CPU, not the waits for replies or fsync
    profile.enable()
    cpu = calls(ready, endpoint, port, count)
    profile.disable()
    areas = by_area(profile)
    total = sum(areas.values())
    print(
        f"\ncProfile by area ({cpu / count * 1e6:.0f} µs CPU per call under the profiler, "
        "all threads):\n"
    )
    print("| area | share | µs per call (profiled) |\n|---|---|---|")
    for area, seconds in sorted(areas.items(), key=lambda item: -item[1]):
        print(f"| {area} | {seconds / total:.0%} | {seconds / count * 1e6:.0f} |")
    print(f"\ntop {args.top} functions by own time:\n")
    stats = pstats.Stats(profile)
    stats.sort_stats("tottime").print_stats(args.top)
    for text in args.callees:
        stats.sort_stats("cumulative").print_callees(text)
    if args.dump:
        args.dump.mkdir(parents=True, exist_ok=True)
        stats.dump_stats(args.dump / (ready.label.replace(" ", "_").replace("+", "") + ".pstats"))


if __name__ == "__main__":
    sys.exit(main())
