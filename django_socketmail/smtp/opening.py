"""The opening of a session, without I/O: greeting, EHLO (or HELO), STARTTLS, AUTH.

::

    S: 220 mail.example.com ESMTP
    C: EHLO web1.example.com            (HELO if refused with 500/502/504/550)
    S: 250-mail.example.com ... 250 STARTTLS
    C: STARTTLS   /  S: 220  /  TLS handshake  /  C: EHLO again
    C: AUTH PLAIN [redacted]  /  S: 235

Rules (RFC 5321 §3.1 and §4.1.1.1, RFC 3207, RFC 4954): a greeting other than 220 ends the
session; with ``use_tls`` a server without STARTTLS gets nothing else; after a 535 no other
mechanism is tried (that is how accounts get locked), while 504/534/538 (mechanism not
available, too weak, needs encryption) move on to the next one; a mechanism that would send
the password itself is refused before TLS unless ``allow_cleartext_auth``.  Every response
sent after AUTH, in its base64 form, and the password itself are redacted from every server
line that echoes them.

SCRAM (RFC 5802): a ``235`` before the server proved it knows the password (its signature
checked) is a failure, and so is a challenge the mechanism refuses (the exchange is
cancelled with ``*``).  A ``-PLUS`` mechanism is a candidate only under TLS with the
server's certificate (:meth:`Opening.tls_established`); with the configuration's
``auth_require_channel_binding``, a server that offers a ``-PLUS`` mechanism gets no other.

OAuth 2.0 (XOAUTH2, OAUTHBEARER): with a token source (the configuration's
``token_provider``, a :class:`~.oauth.TokenSource`), the token mechanisms the server offers
and ``auth_mechanisms`` allows come first; without one they are not candidates.  When the
server refuses a token (``535``, after its error challenge was answered), the source is
asked once for a newer token and AUTH is tried once more with the same mechanism; a second
refusal is final.  Each token's forms are redacted like the password's.
"""

from __future__ import annotations

import base64
import binascii
import enum
from collections import deque
from typing import Final

from .actions import DONE, RECEIVE, START_TLS, FetchToken, Signal
from .commands import Auth, AuthCancel, AuthResponse, Command, Ehlo, Helo, StartTLS
from .config import ClientConfig, SessionInfo, TLSMode
from .errors import (
    AuthenticationError,
    CleartextAuthError,
    ConnectError,
    HeloError,
    LocalProtocolError,
    NotSupportedError,
)
from .oauth import TokenSource
from .protocol import NEED_DATA, ReplyReceived, SMTPConnection
from .reply import Reply, SMTPStatus
from .sasl import MECHANISMS, AuthContext, ChallengeRefused, Mechanism, UnexpectedChallenge
from .secret import Secret

__all__ = ["Opening"]

_EHLO_REFUSED_TRY_HELO: Final = frozenset({500, 502, 504, 550})
_MECHANISM_UNAVAILABLE: Final = frozenset({504, 534, 538})


class _Step(enum.Enum):
    GREETING = "greeting"
    HELLO = "EHLO/HELO"
    STARTTLS = "STARTTLS"
    HANDSHAKE = "handshake due"
    HANDSHAKING = "handshaking"
    AUTH = "AUTH"
    CANCELLING = "cancelling AUTH"
    DONE = "done"


class Opening:
    """Drives one session's opening; the engine asks :meth:`step` until it says DONE.

    Commands are appended to ``out`` (the engine's write queue); failures raise the
    documented errors (:class:`~.errors.ConnectError`, :class:`~.errors.HeloError`,
    :class:`~.errors.NotSupportedError`, :class:`~.errors.AuthenticationError`...).
    """

    def __init__(
        self,
        config: ClientConfig,
        conn: SMTPConnection,
        info: SessionInfo,
        local_hostname: str,
        out: list[bytes],
    ) -> None:
        self._config, self._conn, self._info = config, conn, info
        self._hostname = local_hostname
        self._out = out
        self._step = _Step.GREETING
        self._encrypted = False
        self._certificate: bytes | None = None
        self._candidates: deque[str] = deque()
        self._mechanism: Mechanism | None = None
        self._last_unavailable: Reply | None = None
        self._token: Secret[str] | None = None
        self._token_retried = False
        self._token_wanted: tuple[str, Secret[str] | None] | None = None
        """(mechanism, rejected token) while a token is asked of the driver."""
        self._token_asked = False
        self._token_error: BaseException | None = None
        self._cancel_reason = ""

    def tls_established(self, certificate: bytes | None = None) -> None:
        """The handshake is done: implicit TLS before the greeting, or after STARTTLS.
        ``certificate``: the server's certificate in DER (``getpeercert(binary_form=True)``),
        which channel binding (``SCRAM-SHA-256-PLUS``) needs."""
        self._encrypted = True
        self._certificate = certificate
        if self._step is _Step.HANDSHAKING:
            self._hello()

    def step(self) -> Signal | FetchToken | None:
        """Handle what has arrived; return RECEIVE, START_TLS, a FetchToken or DONE, or None
        once writes are queued."""
        if self._step is _Step.DONE:
            return DONE
        if self._step is _Step.HANDSHAKE:
            self._step = _Step.HANDSHAKING
            return START_TLS
        if self._step is _Step.HANDSHAKING:
            raise LocalProtocolError("the TLS handshake was not reported (tls_established)")
        if self._token_error is not None:
            error, self._token_error = self._token_error, None
            raise error
        if self._token_wanted is not None:
            if self._token_asked:
                raise LocalProtocolError("the token was not reported (token_fetched)")
            self._token_asked = True
            return FetchToken(self._token_wanted[1])
        event = self._conn.next_event()
        if event is NEED_DATA:
            return RECEIVE
        assert isinstance(event, ReplyReceived)
        self._on_reply(event.command, event.reply)
        return DONE if self.done else None

    @property
    def done(self) -> bool:
        """The session is open (and authenticated, if asked)."""
        return self._step is _Step.DONE

    def _send(self, command: Command) -> bytes:
        data = self._conn.send(command)
        self._out.append(data)
        return data

    def _on_reply(self, command: object, reply: Reply) -> None:
        code = reply.code
        if self._step is _Step.GREETING:
            self._info.greeting = reply
            if code != SMTPStatus.service_ready:
                raise ConnectError(reply, "greeting")
            self._hello()
        elif self._step is _Step.HELLO:
            if code == SMTPStatus.completed:
                self._info.extensions = self._conn.extensions
                self._after_hello()
            elif isinstance(command, Ehlo) and code in _EHLO_REFUSED_TRY_HELO:
                self._send(Helo(self._hostname))
            else:
                raise HeloError(reply, "EHLO/HELO")
        elif self._step is _Step.STARTTLS:
            if code != SMTPStatus.service_ready:
                raise NotSupportedError(f"server refused STARTTLS: {reply.one_line()}")
            self._step = _Step.HANDSHAKE
        elif self._step is _Step.AUTH:
            self._on_auth_reply(reply)
        elif self._step is _Step.CANCELLING:
            name = self._mechanism.name if self._mechanism else ""
            raise AuthenticationError(reply, f"AUTH {name}", self._cancel_reason)

    def _hello(self) -> None:
        self._step = _Step.HELLO
        self._send(Ehlo(self._hostname))

    def _after_hello(self) -> None:
        config = self._config
        if config.tls is TLSMode.STARTTLS and not self._encrypted:
            if "STARTTLS" not in self._conn.extensions:
                raise NotSupportedError(
                    f"{config.host}:{config.port} does not offer STARTTLS, and use_tls "
                    "requires it; nothing else was sent (check the port: 465 is use_ssl)"
                )
            self._step = _Step.STARTTLS
            self._send(StartTLS())
            return
        if config.username and (config.password or self._token_source() is not None):
            self._authenticate()
            return
        self._step = _Step.DONE

    def _token_source(self) -> TokenSource | None:
        source: TokenSource | None = getattr(self._config, "token_provider", None)
        return source

    # -- AUTH ------------------------------------------------------------------------------

    def _authenticate(self) -> None:
        config = self._config
        offered = self._conn.extensions.auth_mechanisms
        if not offered:
            hint = "" if self._encrypted else " before TLS; set use_tls (STARTTLS) or use_ssl"
            raise NotSupportedError(f"server does not offer AUTH{hint}")
        wanted = [name.upper() for name in config.auth_mechanisms]
        context = self._context()
        candidates = [
            name
            for name in wanted
            if name in offered and name in MECHANISMS and MECHANISMS[name].usable(context)
        ]
        source = self._token_source()
        candidates = [
            name
            for name in candidates
            if (source is not None if MECHANISMS[name].uses_token else bool(config.password))
        ]
        if source is not None:  # the token mechanisms first, in their configured order
            candidates.sort(key=lambda name: not MECHANISMS[name].uses_token)
        if getattr(config, "auth_require_channel_binding", False):
            candidates = self._bound_only(offered, candidates)
        if not candidates:
            tokens = [
                name for name in offered if name in MECHANISMS and MECHANISMS[name].uses_token
            ]
            hint = (
                f"; {'/'.join(tokens)} needs an OAuth 2.0 token: set token_provider"
                if tokens and source is None
                else ""
            )
            raise NotSupportedError(
                f"no usable AUTH mechanism: the server offers {' '.join(offered)}, "
                f"auth_mechanisms allows {' '.join(wanted) or 'none'}{hint}"
            )
        if not self._encrypted and not config.allow_cleartext_auth:
            safe = [name for name in candidates if not MECHANISMS[name].sends_password]
            if not safe:
                what = (
                    "an OAuth token"
                    if all(MECHANISMS[name].uses_token for name in candidates)
                    else "the password"
                )
                raise CleartextAuthError(
                    f"refusing to send {what} unencrypted with {'/'.join(candidates)}: "
                    "set use_tls or use_ssl, or allow_cleartext_auth=True to accept the risk"
                )
            candidates = safe
        self._candidates = deque(candidates)
        self._step = _Step.AUTH
        self._next_mechanism()

    def _context(self) -> AuthContext:
        certificate = self._certificate if self._encrypted else None
        return AuthContext(self._config.host, self._config.port, certificate)

    def _bound_only(self, offered: tuple[str, ...], candidates: list[str]) -> list[str]:
        """With ``auth_require_channel_binding``: when the server offers a -PLUS mechanism,
        only -PLUS mechanisms remain (none usable: an error naming why)."""
        plus = [name for name in offered if name.endswith("-PLUS")]
        if not plus:
            return candidates
        bound = [name for name in candidates if MECHANISMS[name].binds_channel]
        if not bound:
            why = (
                "the session is not under TLS"
                if not self._encrypted
                else "the server's certificate is not available to bind to"
                if self._certificate is None
                else "none of them is allowed by auth_mechanisms or supported"
            )
            raise NotSupportedError(
                f"the server offers {' '.join(plus)} and auth_require_channel_binding is set, "
                f"but channel binding is not possible: {why}; nothing was sent"
            )
        return bound

    def _next_mechanism(self) -> None:
        name = self._candidates.popleft()
        if MECHANISMS[name].uses_token:
            self._token_wanted = (name, None)
        else:
            assert self._config.password
            self._start(name, self._config.password)

    def token_fetched(self, token: Secret[str]) -> None:
        """The driver's answer to :class:`FetchToken`: AUTH with it."""
        if self._token_wanted is None or not self._token_asked:
            raise LocalProtocolError("no token was asked for")
        (name, _), self._token_wanted, self._token_asked = self._token_wanted, None, False
        self._token = token
        self._start(name, token)

    def token_failed(self, error: BaseException) -> None:
        """The provider raised instead: the opening fails with ``error``."""
        if self._token_wanted is None or not self._token_asked:
            raise LocalProtocolError("no token was asked for")
        self._token_wanted, self._token_asked = None, False
        self._token_error = error

    def _start(self, name: str, secret: Secret[str]) -> None:
        """Send ``AUTH name`` for the password or token ``secret``."""
        assert self._config.username
        mechanism = MECHANISMS[name](self._config.username, secret, self._context())
        self._mechanism = mechanism
        self._conn.redact(*mechanism.echo_forms())
        initial = mechanism.initial_response()
        if initial is None:
            self._send(Auth(name))
        else:
            self._send_secret(Auth(name, initial))

    def _send_secret(self, command: Auth | AuthResponse) -> None:
        line = self._send(command)
        self._conn.redact(line.rsplit(b" ", 1)[-1].strip().decode("ascii"))

    def _on_auth_reply(self, reply: Reply) -> None:
        mechanism = self._mechanism
        assert mechanism is not None
        code = reply.code
        if code == SMTPStatus.auth_continue:
            try:
                challenge = base64.b64decode(reply.lines[0].strip(), validate=True)
                response = mechanism.respond(challenge)
            except binascii.Error:
                self._cancel("the server's challenge is not valid base64")
            except UnexpectedChallenge:
                self._cancel("the server asked for an unexpected extra step")
            except ChallengeRefused as error:
                self._cancel(str(error))
            else:
                self._send_secret(AuthResponse(response))
                self._conn.redact(*mechanism.echo_forms())
            return
        if code == SMTPStatus.auth_successful:
            if not mechanism.server_verified():
                raise AuthenticationError(
                    reply,
                    f"AUTH {mechanism.name}",
                    "the server accepted us without proving that it knows the password "
                    "(no valid SCRAM server signature): treated as a failure",
                )
            self._info.auth_mechanism = mechanism.name
            self._info.auth_username = self._config.username
            self._step = _Step.DONE
            return
        if code in _MECHANISM_UNAVAILABLE:
            self._last_unavailable = reply
            if self._candidates:
                self._next_mechanism()
                return
            raise AuthenticationError(reply, "AUTH", "no offered mechanism was accepted")
        if mechanism.uses_token:
            self._token_refused(mechanism, reply)
            return
        # 535 and everything else: never try another mechanism (account lock-out).
        raise AuthenticationError(reply, f"AUTH {mechanism.name}")

    def _token_refused(self, mechanism: Mechanism, reply: Reply) -> None:
        """A token was refused: on the first 535, a newer token and one more AUTH."""
        said = getattr(mechanism, "error", "")
        if reply.code == SMTPStatus.auth_failed and not self._token_retried:
            self._token_retried = True
            self._conn.transcript.info(
                "the server refused the OAuth token"
                + (f" ({said})" if said else "")
                + "; asking the token provider for a new one and trying AUTH once more"
            )
            self._token_wanted = (mechanism.name, self._token)
            return
        note = "the OAuth token was refused" + (f" ({said})" if said else "")
        if self._token_retried:
            note += ", also after a refresh"
        raise AuthenticationError(reply, f"AUTH {mechanism.name}", note)

    def _cancel(self, why: str) -> None:
        self._cancel_reason = f"{why}; exchange cancelled"
        self._step = _Step.CANCELLING
        self._send(AuthCancel())
