"""A queue worker killed with SIGKILL in the middle of a send, on a real PostgreSQL: no
message is lost, none is sent twice, and the one whose content may have reached the server
is UNKNOWN, never resent silently."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.core.mail import EmailMessage
from django.test import override_settings
from django.utils import timezone

from django_socketmail.outbox import OutboxMessage
from django_socketmail.queue import LEASE, recover
from django_socketmail.worker import Worker

from .hostile.server import HostileSMTPServer, read_data, reply, sleep, standard_session
from .pg import ALIAS, PostgresServer
from .queueing import MAILER, mailer_at, queued, socketmail

ROOT = Path(__file__).resolve().parent.parent


class OutboxOnPostgres:
    """Route the outbox to the PostgreSQL database (the audit log stays where it is)."""

    def _pick(self, model: Any, **hints: Any) -> str | None:
        return ALIAS if model._meta.model_name in ("outboxmessage", "outboxcontent") else None

    db_for_read = _pick
    db_for_write = _pick


def worker_process(server: PostgresServer, smtp_port: int) -> subprocess.Popen[bytes]:
    env = os.environ | {
        "DJANGO_SETTINGS_MODULE": "tests.settings_queue_worker",
        "SOCKETMAIL_WORKER_DATABASE": json.dumps(server.settings_dict("socketmail_tests")),
        "SOCKETMAIL_WORKER_SMTP_PORT": str(smtp_port),
    }
    code = (
        "import django; django.setup(); "
        f"from django_socketmail.worker import Worker; Worker({MAILER!r}).run()"
    )
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env)


@pytest.mark.django_db(transaction=True, databases=["default", ALIAS])
def test_a_worker_killed_mid_send_loses_nothing_and_sends_nothing_twice(
    postgres_server: PostgresServer, postgres_database: str
) -> None:
    stall = standard_session({"DATA": [reply(354, "go ahead"), read_data(), sleep(60)]})
    with (
        override_settings(DATABASE_ROUTERS=[OutboxOnPostgres()]),
        HostileSMTPServer([stall]) as stalled,
        HostileSMTPServer([standard_session()]) as good,
    ):
        msgs = [
            EmailMessage(f"m{n}", "body\n", "s@example.com", ["a@example.com"]) for n in range(3)
        ]
        with socketmail(task_backend="dummy"):
            assert queued().send_messages(msgs) == 3

        worker = worker_process(postgres_server, stalled.port)
        deadline = time.monotonic() + 30
        while not (stalled.connections and stalled.connections[0].messages):
            assert worker.poll() is None, "the worker ended before the server got the content"
            assert time.monotonic() < deadline, "the worker never sent the first content"
            time.sleep(0.02)
        os.kill(worker.pid, signal.SIGKILL)  # mid-send: content out, no reply yet
        assert worker.wait(timeout=10) == -signal.SIGKILL

        outbox = OutboxMessage.objects.using(ALIAS).order_by("pk")
        assert [(r.status, r.content_may_have_left) for r in outbox] == [
            ("sending", True),  # its content reached the server
            ("sending", False),  # its envelope may have, its content not
            ("sending", False),  # claimed, never started
        ]
        assert recover(now=timezone.now() + LEASE + timedelta(seconds=1)) == {
            "unknown": 1,
            "queued": 2,
        }
        with mailer_at(good, timeout=5):
            assert Worker(MAILER).run() == {"sent": 2}
        assert good.wait_closed()
    assert [r.status for r in outbox.all()] == ["unknown", "sent", "sent"]
    got = [m for c in good.connections for m in c.messages]
    assert [b"Subject: m1" in m for m in got] == [True, False]
    assert [b"Subject: m2" in m for m in got] == [False, True]
    assert len(stalled.connections[0].messages) == 1  # m0, once; never resent
