"""DATA content: CRLF normalization and dot-stuffing (RFC 5321 §4.5.2)."""

from __future__ import annotations

import pytest

from django_socketmail.smtp.content import (
    data_parts,
    dot_stuff,
    has_8bit,
    normalize_line_endings,
    split_canonical,
    terminate_data,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"a\nb\n", b"a\r\nb\r\n"),
        (b"a\r\nb\r\n", b"a\r\nb\r\n"),
        (b"a\rb\r", b"a\r\nb\r\n"),
        (b"a\r\r\nb", b"a\r\n\r\nb\r\n"),
        (b"no newline", b"no newline\r\n"),
        (b"", b""),
        (b"\n\r", b"\r\n\r\n"),
    ],
)
def test_normalize(raw: bytes, expected: bytes) -> None:
    assert normalize_line_endings(raw) == expected


def test_dot_stuffing_first_and_inner_lines() -> None:
    assert dot_stuff(b".a\r\nb\r\n.\r\n..c\r\n") == b"..a\r\nb\r\n..\r\n...c\r\n"


def test_terminate_data_exact_bytes() -> None:
    assert terminate_data(b"Subject: x\r\n\r\n.\r\n") == b"Subject: x\r\n\r\n..\r\n.\r\n"
    assert terminate_data(b"") == b".\r\n"


def test_smuggling_attempt_is_defused() -> None:
    # CVE-2023-51764: "\n.\n" (or "\r.\r", "\n.\r\n") must never end the data early.
    for attack in (b"x\n.\nMAIL FROM:<evil>\n", b"x\r.\rRCPT\r", b"x\n.\r\nDATA\r\n"):
        wire = terminate_data(normalize_line_endings(attack))
        assert wire.count(b"\r\n.\r\n") == 1 and wire.endswith(b"\r\n.\r\n")
        assert b"\r\n..\r\n" in wire


def test_has_8bit() -> None:
    assert has_8bit("ä".encode()) and not has_8bit(b"plain")


@pytest.mark.parametrize(
    "raw",
    [b"a\r\nb\r\n", b"a\r\nb", b"", b"a\nb", b"a\rb\r\n", b"x", b".\r\n.", b"a\r\n\r"],
)
def test_split_canonical_joins_to_the_normalized_message(raw: bytes) -> None:
    content, tail = split_canonical(raw)
    assert content + tail == normalize_line_endings(raw)
    assert tail in (b"", b"\r\n")


def test_split_canonical_copies_nothing_for_crlf_messages() -> None:
    message = b"Subject: x\r\n\r\nno final newline"
    content, tail = split_canonical(message)
    assert content is message
    assert tail == b"\r\n"
    assert b"".join(data_parts(content, tail)) == terminate_data(normalize_line_endings(message))
