"""Properties, for any input: the reply parser stays bounded, the encoders never inject.

- ``ReplyParser`` fed any bytes, in any chunking, gives replies, "need more" or
  ``RemoteProtocolError``, and nothing else; it never holds more than its limits; the
  chunking never changes the outcome.
- ``prepare_address`` either refuses an address (``InvalidAddressError``, a ``ValueError``)
  or gives one that makes ``MAIL FROM``/``RCPT TO`` exactly one CRLF-terminated line.
- the DATA payload of any body (``split_canonical`` then ``data_parts``) has no bare CR or
  LF, no lone ``.`` line but the last, stuffs every line that starts with a dot, and
  un-stuffing it (what a receiver does) gives back the normalized body exactly.
"""

from __future__ import annotations

import itertools
import re

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from django_socketmail.smtp.address import prepare_address
from django_socketmail.smtp.commands import MailFrom, RcptTo
from django_socketmail.smtp.content import data_parts, normalize_line_endings, split_canonical
from django_socketmail.smtp.errors import InvalidAddressError, RemoteProtocolError
from django_socketmail.smtp.parser import ReplyParser
from django_socketmail.smtp.reply import Reply

SETTINGS = settings(
    max_examples=200,
    deadline=None,
    database=None,  # no .hypothesis/ directory in the work tree
    suppress_health_check=[HealthCheck.too_slow],
)

# -- the reply parser ------------------------------------------------------------------------

MAX_LINE = 40
MAX_LINES = 4

reply_lines = st.builds(
    lambda code, sep, text, end: code + sep + text + end,
    st.sampled_from([b"220", b"250", b"354", b"421", b"550", b"199", b"2x0", b"25", b""]),
    st.sampled_from([b" ", b"-", b"", b"\t"]),
    st.binary(max_size=MAX_LINE + 8),
    st.sampled_from([b"\r\n", b"\n", b"\r", b""]),
)
"""Reply lines good and bad: codes out of range, missing separators, any text, any end."""

server_bytes = st.lists(
    st.one_of(reply_lines, st.binary(max_size=MAX_LINE * 2), st.sampled_from([b"\r\n", b"\n"])),
    max_size=12,
).map(b"".join)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


def parse(chunks: list[bytes]) -> tuple[list[Reply], bool]:
    """Feed ``chunks`` one by one, taking every reply after each; return the replies and
    whether the parser failed.  Checks the bounds after every step."""
    parser = ReplyParser(max_line_length=MAX_LINE, max_lines=MAX_LINES)
    replies: list[Reply] = []
    for chunk in chunks:
        try:
            parser.feed(chunk)
            while (reply := parser.next_reply()) is not None:
                assert isinstance(reply, Reply)
                replies.append(reply)
        except RemoteProtocolError:
            # Failed for good: every later call says so again, nothing else.
            for call in (lambda: parser.feed(b"250 ok\r\n"), parser.next_reply):
                try:
                    call()
                except RemoteProtocolError:
                    pass
                else:
                    raise AssertionError("a failed parser went on") from None
            return replies, True
        # Waiting for more: less than one line, and less than a whole reply, held.
        assert parser.buffered < MAX_LINE * MAX_LINES
    return replies, False


@SETTINGS
@given(server_bytes, st.lists(st.integers(min_value=0), max_size=20))
# A line of 14 raw bytes (after "220 ") written as 42 characters: NULs and CR escaped.
@example(b"220 \x00\x00\x00\r220 \x00\x00\x00\x00\x00\x00\r\n", [])
def test_reply_parser_any_bytes_any_chunking(data: bytes, cuts: list[int]) -> None:
    replies, failed = parse(chunked(data, cuts))
    assert (replies, failed) == parse([data])  # chunking changes nothing
    assert parse([bytes([b]) for b in data]) == (replies, failed)  # nor one byte at a time
    for reply in replies:
        assert 200 <= reply.code <= 599
        assert 1 <= len(reply.lines) <= MAX_LINES
        # The limit is on the raw line; escaping writes a byte as at most 4 characters
        # (a control below U+0100 as \xNN; U+2028's 3 bytes as \u2028).
        assert all(len(line) < 4 * MAX_LINE for line in reply.lines)
        assert all("\n" not in line for line in reply.lines)


@SETTINGS
@given(st.binary(min_size=MAX_LINE, max_size=MAX_LINE * 3).filter(lambda b: b"\n" not in b))
def test_reply_parser_refuses_an_endless_line(data: bytes) -> None:
    assert parse([b"250 ", data]) == ([], True)


@SETTINGS
@given(st.integers(min_value=MAX_LINES, max_value=MAX_LINES * 3))
def test_reply_parser_refuses_an_endless_reply(lines: int) -> None:
    assert parse([b"250-x\r\n" * lines]) == ([], True)


# -- envelope addresses ----------------------------------------------------------------------

nasty = st.sampled_from(list('\r\n\0<>"@.,;:()[]\\ \t\x7f\x1b\u2028\u0085ü€\ufeff'))
atoms = st.text(
    alphabet=st.one_of(nasty, st.characters(codec="utf-8", categories=["L", "N", "P", "S"])),
    max_size=12,
)
addresses = st.one_of(
    st.text(max_size=40),
    st.builds(lambda local, domain: f"{local}@{domain}", atoms, atoms),
    st.builds(lambda name, local, domain: f"{name} <{local}@{domain}>", atoms, atoms, atoms),
    st.builds(lambda local, domain: f'"{local}"@{domain}', atoms, atoms),
)


@SETTINGS
@given(addresses)
@example("a@")  # IndexError inside the standard library's parser before Python 3.13
@example("a@[b")  # AttributeError from its all_defects (unclosed domain literal)
@example("a@example.com>\r\nRCPT TO:<evil@example.com")
@example('"a\r\nb"@example.com')
@example("Ünïcödé <jörg@exämple.com>")
def test_prepared_address_makes_exactly_one_command_line(address: str) -> None:
    assert issubclass(InvalidAddressError, ValueError)
    try:
        prepared = prepare_address(address)
    except InvalidAddressError:
        return
    for command in (MailFrom(prepared.addr_spec), RcptTo(prepared.addr_spec, ("NOTIFY=NEVER",))):
        line = command.line()
        assert line.endswith(b"\r\n")
        body = line[:-2]
        assert b"\r" not in body and b"\n" not in body and b"\0" not in body
        assert body.count(b"<") == 1 and body.count(b">") == 1  # only the path's brackets
        assert not re.search(rb"[\x00-\x1f\x7f]", body)


# -- message content -------------------------------------------------------------------------

pieces = st.sampled_from([b"\r", b"\n", b"\r\n", b".", b"..", b"\0", b"x", b" ", "ü".encode()])
bodies = st.one_of(st.binary(max_size=200), st.lists(pieces, max_size=60).map(b"".join))
_BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")


@SETTINGS
@given(bodies)
@example(b"a\n.\nMAIL FROM:<x@y>\r\n.\r\n")  # SMTP smuggling attempts
@example(b"a\r.\r")
@example(b".")
@example(b"")
def test_data_payload_is_safe_and_reversible(body: bytes) -> None:
    normalized = normalize_line_endings(body)
    payload = b"".join(data_parts(*split_canonical(body)))
    assert not _BARE.search(payload)
    assert payload.endswith(b".\r\n")
    assert payload == b".\r\n" or payload.endswith(b"\r\n.\r\n")
    lines = payload[:-2].split(b"\r\n")
    assert lines[-1] == b"."
    content = lines[:-1]
    assert b"." not in content  # only the final line is a lone dot
    assert all(line.startswith(b"..") for line in content if line.startswith(b"."))
    # A receiver removes one leading dot from each line (RFC 5321 §4.5.2).
    unstuffed = b"".join(
        (line[1:] if line.startswith(b".") else line) + b"\r\n" for line in content
    )
    assert unstuffed == normalized
