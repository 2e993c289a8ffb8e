"""When the engine writes: the three sending policies over the one transaction table.

- lock-step (no PIPELINING): one command, one reply;
- pipelined DATA (RFC 2920 §3.1): MAIL, every RCPT and DATA in one write; after the 354 the
  content, its dot and the next envelope in one write (message content may open a group),
  unless ``pipeline_after_dot`` is off;
- windowed BDAT (RFC 3030 with PIPELINING): ``[RSET] MAIL RCPT... BDAT n LAST`` and the
  chunk for up to ``window`` messages and ``window_bytes`` bytes at once (refilled once at
  most half of the window is still unanswered), and no more
  transactions while ``max_unread_replies`` replies are owed.

They decide *when* bytes go out, never what a reply means (:mod:`.transaction` does).
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from .commands import Data, MailFrom, RcptTo, Rset
from .errors import ServerDisconnected, SocketMailError
from .result import SendResult
from .transaction import Stage, Transaction

if TYPE_CHECKING:
    from .config import ClientConfig
    from .protocol import SMTPConnection

__all__ = ["Policies"]


class Policies:
    """The engine's writing half (a mixin of :class:`~.engine.Engine`, which owns the state
    declared here)."""

    config: ClientConfig
    conn: SMTPConnection
    needs_reset: bool
    pipeline_after_dot: bool
    window: int
    window_bytes: int
    max_unread_replies: int
    _out: list[bytes]
    _marks: list[tuple[int, Transaction]]
    _started: list[SendResult]
    _todo: deque[Transaction]
    _expect: deque[Transaction | None]
    _in_flight: list[Transaction]
    _halted: bool
    _close: bool
    _behind_dot: tuple[Transaction, Transaction] | None

    def _sending(self) -> bool:
        raise NotImplementedError

    def _tap(self, tx: Transaction | None) -> None:
        raise NotImplementedError

    def _lose(self, error: SocketMailError) -> None:
        raise NotImplementedError

    def _end(self, error: SocketMailError | None = None) -> None:
        raise NotImplementedError

    @property
    def _bdat(self) -> bool:
        return self.conn.pipelining and self.config.chunking and "CHUNKING" in self.conn.extensions

    def _pump(self) -> None:
        """Start transactions as the policy allows."""
        if self._halted or self._close or not self._sending():
            return
        if not self.conn.pipelining:
            if not self._expect and self._todo:
                if self.needs_reset:
                    self._reset()
                else:
                    self._start(self._todo.popleft())
        elif not self._bdat:
            if not self._expect and self._todo:
                self._start(self._todo.popleft())
        elif not self._in_flight or len(self._in_flight) <= self.window // 2:
            # Refill once half the window is answered, not after each reply: a server
            # answers as it goes, so per-reply refills would make one write per message.
            in_flight_bytes = sum(tx.size for tx in self._in_flight)
            while self._todo and (
                not self._in_flight
                or (
                    len(self._in_flight) < self.window
                    and in_flight_bytes < self.window_bytes
                    and len(self._expect) + len(self._todo[0].recipients) + 3
                    <= self.max_unread_replies
                )
            ):
                tx = self._todo.popleft()
                self._start(tx)
                in_flight_bytes += tx.size

    def _reset(self) -> None:
        self._tap(None)
        self._out.append(self.conn.send(Rset()))
        self._expect.append(None)
        self.needs_reset = False

    def _start(self, tx: Transaction) -> None:
        pipelined = self.conn.pipelining
        if pipelined and (self.needs_reset or (self._bdat and self._in_flight)):
            self._reset()
        self._tap(tx)
        tx.stage = Stage.MAIL
        self._in_flight.append(tx)
        self._started.append(tx.result)
        self._command(tx, MailFrom(tx.sender, tx.parameters))
        if not pipelined:
            return
        for recipient in tx.recipients:
            self._command(tx, _rcpt(tx, recipient.address))
        if self._bdat:
            self._out.append(self.conn.send_bdat(tx.size, lines=tx.lines))
            self._out.extend(tx.content)
            if tx.tail:
                self._out.append(tx.tail)
            self._marks.append((len(self._out), tx))
            self._expect_reply(tx)
        else:
            self._command(tx, Data())

    def _command(self, tx: Transaction, command: MailFrom | RcptTo | Data) -> None:
        self._out.append(self.conn.send(command))
        self._expect_reply(tx)

    def _expect_reply(self, tx: Transaction) -> None:
        self._expect.append(tx)
        tx.due += 1

    def _lockstep_next(self, tx: Transaction) -> None:
        if tx.stage is Stage.RCPT:
            self._command(tx, _rcpt(tx, tx.recipients[tx.answered].address))
        elif tx.stage is Stage.GO:
            self._command(tx, Data())

    def _go_ahead(self, tx: Transaction, *, doomed: bool) -> None:
        """DATA answered 354: the content (and maybe the next envelope), a lone dot when
        nobody can receive it, or -- when a dot would deliver what must not be -- closing."""
        self._tap(tx)
        if doomed or self._halted or not tx.wants_content():
            if tx.accepted:  # the dot would deliver to them
                self._lose(ServerDisconnected("connection closed to abandon a message"))
                self._end()
                return
            self._out.extend(self.conn.send_content(b""))
            tx.stage = Stage.DOOMED
            self._expect_reply(tx)
            return
        self._out.extend(self.conn.send_content(tx.content, tx.tail))
        self._marks.append((len(self._out), tx))
        self._expect_reply(tx)
        if self.conn.pipelining and self.pipeline_after_dot and self._todo and not self._halted:
            following = self._todo.popleft()
            self._start(following)  # content may open a group (RFC 2920 §3.1)
            self._behind_dot = (tx, following)


def _rcpt(tx: Transaction, address: str) -> RcptTo:
    return RcptTo(address, tx.rcpt_parameters.get(address, ()))
