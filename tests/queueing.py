"""How the queue's tests configure a mailer, on every supported Django: a ``MAILERS``
alias on Django 6.1 (where the ``EMAIL_*`` settings are deprecated), the ``EMAIL_*`` settings
and ``SOCKETMAIL`` before.  The queueing backend and the worker both build the mailer from
these settings, as in a project."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import django
from django.conf import settings
from django.test import override_settings

from django_socketmail.email_backend import EmailBackend

MAILER = "default" if django.VERSION >= (6, 1) else ""
"""The mailer the tests queue for: the ``MAILERS`` alias on Django 6.1 (where the ``EMAIL_*``
settings are deprecated), the project's ``EMAIL_*`` + ``SOCKETMAIL`` mailer ``""`` before."""

BASE = {"audit_log": False, "local_hostname": "client.example", "queue": True}


def _current() -> dict[str, Any]:
    """The options the settings give mailer :data:`MAILER` now."""
    if MAILER:
        config = settings.MAILERS.get(MAILER, {})
        if config.get("BACKEND") == "django_socketmail.backend":
            return dict(config.get("OPTIONS", {}))
        return dict(BASE)
    return {**BASE, **getattr(settings, "SOCKETMAIL", {})}


@contextmanager
def socketmail(**options: Any) -> Iterator[None]:
    """Mailer :data:`MAILER`'s settings with ``options`` added: its ``MAILERS`` OPTIONS on
    Django 6.1, ``SOCKETMAIL`` before (own options only; see :func:`mailer_at`)."""
    merged = {**_current(), **options}
    if MAILER:
        mailer = {"BACKEND": "django_socketmail.backend", "OPTIONS": merged}
        with override_settings(MAILERS={**settings.MAILERS, MAILER: mailer}):
            yield
    else:
        with override_settings(SOCKETMAIL=merged):
            yield


@contextmanager
def mailer_at(server: Any, *, timeout: float = 2, **options: Any) -> Iterator[None]:
    """Mailer :data:`MAILER` sending to ``server`` (anything with ``host`` and ``port``):
    what the worker builds its backend from (``EMAIL_HOST``/``EMAIL_PORT``/``EMAIL_TIMEOUT``
    before Django 6.1)."""
    if MAILER:
        with socketmail(host=server.host, port=server.port, timeout=timeout, **options):
            yield
        return
    email = {"EMAIL_HOST": server.host, "EMAIL_PORT": server.port, "EMAIL_TIMEOUT": timeout}
    with override_settings(**email), socketmail(**options):
        yield


def queued(**given: Any) -> EmailBackend:
    """The queueing backend as the settings build it, with ``given`` passed to it too."""
    if MAILER:
        return EmailBackend(alias=MAILER, **{**_current(), **given})
    return EmailBackend(**given)
