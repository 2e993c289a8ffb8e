"""Start the rig's Dovecot and Postfix, reap every process they leave, stop them on EOF.

Run by :mod:`tests.interop.rig` as ``python supervisor.py SPEC_JSON`` in a session of
its own, with a pipe on stdin and on stdout. It makes itself a child subreaper
(Linux ``PR_SET_CHILD_SUBREAPER``), so the daemons' processes, which Postfix's
master orphans when it daemonizes or dies, become its children and are reaped
here instead of lingering as zombies. Protocol:

* stdout, one line: ``READY <postfix master pid> <dovecot pid>`` once Dovecot's
  auth socket exists and ``postfix start`` succeeded, or ``ERROR <text>``.
* stdin: end of file (the rig's ``stop()``, or the rig's process dying) means
  stop: SIGTERM to both masters, SIGKILL to their process groups after a grace
  time, and exit only once no descendant is left, not even a zombie. If the rig's
  process died and the spec says ``remove_dir``, the rig's directory goes too.

Standard library only; no Django, no import of the rig.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Final

PR_SET_CHILD_SUBREAPER: Final = 36
GRACE_SECONDS: Final = 10.0
POLL_SECONDS: Final = 0.01


def _become_subreaper() -> None:
    """Make orphaned descendants this process's children (Linux only; no-op elsewhere)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _reap_all() -> bool:
    """Reap every exited child without blocking; return True if no child is left."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return True
        if pid == 0:
            return False


def _signal(pid: int | None, sig: signal.Signals, group: bool = False) -> None:
    """Send ``sig`` to process (or process group) ``pid``; ignore one already gone."""
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def _alive(pid: int) -> bool:
    """Return True if process ``pid`` exists (a zombie not yet reaped counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stop(postfix_pid: int | None, dovecot_pid: int | None) -> None:
    """Stop both daemons and return once every descendant has been reaped.

    Each master gets SIGTERM and stops its own children. Once a master is gone,
    the rest of its process group gets SIGTERM too (Dovecot's auth and log
    processes otherwise linger for half a minute); whatever is still alive after
    the grace time gets SIGKILL.
    """
    masters = [pid for pid in (postfix_pid, dovecot_pid) if pid is not None]
    for pid in masters:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_SECONDS
    killed = False
    while not _reap_all():
        for pid in list(masters):
            if not _alive(pid):
                _signal(pid, signal.SIGTERM, group=True)
                masters.remove(pid)
        if time.monotonic() > deadline:
            if killed:
                return
            for group in (postfix_pid, dovecot_pid):
                _signal(group, signal.SIGKILL, group=True)
            killed = True
            deadline = time.monotonic() + GRACE_SECONDS
        time.sleep(POLL_SECONDS)


def _read_pid(path: Path) -> int | None:
    """Return the pid written in ``path`` (Postfix pads it with spaces), or None."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


class _StopRequested(Exception):
    """Raised by the signal handler: SIGTERM, SIGINT or SIGHUP mean stop, like EOF."""


def _request_stop(signum: int, frame: object) -> None:
    """Signal handler: turn the signal into :class:`_StopRequested`."""
    raise _StopRequested(signum)


class _Daemons:
    """The two masters this supervisor started (pids known so far)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        """Keep the spec; nothing is started yet."""
        self.spec = spec
        self.base = Path(spec["base_dir"])
        self.timeout = float(spec["timeout"])
        self.postfix_pid: int | None = None
        self.dovecot_pid: int | None = None

    def start(self) -> None:
        """Start Dovecot, then Postfix; RuntimeError with a short reason on failure.

        The pids are recorded as soon as known so that :meth:`stop` can end
        whatever was started before the failure.
        """
        with (self.base / "dovecot.stderr").open("wb") as log:
            dovecot = subprocess.Popen(
                [self.spec["dovecot"], "-F", "-c", self.spec["dovecot_conf"]],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        self.dovecot_pid = dovecot.pid
        auth_socket = Path(self.spec["auth_socket"])
        deadline = time.monotonic() + self.timeout
        while not auth_socket.exists():
            if dovecot.poll() is not None:
                raise RuntimeError(f"dovecot exited with status {dovecot.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError("dovecot did not create its auth socket in time")
            time.sleep(POLL_SECONDS)
        # Output to a file, not a pipe: the daemonized master would hold a pipe open
        # (and subprocess.run would wait for it to close).
        with (self.base / "postfix.stderr").open("wb") as log:
            result = subprocess.run(
                [self.spec["postfix"], "-c", self.spec["postfix_dir"], "start"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                check=False,
                env={"PATH": self.spec["path"], "LANG": "C.UTF-8"},
                timeout=self.timeout,
            )
        self.postfix_pid = _read_pid(Path(self.spec["master_pid_file"]))
        if result.returncode != 0 or self.postfix_pid is None:
            raise RuntimeError(f"postfix start exited with status {result.returncode}")

    def stop(self) -> None:
        """Stop both masters and reap every descendant (see :func:`_stop`).

        Postfix's pid file is read again in case a signal interrupted
        ``postfix start`` after the master was up but before its pid was known.
        """
        postfix_pid = self.postfix_pid or _read_pid(Path(self.spec["master_pid_file"]))
        _stop(postfix_pid, self.dovecot_pid)


def main(argv: list[str]) -> int:
    """Run the protocol described in the module docstring; return the exit status."""
    spec = json.loads(argv[1])
    daemons = _Daemons(spec)
    parent = os.getppid()
    _become_subreaper()
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, _request_stop)
    try:
        try:
            daemons.start()
        except (OSError, RuntimeError, subprocess.SubprocessError) as error:
            print(f"ERROR {error}", flush=True)
            return 1
        print(f"READY {daemons.postfix_pid} {daemons.dovecot_pid}", flush=True)
        with selectors.DefaultSelector() as selector:
            selector.register(sys.stdin.buffer, selectors.EVENT_READ)
            # Reap as we go; readable stdin (data or end of file) means: stop now.
            while not selector.select(timeout=0.2):
                _reap_all()
    except (_StopRequested, BrokenPipeError):
        pass
    finally:
        for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        daemons.stop()
        if spec.get("remove_dir") and os.getppid() != parent:
            # The rig's process died without stop(): remove its directory too.
            shutil.rmtree(spec["base_dir"], ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
