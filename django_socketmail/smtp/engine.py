"""The SMTP session engine, without I/O: events in, actions out.

One :class:`Engine` follows one connection from the greeting to QUIT.  It owns the
:class:`~.protocol.SMTPConnection` (wire bytes, reply pairing, ordering rules), the opening
(:class:`~.opening.Opening`: EHLO/HELO, STARTTLS, AUTH) and the mail transactions, whose
replies it hands to the table in :mod:`.transaction`.  It holds no socket, reads no clock
and never blocks.  A driver (:mod:`.client` blocking, :mod:`.aio` asyncio) asks
:meth:`Engine.next_action` what to do and reports what happened:

- :class:`Write`: write every part in order, then call :meth:`Engine.written`;
- :data:`RECEIVE`: read some bytes (within the driver's deadline), :meth:`Engine.receive_data`;
- :data:`START_TLS`: run the TLS handshake on the same socket, :meth:`Engine.tls_established`;
- :class:`Settled`: these messages' outcomes are final (stamp their timing, wake waiters);
- :data:`CLOSE`: close the socket without a word;
- :data:`DONE`: the operation asked for (:meth:`Engine.open`, :meth:`Engine.send`,
  :meth:`Engine.quit`) is over.

A transport failure is reported with :meth:`Engine.connection_lost`.  While opening, failures
raise from :meth:`Engine.next_action`; while sending, they are recorded on each message's
result and the batch ends.

Three policies (:mod:`.policies`: lock-step, pipelined DATA, windowed BDAT) decide *when*
bytes go out; :mod:`.transaction`'s table decides what each reply means.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Sequence
from typing import Final

from .actions import (
    CLOSE,
    DONE,
    RECEIVE,
    START_TLS,
    Action,
    Batch,
    FetchToken,
    Settled,
    Signal,
    Write,
)
from .commands import Quit
from .config import ClientConfig, SessionInfo
from .content import Content
from .delivery import DeliveryOptions
from .envelope import prepare
from .errors import (
    DataError,
    LocalProtocolError,
    SenderRefused,
    ServerDisconnected,
    SocketMailError,
)
from .opening import Opening
from .policies import Policies
from .protocol import NEED_DATA, ReplyReceived, SMTPConnection
from .reply import Reply, SMTPStatus
from .result import RecipientStatus, SendResult, SendStatus
from .secret import Secret
from .transaction import (
    Kind,
    Stage,
    Transaction,
    classify,
    close_out,
    connection_lost,
    envelope_complete,
    record,
)
from .transcript import Transcript

__all__ = [
    "CLOSE",
    "DONE",
    "RECEIVE",
    "START_TLS",
    "Action",
    "Batch",
    "Engine",
    "FetchToken",
    "Phase",
    "Settled",
    "Signal",
    "Write",
]

DEFAULT_WINDOW: Final = 64
"""Most BDAT transactions in flight at once (refilled when half of them are answered)."""
DEFAULT_WINDOW_BYTES: Final = 4 * 1024 * 1024
"""Most message bytes in flight at once (one larger message still goes alone)."""
MAX_UNREAD_REPLIES: Final = 256
"""Most replies we may owe a read before starting another transaction: a few KiB of replies,
far below any socket buffer, so the server is not left stuck writing them while we write."""


class Phase(enum.Enum):
    """Where the session stands."""

    OPENING = "opening"
    READY = "ready"
    SENDING = "sending"
    QUITTING = "quitting"
    CLOSED = "closed"


class Engine(Policies):
    """One SMTP session's protocol state; see the module docstring."""

    def __init__(
        self,
        config: ClientConfig,
        transcript: Transcript | None = None,
        *,
        pipeline_after_dot: bool = True,
        window: int = DEFAULT_WINDOW,
        window_bytes: int = DEFAULT_WINDOW_BYTES,
        max_unread_replies: int = MAX_UNREAD_REPLIES,
    ) -> None:
        self.config = config
        self.conn = SMTPConnection(transcript if transcript is not None else Transcript())
        self.info = SessionInfo(config.host, config.port)
        self.phase = Phase.OPENING
        self.needs_reset = False
        """The server may hold an unfinished transaction: RSET before the next MAIL."""
        self.pipeline_after_dot = pipeline_after_dot
        self.window, self.window_bytes = window, window_bytes
        self.max_unread_replies = max_unread_replies
        self.batch: Batch | None = None
        self._opening: Opening | None = None
        self._failure: SocketMailError | None = None
        self._out: list[bytes] = []
        self._marks: list[tuple[int, Transaction]] = []
        self._writing: list[tuple[int, Transaction]] | None = None
        self._started: list[SendResult] = []
        self._settled: list[SendResult] = []
        self._close = False
        self._todo: deque[Transaction] = deque()
        self._expect: deque[Transaction | None] = deque()
        self._in_flight: list[Transaction] = []
        self._halted = False
        self._behind_dot: tuple[Transaction, Transaction] | None = None

    def __repr__(self) -> str:
        return f"<Engine {self.config.host}:{self.config.port} {self.phase.value}>"

    @property
    def transcript(self) -> Transcript:
        return self.conn.transcript

    @property
    def usable(self) -> bool:
        """Open, set up and idle: a batch may be sent."""
        return self.phase is Phase.READY and not self._close

    # -- requests --------------------------------------------------------------------------

    def open(self, local_hostname: str) -> None:
        """Begin the opening: greeting, EHLO, STARTTLS and AUTH as configured."""
        self.info.local_hostname = local_hostname
        self._opening = Opening(self.config, self.conn, self.info, local_hostname, self._out)

    def prepare(
        self,
        mail_from: str,
        recipients: Sequence[str],
        message: Content,
        delivery: DeliveryOptions | None = None,
    ) -> Transaction:
        """Check one message against the session; see :func:`.envelope.prepare`."""
        encrypted = self.info.tls_version is not None
        return prepare(
            self.conn.extensions, mail_from, recipients, message, delivery, encrypted=encrypted
        )

    def send(self, transactions: Sequence[Transaction], *, stop_on_error: bool) -> Batch:
        """Begin sending ``transactions``; drive until :data:`DONE`, then read the batch."""
        batch = Batch(stop_on_error)
        if not self.usable:
            error = self._failure or ServerDisconnected("not connected")
            for tx in transactions:
                tx.result.fail(error)
                batch.errors.append((tx.result, error))
            return batch
        self.batch, self.phase, self._halted = batch, Phase.SENDING, False
        self._todo.extend(transactions)
        self._pump()
        return batch

    def quit(self) -> None:
        """Begin ending the session politely (QUIT, then close)."""
        if self.usable and not self.conn.pending:
            self._tap(None)
            self._out.append(self.conn.send(Quit()))
            self.phase = Phase.QUITTING
        else:
            self._end()

    # -- events ----------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Bytes from the server (``b""`` is not end of stream: see connection_lost)."""
        self.conn.receive_data(data)

    def written(self) -> None:
        """The last :class:`Write` went out in full."""
        for _end, tx in self._writing or ():
            tx.content_written = True
        self._writing = None

    def token_fetched(self, token: Secret[str]) -> None:
        """The token a :class:`FetchToken` asked for."""
        if self._opening is None:
            raise LocalProtocolError("no token was asked for")
        self._opening.token_fetched(token)

    def token_failed(self, error: BaseException) -> None:
        """The token provider raised ``error`` instead: the opening fails with it."""
        if self._opening is None:
            raise LocalProtocolError("no token was asked for")
        self._opening.token_failed(error)

    def tls_established(
        self,
        version: str | None,
        cipher: str | None,
        certificate: str | None,
        der: bytes | None = None,
    ) -> None:
        """The handshake after :data:`START_TLS` (or implicit TLS's, before the greeting)."""
        self.info.tls_version, self.info.tls_cipher = version, cipher
        self.info.peer_certificate = certificate
        self.transcript.info(
            f"TLS established: {version} {cipher}"
            + (f", certificate {certificate}" if certificate else "")
        )
        self.conn.tls_established()
        if self._opening is not None:
            self._opening.tls_established(der)

    def connection_lost(self, error: SocketMailError, *, parts_written: int = 0) -> None:
        """The transport failed or closed; ``parts_written``: how many parts of the write in
        progress fully left before it."""
        for end, tx in self._writing or ():
            if end <= parts_written:
                tx.content_written = True
        self._writing = None
        self.conn.connection_lost()
        if self.phase is Phase.OPENING:
            self._failure = self._failure or error  # raised by next_action
            return
        if self.phase is Phase.SENDING:
            self._lose(error)
        self._end(error)

    # -- the loop --------------------------------------------------------------------------

    def next_action(self) -> Action:
        """What the driver must do next (see the module docstring)."""
        if self._writing is not None:
            raise LocalProtocolError("the last Write was not reported (written/connection_lost)")
        while True:
            if self._settled:
                results, self._settled = tuple(self._settled), []
                return Settled(results)
            if self._out:
                parts = tuple(self._out)
                self._out.clear()  # in place: the opening holds this list too
                self._writing, self._marks = self._marks, []
                started, self._started = tuple(self._started), []
                return Write(parts, started, tuple(tx.result for _, tx in self._writing))
            if self._close:
                self._close = False
                return CLOSE
            if self.phase is Phase.OPENING:
                action = self._step_opening()
            elif self.phase is Phase.SENDING:
                action = self._step_sending()
            elif self.phase is Phase.QUITTING:
                action = self._step_quitting()
            else:
                return DONE
            if action is not None:
                return action

    def _step_opening(self) -> Action | None:
        opening = self._opening
        try:
            if self._failure is not None:
                raise self._failure
            assert opening is not None, "open() first"
            action = opening.step()
        except SocketMailError as error:
            self._failure = error
            self.phase, self._opening = Phase.CLOSED, None
            raise
        if action is DONE:
            self.phase, self._opening = Phase.READY, None
            self.conn.pipelining = self.config.pipelining and self.conn.can_pipeline()
            return None
        return action

    def _step_quitting(self) -> Action | None:
        try:
            event = self.conn.next_event()
        except SocketMailError:
            event = None
        if event is NEED_DATA:
            return RECEIVE
        self._end()
        return None

    def _step_sending(self) -> Action | None:
        if not self._expect:
            if self._todo and not self._halted and self.phase is Phase.SENDING and not self._close:
                self._pump()
                if self._out:
                    return None
            self._finish_batch()
            return None
        self._tap(self._expect[0])
        try:
            event = self.conn.next_event()
        except SocketMailError as error:
            self._lose(error)
            self._end(error)
            return None
        if event is NEED_DATA:
            return RECEIVE
        assert isinstance(event, ReplyReceived)
        self._on_reply(event)
        return None

    # -- sending ---------------------------------------------------------------------------

    def _on_reply(self, event: ReplyReceived) -> None:
        reply = event.reply
        if event.command is not None:
            self._answer(self._expect.popleft(), reply)
        if classify(reply) is Kind.CLOSING and self.phase is Phase.SENDING:
            # The server is going away: the 421 answers everything still awaited.
            if self.batch is not None:
                self.batch.lost = ServerDisconnected(f"server closing: {reply.one_line()}")
            self._expect.clear()
            self._behind_dot = None
            for tx in list(self._in_flight):
                close_out(tx, reply, bdat=self._bdat)
                self._settle(tx)
            self._end()
            return
        self._pump()

    def _answer(self, tx: Transaction | None, reply: Reply) -> None:
        """One reply to what ``tx`` (None: an RSET) awaited, by the table."""
        if tx is None:
            if not reply.is_positive and classify(reply) is not Kind.CLOSING:
                self._lose(DataError(reply, "RSET", "the server refused RSET; session abandoned"))
                self._end()
            return
        tx.due -= 1
        was_doomed = tx.stage is Stage.DOOMED
        record(tx, reply, bdat=self._bdat)
        if tx.stage is Stage.RCPT and tx.answered == len(tx.recipients):
            envelope_complete(tx, bdat=self._bdat)
        if self._behind_dot is not None and self._behind_dot[0] is tx:
            self._behind_dot = None  # the final reply arrived
        if classify(reply) is Kind.CLOSING:
            return
        if reply.code == SMTPStatus.start_input and tx.due == 0:
            self._go_ahead(tx, doomed=was_doomed or tx.stage is Stage.DOOMED)
        elif not self.conn.pipelining and tx.due == 0:
            self._lockstep_next(tx)
        if tx.due == 0 and tx.stage in (Stage.SETTLED, Stage.DOOMED) and tx in self._in_flight:
            self._settle(tx)

    def _settle(self, tx: Transaction) -> None:
        self._in_flight.remove(tx)
        result = tx.result
        final = result.final_reply
        if not isinstance(tx.error, SenderRefused) and not (
            tx.content_written and final is not None and final.is_positive
        ):
            self.needs_reset = True
        follow_up = tx.follow_up()
        if follow_up is not None:
            self._todo.appendleft(follow_up)
        for recipient in tx.recipients:
            if recipient.status is RecipientStatus.PENDING and recipient not in tx.deferred:
                recipient.status = RecipientStatus.FAILED
        if tx.error is not None:
            self._failed(tx, tx.error)
        if follow_up is None or follow_up not in self._todo:
            self._message_done(result)

    def _failed(self, tx: Transaction, error: SocketMailError) -> None:
        assert self.batch is not None
        if tx.result.error is None:
            tx.result.error = error
        self.batch.errors.append((tx.result, error))
        if self.batch.stop_on_error:
            self._halted = True
            for other in [t for t in self._todo if t.result is tx.result]:
                self._todo.remove(other)
            tx.result.fail(error)

    def _message_done(self, result: SendResult) -> None:
        if result.status in (SendStatus.SENT, SendStatus.PARTIAL):
            self.info.messages_sent += 1
        self._settled.append(result)

    def _lose(self, error: SocketMailError) -> None:
        """The connection is over with transactions in flight: each keeps what its replies
        said; what may have been delivered is UNKNOWN.  An envelope pipelined behind a dot
        whose final reply never came goes back (the server failed on it, not on the
        message), as do the transactions never started."""
        batch = self.batch
        if batch is None:
            return
        batch.lost = batch.lost or error
        behind = self._behind_dot
        suspect = behind is not None and behind[0] in self._in_flight
        batch.lost_behind_dot = batch.lost_behind_dot or suspect
        returned = []
        for tx in list(self._in_flight):
            self._in_flight.remove(tx)
            may_retry = suspect and behind is not None and tx is behind[1]
            if connection_lost(tx, error, may_retry=may_retry):
                returned.append(tx)
                continue
            self._failed(tx, tx.error or error)
            self._message_done(tx.result)
        self._todo.extendleft(reversed(returned))
        self._expect.clear()
        self._behind_dot = None

    def _finish_batch(self) -> None:
        batch = self.batch
        assert batch is not None
        for tx in self._todo:
            if tx.result.accepted or tx.result.status is SendStatus.UNKNOWN:
                # A follow-up of a message that already reached some recipients: sending
                # the message again would deliver it twice to them.
                error = batch.lost or SocketMailError("not attempted: an earlier message failed")
                tx.result.fail(error)
                batch.errors.append((tx.result, error))
                self._message_done(tx.result)
            else:
                batch.unattempted.append(tx)
        self._todo.clear()
        self.batch = None
        if self.phase is Phase.SENDING:
            self.phase = Phase.READY

    def _end(self, error: SocketMailError | None = None) -> None:
        """The connection is finished: close it (once)."""
        if self.phase is Phase.SENDING and self.batch is not None:
            self._finish_batch()
        if self.phase is not Phase.CLOSED:
            self._close = True
        self.phase = Phase.CLOSED
        if error is not None and self._failure is None:
            self._failure = error

    def _sending(self) -> bool:
        return self.phase is Phase.SENDING

    def _tap(self, tx: Transaction | None) -> None:
        """Attribute the transcript lines that follow to ``tx`` (None: the session)."""
        self.transcript.tap = tx.result.transcript if tx is not None else None
