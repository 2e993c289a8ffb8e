"""The asyncio driver: the second driver of the sans-I/O :class:`~.engine.Engine`.

With :mod:`.client` (blocking) and :mod:`.transport` (what both share), the only modules that
import ``socket``, ``ssl`` and ``asyncio``.  :class:`AsyncSMTPClient` moves bytes and time
between an asyncio transport (a small :class:`asyncio.Protocol`, no new dependency) and the
same engine the blocking :class:`~.client.SMTPClient` drives; it holds no protocol rule.  It
keeps the blocking driver's clock exactly: ``timeout`` bounds the name lookup and the TCP
connect together; the TLS handshake (``ssl=`` for implicit TLS, ``loop.start_tls`` after
STARTTLS); each reply, from when the driver starts waiting for it; each write of ``n`` bytes,
``timeout * (1 + n // 1 MiB)`` in all; QUIT takes at most :data:`~.client.QUIT_TIMEOUT`.
While it writes it also reads.  Deadlines are timer callbacks on the loop, not
``asyncio.wait_for``.

Cancellation: when the task running :meth:`AsyncSMTPClient.connect`, :meth:`~AsyncSMTPClient.send`
or :meth:`~AsyncSMTPClient.quit` is cancelled, the engine is told that the connection was
lost (with how much of the write in progress fully left), so each message's result says what
the server's replies said and no more (a message whose final reply had not come is not
SENT), the connection is closed at once (a half-written command is never followed by
anything), and ``CancelledError`` propagates.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Sequence
from typing import Any, Final, TypeVar, cast

from .config import ClientConfig, TLSMode
from .driver import CHUNK, QUIT_TIMEOUT, DriverBase, chunks
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
    fqdn,
    quickack,
    ssl_context,
)

__all__ = ["AsyncSMTPClient", "SendCancelledError"]

READ_LIMIT: Final = 65536
"""Received bytes held before the driver takes them; past this the transport stops reading
(as a full socket buffer would), so a flooding server costs no memory."""

_T = TypeVar("_T")


class SendCancelledError(SocketMailError, ConnectionAbortedError):
    """The task driving the session was cancelled: the connection was abandoned.  Set on
    the results of messages whose outcome the server had not yet given."""


class _Stream(asyncio.Protocol):
    """The transport's side: buffers what arrives, tracks write flow control, wakes the
    driver.  Holds no protocol knowledge."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.chunks: deque[bytes] = deque()
        self.size = 0
        self.eof = False
        self.error: BaseException | None = None
        self.write_paused = False
        self._reading_paused = False
        self._waiter: asyncio.Future[bool] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)
        # Report "paused" whenever any byte is still queued: a write is done once the
        # kernel took it all, as with a blocking send.
        self.transport.set_write_buffer_limits(high=0)

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)
        self.size += len(data)
        if self.size >= READ_LIMIT and not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.error = self.error or exc
        self.write_paused = False
        self._wake()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake()

    def take(self) -> bytes:
        """Everything received and not yet taken."""
        data = b"".join(self.chunks)
        self.chunks.clear()
        self.size = 0
        if self._reading_paused and self.transport is not None and not self.eof:
            self._reading_paused = False
            with contextlib.suppress(RuntimeError):
                self.transport.resume_reading()
        return data

    async def wait(self, deadline: float) -> bool:
        """Wait until something happens (data, EOF, writable) or ``deadline`` (loop time);
        False when the deadline came first."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        self._waiter = waiter
        timer = loop.call_at(deadline, _resolve, waiter, False)
        try:
            return await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def _wake(self) -> None:
        if self._waiter is not None:
            _resolve(self._waiter, True)


def _resolve(waiter: asyncio.Future[bool], value: bool) -> None:
    if not waiter.done():
        waiter.set_result(value)


async def _bounded(awaitable: Awaitable[_T], deadline: float) -> _T:
    """``await awaitable`` until ``deadline`` (loop time), then ``TimeoutError``.  Unlike
    ``asyncio.wait_for`` (Python < 3.12), a cancellation of the caller is never swallowed
    and the inner task is cancelled whichever way this ends."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait({task}, timeout=max(0.0, deadline - loop.time()))
    finally:
        if not task.done():
            task.cancel()
    if not done:
        raise TimeoutError
    return task.result()


class AsyncSMTPClient(DriverBase):
    """One SMTP session over an asyncio transport.  Not task-safe: the caller serializes use
    (one operation at a time).

    The same contract as :class:`~.client.SMTPClient`, awaited: :meth:`connect` opens and
    fully sets up the session (TLS, AUTH) or raises having closed everything;
    :meth:`prepare` checks one message; :meth:`send` sends prepared messages and returns
    the :class:`~.engine.Batch` (errors about a message are on its result, not raised);
    :meth:`quit` ends politely and :meth:`close` at once.  Both are safe to call in any
    state.  Cancelling an operation abandons the connection (see the module docstring).
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
        """The connected socket until a transport owns it (implicit TLS: the handshake)."""
        self._stream: _Stream | None = None

    def __repr__(self) -> str:
        state = "connected" if self.is_connected else "closed"
        return f"<AsyncSMTPClient {self.config.host}:{self.config.port} {state}>"

    @property
    def is_connected(self) -> bool:
        """True while the transport is open and the session usable."""
        stream = self._stream
        return stream is not None and not stream.eof and self.engine.usable

    # -- opening -----------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect, then greeting, EHLO, STARTTLS and AUTH as configured.  With a
        ``token_provider``, each token (the first, and a newer one after the server refused
        it) is fetched in a thread, so that a provider's HTTP request does not hold the
        event loop."""
        if self._sock is not None or self._stream is not None:
            raise LocalProtocolError("already connected")
        try:
            await self._open_socket()
            self.engine.open(await self._local_hostname())
            if self.config.tls is TLSMode.IMPLICIT:
                await self._handshake()
            else:
                await self._attach()
            await self._drive()
        except asyncio.CancelledError:
            self._abandon()
            raise
        except BaseException:
            self.close()
            raise

    async def _open_socket(self) -> None:
        config = self.config
        self.transcript.info(f"connecting to {config.host}:{config.port}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + config.timeout
        try:
            addresses = await self._resolve(deadline)
            sock = await self._connect(addresses, deadline)
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

    async def _resolve(self, deadline: float) -> list[Any]:
        host, port = self.config.host, self.config.port
        try:
            return socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST
            )
        except socket.gaierror:
            pass  # a name, not an address literal: look it up without blocking the loop
        loop = asyncio.get_running_loop()
        lookup = loop.getaddrinfo(ascii_host(host), port, type=socket.SOCK_STREAM)
        return list(await _bounded(lookup, deadline))

    @staticmethod
    async def _connect(addresses: list[Any], deadline: float) -> socket.socket:
        """Connect to the first of ``addresses`` that answers, all before ``deadline``."""
        loop = asyncio.get_running_loop()
        error: OSError | None = None
        for family, kind, proto, _name, address in addresses:
            if deadline - loop.time() <= 0:
                raise TimeoutError
            sock = socket.socket(family, kind, proto)
            try:
                sock.setblocking(False)
                await _bounded(loop.sock_connect(sock, address), deadline)
            except BaseException as failure:
                sock.close()
                if not isinstance(failure, OSError) or isinstance(failure, TimeoutError):
                    raise
                error = failure
                continue
            return sock
        raise error or OSError("no address found")

    async def _attach(self) -> None:
        """Hand the connected socket to a plain transport."""
        sock, self._sock = self._sock, None
        assert sock is not None
        stream = _Stream()
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: stream, sock=sock)
        except BaseException:
            sock.close()
            raise
        self._stream = stream

    async def _handshake(self) -> None:
        config = self.config
        server_hostname = ascii_host(config.server_hostname or config.host)
        loop = asyncio.get_running_loop()
        deadline = min(loop.time() + config.timeout, self._cap)
        context = ssl_context(config)
        try:
            if self._sock is not None:  # implicit TLS: the transport starts encrypted
                sock, self._sock = self._sock, None
                stream = _Stream()
                try:
                    connecting = loop.create_connection(
                        lambda: stream,
                        sock=sock,
                        ssl=context,
                        server_hostname=server_hostname,
                        ssl_handshake_timeout=config.timeout + 1,
                    )
                    await _bounded(connecting, deadline)
                except BaseException:
                    sock.close()
                    raise
            else:
                stream = self._require_stream()
                if stream.chunks:
                    raise ssl.SSLError(
                        f"the server sent {stream.size} plaintext bytes after its 220 to STARTTLS"
                    )
                old = stream.transport
                assert old is not None
                starting = loop.start_tls(
                    old,
                    stream,
                    context,
                    server_hostname=server_hostname,
                    ssl_handshake_timeout=config.timeout + 1,
                )
                try:
                    tls = await _bounded(starting, deadline)
                except BaseException:
                    old.abort()
                    raise
                if tls is None:
                    raise ssl.SSLError("the transport closed during the handshake")
                stream.connection_made(tls)
        except ssl.SSLCertVerificationError as error:
            raise TLSError(
                f"TLS certificate of {server_hostname} not accepted: {error.verify_message}"
                " (set ssl_cafile to the CA that signed it)"
            ) from error
        except TimeoutError as error:
            raise SMTPTimeoutError(f"TLS handshake timed out after {config.timeout} s") from error
        except (ssl.SSLError, OSError) as error:
            raise TLSError(f"TLS handshake with {server_hostname} failed: {error}") from error
        self._stream = stream
        transport = stream.transport
        assert transport is not None
        raw = transport.get_extra_info("socket")
        if raw is not None:
            quickack(cast("socket.socket", raw))
        tls_object = transport.get_extra_info("ssl_object")
        cipher = tls_object.cipher() if tls_object is not None else None
        self.engine.tls_established(
            tls_object.version() if tls_object is not None else None,
            cipher[0] if cipher else None,
            certificate_subject(tls_object.getpeercert() if tls_object is not None else None),
            tls_object.getpeercert(binary_form=True) if tls_object is not None else None,
        )

    async def _local_hostname(self) -> str:
        name = self.config.local_hostname
        if not name:
            loop = asyncio.get_running_loop()
            name = await loop.run_in_executor(None, fqdn, self.config.timeout) or ""
        if "." in name:
            return name
        assert self._sock is not None
        address = self._sock.getsockname()[0]
        return f"[IPv6:{address}]" if ":" in address else f"[{address}]"

    # -- sending -----------------------------------------------------------------------

    async def send(
        self, transactions: Sequence[Transaction], *, stop_on_error: bool = False
    ) -> Batch:
        """Send prepared transactions (pipelined, with BDAT, when the server allows) and
        return the batch.  When the session broke, :attr:`is_connected` turns False."""
        batch = self.engine.send(transactions, stop_on_error=stop_on_error)
        if self._stream is not None:
            try:
                await self._drive()
            except asyncio.CancelledError:
                self._abandon()
                raise
        if not self.engine.usable:
            self.close()
        return batch

    def peer_has_spoken(self) -> bool:
        """True when the server sent something unasked (EOF, a 421) while we were idle: a
        session that must not be reused.  Costs no round trip and does not wait."""
        stream = self._stream
        return stream is None or bool(stream.chunks) or stream.eof or self.engine.conn.buffered > 0

    # -- closing -----------------------------------------------------------------------

    async def quit(self, *, budget: float = QUIT_TIMEOUT) -> None:
        """Send QUIT and wait briefly for 221, then close; within ``budget`` seconds (at most
        :data:`~.client.QUIT_TIMEOUT`, and at most ``timeout``) in all.  In a process forked
        after connecting, only closes."""
        try:
            if self.is_connected and os.getpid() == self._pid:
                self.engine.quit()
                with contextlib.suppress(SocketMailError):
                    await self._drive(cap=min(self.config.timeout, QUIT_TIMEOUT, budget))
        finally:
            self.close()

    def close(self) -> None:
        """Close the connection without a word (no TLS close_notify either, as the blocking
        driver's ``socket.close()``).  Idempotent."""
        sock, self._sock = self._sock, None
        stream, self._stream = self._stream, None
        if sock is None and stream is None:
            return
        if self.engine.conn.state is not SessionState.CLOSED:
            self.engine.conn.connection_lost()
        try:
            if sock is not None:
                sock.close()
            if stream is not None and stream.transport is not None:
                stream.transport.abort()
        finally:
            self.transcript.info("connection closed")

    def _abandon(self) -> None:
        """The operation was cancelled: the engine hears of a lost connection (unless it
        already did), what it settled is stamped, and the transport is closed."""
        error = SendCancelledError("the sending task was cancelled; connection abandoned")
        if self.engine.conn.state is not SessionState.CLOSED:
            self.engine.connection_lost(error)
        self._settle_after_loss()
        self.close()

    def _settle_after_loss(self) -> None:
        """Take the engine's last actions after a loss (no I/O is left to do)."""
        with contextlib.suppress(SocketMailError):
            for _ in range(1000):
                action = self.engine.next_action()
                if isinstance(action, Settled):
                    self._stamp(action)
                elif action is CLOSE:
                    self.close()
                else:
                    return

    # -- the loop ------------------------------------------------------------------------

    async def _drive(self, *, cap: float | None = None) -> None:
        """Do what the engine asks until it is done.  ``cap``: seconds for all of it."""
        loop = asyncio.get_running_loop()
        self._cap = float("inf") if cap is None else loop.time() + cap
        self._restart_clock()
        try:
            while True:
                action = self.engine.next_action()
                if isinstance(action, Write):
                    await self._write(action)
                elif isinstance(action, Settled):
                    self._stamp(action)
                elif action is RECEIVE:
                    await self._receive()
                elif action is START_TLS:
                    await self._handshake()
                elif isinstance(action, FetchToken):
                    await self._fetch_token(action)
                elif action is CLOSE:
                    self.close()
                elif action is DONE:
                    return
        finally:
            self._cap = float("inf")

    async def _fetch_token(self, action: FetchToken) -> None:
        loop = asyncio.get_running_loop()
        report = await loop.run_in_executor(None, self._ask_provider, action)
        report()

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _require_stream(self) -> _Stream:
        stream = self._stream
        if stream is None or stream.transport is None:
            raise ServerDisconnected("not connected")
        return stream

    async def _write(self, action: Write) -> None:
        self._write_begins(action)
        written = 0
        try:
            for index, data in chunks(action.parts):
                await self._send_all(data)
                written = index
        except SocketMailError as error:
            self.engine.connection_lost(error, parts_written=written)
            return
        except asyncio.CancelledError:
            self.engine.connection_lost(
                SendCancelledError("the sending task was cancelled while writing"),
                parts_written=written,
            )
            raise
        self.engine.written()
        self._restart_clock()

    async def _send_all(self, data: bytes) -> None:
        stream = self._require_stream()
        transport = stream.transport
        assert transport is not None
        deadline = min(self._deadline, self._cap)
        view = memoryview(data)
        try:
            for start in range(0, len(view), CHUNK):
                self._take_replies(stream)
                if stream.error is not None:
                    raise ServerDisconnected(f"connection lost while sending: {stream.error}")
                if asyncio.get_running_loop().time() >= deadline:
                    raise TimeoutError
                if stream.eof:
                    # The server hung up cleanly: as a blocking send into a half-closed
                    # socket, the bytes go nowhere; the reads that follow take its last
                    # replies, then the end.
                    continue
                transport.write(view[start : start + CHUNK])
                if transport.is_closing():
                    # A write met a reset: asyncio closes the transport at once but only
                    # reports the loss when the loop next turns, and drops later writes.
                    raise ServerDisconnected("connection lost while sending")
                # asyncio's SSL transport may report "paused" with nothing left to write
                # (high-water mark 0): only bytes still buffered are waited for.
                while stream.write_paused and transport.get_write_buffer_size():
                    self._take_replies(stream)
                    if not await stream.wait(deadline):
                        raise TimeoutError
                if stream.error is not None:
                    raise ServerDisconnected(f"connection lost while sending: {stream.error}")
        except TimeoutError as error:
            raise SMTPTimeoutError(
                f"server did not take our data within {self.config.timeout} s"
            ) from error

    def _take_replies(self, stream: _Stream) -> None:
        """While writing: take what the server already sent (never waits)."""
        if stream.chunks:
            self.engine.receive_data(stream.take())

    async def _receive(self) -> None:
        stream = self._stream
        if stream is None:
            self.engine.connection_lost(ServerDisconnected("not connected"))
            return
        if self.engine.conn.replies_received != self._progress:
            self._restart_clock()
        limit = self.config.timeout
        loop = asyncio.get_running_loop()
        try:
            while not stream.chunks:
                if stream.eof:
                    if stream.error is not None:
                        self.engine.connection_lost(
                            ServerDisconnected(f"connection lost while reading: {stream.error}")
                        )
                    else:
                        self.engine.connection_lost(
                            ServerDisconnected("the server closed the connection")
                        )
                    return
                deadline = min(self._deadline, self._cap)
                if loop.time() >= deadline or not await stream.wait(deadline):
                    self.engine.connection_lost(
                        SMTPTimeoutError(f"no complete reply from the server within {limit} s")
                    )
                    return
        except asyncio.CancelledError:
            self.engine.connection_lost(
                SendCancelledError("the sending task was cancelled while waiting for a reply")
            )
            raise
        self.engine.receive_data(stream.take())
