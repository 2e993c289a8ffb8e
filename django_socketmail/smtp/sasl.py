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
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from abc import ABC, abstractmethod
from typing import ClassVar, Final

from .secret import Secret

__all__ = ["MECHANISMS", "CramMD5", "Login", "Mechanism", "Plain", "UnexpectedChallenge"]


class UnexpectedChallenge(Exception):
    """The server sent a challenge the mechanism has no answer for (an extra step)."""


class Mechanism(ABC):
    """One authentication exchange.  Subclasses set ``name`` and ``sends_password``."""

    name: ClassVar[str]
    sends_password: ClassVar[bool]
    """True if the password itself crosses the wire (only acceptable under TLS)."""

    def __init__(self, username: str, password: Secret[str]) -> None:
        self._username = username.encode("utf-8")
        self._password = password
        self._step = 0

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>"

    def initial_response(self) -> Secret[bytes] | None:
        """The response sent with the AUTH command itself, or None to wait for a challenge."""
        return None

    def respond(self, challenge: bytes) -> Secret[bytes]:
        """Return the answer to the decoded ``challenge``; raise :class:`UnexpectedChallenge`
        when the exchange should have been over."""
        self._step += 1
        return Secret(self._respond(self._step, challenge))

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


MECHANISMS: Final[dict[str, type[Mechanism]]] = {cls.name: cls for cls in (CramMD5, Plain, Login)}
"""Every supported mechanism by its IANA name."""

DEFAULT_PREFERENCE: Final = ("CRAM-MD5", "PLAIN", "LOGIN")
"""The order mechanisms are tried in when the configuration does not say."""
