"""One protocol, two drivers: the blocking :class:`SMTPClient` and the asyncio
:class:`AsyncSMTPClient` feed the same engine, so one scripted conversation played through
each gives the server byte-identical client output and the caller identical results.

The conversation (tests/hostile/server.py): greeting, EHLO, STARTTLS, EHLO, AUTH PLAIN or
LOGIN, then one batch: a message with one recipient refused and one accepted (PARTIAL), a
message whose only recipient is refused (FAILED), a message accepted (SENT), and a last
message whose final reply is ``421`` and a hang-up.  Played in the three ways the engine
writes (pipelined DATA, BDAT, lock-step), over STARTTLS and over implicit TLS.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import trustme

from django_socketmail.smtp import ClientConfig, SendStatus, SMTPClient, SMTPTimeoutError, TLSMode
from django_socketmail.smtp.aio import AsyncSMTPClient, SendCancelledError
from django_socketmail.smtp.engine import Batch
from django_socketmail.smtp.result import SendResult
from django_socketmail.smtp.transcript import Transcript

from .hostile.server import (
    DEFAULT_EXTENSIONS,
    Connection,
    HostileSMTPServer,
    Script,
    reply,
    sleep,
    standard_session,
)

USER = "driver-user"
PASSWORD = "driver-pa55word"
MESSAGES: list[tuple[list[str], bytes]] = [
    (["a@example.com", "nobody1@example.com"], b"Subject: one\r\n\r\nfirst\r\n.dot line\r\n"),
    (["nobody2@example.com"], b"Subject: two\r\n\r\nsecond\r\n"),
    (["b@example.com"], b"Subject: three\r\n\r\nthird\r\n"),
    (["c@example.com", "d@example.com"], b"Subject: four\r\n\r\nfourth\r\n"),
]
"""PARTIAL, FAILED (every recipient refused), SENT, and the one the 421 answers."""
MODES: dict[str, list[str]] = {
    "pipelined-data": [*DEFAULT_EXTENSIONS, "STARTTLS"],
    "bdat": [*DEFAULT_EXTENSIONS, "CHUNKING", "STARTTLS"],
    "lock-step": [e for e in DEFAULT_EXTENSIONS if e != "PIPELINING"] + ["STARTTLS"],
}


def _envelope_accepted(conn: Connection) -> bool:
    """Whether any RCPT since the last MAIL named someone this server knows."""
    for line in reversed(conn.commands):
        verb = line.split()[0].upper() if line.split() else b""
        if verb == b"MAIL":
            return False
        if verb == b"RCPT" and b"nobody" not in line:
            return True
    return False


def _rcpt(conn: Connection, line: bytes) -> None:
    if b"nobody" in line:
        conn.reply(550, "5.1.1 Recipient address rejected: User unknown")
    else:
        conn.reply(250, "2.1.5 Ok")


def script(extensions: Sequence[str]) -> Script:
    """The server: the third message accepted on a connection gets ``421`` and a hang-up."""
    accepted: dict[int, int] = {}

    def final(conn: Connection, line: bytes) -> None:
        if not _envelope_accepted(conn):
            conn.reply(554, "5.5.1 Error: no valid recipients")
            return
        accepted[conn.index] = accepted.get(conn.index, 0) + 1
        if accepted[conn.index] >= 3:
            conn.reply(421, "4.3.2 Service shutting down, closing transmission channel")
            conn.close()
            return
        conn.reply(250, f"2.0.0 Ok: queued as Q{accepted[conn.index]}")

    def data(conn: Connection, line: bytes) -> None:
        if not _envelope_accepted(conn):
            conn.reply(554, "5.5.1 Error: no valid recipients")
            return
        conn.reply(354, "End data with <CR><LF>.<CR><LF>")
        conn.read_data()
        final(conn, b".")

    return standard_session({"RCPT": _rcpt, "DATA": data, ".": final}, extensions=extensions)


@dataclass
class Run:
    """What one driver did: the server's record of it and the caller's results."""

    received: bytes
    commands: list[bytes]
    results: list[SendResult]
    batch: Batch
    transcript: list[str]
    tls_version: str | None
    auth_mechanism: str | None


def summary(result: SendResult) -> tuple[Any, ...]:
    """Everything a caller reads on a result, timing aside."""
    error = result.error
    return (
        result.status,
        [(r.address, r.status, r.reply, r.final_reply) for r in result.recipients],
        result.final_replies,
        type(error),
        getattr(error, "smtp_code", None),
        str(error) if error is not None else None,
        [str(line) for line in result.transcript],
    )


def batch_summary(batch: Batch, results: list[SendResult]) -> tuple[Any, ...]:
    return (
        [(results.index(r), type(e), str(e)) for r, e in batch.errors],
        [results.index(t.result) for t in batch.unattempted],
        type(batch.lost),
        str(batch.lost) if batch.lost is not None else None,
        batch.lost_behind_dot,
    )


def config(server: HostileSMTPServer, ca_path: str, **options: Any) -> ClientConfig:
    defaults: dict[str, Any] = {
        "host": server.host,
        "port": server.port,
        "tls": TLSMode.STARTTLS,
        "timeout": 3.0,
        "username": USER,
        "password": PASSWORD,
        "local_hostname": "client.example",
        "ssl_cafile": ca_path,
    }
    return ClientConfig(**(defaults | options))


def run_sync(cfg: ClientConfig) -> tuple[list[SendResult], Batch, Transcript, Any]:
    client = SMTPClient(cfg)
    try:
        client.connect()
        txs = [client.prepare("sender@example.com", to, body) for to, body in MESSAGES]
        batch = client.send(txs)
        client.quit()
    finally:
        client.close()
    return [tx.result for tx in txs], batch, client.transcript, client.info


def run_async(cfg: ClientConfig) -> tuple[list[SendResult], Batch, Transcript, Any]:
    async def go() -> tuple[list[SendResult], Batch, Transcript, Any]:
        client = AsyncSMTPClient(cfg)
        try:
            await client.connect()
            txs = [client.prepare("sender@example.com", to, body) for to, body in MESSAGES]
            batch = await client.send(txs)
            await client.quit()
        finally:
            client.close()
        return [tx.result for tx in txs], batch, client.transcript, client.info

    return asyncio.run(go(), debug=True)


DRIVERS = {"blocking": run_sync, "asyncio": run_async}


@pytest.fixture(autouse=True)
def _no_leaks(no_leaks: None) -> None:
    """Every test ends with the threads and file descriptors it started with."""


@pytest.fixture(scope="module")
def ca_path(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("drivers-ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def play(
    driver: str,
    extensions: Sequence[str],
    server_tls: ssl.SSLContext,
    ca_path: str,
    *,
    implicit: bool = False,
    **options: Any,
) -> Run:
    with HostileSMTPServer(
        script(extensions), tls_context=server_tls, implicit_tls=implicit
    ) as server:
        cfg = config(server, ca_path, **options)
        results, batch, transcript, info = DRIVERS[driver](cfg)
        assert server.wait_closed()
        assert server.errors == []
        assert server.violations == []
        conn = server.connections[0]
        lines = [str(line).replace(f":{server.port}", ":PORT") for line in transcript.lines]
        return Run(
            conn.received,
            conn.commands,
            results,
            batch,
            lines,
            info.tls_version,
            info.auth_mechanism,
        )


def assert_same(sync: Run, aio: Run) -> None:
    assert aio.received == sync.received
    assert aio.commands == sync.commands
    assert [summary(r) for r in aio.results] == [summary(r) for r in sync.results]
    assert batch_summary(aio.batch, aio.results) == batch_summary(sync.batch, sync.results)
    assert aio.transcript == sync.transcript
    assert (aio.tls_version, aio.auth_mechanism) == (sync.tls_version, sync.auth_mechanism)


@pytest.fixture
def runs(server_tls: ssl.SSLContext, ca_path: str) -> Any:
    def both(extensions: Sequence[str], **options: Any) -> tuple[Run, Run]:
        sync = play("blocking", extensions, server_tls, ca_path, **options)
        aio = play("asyncio", extensions, server_tls, ca_path, **options)
        return sync, aio

    return both


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
@pytest.mark.parametrize("mode", list(MODES))
def test_one_conversation_through_both_drivers(runs: Any, mode: str, mechanism: str) -> None:
    sync, aio = runs(MODES[mode], auth_mechanisms=(mechanism,))
    assert_same(sync, aio)
    # ...and the conversation is the one described, so the comparison means something.
    verbs = [c.split()[0].upper() for c in sync.commands]
    assert verbs[:4] == [b"EHLO", b"STARTTLS", b"EHLO", b"AUTH"]
    assert b"QUIT" not in verbs  # the 421 ended the session
    assert sync.auth_mechanism == mechanism
    assert sync.tls_version is not None
    statuses = [r.status.value for r in sync.results]
    assert statuses == ["partial", "refused", "sent", "failed"]
    assert [type(r.error).__name__ for r in sync.results] == [
        "NoneType",
        "RecipientsRefused",
        "NoneType",
        "DataError",
    ]
    assert sync.results[3].error is not None
    assert getattr(sync.results[3].error, "smtp_code", None) == 421
    assert (b"BDAT" in sync.received) is (mode == "bdat")


def test_implicit_tls_through_both_drivers(runs: Any) -> None:
    sync, aio = runs(MODES["bdat"], implicit=True, tls=TLSMode.IMPLICIT)
    assert_same(sync, aio)
    assert [c.split()[0].upper() for c in sync.commands][:2] == [b"EHLO", b"AUTH"]
    assert sync.tls_version is not None


# -- time and cancellation while writing --------------------------------------------------

BIG = b"Subject: big\r\n\r\n" + b"x" * 998 + b"\r\n"
"""A 1 KiB line; messages below are many of them."""


def stop_reading_at_data() -> Script:
    """A server that says 354 to DATA and then reads nothing more (for 6 s)."""
    return standard_session({"DATA": [reply(354, "go ahead"), sleep(6)]})


def test_write_deadline_scales_with_size_and_holds_in_both_drivers(
    server_tls: ssl.SSLContext, ca_path: str
) -> None:
    """9 MiB (under the server's SIZE) to a server that stops reading: each driver gives up
    after ``timeout * (1 + MiB)`` (not ``timeout``, not never) with the same error and the
    same result."""
    timeout = 0.25
    body = BIG * (9 * 1024)
    bound = timeout * (1 + len(body) // (1 << 20))
    outcomes = []
    for driver in ("blocking", "asyncio"):
        with HostileSMTPServer(stop_reading_at_data(), max_received=64 << 20) as server:
            cfg = config(server, ca_path, tls=TLSMode.NONE, username=None, password=None)
            cfg = dataclasses.replace(cfg, timeout=timeout)
            started = time.monotonic()
            if driver == "blocking":
                client = SMTPClient(cfg)
                client.connect()
                tx = client.prepare("s@example.com", ["r@example.com"], body)
                client.send([tx])
                client.close()
            else:

                async def go(cfg: ClientConfig = cfg) -> Any:
                    client = AsyncSMTPClient(cfg)
                    await client.connect()
                    tx = client.prepare("s@example.com", ["r@example.com"], body)
                    await client.send([tx])
                    client.close()
                    return tx

                tx = asyncio.run(go(), debug=True)
            elapsed = time.monotonic() - started
        assert bound * 0.9 <= elapsed < bound + 1.0, (driver, elapsed)
        outcomes.append(summary(tx.result)[:6])
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][0] is not SendStatus.SENT
    assert outcomes[0][3] is SMTPTimeoutError


def test_a_send_cancelled_mid_write_is_closed_and_not_sent(ca_path: str) -> None:
    """Cancelled while the driver waits for the server to take a 9 MiB message: the
    connection closes at once (no final dot, no QUIT ever follows the cut), the message is
    not SENT and carries the cancellation."""
    body = BIG * (9 * 1024)

    with HostileSMTPServer(stop_reading_at_data(), max_received=64 << 20) as server:
        cfg = config(server, ca_path, tls=TLSMode.NONE, username=None, password=None)

        async def go() -> tuple[Any, AsyncSMTPClient]:
            client = AsyncSMTPClient(cfg)
            await client.connect()
            tx = client.prepare("s@example.com", ["r@example.com"], body)
            task = asyncio.ensure_future(client.send([tx]))
            await asyncio.sleep(0.5)
            assert not task.done()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return tx, client

        tx, client = asyncio.run(go(), debug=True)
        assert not client.is_connected
        assert server.wait_closed(timeout=8)
        received = server.connections[0].received
    assert not received.endswith(b"\r\n.\r\n")
    assert b"QUIT" not in received[-100:]
    assert tx.result.status is not SendStatus.SENT
    assert tx.result.status is not SendStatus.UNKNOWN  # the dot never left: not delivered
    assert isinstance(tx.result.error, SendCancelledError)
