"""The blocking socket driver (with :mod:`.transport` and the asyncio driver, the only
modules that import ``socket`` and ``ssl``).

:class:`SMTPClient` moves bytes between a TCP (or TLS) socket and the sans-I/O
:class:`~.engine.Engine`, which holds every protocol rule; this module holds none.  It owns
time.  ``timeout`` bounds: the name lookup and the TCP connect together; the TLS handshake;
each reply, from when the driver starts waiting for it (however slowly it drips in); each
write of ``n`` bytes, ``timeout * (1 + n // 1 MiB)`` in all; and the lookup of this host's
name for EHLO (when ``local_hostname`` is not set: past ``timeout`` the address literal is
used).  QUIT, write and read together, takes at most :data:`QUIT_TIMEOUT`.  Every network
failure becomes an exception of :mod:`.errors`, or, while sending, a fact on each message's
result.  While it writes it also reads, so replies piling up unread do not stall our writes.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import ssl
import time
from collections.abc import Callable, Sequence

from .config import DEFAULT_TIMEOUT, ClientConfig, SessionInfo, TLSMode
from .driver import CHUNK, QUIT_TIMEOUT, RECV_SIZE, DriverBase, chunks
from .engine import CLOSE, DONE, RECEIVE, START_TLS, Batch, FetchToken, Settled, Write
from .errors import (
    LocalProtocolError,
    ServerDisconnected,
    SMTPTimeoutError,
    SocketMailError,
    TLSError,
)
from .protocol import SessionState
from .transaction import Transaction
from .transcript import Transcript
from .transport import (
    ConnectionFailedError,
    ascii_host,
    certificate_subject,
    connect,
    fqdn,
    quickack,
    resolve,
    ssl_context,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "ClientConfig",
    "ConnectionFailedError",
    "SMTPClient",
    "SessionInfo",
    "TLSMode",
    "ssl_context",
]


class SMTPClient(DriverBase):
    """One SMTP session over a blocking socket.  Not thread-safe: the caller serializes use.

    :meth:`connect` opens and fully sets up the session (TLS, AUTH) or raises having closed
    everything; :meth:`prepare` checks one message against the session; :meth:`send` sends
    prepared messages and returns the :class:`~.engine.Batch` (errors about a message are
    on its result, not raised); :meth:`quit` ends politely and :meth:`close` at once.  Both
    are safe to call in any state; in a forked child neither writes to the socket.
    """

    def __init__(
        self,
        config: ClientConfig,
        *,
        transcript: Transcript | None = None,
        pipeline_after_dot: bool = True,
    ) -> None:
        super().__init__(config, transcript=transcript, pipeline_after_dot=pipeline_after_dot)
        self._sock: socket.socket | None = None
        self._selector: selectors.BaseSelector | None = None
        self.before_write: Callable[[Write], None] | None = None
        """Called with each :class:`~.engine.Write` before its first byte goes out (the
        queue records there that a message's content may be about to leave)."""
        self.on_settled: Callable[[Settled], None] | None = None
        """Called with each :class:`~.engine.Settled` once its timing is stamped (the queue
        records each outcome there, as it arrives)."""

    def __repr__(self) -> str:
        state = "connected" if self.is_connected else "closed"
        return f"<SMTPClient {self.config.host}:{self.config.port} {state}>"

    @property
    def is_connected(self) -> bool:
        """True while the socket is open and the session usable."""
        return self._sock is not None and self.engine.usable

    # -- opening -----------------------------------------------------------------------

    def connect(self) -> None:
        """Connect, then greeting, EHLO, STARTTLS and AUTH as configured."""
        if self._sock is not None:
            raise LocalProtocolError("already connected")
        try:
            self._open_socket()
            self.engine.open(self._local_hostname())
            if self.config.tls is TLSMode.IMPLICIT:
                self._handshake()
            self._drive()
        except BaseException:
            self.close()
            raise

    def _open_socket(self) -> None:
        config = self.config
        self.transcript.info(f"connecting to {config.host}:{config.port}")
        deadline = time.monotonic() + config.timeout
        try:
            addresses = resolve(config.host, config.port, config.timeout)
            sock = connect(addresses, deadline)
        except TimeoutError as error:
            raise SMTPTimeoutError(
                f"could not connect to {config.host}:{config.port} within {config.timeout} s"
                " (name lookup and connect)"
            ) from error
        except OSError as error:
            raise ConnectionFailedError(config.host, config.port, error) from error
        self._sock = sock
        quickack(sock)
        self.info.connected_at = time.time()
        peer = sock.getpeername()
        self.transcript.info(f"connected to {peer[0]}:{peer[1]}")

    def _handshake(self) -> None:
        assert self._sock is not None
        config = self.config
        server_hostname = ascii_host(config.server_hostname or config.host)
        raw = self._sock
        try:
            raw.settimeout(self._remaining(config.timeout))
            tls = ssl_context(config).wrap_socket(raw, server_hostname=server_hostname)
        except ssl.SSLCertVerificationError as error:
            raise TLSError(
                f"TLS certificate of {server_hostname} not accepted: {error.verify_message}"
                " (set ssl_cafile to the CA that signed it)"
            ) from error
        except TimeoutError as error:
            raise SMTPTimeoutError(f"TLS handshake timed out after {config.timeout} s") from error
        except (ssl.SSLError, OSError) as error:
            raise TLSError(f"TLS handshake with {server_hostname} failed: {error}") from error
        self._sock = tls
        self._forget_selector()
        quickack(tls)
        cipher = tls.cipher()
        self.engine.tls_established(
            tls.version(),
            cipher[0] if cipher else None,
            certificate_subject(tls.getpeercert()),
            tls.getpeercert(binary_form=True),
        )

    def _local_hostname(self) -> str:
        name = self.config.local_hostname or fqdn(self.config.timeout) or ""
        if "." in name:
            return name
        assert self._sock is not None
        address = self._sock.getsockname()[0]
        return f"[IPv6:{address}]" if ":" in address else f"[{address}]"

    # -- sending -----------------------------------------------------------------------

    def send(self, transactions: Sequence[Transaction], *, stop_on_error: bool = False) -> Batch:
        """Send prepared transactions (pipelined, with BDAT, when the server allows) and
        return the batch.  When the session broke, :attr:`is_connected` turns False."""
        batch = self.engine.send(transactions, stop_on_error=stop_on_error)
        if self._sock is not None:
            self._drive()
        if not self.engine.usable:
            self.close()
        return batch

    def peer_has_spoken(self) -> bool:
        """True when the server sent something unasked (EOF, a 421) while we were idle: a
        session that must not be reused.  Costs no round trip and does not block; works for
        any file descriptor number (``selectors``, not ``select.select``)."""
        sock = self._sock
        if sock is None or self.engine.conn.buffered:
            return True
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True
        return self._readable(0)

    # -- closing -----------------------------------------------------------------------

    def quit(self, *, budget: float = QUIT_TIMEOUT) -> None:
        """Send QUIT and wait briefly for 221, then close; within ``budget`` seconds (at most
        :data:`QUIT_TIMEOUT`, and at most ``timeout``) in all.  In a process forked after
        connecting, only closes."""
        if self.is_connected and os.getpid() == self._pid:
            self.engine.quit()
            with contextlib.suppress(SocketMailError):
                self._drive(cap=min(self.config.timeout, QUIT_TIMEOUT, budget))
        self.close()

    def close(self) -> None:
        """Close the socket without a word.  Idempotent."""
        sock, self._sock = self._sock, None
        self._forget_selector()
        if sock is not None:
            if self.engine.conn.state is not SessionState.CLOSED:
                self.engine.conn.connection_lost()
            try:
                sock.close()
            finally:
                self.transcript.info("connection closed")

    # -- the loop ------------------------------------------------------------------------

    def _drive(self, *, cap: float | None = None) -> None:
        """Do what the engine asks until it is done.  ``cap``: seconds for all of it."""
        self._cap = float("inf") if cap is None else time.monotonic() + cap
        self._restart_clock()
        try:
            while True:
                action = self.engine.next_action()
                if isinstance(action, Write):
                    self._write(action)
                elif isinstance(action, Settled):
                    self._stamp(action)
                    if self.on_settled is not None:
                        self.on_settled(action)
                elif action is RECEIVE:
                    self._receive()
                elif action is START_TLS:
                    self._handshake()
                elif isinstance(action, FetchToken):
                    self._ask_provider(action)()
                elif action is CLOSE:
                    self.close()
                elif action is DONE:
                    return
        finally:
            self._cap = float("inf")

    def _remaining(self, limit: float) -> float:
        return min(limit, self._cap - time.monotonic())

    def _write(self, action: Write) -> None:
        if self.before_write is not None:
            self.before_write(action)
        self._write_begins(action)
        written = 0
        try:
            for index, data in chunks(action.parts):
                self._send_all(data)
                written = index
        except SocketMailError as error:
            self.engine.connection_lost(error, parts_written=written)
            return
        self.engine.written()
        self._restart_clock()

    def _send_all(self, data: bytes) -> None:
        sock = self._sock
        if sock is None:
            raise ServerDisconnected("not connected")
        view = memoryview(data)
        try:
            while view:
                if self._readable(0):
                    self._take_replies()
                remaining = self._remaining(self._deadline - time.monotonic())
                if remaining <= 0:
                    raise TimeoutError
                sock.settimeout(remaining)
                sent = sock.send(view[:CHUNK])
                view = view[sent:]
        except TimeoutError as error:
            raise SMTPTimeoutError(
                f"server did not take our data within {self.config.timeout} s"
            ) from error
        except OSError as error:
            raise ServerDisconnected(f"connection lost while sending: {error}") from error
        finally:
            view.release()

    def _take_replies(self) -> None:
        """While writing: take what the server already sent (never blocks)."""
        sock = self._sock
        assert sock is not None
        try:
            sock.settimeout(0)
            data = sock.recv(RECV_SIZE)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        if data:
            self.engine.receive_data(data)

    def _receive(self) -> None:
        sock = self._sock
        if sock is None:
            self.engine.connection_lost(ServerDisconnected("not connected"))
            return
        if self.engine.conn.replies_received != self._progress:
            self._restart_clock()
        limit = self.config.timeout
        try:
            remaining = self._remaining(self._deadline - time.monotonic())
            if remaining <= 0:
                raise TimeoutError
            sock.settimeout(remaining)
            data = sock.recv(RECV_SIZE)
        except TimeoutError:
            self.engine.connection_lost(
                SMTPTimeoutError(f"no complete reply from the server within {limit} s")
            )
            return
        except OSError as error:
            self.engine.connection_lost(
                ServerDisconnected(f"connection lost while reading: {error}")
            )
            return
        if not data:
            self.engine.connection_lost(ServerDisconnected("the server closed the connection"))
            return
        self.engine.receive_data(data)

    def _readable(self, timeout: float) -> bool:
        sock = self._sock
        if sock is None:
            return False
        if self._selector is None:
            self._selector = selectors.DefaultSelector()
            self._selector.register(sock, selectors.EVENT_READ)
        return bool(self._selector.select(timeout))

    def _forget_selector(self) -> None:
        selector, self._selector = self._selector, None
        if selector is not None:
            selector.close()
