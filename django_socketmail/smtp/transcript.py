"""The transcript: every line of one SMTP conversation, in both directions, secrets removed.

It is the single record that the audit log stores, that ``sendtestmail`` prints and that
the ``django_socketmail.smtp`` logger emits at DEBUG.  Nothing else records the
conversation.  Client lines arrive already redacted (see :mod:`.commands`); message
content is summarized as a byte and line count; server lines are kept as received
(decoded with replacement).  Every recorded line, whoever wrote it, goes through
:func:`.reply.escape_controls`, so one recorded line is one line of text: a CR, VT, FF, NEL,
U+2028 or U+2029 inside a server line cannot make it render as several rows, and no NUL or
terminal control sequence is recorded.  To stay bounded on a long session the transcript
keeps at most :data:`MAX_TRANSCRIPT_LINES` lines and counts the rest.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from .reply import escape_controls

__all__ = ["Direction", "Transcript", "TranscriptLine"]

logger = logging.getLogger("django_socketmail.smtp")

MAX_TRANSCRIPT_LINES: Final = 2_000
"""Lines kept for :meth:`Transcript.render`: a long or pooled session keeps its first ones
(connection, TLS, AUTH) and counts the rest; each message's own lines are on its result."""
MAX_TRANSCRIPT_LINE_CHARS: Final = 1000


class Direction(str, enum.Enum):
    """Who a transcript line belongs to."""

    CLIENT = "C"
    SERVER = "S"
    INFO = "*"


@dataclass(frozen=True, slots=True)
class TranscriptLine:
    """One line: ``elapsed`` seconds since the transcript started."""

    direction: Direction
    text: str
    elapsed: float

    def __str__(self) -> str:
        return f"{self.direction.value}: {self.text}"


Listener = Callable[[TranscriptLine], None]


class Transcript:
    """An append-only, bounded list of :class:`TranscriptLine`, with listeners.

    Listeners are called for every line as it is recorded (``sendtestmail`` prints with
    one); an exception in a listener propagates.  ``clock`` gives the seconds that
    :attr:`TranscriptLine.elapsed` counts from the transcript's creation (a test passes a
    fake one).
    """

    def __init__(
        self,
        *,
        max_lines: int = MAX_TRANSCRIPT_LINES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.lines: list[TranscriptLine] = []
        self.omitted = 0
        self.tap: list[TranscriptLine] | None = None
        """While set, every line is also appended here: the lines of one message."""
        self.untapped: list[TranscriptLine] = []
        """Lines recorded while no tap was set (the session's own), until taken."""
        self._max_lines = max_lines
        self._clock = clock
        self._started = clock()
        self._listeners: list[Listener] = []

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener`` with every line recorded from now on."""
        self._listeners.append(listener)

    def client(self, text: str) -> None:
        """Record a line the client sent (already redacted)."""
        self._record(Direction.CLIENT, text)

    def server(self, text: str) -> None:
        """Record a line the server sent."""
        self._record(Direction.SERVER, text)

    def info(self, text: str) -> None:
        """Record an event that is not a line on the wire (connected, TLS, closed...)."""
        self._record(Direction.INFO, text)

    def content(self, size: int, lines: int) -> None:
        """Record message content by its size only: bodies are never transcribed."""
        self._record(Direction.CLIENT, f"[message content: {size} bytes, {lines} lines]")

    def take_untapped(self) -> list[TranscriptLine]:
        """Return and forget the session's own lines recorded so far."""
        lines, self.untapped = self.untapped, []
        return lines

    def render(self) -> str:
        """The whole transcript as text, one ``C: ``/``S: ``/``*: `` line each, joined by
        ``\\n``: split it on ``\\n`` (or with ``splitlines()``) to get the lines back."""
        text = "\n".join(str(line) for line in self.lines)
        if self.omitted:
            text += f"\n*: [{self.omitted} more lines not kept]"
        return text

    def _record(self, direction: Direction, text: str) -> None:
        text = escape_controls(text)
        if len(text) > MAX_TRANSCRIPT_LINE_CHARS:
            text = text[:MAX_TRANSCRIPT_LINE_CHARS] + f"... [{len(text)} characters]"
        line = TranscriptLine(direction, text, self._clock() - self._started)
        if len(self.lines) < self._max_lines:
            self.lines.append(line)
        else:
            self.omitted += 1
        if self.tap is not None:
            self.tap.append(line)
        elif len(self.untapped) < self._max_lines:
            self.untapped.append(line)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("%s", line)
        for listener in self._listeners:
            listener(line)
