"""Per-message delivery options: DSN (RFC 3461), REQUIRETLS (RFC 8689), envelope sender.

:class:`DeliveryOptions` says what one message asks of the server; :func:`mail_and_rcpt`
turns it into MAIL FROM and RCPT TO parameters for what this server offers:

- DSN (RFC 3461 §4): ``RET=FULL|HDRS`` and ``ENVID=<xtext>`` on MAIL, ``NOTIFY=...`` and
  ``ORCPT=rfc822;<xtext>`` on each RCPT.  Sent only when the server advertised ``DSN``;
  without it the message goes without them (the server then applies its own default
  notifications) and the result says so (``dsn_sent`` False).
- REQUIRETLS (RFC 8689 §4.1): the ``REQUIRETLS`` MAIL parameter, only over TLS to a server
  that advertised it; otherwise the message is not sent (:class:`~.errors.NotSupportedError`).
- An envelope sender other than the ``From`` header (bounces go there): only the MAIL FROM
  address changes.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

from .errors import NotSupportedError
from .extensions import Extensions

__all__ = ["NOTIFY_VALUES", "DeliveryOptions", "MailParameters", "mail_and_rcpt", "xtext"]

NOTIFY_VALUES: Final = frozenset({"NEVER", "SUCCESS", "FAILURE", "DELAY"})
MAX_ENVID: Final = 100
"""RFC 3461 §4.4: ENVID is at most 100 characters (of xtext)."""

_XCHAR: Final = re.compile(r"[!-*,-<>-~]")
"""xtext's characters that stand for themselves: '!'..'~' but '+' and '=' (RFC 3461 §4)."""


def xtext(value: str) -> str:
    """``value`` encoded as RFC 3461 xtext: ``+XX`` (upper-case hex) for ``+``, ``=`` and
    every byte outside ``!``..``~`` of its UTF-8 form."""
    return "".join(
        chr(byte) if _XCHAR.fullmatch(chr(byte)) else f"+{byte:02X}"
        for byte in value.encode("utf-8")
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class DeliveryOptions:
    """What one message asks of the server beyond plain delivery.

    Set as ``message.socketmail_delivery`` (or per mailer with the ``delivery`` option).
    ``notify``: ``("NEVER",)`` or any of ``SUCCESS``, ``FAILURE``, ``DELAY``; ``ret``:
    ``"FULL"`` or ``"HDRS"``; ``envid``: the envelope id a DSN carries back (``"auto"``:
    a fresh random one per message, recorded on its result and audit row); ``orcpt``:
    send each recipient's original address; ``require_tls``: REQUIRETLS; ``envelope_sender``:
    the MAIL FROM address, when it is not the ``From`` header's.
    """

    notify: tuple[str, ...] | None = None
    ret: Literal["FULL", "HDRS"] | None = None
    envid: str | None = None
    orcpt: bool = False
    require_tls: bool = False
    envelope_sender: str | None = None

    def __post_init__(self) -> None:
        if self.notify is not None:
            notify = tuple(value.upper() for value in self.notify)
            if not notify or not set(notify) <= NOTIFY_VALUES:
                raise ValueError(
                    f"notify must be NEVER or SUCCESS/FAILURE/DELAY, not {self.notify}"
                )
            if "NEVER" in notify and len(notify) > 1:
                raise ValueError("notify=NEVER cannot be combined with other values")
            object.__setattr__(self, "notify", notify)
        if self.ret is not None and self.ret not in ("FULL", "HDRS"):
            raise ValueError(f"ret must be 'FULL' or 'HDRS', not {self.ret!r}")
        if self.envid is not None and self.envid != "auto" and len(xtext(self.envid)) > MAX_ENVID:
            raise ValueError(f"envid is longer than {MAX_ENVID} characters once encoded")

    @property
    def wants_dsn(self) -> bool:
        return bool(self.notify or self.ret or self.envid or self.orcpt)


@dataclass(frozen=True, slots=True)
class MailParameters:
    """The DSN and REQUIRETLS parameters of one message, for what the server offers."""

    mail: tuple[str, ...]
    rcpt: dict[str, tuple[str, ...]]
    envid: str | None
    dsn_sent: bool


def mail_and_rcpt(
    options: DeliveryOptions | None,
    extensions: Extensions,
    recipients: Sequence[str],
    *,
    encrypted: bool,
) -> MailParameters:
    """The MAIL and per-recipient RCPT parameters ``options`` ask for; raises
    :class:`~.errors.NotSupportedError` when REQUIRETLS cannot be honoured."""
    if options is None:
        return MailParameters((), {}, None, False)
    mail: list[str] = []
    if options.require_tls:
        if not encrypted:
            raise NotSupportedError(
                "REQUIRETLS was asked for but the session is not encrypted (set use_tls or "
                "use_ssl); the message was not sent"
            )
        if "REQUIRETLS" not in extensions:
            raise NotSupportedError(
                "REQUIRETLS was asked for but the server does not offer it (RFC 8689); the "
                "message was not sent"
            )
        mail.append("REQUIRETLS")
    if not options.wants_dsn or "DSN" not in extensions:
        return MailParameters(tuple(mail), {}, None, False)
    envid = uuid.uuid4().hex if options.envid == "auto" else options.envid
    if options.ret:
        mail.append(f"RET={options.ret}")
    if envid:
        mail.append(f"ENVID={xtext(envid)}")
    rcpt: dict[str, tuple[str, ...]] = {}
    for address in recipients:
        params = []
        if options.notify:
            params.append("NOTIFY=" + ",".join(options.notify))
        if options.orcpt and address.isascii():  # (RFC 6533's utf-8 form is not written)
            params.append(f"ORCPT=rfc822;{xtext(address)}")
        rcpt[address] = tuple(params)
    return MailParameters(tuple(mail), rcpt, envid, True)
