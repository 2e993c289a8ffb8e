"""A minimal project using django-socketmail: SQLite, the admin, mail settings from the environment.

Point it at your own server without editing anything::

    SOCKETMAIL_HOST=smtp.example.com SOCKETMAIL_PORT=587 SOCKETMAIL_USE_TLS=1 \\
    SOCKETMAIL_USERNAME=me@example.com SOCKETMAIL_PASSWORD=... \\
        python testproject/manage.py sendtestmail you@example.com

The same variables serve the project under an ASGI server, whose async views
(``testproject.views``) send with ``asend_mail``; ``SOCKETMAIL_POOL=1`` keeps warm
connections, ``SOCKETMAIL_DB`` names the SQLite file::

    cd testproject && SOCKETMAIL_POOL=1 python -m uvicorn testproject.asgi:application

On Django 6.1 and later the settings are a ``MAILERS`` entry; before, ``EMAIL_*`` settings.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import django

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "testproject-insecure-key-for-local-use-only")
DEBUG = os.environ.get("DJANGO_DEBUG", "1") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_socketmail",
]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
ROOT_URLCONF = "testproject.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("SOCKETMAIL_DB", str(BASE_DIR / "db.sqlite3")),
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True
STATIC_URL = "static/"
DEFAULT_FROM_EMAIL = os.environ.get("SOCKETMAIL_FROM", "webmaster@localhost")


def _flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes", "on")


_mail: dict[str, Any] = {
    "host": os.environ.get("SOCKETMAIL_HOST", "localhost"),
    "port": int(os.environ["SOCKETMAIL_PORT"]) if os.environ.get("SOCKETMAIL_PORT") else None,
    "username": os.environ.get("SOCKETMAIL_USERNAME", ""),
    "password": os.environ.get("SOCKETMAIL_PASSWORD", ""),
    "use_tls": _flag("SOCKETMAIL_USE_TLS"),
    "use_ssl": _flag("SOCKETMAIL_USE_SSL"),
}
SOCKETMAIL: dict[str, Any] = {}
if os.environ.get("SOCKETMAIL_CA_FILE"):
    SOCKETMAIL["ssl_cafile"] = os.environ["SOCKETMAIL_CA_FILE"]
if os.environ.get("SOCKETMAIL_AUTH"):
    SOCKETMAIL["auth_mechanisms"] = os.environ["SOCKETMAIL_AUTH"].split(",")
# Warm connections kept between sends; under an ASGI server (README "Async") concurrent
# asend_mail() calls are then coalesced onto at most 3 connections.
if _flag("SOCKETMAIL_POOL"):
    SOCKETMAIL["pool"] = True

# Queued delivery (README "Queued delivery"): SOCKETMAIL_QUEUE=1 stores mail in the outbox
# and a worker sends it: `manage.py db_worker` (django-tasks-db, the "queue" extra).
if _flag("SOCKETMAIL_QUEUE"):
    SOCKETMAIL["queue"] = True
    INSTALLED_APPS.append("django_tasks_db")
    TASKS = {"default": {"BACKEND": "django_tasks_db.DatabaseBackend"}}

if django.VERSION >= (6, 1):
    MAILERS = {
        "default": {
            "BACKEND": "django_socketmail.backend",
            "OPTIONS": {k: v for k, v in _mail.items() if v not in (None, "")},
        }
    }
else:
    EMAIL_BACKEND = "django_socketmail.backend"
    EMAIL_HOST = _mail["host"]
    EMAIL_PORT = _mail["port"] or (465 if _mail["use_ssl"] else 587 if _mail["use_tls"] else 25)
    EMAIL_HOST_USER = _mail["username"]
    EMAIL_HOST_PASSWORD = _mail["password"]
    EMAIL_USE_TLS = _mail["use_tls"]
    EMAIL_USE_SSL = _mail["use_ssl"]

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"django_socketmail": {"handlers": ["console"], "level": "WARNING"}},
}
