"""Async mail functions with Django's names: ``asend_mail``, ``asend_mass_mail``,
``amail_admins``, ``amail_managers``.

Each builds the same messages as its Django twin (``django.core.mail.send_mail``...) with the
same settings (``DEFAULT_FROM_EMAIL``, ``SERVER_EMAIL``, ``EMAIL_SUBJECT_PREFIX``, ``ADMINS``,
``MANAGERS``), gets the backend the same way (``connection=``, else ``get_connection()`` with
``auth_user``, ``auth_password`` and ``fail_silently``; on Django 6.1 ``using=`` names a
``MAILERS`` alias) and returns the same count.  With django-socketmail's backend the sending
is awaited on the running loop (``backend.asend_messages``); any other backend (Django's
``locmem`` in tests, ``console``...) runs its ``send_messages`` in a thread through
``sync_to_async``, so these functions work whatever the project configures.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import django
from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.mail import EmailMessage, EmailMultiAlternatives, get_connection

if TYPE_CHECKING:
    from django.core.mail.backends.base import BaseEmailBackend

__all__ = ["amail_admins", "amail_managers", "asend_mail", "asend_mass_mail", "asend_messages"]

_HAS_MAILERS = django.VERSION >= (6, 1)


async def asend_messages(connection: Any, messages: Sequence[EmailMessage]) -> int:
    """``connection.send_messages(messages)``, awaited: natively when the backend has
    ``asend_messages`` (django-socketmail's), else in a thread."""
    native = getattr(connection, "asend_messages", None)
    if native is not None:
        count = await native(messages)
    else:
        count = await sync_to_async(connection.send_messages)(messages)
    return int(count or 0)


def _backend(
    connection: BaseEmailBackend | None,
    using: str | None,
    *,
    fail_silently: bool = False,
    auth_user: str | None = None,
    auth_password: str | None = None,
) -> Any:
    """The backend to send with, as Django's functions choose it."""
    if using is None:
        return connection or get_connection(
            username=auth_user, password=auth_password, fail_silently=fail_silently
        )
    if not _HAS_MAILERS:
        raise TypeError("using= names a MAILERS alias, which needs Django 6.1 or later")
    if connection is not None:
        raise TypeError("'connection' and 'using' are mutually exclusive")
    if fail_silently or auth_user is not None or auth_password is not None:
        raise TypeError(
            "with using=, the mailer's OPTIONS set fail_silently and the credentials; "
            "do not pass fail_silently, auth_user or auth_password"
        )
    from django.core import mail

    return mail.mailers[using]  # type: ignore[attr-defined,unused-ignore]  # Django 6.1+


async def asend_mail(
    subject: str,
    message: str,
    from_email: str | None,
    recipient_list: Sequence[str],
    fail_silently: bool = False,
    auth_user: str | None = None,
    auth_password: str | None = None,
    connection: BaseEmailBackend | None = None,
    html_message: str | None = None,
    *,
    using: str | None = None,
) -> int:
    """Django's ``send_mail()``, awaited: one message to ``recipient_list``; returns 1 if
    the server accepted it for at least one recipient, else 0."""
    backend = _backend(
        connection,
        using,
        fail_silently=fail_silently,
        auth_user=auth_user,
        auth_password=auth_password,
    )
    mail = EmailMultiAlternatives(subject, message, from_email, recipient_list)
    if html_message:
        mail.attach_alternative(html_message, "text/html")
    if not mail.recipients():
        return 0
    return await asend_messages(backend, [mail])


async def asend_mass_mail(
    datatuple: Iterable[tuple[str, str, str | None, Sequence[str]]],
    fail_silently: bool = False,
    auth_user: str | None = None,
    auth_password: str | None = None,
    connection: BaseEmailBackend | None = None,
    *,
    using: str | None = None,
) -> int:
    """Django's ``send_mass_mail()``, awaited: one message per ``(subject, message,
    from_email, recipient_list)``, all on one connection; returns how many were accepted."""
    backend = _backend(
        connection,
        using,
        fail_silently=fail_silently,
        auth_user=auth_user,
        auth_password=auth_password,
    )
    messages = [
        EmailMessage(subject, message, sender, recipient)
        for subject, message, sender, recipient in datatuple
    ]
    return await asend_messages(backend, messages)


async def amail_admins(
    subject: str,
    message: str,
    fail_silently: bool = False,
    connection: BaseEmailBackend | None = None,
    html_message: str | None = None,
    *,
    using: str | None = None,
) -> None:
    """Django's ``mail_admins()``, awaited (``ADMINS``)."""
    await _server_message(
        "ADMINS", subject, message, fail_silently, connection, html_message, using
    )


async def amail_managers(
    subject: str,
    message: str,
    fail_silently: bool = False,
    connection: BaseEmailBackend | None = None,
    html_message: str | None = None,
    *,
    using: str | None = None,
) -> None:
    """Django's ``mail_managers()``, awaited (``MANAGERS``)."""
    await _server_message(
        "MANAGERS", subject, message, fail_silently, connection, html_message, using
    )


async def _server_message(
    setting: str,
    subject: str,
    message: str,
    fail_silently: bool,
    connection: BaseEmailBackend | None,
    html_message: str | None,
    using: str | None,
) -> None:
    recipients = _server_recipients(setting)
    if not recipients:
        return
    backend = _backend(connection, using, fail_silently=fail_silently)
    mail = EmailMultiAlternatives(
        f"{settings.EMAIL_SUBJECT_PREFIX}{subject}",
        message,
        settings.SERVER_EMAIL,
        recipients,
    )
    if html_message:
        mail.attach_alternative(html_message, "text/html")
    if mail.recipients():
        await asend_messages(backend, [mail])


def _server_recipients(setting: str) -> list[str]:
    """The addresses of ``ADMINS`` or ``MANAGERS``, validated as the installed Django does:
    ``(name, address)`` pairs, and from Django 6.0 also plain address strings."""
    entries = getattr(settings, setting)
    if not entries:
        return []
    strings_allowed = django.VERSION >= (6, 0)
    addresses = []
    for entry in entries:
        if strings_allowed and isinstance(entry, str):
            addresses.append(entry)
        elif isinstance(entry, (list, tuple)) and len(entry) == 2:
            addresses.append(entry[1])
        else:
            kind = "email address strings" if strings_allowed else "2-tuples"
            raise ValueError(f"The {setting} setting must be a list of {kind}.")
    return addresses
