"""What the blocking and the asyncio drivers share: the engine, the session's facts, and the
bookkeeping of their clock.  No I/O here; each driver moves the bytes its own way."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Sequence
from typing import Final

from .actions import FetchToken, Settled, Write
from .config import ClientConfig, SessionInfo
from .content import Content
from .delivery import DeliveryOptions
from .engine import Engine
from .protocol import SMTPConnection
from .transaction import Transaction
from .transcript import Transcript

__all__ = ["CHUNK", "QUIT_TIMEOUT", "RECV_SIZE", "WRITE_ALLOWANCE_BYTES", "DriverBase", "chunks"]

QUIT_TIMEOUT: Final = 5.0
"""Most seconds that QUIT (its write and the wait for 221 together) may take."""
RECV_SIZE: Final = 65536
CHUNK: Final = 65536
"""Parts smaller than this are joined into one write; writes go out at most this large, with
a look for replies between them."""
WRITE_ALLOWANCE_BYTES: Final = 1 << 20
"""A write gets ``timeout`` seconds more for every this many bytes."""


class DriverBase:
    """The engine of one session and the facts a driver keeps about it."""

    def __init__(
        self,
        config: ClientConfig,
        *,
        transcript: Transcript | None = None,
        pipeline_after_dot: bool = True,
    ) -> None:
        self.config = config
        self.engine = Engine(config, transcript, pipeline_after_dot=pipeline_after_dot)
        self._pid = os.getpid()
        self._deadline = 0.0
        self._cap = float("inf")
        self._progress = 0

    @property
    def transcript(self) -> Transcript:
        return self.engine.transcript

    @property
    def protocol(self) -> SMTPConnection:
        return self.engine.conn

    @property
    def info(self) -> SessionInfo:
        return self.engine.info

    @property
    def is_encrypted(self) -> bool:
        """True once the session runs under TLS."""
        return self.info.tls_version is not None

    def prepare(
        self,
        mail_from: str,
        recipients: Sequence[str],
        message: Content,
        delivery: DeliveryOptions | None = None,
    ) -> Transaction:
        """Check one message against the session; see :meth:`.engine.Engine.prepare`."""
        return self.engine.prepare(mail_from, recipients, message, delivery)

    def _ask_provider(self, action: FetchToken) -> Callable[[], None]:
        """Answer ``action`` with the provider's call (blocking: the asyncio driver makes it
        in a thread); return how to tell the engine, which the caller does on its own
        thread: the token, or the provider's error (the opening fails with it)."""
        source, username = self.config.token_provider, self.config.username
        assert source is not None, "FetchToken without token_provider"
        assert username, "FetchToken without a username"
        try:
            token = source.token(username, timeout=self.config.timeout, rejected=action.rejected)
        except Exception as error:
            return functools.partial(self.engine.token_failed, error)
        return functools.partial(self.engine.token_fetched, token)

    # -- the clock: each driver says what "now" is --------------------------------------

    def _now(self) -> float:
        return time.monotonic()

    def _restart_clock(self, seconds: float | None = None) -> None:
        """A new deadline for the next reply (or write): ``timeout`` from now."""
        self._deadline = self._now() + (self.config.timeout if seconds is None else seconds)
        self._progress = self.engine.conn.replies_received

    def _write_begins(self, action: Write) -> None:
        """Stamp the messages this write starts, and give it ``timeout`` seconds plus as
        many again for every MiB it carries."""
        now = time.time()
        for result in action.started:
            result.started = now
        size = sum(map(len, action.parts))
        self._restart_clock(self.config.timeout * (1 + size // WRITE_ALLOWANCE_BYTES))

    @staticmethod
    def _stamp(action: Settled) -> None:
        """These messages' outcomes are final: their own elapsed time."""
        now = time.time()
        for result in action.results:
            result.elapsed = max(0.0, now - result.started)


def chunks(parts: Sequence[bytes]) -> list[tuple[int, bytes]]:
    """``parts`` as writes, each paired with how many parts are complete after it: small
    parts joined up to :data:`CHUNK`, large ones alone (no copy), a lone part as itself (an
    AUTH line stays a :class:`~.secret.SecretBytes`)."""
    writes: list[tuple[int, bytes]] = []
    batch: list[bytes] = []
    size = 0
    for index, part in enumerate(parts, 1):
        if len(part) >= CHUNK:
            if batch:
                writes.append((index - 1, b"".join(batch)))
                batch, size = [], 0
            writes.append((index, part))
            continue
        batch.append(part)
        size += len(part)
        if size >= CHUNK:
            writes.append((index, b"".join(batch)))
            batch, size = [], 0
    if batch:
        writes.append((len(parts), batch[0] if len(batch) == 1 else b"".join(batch)))
    return writes
