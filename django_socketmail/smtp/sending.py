"""Mail transactions: what to send for each message, and what each reply means.

:class:`Transaction` holds one MAIL/RCPT/DATA (or BDAT) transaction and turns its replies
into each recipient's fate (:meth:`Transaction.settle`): the one place where "sent",
"refused", "failed" and "unknown" are decided.  :class:`TransactionRunner` drives a queue
of transactions over a :class:`Wire` (the socket driver) in one of three ways:

- **lock-step**, without PIPELINING: one command, one reply;
- **pipelined DATA** (RFC 2920): MAIL, every RCPT and DATA in one write; then the content,
  its final dot *and the next message's* MAIL/RCPT/DATA in one write, so each message
  costs one round trip;
- **pipelined BDAT** (RFC 3030 CHUNKING with PIPELINING): ``[RSET] MAIL RCPT... BDAT n LAST``
  plus the exact bytes, for up to ``window`` messages (and ``window_bytes`` bytes) in
  flight, refilled as replies arrive, so the round trip stops mattering.  The window keeps
  the replies we have not read far below any socket buffer, so writing never waits on a
  full receive buffer.

Every reply is checked, in order.  A ``421`` answers every command still waiting (the
server has closed).  When the connection is lost, a transaction whose content was handed to
the network but whose final reply never came is UNKNOWN; one whose content never fully left
is FAILED; messages not yet started are left unattempted.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

from .commands import Data, MailFrom, RcptTo, Rset
from .errors import (
    DataError,
    RecipientsRefused,
    SenderRefused,
    SocketMailError,
)
from .protocol import SessionState, SMTPConnection
from .reply import Reply, SMTPStatus
from .result import RecipientResult, RecipientStatus, SendResult

__all__ = ["Transaction", "TransactionRunner", "Wire"]

DEFAULT_WINDOW: Final = 32
DEFAULT_WINDOW_BYTES: Final = 4 * 1024 * 1024
_ACCEPTED: Final = frozenset({SMTPStatus.completed, SMTPStatus.will_forward})


class Wire(Protocol):
    """The socket side, as the runner needs it."""

    protocol: SMTPConnection

    def write(self, parts: Sequence[bytes]) -> None:
        """Send ``parts`` in order; a failure carries ``parts_written``: how many parts
        fully left before it."""

    def read_reply(self) -> Reply:
        """The next reply (within the deadline), or raise a :class:`SocketMailError`."""

    def close(self) -> None:
        """Drop the connection without a word."""


class Stage(enum.Enum):
    """How far a transaction got."""

    QUEUED = "queued"
    STARTED = "started"
    CONTENT_QUEUED = "content queued"
    CONTENT_WRITTEN = "content written"
    SETTLED = "settled"


@dataclass(slots=True, eq=False)
class Transaction:
    """One transaction of one message (a ``452 too many recipients`` splits a message into
    several, sharing its :class:`SendResult`)."""

    result: SendResult
    sender: str
    parameters: tuple[str, ...]
    recipients: list[RecipientResult]
    content: tuple[bytes, ...]
    """The CRLF-normalized message, as parts written one after the other."""
    lines: int = 0
    tail: bytes = b""
    """A final CRLF the message lacked, sent after ``content`` (see ``split_canonical``)."""

    stage: Stage = Stage.QUEUED
    mail_reply: Reply | None = None
    rcpt_replies: list[Reply] = field(default_factory=list)
    data_reply: Reply | None = None
    final_reply: Reply | None = None

    @property
    def size(self) -> int:
        """Octets of the message as sent (before dot-stuffing)."""
        return sum(map(len, self.content)) + len(self.tail)

    @property
    def recipients_accepted(self) -> bool:
        return any(reply.code in _ACCEPTED for reply in self.rcpt_replies)

    def wants_content(self) -> bool:
        """After DATA's 354: whether the content should follow (else end it at once)."""
        return bool(self.mail_reply and self.mail_reply.is_positive and self.recipients_accepted)

    def settle(self) -> tuple[SocketMailError | None, Transaction | None]:
        """Decide every recipient's fate from the replies; return the error to report (if
        any) and the follow-up transaction for recipients deferred with 452 (if any)."""
        self.stage = Stage.SETTLED
        result = self.result
        mail = self.mail_reply
        assert mail is not None, "a transaction settles only after MAIL was answered"
        if not mail.is_positive:
            return SenderRefused(mail, self.sender), None
        accepted: list[RecipientResult] = []
        deferred: list[RecipientResult] = []
        for recipient, reply in zip(self.recipients, self.rcpt_replies, strict=False):
            recipient.reply = reply
            if reply.code in _ACCEPTED:
                accepted.append(recipient)
            else:
                recipient.status = RecipientStatus.REFUSED
                if reply.code == SMTPStatus.insufficient_storage:
                    deferred.append(recipient)
        if not accepted:
            if result.accepted:  # an earlier transaction of this message delivered
                return None, None
            refused = {r.address: r.reply for r in result.recipients if r.reply is not None}
            return RecipientsRefused(refused), None
        follow_up = None
        if deferred:
            for recipient in deferred:
                recipient.status = RecipientStatus.PENDING
            follow_up = Transaction(
                result,
                self.sender,
                self.parameters,
                deferred,
                self.content,
                self.lines,
                self.tail,
            )
        data = self.data_reply
        if data is not None and data.code != SMTPStatus.start_input:
            for recipient in accepted:
                recipient.status = RecipientStatus.FAILED
            return DataError(data, "DATA"), follow_up
        final = self.final_reply
        assert final is not None
        result.final_replies.append(final)
        for recipient in accepted:
            recipient.final_reply = final
            recipient.status = (
                RecipientStatus.DELIVERED if final.is_positive else RecipientStatus.FAILED
            )
        if not final.is_positive:
            verb = "BDAT" if data is None else "end of data"
            return DataError(final, verb), follow_up
        return None, follow_up

    def lost(self, error: SocketMailError) -> None:
        """The connection broke before this transaction settled."""
        if self.stage is Stage.CONTENT_WRITTEN:
            for recipient in self.recipients:
                if recipient.status is RecipientStatus.PENDING:
                    rcpt = recipient.reply
                    if rcpt is None or rcpt.code in _ACCEPTED:
                        recipient.status = RecipientStatus.UNKNOWN
        self.stage = Stage.SETTLED
        self.result.fail(error)


class _Kind(enum.Enum):
    RSET = "RSET"
    MAIL = "MAIL"
    RCPT = "RCPT"
    DATA = "DATA"
    FINAL = "final"
    ABORT = "abort"


@dataclass(slots=True)
class TransactionRunner:
    """Runs transactions over a :class:`Wire`; see the module docstring for the three modes.

    ``stop_on_error``: after the first transaction that fails, start no new one (Django's
    contract: a failing message raises and the rest are not attempted).  A transaction
    already in flight is finished truthfully; a pipelined next envelope that the server
    answered with 354 is abandoned by closing the connection (sending the dot would deliver
    it).
    """

    wire: Wire
    pipelining: bool
    chunking: bool
    stop_on_error: bool
    window: int = DEFAULT_WINDOW
    window_bytes: int = DEFAULT_WINDOW_BYTES
    errors: list[tuple[SendResult, SocketMailError]] = field(default_factory=list)
    unattempted: set[int] = field(default_factory=set)
    _todo: deque[Transaction] = field(default_factory=deque)
    _expect: deque[tuple[_Kind, Transaction | None]] = field(default_factory=deque)
    _parts: list[bytes] = field(default_factory=list)
    _marks: list[tuple[int, Transaction]] = field(default_factory=list)
    _in_flight: list[Transaction] = field(default_factory=list)
    _closing: Reply | None = None
    _needs_reset: bool = False
    _halted: bool = False

    def run(self, transactions: Sequence[Transaction]) -> None:
        """Send every transaction; afterwards each result says what happened, ``errors``
        lists (result, error) for each failed message in order, and ``unattempted`` holds
        the ``id()`` of results never started."""
        self._todo.extend(transactions)
        try:
            if not self.pipelining:
                self._run_lockstep()
            else:
                self._run_pipelined()
            if self._needs_reset:
                self._tap(None)
                self._reset_now()  # leave the session clean for the next caller
        except SocketMailError as error:
            self._connection_lost(error)
        finally:
            self._tap(None)
        for tx in self._todo:
            if tx.result.recipients and all(
                r.status is RecipientStatus.PENDING for r in tx.result.recipients
            ):
                self.unattempted.add(id(tx.result))
            else:
                tx.result.fail(self.errors[-1][1] if self.errors else _not_attempted())
        self._todo.clear()

    # -- lock-step -----------------------------------------------------------------------

    def _run_lockstep(self) -> None:
        while self._todo and not self._halted:
            tx = self._todo.popleft()
            self._tap(tx)
            tx.stage = Stage.STARTED
            self._in_flight.append(tx)
            tx.mail_reply = self._command(MailFrom(tx.sender, tx.parameters))
            if tx.mail_reply.is_positive:
                for recipient in tx.recipients:
                    tx.rcpt_replies.append(self._command(RcptTo(recipient.address)))
                if tx.recipients_accepted:
                    tx.data_reply = self._command(Data())
                    if tx.data_reply.code == SMTPStatus.start_input:
                        self._parts.extend(self.wire.protocol.send_content(tx.content, tx.tail))
                        self._marks.append((len(self._parts), tx))
                        tx.stage = Stage.CONTENT_QUEUED
                        self._flush()
                        tx.final_reply = self._next_reply()
            self._finish(tx, reset=tx.final_reply is None and tx.mail_reply.is_positive)

    def _command(self, command: MailFrom | RcptTo | Data | Rset) -> Reply:
        if self._closing is not None:
            return self._closing
        self._parts.append(self.wire.protocol.send(command))
        self._flush()
        return self._next_reply()

    # -- pipelined -----------------------------------------------------------------------

    def _run_pipelined(self) -> None:
        self._refill()
        while self._expect:
            kind, tx = self._expect.popleft()
            self._tap(tx)
            reply = self._next_reply()
            if kind is _Kind.MAIL and tx is not None:
                tx.mail_reply = reply
            elif kind is _Kind.RCPT and tx is not None:
                tx.rcpt_replies.append(reply)
            elif kind is _Kind.DATA and tx is not None:
                tx.data_reply = reply
                self._after_data(tx, reply)
            elif kind is _Kind.FINAL and tx is not None:
                tx.final_reply = reply
                self._finish(tx, reset=False)
            elif kind is _Kind.RSET and not reply.is_positive and self._closing is None:
                raise DataError(reply, "RSET", "the server refused RSET; session abandoned")
            self._refill()

    def _refill(self) -> None:
        """Start transactions while the window allows (DATA: one envelope at a time)."""
        if self.chunking:
            in_flight_bytes = sum(tx.size for tx in self._in_flight)
            while (
                self._todo
                and not self._halted
                and self._closing is None
                and len(self._in_flight) < self.window
                and (not self._in_flight or in_flight_bytes < self.window_bytes)
            ):
                tx = self._todo.popleft()
                self._start(tx)
                in_flight_bytes += tx.size
        elif not self._expect and self._todo and not self._halted and self._closing is None:
            self._start(self._todo.popleft())
        self._flush()

    def _tap(self, tx: Transaction | None) -> None:
        """Attribute the transcript lines that follow to ``tx`` (None: the session)."""
        self.wire.protocol.transcript.tap = tx.result.transcript if tx is not None else None

    def _start(self, tx: Transaction) -> None:
        protocol = self.wire.protocol
        if self._needs_reset or (self.chunking and self._in_flight):
            self._tap(None)
            self._parts.append(protocol.send(Rset()))
            self._expect.append((_Kind.RSET, None))
            self._needs_reset = False
        self._tap(tx)
        tx.stage = Stage.STARTED
        self._in_flight.append(tx)
        self._parts.append(protocol.send(MailFrom(tx.sender, tx.parameters)))
        self._expect.append((_Kind.MAIL, tx))
        for recipient in tx.recipients:
            self._parts.append(protocol.send(RcptTo(recipient.address)))
            self._expect.append((_Kind.RCPT, tx))
        if self.chunking:
            self._parts.append(protocol.send_bdat(tx.size, lines=tx.lines))
            self._parts.extend(tx.content)
            if tx.tail:
                self._parts.append(tx.tail)
            self._marks.append((len(self._parts), tx))
            tx.stage = Stage.CONTENT_QUEUED
            self._expect.append((_Kind.FINAL, tx))
        else:
            self._parts.append(protocol.send(Data()))
            self._expect.append((_Kind.DATA, tx))

    def _after_data(self, tx: Transaction, reply: Reply) -> None:
        """DATA answered: send the content (or end it at once), then the next envelope."""
        protocol = self.wire.protocol
        self._tap(tx)
        if reply.code == SMTPStatus.start_input:
            if self._halted or not tx.wants_content():
                # Nothing may be delivered: abandon by closing if anyone was accepted
                # (the dot would deliver it), else end the empty content at once.
                if tx.wants_content():
                    self.wire.close()
                    tx.stage = Stage.SETTLED
                    self._in_flight.remove(tx)
                    self._todo.appendleft(tx)
                    return
                self._parts.extend(protocol.send_content(b""))
                self._expect.append((_Kind.ABORT, None))
                self._finish(tx, reset=True)
                return
            self._parts.extend(protocol.send_content(tx.content, tx.tail))
            self._marks.append((len(self._parts), tx))
            tx.stage = Stage.CONTENT_QUEUED
            self._expect.append((_Kind.FINAL, tx))
            if self._todo and not self._halted:
                # Content may open a group: the next envelope rides along (RFC 2920).
                self._start(self._todo.popleft())
            return
        if self._halted:
            tx.stage = Stage.SETTLED
            self._in_flight.remove(tx)
            self._todo.appendleft(tx)
            self._tap(None)
            self._parts.append(protocol.send(Rset()))
            self._expect.append((_Kind.RSET, None))
            return
        self._finish(tx, reset=True)

    # -- shared --------------------------------------------------------------------------

    def _finish(self, tx: Transaction, *, reset: bool) -> None:
        error, follow_up = tx.settle()
        self._in_flight.remove(tx)
        if reset:
            self._needs_reset = True
            if not self.pipelining:
                self._reset_now()
        if follow_up is not None:
            self._todo.appendleft(follow_up)
        if error is not None:
            tx.result.fail(error)
            self.errors.append((tx.result, error))
            if self.stop_on_error:
                self._halted = True
                self._todo = deque(t for t in self._todo if t.result is not tx.result)

    def _reset_now(self) -> None:
        if self._closing is None and self.wire.protocol.state is SessionState.READY:
            reply = self._command(Rset())
            if not reply.is_positive:
                self.wire.close()
        self._needs_reset = False

    def _flush(self) -> None:
        if not self._parts:
            return
        parts, marks = self._parts, self._marks
        self._parts, self._marks = [], []
        try:
            self.wire.write(parts)
        except SocketMailError as error:
            written = getattr(error, "parts_written", 0)
            for end, tx in marks:
                if end <= written:
                    tx.stage = Stage.CONTENT_WRITTEN
            raise
        for _end, tx in marks:
            tx.stage = Stage.CONTENT_WRITTEN

    def _next_reply(self) -> Reply:
        if self._closing is not None:
            return self._closing
        reply = self.wire.read_reply()
        if reply.code == SMTPStatus.domain_unavailable:
            self._closing = reply  # the server is closing: this answers the rest
        return reply

    def _connection_lost(self, error: SocketMailError) -> None:
        for tx in list(self._in_flight):
            tx.lost(error)
            self.errors.append((tx.result, error))
        self._in_flight.clear()
        self._halted = True


def _not_attempted() -> SocketMailError:
    return SocketMailError("not attempted: an earlier message failed")
