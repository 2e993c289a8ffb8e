"""Async views that send mail on the running event loop, for trying the async API under an
ASGI server (``python -m uvicorn testproject.asgi:application``, see the README's "Async").

Both take a form POST: ``to`` (repeat it for several recipients), optional ``subject`` and
``message``; both answer JSON.

- ``send/`` calls :func:`django_socketmail.asend_mail`, the call an application makes, and
  answers ``{"sent": 1}`` (``asend_mail``'s count, 1 or 0 like ``send_mail``'s).
- ``send-message/`` sends an ``EmailMessage`` with the default mailer's
  ``asend_messages()`` and answers its count and what ``message.socketmail_result`` says:
  the status, the queue id of the server's final reply, each recipient's fate and reply
  code.  ``asend_mail`` builds its message itself, so its result is not reachable from
  the caller; this view shows it.

A refused or failed send answers 502 with the exception's class and text (the server's
words, which may name a recipient); a malformed request or address 400.  Both views are
CSRF-exempt so that ``curl`` can try them: they exist for local trials on 127.0.0.1
(``ALLOWED_HOSTS``), not for a deployed site.
"""

from __future__ import annotations

from typing import Any

import django
from django.core.mail import EmailMessage, get_connection
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from django_socketmail import asend_mail
from django_socketmail.smtp import SendResult, SocketMailError

DEFAULT_SUBJECT = "Hello from an async view"
DEFAULT_MESSAGE = "Sent by django-socketmail's asend_mail() under an ASGI server."


def _form(request: HttpRequest) -> tuple[list[str], str, str] | JsonResponse:
    """The recipients, subject and body of the request, or a 400 answer."""
    to = [address for address in request.POST.getlist("to") if address.strip()]
    if not to:
        return JsonResponse({"error": "no recipient: POST to=address"}, status=400)
    subject = request.POST.get("subject", DEFAULT_SUBJECT)
    message = request.POST.get("message", DEFAULT_MESSAGE)
    return to, subject, message


def _failure(error: Exception) -> JsonResponse:
    """A send that raised: 400 for a bad address (a ``ValueError``), else 502."""
    status = 400 if isinstance(error, ValueError) else 502
    return JsonResponse({"error": type(error).__name__, "detail": str(error)}, status=status)


def _default_mailer() -> Any:
    """A backend of the default mailer, as ``send_mail()`` picks it on this Django."""
    if django.VERSION >= (6, 1):
        from django.core import mail

        return mail.mailers.default  # type: ignore[attr-defined,unused-ignore]
    return get_connection()


def _describe(result: SendResult | None) -> dict[str, Any]:
    """What a message's ``socketmail_result`` says, as JSON."""
    if result is None:
        return {"status": None, "queue_id": None, "recipients": []}
    return {
        "status": result.status.value,
        "queue_id": result.queue_id,
        "recipients": [
            {
                "address": r.address,
                "status": r.status.value,
                "reply_code": r.reply.code if r.reply is not None else None,
            }
            for r in result.recipients
        ],
    }


@csrf_exempt
@require_POST
async def send(request: HttpRequest) -> JsonResponse:
    """``await asend_mail(subject, message, None, to)``; answers ``{"sent": count}``."""
    form = _form(request)
    if isinstance(form, JsonResponse):
        return form
    to, subject, message = form
    try:
        count = await asend_mail(subject, message, None, to)
    except (SocketMailError, ValueError) as error:
        return _failure(error)
    return JsonResponse({"sent": count})


@csrf_exempt
@require_POST
async def send_message(request: HttpRequest) -> JsonResponse:
    """An ``EmailMessage`` through ``await backend.asend_messages([message])``; answers the
    count and the message's ``socketmail_result`` (status, queue id, recipients)."""
    form = _form(request)
    if isinstance(form, JsonResponse):
        return form
    to, subject, body = form
    message = EmailMessage(subject, body, None, to)
    try:
        count = await _default_mailer().asend_messages([message])
    except (SocketMailError, ValueError) as error:
        return _failure(error)
    result: SendResult | None = getattr(message, "socketmail_result", None)
    return JsonResponse({"sent": count, **_describe(result)})
