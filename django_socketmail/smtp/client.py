"""The blocking socket driver: the only module that imports ``socket`` and ``ssl``.

:class:`SMTPClient` runs one SMTP session over a TCP (or TLS) socket, moving bytes between
the socket and the sans-I/O :class:`~.protocol.SMTPConnection`.  Every read and write has
a deadline (``timeout`` seconds for each reply, however slowly it drips in), and every
network failure becomes an exception of :mod:`.errors`.

Session::

    S: 220 mail.example.com ESMTP
    C: EHLO web1.example.com            (HELO if refused with 500/502/504/550)
    S: 250-mail.example.com ... 250 STARTTLS
    C: STARTTLS   /  S: 220  /  TLS handshake  /  C: EHLO again
    C: AUTH PLAIN [redacted]  /  S: 235
    C: MAIL FROM:<a@b> SIZE=123 / C: RCPT TO:<c@d> / C: DATA   (one write with PIPELINING)
    S: 250 / S: 250 / S: 354
    C: [message content: 123 bytes, 4 lines] / C: .
    S: 250 2.0.0 Ok: queued as 4Ab12
    C: QUIT / S: 221
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import enum
import functools
import select
import socket
import ssl
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, NoReturn

from .address import EnvelopeAddress, prepare_address
from .commands import (
    Auth,
    AuthCancel,
    AuthResponse,
    Command,
    Ehlo,
    Helo,
    Quit,
    StartTLS,
)
from .content import Content, has_8bit, split_canonical
from .errors import (
    AuthenticationError,
    CleartextAuthError,
    ConnectError,
    HeloError,
    LocalProtocolError,
    MessageTooLargeError,
    NotSupportedError,
    ServerDisconnected,
    SMTPTimeoutError,
    SocketMailError,
    TLSError,
)
from .extensions import Extensions
from .protocol import NEED_DATA, ReplyReceived, SessionState, SMTPConnection
from .reply import Reply, SMTPStatus
from .result import RecipientResult, SendResult
from .sasl import DEFAULT_PREFERENCE, MECHANISMS, Mechanism, UnexpectedChallenge
from .sending import Transaction, TransactionRunner
from .transcript import Transcript

__all__ = ["DEFAULT_TIMEOUT", "ClientConfig", "SMTPClient", "SessionInfo", "TLSMode"]

DEFAULT_TIMEOUT: Final = 30.0
"""Seconds allowed for each reply (and each write) when the configuration gives none."""

QUIT_TIMEOUT: Final = 5.0
"""Most seconds spent waiting for the 221 to QUIT: closing must not hang."""

RECV_SIZE: Final = 65536
COALESCE_LIMIT: Final = 65536
"""Parts smaller than this are joined into one write; larger ones are written alone."""

_EHLO_REFUSED_TRY_HELO: Final = frozenset({500, 502, 504, 550})
_MECHANISM_UNAVAILABLE: Final = frozenset({504, 534, 538})


class TLSMode(str, enum.Enum):
    """How the session is protected."""

    NONE = "none"
    """Plain TCP; STARTTLS is not attempted."""
    STARTTLS = "starttls"
    """Plain TCP upgraded with STARTTLS, which is required (RFC 3207)."""
    IMPLICIT = "implicit"
    """TLS from the first byte (RFC 8314), usually port 465."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientConfig:
    """Everything needed to open a session.  Hashable: the connection pool keys on it.

    The password never appears in ``repr()``.
    """

    host: str
    port: int
    tls: TLSMode = TLSMode.NONE
    timeout: float = DEFAULT_TIMEOUT
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    auth_mechanisms: tuple[str, ...] = DEFAULT_PREFERENCE
    allow_cleartext_auth: bool = False
    local_hostname: str | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_verify: bool = True
    server_hostname: str | None = None
    """Name the certificate must match (and SNI); defaults to ``host``."""
    pipelining: bool = True
    chunking: bool = True

    def ssl_context(self) -> ssl.SSLContext:
        """The client TLS context: chain and host name verified unless ``ssl_verify`` is off."""
        return _ssl_context(self.ssl_cafile, self.ssl_certfile, self.ssl_keyfile, self.ssl_verify)


@functools.lru_cache(maxsize=32)
def _ssl_context(
    cafile: str | None, certfile: str | None, keyfile: str | None, verify: bool
) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=cafile)
    if certfile or keyfile:
        context.load_cert_chain(certfile or "", keyfile)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


@functools.lru_cache(maxsize=1)
def _fqdn() -> str:
    return socket.getfqdn()


@dataclass(slots=True)
class SessionInfo:
    """What the session learned: for the audit log and ``sendtestmail``'s summary."""

    host: str
    port: int
    local_hostname: str = ""
    greeting: Reply | None = None
    extensions: Extensions = field(default_factory=Extensions)
    tls_version: str | None = None
    tls_cipher: str | None = None
    peer_certificate: str | None = None
    auth_mechanism: str | None = None
    auth_username: str | None = None
    connected_at: float = 0.0
    messages_sent: int = 0


class SMTPClient:
    """One SMTP session.  Not thread-safe: the caller serializes use (the backend's lock).

    :meth:`connect` opens and fully sets up the session (TLS, AUTH) or raises having closed
    everything; :meth:`prepare` checks one message against the session; :meth:`send` sends
    prepared messages, pipelined, each ending with its :class:`SendResult` (errors about a
    message are on its result, not raised); :meth:`quit` ends politely and :meth:`close`
    ends at once.  Both are safe to call in any state.
    """

    def __init__(self, config: ClientConfig, *, transcript: Transcript | None = None) -> None:
        self.config = config
        self.transcript = transcript if transcript is not None else Transcript()
        self.protocol = SMTPConnection(self.transcript)
        self.info = SessionInfo(config.host, config.port)
        self._sock: socket.socket | None = None

    def __repr__(self) -> str:
        state = "connected" if self.is_connected else "closed"
        return f"<SMTPClient {self.config.host}:{self.config.port} {state}>"

    @property
    def is_connected(self) -> bool:
        """True while the socket is open and the session usable."""
        return self._sock is not None and self.protocol.state is SessionState.READY

    @property
    def is_encrypted(self) -> bool:
        """True once the session runs under TLS."""
        return self.info.tls_version is not None

    # -- opening -----------------------------------------------------------------------

    def connect(self) -> None:
        """Connect, read the greeting, EHLO, STARTTLS if configured, AUTH if configured."""
        if self._sock is not None:
            raise LocalProtocolError("already connected")
        config = self.config
        try:
            self._open_socket()
            self._expect_greeting()
            self._hello()
            if config.tls is TLSMode.STARTTLS:
                self._starttls()
                self._hello()
            if config.username and config.password:
                self._authenticate(config.username, config.password)
            self.protocol.pipelining = config.pipelining and self.protocol.can_pipeline()
        except BaseException:
            self.close()
            raise

    def _open_socket(self) -> None:
        config = self.config
        self.transcript.info(f"connecting to {config.host}:{config.port}")
        try:
            sock = socket.create_connection((config.host, config.port), timeout=config.timeout)
        except TimeoutError as error:
            raise SMTPTimeoutError(
                f"could not connect to {config.host}:{config.port} within {config.timeout} s"
            ) from error
        except OSError as error:
            raise ConnectionFailedError(config.host, config.port, error) from error
        self._sock = sock
        _quickack(sock)
        self.info.connected_at = time.time()
        peer = sock.getpeername()
        self.transcript.info(f"connected to {peer[0]}:{peer[1]}")
        if config.tls is TLSMode.IMPLICIT:
            self._handshake()

    def _handshake(self) -> None:
        assert self._sock is not None
        config = self.config
        server_hostname = config.server_hostname or config.host
        raw = self._sock
        try:
            raw.settimeout(config.timeout)
            self._sock = config.ssl_context().wrap_socket(raw, server_hostname=server_hostname)
        except ssl.SSLCertVerificationError as error:
            self._sock = raw
            raise TLSError(
                f"TLS certificate of {server_hostname} not accepted: {error.verify_message}"
                " (set ssl_cafile to the CA that signed it)"
            ) from error
        except TimeoutError as error:
            self._sock = raw
            raise SMTPTimeoutError(f"TLS handshake timed out after {config.timeout} s") from error
        except (ssl.SSLError, OSError) as error:
            self._sock = raw
            raise TLSError(f"TLS handshake with {server_hostname} failed: {error}") from error
        tls = self._sock
        assert isinstance(tls, ssl.SSLSocket)
        _quickack(tls)
        cipher = tls.cipher()
        self.info.tls_version = tls.version()
        self.info.tls_cipher = cipher[0] if cipher else None
        self.info.peer_certificate = _certificate_subject(tls.getpeercert())
        self.transcript.info(
            f"TLS established: {self.info.tls_version} {self.info.tls_cipher}"
            + (f", certificate {self.info.peer_certificate}" if self.info.peer_certificate else "")
        )
        self.protocol.tls_established()

    def _expect_greeting(self) -> None:
        reply = self._read_reply().reply
        self.info.greeting = reply
        if reply.code != SMTPStatus.service_ready:
            raise ConnectError(reply, "greeting")

    def _local_hostname(self) -> str:
        name = self.config.local_hostname or _fqdn()
        if "." in name:
            return name
        assert self._sock is not None
        address = self._sock.getsockname()[0]
        return f"[IPv6:{address}]" if ":" in address else f"[{address}]"

    def _hello(self) -> None:
        hostname = self.info.local_hostname or self._local_hostname()
        self.info.local_hostname = hostname
        reply = self._command(Ehlo(hostname))
        if reply.code == SMTPStatus.completed:
            self.info.extensions = self.protocol.extensions
            return
        if reply.code in _EHLO_REFUSED_TRY_HELO:
            reply = self._command(Helo(hostname))
            if reply.code == SMTPStatus.completed:
                self.info.extensions = self.protocol.extensions
                return
        raise HeloError(reply, "EHLO/HELO")

    def _starttls(self) -> None:
        if "STARTTLS" not in self.protocol.extensions:
            raise NotSupportedError(
                f"{self.config.host}:{self.config.port} does not offer STARTTLS, and use_tls "
                "requires it; nothing else was sent (check the port: 465 is use_ssl)"
            )
        reply = self._command(StartTLS())
        if reply.code != SMTPStatus.service_ready:
            raise NotSupportedError(f"server refused STARTTLS: {reply.one_line()}")
        self._handshake()

    # -- authentication ------------------------------------------------------------------

    def _authenticate(self, username: str, password: str) -> None:
        offered = self.protocol.extensions.auth_mechanisms
        if not offered:
            hint = ""
            if not self.is_encrypted:
                hint = " before TLS; set use_tls (STARTTLS) or use_ssl"
            raise NotSupportedError(f"server does not offer AUTH{hint}")
        wanted = [name.upper() for name in self.config.auth_mechanisms]
        candidates = [name for name in wanted if name in offered and name in MECHANISMS]
        if not candidates:
            raise NotSupportedError(
                f"no usable AUTH mechanism: the server offers {' '.join(offered)}, "
                f"auth_mechanisms allows {' '.join(wanted) or 'none'}"
            )
        if not self.is_encrypted and not self.config.allow_cleartext_auth:
            safe = [name for name in candidates if not MECHANISMS[name].sends_password]
            if not safe:
                raise CleartextAuthError(
                    f"refusing to send the password unencrypted with {'/'.join(candidates)}: "
                    "set use_tls or use_ssl, or allow_cleartext_auth=True to accept the risk"
                )
            candidates = safe
        last: Reply | None = None
        for name in candidates:
            reply = self._sasl_exchange(MECHANISMS[name](username, password))
            if reply.code == SMTPStatus.auth_successful:
                self.info.auth_mechanism = name
                self.info.auth_username = username
                return
            if reply.code in _MECHANISM_UNAVAILABLE:
                last = reply
                continue
            # 535 and everything else: never try another mechanism (account lock-out).
            raise AuthenticationError(reply, f"AUTH {name}")
        assert last is not None
        raise AuthenticationError(last, "AUTH", "no offered mechanism was accepted")

    def _sasl_exchange(self, mechanism: Mechanism) -> Reply:
        initial = mechanism.initial_response()
        encoded = None if initial is None else (_b64(initial) or "=")
        reply = self._command(Auth(mechanism.name, encoded))
        while reply.code == SMTPStatus.auth_continue:
            try:
                challenge = base64.b64decode(reply.lines[0].strip(), validate=True)
                response = mechanism.respond(challenge)
            except binascii.Error:
                self._cancel_auth(mechanism, "the server's challenge is not valid base64")
            except UnexpectedChallenge:
                self._cancel_auth(mechanism, "the server asked for an unexpected extra step")
            reply = self._command(AuthResponse(_b64(response)))
        return reply

    def _cancel_auth(self, mechanism: Mechanism, why: str) -> NoReturn:
        reply = self._command(AuthCancel())
        raise AuthenticationError(reply, f"AUTH {mechanism.name}", f"{why}; exchange cancelled")

    # -- sending -----------------------------------------------------------------------

    def prepare(self, mail_from: str, recipients: Sequence[str], message: Content) -> Transaction:
        """Check one message (one byte string, or parts to send one after the other)
        against the session and build its transaction.  Parts are sent as they are, never
        joined, when they are in CRLF form.

        Raises :class:`InvalidAddressError` for an unusable address (before any byte is
        sent).  A message this server cannot take (SMTPUTF8 not offered, larger than SIZE)
        comes back already failed: ``transaction.result.error`` is set.
        """
        sender = prepare_address(mail_from)
        envelope = [prepare_address(address) for address in recipients]
        result = SendResult(
            sender.addr_spec, [RecipientResult(r.addr_spec) for r in dict.fromkeys(envelope)]
        )
        content, tail = split_canonical(message)
        size = sum(map(len, content)) + len(tail)
        result.size = size
        lines = sum(part.count(b"\n") for part in content) + len(tail) // 2
        transaction = Transaction(
            result, sender.addr_spec, (), list(result.recipients), content, lines, tail
        )
        try:
            self._check_sendable(sender, envelope, size)
        except SocketMailError as error:
            result.fail(error)
            return transaction
        transaction.parameters = self._mail_parameters(sender, envelope, content, size)
        return transaction

    def send(
        self, transactions: Sequence[Transaction], *, stop_on_error: bool = False
    ) -> TransactionRunner:
        """Send prepared transactions (pipelined, with BDAT, when the server allows) and
        return the runner: its ``errors`` and ``unattempted`` say what happened beyond each
        result.  When the session broke, :attr:`is_connected` turns False."""
        started = time.monotonic()
        runner = TransactionRunner(
            self,
            pipelining=self.protocol.pipelining,
            chunking=self.protocol.pipelining and self._chunking(),
            stop_on_error=stop_on_error,
        )
        if not self.is_connected:
            error = ServerDisconnected("not connected")
            for transaction in transactions:
                transaction.result.fail(error)
                runner.errors.append((transaction.result, error))
            return runner
        runner.run(transactions)
        elapsed = time.monotonic() - started
        for transaction in transactions:
            result = transaction.result
            result.elapsed = elapsed / len(transactions)
            if result.status in (result.status.SENT, result.status.PARTIAL):
                self.info.messages_sent += 1
        if self.protocol.state is not SessionState.READY or self.protocol.pending:
            self.close()
        return runner

    def _chunking(self) -> bool:
        return self.config.chunking and "CHUNKING" in self.protocol.extensions

    def _check_sendable(
        self, sender: EnvelopeAddress, envelope: list[EnvelopeAddress], size: int
    ) -> None:
        extensions = self.protocol.extensions
        if "SMTPUTF8" not in extensions:
            for address in (sender, *envelope):
                if address.needs_smtputf8:
                    raise NotSupportedError(
                        f"{address} has a non-ASCII local part and the server does not "
                        "offer SMTPUTF8"
                    )
        limit = extensions.size_limit
        if limit is not None and size > limit:
            raise MessageTooLargeError(size, limit)

    def _mail_parameters(
        self,
        sender: EnvelopeAddress,
        envelope: list[EnvelopeAddress],
        content: Sequence[bytes],
        size: int,
    ) -> tuple[str, ...]:
        extensions = self.protocol.extensions
        parameters = []
        if "SIZE" in extensions:
            parameters.append(f"SIZE={size}")
        if "8BITMIME" in extensions and has_8bit(content):
            parameters.append("BODY=8BITMIME")
        if any(a.needs_smtputf8 for a in (sender, *envelope)):
            parameters.append("SMTPUTF8")
        return tuple(parameters)

    def peer_has_spoken(self) -> bool:
        """True when the server sent something unasked (EOF, a 421) while we were idle: a
        session that must not be reused.  Costs no round trip and never blocks."""
        sock = self._sock
        if sock is None:
            return True
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable)

    # -- closing -----------------------------------------------------------------------

    def quit(self) -> None:
        """Send QUIT and wait briefly for 221, then close.  Never raises for a dead peer."""
        if self.is_connected:
            with contextlib.suppress(SocketMailError):
                self._command(Quit(), timeout=min(self.config.timeout, QUIT_TIMEOUT))
        self.close()

    def close(self) -> None:
        """Close the socket without a word.  Idempotent."""
        sock, self._sock = self._sock, None
        if sock is not None:
            self.protocol.connection_lost()
            try:
                sock.close()
            finally:
                self.transcript.info("connection closed")

    # -- I/O -----------------------------------------------------------------------------

    def _command(self, command: Command, *, timeout: float | None = None) -> Reply:
        self._write(self.protocol.send(command))
        return self._read_reply(timeout).reply

    def write(self, parts: Sequence[bytes]) -> None:
        """Send ``parts`` in order: small ones joined into one write, large ones on their own
        (no copy).  A failure is re-raised with ``parts_written`` set on it: how many parts
        fully left before it."""
        written = 0
        batch: list[bytes] = []
        size = 0
        try:
            for index, part in enumerate(parts):
                if len(part) >= COALESCE_LIMIT:
                    if batch:
                        self._write(b"".join(batch))
                        written, batch, size = index, [], 0
                    self._write(part)
                    written = index + 1
                else:
                    batch.append(part)
                    size += len(part)
                    if size >= COALESCE_LIMIT:
                        self._write(b"".join(batch))
                        written, batch, size = index + 1, [], 0
            if batch:
                self._write(b"".join(batch))
        except SocketMailError as error:
            error.parts_written = written  # type: ignore[attr-defined]
            raise

    def read_reply(self) -> Reply:
        """The next complete reply, within the configured timeout."""
        return self._read_reply().reply

    def _write(self, data: bytes) -> None:
        sock = self._sock
        if sock is None:
            raise ServerDisconnected("not connected")
        try:
            sock.settimeout(self.config.timeout)
            sock.sendall(data)
        except TimeoutError as error:
            self.protocol.connection_lost()
            raise SMTPTimeoutError(
                f"server did not take our data within {self.config.timeout} s"
            ) from error
        except OSError as error:
            self.protocol.connection_lost()
            raise ServerDisconnected(f"connection lost while sending: {error}") from error

    def _read_reply(self, timeout: float | None = None) -> ReplyReceived:
        """Read until one complete reply; within ``timeout`` seconds in total."""
        sock = self._sock
        if sock is None:
            raise ServerDisconnected("not connected")
        limit = self.config.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while True:
            event = self.protocol.next_event()
            if event is not NEED_DATA:
                assert isinstance(event, ReplyReceived)
                return event
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SMTPTimeoutError(f"no complete reply from the server within {limit} s")
            try:
                sock.settimeout(remaining)
                data = sock.recv(RECV_SIZE)
            except TimeoutError as error:
                raise SMTPTimeoutError(
                    f"no complete reply from the server within {limit} s"
                ) from error
            except OSError as error:
                self.protocol.connection_lost()
                raise ServerDisconnected(f"connection lost while reading: {error}") from error
            if not data:
                self.protocol.connection_lost()
                raise ServerDisconnected("the server closed the connection")
            self.protocol.receive_data(data)


class ConnectionFailedError(SocketMailError, ConnectionError):
    """The TCP connection could not be made (refused, unreachable, name not found)."""

    def __init__(self, host: str, port: int, error: OSError) -> None:
        super().__init__(f"could not connect to {host}:{port}: {error.strerror or error}")
        self.errno = error.errno
        self.host = host
        self.port = port


def _quickack(sock: socket.socket) -> None:
    """Ask Linux to acknowledge at once (``TCP_QUICKACK``; it is not sticky, so it is set
    again after the TLS handshake).  Without it a server that sends TLS 1.3 session tickets
    and then its greeting or EHLO reply with Nagle on waits ~40 ms for our delayed ACK."""
    option = getattr(socket, "TCP_QUICKACK", None)
    if option is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, option, 1)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _certificate_subject(cert: Mapping[str, Any] | None) -> str | None:
    """``commonName=mail.example.com`` from a verified peer certificate, or None."""
    if not cert:
        return None
    parts = [f"{key}={value}" for rdn in cert.get("subject", ()) for key, value in rdn]
    return ", ".join(parts) or None
