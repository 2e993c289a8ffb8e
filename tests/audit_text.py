"""Every text value the audit log holds, for tests that search it for credentials."""

from __future__ import annotations

from django.db import models

from django_socketmail.models import MessageLog, RecipientLog, SessionLog


def audit_text() -> str:
    """The text and character columns of every session, message and recipient row, one
    value a line."""
    return "\n".join(_text(model) for model in (SessionLog, MessageLog, RecipientLog))


def _text(model: type[models.Model]) -> str:
    names = [
        f.name
        for f in model._meta.get_fields()
        if isinstance(f, (models.CharField, models.TextField))
    ]
    return "\n".join(str(value) for row in model.objects.values_list(*names) for value in row)
