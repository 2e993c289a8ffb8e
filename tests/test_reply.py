"""Reply parsing (RFC 5321 §4.2): byte-exact, bounded."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from django_socketmail.smtp.errors import RemoteProtocolError
from django_socketmail.smtp.parser import ReplyParser
from django_socketmail.smtp.reply import Reply, escape_controls


def parse_all(data: bytes, **limits: int) -> list[Reply]:
    parser = ReplyParser(**limits)
    parser.feed(data)
    replies = []
    while (reply := parser.next_reply()) is not None:
        replies.append(reply)
    return replies


def test_single_line() -> None:
    assert parse_all(b"250 OK\r\n") == [Reply(250, ("OK",))]


def test_multi_line_read_to_the_last_line() -> None:
    data = b"250-mail.example.com\r\n250-PIPELINING\r\n250 SIZE 1000\r\n"
    assert parse_all(data) == [Reply(250, ("mail.example.com", "PIPELINING", "SIZE 1000"))]


def test_bare_code_is_a_last_line() -> None:
    assert parse_all(b"250\r\n") == [Reply(250, ("",))]
    assert parse_all(b"250-a\r\n250\r\n") == [Reply(250, ("a", ""))]


def test_partial_data_needs_more() -> None:
    parser = ReplyParser()
    parser.feed(b"250-first\r\n250 sec")
    assert parser.next_reply() is None
    parser.feed(b"ond\r\n220 next\r\n")
    assert parser.next_reply() == Reply(250, ("first", "second"))
    assert parser.next_reply() == Reply(220, ("next",))
    assert parser.next_reply() is None


def test_one_byte_at_a_time() -> None:
    parser = ReplyParser()
    replies = []
    for byte in b"220-a\r\n220 b\r\n":
        parser.feed(bytes([byte]))
        if (reply := parser.next_reply()) is not None:
            replies.append(reply)
    assert replies == [Reply(220, ("a", "b"))]


def test_bare_lf_tolerated() -> None:
    assert parse_all(b"250-a\n250 b\n") == [Reply(250, ("a", "b"))]


def test_non_utf8_text_is_replaced_not_fatal() -> None:
    (reply,) = parse_all(b"250 caf\xe9\r\n")
    assert reply.text == "caf\ufffd"


@pytest.mark.parametrize(
    "data",
    [b"hello\r\n", b"25 short\r\n", b"250x\r\n", b"650 bad class\r\n", b"abc def\r\n"],
)
def test_malformed_lines_are_protocol_errors(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError, match="malformed"):
        parse_all(data)


def test_mismatched_codes() -> None:
    with pytest.raises(RemoteProtocolError, match="differs"):
        parse_all(b"250-a\r\n251 b\r\n")


def test_line_length_bound_without_line_end() -> None:
    parser = ReplyParser(max_line_length=100)
    parser.feed(b"250 " + b"x" * 200)
    with pytest.raises(RemoteProtocolError, match="longer than 100 bytes"):
        parser.next_reply()
    with pytest.raises(RemoteProtocolError):  # the parser stays failed
        parser.feed(b"\r\n")


def test_lines_per_reply_bound() -> None:
    with pytest.raises(RemoteProtocolError, match="longer than 5 lines"):
        parse_all(b"250-x\r\n" * 10, max_lines=5)


def test_reply_properties() -> None:
    reply = Reply(550, ("5.1.1 <x@example.com>: Recipient address rejected",))
    assert reply.is_permanent and not reply.is_transient and not reply.is_positive
    assert reply.enhanced_status == "5.1.1"
    assert Reply(451, ("4.3.0 try later",)).is_transient
    assert Reply(250, ("5.1.1 mismatched class",)).enhanced_status is None
    assert Reply(354, ("go",)).is_intermediate
    assert str(Reply(250, ("a", "b"))) == "250-a\n250 b"
    assert Reply(250, ("a", "b")).one_line() == "250 a b"


def test_discard_returns_buffered_bytes() -> None:
    parser = ReplyParser()
    parser.feed(b"220 go ahead\r\n250 injected\r\n")
    assert parser.next_reply() == Reply(220, ("go ahead",))
    assert parser.discard() == b"250 injected\r\n"
    assert parser.next_reply() is None


# -- server text is data: control characters come out escaped ---------------------------

HOSTILE_CHARACTERS = [
    ("\x00", "\\x00"),
    ("\x07", "\\x07"),
    ("\x0b", "\\x0b"),
    ("\x0c", "\\x0c"),
    ("\r", "\\r"),
    ("\x1b", "\\x1b"),
    ("\x7f", "\\x7f"),
    ("\x85", "\\x85"),
    ("\x9b", "\\x9b"),
    ("\u2028", "\\u2028"),
    ("\u2029", "\\u2029"),
    ("\u202e", "\\u202e"),
    ("\u2066", "\\u2066"),
]


@pytest.mark.parametrize(("raw", "escaped"), HOSTILE_CHARACTERS)
def test_control_characters_in_a_reply_line_come_out_escaped(raw: str, escaped: str) -> None:
    (reply,) = parse_all(f"550 5.7.1 denied{raw}C: MAIL FROM:<ceo@bank.example>\r\n".encode())
    assert reply.lines == (f"5.7.1 denied{escaped}C: MAIL FROM:<ceo@bank.example>",)
    assert "\n" not in str(reply)
    assert str(reply).splitlines() == [str(reply)]


def test_terminal_escape_sequences_are_inert() -> None:
    data = (
        b"250-\x1b]52;c;ZXZpbA==\x07\r\n250-\x1b]0;title\x07\x1b[2J\r\n250 550 denied\r250 ok\r\n"
    )
    (reply,) = parse_all(data)
    assert reply.lines == (
        "\\x1b]52;c;ZXZpbA==\\x07",
        "\\x1b]0;title\\x07\\x1b[2J",
        "550 denied\\r250 ok",
    )


def test_tab_and_printable_unicode_are_kept() -> None:
    (reply,) = parse_all("250 a\tb caf\u00e9 \u65e5\u672c \\x1b stays\r\n".encode())
    assert reply.lines == ("a\tb caf\u00e9 \u65e5\u672c \\x1b stays",)


def test_nul_never_reaches_the_reply_text() -> None:
    (reply,) = parse_all(b"250-a\x00b\r\n250 \x00\r\n")
    assert "\x00" not in str(reply)
    assert reply.lines == ("a\\x00b", "\\x00")


def test_escape_controls_is_idempotent() -> None:
    text = "".join(raw for raw, _ in HOSTILE_CHARACTERS) + "\t\\ plain"
    once = escape_controls(text)
    assert escape_controls(once) == once
    assert once == "".join(escaped for _, escaped in HOSTILE_CHARACTERS) + "\t\\ plain"


@given(st.text())
def test_escaped_text_is_one_inert_line(text: str) -> None:
    escaped = escape_controls(text)
    assert len(escaped.splitlines()) <= 1
    assert not any((ord(c) < 0x20 and c != "\t") or 0x7F <= ord(c) <= 0x9F for c in escaped)
    assert escape_controls(escaped) == escaped


@given(st.binary(max_size=300))
def test_any_bytes_in_a_reply_line_make_one_inert_line(data: bytes) -> None:
    line = data.replace(b"\n", b"")
    (reply,) = parse_all(b"250 " + line + b"\r\n")
    assert len(reply.lines) == 1
    assert len(str(reply).split("\n")) == 1
    assert len(str(reply).splitlines()) == 1
    assert "\x00" not in reply.text


def test_buffered_counts_bytes_received_not_escaped_text() -> None:
    """An unfinished multi-line reply full of control bytes holds its raw size, not the
    (four times longer) escaped text: the bound on what a server can make us hold."""
    parser = ReplyParser()
    parser.feed(b"250-" + b"\x00" * 30 + b"\r\n")
    assert parser.next_reply() is None
    assert parser.buffered == 34
