"""The sans-I/O core of an SMTP client session: commands in, bytes out; bytes in, replies out.

No sockets here.  :class:`SMTPConnection` turns commands into wire bytes, remembers
which commands still await a reply (a FIFO queue: that is all PIPELINING and CHUNKING
need), parses what the server sends into :class:`ReplyReceived` events paired with the
command they answer, enforces the ordering rules, and records every line in the
:class:`~.transcript.Transcript`.

Rules enforced (``LocalProtocolError`` when we break them, ``RemoteProtocolError`` when the
server does):

- nothing is sent before the greeting arrives (RFC 5321 §3.1);
- without PIPELINING, one command at a time; with it, a command that must end a group
  (EHLO, DATA, QUIT, NOOP, STARTTLS, AUTH: RFC 2920 §3.1, RFC 3207 §4) is never followed
  by another until its reply has arrived; message content may open a group;
- after ``354`` only the message content may be sent;
- after ``220`` to STARTTLS nothing may be sent until :meth:`SMTPConnection.tls_established`,
  and any byte the server sent after that 220 fails the session: it is a response
  injection (RFC 3207 §5, "NO STARTTLS", USENIX Security 2021);
- after STARTTLS everything learned before it (the extensions) is forgotten;
- a reply that answers no command is only allowed as ``421`` (the server is closing);
- bytes that arrive while no command awaits a reply (a ``250`` glued behind the ``354`` to
  DATA, say: nothing may be pending after 354, RFC 2920 §3.1) are a protocol violation,
  unless they start an unsolicited ``421``;
- server lines that echo a secret we sent (registered with :meth:`SMTPConnection.redact`)
  have it replaced by ``[redacted]`` before anyone sees the reply.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import ClassVar, Final

from .commands import REDACTED, Bdat, Command, Data, Ehlo, Helo, Quit, StartTLS
from .content import Content, as_parts, data_parts
from .errors import LocalProtocolError, RemoteProtocolError
from .extensions import Extensions
from .parser import ReplyParser
from .reply import Reply, SMTPStatus
from .transcript import Transcript

__all__ = [
    "NEED_DATA",
    "Greeting",
    "MessageContent",
    "NeedData",
    "ReplyReceived",
    "SMTPConnection",
    "SessionState",
]


class SessionState(enum.Enum):
    """Where the session stands, as seen from the replies received so far."""

    AWAITING_GREETING = "awaiting greeting"
    READY = "ready"
    AWAITING_CONTENT = "awaiting content"
    TLS_HANDSHAKE = "TLS handshake"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class Greeting:
    """Stands in the pending queue for the server's greeting."""

    ends_group: ClassVar[bool] = True
    verb: ClassVar[str] = "greeting"


@dataclass(frozen=True, slots=True)
class MessageContent:
    """Stands in the pending queue for the reply to a message's content (after DATA's 354,
    or to a BDAT chunk).  ``size`` is the message size before dot-stuffing."""

    size: int
    lines: int
    ends_group: ClassVar[bool] = False
    verb: ClassVar[str] = "message content"


Pending = Command | Greeting | MessageContent


@dataclass(frozen=True, slots=True)
class ReplyReceived:
    """Event: ``reply`` arrived; it answers ``command`` (None for an unsolicited 421)."""

    command: Pending | None
    reply: Reply


class NeedData(enum.Enum):
    """Event: no complete reply yet; feed more bytes."""

    NEED_DATA = "need data"


NEED_DATA: Final = NeedData.NEED_DATA


@dataclass
class SMTPConnection:
    """The client side of one SMTP session, without I/O.

    ``pipelining`` may be switched on by the caller once the server advertised PIPELINING
    (see :meth:`can_pipeline`); it is switched off again by STARTTLS.
    """

    transcript: Transcript = field(default_factory=Transcript)
    pipelining: bool = False
    state: SessionState = SessionState.AWAITING_GREETING
    extensions: Extensions = field(default_factory=Extensions)
    _parser: ReplyParser = field(default_factory=ReplyParser, repr=False)
    _pending: deque[Pending] = field(default_factory=lambda: deque([Greeting()]), repr=False)
    _secrets: list[str] = field(default_factory=list, repr=False)
    replies_received: int = 0
    """How many complete replies were handed out: a driver's measure of progress."""

    def redact(self, *texts: str) -> None:
        """Replace each of ``texts`` (the forms of a secret we sent: base64 lines, the raw
        password) with ``[redacted]`` in every server line from now on."""
        for text in texts:
            if len(text) >= 4 and text not in self._secrets:
                self._secrets.append(text)
        self._secrets.sort(key=len, reverse=True)  # longest first: no partial leftovers

    @property
    def buffered(self) -> int:
        """Bytes received and not yet part of a reply handed out."""
        return self._parser.buffered

    @property
    def pending(self) -> tuple[Pending, ...]:
        """The commands that await a reply, oldest first."""
        return tuple(self._pending)

    def can_pipeline(self) -> bool:
        """True when the server advertised PIPELINING in its last EHLO reply."""
        return "PIPELINING" in self.extensions

    # -- sending -----------------------------------------------------------------------

    def send(self, command: Command) -> bytes:
        """Return the bytes for ``command`` and queue it as awaiting a reply."""
        if isinstance(command, Bdat):
            raise LocalProtocolError("use send_bdat() to send BDAT with its chunk")
        self._check_can_send(command.verb)
        data = command.line()
        self.transcript.client(command.transcript_text())
        self._pending.append(command)
        return data

    def send_content(self, normalized: Content, tail: bytes = b"") -> list[bytes]:
        """Return the DATA payload for CRLF-normalized content (one byte string or parts,
        see :func:`~.content.split_canonical`) as parts to write in order (the stuffed
        content, then the final dot) and queue its final reply.  Only allowed right after
        a 354."""
        if self.state is not SessionState.AWAITING_CONTENT:
            raise LocalProtocolError("message content may only follow a 354 reply to DATA")
        parts = as_parts(normalized)
        lines = sum(part.count(b"\n") for part in parts) + tail.count(b"\n")
        size = sum(map(len, parts)) + len(tail)
        payload = data_parts(parts, tail)
        self.transcript.content(size, lines)
        self.transcript.client(".")
        self._pending.append(MessageContent(size, lines))
        self.state = SessionState.READY
        return payload

    def send_bdat(self, size: int, *, last: bool = True, lines: int = 0) -> bytes:
        """Return the line ``BDAT <size> [LAST]``; the caller sends exactly ``size`` octets
        right after it, as they are (no stuffing, no final dot).  ``lines`` is only for the
        transcript's summary of the chunk."""
        command = Bdat(size, last)
        self._check_can_send(command.verb)
        line = command.line()
        self.transcript.client(command.transcript_text())
        self.transcript.content(size, lines)
        self._pending.append(command)
        return line

    def _check_can_send(self, verb: str) -> None:
        if self.state is SessionState.CLOSED:
            raise LocalProtocolError(f"cannot send {verb}: the session is closed")
        if self.state is SessionState.TLS_HANDSHAKE:
            raise LocalProtocolError(f"cannot send {verb} before the TLS handshake")
        if self.state is SessionState.AWAITING_CONTENT:
            raise LocalProtocolError(f"cannot send {verb}: the server awaits message content")
        if self._pending:
            last = self._pending[-1]
            if not self.pipelining:
                raise LocalProtocolError(
                    f"cannot send {verb} while {last.verb} awaits its reply (no PIPELINING)"
                )
            if last.ends_group:
                raise LocalProtocolError(
                    f"cannot send {verb} after {last.verb} before its reply (RFC 2920)"
                )

    # -- receiving ---------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Feed bytes received from the server (``b""`` is not end of stream: call
        :meth:`connection_lost`)."""
        self._parser.feed(data)

    def next_event(self) -> ReplyReceived | NeedData:
        """Return the next reply paired with the command it answers, or :data:`NEED_DATA`."""
        reply = self._parser.next_reply()
        if reply is None:
            return NEED_DATA
        self.replies_received += 1
        if self._secrets:
            reply = Reply(reply.code, tuple(map(self._redacted, reply.lines)))
        for text in str(reply).split("\n"):
            self.transcript.server(text)
        if not self._pending:
            if reply.code == SMTPStatus.domain_unavailable:
                self.state = SessionState.CLOSED
                return ReplyReceived(None, reply)
            raise RemoteProtocolError(f"unsolicited reply {reply.one_line()!r}")
        command = self._pending.popleft()
        self._apply(command, reply)
        if not self._pending and self.state is not SessionState.CLOSED:
            self._check_nothing_early(command)
        return ReplyReceived(command, reply)

    def _redacted(self, line: str) -> str:
        for secret in self._secrets:
            line = line.replace(secret, REDACTED)
        return line

    def _check_nothing_early(self, command: Pending) -> None:
        """No command awaits a reply: any byte already here answers nothing.  Only the start
        of an unsolicited ``421`` may wait for the next read."""
        early = self._parser.peek(3)
        if early and not b"421".startswith(early):
            self.state = SessionState.CLOSED
            raise RemoteProtocolError(
                f"server sent {self._parser.buffered} bytes after its reply to "
                f"{command.verb}, before we sent anything more (an early reply); "
                "session abandoned"
            )

    def _apply(self, command: Pending, reply: Reply) -> None:
        """The state changes a reply causes."""
        code = reply.code
        if code == SMTPStatus.domain_unavailable:
            self.state = SessionState.CLOSED
        elif isinstance(command, Greeting):
            self.state = (
                SessionState.READY if code == SMTPStatus.service_ready else (SessionState.CLOSED)
            )
        elif isinstance(command, Ehlo) and reply.is_positive:
            self.extensions = Extensions.from_ehlo_reply(reply)
        elif isinstance(command, Helo) and reply.is_positive:
            self.extensions = Extensions()
        elif isinstance(command, Data) and code == SMTPStatus.start_input:
            self.state = SessionState.AWAITING_CONTENT
        elif isinstance(command, StartTLS) and code == SMTPStatus.service_ready:
            self.state = SessionState.TLS_HANDSHAKE
            injected = self._parser.discard()
            if injected:
                raise RemoteProtocolError(
                    f"server sent {len(injected)} bytes after its 220 to STARTTLS, before "
                    "the TLS handshake: possible response injection; session abandoned"
                )
        elif isinstance(command, Quit):
            self.state = SessionState.CLOSED

    def tls_established(self) -> None:
        """Call after the TLS handshake that followed STARTTLS's 220 (or an implicit-TLS
        connection's handshake, before the greeting).  Forgets the extensions."""
        if self.state is SessionState.TLS_HANDSHAKE:
            self.state = SessionState.READY
        self.extensions = Extensions()
        self.pipelining = False

    def connection_lost(self) -> None:
        """The transport closed: nothing more can be sent or received."""
        self.state = SessionState.CLOSED
