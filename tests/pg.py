"""A real PostgreSQL server for the tests: Debian's PostgreSQL 15, private to one test run.

What it is
    :func:`start_postgres` runs ``initdb`` on a new temporary directory and starts the
    server with ``pg_ctl`` on a free high port of 127.0.0.1 (unix socket in the same
    temporary directory, ``trust`` authentication, fsync off).  As root it runs both as
    the ``postgres`` system user (``initdb`` refuses root).  :meth:`PostgresServer.stop`
    signals the postmaster by its own pid (read from its ``postmaster.pid``), waits for it
    to go, then removes the directory.  No other PostgreSQL on the machine is touched.

Fixtures (exposed to every test module by ``tests/conftest.py``)
    ``postgres_server`` (session): the running :class:`PostgresServer`, for tests that want
    a raw server (``server.connect()`` gives a psycopg connection; ``server.dsn``).

    ``postgres_database`` (session): the Django database alias :data:`ALIAS` (``"postgres"``)
    pointing at a fresh database on that server, with every migration applied.  A test uses
    it with ``@pytest.mark.django_db(transaction=True, databases=["default", "postgres"])``
    and writes through ``.using("postgres")`` or an option naming the alias (such as
    ``audit_database="postgres"``); Django flushes its tables after each test.  The alias
    exists only while the server is up: the default SQLite suite is unchanged.

When PostgreSQL is missing
    Without the server binaries (``apt-get install postgresql``) or ``psycopg`` (the
    ``test`` extra), both fixtures skip the test, except when ``CI=true``: there they fail
    it, so a CI machine that lost the package cannot go green by skipping.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pytest

__all__ = ["ALIAS", "BIN_DIR", "PostgresServer", "missing", "start_postgres"]

BIN_DIR: Final = Path(os.environ.get("SOCKETMAIL_PG_BIN", "/usr/lib/postgresql/15/bin"))
"""Where ``initdb``, ``pg_ctl`` and ``postgres`` are looked for."""
ALIAS: Final = "postgres"
"""The Django database alias of the ``postgres_database`` fixture."""
SYSTEM_USER: Final = "postgres"
"""The user the server runs as when the tests run as root."""
START_TIMEOUT: Final = 60
STOP_TIMEOUT: Final = 15.0


def missing() -> str | None:
    """Why a PostgreSQL server cannot be started here, or None when it can."""
    for name in ("initdb", "pg_ctl", "postgres"):
        if not (BIN_DIR / name).is_file():
            return f"PostgreSQL 15 is not installed ({BIN_DIR / name}: apt-get install postgresql)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install -e '.[test]')"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            return f"running as root and there is no {SYSTEM_USER!r} user to run PostgreSQL as"
    return None


def skip_or_fail(reason: str) -> None:
    """Skip the test, or fail it under ``CI=true`` (CI installs PostgreSQL: a skip there
    would hide a broken install)."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason)


@dataclass
class PostgresServer:
    """A running server: where it listens and how to reach it as its superuser."""

    root: Path
    port: int
    pid: int
    host: str = "127.0.0.1"
    user: str = "postgres"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_file(self) -> Path:
        return self.root / "server.log"

    @property
    def dsn(self) -> str:
        return f"host={self.host} port={self.port} user={self.user} dbname=postgres"

    def connect(self, dbname: str = "postgres") -> Any:
        """A new autocommit psycopg connection to ``dbname``."""
        import psycopg

        return psycopg.connect(
            host=self.host, port=self.port, user=self.user, dbname=dbname, autocommit=True
        )

    def create_database(self, name: str) -> None:
        from psycopg import sql

        with self.connect() as connection:
            connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    def settings_dict(self, name: str) -> dict[str, Any]:
        """A Django ``DATABASES`` entry for database ``name`` on this server."""
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": name,
            "USER": self.user,
            "HOST": self.host,
            "PORT": str(self.port),
        }

    def stop(self) -> None:
        """Stop the postmaster by its pid (fast shutdown; SIGKILL after
        :data:`STOP_TIMEOUT` seconds) and remove the temporary directory."""
        pid_file = self.data_dir / "postmaster.pid"
        try:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGINT)
            deadline = time.monotonic() + STOP_TIMEOUT
            while pid_file.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            if pid_file.exists():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _run_as(user: pwd.struct_passwd | None) -> dict[str, Any]:
    if user is None:
        return {}
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def start_postgres() -> PostgresServer:
    """Create a cluster in a new temporary directory and start it (see the module doc)."""
    reason = missing()
    if reason is not None:
        raise RuntimeError(reason)
    account = pwd.getpwnam(SYSTEM_USER) if os.geteuid() == 0 else None
    root = Path(tempfile.mkdtemp(prefix="socketmail-pg-"))
    if account is not None:
        os.chown(root, account.pw_uid, account.pw_gid)
    as_user = _run_as(account)
    env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
    try:
        subprocess.run(
            [
                str(BIN_DIR / "initdb"),
                "-D",
                str(root / "data"),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
            env=env,
            timeout=START_TIMEOUT,
            cwd=root,
            **as_user,
        )
        port = _free_port()
        options = (
            f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=40 "
            "-c shared_buffers=32MB"
        )
        subprocess.run(
            [
                str(BIN_DIR / "pg_ctl"),
                "-D",
                str(root / "data"),
                "-l",
                str(root / "server.log"),
                "-o",
                options,
                "-w",
                "-t",
                str(START_TIMEOUT),
                "start",
            ],
            check=True,
            capture_output=True,
            env=env,
            timeout=START_TIMEOUT + 5,
            cwd=root,
            **as_user,
        )
        pid = int((root / "data" / "postmaster.pid").read_text().split("\n", 1)[0])
    except (subprocess.SubprocessError, OSError, ValueError) as error:
        log = root / "server.log"
        detail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        output = getattr(error, "stderr", b"") or b""
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(
            f"PostgreSQL did not start: {error}\n{output.decode(errors='replace')}\n{detail}"
        ) from error
    return PostgresServer(root=root, port=port, pid=pid)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the whole test session (see the module docstring)."""
    reason = missing()
    if reason is not None:
        skip_or_fail(reason)
    server = start_postgres()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_database(
    postgres_server: PostgresServer,
    django_db_setup: None,
    django_db_blocker: Any,
) -> Iterator[str]:
    """The Django alias :data:`ALIAS`, migrated, on ``postgres_server``; returns the alias."""
    from django.conf import settings
    from django.core.management import call_command
    from django.db import connections

    name = "socketmail_tests"
    postgres_server.create_database(name)
    entry = postgres_server.settings_dict(name)
    # Django fills in each entry's defaults when it reads DATABASES; do the same for ours.
    configured = connections.configure_settings(
        {"default": dict(connections.settings["default"]), ALIAS: entry}
    )[ALIAS]
    # (In Django's handler the two are one dict; set both in case they are not.)
    connections.settings[ALIAS] = configured
    settings.DATABASES[ALIAS] = configured
    try:
        with django_db_blocker.unblock():
            call_command("migrate", database=ALIAS, verbosity=0, interactive=False)
            connections[ALIAS].close()
        yield ALIAS
    finally:
        with django_db_blocker.unblock():
            connections[ALIAS].close()
        del connections[ALIAS]
        connections.settings.pop(ALIAS, None)
        settings.DATABASES.pop(ALIAS, None)
