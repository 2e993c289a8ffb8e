"""Settings for a queue worker run as a separate process by tests/test_queue_crash.py and
tests/interop/test_queue_chaos.py: the test suite's settings, with the database and SMTP
server the test hands over, as mailer ``tests.queueing.MAILER`` (a ``MAILERS`` alias on
Django 6.1, the ``EMAIL_*`` settings and ``SOCKETMAIL`` before).

``SOCKETMAIL_WORKER_OPTIONS`` (optional, a JSON object of our own options) is merged into the
mailer's options, so a test can set, for example, ``max_connections`` or ``task_backend``
for its workers; ``SOCKETMAIL_WORKER_TIMEOUT`` (optional, seconds) replaces the 30 s
timeout."""

from __future__ import annotations

import json
import os

import django

from tests.settings import *  # noqa: F403

DATABASES = {"default": json.loads(os.environ["SOCKETMAIL_WORKER_DATABASE"])}
_port = int(os.environ["SOCKETMAIL_WORKER_SMTP_PORT"])
_timeout = float(os.environ.get("SOCKETMAIL_WORKER_TIMEOUT", "30"))
_own = {"audit_log": False, "local_hostname": "worker.example", "chunking": False, "queue": True}
_own.update(json.loads(os.environ.get("SOCKETMAIL_WORKER_OPTIONS", "{}")))
if django.VERSION >= (6, 1):
    _options = {"host": "127.0.0.1", "port": _port, "timeout": _timeout, **_own}
    MAILERS = {"default": {"BACKEND": "django_socketmail.backend", "OPTIONS": _options}}
else:
    EMAIL_HOST = "127.0.0.1"
    EMAIL_PORT = _port
    EMAIL_TIMEOUT = _timeout
    SOCKETMAIL = _own
