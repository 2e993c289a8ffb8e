"""What a session is opened with (:class:`ClientConfig`) and what it learned (:class:`SessionInfo`).

Plain values shared by the engine and both drivers; nothing here does I/O.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Final

from .extensions import Extensions
from .oauth import TokenSource
from .reply import Reply
from .sasl import DEFAULT_PREFERENCE
from .secret import Secret

__all__ = ["DEFAULT_TIMEOUT", "ClientConfig", "SessionInfo", "TLSMode"]

DEFAULT_TIMEOUT: Final = 30.0
"""Seconds allowed for each reply (and each write) when the configuration gives none."""


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

    The password is held as a :class:`~.secret.Secret` (a ``str`` given is wrapped), so
    neither ``repr()`` nor a traceback's locals show it.
    """

    host: str
    port: int
    tls: TLSMode = TLSMode.NONE
    timeout: float = DEFAULT_TIMEOUT
    username: str | None = None
    password: Secret[str] | None = field(default=None, repr=False)
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
    auth_require_channel_binding: bool = False
    """When the server offers a -PLUS mechanism, use nothing else (RFC 5802 channel binding)."""
    token_provider: TokenSource | None = field(default=None, repr=False)
    """Where XOAUTH2/OAUTHBEARER get their tokens (a process-wide cache of the provider)."""

    def __post_init__(self) -> None:
        password: object = self.password
        if isinstance(password, str):
            object.__setattr__(self, "password", Secret(password) if password else None)


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
