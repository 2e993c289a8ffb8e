"""The Django app configuration: registers the system checks and the outbox's admin."""

from __future__ import annotations

from django.apps import AppConfig


class SocketMailConfig(AppConfig):
    """django-socketmail's app: audit log models, admin, checks and commands."""

    name = "django_socketmail"
    verbose_name = "Socket mail"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.apps import apps

        from . import checks  # noqa: F401  (registers the checks)

        if apps.is_installed("django.contrib.admin"):
            from . import outbox_admin  # noqa: F401  (registers the outbox's admin)
