"""A throwaway SMTP server on 127.0.0.1 that records what it receives.

It serves two users: ``manage.py sendtestmail --local-server`` (a newcomer sees a
real SMTP conversation, with TLS and AUTH, without configuring anything) and the
test suite (an in-process "real server" for integration tests of our SMTP client).
It is built on aiosmtpd and trustme, the optional ``demo`` extra; it never imports
Django, and nothing in the package imports it at import time. Usage::

    with LocalSMTPServer(tls="starttls") as server:
        user, password = next(iter(server.users.items()))
        # connect to server.host:server.port, STARTTLS verified with
        # server.client_ssl_context(), AUTH as user/password, send...
        [message] = server.wait_for_messages(1)

What it offers on top of aiosmtpd 1.4.6: CRAM-MD5 (RFC 2195) beside PLAIN and
LOGIN, advertised in the order asked for; AUTH under implicit TLS; a per-RCPT
refusal hook; a queue id in the final reply; a free port taken without a race; a
``stop()`` that leaves no socket, thread or file behind, even with clients still
connected.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import secrets
import socket
import ssl
import tempfile
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from types import MappingProxyType, TracebackType
from typing import Any, Final, Literal

try:
    import trustme
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "django_socketmail.localserver needs aiosmtpd and trustme: "
        'pip install "django-socketmail[demo]"'
    ) from exc

__all__ = ["MECHANISMS", "LocalSMTPServer", "ReceivedMessage", "RecipientHook", "TLSMode"]

TLSMode = Literal["none", "starttls", "implicit"]
RecipientHook = Callable[[str], "tuple[int, str] | None"]
"""Called with each RCPT address; return ``(code, text)`` to refuse it, None to accept."""

MECHANISMS: Final = ("CRAM-MD5", "PLAIN", "LOGIN")
"""The SASL mechanisms this server implements, in its default order of preference."""

DEFAULT_SIZE_LIMIT: Final = 33_554_432
READY_TIMEOUT: Final = 5.0


class _DropLoginDataNoise(logging.Filter):
    """Drop the warning aiosmtpd 1.4.6 logs on *every* successful AUTH.

    Its own ``smtp_AUTH`` sets the deprecated ``Session.login_data``, whose setter logs
    "Session.login_data is deprecated"; with logging unconfigured (a newcomer running
    the demo) that lands on stderr. Nothing else from the ``mail.log`` logger is hidden.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Session.login_data is deprecated")


logging.getLogger("mail.log").addFilter(_DropLoginDataNoise())


@dataclass(frozen=True, slots=True)
class ReceivedMessage:
    """One message as the server accepted it.

    ``data`` is exactly the bytes received between ``DATA``'s 354 and the final
    ``CRLF.CRLF``, after un-dot-stuffing (RFC 5321 §4.5.2), line endings as sent.
    Options are upper-cased by aiosmtpd (``SIZE=123``, ``BODY=8BITMIME``, ``SMTPUTF8``).
    """

    mail_from: str
    """The reverse-path; the empty string for the null reverse-path ``<>``."""
    rcpt_tos: tuple[str, ...]
    data: bytes
    mail_options: tuple[str, ...]
    rcpt_options: tuple[str, ...]
    auth_user: str | None
    """Who authenticated in the session, None if nobody did."""
    tls: bool
    """Whether the session was under TLS (STARTTLS or implicit) when DATA ended."""
    queue_id: str
    """The id named in the final reply, ``250 OK: queued as <queue_id>``."""


@dataclass(frozen=True, slots=True)
class _Options:
    """What the SMTP dialogue offers and enforces; see `LocalSMTPServer` for each."""

    tls: TLSMode
    require_tls: bool
    auth_required: bool
    allow_cleartext_auth: bool
    mechanisms: tuple[str, ...]
    refuse_recipients: RecipientHook | None
    size_limit: int | None
    smtputf8: bool
    eightbitmime: bool
    pipelining: bool
    hostname: str


class _Credentials:
    """Checks passwords for PLAIN, LOGIN (via aiosmtpd) and CRAM-MD5 (RFC 2195).

    User names and passwords are compared as UTF-8 bytes, in constant time.
    """

    def __init__(self, users: Mapping[str, str]) -> None:
        self._users = {name.encode(): password.encode() for name, password in users.items()}

    def check_password(self, user: bytes, password: bytes) -> str | None:
        """Return the user name if *password* is theirs, else None."""
        expected = self._users.get(user)
        matches = hmac.compare_digest(password, expected if expected is not None else b"")
        return _decode(user) if matches and expected is not None else None

    def check_cram_md5(self, challenge: bytes, response: bytes) -> str | None:
        """Return the user name if *response* answers *challenge*, else None.

        RFC 2195 §2: the response is ``user SP digest``, the digest the lowercase hex
        HMAC-MD5 of the challenge keyed with the password. The user name may contain
        spaces, the digest cannot.
        """
        user, _, digest = response.rpartition(b" ")
        expected = self._users.get(user)
        key = expected if expected is not None else b""
        wanted = hmac.new(key, challenge, "md5").hexdigest().encode()
        matches = hmac.compare_digest(digest, wanted)
        return _decode(user) if matches and expected is not None else None

    def authenticator(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        """aiosmtpd's ``authenticator`` callback, used by its built-in PLAIN and LOGIN."""
        user = None
        if isinstance(auth_data, LoginPassword):
            user = self.check_password(auth_data.login, auth_data.password)
        # handled=False: aiosmtpd answers 535 on failure; auth_data ends up in session.
        return AuthResult(success=user is not None, handled=False, auth_data=user)


def _decode(value: bytes) -> str | None:
    try:
        return value.decode()
    except UnicodeDecodeError:
        return None


class _Inbox:
    """The received messages, appended by the server thread, read by any thread."""

    def __init__(self) -> None:
        self.messages: list[ReceivedMessage] = []
        self._arrived = threading.Condition()

    def deliver(self, message: ReceivedMessage) -> None:
        with self._arrived:
            self.messages.append(message)
            self._arrived.notify_all()

    def wait(self, count: int, timeout: float) -> list[ReceivedMessage]:
        with self._arrived:
            if not self._arrived.wait_for(lambda: len(self.messages) >= count, timeout):
                raise TimeoutError(
                    f"expected {count} message(s) within {timeout}s, got {len(self.messages)}"
                )
            return list(self.messages)


class _Handler:
    """The aiosmtpd handler: EHLO keywords, MAIL/RCPT policy, CRAM-MD5, delivery.

    aiosmtpd treats every attribute whose name starts with ``auth_`` as a SASL
    mechanism (``auth_CRAM__MD5`` is "CRAM-MD5"), so no other attribute may.
    """

    def __init__(self, options: _Options, credentials: _Credentials, inbox: _Inbox) -> None:
        self._options = options
        self._credentials = credentials
        self._inbox = inbox

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        """Advertise AUTH in our order, and 8BITMIME/PIPELINING as configured.

        aiosmtpd sorts the mechanisms alphabetically and has no switch for 8BITMIME.
        With this (5-argument) hook aiosmtpd no longer records the EHLO name: we must.
        """
        session.host_name = hostname
        options = self._options
        auth = "250-AUTH " + " ".join(options.mechanisms) if options.mechanisms else None
        lines: list[str] = []
        for line in responses[:-1]:  # the last one is "250 HELP"
            keyword = line[4:].partition(" ")[0].upper()
            if keyword == "AUTH" and auth is not None:
                lines.append(auth)
            elif keyword != "AUTH" and (keyword != "8BITMIME" or options.eightbitmime):
                lines.append(line)
        if options.pipelining:
            lines.append("250-PIPELINING")
        return [*lines, responses[-1]]

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        if self._options.auth_required and not session.authenticated:
            return "530 5.7.0 Authentication required"
        if "BODY=8BITMIME" in mail_options and not self._options.eightbitmime:
            return "555 5.5.4 BODY=8BITMIME not supported"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        hook = self._options.refuse_recipients
        refusal = hook(address) if hook is not None else None
        if refusal is not None:
            code, text = refusal
            return f"{code} {text}"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        auth_user = session.auth_data if session.authenticated else None
        transport = server.transport
        queue_id = secrets.token_hex(5).upper()
        self._inbox.deliver(
            ReceivedMessage(
                # aiosmtpd keeps the null reverse-path as "<>" (it needs a true value).
                mail_from="" if envelope.mail_from == "<>" else envelope.mail_from or "",
                rcpt_tos=tuple(envelope.rcpt_tos),
                data=envelope.original_content or b"",
                mail_options=tuple(envelope.mail_options),
                rcpt_options=tuple(envelope.rcpt_options),
                auth_user=auth_user if isinstance(auth_user, str) else None,
                tls=transport is not None and transport.get_extra_info("ssl_object") is not None,
                queue_id=queue_id,
            )
        )
        return f"250 OK: queued as {queue_id}"

    async def auth_CRAM__MD5(self, server: SMTP, args: list[str]) -> AuthResult:
        """RFC 2195: S: ``334 base64(<random.timestamp@hostname>)``, C: base64(user SP digest)."""
        if len(args) != 1:
            await server.push("501 5.5.2 CRAM-MD5 takes no initial response")
            return AuthResult(success=False, handled=True)
        challenge = f"<{secrets.randbits(48)}.{time.time_ns()}@{server.hostname}>".encode()
        response = await server.challenge_auth(challenge)
        if not isinstance(response, bytes):  # "*" or bad base64, already answered 501
            return AuthResult(success=False, handled=True)
        user = self._credentials.check_cram_md5(challenge, response)
        return AuthResult(success=user is not None, handled=False, auth_data=user)


class _Controller(Controller):
    """aiosmtpd's threaded Controller, serving a socket we bound, aborting clients on stop.

    aiosmtpd 1.4.6's own ``Controller(port=0)`` binds a free port but then connects to
    port 0 to check it started; we bind the listening socket ourselves and hand it over,
    so there is no window in which another process could take the port.
    """

    def __init__(self, handler: _Handler, listener: socket.socket, **kwargs: Any) -> None:
        host, port = listener.getsockname()[:2]
        super().__init__(handler, hostname=host, port=port, **kwargs)
        self._listener = listener
        self._sessions: weakref.WeakSet[SMTP] = weakref.WeakSet()

    def _create_server(self) -> Awaitable[asyncio.AbstractServer]:
        return self.loop.create_server(
            self._factory_invoker, sock=self._listener, ssl=self.ssl_context
        )

    def factory(self) -> SMTP:
        # Passing loop= spares aiosmtpd's make_loop(), which flips the process-wide
        # warnings filters to "error" around asyncio.get_event_loop() from this thread.
        smtp = SMTP(self.handler, loop=self.loop, **self.SMTP_kwargs)
        self._sessions.add(smtp)
        return smtp

    def cancel_tasks(self, stop_loop: bool = True) -> None:
        # Abort, not close: closing a TLS transport waits (up to 30 s) for the peer's
        # close_notify, which a client that is still connected never sends.
        for smtp in list(self._sessions):
            if isinstance(smtp.transport, asyncio.Transport):
                smtp.transport.abort()
        super().cancel_tasks(stop_loop)


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on *host*:*port* (0: a free port).

    Made with ``proto=IPPROTO_TCP`` as getaddrinfo gives it, not ``socket.create_server``
    (proto 0): asyncio only sets ``TCP_NODELAY`` on accepted sockets whose proto is
    IPPROTO_TCP, and without it every multi-line reply (aiosmtpd writes one line at a
    time) stalls some 40 ms on Nagle and the client's delayed ACK.
    """
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None,
        port,
        type=socket.SOCK_STREAM,
        proto=socket.IPPROTO_TCP,
        flags=socket.AI_PASSIVE,
    )[0]
    listener = socket.socket(family, kind, proto)
    try:
        if os.name == "posix":
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen()
    except BaseException:
        listener.close()
        raise
    return listener


def _stop_controller(controller: _Controller) -> None:
    """Stop the thread; also after a failed start, when the loop never ran or died."""
    controller.stop(no_assert=True)
    if not controller.loop.is_closed():
        controller.loop.close()


def _server_tls(directory: str, names: Iterable[str]) -> tuple[ssl.SSLContext, str]:
    """Make a throwaway CA and a server certificate; return its context and the CA file."""
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*dict.fromkeys(names)).configure_cert(context)
    ca_path = os.path.join(directory, "ca.pem")
    ca.cert_pem.write_to_path(ca_path)
    return context, ca_path


class LocalSMTPServer:
    """A throwaway ESMTP server in a background thread, recording what it receives.

    Options (all keyword-only):

    - ``host``/``port``: where to listen; port 0 picks a free port, read ``port``
      after `start`.
    - ``tls``: ``"none"``; ``"starttls"`` (RFC 3207, advertised in EHLO); or
      ``"implicit"`` (RFC 8314, TLS from the first byte). The certificate is signed by
      a throwaway CA (``ca_cert_path``) and covers ``localhost``, ``127.0.0.1``,
      ``::1`` and *hostname*.
    - ``require_tls``: before STARTTLS, every command but EHLO/NOOP/STARTTLS/QUIT
      gets ``530 Must issue a STARTTLS command first`` (needs ``tls="starttls"``).
    - ``auth_required``: ``MAIL`` before a successful AUTH gets ``530 5.7.0``.
    - ``allow_cleartext_auth``: offer and accept AUTH without TLS too; otherwise AUTH
      is only advertised under TLS and refused with ``538`` before it.
    - ``users``: name to password; None makes one user ``demo-<random>`` with a random
      password. Both may be non-ASCII (UTF-8 on the wire).
    - ``mechanisms``: advertised in this order; a subset of `MECHANISMS`.
    - ``refuse_recipients``: per-RCPT hook, e.g. ``lambda a: (550, "5.1.1 No such
      user") if a.startswith("nobody@") else None``.
    - ``size_limit``: advertised as ``SIZE`` (RFC 1870) and enforced (552), None for
      no limit.
    - ``smtputf8``/``eightbitmime``/``pipelining``: advertise SMTPUTF8 (RFC 6531),
      8BITMIME (RFC 6152), PIPELINING (RFC 2920; aiosmtpd reads commands in order, so
      a pipelined group is answered correctly, it just never advertises it).
    - ``hostname``: the name in the greeting, in EHLO and in CRAM-MD5 challenges.

    `start` returns once the server answers; `stop` (or leaving the ``with`` block)
    aborts open connections and removes the listener, the thread and the CA file.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: TLSMode = "starttls",
        require_tls: bool = False,
        auth_required: bool = False,
        allow_cleartext_auth: bool = False,
        users: Mapping[str, str] | None = None,
        mechanisms: Sequence[str] = MECHANISMS,
        refuse_recipients: RecipientHook | None = None,
        size_limit: int | None = DEFAULT_SIZE_LIMIT,
        smtputf8: bool = True,
        eightbitmime: bool = True,
        pipelining: bool = False,
        hostname: str = "localhost",
    ) -> None:
        if tls not in ("none", "starttls", "implicit"):
            raise ValueError(f"tls must be 'none', 'starttls' or 'implicit', not {tls!r}")
        if require_tls and tls == "none":
            raise ValueError("require_tls=True needs tls='starttls'")
        unknown = [m for m in mechanisms if m not in MECHANISMS]
        if unknown or len(set(mechanisms)) != len(mechanisms):
            raise ValueError(f"mechanisms must be distinct names from {MECHANISMS}")
        if size_limit is not None and size_limit <= 0:
            raise ValueError("size_limit must be positive or None")
        if users is None:
            users = {f"demo-{secrets.token_hex(4)}": secrets.token_urlsafe(16)}
        self.host = host
        self.port = port
        self.users: Mapping[str, str] = MappingProxyType(dict(users))
        self._options = _Options(
            tls=tls,
            require_tls=require_tls,
            auth_required=auth_required,
            allow_cleartext_auth=allow_cleartext_auth,
            mechanisms=tuple(mechanisms),
            refuse_recipients=refuse_recipients,
            size_limit=size_limit,
            smtputf8=smtputf8,
            eightbitmime=eightbitmime,
            pipelining=pipelining,
            hostname=hostname,
        )
        self._inbox = _Inbox()
        self.messages: list[ReceivedMessage] = self._inbox.messages
        self._ca_cert_path: str | None = None
        self._running: ExitStack | None = None

    def __repr__(self) -> str:
        state = "running" if self._running is not None else "stopped"
        return f"<LocalSMTPServer {self.host}:{self.port} tls={self._options.tls} {state}>"

    @property
    def tls(self) -> TLSMode:
        """``"none"``, ``"starttls"`` or ``"implicit"``, as configured."""
        return self._options.tls

    @property
    def ca_cert_path(self) -> str:
        """The PEM file of the CA that signed the server certificate (while running)."""
        if self._ca_cert_path is None:
            raise RuntimeError("the server is not running: call start() first")
        return self._ca_cert_path

    def client_ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts this server's CA only, hostname checked."""
        return ssl.create_default_context(cafile=self.ca_cert_path)

    def start(self) -> None:
        """Listen, start the server thread, and return once the server answers."""
        if self._running is not None:
            raise RuntimeError("the server is already running")
        options = self._options
        with ExitStack() as stack:
            temp = stack.enter_context(tempfile.TemporaryDirectory(prefix="socketmail-"))
            names = ("localhost", "127.0.0.1", "::1", options.hostname)
            tls_context, ca_cert_path = _server_tls(temp, names)
            listener = stack.enter_context(_listen(self.host, self.port))
            credentials = _Credentials(self.users)
            handler = _Handler(options, credentials, self._inbox)
            implicit = options.tls == "implicit"
            controller = _Controller(
                handler,
                listener,
                ready_timeout=READY_TIMEOUT,
                ssl_context=tls_context if implicit else None,
                server_hostname=options.hostname,
                tls_context=tls_context if options.tls == "starttls" else None,
                require_starttls=options.require_tls,
                # aiosmtpd only counts STARTTLS as TLS: under implicit TLS it would
                # refuse AUTH unless told that cleartext is fine.
                auth_require_tls=not (options.allow_cleartext_auth or implicit),
                authenticator=credentials.authenticator,
                auth_exclude_mechanism=[m for m in MECHANISMS if m not in options.mechanisms],
                data_size_limit=options.size_limit,
                enable_SMTPUTF8=options.smtputf8,
            )
            stack.callback(_stop_controller, controller)
            controller.start()
            self.port = controller.port
            self._ca_cert_path = ca_cert_path
            self._running = stack.pop_all()

    def stop(self) -> None:
        """Abort open connections, stop the thread, remove the CA file. Idempotent."""
        running, self._running = self._running, None
        self._ca_cert_path = None
        if running is not None:
            running.close()

    def __enter__(self) -> LocalSMTPServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def wait_for_messages(self, count: int, timeout: float = 5.0) -> list[ReceivedMessage]:
        """Wait until at least *count* messages arrived; return all received so far.

        Raises `TimeoutError` if fewer than *count* arrived within *timeout* seconds.
        """
        return self._inbox.wait(count, timeout)
