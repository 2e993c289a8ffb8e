"""The transcript: one recorded line is one line of text, whatever the server or user wrote."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from django_socketmail.smtp.parser import ReplyParser
from django_socketmail.smtp.transcript import (
    MAX_TRANSCRIPT_LINE_CHARS,
    Direction,
    Transcript,
    TranscriptLine,
)

FORGED = "C: MAIL FROM:<ceo@bank.example>"


def record_reply(transcript: Transcript, data: bytes) -> None:
    """Record a reply as the protocol does: one ``S:`` line per line of ``str(reply)``."""
    parser = ReplyParser()
    parser.feed(data)
    reply = parser.next_reply()
    assert reply is not None
    for text in str(reply).split("\n"):
        transcript.server(text)


@pytest.mark.parametrize("separator", ["\r", "\x0b", "\x0c", "\x85", "\u2028", "\u2029"])
def test_a_server_line_with_a_line_break_inside_is_one_server_row(separator: str) -> None:
    transcript = Transcript()
    record_reply(transcript, f"550 5.7.1 denied{separator}{FORGED}\r\n".encode())
    assert [line.direction for line in transcript.lines] == [Direction.SERVER]
    rendered = transcript.render()
    assert rendered.split("\n") == rendered.splitlines() == [str(transcript.lines[0])]
    assert rendered.startswith("S: 550 5.7.1 denied\\")
    assert not any(row.startswith("C:") for row in rendered.splitlines())


@pytest.mark.parametrize("record", [Transcript.client, Transcript.server, Transcript.info])
@pytest.mark.parametrize(
    "text", ["a\r\nC: RCPT TO:<x@evil.example>", "a\x00b", "\x1b]0;title\x07", "a\u2028b\x85c"]
)
def test_every_recorded_line_is_escaped(record: object, text: str) -> None:
    transcript = Transcript()
    record(transcript, text)  # type: ignore[operator]
    (line,) = transcript.lines
    assert len(line.text.splitlines()) == 1
    assert "\x00" not in line.text and "\x1b" not in line.text
    assert len(transcript.render().splitlines()) == 1


def test_listeners_and_taps_get_the_escaped_line() -> None:
    transcript = Transcript()
    heard: list[TranscriptLine] = []
    transcript.subscribe(heard.append)
    transcript.tap = []
    transcript.server("250 ok\r250 forged")
    assert heard == transcript.tap == transcript.lines
    assert heard[0].text == "250 ok\\r250 forged"


def test_a_long_line_is_cut_after_escaping_and_stays_one_line() -> None:
    transcript = Transcript()
    transcript.server("\r" * (MAX_TRANSCRIPT_LINE_CHARS * 2))
    (line,) = transcript.lines
    assert len(line.text.splitlines()) == 1
    assert line.text.endswith(f"... [{MAX_TRANSCRIPT_LINE_CHARS * 4} characters]")


def test_injected_clock_gives_elapsed_times() -> None:
    now = [100.0]
    transcript = Transcript(clock=lambda: now[0])
    transcript.info("connected")
    now[0] = 100.25
    transcript.server("220 hello")
    assert [line.elapsed for line in transcript.lines] == [0.0, 0.25]


def test_default_clock_is_monotonic_time() -> None:
    transcript = Transcript()
    transcript.info("a")
    transcript.info("b")
    first, second = (line.elapsed for line in transcript.lines)
    assert 0.0 <= first <= second < 5.0


@given(st.lists(st.text(), max_size=5))
def test_rendered_rows_match_recorded_lines(texts: list[str]) -> None:
    transcript = Transcript()
    for text in texts:
        transcript.server(text)
    rendered = transcript.render()
    rows = rendered.split("\n") if texts else []
    assert len(rows) == len(texts)
    assert rendered.splitlines() == rows
