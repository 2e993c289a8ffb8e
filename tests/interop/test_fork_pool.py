"""The pool in a process that forks workers, against the real Postfix (STARTTLS + AUTH).

What gunicorn ``--preload``, Celery prefork and ``multiprocessing`` do: the parent holds a
warm pooled session, forks workers that send on their own sessions and exit (running
``close_pool()``, as atexit does), while the parent keeps sending.  Every message arrives
exactly once, and the parent's session goes on untouched by its children.
"""

from __future__ import annotations

import os
import warnings

from django.core.mail import EmailMessage

from django_socketmail.email_backend import EmailBackend
from django_socketmail.pool import POOL, close_pool
from tests.interop.rig import DOMAIN, PostfixRig

WORKERS = 3
PER_WORKER = 5


def backend(rig: PostfixRig) -> EmailBackend:
    return EmailBackend(
        host=rig.server_hostname,
        port=rig.submission_port,
        use_tls=True,
        ssl_cafile=str(rig.ca_cert_path),
        username="alice",
        password=rig.users["alice"],
        pool=True,
        audit_log=False,  # no database connection crosses the fork
        timeout=10,
        local_hostname="client.test",
    )


def message(tag: str) -> EmailMessage:
    return EmailMessage(
        f"fork {tag}",
        "body\n",
        f"alice@{DOMAIN}",
        [f"alice@{DOMAIN}"],
        headers={"Message-ID": f"<{tag}@fork.test>"},
    )


def test_forked_workers_and_the_parent_share_nothing_and_lose_nothing(
    maildir_clean: PostfixRig,
) -> None:
    rig = maildir_clean
    close_pool()
    assert backend(rig).send_messages([message("parent-0")]) == 1
    (parent_session,) = [s for group in POOL._idle.values() for s in group]
    children = []
    for worker in range(WORKERS):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads: 3.12+
            pid = os.fork()
        if pid == 0:
            status = 1
            try:
                assert POOL.idle_count() == 0  # the parent's session was forgotten at fork
                for n in range(PER_WORKER):
                    assert backend(rig).send_messages([message(f"w{worker}-{n}")]) == 1
                close_pool()  # what atexit runs when the worker exits
                status = 0
            finally:
                os._exit(status)
        children.append(pid)
    for n in range(1, 6):
        assert backend(rig).send_messages([message(f"parent-{n}")]) == 1
    assert [os.waitpid(pid, 0)[1] for pid in children] == [0] * WORKERS
    assert backend(rig).send_messages([message("parent-6")]) == 1

    (still,) = [s for group in POOL._idle.values() for s in group]
    assert still is parent_session  # one connection for all seven of the parent's messages
    assert still.client.info.messages_sent == 7
    close_pool()

    total = 7 + WORKERS * PER_WORKER
    delivered = rig.wait_for_messages(total)
    ids = sorted(
        line.split(b":", 1)[1].strip().decode()
        for raw in delivered
        for line in raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
        if line.lower().startswith(b"message-id:")
    )
    expected = sorted(
        [f"<parent-{n}@fork.test>" for n in range(7)]
        + [f"<w{w}-{n}@fork.test>" for w in range(WORKERS) for n in range(PER_WORKER)]
    )
    assert ids == expected  # each exactly once
