"""Envelope address preparation: Django-compatible parsing, IDNA, SMTPUTF8, injection."""

from __future__ import annotations

import pytest

from django_socketmail.smtp.address import EnvelopeAddress, prepare_address
from django_socketmail.smtp.errors import InvalidAddressError


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("a@example.com", EnvelopeAddress("a@example.com")),
        ("Name <a@example.com>", EnvelopeAddress("a@example.com")),
        ('"Last, First" <a.b+tag@example.com>', EnvelopeAddress("a.b+tag@example.com")),
        ("a@bücher.example", EnvelopeAddress("a@xn--bcher-kva.example")),
        ("jörg@example.com", EnvelopeAddress("jörg@example.com", needs_smtputf8=True)),
        ("webmaster", EnvelopeAddress("webmaster")),
        ('"john doe"@example.com', EnvelopeAddress('"john doe"@example.com')),
    ],
)
def test_prepared(given: str, expected: EnvelopeAddress) -> None:
    assert prepare_address(given) == expected


@pytest.mark.parametrize(
    "bad",
    [
        "a@example.com\r\nRCPT TO:<evil@example.com>",
        "a@example.com\nDATA",
        "a\x00@example.com",
        "a@example.com, b@example.com",
        "<a@example.com",
        "a@" + "x" * 300 + ".com",
    ],
)
def test_refused_before_anything_is_sent(bad: str) -> None:
    with pytest.raises(InvalidAddressError) as info:
        prepare_address(bad)
    assert isinstance(info.value, ValueError)
