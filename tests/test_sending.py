"""The transaction runner, sans I/O: every pipelining and BDAT sequence, byte for byte, and a
failure at each position of a window.  The wire is a small scripted server model."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

import pytest

from django_socketmail.smtp.errors import (
    DataError,
    RecipientsRefused,
    SenderRefused,
    ServerDisconnected,
    SocketMailError,
)
from django_socketmail.smtp.extensions import Extensions
from django_socketmail.smtp.protocol import SessionState, SMTPConnection
from django_socketmail.smtp.reply import Reply
from django_socketmail.smtp.result import RecipientResult, RecipientStatus, SendResult, SendStatus
from django_socketmail.smtp.sending import Transaction, TransactionRunner

Rule = Callable[[str, int], Reply | None]
"""(command line or "content", message number) -> a special reply, or None for the default."""


class ScriptedWire:
    """Plays the server: parses what the client writes, queues one reply per command."""

    def __init__(self, rule: Rule | None = None, *, drop_after_writes: int | None = None) -> None:
        self.protocol = SMTPConnection()
        self.protocol.state = SessionState.READY
        self.protocol._pending.clear()
        self.protocol.extensions = Extensions({"PIPELINING": "", "CHUNKING": ""})
        self.protocol.pipelining = True
        self.rule = rule or (lambda line, n: None)
        self.writes: list[bytes] = []
        self.replies: deque[Reply] = deque()
        self.buffer = b""
        self.message = 0  # the current transaction's number, counted at MAIL
        self.delivered: list[tuple[int, bytes]] = []
        self.in_data = False
        self.mail_ok = False
        self.rcpts = 0
        self.closed = False
        self.drop_after_writes = drop_after_writes

    # -- Wire -----------------------------------------------------------------------------
    def write(self, parts: Sequence[bytes]) -> None:
        if self.closed or (
            self.drop_after_writes is not None and len(self.writes) >= self.drop_after_writes
        ):
            error = ServerDisconnected("connection lost while sending")
            error.parts_written = 0  # type: ignore[attr-defined]
            raise error
        data = b"".join(parts)
        self.writes.append(data)
        self.buffer += data
        self._serve()

    def read_reply(self) -> Reply:
        if not self.replies:
            self.protocol.connection_lost()
            raise ServerDisconnected("the server closed the connection")
        reply = self.replies.popleft()
        self.protocol.receive_data(str(reply).replace("\n", "\r\n").encode() + b"\r\n")
        event = self.protocol.next_event()
        assert not isinstance(event, type(None))
        return reply

    def close(self) -> None:
        self.closed = True
        self.protocol.connection_lost()

    # -- server model ---------------------------------------------------------------------
    def _answer(self, line: str, default: Reply) -> None:
        special = self.rule(line, self.message)
        self.replies.append(special or default)

    def _serve(self) -> None:
        while True:
            if self.in_data:
                end = self.buffer.find(b"\r\n.\r\n")
                if end < 0 and not self.buffer.startswith(b".\r\n"):
                    return
                if self.buffer.startswith(b".\r\n"):
                    content, self.buffer = b"", self.buffer[3:]
                else:
                    content, self.buffer = self.buffer[: end + 2], self.buffer[end + 5 :]
                self.in_data = False
                self._deliver(content.replace(b"\r\n..", b"\r\n."), "content")
                continue
            end = self.buffer.find(b"\r\n")
            if end < 0:
                return
            line = self.buffer[:end].decode()
            self.buffer = self.buffer[end + 2 :]
            verb = line.split(" ")[0].upper()
            if verb == "MAIL":
                self.message += 1
                self.rcpts = 0
                self._answer(line, Reply(250, ("2.1.0 Ok",)))
                self.mail_ok = self.replies[-1].code == 250
            elif verb == "RCPT" and not self.mail_ok:
                self.replies.append(Reply(503, ("5.5.1 need MAIL",)))
            elif verb == "RCPT":
                self._answer(line, Reply(250, ("2.1.5 Ok",)))
                if self.replies[-1].code in (250, 251):
                    self.rcpts += 1
            elif verb == "DATA":
                self._answer(line, Reply(354, ("go",)))
                if self.replies[-1].code == 354:
                    self.in_data = True
            elif verb == "BDAT":
                size = int(line.split(" ")[1])
                if len(self.buffer) < size:
                    self.buffer = line.encode() + b"\r\n" + self.buffer
                    return
                chunk, self.buffer = self.buffer[:size], self.buffer[size:]
                self._deliver(chunk, line)
            elif verb == "RSET":
                self._answer(line, Reply(250, ("2.0.0 Ok",)))
            else:
                self.replies.append(Reply(502, ("5.5.2 what",)))

    def _deliver(self, content: bytes, line: str) -> None:
        if not self.rcpts:
            self._answer(line, Reply(554, ("5.5.1 No valid recipients",)))
            return
        self._answer(line, Reply(250, (f"2.0.0 Ok: queued as Q{self.message}",)))
        if self.replies[-1].code == 250:
            self.delivered.append((self.message, content))


def transactions(count: int, recipients: int = 1) -> list[Transaction]:
    made = []
    for n in range(1, count + 1):
        rcpts = [RecipientResult(f"r{n}-{i}@x") for i in range(recipients)]
        result = SendResult(f"s{n}@x", rcpts)
        # Two parts, the second starting with a dot: stuffing works across parts.
        content = (f"Subject: {n}\r\n\r\n".encode(), f".dot {n}\r\n".encode())
        made.append(Transaction(result, f"s{n}@x", (), list(rcpts), content, 3))
    return made


def run(
    wire: ScriptedWire, txs: list[Transaction], *, chunking: bool, stop: bool = False
) -> TransactionRunner:
    runner = TransactionRunner(wire, pipelining=True, chunking=chunking, stop_on_error=stop)
    runner.run(txs)
    return runner


def statuses(txs: list[Transaction]) -> list[SendStatus]:
    return [tx.result.status for tx in txs]


def test_bdat_window_is_one_write_with_exact_bytes() -> None:
    wire = ScriptedWire()
    txs = transactions(3)
    runner = run(wire, txs, chunking=True)
    assert runner.errors == []
    assert statuses(txs) == [SendStatus.SENT] * 3
    assert len(wire.writes) == 1
    one = b"Subject: 1\r\n\r\n.dot 1\r\n"
    assert wire.writes[0].startswith(
        b"MAIL FROM:<s1@x>\r\nRCPT TO:<r1-0@x>\r\nBDAT 22 LAST\r\n" + one + b"RSET\r\n"
        b"MAIL FROM:<s2@x>\r\n"
    )
    assert [n for n, _ in wire.delivered] == [1, 2, 3]
    assert wire.delivered[0][1] == one  # exact bytes: no stuffing, no final dot
    assert [tx.result.queue_id for tx in txs] == ["Q1", "Q2", "Q3"]


def test_bdat_window_bounds_messages_in_flight() -> None:
    wire = ScriptedWire()
    txs = transactions(10)
    runner = TransactionRunner(wire, pipelining=True, chunking=True, stop_on_error=False, window=4)
    runner.run(txs)
    assert statuses(txs) == [SendStatus.SENT] * 10
    assert wire.writes[0].count(b"BDAT") == 4
    assert all(w.count(b"BDAT") <= 1 for w in wire.writes[1:])


def test_data_pipelines_content_with_the_next_envelope() -> None:
    wire = ScriptedWire()
    txs = transactions(3)
    runner = run(wire, txs, chunking=False)
    assert runner.errors == []
    assert statuses(txs) == [SendStatus.SENT] * 3
    assert wire.writes == [
        b"MAIL FROM:<s1@x>\r\nRCPT TO:<r1-0@x>\r\nDATA\r\n",
        b"Subject: 1\r\n\r\n..dot 1\r\n.\r\nMAIL FROM:<s2@x>\r\nRCPT TO:<r2-0@x>\r\nDATA\r\n",
        b"Subject: 2\r\n\r\n..dot 2\r\n.\r\nMAIL FROM:<s3@x>\r\nRCPT TO:<r3-0@x>\r\nDATA\r\n",
        b"Subject: 3\r\n\r\n..dot 3\r\n.\r\n",
    ]


FAILURES: dict[str, tuple[Callable[[str, int, int], Reply | None], SendStatus, type]] = {
    "MAIL refused": (
        lambda line, n, k: (
            Reply(550, ("5.7.1 no",)) if line.startswith("MAIL") and n == k else None
        ),
        SendStatus.FAILED,
        SenderRefused,
    ),
    "RCPT refused": (
        lambda line, n, k: (
            Reply(550, ("5.1.1 no",)) if line.startswith("RCPT") and n == k else None
        ),
        SendStatus.REFUSED,
        RecipientsRefused,
    ),
    "content refused": (
        lambda line, n, k: (
            Reply(554, ("5.7.1 spam",))
            if (line.startswith("BDAT") or line == "content") and n == k
            else None
        ),
        SendStatus.FAILED,
        DataError,
    ),
    "DATA refused": (
        lambda line, n, k: Reply(451, ("4.3.0 later",)) if line == "DATA" and n == k else None,
        SendStatus.FAILED,
        DataError,
    ),
}


WINDOW_CASES = [
    pytest.param(
        chunking, failure, position, id=f"{'BDAT' if chunking else 'DATA'}-{failure}-{position}"
    )
    for chunking in (True, False)
    for failure in FAILURES
    if not (chunking and failure == "DATA refused")  # no DATA command with BDAT
    for position in (1, 2, 3, 4, 5)
]


@pytest.mark.parametrize(("chunking", "failure", "position"), WINDOW_CASES)
def test_failure_at_each_position_of_a_window(chunking: bool, failure: str, position: int) -> None:
    rule, status, error_type = FAILURES[failure]
    wire = ScriptedWire(lambda line, n: rule(line, n, position))
    txs = transactions(5)
    runner = run(wire, txs, chunking=chunking)
    expected = [SendStatus.SENT] * 5
    expected[position - 1] = status
    assert statuses(txs) == expected
    assert [type(e) for _, e in runner.errors] == [error_type]
    assert runner.errors[0][0] is txs[position - 1].result
    assert sorted(n for n, _ in wire.delivered) == [n for n in range(1, 6) if n != position]
    assert wire.protocol.pending == ()  # every reply read, in order


@pytest.mark.parametrize("chunking", [True, False], ids=["BDAT", "DATA"])
def test_stop_on_error(chunking: bool) -> None:
    spam = lambda line, n: (  # noqa: E731
        Reply(554, ("5.7.1 spam",))
        if (line.startswith("BDAT") or line == "content") and n == 2
        else None
    )
    wire = ScriptedWire(spam)
    txs = transactions(5)
    runner = TransactionRunner(
        wire, pipelining=True, chunking=chunking, stop_on_error=True, window=3
    )
    runner.run(txs)
    assert [type(e) for _, e in runner.errors] == [DataError]
    if chunking:
        # Up to three messages are in flight: when 2 fails, 3 and 4 (started as 1 settled)
        # are already sent and settle truthfully; 5 never starts.
        assert statuses(txs)[:4] == [SendStatus.SENT, SendStatus.FAILED] + [SendStatus.SENT] * 2
        unattempted = {id(txs[4].result)}
    else:
        # Message 3's envelope rode with message 2's content and got 354: the only way to
        # not send it is to drop the connection (a dot would deliver it).
        assert statuses(txs)[:2] == [SendStatus.SENT, SendStatus.FAILED]
        assert wire.closed
        unattempted = {id(tx.result) for tx in txs[2:]}
    assert runner.unattempted == unattempted
    assert 3 not in [n for n, _ in wire.delivered] or chunking


def test_452_splits_recipients_over_transactions() -> None:
    def too_many(line: str, n: int) -> Reply | None:
        wire_rcpts = wire.rcpts
        if line.startswith("RCPT") and wire_rcpts >= 2:
            return Reply(452, ("4.5.3 Too many recipients",))
        return None

    wire = ScriptedWire(too_many)
    txs = transactions(1, recipients=5)
    runner = run(wire, txs, chunking=True)
    assert runner.errors == []
    assert statuses(txs) == [SendStatus.SENT]
    assert len(wire.delivered) == 3
    assert len(txs[0].result.final_replies) == 3


@pytest.mark.parametrize("chunking", [True, False], ids=["BDAT", "DATA"])
def test_connection_lost_leaves_written_content_unknown(chunking: bool) -> None:
    wire = ScriptedWire()
    txs = transactions(3)
    # The server reads everything, then vanishes before replying to anything.
    wire.rule = lambda line, n: None
    original_serve = wire._serve

    def swallow() -> None:
        original_serve()
        wire.replies.clear()

    wire._serve = swallow  # type: ignore[method-assign]
    runner = run(wire, txs, chunking=chunking)
    assert all(isinstance(e, SocketMailError) for _, e in runner.errors)
    first = txs[0].result
    if chunking:
        # All three went out in one write: each may have been delivered.
        assert statuses(txs) == [SendStatus.UNKNOWN] * 3
    else:
        # Only the first envelope went out; no content was sent at all.
        assert first.status is SendStatus.FAILED
        assert runner.unattempted == {id(txs[1].result), id(txs[2].result)}
    assert all(
        r.status is not RecipientStatus.DELIVERED for tx in txs for r in tx.result.recipients
    )


def test_write_failure_is_failed_not_unknown() -> None:
    wire = ScriptedWire(drop_after_writes=0)
    txs = transactions(2)
    run(wire, txs, chunking=True)
    assert statuses(txs) == [SendStatus.FAILED, SendStatus.FAILED]
