"""Settings for a queue worker run as a separate process by tests/test_queue_crash.py: the
test suite's settings, with the database and SMTP server the test hands over."""

from __future__ import annotations

import json
import os

from tests.settings import *  # noqa: F403

DATABASES = {"default": json.loads(os.environ["SOCKETMAIL_WORKER_DATABASE"])}
EMAIL_HOST = "127.0.0.1"
EMAIL_PORT = int(os.environ["SOCKETMAIL_WORKER_SMTP_PORT"])
EMAIL_TIMEOUT = 30
SOCKETMAIL = {"audit_log": False, "local_hostname": "worker.example", "chunking": False}
