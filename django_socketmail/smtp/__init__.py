"""A Django-free SMTP client: sans-I/O protocol core, SASL mechanisms, one socket driver.

Importing this package never imports Django.  The pieces:

- :mod:`.reply` — reply values and the bounded parser;
- :mod:`.commands`, :mod:`.content`, :mod:`.address` — what goes on the wire, checked;
- :mod:`.protocol` — commands and bytes in, replies out, ordering rules;
- :mod:`.transaction` — the table of what every reply to a transaction means;
- :mod:`.opening`, :mod:`.engine` — the sans-I/O session: events in, actions out;
- :mod:`.sasl`, :mod:`.scram`, :mod:`.oauth`, :mod:`.secret` — PLAIN, LOGIN, CRAM-MD5,
  SCRAM-SHA-1/-256(-PLUS), XOAUTH2, OAUTHBEARER; credentials that do not print;
- :mod:`.transcript` — the redacted record of the conversation;
- :mod:`.config` — what a session is opened with and what it learned;
- :mod:`.client` — the blocking socket driver;
- :mod:`.result`, :mod:`.errors` — what the caller gets back.
"""

from __future__ import annotations

from .client import ConnectionFailedError, SMTPClient
from .config import DEFAULT_TIMEOUT, ClientConfig, SessionInfo, TLSMode
from .errors import (
    AuthenticationError,
    CleartextAuthError,
    ConnectError,
    DataError,
    HeloError,
    InvalidAddressError,
    LocalProtocolError,
    MessageTooLargeError,
    NotSupportedError,
    RecipientsRefused,
    RemoteProtocolError,
    ReplyError,
    SenderRefused,
    ServerDisconnected,
    SMTPTimeoutError,
    SocketMailError,
    TLSError,
)
from .reply import Reply, SMTPStatus
from .result import RecipientResult, RecipientStatus, SendResult, SendStatus, parse_queue_id
from .secret import Secret
from .transcript import Direction, Transcript, TranscriptLine

__all__ = [
    "DEFAULT_TIMEOUT",
    "AuthenticationError",
    "CleartextAuthError",
    "ClientConfig",
    "ConnectError",
    "ConnectionFailedError",
    "DataError",
    "Direction",
    "HeloError",
    "InvalidAddressError",
    "LocalProtocolError",
    "MessageTooLargeError",
    "NotSupportedError",
    "RecipientResult",
    "RecipientStatus",
    "RecipientsRefused",
    "RemoteProtocolError",
    "Reply",
    "ReplyError",
    "SMTPClient",
    "SMTPStatus",
    "SMTPTimeoutError",
    "Secret",
    "SendResult",
    "SendStatus",
    "SenderRefused",
    "ServerDisconnected",
    "SessionInfo",
    "SocketMailError",
    "TLSError",
    "TLSMode",
    "Transcript",
    "TranscriptLine",
    "parse_queue_id",
]
