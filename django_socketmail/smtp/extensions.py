"""The service extensions a server advertised in its EHLO reply (RFC 5321 §4.1.1.1).

Each line after the first of a 250 EHLO reply is ``KEYWORD [params]``; keywords are
case-insensitive.  Old servers advertise ``AUTH=LOGIN`` (with ``=``): it is read as
``AUTH LOGIN``.  A session that fell back to HELO has no extensions.

A server may send anything: a line whose keyword is outside the RFC's grammar is ignored,
and a value that does not parse (``SIZE ²``, ``SIZE -1``, 5,000 digits) reads as if the
extension had no value, never as an exception.  Only ASCII letters and digits count, so
``str.upper()`` cannot turn a look-alike ("STARTTLS" spelt with the long s, U+017F) into
a keyword.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Final

from .reply import Reply

__all__ = ["Extensions"]

_KEYWORD: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
"""RFC 5321 §4.1.1.1: ``ehlo-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-")``."""
_MECHANISM: Final = re.compile(r"[A-Za-z0-9_-]{1,20}")
"""RFC 4422 §3.1: a SASL mechanism name is 1 to 20 letters, digits, ``-`` or ``_``."""
_SIZE: Final = re.compile(r"[0-9]{1,20}")
"""RFC 1870 §4: ``size-param = [1*DIGIT]``; more than 20 digits is no real limit."""


@dataclass(frozen=True, slots=True)
class Extensions(Mapping[str, str]):
    """Advertised keywords (upper case) mapped to their parameter text (may be empty)."""

    keywords: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_ehlo_reply(cls, reply: Reply) -> Extensions:
        """Read the extension lines of a positive EHLO reply (the first line is the greeting).

        Lines whose keyword does not match the RFC's grammar are skipped; parameters are
        kept as text, tabs turned into spaces, stripped of surrounding spaces.
        """
        keywords: dict[str, str] = {}
        for line in reply.lines[1:]:
            keyword, _, params = line.replace("\t", " ").strip(" ").partition(" ")
            if keyword[:5].isascii() and keyword[:5].upper() == "AUTH=":
                keyword, params = "AUTH", keyword[5:] + " " + params
            if not _KEYWORD.fullmatch(keyword):
                continue
            keyword = keyword.upper()
            if keyword == "AUTH" and "AUTH" in keywords:
                params = keywords["AUTH"] + " " + params
            keywords[keyword] = params.strip(" ")
        return cls(keywords)

    def __getitem__(self, keyword: str) -> str:
        return self.keywords[keyword.upper()]

    def __contains__(self, keyword: object) -> bool:
        return isinstance(keyword, str) and keyword.upper() in self.keywords

    def __iter__(self) -> Iterator[str]:
        return iter(self.keywords)

    def __len__(self) -> int:
        return len(self.keywords)

    @property
    def auth_mechanisms(self) -> tuple[str, ...]:
        """The SASL mechanisms offered with AUTH, upper case, without duplicates, in order.

        Words that are not SASL mechanism names (RFC 4422 §3.1) are left out.
        """
        words = self.keywords.get("AUTH", "").split(" ")
        names = (word.upper() for word in words if _MECHANISM.fullmatch(word))
        return tuple(dict.fromkeys(names))

    @property
    def size_limit(self) -> int | None:
        """The SIZE limit in bytes (RFC 1870), or None when unlimited or not advertised.

        A value other than 1 to 20 ASCII digits counts as not advertised; ``0`` means no
        limit (RFC 1870 §4).
        """
        value = self.keywords.get("SIZE", "")
        if not _SIZE.fullmatch(value):
            return None
        return int(value) or None
