"""Mail transactions, and the one table that says what each reply to them means.

Everything that decides a transaction's fate lives in this module: :data:`TRANSITIONS` maps
``(stage, reply kind)`` to ``(what is recorded, next stage)``; :func:`envelope_complete`
is the one rule that looks at several replies at once (were any recipients accepted?);
:func:`connection_lost` says what a broken connection leaves behind.  The engine
(:mod:`.engine`) decides only *when* to write (lock-step, pipelined DATA, windowed BDAT);
a reply's meaning is decided here, once, the moment it arrives, and lands on the
recipient's result at once: nothing waits for a later settlement that a disconnect can skip.

Stages follow the replies a transaction expects (RFC 5321 §3.3; RFC 3030 for BDAT)::

    QUEUED -> MAIL -> RCPT ... -> GO (DATA's 354) -> FINAL -> SETTLED
                                 \\-> FINAL (BDAT: the chunk went with the envelope)
    any refusal that leaves nothing to deliver -> DOOMED (later replies only consumed)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Final, NamedTuple

from .errors import DataError, RecipientsRefused, SenderRefused, SocketMailError
from .reply import Reply, SMTPStatus
from .result import RecipientResult, RecipientStatus, SendResult

__all__ = [
    "TRANSITIONS",
    "Kind",
    "Record",
    "Stage",
    "Transaction",
    "Transition",
    "classify",
    "close_out",
    "connection_lost",
    "envelope_complete",
    "record",
]


class Stage(enum.Enum):
    """What a transaction waits for next, or that it is over."""

    QUEUED = "queued"
    """Nothing of it has been written."""
    MAIL = "awaiting MAIL reply"
    RCPT = "awaiting RCPT replies"
    GO = "awaiting DATA's 354"
    FINAL = "awaiting the reply to the content"
    DOOMED = "nothing can be delivered; its remaining replies are only consumed"
    SETTLED = "settled"


class Kind(enum.Enum):
    """What kind of reply arrived (RFC 5321 §4.2.1)."""

    POSITIVE = "2xx"
    GO_AHEAD = "354"
    TOO_MANY = "452"
    """At RCPT: too many recipients, send them in another transaction (§4.5.3.1.10)."""
    CLOSING = "421"
    TRANSIENT = "4xx"
    PERMANENT = "5xx"
    ODD = "other"
    """1xx, or a 3xx other than 354: nothing a transaction command may get."""


def classify(reply: Reply) -> Kind:
    """The :class:`Kind` of ``reply``."""
    code = reply.code
    if code == SMTPStatus.start_input:
        return Kind.GO_AHEAD
    if code == SMTPStatus.domain_unavailable:
        return Kind.CLOSING
    if code == SMTPStatus.insufficient_storage:
        return Kind.TOO_MANY
    if reply.is_positive:
        return Kind.POSITIVE
    if reply.is_transient:
        return Kind.TRANSIENT
    if reply.is_permanent:
        return Kind.PERMANENT
    return Kind.ODD


class Record(enum.Enum):
    """What a reply makes us write down."""

    NOTHING = "nothing"
    SENDER_ACCEPTED = "sender accepted"
    SENDER_REFUSED = "sender refused"
    RECIPIENT_ACCEPTED = "recipient accepted"
    RECIPIENT_REFUSED = "recipient refused"
    RECIPIENT_DEFERRED = "recipient deferred to another transaction"
    GO_AHEAD = "send the content"
    DATA_REFUSED = "DATA refused"
    DELIVERED = "content accepted"
    CONTENT_REFUSED = "content refused"


class Transition(NamedTuple):
    record: Record
    next: Stage


def _row(
    stage: Stage, record_by_kind: dict[Kind, Transition]
) -> dict[tuple[Stage, Kind], Transition]:
    return {(stage, kind): record_by_kind[kind] for kind in Kind}


_REFUSED_MAIL: Final = Transition(Record.SENDER_REFUSED, Stage.DOOMED)
_REFUSED_RCPT: Final = Transition(Record.RECIPIENT_REFUSED, Stage.RCPT)
_REFUSED_DATA: Final = Transition(Record.DATA_REFUSED, Stage.DOOMED)
_REFUSED_CONTENT: Final = Transition(Record.CONTENT_REFUSED, Stage.SETTLED)
_CONSUMED: Final = Transition(Record.NOTHING, Stage.DOOMED)

TRANSITIONS: Final[dict[tuple[Stage, Kind], Transition]] = {
    **_row(
        Stage.MAIL,
        {
            Kind.POSITIVE: Transition(Record.SENDER_ACCEPTED, Stage.RCPT),
            Kind.GO_AHEAD: _REFUSED_MAIL,
            Kind.TOO_MANY: _REFUSED_MAIL,
            Kind.CLOSING: _REFUSED_MAIL,
            Kind.TRANSIENT: _REFUSED_MAIL,
            Kind.PERMANENT: _REFUSED_MAIL,
            Kind.ODD: _REFUSED_MAIL,
        },
    ),
    **_row(
        Stage.RCPT,
        {
            Kind.POSITIVE: Transition(Record.RECIPIENT_ACCEPTED, Stage.RCPT),
            Kind.TOO_MANY: Transition(Record.RECIPIENT_DEFERRED, Stage.RCPT),
            Kind.GO_AHEAD: _REFUSED_RCPT,
            Kind.CLOSING: _REFUSED_RCPT,
            Kind.TRANSIENT: _REFUSED_RCPT,
            Kind.PERMANENT: _REFUSED_RCPT,
            Kind.ODD: _REFUSED_RCPT,
        },
    ),
    **_row(
        Stage.GO,
        {
            Kind.GO_AHEAD: Transition(Record.GO_AHEAD, Stage.FINAL),
            Kind.POSITIVE: _REFUSED_DATA,
            Kind.TOO_MANY: _REFUSED_DATA,
            Kind.CLOSING: _REFUSED_DATA,
            Kind.TRANSIENT: _REFUSED_DATA,
            Kind.PERMANENT: _REFUSED_DATA,
            Kind.ODD: _REFUSED_DATA,
        },
    ),
    **_row(
        Stage.FINAL,
        {
            Kind.POSITIVE: Transition(Record.DELIVERED, Stage.SETTLED),
            Kind.GO_AHEAD: _REFUSED_CONTENT,
            Kind.TOO_MANY: _REFUSED_CONTENT,
            Kind.CLOSING: _REFUSED_CONTENT,
            Kind.TRANSIENT: _REFUSED_CONTENT,
            Kind.PERMANENT: _REFUSED_CONTENT,
            Kind.ODD: _REFUSED_CONTENT,
        },
    ),
    # A doomed transaction's pipelined commands are still answered; the answers change
    # nothing.  (A 354 here still needs the DATA ended: the engine sends a lone dot, or
    # closes if anyone was accepted, since the dot would deliver to them.)
    **_row(Stage.DOOMED, dict.fromkeys(Kind, _CONSUMED)),
}
"""``(stage, kind of reply) -> (what is recorded, next stage)``: every transition."""

_ACCEPTED: Final = frozenset({SMTPStatus.completed, SMTPStatus.will_forward})


@dataclass(slots=True, eq=False)
class Transaction:
    """One MAIL/RCPT/DATA (or BDAT) transaction of one message.  A ``452 too many
    recipients`` splits a message into several, sharing its :class:`SendResult`."""

    result: SendResult
    sender: str
    parameters: tuple[str, ...]
    recipients: list[RecipientResult]
    content: tuple[bytes, ...]
    """The CRLF-normalized message, as parts written one after the other."""
    lines: int = 0
    tail: bytes = b""
    """A final CRLF the message lacked, sent after ``content`` (see ``split_canonical``)."""
    rcpt_parameters: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """RCPT TO parameters by recipient address (DSN's NOTIFY and ORCPT)."""

    stage: Stage = Stage.QUEUED
    due: int = 0
    """Replies still owed for commands written (engine bookkeeping)."""
    answered: int = 0
    """How many RCPT replies arrived."""
    deferred: list[RecipientResult] = field(default_factory=list)
    content_written: bool = False
    """Every byte of the content (and its end: the dot, or all of BDAT's octets) reached the
    network: from here on a lost connection leaves the outcome unknown."""
    error: SocketMailError | None = None

    @property
    def size(self) -> int:
        """Octets of the message as sent (before dot-stuffing)."""
        return sum(map(len, self.content)) + len(self.tail)

    @property
    def accepted(self) -> list[RecipientResult]:
        """Recipients whose RCPT was accepted and whose fate is still open."""
        return [
            r
            for r in self.recipients
            if r.status is RecipientStatus.PENDING
            and r.reply is not None
            and r.reply.code in _ACCEPTED
        ]

    def wants_content(self) -> bool:
        """After DATA's 354: whether the content should follow (else end the DATA at once)."""
        return self.stage is Stage.FINAL and bool(self.accepted)

    def follow_up(self) -> Transaction | None:
        """The transaction for recipients deferred with 452, once this one delivered to some
        of its own (so that a server deferring everyone cannot make us loop)."""
        if not self.deferred or not any(r.delivered for r in self.recipients):
            return None
        for recipient in self.deferred:
            recipient.status, recipient.reply = RecipientStatus.PENDING, None
        return Transaction(
            self.result,
            self.sender,
            self.parameters,
            self.deferred,
            self.content,
            self.lines,
            self.tail,
        )


def record(tx: Transaction, reply: Reply, *, bdat: bool) -> Transition:
    """Apply ``reply`` (the next one ``tx`` awaits) by the table; return the transition."""
    transition = TRANSITIONS[(tx.stage, classify(reply))]
    what = transition.record
    if what is Record.SENDER_REFUSED:
        tx.error = SenderRefused(reply, tx.sender)
    elif what in (Record.RECIPIENT_ACCEPTED, Record.RECIPIENT_REFUSED, Record.RECIPIENT_DEFERRED):
        recipient = tx.recipients[tx.answered]
        tx.answered += 1
        recipient.reply = reply
        if what is not Record.RECIPIENT_ACCEPTED:
            recipient.status = RecipientStatus.REFUSED
        if what is Record.RECIPIENT_DEFERRED:
            tx.deferred.append(recipient)
    elif what is Record.DATA_REFUSED:
        tx.error = DataError(reply, "DATA")
        _fail_accepted(tx)
    elif what is Record.DELIVERED:
        tx.result.final_replies.append(reply)
        for recipient in tx.accepted:
            recipient.status, recipient.final_reply = RecipientStatus.DELIVERED, reply
    elif what is Record.CONTENT_REFUSED:
        tx.result.final_replies.append(reply)
        for recipient in tx.accepted:
            recipient.final_reply = reply
        tx.error = DataError(reply, "BDAT" if bdat else "end of data")
        _fail_accepted(tx)
    tx.stage = transition.next
    return transition


def envelope_complete(tx: Transaction, *, bdat: bool) -> None:
    """Every RCPT reply is in: go on to DATA's 354 (or BDAT's reply) if anyone was
    accepted, else the transaction is doomed (every recipient refused)."""
    if tx.stage is not Stage.RCPT:
        return
    if tx.accepted:
        tx.stage = Stage.FINAL if bdat else Stage.GO
        return
    tx.stage = Stage.DOOMED
    if tx.deferred and tx.result.accepted:
        return  # an earlier transaction of this message delivered; the rest follow
    if not tx.result.accepted:
        refused = {r.address: r.reply for r in tx.result.recipients if r.reply is not None}
        tx.error = RecipientsRefused(refused)


def connection_lost(tx: Transaction, error: SocketMailError, *, may_retry: bool = False) -> bool:
    """The connection broke before ``tx`` settled.  Recipients already refused stay
    refused; if the whole content reached the network, the others' fate is UNKNOWN (the
    server may have taken it), else FAILED.  With ``may_retry``, a transaction that cannot
    have delivered anything is instead reset for another connection: returns True then."""
    if tx.content_written and tx.stage is not Stage.DOOMED:
        for recipient in tx.recipients:
            if recipient.status is RecipientStatus.PENDING:
                accepted = recipient.reply is None or recipient.reply.code in _ACCEPTED
                recipient.status = RecipientStatus.UNKNOWN if accepted else RecipientStatus.FAILED
        tx.error = error
        tx.stage = Stage.SETTLED
        return False
    if may_retry and tx.stage is not Stage.DOOMED and not tx.result.accepted:
        for recipient in tx.recipients:
            recipient.status, recipient.reply, recipient.final_reply = (
                RecipientStatus.PENDING,
                None,
                None,
            )
        tx.stage, tx.answered, tx.deferred, tx.error, tx.due = Stage.QUEUED, 0, [], None, 0
        return True
    if tx.error is None:
        tx.error = error
    _fail_accepted(tx)
    tx.stage = Stage.SETTLED
    return False


def close_out(tx: Transaction, reply: Reply, *, bdat: bool) -> None:
    """The server answered with 421 and is closing: that reply stands for every reply
    ``tx`` still awaits (RFC 5321 §3.8), so each of its steps is recorded with it."""
    while tx.stage not in (Stage.SETTLED, Stage.DOOMED, Stage.QUEUED):
        record(tx, reply, bdat=bdat)
        if tx.stage is Stage.RCPT and tx.answered == len(tx.recipients):
            envelope_complete(tx, bdat=bdat)
    tx.due = 0


def _fail_accepted(tx: Transaction) -> None:
    for recipient in tx.recipients:
        if recipient.status is RecipientStatus.PENDING:
            recipient.status = RecipientStatus.FAILED
