"""Settings for a queue worker run as a separate process by tests/test_queue_crash.py and
tests/interop/test_queue_chaos.py: the test suite's settings, with the database and SMTP
server the test hands over.

``SOCKETMAIL_WORKER_OPTIONS`` (optional, a JSON object) is merged into ``SOCKETMAIL``, so a
test can set, for example, ``max_connections`` or ``task_backend`` for its workers;
``SOCKETMAIL_WORKER_TIMEOUT`` (optional, seconds) replaces ``EMAIL_TIMEOUT``'s 30."""

from __future__ import annotations

import json
import os

from tests.settings import *  # noqa: F403

DATABASES = {"default": json.loads(os.environ["SOCKETMAIL_WORKER_DATABASE"])}
EMAIL_HOST = "127.0.0.1"
EMAIL_PORT = int(os.environ["SOCKETMAIL_WORKER_SMTP_PORT"])
EMAIL_TIMEOUT = float(os.environ.get("SOCKETMAIL_WORKER_TIMEOUT", "30"))
SOCKETMAIL = {"audit_log": False, "local_hostname": "worker.example", "chunking": False}
SOCKETMAIL.update(json.loads(os.environ.get("SOCKETMAIL_WORKER_OPTIONS", "{}")))
