"""SASL mechanisms for SMTP AUTH (RFC 4954), one small class each, named as IANA names them.

A mechanism turns server challenges into client responses; it never touches the network
and never base64-encodes (the command does that, see :mod:`.commands`).  Credentials are
UTF-8 before base64.  The password arrives as a :class:`~.secret.Secret` and every response
leaves as one: the plain bytes exist only inside the mechanism's own methods.

- ``PLAIN`` (RFC 4616): ``authzid NUL authcid NUL passwd`` as the initial response.
- ``LOGIN`` (draft-murchison-sasl-login): the user name, then the password, answered by the
  order of the challenges and never by their text, which servers vary.
- ``CRAM-MD5`` (RFC 2195): ``user SP hex(HMAC-MD5(password, challenge))``; the password
  never crosses the wire, which is why it is allowed without TLS.
- ``SCRAM-SHA-256``, ``SCRAM-SHA-1`` (RFC 7677, RFC 5802; see :mod:`.scram`): the password
  never crosses the wire and the server proves it knows it; allowed without TLS.
  ``SCRAM-SHA-256-PLUS`` also binds the exchange to the TLS channel
  (``tls-server-end-point``), so it is offered only under TLS with the server's certificate.
- ``XOAUTH2`` (Google, Microsoft) and ``OAUTHBEARER`` (RFC 7628): an OAuth 2.0 bearer token
  from a token source instead of the password (``uses_token``).  A token is as good as a
  password to whoever reads it, so both need TLS like PLAIN.  On a bad token the server
  sends a ``334`` with a base64 JSON error; the answer is an empty line (XOAUTH2) or the
  byte ``\x01`` (OAUTHBEARER, RFC 7628 §3.2.3), then the server sends its ``535``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar, Final

from .oauth import describe_error_challenge
from .scram import ScramClient, ScramError, tls_server_end_point
from .secret import Secret

__all__ = [
    "DEFAULT_PREFERENCE",
    "MECHANISMS",
    "AuthContext",
    "ChallengeRefused",
    "CramMD5",
    "Login",
    "Mechanism",
    "OAuthBearer",
    "Plain",
    "ScramSHA1",
    "ScramSHA256",
    "ScramSHA256Plus",
    "UnexpectedChallenge",
    "XOAuth2",
]


class UnexpectedChallenge(Exception):
    """The server sent a challenge the mechanism has no answer for (an extra step)."""


class ChallengeRefused(Exception):
    """The server's challenge is unacceptable (a SCRAM nonce that does not extend ours, a
    wrong server signature...): the exchange is cancelled.  The text is safe to show."""


@dataclass(frozen=True, slots=True)
class AuthContext:
    """What a mechanism may need besides the credentials: the server as configured (for
    OAUTHBEARER's ``host``/``port``) and, under TLS, the server's certificate (DER, for
    channel binding)."""

    host: str = ""
    port: int = 0
    certificate: bytes | None = field(default=None, repr=False)


class Mechanism(ABC):
    """One authentication exchange.  Subclasses set ``name`` and ``sends_password``."""

    name: ClassVar[str]
    sends_password: ClassVar[bool]
    """True if the password itself crosses the wire (only acceptable under TLS)."""
    binds_channel: ClassVar[bool] = False
    """True for a -PLUS mechanism: usable only under TLS with the server's certificate."""
    uses_token: ClassVar[bool] = False
    """True when the secret is an OAuth 2.0 bearer token, not the password."""

    def __init__(
        self, username: str, password: Secret[str], context: AuthContext | None = None
    ) -> None:
        self._username = username.encode("utf-8")
        self._password = password
        self._context = context or AuthContext()
        self._step = 0

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>"

    def initial_response(self) -> Secret[bytes] | None:
        """The response sent with the AUTH command itself, or None to wait for a challenge."""
        return None

    @classmethod
    def usable(cls, context: AuthContext) -> bool:
        """Whether this mechanism can run in ``context`` (a -PLUS one needs a certificate
        whose binding can be computed)."""
        return True

    def respond(self, challenge: bytes) -> Secret[bytes]:
        """Return the answer to the decoded ``challenge``; raise :class:`UnexpectedChallenge`
        when the exchange should have been over, :class:`ChallengeRefused` when the
        challenge is unacceptable."""
        self._step += 1
        return Secret(self._respond(self._step, challenge))

    def server_verified(self) -> bool:
        """Whether the exchange is complete on our side: False while a mechanism that
        authenticates the server (SCRAM) has not checked the server's proof, so a ``235``
        before that proof is a failure."""
        return True

    def echo_forms(self) -> tuple[str, ...]:
        """The password as a server might echo it back (raw, base64): redacted from every
        server line.  The base64 of each response is redacted by the session as it sends it."""
        password = self._password.reveal()
        return (password, base64.b64encode(password.encode("utf-8")).decode("ascii"))

    def _secret(self) -> bytes:
        return self._password.reveal().encode("utf-8")

    @abstractmethod
    def _respond(self, step: int, challenge: bytes) -> bytes: ...


class Plain(Mechanism):
    """RFC 4616 PLAIN: sent as the initial response, or after an empty ``334``."""

    name: ClassVar[str] = "PLAIN"
    sends_password: ClassVar[bool] = True

    def _message(self) -> bytes:
        return b"\0" + self._username + b"\0" + self._secret()

    def initial_response(self) -> Secret[bytes] | None:
        self._step = 1
        return Secret(self._message())

    def _respond(self, step: int, challenge: bytes) -> bytes:
        # A server that ignored the initial response asks with an empty challenge.
        if challenge == b"" and step <= 2:
            return self._message()
        raise UnexpectedChallenge(self.name)


class Login(Mechanism):
    """LOGIN: first challenge gets the user name, second the password, by order."""

    name: ClassVar[str] = "LOGIN"
    sends_password: ClassVar[bool] = True

    def _respond(self, step: int, challenge: bytes) -> bytes:
        if step == 1:
            return self._username
        if step == 2:
            return self._secret()
        raise UnexpectedChallenge(self.name)


class CramMD5(Mechanism):
    """RFC 2195 CRAM-MD5: one challenge, one keyed-digest response."""

    name: ClassVar[str] = "CRAM-MD5"
    sends_password: ClassVar[bool] = False

    def _respond(self, step: int, challenge: bytes) -> bytes:
        if step != 1:
            raise UnexpectedChallenge(self.name)
        digest = hmac.new(self._secret(), challenge, hashlib.md5).hexdigest()
        self._digest = digest
        return self._username + b" " + digest.encode("ascii")

    def echo_forms(self) -> tuple[str, ...]:
        digest = getattr(self, "_digest", None)
        return (*super().echo_forms(), *([digest] if digest else []))


class _Scram(Mechanism):
    """SCRAM (RFC 5802 §5): client-first as the initial response, client-final for the
    server-first challenge, an empty line once the server's signature is verified."""

    hash_name: ClassVar[str]
    sends_password: ClassVar[bool] = False

    def __init__(
        self, username: str, password: Secret[str], context: AuthContext | None = None
    ) -> None:
        super().__init__(username, password, context)
        certificate = self._context.certificate
        binding = tls_server_end_point(certificate) if certificate else None
        self._client = ScramClient(
            self.hash_name,
            username,
            password,
            binding=binding if self.binds_channel else None,
            binding_possible=binding is not None,
        )

    @classmethod
    def usable(cls, context: AuthContext) -> bool:
        if not cls.binds_channel:
            return True
        return context.certificate is not None and (
            tls_server_end_point(context.certificate) is not None
        )

    def initial_response(self) -> Secret[bytes] | None:
        return Secret(self._client.first())

    def _respond(self, step: int, challenge: bytes) -> bytes:
        try:
            if step == 1:
                return self._client.final(challenge)
            if step == 2:
                self._client.verify(challenge)
                return b""
        except ScramError as error:
            raise ChallengeRefused(str(error)) from None
        raise UnexpectedChallenge(self.name)

    def server_verified(self) -> bool:
        return self._client.verified

    def echo_forms(self) -> tuple[str, ...]:
        proof = self._client.proof
        return (*super().echo_forms(), *([proof] if proof else []))


class ScramSHA1(_Scram):
    """SCRAM-SHA-1 (RFC 5802)."""

    name: ClassVar[str] = "SCRAM-SHA-1"
    hash_name: ClassVar[str] = "sha1"


class ScramSHA256(_Scram):
    """SCRAM-SHA-256 (RFC 7677)."""

    name: ClassVar[str] = "SCRAM-SHA-256"
    hash_name: ClassVar[str] = "sha256"


class ScramSHA256Plus(ScramSHA256):
    """SCRAM-SHA-256-PLUS (RFC 7677) with ``tls-server-end-point`` (RFC 5929 §4)."""

    name: ClassVar[str] = "SCRAM-SHA-256-PLUS"
    binds_channel: ClassVar[bool] = True


class _Bearer(Mechanism):
    """An OAuth 2.0 bearer token as the initial response; one error challenge answered."""

    sends_password: ClassVar[bool] = True  # a bearer token is a credential: TLS only
    uses_token: ClassVar[bool] = True
    error_answer: ClassVar[bytes]
    """What answers the server's error challenge."""

    error: str = ""
    """What the server's error challenge said (status, scope), for the AuthenticationError."""

    def _respond(self, step: int, challenge: bytes) -> bytes:
        if step == 1:
            self.error = describe_error_challenge(challenge)
            return self.error_answer
        raise UnexpectedChallenge(self.name)  # a second challenge: cancel, never loop


class XOAuth2(_Bearer):
    """XOAUTH2 (Google's and Microsoft's): ``user=U ^A auth=Bearer T ^A ^A``."""

    name: ClassVar[str] = "XOAUTH2"
    error_answer: ClassVar[bytes] = b""

    def initial_response(self) -> Secret[bytes] | None:
        self._step = 0
        token = self._secret()
        return Secret(b"user=" + self._username + b"\x01auth=Bearer " + token + b"\x01\x01")


class OAuthBearer(_Bearer):
    """OAUTHBEARER (RFC 7628 §3.1): a gs2 header naming the user (``=`` and ``,`` escaped
    as in RFC 5802), then ``host``, ``port`` and ``auth`` key-value pairs."""

    name: ClassVar[str] = "OAUTHBEARER"
    error_answer: ClassVar[bytes] = b"\x01"

    def initial_response(self) -> Secret[bytes] | None:
        self._step = 0
        user = self._username.replace(b"=", b"=3D").replace(b",", b"=2C")
        context = self._context
        return Secret(
            b"n,a=" + user + b",\x01host=" + context.host.encode("utf-8")
            + b"\x01port=" + str(context.port).encode("ascii")
            + b"\x01auth=Bearer " + self._secret() + b"\x01\x01"
        )  # fmt: skip


MECHANISMS: Final[dict[str, type[Mechanism]]] = {
    cls.name: cls
    for cls in (
        ScramSHA256Plus,
        ScramSHA256,
        ScramSHA1,
        CramMD5,
        Plain,
        Login,
        XOAuth2,
        OAuthBearer,
    )
}
"""Every supported mechanism by its IANA name."""

DEFAULT_PREFERENCE: Final = (
    "SCRAM-SHA-256-PLUS",
    "SCRAM-SHA-256",
    "SCRAM-SHA-1",
    "CRAM-MD5",
    "PLAIN",
    "LOGIN",
    "XOAUTH2",
    "OAUTHBEARER",
)
"""The order mechanisms are tried in when the configuration does not say.  With a token
source, the token mechanisms (XOAUTH2, OAUTHBEARER) the server offers go first; without one
they are never candidates, and without a password the others are not."""
