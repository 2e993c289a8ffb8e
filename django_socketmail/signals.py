"""Signals of queued delivery, in the spirit of django-anymail's ``pre_send``/``post_send``.

Every receiver gets ``outbox`` (the :class:`~.outbox.OutboxMessage` row) as a keyword:

- :data:`message_queued`: stored by ``send_messages()`` (also ``message``: the
  ``EmailMessage``); sent in the caller's transaction, before the commit.
- :data:`pre_send`: a worker is about to send it; a receiver may raise :class:`CancelSend`
  to cancel it (the row becomes ``cancelled``; nothing is sent).
- :data:`message_sent`: ``sent`` or ``partial`` (also ``result``: the ``SendResult``).
- :data:`message_deferred`: a 4xx or network failure, to be retried (also ``result``).
- :data:`message_failed`: ``refused``, ``unknown`` or ``failed`` (also ``result``, which
  is None when no session could be had).

An exception in a receiver of the last three is logged and changes nothing recorded.
"""

from __future__ import annotations

from django.dispatch import Signal

__all__ = [
    "CancelSend",
    "message_deferred",
    "message_failed",
    "message_queued",
    "message_sent",
    "pre_send",
]

message_queued = Signal()
pre_send = Signal()
message_sent = Signal()
message_deferred = Signal()
message_failed = Signal()


class CancelSend(Exception):
    """Raised by a :data:`pre_send` receiver: do not send this message."""
