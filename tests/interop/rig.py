"""Run a private Postfix submission service with Dovecot SASL on 127.0.0.1 for interop tests.

The rig writes its own Postfix and Dovecot configuration into one directory, starts
both daemons from there on free high ports of 127.0.0.1, delivers every accepted
message into one Maildir under that directory, and stops every process it started.
Nothing under ``/etc`` is read for configuration (beyond what the Debian packages
ship and the daemons read on their own) and nothing there is changed; the
system's own Postfix and Dovecot instances are never touched.

Ports (all on ``127.0.0.1``, certificate for ``localhost`` and ``127.0.0.1``):

* ``plain_port``: STARTTLS offered, AUTH offered without TLS, unauthenticated
  mail to ``example.test`` accepted, unauthenticated relay refused (554).
* ``submission_port``: STARTTLS required (``530`` before it), AUTH only after it,
  MAIL FROM refused with ``530`` until the client has authenticated.
* ``smtps_port``: implicit TLS (RFC 8314), otherwise like ``submission_port``.
* ``dovecot_submission_port`` (only with ``PostfixRig(dovecot_submission=True)``):
  Dovecot's own submission server (``dovecot-submissiond``), STARTTLS offered with
  the same certificate, AUTH against the same users (also without TLS), every
  accepted transaction relayed to ``plain_port`` (so the conventions below hold
  through it too). It logs into ``dovecot_log_path``.

Recipient conventions (any port): ``refuse-*@example.test`` gets ``550 5.1.1`` at
RCPT, ``defer-*@example.test`` gets ``450 4.2.1`` at RCPT, every other address of
``example.test`` is accepted and delivered into the Maildir; authenticated
clients may also send to any other domain, and those messages are delivered
locally too (the rig never sends mail anywhere).

Plain Python, no Django: the rig can be used from any test or benchmark script::

    with PostfixRig() as rig:
        with smtplib.SMTP(rig.host, rig.plain_port) as client:
            client.sendmail("a@example.test", ["b@example.test"], b"Subject: hi\\r\\n\\r\\nhi")
        [raw] = rig.wait_for_messages(1)
"""

from __future__ import annotations

import atexit
import contextlib
import grp
import json
import os
import pwd
import re
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Final

import trustme

__all__ = [
    "DEFAULT_USERS",
    "DEFER_PREFIX",
    "DOMAIN",
    "MESSAGE_SIZE_LIMIT",
    "REFUSE_PREFIX",
    "PostfixRig",
    "RigError",
    "missing_binaries",
    "missing_submission_binaries",
    "strip_trace_headers",
]

DOMAIN: Final = "example.test"
"""The mail domain the rig accepts from anyone and delivers into its Maildir."""

REFUSE_PREFIX: Final = "refuse-"
"""Local parts starting with this are refused at RCPT with ``550 5.1.1``."""

DEFER_PREFIX: Final = "defer-"
"""Local parts starting with this are refused at RCPT with ``450 4.2.1`` (try later)."""

REFUSE_REPLY: Final = "550 5.1.1 Recipient address rejected: refused by test rule"
DEFER_REPLY: Final = "450 4.2.1 Recipient address rejected: deferred by test rule"
BOUNCE_PREFIX: Final = "bounce-"
"""Recipients whose local part starts with this are accepted, then bounced by the queue
manager (``error`` transport: "user unknown"): a delivery status notification goes back to
the envelope sender."""
AUTH_REQUIRED_REPLY: Final = "530 5.7.0 Authentication required"

DEFAULT_USERS: Final[Mapping[str, str]] = {
    "alice": "alice-Secret-1",
    "bob@example.test": "bob pass with spaces",
    "jürgen": "pässwörd-€",
}
"""SASL accounts of the rig: user name -> password (both UTF-8 on the wire)."""

MESSAGE_SIZE_LIMIT: Final = 20 * 1024 * 1024
"""Advertised in ``SIZE`` and enforced by Postfix (bytes)."""

HOST: Final = "127.0.0.1"
SERVER_HOSTNAME: Final = "localhost"
"""The name in the rig's certificate (also valid for ``127.0.0.1``)."""

SBIN_PATH: Final = "/usr/sbin:/sbin:/usr/bin:/bin"
STOP_TIMEOUT: Final = 10.0
START_TIMEOUT: Final = 20.0
MAX_UNIX_SOCKET_PATH: Final = 100
SUPERVISOR: Final = Path(__file__).with_name("supervisor.py")
MAILDIR_NAME: Final = "inbox"
SUBMISSION_PACKAGE: Final = "dovecot-submissiond"
# Where Debian (and a default ./configure) install Dovecot's service executables.
_DOVECOT_LIBEXEC_DIRS: Final = (
    "/usr/lib/dovecot",
    "/usr/libexec/dovecot",
    "/usr/local/libexec/dovecot",
)

# Header fields that Postfix's smtpd (Received) and virtual(8) (Return-Path,
# Delivered-To, X-Original-To) put on top of a delivered message.
_DELIVERY_FIELDS: Final = frozenset({b"return-path", b"delivered-to", b"x-original-to"})
_QUEUE_DIRS: Final = ("maildrop", "incoming", "active", "deferred", "hold")
_NEWLINE: Final = re.compile(rb"\r?\n")


class RigError(RuntimeError):
    """The rig could not be set up, started or stopped; the text says why (with log tails)."""


def missing_binaries() -> list[str]:
    """Return the names of the daemons' executables that are not installed.

    Looks in ``$PATH`` and in the sbin directories (which a non-root ``$PATH`` may
    lack). An empty list means the rig can be started.
    """
    search = os.pathsep.join([os.environ.get("PATH", ""), SBIN_PATH])
    return [
        name for name in ("postfix", "postconf", "dovecot") if not shutil.which(name, path=search)
    ]


def missing_submission_binaries() -> list[str]:
    """Return the names of Dovecot's submission executables that are not installed.

    Looks for ``submission`` and ``submission-login`` (package ``dovecot-submissiond``)
    in the directories Dovecot is usually built to run its services from. An empty
    list means ``PostfixRig(dovecot_submission=True)`` can be started (if the rig can).
    """
    return [
        name
        for name in ("submission", "submission-login")
        if not any(os.access(Path(folder, name), os.X_OK) for folder in _DOVECOT_LIBEXEC_DIRS)
    ]


def _which(name: str) -> str:
    """Return the absolute path of executable ``name``, or raise :class:`RigError`."""
    search = os.pathsep.join([os.environ.get("PATH", ""), SBIN_PATH])
    found = shutil.which(name, path=search)
    if found is None:
        raise RigError(f"{name} not found: apt-get install postfix dovecot-core")
    return found


def _check_dovecot_version() -> None:
    """Raise :class:`RigError` unless Dovecot is 2.3 or older (2.4 changed the config syntax)."""
    result = subprocess.run(
        [_which("dovecot"), "--version"], capture_output=True, text=True, check=False
    )
    match = re.match(r"(\d+)\.(\d+)", result.stdout)
    if match is None or (int(match.group(1)), int(match.group(2))) >= (2, 4):
        raise RigError(
            f"dovecot.conf is written for Dovecot 2.3 (Debian 12); "
            f"found {result.stdout.strip() or result.stderr.strip()!r}"
        )


def strip_trace_headers(raw: bytes) -> bytes:
    """Return ``raw`` without the trace header fields that delivery put on top.

    Removes, from the start of the header only, Postfix's ``Return-Path``,
    ``Delivered-To`` and ``X-Original-To`` fields and the first ``Received`` field
    (the one this Postfix added), each with its folded continuation lines. Any
    ``Received`` field the sender wrote, and everything after the first other
    field, is kept byte for byte. Works with CRLF or LF line ends.
    """
    lines = raw.splitlines(keepends=True)
    index = 0
    received_seen = False
    while index < len(lines):
        line = lines[index]
        name, colon, _ = line.partition(b":")
        name = name.strip().lower()
        if not colon or line[:1] in (b" ", b"\t"):
            break
        if name == b"received":
            if received_seen:
                break
            received_seen = True
        elif name not in _DELIVERY_FIELDS:
            break
        index += 1
        while index < len(lines) and lines[index][:1] in (b" ", b"\t"):
            index += 1
    return b"".join(lines[index:])


def _free_ports(count: int) -> list[int]:
    """Return ``count`` distinct TCP ports of 127.0.0.1 that were free a moment ago.

    All sockets are held open together so the kernel hands out distinct ports; a
    race with another process that binds one before Postfix does is possible but
    shows up as a clear start-up error.
    """
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((HOST, 0))
            ports.append(sock.getsockname()[1])
        return ports


def _live_group_members(pgid: int) -> list[int]:
    """Return the pids of processes in process group ``pgid`` that are not zombies.

    Reads ``/proc`` (Linux): a zombie whose parent does not reap it would keep
    ``killpg(pgid, 0)`` succeeding for ever, although it is already gone.
    """
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command name: state ppid pgrp ...
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) >= 3 and int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def _tail(path: Path, lines: int = 30) -> str:
    """Return the last ``lines`` lines of the text file ``path`` ('' if unreadable)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _maildir_sort_key(path: Path) -> tuple[int, int, str]:
    """Order Maildir files by the delivery time encoded in their name (secs, usecs)."""
    secs, _, rest = path.name.partition(".")
    usecs = re.search(r"M(\d+)", rest)
    return (
        int(secs) if secs.isdigit() else 0,
        int(usecs.group(1)) if usecs else 0,
        path.name,
    )


class PostfixRig:
    """A private Postfix (submission, STARTTLS, implicit TLS) with Dovecot SASL.

    Construct, then :meth:`start` (or use as a context manager); :meth:`stop` ends
    every process started and is idempotent and also registered with
    :mod:`atexit` while running. Attributes valid after :meth:`start`:

    ``host``, ``plain_port``, ``submission_port``, ``smtps_port``,
    ``server_hostname`` (the name to verify), ``ca_cert_path`` (PEM of the test CA),
    ``users`` (name -> password), ``domain``, ``maildir``,
    ``postfix_log_path``, ``dovecot_log_path``, ``startup_seconds``, and
    ``dovecot_submission_port`` (0 unless ``dovecot_submission``).

    ``dovecot_submission``: also run Dovecot's submission server (see the module
    docstring); :meth:`start` raises :class:`RigError` if it is not installed.

    ``base_dir``: where to put everything; ``None`` makes a fresh directory under
    the system temp dir and removes it in :meth:`stop` (unless ``keep_dir``). The
    daemons' unprivileged users must be able to traverse every directory above
    it, so pytest's ``tmp_path`` (under a 0700 directory) does not work.
    """

    def __init__(
        self,
        base_dir: Path | None = None,
        *,
        users: Mapping[str, str] | None = None,
        message_size_limit: int = MESSAGE_SIZE_LIMIT,
        keep_dir: bool = False,
        dovecot_submission: bool = False,
    ) -> None:
        """Prepare a rig; nothing is written or started until :meth:`start`."""
        self.host: Final = HOST
        self.server_hostname: Final = SERVER_HOSTNAME
        self.domain: Final = DOMAIN
        self.users: dict[str, str] = dict(DEFAULT_USERS if users is None else users)
        self.message_size_limit = message_size_limit
        self.plain_port = 0
        self.submission_port = 0
        self.smtps_port = 0
        self.dovecot_submission = dovecot_submission
        self.dovecot_submission_port = 0
        self.startup_seconds = 0.0
        self._own_dir = base_dir is None
        self._keep_dir = keep_dir
        self._base_dir = base_dir
        self._supervisor: subprocess.Popen[bytes] | None = None
        self._daemon_pids: tuple[int, ...] = ()
        self._running = False
        for name, password in self.users.items():
            if any(char in name + password for char in ":\r\n\0") or not name:
                raise RigError(
                    f"user {name!r}: names and passwords may not contain ':', CR, LF, NUL"
                )

    # Paths -----------------------------------------------------------------

    @property
    def base_dir(self) -> Path:
        """The rig's directory (created by :meth:`start` when none was given)."""
        if self._base_dir is None:
            raise RigError("the rig has no directory before start()")
        return self._base_dir

    @property
    def postfix_dir(self) -> Path:
        """Postfix's ``config_directory`` (``main.cf``, ``master.cf``, tables)."""
        return self.base_dir / "postfix"

    @property
    def queue_dir(self) -> Path:
        """Postfix's ``queue_directory`` (outside ``postfix_dir``: different owners)."""
        return self.base_dir / "queue"

    @property
    def dovecot_dir(self) -> Path:
        """Dovecot's directory: ``dovecot.conf``, ``users``, ``run/`` (base_dir), ``state/``."""
        return self.base_dir / "dovecot"

    @property
    def dovecot_mail_dir(self) -> Path:
        """Where Dovecot's submission server may keep each user's (unused) mailbox."""
        return self.dovecot_dir / "mail"

    @property
    def maildir_root(self) -> Path:
        """``virtual_mailbox_base``, owned by the ``postfix`` user that delivers."""
        return self.base_dir / "mail"

    @property
    def maildir(self) -> Path:
        """The Maildir every accepted message is delivered to, one file per recipient."""
        return self.maildir_root / MAILDIR_NAME

    @property
    def ca_cert_path(self) -> Path:
        """PEM file of the throwaway CA that signed the server certificate."""
        return self.base_dir / "tls" / "ca.pem"

    @property
    def postfix_log_path(self) -> Path:
        """Postfix's ``maillog_file``."""
        return self.base_dir / "postfix.log"

    @property
    def dovecot_log_path(self) -> Path:
        """Dovecot's ``log_path`` (auth failures are logged there)."""
        return self.base_dir / "dovecot.log"

    @property
    def auth_socket_path(self) -> Path:
        """Dovecot's auth socket that Postfix's smtpd talks SASL to."""
        return self.dovecot_dir / "run" / "auth-postfix"

    @property
    def running(self) -> bool:
        """True between a successful :meth:`start` and :meth:`stop`."""
        return self._running

    # Life cycle --------------------------------------------------------------

    def __enter__(self) -> PostfixRig:
        """Start the rig and return it."""
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Stop the rig (whether or not the block raised)."""
        self.stop()

    def start(self) -> None:
        """Write the configuration, start Dovecot then Postfix, wait for all greetings.

        Returns when each port has answered ``220`` (through TLS for ``smtps_port``);
        sets ``startup_seconds``. On any failure everything
        already started is stopped and :class:`RigError` is raised with the tails of
        both logs. Calling it on a running rig does nothing.
        """
        if self._running:
            return
        missing = missing_binaries()
        if missing:
            raise RigError(
                f"{', '.join(missing)} not installed: apt-get install postfix dovecot-core"
            )
        missing = missing_submission_binaries() if self.dovecot_submission else []
        if missing:
            raise RigError(
                f"Dovecot's {', '.join(missing)} not installed: "
                f"apt-get install {SUBMISSION_PACKAGE}"
            )
        if os.geteuid() != 0:
            raise RigError("the rig must run as root: Postfix's master daemon needs it")
        _check_dovecot_version()
        began = time.monotonic()
        atexit.register(self.stop)
        try:
            self._prepare_dir()
            ports = _free_ports(4 if self.dovecot_submission else 3)
            self.plain_port, self.submission_port, self.smtps_port = ports[:3]
            self.dovecot_submission_port = ports[3] if self.dovecot_submission else 0
            self._write_tls()
            self._write_dovecot()
            self._write_postfix()
            self._start_daemons(began + START_TIMEOUT)
            self._wait_for_greetings(began + START_TIMEOUT)
        except BaseException:
            self.stop()
            raise
        self._running = True
        self.startup_seconds = time.monotonic() - began

    def stop(self) -> None:
        """Stop Postfix and Dovecot and wait until none of their processes is left.

        Closes the pipe to ``supervisor.py``, which sends SIGTERM to Postfix's and
        Dovecot's masters (they stop their own children), SIGKILL to whatever of
        their process groups is left after a grace time, and exits once it has
        reaped every one of their processes; this waits for that exit. Removes the
        directory the rig made for itself unless ``keep_dir``. Safe to call any
        number of times, also after a failed or partial start.
        """
        atexit.unregister(self.stop)
        self._running = False
        self._stop_daemons()
        if self._own_dir and not self._keep_dir and self._base_dir is not None:
            shutil.rmtree(self._base_dir, ignore_errors=True)
            self._base_dir = None

    # Messages ----------------------------------------------------------------

    def client_ssl_context(self) -> ssl.SSLContext:
        """Return a default client context that trusts only the rig's CA.

        Host name checking stays on: connect with ``server_hostname="localhost"``
        (or ``"127.0.0.1"``, also in the certificate).
        """
        return ssl.create_default_context(cafile=str(self.ca_cert_path))

    def message_paths(self, recipient: str | None = None) -> list[Path]:
        """Return the delivered message files, oldest delivery first.

        ``recipient`` keeps only the copies delivered to that address (compared
        case-insensitively with the ``Delivered-To`` field Postfix wrote).
        """
        paths = sorted(self.maildir.glob("new/*"), key=_maildir_sort_key)
        if recipient is None:
            return paths
        wanted = recipient.casefold()
        return [path for path in paths if _delivered_to(path) == wanted]

    def read_messages(self, recipient: str | None = None) -> list[bytes]:
        """Return the raw delivered messages (one per recipient copy), oldest first.

        Each is the message as Postfix stored it, trace header fields included, with
        CRLF line ends restored (Postfix writes LF into Maildir files), so it can be
        compared with what the client sent once :func:`strip_trace_headers` removed
        the delivery fields. ``recipient`` as in :meth:`message_paths`.
        """
        return [_NEWLINE.sub(b"\r\n", path.read_bytes()) for path in self.message_paths(recipient)]

    def wait_for_messages(
        self, count: int, timeout: float = 10.0, recipient: str | None = None
    ) -> list[bytes]:
        """Wait until at least ``count`` messages are delivered, then return them all.

        Polls :meth:`read_messages`; raises :class:`TimeoutError` (with the tail of
        Postfix's log) when fewer than ``count`` arrived within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            paths = self.message_paths(recipient)
            if len(paths) >= count:
                return self.read_messages(recipient)
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{len(paths)} of {count} messages delivered after {timeout} s; "
                    f"postfix log:\n{_tail(self.postfix_log_path)}"
                )
            time.sleep(0.02)

    def queue_size(self) -> int:
        """Return how many messages Postfix still holds (not yet delivered)."""
        return sum(
            len(files) for name in _QUEUE_DIRS for _, _, files in os.walk(self.queue_dir / name)
        )

    def wait_for_queue_empty(self, timeout: float = 10.0) -> None:
        """Return once Postfix's queue is empty; :class:`TimeoutError` after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while self.queue_size():
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self.queue_size()} messages still queued after {timeout} s; "
                    f"postfix log:\n{_tail(self.postfix_log_path)}"
                )
            time.sleep(0.02)

    def clear_messages(self, timeout: float = 10.0) -> None:
        """Wait for the queue to drain, then delete every delivered message.

        Waiting first keeps a late delivery from an earlier test out of the next
        test's Maildir. Raises :class:`TimeoutError` if the queue does not drain.
        """
        self.wait_for_queue_empty(timeout)
        for child in self.maildir_root.iterdir():
            shutil.rmtree(child, ignore_errors=True)

    def log_tails(self, lines: int = 30) -> str:
        """Return the last ``lines`` lines of both daemons' logs, for error messages."""
        return (
            f"--- {self.postfix_log_path}\n{_tail(self.postfix_log_path, lines)}\n"
            f"--- {self.dovecot_log_path}\n{_tail(self.dovecot_log_path, lines)}"
        )

    # Set-up --------------------------------------------------------------------

    def _prepare_dir(self) -> None:
        """Create the directory tree with the owners and modes the daemons need."""
        if self._base_dir is None:
            self._base_dir = Path(tempfile.mkdtemp(prefix="socketmail-rig-"))
        base = self.base_dir.resolve()
        self._base_dir = base
        base.mkdir(parents=True, exist_ok=True)
        base.chmod(0o755)
        for parent in base.parents:
            if not parent.stat().st_mode & 0o001:
                raise RigError(
                    f"{parent} is not searchable by other users; Postfix and Dovecot "
                    f"drop privileges and cannot reach {base}: use another base_dir"
                )
        if len(str(self.auth_socket_path)) > MAX_UNIX_SOCKET_PATH:
            raise RigError(f"{base} is too long for Dovecot's unix sockets: use a shorter path")
        postfix = pwd.getpwnam("postfix")
        for path in (self.postfix_dir, self.queue_dir, self.dovecot_dir, self.base_dir / "tls"):
            path.mkdir(mode=0o755, exist_ok=True)
            path.chmod(0o755)
        for path in (self.base_dir / "postfix-data", self.maildir_root):
            path.mkdir(mode=0o755, exist_ok=True)
            os.chown(path, postfix.pw_uid, postfix.pw_gid)
        for path in (self.dovecot_dir / "state",):
            path.mkdir(mode=0o750, exist_ok=True)
        if self.dovecot_submission:
            dovecot = pwd.getpwnam("dovecot")
            self.dovecot_mail_dir.mkdir(mode=0o750, exist_ok=True)
            os.chown(self.dovecot_mail_dir, dovecot.pw_uid, dovecot.pw_gid)

    def _write_tls(self) -> None:
        """Issue a certificate for localhost/127.0.0.1 from a throwaway CA (trustme)."""
        ca = trustme.CA()
        server = ca.issue_cert(SERVER_HOSTNAME, HOST)
        ca.cert_pem.write_to_path(str(self.ca_cert_path))
        self.ca_cert_path.chmod(0o644)
        chain = self.base_dir / "tls" / "server.pem"
        chain.touch(mode=0o600)
        server.private_key_and_cert_chain_pem.write_to_path(str(chain))
        if self.dovecot_submission:
            # Dovecot reads the key and the chain from separate files (as root).
            key = self.base_dir / "tls" / "server.key"
            key.touch(mode=0o600)
            server.private_key_pem.write_to_path(str(key))
            certs = self.base_dir / "tls" / "server.crt"
            certs.write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
            certs.chmod(0o644)

    def _write_dovecot(self) -> None:
        """Write ``dovecot.conf`` and the passwd-file of ``users``.

        Auth service only, unless ``dovecot_submission``: then also the submission
        service (see :meth:`_dovecot_submission_conf`).
        """
        dovecot = self.dovecot_dir
        users = dovecot / "users"
        # name:password:uid:gid:gecos:home:shell:extra fields. "nodelay" answers a
        # failed CRAM-MD5 at once; a failed PLAIN/LOGIN drops that field and waits
        # for Dovecot's failure queue, flushed every 0.5 s with auth_failure_delay = 0.
        users.write_text(
            "".join(
                f"{name}:{{PLAIN}}{password}::::::nodelay=yes\n"
                for name, password in self.users.items()
            ),
            encoding="utf-8",
        )
        os.chown(users, 0, grp.getgrnam("dovecot").gr_gid)
        users.chmod(0o640)
        purpose, services = " (auth only)", "protocols = none\nssl = no"
        if self.dovecot_submission:
            purpose, services = " and its submission server", self._dovecot_submission_conf()
        (dovecot / "dovecot.conf").write_text(
            f"""\
# Written by tests/interop/rig.py: Dovecot for Postfix SASL{purpose}.
base_dir = {dovecot}/run
state_dir = {dovecot}/state
instance_name = {self.base_dir.name}
listen = {HOST}
log_path = {self.dovecot_log_path}
{services}
default_internal_user = dovecot
default_login_user = dovenull
disable_plaintext_auth = no
auth_mechanisms = plain login cram-md5
# Any UTF-8 user name (the default allows ASCII letters, digits and .-_@ only).
auth_username_chars =
auth_verbose = yes
# No brute-force protection: tests fail passwords on purpose, many times, fast.
# auth_failure_delay (default 2 s) delays every failure; the anvil penalty
# (2, 4, 8, 15 s more per failing client IP) is disabled by not creating its
# socket (mode = 0), and login_trusted_networks exempts 127.0.0.1 as well.
auth_failure_delay = 0
login_trusted_networks = 127.0.0.0/8
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
service auth {{
  unix_listener auth-postfix {{
    mode = 0666
  }}
}}
# PLAIN scheme: CRAM-MD5 needs the password itself (or its CRAM-MD5 hash).
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {users}
}}
userdb {{
  driver = static
  args = uid=dovecot gid=dovecot home=/nonexistent
}}
""",
            encoding="utf-8",
        )

    def _dovecot_submission_conf(self) -> str:
        """The ``dovecot.conf`` lines of the submission service (Dovecot 2.3 syntax).

        Listens on ``dovecot_submission_port``, offers STARTTLS with the rig's
        certificate (not required: AUTH works without TLS too, like ``plain_port``),
        and relays every transaction, unauthenticated and without TLS, to Postfix's
        ``plain_port``, which accepts ``example.test`` from anyone.
        """
        tls = self.base_dir / "tls"
        return f"""\
protocols = submission
ssl = yes
ssl_cert = <{tls}/server.crt
ssl_key = <{tls}/server.key
hostname = {SERVER_HOSTNAME}
submission_host = {SERVER_HOSTNAME}
submission_relay_host = {HOST}
submission_relay_port = {self.plain_port}
submission_relay_ssl = no
submission_relay_trusted = no
# The static userdb maps every user to the dovecot system user (below 500).
first_valid_uid = {pwd.getpwnam("dovecot").pw_uid}
# Submission sets up each user's mail environment (for BURL), which needs a location.
mail_location = maildir:{self.dovecot_mail_dir}/%u
service submission-login {{
  inet_listener submission {{
    address = {HOST}
    port = {self.dovecot_submission_port}
  }}
  inet_listener submissions {{
    port = 0
  }}
}}"""

    def _write_postfix(self) -> None:
        """Write ``main.cf``, ``master.cf`` and the lookup tables."""
        conf = self.postfix_dir
        postfix = pwd.getpwnam("postfix")
        domain = DOMAIN.replace(".", "\\.")
        (conf / "recipient_access").write_text(
            f"/^{REFUSE_PREFIX}[^@]*@{domain}$/\t{REFUSE_REPLY}\n"
            f"/^{DEFER_PREFIX}[^@]*@{domain}$/\t{DEFER_REPLY}\n"
        )
        (conf / "auth_required").write_text(f"0.0.0.0/0\t{AUTH_REQUIRED_REPLY}\n")
        (conf / "transport").write_text(
            f"/^{BOUNCE_PREFIX}[^@]*@{domain}$/\terror:5.1.1 User unknown in this test rig\n"
        )
        bare_newline = ""
        if self._postfix_knows("smtpd_forbid_bare_newline"):
            # Reject (not normalize) a bare LF: SMTP smuggling tests must see it.
            bare_newline = (
                "smtpd_forbid_bare_newline = reject\nsmtpd_forbid_bare_newline_exclusions =\n"
            )
        (conf / "main.cf").write_text(
            f"""\
# Written by tests/interop/rig.py: a private Postfix, nothing shared with /etc/postfix.
compatibility_level = 3.6
queue_directory = {self.queue_dir}
data_directory = {self.base_dir}/postfix-data
mail_owner = postfix
syslog_name = postfix-rig
maillog_file = {self.postfix_log_path}
maillog_file_prefixes = {self.base_dir}
myhostname = {SERVER_HOSTNAME}
mydomain = {DOMAIN}
myorigin = {DOMAIN}
mydestination =
inet_interfaces = {HOST}
inet_protocols = ipv4
# mynetworks only exempts 127.0.0.1 from anvil's rate limits: no restriction
# below uses permit_mynetworks, so the relay checks apply to local clients too.
mynetworks = 127.0.0.0/8
alias_maps =
alias_database =
biff = no
append_dot_mydomain = no
smtputf8_enable = yes
message_size_limit = {self.message_size_limit}
mailbox_size_limit = 0
virtual_mailbox_limit = 0
# Postfix adds no Date/Message-ID/From to mail from 127.0.0.1.
local_header_rewrite_clients =
{bare_newline}smtpd_peername_lookup = no
# Tests refuse recipients and fail logins on purpose, many per session: no
# tarpit (error sleep), no 421 after 20 errors, no in-flow delay under load.
smtpd_error_sleep_time = 0
smtpd_soft_error_limit = 1000
smtpd_hard_error_limit = 1000
smtpd_junk_command_limit = 100000
in_flow_delay = 0
# Deliver everything accepted, for any domain, into the Maildir; never send mail out.
virtual_mailbox_domains = {DOMAIN}
virtual_mailbox_base = {self.maildir_root}
# One catch-all Maildir: virtual(8) refuses regexp substitutions ($1) in mailbox
# paths, and a static map also makes smtpd accept every recipient of the domain.
virtual_mailbox_maps = static:{MAILDIR_NAME}/
virtual_minimum_uid = 1
virtual_uid_maps = static:{postfix.pw_uid}
virtual_gid_maps = static:{postfix.pw_gid}
default_transport = virtual
relay_transport = virtual
transport_maps = regexp:{conf}/transport
# bounce-* recipients are accepted, then bounced (smtpd would refuse them at RCPT).
smtpd_reject_unlisted_recipient = no
local_transport = error:local delivery is disabled in the test rig
smtpd_relay_restrictions = permit_sasl_authenticated, reject_unauth_destination
smtpd_recipient_restrictions = check_recipient_access regexp:{conf}/recipient_access
rig_auth_required = permit_sasl_authenticated, check_client_access cidr:{conf}/auth_required
smtpd_sasl_auth_enable = yes
smtpd_sasl_type = dovecot
smtpd_sasl_path = {self.auth_socket_path}
smtpd_sasl_security_options = noanonymous
smtpd_sasl_tls_security_options = noanonymous
broken_sasl_auth_clients = no
smtpd_tls_chain_files = {self.base_dir}/tls/server.pem
smtpd_tls_security_level = may
smtpd_tls_auth_only = no
smtpd_tls_received_header = no
smtpd_tls_loglevel = 1
"""
        )
        (conf / "master.cf").write_text(
            f"""\
# Written by tests/interop/rig.py. Nothing chrooted, no smtp client (nothing leaves).
# service type  private unpriv  chroot  wakeup  maxproc command + args
{HOST}:{self.plain_port} inet n - n - - smtpd
  -o syslog_name=postfix-rig/plain
  -o smtpd_tls_security_level=may
  -o smtpd_tls_auth_only=no
{HOST}:{self.submission_port} inet n - n - - smtpd
  -o syslog_name=postfix-rig/submission
  -o smtpd_tls_security_level=encrypt
  -o smtpd_tls_auth_only=yes
  -o smtpd_delay_reject=no
  -o smtpd_sender_restrictions=$rig_auth_required
{HOST}:{self.smtps_port} inet n - n - - smtpd
  -o syslog_name=postfix-rig/smtps
  -o smtpd_tls_wrappermode=yes
  -o smtpd_tls_security_level=encrypt
  -o smtpd_tls_auth_only=yes
  -o smtpd_delay_reject=no
  -o smtpd_sender_restrictions=$rig_auth_required
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""
        )
        # Postfix re-reads a file changed less than about 2 s ago, 300 ms at a time,
        # until it is that old (it might still be being edited): backdate them all.
        past = time.time() - 60
        for name in ("main.cf", "master.cf", "recipient_access", "auth_required", "transport"):
            (conf / name).chmod(0o644)
            os.utime(conf / name, (past, past))

    def _postfix_knows(self, parameter: str) -> bool:
        """Return True if this Postfix version has main.cf parameter ``parameter``."""
        result = subprocess.run(
            [_which("postconf"), "-d", "-h", parameter],
            capture_output=True,
            check=False,
        )
        return result.returncode == 0 and not result.stderr

    # Processes -----------------------------------------------------------------

    def _start_daemons(self, deadline: float) -> None:
        """Start ``supervisor.py``, which starts Dovecot and Postfix; wait for READY.

        The supervisor runs in its own session with a pipe on stdin: closing that
        pipe (``stop()``, or this process dying) makes it stop both daemons and
        reap every process they left.
        """
        spec = {
            "base_dir": str(self.base_dir),
            "dovecot": _which("dovecot"),
            "dovecot_conf": str(self.dovecot_dir / "dovecot.conf"),
            "auth_socket": str(self.auth_socket_path),
            "postfix": _which("postfix"),
            "postfix_dir": str(self.postfix_dir),
            "master_pid_file": str(self.queue_dir / "pid" / "master.pid"),
            "path": SBIN_PATH,
            "timeout": str(START_TIMEOUT),
            "remove_dir": self._own_dir and not self._keep_dir,
        }
        with (self.base_dir / "supervisor.stderr").open("wb") as log:
            self._supervisor = subprocess.Popen(
                [sys.executable, str(SUPERVISOR), json.dumps(spec)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                start_new_session=True,
            )
        assert self._supervisor.stdout is not None
        ready, _, _ = select.select(
            [self._supervisor.stdout], [], [], max(0.0, deadline - time.monotonic())
        )
        line = self._supervisor.stdout.readline().decode(errors="replace").strip() if ready else ""
        words = line.split()
        if len(words) != 3 or words[0] != "READY":
            raise RigError(
                f"the daemons did not start: {line or 'no answer from supervisor.py'}\n"
                f"{_tail(self.base_dir / 'supervisor.stderr')}\n"
                f"{_tail(self.base_dir / 'postfix.stderr')}\n"
                f"{_tail(self.base_dir / 'dovecot.stderr')}\n{self.log_tails()}"
            )
        self._daemon_pids = (int(words[1]), int(words[2]))

    def _stop_daemons(self) -> None:
        """Close the supervisor's stdin and wait until it has stopped everything."""
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is None:
            return
        assert supervisor.stdin is not None and supervisor.stdout is not None
        with contextlib.suppress(OSError):
            supervisor.stdin.close()
        try:
            supervisor.wait(timeout=3 * STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            # Last resort: the supervisor hung; end it and both daemons' groups.
            for pid in (supervisor.pid, *self._daemon_pids):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
            supervisor.wait()
        finally:
            supervisor.stdout.close()
            self._daemon_pids = ()

    def _wait_for_greetings(self, deadline: float) -> None:
        """Return when all three ports send a 220 greeting; RigError after ``deadline``."""
        context = self.client_ssl_context()
        pending = {self.plain_port: False, self.submission_port: False, self.smtps_port: True}
        if self.dovecot_submission_port:
            pending[self.dovecot_submission_port] = False
        while pending:
            for port, tls in list(pending.items()):
                if _greets(port, context if tls else None):
                    del pending[port]
            if not pending:
                return
            if time.monotonic() > deadline:
                raise RigError(f"no 220 greeting on ports {sorted(pending)}:\n{self.log_tails()}")
            time.sleep(0.02)

    def pids(self) -> list[int]:
        """Return the pids of every live process of this rig (supervisor, daemons, children)."""
        groups = [*self._daemon_pids]
        if self._supervisor is not None:
            groups.append(self._supervisor.pid)
        return sorted(pid for group in groups for pid in _live_group_members(group))


def _greets(port: int, context: ssl.SSLContext | None) -> bool:
    """Return True if 127.0.0.1:``port`` answers with a 220 greeting (via TLS if ``context``)."""
    try:
        with socket.create_connection((HOST, port), timeout=2) as raw:
            sock: socket.socket = raw
            if context is not None:
                sock = context.wrap_socket(raw, server_hostname=SERVER_HOSTNAME)
            with sock:
                reply = b""
                while not reply.endswith(b"\r\n"):
                    chunk = sock.recv(512)
                    if not chunk:
                        return False
                    reply += chunk
                sock.sendall(b"QUIT\r\n")
                return reply.startswith(b"220 ")
    except OSError:
        return False


def _delivered_to(path: Path) -> str | None:
    """Return the casefolded address of the first ``Delivered-To`` field of a message file."""
    with path.open("rb") as message:
        for line in message:
            if line in (b"\n", b"\r\n"):
                return None
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"delivered-to":
                return value.strip().decode("utf-8", errors="replace").casefold()
    return None
