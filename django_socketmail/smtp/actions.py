"""What the engine asks a driver to do (:class:`Write`, :data:`RECEIVE`, :data:`START_TLS`,
:class:`FetchToken`, :class:`Settled`, :data:`CLOSE`, :data:`DONE`), and what a batch did
(:class:`Batch`)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Final

from .errors import SocketMailError
from .result import SendResult
from .secret import Secret
from .transaction import Transaction

__all__ = [
    "CLOSE",
    "DONE",
    "RECEIVE",
    "START_TLS",
    "Action",
    "Batch",
    "FetchToken",
    "Settled",
    "Signal",
    "Write",
]


@dataclass(frozen=True, slots=True)
class Write:
    """Write ``parts`` in order.  ``started``: messages whose first command is in them;
    ``content``: messages whose content ends in them (once written, a lost connection
    leaves their outcome unknown)."""

    parts: tuple[bytes, ...]
    started: tuple[SendResult, ...] = ()
    content: tuple[SendResult, ...] = ()


@dataclass(frozen=True, slots=True)
class Settled:
    """These messages' outcomes are final."""

    results: tuple[SendResult, ...]


@dataclass(frozen=True, slots=True)
class FetchToken:
    """Ask the configuration's ``token_provider`` for an OAuth 2.0 token (``rejected``: the
    one the server just refused, so that the provider fetches a newer one), then report it
    with ``Engine.token_fetched`` or the provider's exception with ``Engine.token_failed``.
    A request of its own, so that an asyncio driver can run the provider in a thread."""

    rejected: Secret[str] | None = field(default=None, repr=False)


class Signal(enum.Enum):
    RECEIVE = "receive"
    START_TLS = "start TLS"
    CLOSE = "close"
    DONE = "done"


RECEIVE: Final = Signal.RECEIVE
START_TLS: Final = Signal.START_TLS
CLOSE: Final = Signal.CLOSE
DONE: Final = Signal.DONE

Action = Write | Settled | FetchToken | Signal


@dataclass(slots=True)
class Batch:
    """What one :meth:`Engine.send` did beyond each message's result."""

    stop_on_error: bool
    errors: list[tuple[SendResult, SocketMailError]] = field(default_factory=list)
    unattempted: list[Transaction] = field(default_factory=list)
    """Never started, or given back after the connection broke: nothing of them can have
    been delivered, so they may go on another connection."""
    lost: SocketMailError | None = None
    """Why the connection ended during the batch, if it did."""
    lost_behind_dot: bool = False
    """The connection broke right after an envelope pipelined behind a final dot."""
