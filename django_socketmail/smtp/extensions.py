"""The service extensions a server advertised in its EHLO reply (RFC 5321 §4.1.1.1).

Each line after the first of a 250 EHLO reply is ``KEYWORD [params]``; keywords are
case-insensitive.  Old servers advertise ``AUTH=LOGIN`` (with ``=``): it is read as
``AUTH LOGIN``.  A session that fell back to HELO has no extensions.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from .reply import Reply

__all__ = ["Extensions"]


@dataclass(frozen=True, slots=True)
class Extensions(Mapping[str, str]):
    """Advertised keywords (upper case) mapped to their parameter text (may be empty)."""

    keywords: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_ehlo_reply(cls, reply: Reply) -> Extensions:
        """Read the extension lines of a positive EHLO reply (the first line is the greeting)."""
        keywords: dict[str, str] = {}
        for line in reply.lines[1:]:
            keyword, _, params = line.strip().partition(" ")
            if keyword.upper().startswith("AUTH="):
                keyword, params = "AUTH", keyword[5:] + " " + params
            keyword = keyword.upper()
            if not keyword:
                continue
            if keyword == "AUTH" and "AUTH" in keywords:
                params = keywords["AUTH"] + " " + params
            keywords[keyword] = params.strip()
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
        """The SASL mechanisms offered with AUTH, upper case, without duplicates, in order."""
        names = self.keywords.get("AUTH", "").upper().split()
        return tuple(dict.fromkeys(names))

    @property
    def size_limit(self) -> int | None:
        """The SIZE limit in bytes (RFC 1870), or None when unlimited or not advertised."""
        value = self.keywords.get("SIZE", "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
        return None
