"""EHLO keywords (RFC 5321 §4.1.1.1): well-formed results from any text a server sends."""

from __future__ import annotations

import re

import pytest
from django.core.mail import EmailMessage
from hypothesis import given
from hypothesis import strategies as st

from django_socketmail.smtp.extensions import Extensions
from django_socketmail.smtp.parser import ReplyParser
from django_socketmail.smtp.reply import Reply

from .conftest import BackendFactory
from .hostile.server import HostileSMTPServer, standard_session

KEYWORD = re.compile(r"[A-Z0-9][A-Z0-9-]*")
"""RFC 5321 §4.1.1.1: ehlo-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-")."""
SASL_NAME = re.compile(r"[A-Z0-9_-]{1,20}")
"""RFC 4422 §3.1: a mechanism name is 1 to 20 upper-case letters, digits, hyphens, underscores."""


def ehlo(*lines: str) -> Extensions:
    return Extensions.from_ehlo_reply(Reply(250, ("mail.example.com", *lines)))


def test_common_reply() -> None:
    extensions = ehlo(
        "PIPELINING", "SIZE 10240000", "8BITMIME", "AUTH PLAIN LOGIN CRAM-MD5", "STARTTLS"
    )
    assert set(extensions) == {"PIPELINING", "SIZE", "8BITMIME", "AUTH", "STARTTLS"}
    assert extensions.size_limit == 10240000
    assert extensions.auth_mechanisms == ("PLAIN", "LOGIN", "CRAM-MD5")
    assert "starttls" in extensions and extensions["size"] == "10240000"


def test_old_auth_equals_form_and_repeated_auth_lines() -> None:
    extensions = ehlo("AUTH=LOGIN", "auth plain login", "AUTH XOAUTH2")
    assert extensions.auth_mechanisms == ("LOGIN", "PLAIN", "XOAUTH2")


@pytest.mark.parametrize("value", ["", "0", "000"])
def test_size_without_a_limit(value: str) -> None:
    assert ehlo(f"SIZE {value}".strip()).size_limit is None


@pytest.mark.parametrize(
    "value",
    ["\u00b2", "\u0661\u0662", "\uff11\uff12", "1" * 5000, "-1", "+5", "1e9", "1_0", "1 2", "x"],
)
def test_unparsable_size_is_absent_not_an_exception(value: str) -> None:
    extensions = ehlo(f"SIZE {value}")
    assert extensions.size_limit is None


def test_size_with_leading_zeros_and_spaces() -> None:
    assert ehlo("SIZE   0010  ").size_limit == 10


def test_size_from_the_wire_with_a_hostile_value() -> None:
    parser = ReplyParser()
    parser.feed("250-mx\r\n250-SIZE \u00b2\r\n250 SIZE 9\xb2\r\n".encode())
    reply = parser.next_reply()
    assert reply is not None
    assert Extensions.from_ehlo_reply(reply).size_limit is None


@pytest.mark.parametrize(
    "line", ["\u017fTARTTLS", "STARTTLS\u0131", "ST\u0100RTTLS", "-STARTTLS", "START_TLS", "=X"]
)
def test_keywords_outside_the_grammar_are_ignored(line: str) -> None:
    """``str.upper()`` turns the long s (U+017F) into "S": such keywords must not count."""
    extensions = ehlo(line, "PIPELINING")
    assert "STARTTLS" not in extensions
    assert list(extensions) == ["PIPELINING"]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("AUTH PLAIN \u017fCRAM-MD5 LOGIN", ("PLAIN", "LOGIN")),
        ("AUTH PLAIN L\u0130GIN", ("PLAIN",)),
        ("AUTH " + "X" * 21 + " PLAIN", ("PLAIN",)),
        ("AUTH plain\tlogin", ("PLAIN", "LOGIN")),
        ("AUTH=", ()),
    ],
)
def test_mechanism_names_outside_the_grammar_are_ignored(line: str, expected: tuple[str]) -> None:
    assert ehlo(line).auth_mechanisms == expected


def test_helo_fallback_has_no_extensions() -> None:
    extensions = Extensions()
    assert len(extensions) == 0
    assert extensions.size_limit is None
    assert extensions.auth_mechanisms == ()


def check_well_formed(extensions: Extensions) -> None:
    for keyword in extensions:
        assert KEYWORD.fullmatch(keyword), keyword
        assert isinstance(extensions[keyword], str)
        assert extensions[keyword] == extensions[keyword].strip(" ")
        assert "\t" not in extensions[keyword]
        assert keyword in extensions and keyword.lower() in extensions
    limit = extensions.size_limit
    assert limit is None or (isinstance(limit, int) and 0 < limit < 10**20)
    mechanisms = extensions.auth_mechanisms
    assert all(SASL_NAME.fullmatch(name) for name in mechanisms), mechanisms
    assert len(set(mechanisms)) == len(mechanisms)


ehlo_words = st.sampled_from(
    ["AUTH", "AUTH=", "auth=login", "SIZE", "size", "STARTTLS", "PIPELINING", "-", "=", " "]
)
line_text = st.one_of(
    st.text(),
    st.builds(lambda a, b: f"{a} {b}", ehlo_words, st.text()),
    st.builds(lambda a, b: f"{a}{b}", ehlo_words, st.text()),
    st.builds(lambda n: f"SIZE {n}", st.integers()),
    st.builds(lambda n: f"SIZE {'9' * n}", st.integers(min_value=0, max_value=6000)),
)


@given(st.lists(line_text, max_size=8))
def test_any_lines_give_well_formed_extensions(lines: list[str]) -> None:
    check_well_formed(Extensions.from_ehlo_reply(Reply(250, ("greeting", *lines))))


@given(st.lists(st.binary(max_size=80).map(lambda b: b.replace(b"\n", b"")), max_size=8))
def test_any_bytes_on_the_wire_give_well_formed_extensions(lines: list[bytes]) -> None:
    parser = ReplyParser()
    parser.feed(b"".join(b"250-" + line + b"\r\n" for line in lines) + b"250 end\r\n")
    reply = parser.next_reply()
    assert reply is not None
    check_well_formed(Extensions.from_ehlo_reply(reply))


@pytest.mark.parametrize("value", ["\u00b2", "1" * 5000, "-1", "1e9"])
@pytest.mark.parametrize("fail_silently", [False, True])
def test_backend_sends_through_a_hostile_size_value(
    make_backend: BackendFactory, value: str, fail_silently: bool
) -> None:
    """Round one raised a raw ValueError here, even with ``fail_silently=True``."""
    script = standard_session(extensions=["PIPELINING", f"SIZE {value}"])
    with HostileSMTPServer(script) as server:
        backend = make_backend(server, fail_silently=fail_silently)
        message = EmailMessage("s", "body", "from@example.com", ["to@example.com"])
        assert backend.send_messages([message]) == 1
        backend.close()
        assert len(server.messages) == 1
