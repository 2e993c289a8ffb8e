"""The sans-I/O engine, byte for byte, against a model server in memory: no socket, no clock.

``ModelServer`` parses what the client writes and answers each command by a small script
(reply codes per message and verb); ``drive`` is a driver in a dozen lines.  The property
test at the end checks every outcome against a reference written from the server's side:
what it answered, what it received, and where it hung up.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from django_socketmail.smtp.config import ClientConfig
from django_socketmail.smtp.engine import (
    CLOSE,
    DEFAULT_WINDOW,
    DONE,
    RECEIVE,
    START_TLS,
    Batch,
    Engine,
    Settled,
    Write,
)
from django_socketmail.smtp.errors import (
    DataError,
    RemoteProtocolError,
    SenderRefused,
    ServerDisconnected,
)
from django_socketmail.smtp.result import RecipientStatus, SendStatus
from django_socketmail.smtp.transaction import Transaction

PIPELINING = ("PIPELINING",)
CHUNKING = ("PIPELINING", "CHUNKING")
LOCKSTEP: tuple[str, ...] = ()
MODES = {"data": PIPELINING, "bdat": CHUNKING, "lockstep": LOCKSTEP}

Rule = Callable[[str, int, int], "bytes | None"]
"""(verb, message number from 1, recipient index) -> the reply bytes, or None: the default."""


@dataclass
class ModelServer:
    """An SMTP server as a function of bytes: answers what it parsed, in order."""

    extensions: tuple[str, ...] = PIPELINING
    rule: Rule = lambda verb, n, i: None
    hang_up_after: int | None = None
    """Send at most this many transaction replies (after EHLO), then close."""
    inbox: bytes = b""
    outbox: bytearray = field(default_factory=bytearray)
    received: list[bytes] = field(default_factory=list)
    answered: list[tuple[str, int, int, int]] = field(default_factory=list)
    """(verb, message, recipient index, code) of every reply sent, in order."""
    content_received: set[int] = field(default_factory=set)
    delivered: list[int] = field(default_factory=list)
    closed: bool = False
    message: int = 0
    mail_ok: bool = False
    rcpt_ok: int = 0
    rcpt_index: int = 0
    in_data: bool = False

    def __post_init__(self) -> None:
        self.outbox += b"220 mx.example ESMTP\r\n"

    def feed(self, data: bytes) -> None:
        self.received.append(data)
        self.inbox += data
        while self._step():
            pass

    def take(self) -> bytes:
        data, self.outbox = bytes(self.outbox), bytearray()
        return data

    def _reply(self, verb: str, default: bytes, index: int = 0) -> int:
        special = self.rule(verb, self.message, index)
        line = special or default
        if verb not in ("EHLO", "QUIT"):
            if self.closed or (
                self.hang_up_after is not None and len(self.answered) >= self.hang_up_after
            ):
                self.closed = True
                return int(line[:3])
            self.answered.append((verb, self.message, index, int(line[:3])))
        self.outbox += line
        return int(line[:3])

    def _step(self) -> bool:
        if self.in_data:
            end = self.inbox.find(b"\r\n.\r\n")
            if self.inbox.startswith(b".\r\n"):
                body, self.inbox = b"", self.inbox[3:]
            elif end >= 0:
                body, self.inbox = self.inbox[: end + 2], self.inbox[end + 5 :]
            else:
                return False
            self.in_data = False
            if body:
                self.content_received.add(self.message)
            self._final("content")
            return True
        end = self.inbox.find(b"\r\n")
        if end < 0:
            return False
        line, self.inbox = self.inbox[:end].decode(), self.inbox[end + 2 :]
        verb = line.split(" ")[0].upper()
        if verb == "EHLO":
            lines = ["mx.example", *self.extensions]
            text = "".join(
                f"250{'-' if i < len(lines) - 1 else ' '}{t}\r\n" for i, t in enumerate(lines)
            )
            self._reply("EHLO", text.encode())
        elif verb == "MAIL":
            self.message += 1
            self.rcpt_ok = self.rcpt_index = 0
            self.mail_ok = self._reply("MAIL", b"250 2.1.0 Ok\r\n") == 250
        elif verb == "RCPT":
            if not self.mail_ok:
                self._reply("RCPT", b"503 5.5.1 need MAIL\r\n", self.rcpt_index)
            elif self._reply("RCPT", b"250 2.1.5 Ok\r\n", self.rcpt_index) in (250, 251):
                self.rcpt_ok += 1
            self.rcpt_index += 1
        elif verb == "DATA":
            if not self.mail_ok:
                self._reply("DATA", b"503 5.5.1 need MAIL\r\n")
            elif not self.rcpt_ok:
                self._reply("DATA", b"554 5.5.1 no valid recipients\r\n")
            elif self._reply("DATA", b"354 go ahead\r\n") == 354:
                self.in_data = True
        elif verb == "BDAT":
            size = int(line.split(" ")[1])
            if len(self.inbox) < size:
                self.inbox = line.encode() + b"\r\n" + self.inbox
                return False
            chunk, self.inbox = self.inbox[:size], self.inbox[size:]
            if chunk:
                self.content_received.add(self.message)
            self._final("BDAT")
        elif verb == "RSET":
            self.mail_ok = False
            self._reply("RSET", b"250 2.0.0 Ok\r\n")
        elif verb == "QUIT":
            self._reply("QUIT", b"221 2.0.0 Bye\r\n")
        else:
            self._reply(verb, b"502 5.5.2 what\r\n")
        return True

    def _final(self, verb: str) -> None:
        if not self.mail_ok:
            self._reply(verb, b"503 5.5.1 need MAIL\r\n")
        elif not self.rcpt_ok:
            self._reply(verb, b"554 5.5.1 no valid recipients\r\n")
        elif self._reply(verb, f"250 2.0.0 Ok: queued as Q{self.message}\r\n".encode()) == 250:
            self.delivered.append(self.message)
        self.mail_ok = False


@dataclass
class Run:
    writes: list[bytes] = field(default_factory=list)
    settled: list[object] = field(default_factory=list)
    closed: bool = False


def drive(engine: Engine, server: ModelServer, run: Run | None = None) -> Run:
    """The smallest driver: what the engine asks, against the model server."""
    run = run or Run()
    while True:
        action = engine.next_action()
        if isinstance(action, Write):
            data = b"".join(action.parts)
            run.writes.append(data)
            server.feed(data)
            engine.written()
        elif action is RECEIVE:
            data = server.take()
            if data:
                engine.receive_data(data)
            elif server.closed:
                engine.connection_lost(ServerDisconnected("the server closed the connection"))
            else:
                raise AssertionError("the engine waits for a reply the server does not owe")
        elif isinstance(action, Settled):
            run.settled.extend(action.results)
        elif action is CLOSE:
            run.closed = True
        elif action is START_TLS:
            raise AssertionError("no TLS here")
        else:
            assert action is DONE
            return run


def opened(server: ModelServer, **config: object) -> Engine:
    engine = Engine(ClientConfig(host="mx.example", port=25, **config))  # type: ignore[arg-type]
    engine.open("client.example")
    run = drive(engine, server)
    assert run.writes == [b"EHLO client.example\r\n"]
    assert engine.usable
    return engine


def messages(engine: Engine, count: int, recipients: int = 1) -> list[Transaction]:
    return [
        engine.prepare(
            f"s{n}@x.example",
            [f"r{n}-{i}@x.example" for i in range(recipients)],
            f"Subject: {n}\r\n\r\n.dot {n}\r\n".encode(),
        )
        for n in range(1, count + 1)
    ]


def send(
    engine: Engine, server: ModelServer, txs: list[Transaction], *, stop: bool = False
) -> tuple[Batch, Run]:
    batch = engine.send(txs, stop_on_error=stop)
    return batch, drive(engine, server)


def statuses(tx: Transaction) -> list[RecipientStatus]:
    return [r.status for r in tx.result.recipients]


# -- the three policies, byte for byte --------------------------------------------------------


def test_pipelined_data_one_round_trip_per_message_with_the_next_envelope_behind_the_dot() -> None:
    server = ModelServer(PIPELINING)
    engine = opened(server)
    batch, run = send(engine, server, messages(engine, 2))
    assert run.writes == [
        b"MAIL FROM:<s1@x.example>\r\nRCPT TO:<r1-0@x.example>\r\nDATA\r\n",
        b"Subject: 1\r\n\r\n..dot 1\r\n.\r\n"
        b"MAIL FROM:<s2@x.example>\r\nRCPT TO:<r2-0@x.example>\r\nDATA\r\n",
        b"Subject: 2\r\n\r\n..dot 2\r\n.\r\n",
    ]
    assert server.delivered == [1, 2]
    assert batch.errors == [] and batch.unattempted == [] and batch.lost is None
    assert [r.status for r in run.settled] == [SendStatus.SENT, SendStatus.SENT]  # type: ignore[attr-defined]


def test_bdat_window_streams_messages_with_a_pipelined_rset_between() -> None:
    server = ModelServer(CHUNKING)
    engine = opened(server)
    txs = messages(engine, 2)
    _, run = send(engine, server, txs)
    size = len(b"Subject: 1\r\n\r\n.dot 1\r\n")
    assert run.writes == [
        b"MAIL FROM:<s1@x.example>\r\nRCPT TO:<r1-0@x.example>\r\n"
        + f"BDAT {size} LAST\r\n".encode()
        + b"Subject: 1\r\n\r\n.dot 1\r\n"
        + b"RSET\r\nMAIL FROM:<s2@x.example>\r\nRCPT TO:<r2-0@x.example>\r\n"
        + f"BDAT {size} LAST\r\n".encode()
        + b"Subject: 2\r\n\r\n.dot 2\r\n"
    ]
    assert server.delivered == [1, 2]
    assert [t.result.queue_id for t in txs] == ["Q1", "Q2"]


def test_lockstep_one_command_per_write() -> None:
    server = ModelServer(LOCKSTEP)
    engine = opened(server)
    _, run = send(engine, server, messages(engine, 1, recipients=2))
    assert run.writes == [
        b"MAIL FROM:<s1@x.example>\r\n",
        b"RCPT TO:<r1-0@x.example>\r\n",
        b"RCPT TO:<r1-1@x.example>\r\n",
        b"DATA\r\n",
        b"Subject: 1\r\n\r\n..dot 1\r\n.\r\n",
    ]


# -- defects of round one, each a regression test -----------------------------------------------


@pytest.mark.parametrize("mode", ["data", "bdat", "lockstep"])
def test_a_lost_connection_keeps_each_recipients_rcpt_outcome(mode: str) -> None:
    """Second recipient refused with 550, content out, the server hangs up before its final
    reply: the refused one stays REFUSED with its 550, the accepted one is UNKNOWN with its
    250 (round one erased both to UNKNOWN with no reply)."""

    def refuse_second(verb: str, n: int, i: int) -> bytes | None:
        return b"550 5.1.1 no such user\r\n" if verb == "RCPT" and i == 1 else None

    server = ModelServer(MODES[mode], refuse_second)
    engine = opened(server)
    (tx,) = messages(engine, 1, recipients=2)
    # Every reply up to the content's final one: MAIL, 2 RCPT (+ DATA's 354 unless BDAT).
    server.hang_up_after = 3 if mode == "bdat" else 4
    batch, run = send(engine, server, [tx])
    assert 1 in server.content_received
    first, second = tx.result.recipients
    assert (first.status, first.reply and first.reply.code) == (RecipientStatus.UNKNOWN, 250)
    assert (second.status, second.reply and second.reply.code) == (RecipientStatus.REFUSED, 550)
    assert tx.result.status is SendStatus.UNKNOWN
    assert isinstance(batch.lost, ServerDisconnected) and run.closed
    assert not engine.usable


def test_lockstep_after_a_421_leaves_later_messages_unattempted() -> None:
    """Round one invented a SenderRefused for every message after a 421 in lock-step."""

    def closing_at_second(verb: str, n: int, i: int) -> bytes | None:
        return b"421 4.3.2 shutting down\r\n" if verb == "MAIL" and n == 2 else None

    for extensions in (LOCKSTEP, PIPELINING):
        server = ModelServer(extensions, closing_at_second)
        engine = opened(server)
        txs = messages(engine, 3)
        batch, _ = send(engine, server, txs)
        assert [t.result.status for t in txs[:2]] == [SendStatus.SENT, SendStatus.FAILED]
        error = txs[1].result.error
        assert isinstance(error, SenderRefused) and error.is_transient
        assert batch.unattempted == [txs[2]]
        assert statuses(txs[2]) == [RecipientStatus.PENDING]
        assert txs[2].result.error is None
        assert server.received[-1].count(b"MAIL") <= 1


def test_rset_before_the_next_batch_after_a_failed_bdat() -> None:
    def refuse_content(verb: str, n: int, i: int) -> bytes | None:
        return b"554 5.6.0 content rejected\r\n" if verb == "BDAT" and n == 1 else None

    server = ModelServer(CHUNKING, refuse_content)
    engine = opened(server)
    (tx,) = messages(engine, 1)
    _, _ = send(engine, server, [tx])
    assert isinstance(tx.result.error, DataError) and tx.result.status is SendStatus.FAILED
    assert engine.needs_reset
    _, run = send(engine, server, messages(engine, 1))
    assert run.writes[0].startswith(b"RSET\r\nMAIL FROM:")
    assert not engine.needs_reset


def test_the_bdat_window_bounds_replies_not_yet_read() -> None:
    """32 messages x 300 recipients: round one wrote all 9,700 commands before reading one
    reply.  Now the commands written but not yet answered stay below the bound (one
    message alone may exceed it)."""
    server = ModelServer(CHUNKING)
    engine = opened(server)
    txs = messages(engine, 32, recipients=300)
    engine.send(txs, stop_on_error=False)
    owed_most = 0
    while (action := engine.next_action()) is not DONE:
        if isinstance(action, Write):
            server.feed(b"".join(action.parts))
            engine.written()
            owed_most = max(owed_most, len(engine._expect))
        elif action is RECEIVE:
            engine.receive_data(server.take())
    assert owed_most <= 303
    assert len(server.delivered) == 32


def test_the_bdat_window_refills_in_halves_when_replies_trickle_in() -> None:
    """A real server answers each command as it handles it, so replies arrive a few at a
    time.  The window refills once half of it is answered, not per reply: 200 messages go
    out in a handful of writes (round one's refill-per-reply made one write per message)."""
    server = ModelServer(CHUNKING)
    engine = opened(server)
    txs = messages(engine, 200)
    engine.send(txs, stop_on_error=False)
    writes: list[int] = []
    while (action := engine.next_action()) is not DONE:
        if isinstance(action, Write):
            data = b"".join(action.parts)
            writes.append(data.count(b"MAIL FROM:"))
            server.feed(data)
            engine.written()
        elif action is RECEIVE:
            replies = server.take()
            line, _, rest = replies.partition(b"\r\n")
            server.outbox[:0] = rest  # the rest arrives later
            engine.receive_data(line + b"\r\n")
    assert len(server.delivered) == 200
    assert sum(writes) == 200
    window = DEFAULT_WINDOW
    assert writes[0] == window
    assert all(n >= window // 2 for n in writes[1:-1]), writes
    assert len(writes) <= 2 + (200 - window) // (window // 2)


@pytest.mark.parametrize("mode", ["data", "lockstep"])
def test_an_early_reply_glued_to_354_fails_the_message(mode: str) -> None:
    """``354 go ahead`` and ``250 queued`` in one write, then a 554 for the content: round
    one reported SENT and took the 554 as the next command's reply."""

    def early(verb: str, n: int, i: int) -> bytes | None:
        return b"354 go ahead\r\n250 2.0.0 Ok: queued as EARLY\r\n" if verb == "DATA" else None

    server = ModelServer(MODES[mode], early)
    engine = opened(server)
    txs = messages(engine, 2)
    batch, run = send(engine, server, txs)
    assert txs[0].result.status is SendStatus.FAILED
    assert isinstance(txs[0].result.error, RemoteProtocolError)
    assert 1 not in server.content_received  # the content was never sent
    assert txs[1] in batch.unattempted
    assert run.closed and not engine.usable


def test_an_envelope_behind_the_dot_that_kills_the_server_is_given_back() -> None:
    """Dovecot submission 2.3 crashes on an envelope pipelined behind the final dot: the
    message in flight is UNKNOWN, the envelope's message goes back, and the batch says so."""
    server = ModelServer(PIPELINING)
    engine = opened(server)
    txs = messages(engine, 3)
    server.hang_up_after = 3  # MAIL, RCPT, 354; dies on the dot + next envelope
    batch, _ = send(engine, server, txs)
    assert batch.lost_behind_dot
    assert txs[0].result.status is SendStatus.UNKNOWN
    assert batch.unattempted == txs[1:]
    assert all(statuses(t) == [RecipientStatus.PENDING] for t in txs[1:])

    server = ModelServer(PIPELINING)
    engine = Engine(ClientConfig(host="mx.example", port=25), pipeline_after_dot=False)
    engine.open("client.example")
    drive(engine, server)
    _, run = send(engine, server, messages(engine, 2))
    assert run.writes[1] == b"Subject: 1\r\n\r\n..dot 1\r\n.\r\n"  # no envelope behind it


def test_a_refused_data_leaves_rset_owed_across_batches() -> None:
    def refuse_data(verb: str, n: int, i: int) -> bytes | None:
        return b"451 4.3.0 try later\r\n" if verb == "DATA" else None

    server = ModelServer(PIPELINING, refuse_data)
    engine = opened(server)
    (tx,) = messages(engine, 1)
    send(engine, server, [tx])
    assert isinstance(tx.result.error, DataError) and tx.result.error.is_transient
    assert engine.needs_reset
    server.rule = lambda verb, n, i: None
    _, run = send(engine, server, messages(engine, 1))
    assert run.writes[0].startswith(b"RSET\r\nMAIL FROM:")


def test_stop_on_error_finishes_what_is_in_flight_and_starts_nothing_more() -> None:
    def refuse_second(verb: str, n: int, i: int) -> bytes | None:
        return b"554 5.7.1 spam\r\n" if verb == "BDAT" and n == 2 else None

    server = ModelServer(CHUNKING, refuse_second)
    engine = Engine(ClientConfig(host="mx.example", port=25), window=2)
    engine.open("client.example")
    drive(engine, server)
    txs = messages(engine, 4)
    batch, _ = send(engine, server, txs, stop=True)
    assert [t.result.status for t in txs[:2]] == [SendStatus.SENT, SendStatus.FAILED]
    assert batch.errors[0][0] is txs[1].result
    assert txs[3] in batch.unattempted
    assert server.delivered[:1] == [1]


# -- the property: outcomes equal a reference written from the server's side -----------------

CODES_MAIL = st.sampled_from([250, 250, 250, 451, 550])
CODES_RCPT = st.sampled_from([250, 250, 251, 450, 550])
CODES_DATA = st.sampled_from([354, 354, 354, 451, 554])
CODES_FINAL = st.sampled_from([250, 250, 250, 451, 554])


@st.composite
def scripts(draw: st.DrawFn) -> tuple[str, list[int], dict[tuple[str, int, int], int], int | None]:
    mode = draw(st.sampled_from(sorted(MODES)))
    counts = draw(st.lists(st.integers(1, 3), min_size=1, max_size=4))
    codes: dict[tuple[str, int, int], int] = {}
    for n, count in enumerate(counts, 1):
        codes[("MAIL", n, 0)] = draw(CODES_MAIL)
        for i in range(count):
            codes[("RCPT", n, i)] = draw(CODES_RCPT)
        codes[("DATA", n, 0)] = draw(CODES_DATA)
        codes[("final", n, 0)] = draw(CODES_FINAL)
    hang_up = draw(st.none() | st.integers(0, 25))
    return mode, counts, codes, hang_up


def reference(server: ModelServer, mode: str, n: int, count: int) -> list[set[RecipientStatus]]:
    """Each recipient's possible statuses, from what the server answered and received."""

    def said_about(m: int) -> dict[tuple[str, int], int]:
        return {(v, i): code for v, k, i, code in server.answered if k == m}

    said = said_about(n)
    final = said.get(("content", 0), said.get(("BDAT", 0)))
    mail = said.get(("MAIL", 0))
    if ("MAIL", 0) not in said and n > server.message:
        return [{RecipientStatus.PENDING}] * count  # never started
    if (
        mode == "data"
        and not said
        and n - 1 in server.content_received
        and ("content", 0) not in said_about(n - 1)
    ):
        # Its envelope rode behind the previous message's dot and the server died on it
        # (the Dovecot fault): given back, to go on another connection.
        return [{RecipientStatus.PENDING}] * count
    if mail is not None and mail != 250:
        return [{RecipientStatus.FAILED}] * count
    expected = []
    for i in range(count):
        rcpt = said.get(("RCPT", i))
        if rcpt is not None and rcpt not in (250, 251):
            expected.append({RecipientStatus.REFUSED})
        elif final is not None:
            expected.append({RecipientStatus.DELIVERED if final == 250 else RecipientStatus.FAILED})
        elif said.get(("DATA", 0), 354) != 354:
            expected.append({RecipientStatus.FAILED})
        elif n in server.content_received:
            expected.append({RecipientStatus.UNKNOWN})
        else:
            expected.append({RecipientStatus.FAILED})
    return expected


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scripts())
def test_outcomes_match_the_reference_and_nothing_unaccepted_is_sent(
    script: tuple[str, list[int], dict[tuple[str, int, int], int], int | None],
) -> None:
    mode, counts, codes, hang_up = script

    def rule(verb: str, n: int, i: int) -> bytes | None:
        key = ("final" if verb in ("content", "BDAT") else verb, n, i)
        code = codes.get(key)
        if code is None or verb == "RSET":
            return None
        if verb == "DATA" and code == 354:
            return None  # the model's own 354 (it then reads the content)
        if key[0] == "final" and code == 250:
            return None  # the model's own 250 (it records the delivery)
        return f"{code} {code // 100}.0.0 scripted\r\n".encode()

    server = ModelServer(MODES[mode], rule)
    engine = opened(server)
    txs = [
        engine.prepare(f"s{n}@x.example", [f"r{n}-{i}@x.example" for i in range(count)], b"Hi\r\n")
        for n, count in enumerate(counts, 1)
    ]
    server.hang_up_after = hang_up
    batch, _ = send(engine, server, txs)
    for n, (tx, count) in enumerate(zip(txs, counts, strict=True), 1):
        expected = reference(server, mode, n, count)
        got = statuses(tx)
        assert all(g in e for g, e in zip(got, expected, strict=True)), (n, got, expected)
        for recipient in tx.result.recipients:
            if recipient.status is RecipientStatus.DELIVERED:
                assert n in server.delivered
                assert recipient.final_reply is not None and recipient.final_reply.is_positive
        if got and all(s is RecipientStatus.PENDING for s in got):
            assert tx in batch.unattempted
    assert len(server.delivered) == len(set(server.delivered))
