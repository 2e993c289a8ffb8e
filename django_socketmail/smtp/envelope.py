"""A message's envelope, checked against what the server offers (RFC 5321 §4.1.1.2,
RFC 1870 SIZE, RFC 6152 8BITMIME, RFC 6531 SMTPUTF8), made into a :class:`Transaction`."""

from __future__ import annotations

from collections.abc import Sequence

from .address import EnvelopeAddress, prepare_address
from .content import Content, has_8bit, split_canonical
from .delivery import DeliveryOptions, mail_and_rcpt
from .errors import MessageTooLargeError, NotSupportedError, SocketMailError
from .extensions import Extensions
from .result import RecipientResult, SendResult
from .transaction import Transaction

__all__ = ["mail_parameters", "prepare"]


def prepare(
    extensions: Extensions,
    mail_from: str,
    recipients: Sequence[str],
    message: Content,
    delivery: DeliveryOptions | None = None,
    *,
    encrypted: bool = False,
) -> Transaction:
    """Check one message against the server's ``extensions`` and build its transaction.

    Raises :class:`~.errors.InvalidAddressError` for an unusable address (before any byte is
    sent).  A message this server cannot take (SMTPUTF8 not offered, larger than SIZE,
    REQUIRETLS asked for and not possible) comes back already failed:
    ``transaction.result.error`` is set.  ``delivery.envelope_sender``, when set, is the
    MAIL FROM address instead of ``mail_from``.
    """
    if delivery is not None and delivery.envelope_sender:
        mail_from = delivery.envelope_sender
    sender = prepare_address(mail_from)
    envelope = [prepare_address(address) for address in recipients]
    result = SendResult(
        sender.addr_spec, [RecipientResult(r.addr_spec) for r in dict.fromkeys(envelope)]
    )
    content, tail = split_canonical(message)
    result.size = sum(map(len, content)) + len(tail)
    lines = sum(part.count(b"\n") for part in content) + len(tail) // 2
    tx = Transaction(result, sender.addr_spec, (), list(result.recipients), content, lines, tail)
    try:
        tx.parameters = mail_parameters(extensions, sender, envelope, content, result.size)
        extra = mail_and_rcpt(
            delivery, extensions, [r.address for r in result.recipients], encrypted=encrypted
        )
    except SocketMailError as error:
        result.fail(error)
        return tx
    tx.parameters += extra.mail
    tx.rcpt_parameters = extra.rcpt
    result.envid, result.dsn_sent = extra.envid, extra.dsn_sent
    return tx


def mail_parameters(
    extensions: Extensions,
    sender: EnvelopeAddress,
    envelope: list[EnvelopeAddress],
    content: Sequence[bytes],
    size: int,
) -> tuple[str, ...]:
    """The MAIL FROM parameters for this message; raises when the server cannot take it."""
    smtputf8 = any(a.needs_smtputf8 for a in (sender, *envelope))
    if smtputf8 and "SMTPUTF8" not in extensions:
        needing = next(a for a in (sender, *envelope) if a.needs_smtputf8)
        raise NotSupportedError(
            f"{needing} has a non-ASCII local part and the server does not offer SMTPUTF8"
        )
    limit = extensions.size_limit
    if limit is not None and size > limit:
        raise MessageTooLargeError(size, limit)
    parameters = []
    if "SIZE" in extensions:
        parameters.append(f"SIZE={size}")
    if "8BITMIME" in extensions and has_8bit(content):
        parameters.append("BODY=8BITMIME")
    if smtputf8:
        parameters.append("SMTPUTF8")
    return tuple(parameters)
