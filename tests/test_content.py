"""DATA content: CRLF normalization and dot-stuffing (RFC 5321 §4.5.2)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from django_socketmail.smtp.content import (
    crlf_line_breaks,
    data_parts,
    has_8bit,
    normalize_line_endings,
    split_canonical,
    stuffed_parts,
)


def reference_data(normalized: bytes) -> bytes:
    """The DATA payload of CRLF-normalized content, line by line as RFC 5321 §4.5.2 says
    (independent of the module's part-wise code): a leading dot doubled, then ``.CRLF``."""
    lines = normalized.split(b"\r\n")[:-1]  # normalized content ends in CRLF (or is empty)
    return b"".join((b"." if line.startswith(b".") else b"") + line + b"\r\n" for line in lines) + (
        b".\r\n"
    )


def terminate_data(normalized: bytes) -> bytes:
    """The module's DATA payload for one byte string of normalized content."""
    return b"".join(data_parts(normalized))


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


@pytest.mark.parametrize(
    ("raw", "expected"),
    [(b"a\nb", b"a\r\nb"), (b"a\rb\r", b"a\r\nb\r\n"), (b"a\r\n\nb", b"a\r\n\r\nb"), (b"", b"")],
)
def test_crlf_line_breaks_adds_nothing_at_the_end(raw: bytes, expected: bytes) -> None:
    assert crlf_line_breaks(raw) == expected


def test_crlf_line_breaks_copies_nothing_in_crlf_form() -> None:
    data = b"a\r\nb\r\nno final line break"
    assert crlf_line_breaks(data) is data


def test_dot_stuffing_first_and_inner_lines() -> None:
    stuffed = b"".join(stuffed_parts([b".a\r\nb\r\n.\r\n..c\r\n"]))
    assert stuffed == b"..a\r\nb\r\n..\r\n...c\r\n"


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
    assert b"".join(content) + tail == normalize_line_endings(raw)
    assert tail in (b"", b"\r\n")


def test_split_canonical_copies_nothing_for_crlf_messages() -> None:
    message = b"Subject: x\r\n\r\nno final newline"
    content, tail = split_canonical(message)
    assert content == (message,)
    assert content[0] is message
    assert tail == b"\r\n"
    assert b"".join(data_parts(content, tail)) == reference_data(normalize_line_endings(message))


def test_canonical_parts_are_kept_as_they_are() -> None:
    parts = [b"Subject: x\r\n\r\n", b"", b"line\r\n", b".dot\r\nend"]
    content, tail = split_canonical(parts)
    assert content == (parts[0], parts[2], parts[3])
    kept = (parts[0], parts[2], parts[3])
    assert all(a is b for a, b in zip(content, kept, strict=True))
    assert tail == b"\r\n"


@pytest.mark.parametrize(
    "parts",
    [
        [b"a\r", b"\nb\r\n"],  # a CRLF split between two parts
        [b"a\n", b"b\r\n"],  # a bare LF in one part
        [b"a\r\n", b"\rb"],  # a bare CR at the start of one
    ],
)
def test_parts_not_in_crlf_form_are_normalized_together(parts: list[bytes]) -> None:
    content, tail = split_canonical(parts)
    assert content == (normalize_line_endings(b"".join(parts)),)
    assert tail == b""


def test_dot_stuffing_across_parts_copies_no_part() -> None:
    head, body, rest = b"Subject: x\r\n\r\n", b".starts a line\r\nmid", b".dle\r\n"
    stuffed = stuffed_parts([head, body, rest])
    # A part starting a line with a dot gets a "." part before it; one that continues a
    # line does not; parts without an inner dot line are the very same objects.
    assert stuffed == [head, b".", body, rest]
    assert stuffed[0] is head and stuffed[2] is body and stuffed[3] is rest
    assert b"".join(stuffed) + b".\r\n" == reference_data(head + body + rest)
    assert data_parts([head, body, rest])[-1] == b".\r\n"


def test_has_8bit_looks_at_every_part() -> None:
    assert has_8bit([b"plain", "ä".encode()]) and not has_8bit([b"plain", b"text"])


_PIECES = st.lists(st.sampled_from([b"a", b"b", b".", b"\r", b"\n", b"\xe4"]), max_size=12)


@given(st.lists(_PIECES.map(b"".join), max_size=6))
def test_parts_give_the_bytes_of_the_joined_message(parts: list[bytes]) -> None:
    content, tail = split_canonical(parts)
    joined = b"".join(parts)
    assert b"".join(data_parts(content, tail)) == reference_data(normalize_line_endings(joined))
