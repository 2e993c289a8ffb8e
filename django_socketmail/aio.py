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

import warnings
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import django
from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.mail import EmailMessage, EmailMultiAlternatives, get_connection
from django.utils.functional import Promise

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
    """The backend to send with, chosen as the installed Django's functions choose it.

    Django 5.2 and 6.0: ``connection``, else ``get_connection()`` with the credentials and
    ``fail_silently``.  Django 6.1 also: ``using=`` names a ``MAILERS`` alias; the
    ``fail_silently``, ``auth_user``/``auth_password`` and ``connection`` arguments warn
    ``RemovedInDjango2028Warning`` with Django's own messages, and the combinations
    Django 6.1 refuses raise the same ``TypeError``.
    """
    if not _HAS_MAILERS:
        if using is not None:
            raise TypeError("using= names a MAILERS alias, which needs Django 6.1 or later")
        return connection or get_connection(
            username=auth_user, password=auth_password, fail_silently=fail_silently
        )
    from django.core import mail
    from django.core.mail import deprecation  # type: ignore[attr-defined,unused-ignore]
    from django.utils.deprecation import RemovedInDjango2028Warning  # type: ignore[attr-defined,unused-ignore]

    for used, text in (
        (fail_silently, deprecation.FAIL_SILENTLY_ARG_WARNING),
        (auth_user is not None or auth_password is not None, deprecation.AUTH_ARGS_WARNING),
        (connection is not None, deprecation.CONNECTION_ARG_WARNING),
    ):
        if used:
            warnings.warn(text, RemovedInDjango2028Warning, stacklevel=3)
    if using is not None:
        deprecation.report_using_incompatibility(
            connection, fail_silently, auth_user, auth_password
        )
        return mail.mailers[using]  # type: ignore[attr-defined,unused-ignore]
    if connection is not None:
        if fail_silently:
            raise TypeError(
                "fail_silently cannot be used with a connection. "
                "Pass fail_silently to get_connection() instead."
            )
        if auth_user is not None or auth_password is not None:
            raise TypeError(
                "auth_user and auth_password cannot be used with a connection. "
                "Pass auth_user and auth_password to get_connection() instead."
            )
        return connection
    options: dict[str, Any] = {"fail_silently": fail_silently}
    if auth_user is not None:
        options["username"] = auth_user
    if auth_password is not None:
        options["password"] = auth_password
    # Django's own functions call get_connection() without its deprecation warning (it
    # warns callers outside Django only); these are Django's functions, awaited.
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message=r"get_connection\(\) is deprecated",
            category=RemovedInDjango2028Warning,
        )
        return get_connection(**options)


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
    """The addresses of ``ADMINS`` or ``MANAGERS``, validated as the installed Django does.

    Django 5.2 takes ``(name, address)`` pairs and raises ``ValueError`` otherwise. From
    Django 6.0 it takes address strings; a list made only of pairs still works but warns
    ``RemovedInDjango2028Warning``, and anything else raises ``ImproperlyConfigured``.
    """
    entries = getattr(settings, setting)
    if not entries:
        return []
    pairs = all(isinstance(e, (list, tuple)) and len(e) == 2 for e in entries)
    if django.VERSION < (6, 0):
        if not pairs:
            raise ValueError(f"The {setting} setting must be a list of 2-tuples.")
        return [str(e[1]) for e in entries]
    from django.utils.deprecation import RemovedInDjango2028Warning  # type: ignore[attr-defined,unused-ignore]

    if pairs:
        warnings.warn(
            f"Using (name, address) pairs in the {setting} setting is deprecated."
            " Replace with a list of email address strings.",
            RemovedInDjango2028Warning,
            stacklevel=3,
        )
        return [str(e[1]) for e in entries]
    if not isinstance(entries, (list, tuple)) or not all(
        isinstance(e, (str, Promise)) for e in entries
    ):
        raise ImproperlyConfigured(
            f"The {setting} setting must be a list of email address strings."
        )
    return [str(e) for e in entries]
