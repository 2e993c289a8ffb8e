"""Envelope addresses: from whatever the caller passed to the ``<addr-spec>`` on the wire.

Like Django's own backend, the address is parsed with the standard library's RFC 5322
parser, must hold exactly one mailbox and no defect.  A non-ASCII domain is encoded with
IDNA 2008 (RFC 5891-5893) after the UTS #46 mapping, non-transitional: ``faß.example``
becomes ``xn--fa-hia.example``, where Python's ``"idna"`` codec (IDNA 2003, which Django's
backend uses) gives ``fass.example``, another domain.  Only the standard library is used
(:func:`derived_property` computes RFC 5892's table from :mod:`unicodedata`); what it cannot
decide with certainty is refused with a message naming the domain rather than guessed.
A non-ASCII local part needs SMTPUTF8 (RFC 6531): the prepared address says so and the
session refuses it when the server does not offer SMTPUTF8.  CR, LF, NUL, other control
characters (C1 too), line separators, bidirectional overrides and angle brackets never
survive into the envelope (command injection), and the path is at most 256 octets
(RFC 5321 §4.5.3.1.3).

Plain ASCII ``local@domain`` addresses, the vast majority, take a fast path that skips
the full parser.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass
from email.errors import HeaderParseError
from email.headerregistry import AddressHeader
from typing import Final, Literal

from .errors import InvalidAddressError

__all__ = ["EnvelopeAddress", "derived_property", "idna_encode_domain", "prepare_address"]

MAX_PATH_LENGTH: Final = 256
MAX_LABEL_LENGTH: Final = 63
"""RFC 1035 §2.3.4 / RFC 5890 §2.3.2.1: octets in one label (its A-label form)."""
MAX_DOMAIN_LENGTH: Final = 253
"""RFC 1035 §3.1: 255 octets on the wire, so 253 in text without the root dot."""

_SIMPLE: Final = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
)
_CONTROL_CHARACTER: Final = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]"
)
"""C0, DEL, C1, line and paragraph separators, bidirectional marks, overrides, isolates."""
_CONTROL: Final = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069<>]")


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
            domain = idna_encode_domain(domain)
        except _IDNAError as error:
            message = f"Invalid address {address!r}: domain {domain!r} {error}"
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


# -- IDNA 2008 with the UTS #46 mapping, from the standard library ---------------------------

Property = Literal["PVALID", "CONTEXTJ", "CONTEXTO", "DISALLOWED", "UNASSIGNED"]

_Ranges = tuple[tuple[int, int], ...]

_EXCEPTIONS: Final[dict[int, Property]] = {
    **dict.fromkeys([0x00DF, 0x03C2, 0x06FD, 0x06FE, 0x0F0B, 0x3007], "PVALID"),
    **dict.fromkeys(
        [0x00B7, 0x0375, 0x05F3, 0x05F4, 0x30FB, *range(0x0660, 0x066A), *range(0x06F0, 0x06FA)],
        "CONTEXTO",
    ),
    **dict.fromkeys([0x0640, 0x07FA, 0x302E, 0x302F, *range(0x3031, 0x3036), 0x303B], "DISALLOWED"),
}
"""RFC 5892 §2.6, category F.  (Category G, BackwardCompatible, is empty.)"""

_IGNORABLE_PROPERTIES: Final[_Ranges] = (
    # Default_Ignorable_Code_Point (DerivedCoreProperties.txt)
    (0x00AD, 0x00AD), (0x034F, 0x034F), (0x061C, 0x061C), (0x115F, 0x1160),
    (0x17B4, 0x17B5), (0x180B, 0x180F), (0x200B, 0x200F), (0x202A, 0x202E),
    (0x2060, 0x206F), (0x3164, 0x3164), (0xFE00, 0xFE0F), (0xFEFF, 0xFEFF),
    (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8), (0x1BCA0, 0x1BCA3), (0x1D173, 0x1D17A),
    (0xE0000, 0xE0FFF),
    # White_Space (PropList.txt)
    (0x0009, 0x000D), (0x0020, 0x0020), (0x0085, 0x0085), (0x00A0, 0x00A0),
    (0x1680, 0x1680), (0x2000, 0x200A), (0x2028, 0x2029), (0x202F, 0x202F),
    (0x205F, 0x205F), (0x3000, 0x3000),
    # Noncharacter_Code_Point: U+FDD0..U+FDEF here, U+xxFFFE/U+xxFFFF in _noncharacter()
    (0xFDD0, 0xFDEF),
)  # fmt: skip
"""RFC 5892 §2.3, category C: the properties :mod:`unicodedata` does not expose."""

_IGNORABLE_BLOCKS: Final[_Ranges] = ((0x20D0, 0x20FF), (0x1D100, 0x1D1FF), (0x1D200, 0x1D24F))
"""RFC 5892 §2.4, category D: Combining Diacritical Marks for Symbols, Musical Symbols,
Ancient Greek Musical Notation."""

_OLD_HANGUL_JAMO: Final[_Ranges] = (
    (0x1100, 0x115F), (0xA960, 0xA97C),  # Hangul_Syllable_Type L
    (0x1160, 0x11A7), (0xD7B0, 0xD7C6),  # V
    (0x11A8, 0x11FF), (0xD7CB, 0xD7FB),  # T
)  # fmt: skip
"""RFC 5892 §2.9, category I."""

_LETTER_DIGITS: Final = frozenset({"Ll", "Lu", "Lo", "Nd", "Lm", "Mn", "Mc"})
"""RFC 5892 §2.1, category A."""

_LDH: Final = frozenset("-0123456789abcdefghijklmnopqrstuvwxyz")
_VIRAMA: Final = 9
"""Canonical_Combining_Class of a virama (RFC 5892 Appendix A.1, A.2)."""
_RTL: Final = frozenset({"R", "AL", "AN"})


class _IDNAError(ValueError):
    """Why a domain cannot be encoded; :func:`prepare_address` adds the address."""


def _within(cp: int, ranges: _Ranges) -> bool:
    return any(start <= cp <= end for start, end in ranges)


def _noncharacter(cp: int) -> bool:
    return 0xFDD0 <= cp <= 0xFDEF or cp & 0xFFFE == 0xFFFE


def _nfkc(text: str) -> str:
    return unicodedata.normalize("NFKC", text)


@functools.lru_cache(maxsize=4096)
def derived_property(char: str) -> Property:
    """RFC 5892 §3: the IDNA 2008 property of one code point, from :mod:`unicodedata`.

    The Unicode version is this Python's (``unicodedata.unidata_version``): a code point it
    does not know is ``UNASSIGNED``.  A test compares the result for every code point with
    the table of the ``idna`` package.
    """
    cp = ord(char)
    if cp in _EXCEPTIONS:
        return _EXCEPTIONS[cp]
    category = unicodedata.category(char)
    if category == "Cn" and not _noncharacter(cp):
        return "UNASSIGNED"
    if char in _LDH:
        return "PVALID"
    if cp in (0x200C, 0x200D):
        return "CONTEXTJ"
    if _nfkc(_nfkc(char).casefold()) != char:  # Unstable, category B
        return "DISALLOWED"
    if _noncharacter(cp) or _within(cp, _IGNORABLE_PROPERTIES):
        return "DISALLOWED"
    if _within(cp, _IGNORABLE_BLOCKS) or _within(cp, _OLD_HANGUL_JAMO):
        return "DISALLOWED"
    return "PVALID" if category in _LETTER_DIGITS else "DISALLOWED"


def _describe(char: str) -> str:
    return f"U+{ord(char):04X} {unicodedata.name(char, 'unnamed')}"


def _map_label(label: str) -> str:
    """UTS #46 §4 mapping, non-transitional, for what the standard library can map exactly.

    Valid code points stay (``ß``, final sigma); another one is replaced by its NFKC case
    fold (``Ü`` -> ``ü``, capital sigma -> sigma, full-width A -> ``a``) when its lower-case
    form agrees with it.  Where they disagree (``ẞ``: ``ß`` or ``ss``? UTS #46 versions
    differ), or where UTS #46 would drop the code point (soft hyphen), the label is refused.
    """
    mapped = []
    for char in unicodedata.normalize("NFC", label):
        if derived_property(char) != "DISALLOWED" and derived_property(char) != "UNASSIGNED":
            mapped.append(char)
            continue
        folded = _nfkc(_nfkc(char).casefold())
        if folded == char:
            raise _IDNAError(_refusal(char))
        if folded != _nfkc(_nfkc(char).lower()):
            raise _IDNAError(
                f"holds {_describe(char)}, which IDNA 2008 does not allow and whose UTS #46 "
                "mapping the standard library cannot tell for certain: write the domain "
                "in lower case"
            )
        mapped.append(folded)
    return unicodedata.normalize("NFC", "".join(mapped))


def _refusal(char: str) -> str:
    if derived_property(char) == "UNASSIGNED":
        version = unicodedata.unidata_version
        return f"holds {_describe(char)}, unassigned in Unicode {version} (this Python's)"
    return f"holds {_describe(char)}, which IDNA 2008 does not allow (RFC 5892)"


def _check_context(label: str, index: int) -> None:
    """RFC 5892 Appendix A: the rule of a CONTEXTJ or CONTEXTO code point, or refuse."""
    char = label[index]
    before = label[index - 1] if index > 0 else ""
    after = label[index + 1] if index + 1 < len(label) else ""
    cp = ord(char)
    if cp == 0x200D or cp == 0x200C:  # A.1, A.2: after a virama
        if before and unicodedata.combining(before) == _VIRAMA:
            return
        if cp == 0x200C:
            raise _IDNAError(
                f"holds {_describe(char)} not after a virama; its other rule (RFC 5892 "
                "A.1) needs Joining_Type data that the standard library does not have"
            )
    elif cp == 0x00B7:  # A.3: between two l
        if before == "l" and after == "l":
            return
    elif cp == 0x0375:  # A.4: followed by Greek
        if after and unicodedata.name(after, "").startswith("GREEK ") and after != char:
            return
    elif cp in (0x05F3, 0x05F4):  # A.5, A.6: after Hebrew
        if before and unicodedata.name(before, "").startswith("HEBREW "):
            return
    elif cp == 0x30FB:  # A.7: in a label with Hiragana, Katakana or Han
        if any(_japanese(other) for other in label):
            return
    elif 0x0660 <= cp <= 0x0669 or 0x06F0 <= cp <= 0x06F9:
        # A.8, A.9: Arabic-Indic digits and Extended Arabic-Indic digits never together
        other_kind = range(0x06F0, 0x06FA) if cp <= 0x0669 else range(0x0660, 0x066A)
        if not any(ord(other) in other_kind for other in label):
            return
    raise _IDNAError(f"holds {_describe(char)} where its rule (RFC 5892 Appendix A) forbids it")


def _japanese(char: str) -> bool:
    """Hiragana, Katakana or Han, from the character's name (what the standard library has).

    A character this misses makes the label refused, never wrongly accepted: a test checks
    against the ``idna`` package that every character it accepts has one of those scripts.
    """
    if char in "\u3005\u3007":
        return True
    name = unicodedata.name(char, "")
    return name.startswith(("HIRAGANA LETTER ", "KATAKANA LETTER ", "CJK UNIFIED IDEOGRAPH-"))


def _check_label(label: str) -> None:
    """RFC 5891 §5.4 (and §4.2.3): a U-label's code points, hyphens and first character."""
    if label.startswith("-") or label.endswith("-"):
        raise _IDNAError(f"has a label {label!r} that starts or ends with a hyphen")
    if label[2:4] == "--":
        raise _IDNAError(f"has a label {label!r} with hyphens in its 3rd and 4th positions")
    if unicodedata.category(label[0]).startswith("M"):
        raise _IDNAError(f"has a label {label!r} that starts with a combining mark")
    for index, char in enumerate(label):
        kind = derived_property(char)
        if kind in ("CONTEXTJ", "CONTEXTO"):
            _check_context(label, index)
        elif kind != "PVALID":
            raise _IDNAError(_refusal(char))


def _check_bidi(label: str) -> None:
    """RFC 5893 §2: the six rules, for each label of a domain that has a right-to-left one."""
    classes = [unicodedata.bidirectional(char) for char in label]
    problem = f"has a label {label!r} that breaks the bidi rule (RFC 5893 §2)"
    if classes[0] not in ("L", "R", "AL"):
        raise _IDNAError(problem)
    trimmed = classes[:]
    while trimmed and trimmed[-1] == "NSM":
        trimmed.pop()
    if classes[0] in ("R", "AL"):
        allowed = {"R", "AL", "AN", "EN", "ES", "CS", "ET", "ON", "BN", "NSM"}
        ends = {"R", "AL", "EN", "AN"}
        if "EN" in classes and "AN" in classes:
            raise _IDNAError(problem)
    else:
        allowed = {"L", "EN", "ES", "CS", "ET", "ON", "BN", "NSM"}
        ends = {"L", "EN"}
    if not set(classes) <= allowed or not trimmed or trimmed[-1] not in ends:
        raise _IDNAError(problem)


def idna_encode_domain(domain: str) -> str:
    """The A-label form of ``domain`` (IDNA 2008, RFC 5891 §4 and §5, UTS #46 mapping).

    Labels are split on ``.`` only.  An ASCII label is kept as it is (like an ASCII domain),
    but must be letters, digits and hyphens (RFC 5891 §5.4); an ``xn--`` label is kept
    unchecked.  Another label is mapped (see :func:`_map_label`), checked (RFC 5891 §5.4, RFC 5892
    Appendix A, RFC 5893 when the domain has a right-to-left label) and, unless the mapping
    made it ASCII (full-width MANA is ``mana``), Punycode-encoded with ``xn--``.
    Raises ``ValueError`` saying why otherwise.
    """
    labels = domain.split(".")
    if any(not label for label in labels):
        raise _IDNAError("has an empty label")
    unicode_labels = [label if label.isascii() else _map_label(label) for label in labels]
    for label, original in zip(unicode_labels, labels, strict=True):
        if not label:
            raise _IDNAError(f"has a label {original!r} that maps to nothing")
        if not label.lower().startswith("xn--"):
            _check_label(label.lower() if original.isascii() else label)
    if any(unicodedata.bidirectional(c) in _RTL for label in unicode_labels for c in label):
        for label in unicode_labels:
            _check_bidi(label)
    encoded = []
    for label, original in zip(unicode_labels, labels, strict=True):
        a_label = label if label.isascii() else "xn--" + label.encode("punycode").decode()
        if len(a_label) > MAX_LABEL_LENGTH:
            raise _IDNAError(
                f"has a label {original!r} of {len(a_label)} octets as an A-label "
                f"({MAX_LABEL_LENGTH} at most)"
            )
        encoded.append(a_label)
    result = ".".join(encoded)
    if len(result) > MAX_DOMAIN_LENGTH:
        raise _IDNAError(f"is {len(result)} octets as A-labels ({MAX_DOMAIN_LENGTH} at most)")
    return result
