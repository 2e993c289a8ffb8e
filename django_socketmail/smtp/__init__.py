"""A Django-free SMTP client: sans-I/O protocol core, SASL mechanisms, one socket driver.

Importing this package never imports Django.  The pieces:

- :mod:`.reply` — reply values and the bounded parser;
- :mod:`.commands`, :mod:`.content`, :mod:`.address` — what goes on the wire, checked;
- :mod:`.protocol` — the session core: commands and bytes in, replies out;
- :mod:`.sasl` — PLAIN, LOGIN, CRAM-MD5;
- :mod:`.transcript` — the redacted record of the conversation;
- :mod:`.client` — the blocking socket driver;
- :mod:`.result`, :mod:`.errors` — what the caller gets back.
"""

from __future__ import annotations

from .client import (
    DEFAULT_TIMEOUT,
    ClientConfig,
    ConnectionFailedError,
    SessionInfo,
    SMTPClient,
    TLSMode,
)
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
