"""Envelope addresses: from whatever the caller passed to the ``<addr-spec>`` on the wire.

Like Django's own backend, the address is parsed with the standard library's RFC 5322
parser, must hold exactly one mailbox and no defect; a non-ASCII domain is IDNA-encoded.
A non-ASCII local part needs SMTPUTF8 (RFC 6531): the prepared address says so and the
session refuses it when the server does not offer SMTPUTF8.  CR, LF, NUL, other control
characters and angle brackets never survive into the envelope (command injection), and
the path is at most 256 octets (RFC 5321 §4.5.3.1.3).

Plain ASCII ``local@domain`` addresses, the vast majority, take a fast path that skips
the full parser.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.errors import HeaderParseError
from email.headerregistry import AddressHeader
from typing import Final

from .errors import InvalidAddressError

__all__ = ["EnvelopeAddress", "prepare_address"]

MAX_PATH_LENGTH: Final = 256

_SIMPLE: Final = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
)
_CONTROL_CHARACTER: Final = re.compile(r"[\x00-\x1f\x7f]")
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f<>]")


@dataclass(frozen=True, slots=True)
class EnvelopeAddress:
    """An address ready for ``MAIL FROM``/``RCPT TO``; ``needs_smtputf8`` if its local part is
    not ASCII."""

    addr_spec: str
    needs_smtputf8: bool = False

    def __str__(self) -> str:
        return self.addr_spec


def prepare_address(address: str) -> EnvelopeAddress:
    """Return the envelope form of ``address`` (``"Name <a@b>"`` or ``"a@b"``).

    Raises :class:`InvalidAddressError` (a ``ValueError``) naming the problem.
    """
    if not isinstance(address, str):
        address = str(address)
    if _SIMPLE.fullmatch(address):
        if len(address) > MAX_PATH_LENGTH:
            raise InvalidAddressError(f"Invalid address {address!r}: longer than 256 octets")
        return EnvelopeAddress(address)
    if _CONTROL_CHARACTER.search(address):
        raise InvalidAddressError(f"Invalid address {address!r}: contains a control character")
    try:
        parsed = AddressHeader.value_parser(address)
        defects = {str(defect) for defect in parsed.all_defects}
    except (HeaderParseError, ValueError, IndexError, AttributeError) as error:
        # The standard library's parser fails on some malformed input: IndexError for "a@"
        # before Python 3.13, AttributeError from all_defects for "a@[b" (unclosed literal).
        raise InvalidAddressError(f"Invalid address {address!r}: cannot be parsed") from error
    # Django allows local mailboxes such as "webmaster" (#15042); so do we.
    defects.discard("addr-spec local part with no domain")
    defects = {d for d in defects if "non-ASCII" not in d}
    if defects:
        raise InvalidAddressError(f"Invalid address {address!r}: {'; '.join(sorted(defects))}")
    mailboxes = parsed.all_mailboxes
    if len(mailboxes) != 1:
        raise InvalidAddressError(f"Invalid address {address!r}: must be a single address")
    mailbox = mailboxes[0]
    local, domain = mailbox.local_part, mailbox.domain
    if domain and not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError as error:
            message = f"Invalid address {address!r}: bad domain ({error})"
            raise InvalidAddressError(message) from None
    addr_spec = mailbox.addr_spec if not domain else _join(local, domain, mailbox.addr_spec)
    if _CONTROL.search(addr_spec):
        raise InvalidAddressError(f"Invalid address {address!r}: contains a control character")
    if len(addr_spec.encode("utf-8")) > MAX_PATH_LENGTH:
        raise InvalidAddressError(f"Invalid address {address!r}: longer than 256 octets")
    return EnvelopeAddress(addr_spec, needs_smtputf8=not local.isascii())


def _join(local: str, domain: str, original: str) -> str:
    """Recompose ``local@domain`` keeping the original quoting of the local part."""
    quoted_local = original.rpartition("@")[0]
    return f"{quoted_local}@{domain}"
