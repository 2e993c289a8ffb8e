"""``serialize_parts()`` joins to exactly the bytes of ``serialize()``, for any message.

``serialize()`` is the reference: what Django's own SMTP backend sends (checked here against
Django directly).  ``serialize_parts()`` builds the same bytes as a list of byte strings
without holding large payloads (body, alternatives, attachments of at least
``lazy_threshold`` characters or bytes) several times in memory.  For every message here and
every threshold -- 0 (every payload streamed), 1, 100 and 10**9 (none streamed) -- each part
is ``bytes`` and the parts join to ``serialize()``'s bytes, byte for byte:

- bodies: line endings of every kind and mixture, dots and ``From`` at line starts, long
  lines, quoted-printable edges (trailing white space, ``=``, lines of 75 to 79
  characters), non-ASCII, the characters ``str.splitlines()`` breaks at and
  ``bytes.splitlines()`` does not, control characters, 5,000 lines, 300 KB and more;
- text/html bodies and alternatives, attachments (binary of every length mod 3 and 57,
  text as str and as bytes, valid UTF-8 or not, non-ASCII file names, forwarded messages,
  MIME parts), and all of them together;
- other charsets (``DEFAULT_CHARSET`` and ``message.encoding`` ISO-8859-1);
- payloads cut into slices with every awkward character at a slice's start or straddling
  its end, and the lines that decide the transfer encoding (7bit, 8bit,
  quoted-printable, base64) placed last, or among the first ten lines Django 6 sniffs;
- content that holds the very MIME boundary the generator is about to draw (there the
  parts differ from Django's bytes on purpose: the message is serialized again with a new
  boundary, where Django's would send the colliding one);
- any message hypothesis makes of the same pieces.

Determinism: every message has fixed ``Date`` and ``Message-ID`` headers (``message()``
makes them up otherwise).  MIME boundaries come from ``email.generator``'s
``random.randrange``: the global ``random`` is seeded with the same value right before each
serialization, so both draw the same boundaries.  That is enough (no boundary is normalized
afterwards): a regex normalizing ``boundary="..."`` would also hide a ``serialize_parts()``
that draws its boundaries differently from ``serialize()``.
"""

from __future__ import annotations

import email.contentmanager
import email.headerregistry
import email.message
import email.policy
import functools
import hashlib
import importlib
import operator
import random
import string
import sys
from collections.abc import Callable, Iterator, Sequence
from email.mime.text import MIMEText
from types import ModuleType
from typing import Any, cast

import django
import pytest
from django.core.mail import EmailMessage, EmailMultiAlternatives
from django.test import override_settings
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from django_socketmail import serializer as serializer_module
from django_socketmail.serializer import serialize, serialize_parts

HEADERS = {"Date": "Tue, 01 Jul 2025 12:00:00 +0000", "Message-ID": "<x@example.test>"}
THRESHOLDS = (0, 1, 100, 10**9)
SEED = 20250701

SETTINGS = settings(
    max_examples=150,
    deadline=None,
    database=None,  # no .hypothesis/ directory in the work tree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

MessageFactory = Callable[[], EmailMessage]
Attachment = tuple[str, "str | bytes | EmailMessage", str]


# -- helpers ---------------------------------------------------------------------------------


def make(
    body: str = "",
    *,
    subtype: str = "plain",
    alternatives: Sequence[tuple[str, str]] = (),
    attachments: Sequence[Attachment] = (),
    encoding: str | None = None,
    subject: str = "Test ✓ subject",
) -> EmailMessage:
    """A message with fixed Date and Message-ID; multipart/alternative when given any."""
    cls = EmailMultiAlternatives if alternatives else EmailMessage
    message = cls(
        subject=subject,
        body=body,
        from_email="sender@example.com",
        to=["rcpt@example.com"],
        headers=dict(HEADERS),
    )
    message.content_subtype = subtype
    for content, mimetype in alternatives:
        assert isinstance(message, EmailMultiAlternatives)
        message.attach_alternative(content, mimetype)
    for filename, data, mimetype in attachments:
        message.attach(filename, data, mimetype)
    if encoding is not None:
        message.encoding = encoding
    return message


def reference(message: EmailMessage) -> bytes:
    """Django's own SMTP backend's bytes, computed here independently of the module."""
    build: Any = message.message  # its signature depends on the Django version
    if django.VERSION >= (6, 0):
        return cast(bytes, build(policy=email.policy.SMTP).as_bytes())
    return cast(bytes, build().as_bytes(linesep="\r\n"))


def first_difference(got: bytes, expected: bytes) -> str:
    """Where two byte strings part, with a little context (not a 300 KB diff)."""
    at = next(
        (i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b),
        min(len(got), len(expected)),
    )
    start = max(0, at - 60)
    return (
        f"lengths {len(got)} (joined parts) vs {len(expected)} (serialize); first difference "
        f"at byte {at}:\n  parts:     {got[start : at + 60]!r}\n"
        f"  serialize: {expected[start : at + 60]!r}"
    )


def check(message: EmailMessage, thresholds: Sequence[int] = THRESHOLDS, seed: int = SEED) -> bytes:
    """Assert the equivalence for every threshold; return the reference bytes."""
    random.seed(seed)
    expected = serialize(message)
    assert type(expected) is bytes
    random.seed(seed)
    assert reference(message) == expected, "serialize() is not Django's own serialization"
    for threshold in thresholds:
        random.seed(seed)
        parts = serialize_parts(message, lazy_threshold=threshold)
        assert isinstance(parts, list)
        bad = [type(part).__name__ for part in parts if type(part) is not bytes]
        assert not bad, f"lazy_threshold={threshold}: parts that are not bytes: {bad}"
        joined = b"".join(parts)
        assert joined == expected, f"lazy_threshold={threshold}: " + first_difference(
            joined, expected
        )
    return expected


# -- bodies ----------------------------------------------------------------------------------

STR_LINE_BREAKS = "\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
"""Line breaks to ``str.splitlines()`` but not to ``bytes.splitlines()``."""


def qp_edge_lines(length: int, end: str, non_ascii: bool) -> str:
    """Lines of exactly ``length`` characters ending in ``end`` (soft-break territory for
    quoted-printable), with and without a non-ASCII character to make it non-7bit."""
    line = ("é" if non_ascii else "x") + "y" * (length - 2) + end
    return "\n".join([line, line + "z", line[:-1], line]) + end + "\n" + line


def awkward_text(size: int, seed: int) -> str:
    """``size`` characters from every kind of awkward character, shuffled, so that chunked
    streaming cuts between every pair of them somewhere."""
    alphabet = [
        *string.ascii_letters,
        *" \t=.",
        *"\n" * 8,
        "\r\n",
        "\r",
        "\n\r",
        "\n.",
        "\n..",
        "\nFrom ",
        *STR_LINE_BREAKS,
        "\x00",
        "\x01",
        "\x1b",
        "\x7f",
        "é",
        "中",
        "🎉",
    ]
    rng = random.Random(seed)
    return "".join(rng.choices(alphabet, k=size))[:size]


BODIES: dict[str, Callable[[], str]] = {
    "empty": lambda: "",
    "no-final-newline": lambda: "Hello",
    "lf": lambda: "a\nb\n",
    "crlf": lambda: "a\r\nb\r\n",
    "cr": lambda: "a\rb\r",
    "cr-at-end": lambda: "a\nb\r",
    "only-cr": lambda: "\r",
    "only-lf": lambda: "\n",
    "only-crlf": lambda: "\r\n",
    "blank-lines": lambda: "\n\n\r\n\r\r\n\n",
    "lf-cr": lambda: "a\n\rb\n\r",
    "mixed-endings": lambda: "a\r\nb\nc\rd\n\re\r\r\nf\r\n\rg\r",
    "dots": lambda: ".\n..\n.a\n..b\r\n.\r\n.\r.\r..",
    "dot-first": lambda: ".start",
    "dot-only": lambda: ".",
    "from-lines": lambda: "From me\nFrom \n>From x\r\nFrom\rFrom here",
    "from-first": lambda: "From the start\n",
    "line-78": lambda: "x" * 78 + "\n",
    "line-79": lambda: "x" * 79,
    "line-998": lambda: "x" * 998 + "\n" + "y" * 998,
    "line-999": lambda: "x" * 999 + "\nend\n",
    "line-2000": lambda: "x" * 2000,
    "line-2000-words": lambda: "word " * 400 + "\n" + "w " * 1000,
    "line-2000-spaces": lambda: " " * 2000 + "\n",
    "line-2000-non-ascii": lambda: "é" * 2000 + "\n",
    "line-2000-dots": lambda: "." * 2000,
    "non-ascii": lambda: "café naïve\n中文\n🎉 emoji 👍🏽\n",
    "non-ascii-no-newline": lambda: "🎉",
    "emoji-only": lambda: "🎉" * 30,
    "cjk-long": lambda: "中" * 500 + "\n" + "文" * 50,
    "str-line-breaks": lambda: "".join(f"{c}x{c}" for c in STR_LINE_BREAKS) + "\n",
    "str-line-breaks-non-ascii": lambda: "é" + "\n".join(STR_LINE_BREAKS) + "é",
    **{
        f"str-line-break-at-end-{ord(c):x}": (lambda c=c: "x" + c)  # type: ignore[misc]
        for c in STR_LINE_BREAKS
    },
    "str-line-breaks-long": lambda: ("y" * 70 + "\x85\u2028" + "é") * 40,
    "trailing-whitespace": lambda: "a \nb\t\nc  \r\nd \t\n \n\t\n \r\n\t\r end ",
    "trailing-whitespace-non-ascii": lambda: "é \nb\t\nc  \r\nd \t\n \n\t\r\né\t",
    **{
        f"qp-{length}-{name}-{'utf8' if non_ascii else 'ascii'}": (
            lambda length=length, end=end, non_ascii=non_ascii: qp_edge_lines(  # type: ignore[misc]
                length, end, non_ascii
            )
        )
        for length in (75, 76, 77, 78, 79)
        for name, end in (("space", " "), ("tab", "\t"), ("equals", "="), ("x", "x"))
        for non_ascii in (False, True)
    },
    "equals": lambda: "a=b\n=\n==\n=3D\n=\r\n=20\n=\n",
    "equals-non-ascii": lambda: "é=\n=é\n" + "=" * 200,
    "controls": lambda: "\x00\x01\x07\x08\x1b\x7f nul\n\x00",
    "controls-non-ascii": lambda: "é\x00\x1b\x7f\x00" * 30,
    "many-lines": lambda: "\n".join(f"line {i}" for i in range(5000)),
    "many-lines-crlf-dots": lambda: "".join(f".{i}\r\n" for i in range(5000)),
    "big-ascii": lambda: "".join(f"Line {i:06d} of a big body.\n" for i in range(11_200)),
    "big-non-ascii": lambda: "Zeile mit Ümlaut, é und 中文 🎉.\n" * 9_000,
    "big-long-lines": lambda: ("é" + "x" * 1200 + " \n") * 250,
    "big-awkward": lambda: awkward_text(300_000, 1),
    "awkward": lambda: awkward_text(5_000, 2),
}


@pytest.mark.parametrize("subtype", ["plain", "html"])
@pytest.mark.parametrize("body", list(BODIES))
def test_body(body: str, subtype: str) -> None:
    check(make(BODIES[body](), subtype=subtype))


# -- alternatives ----------------------------------------------------------------------------

HTML = "<p>Hello <b>world</b></p>\n"
HTML_LONG = "<p>" + "Grüße aus Köln, 中文 🎉 " * 150 + "</p>\n<p>short</p>\n"

ALTERNATIVES: dict[str, MessageFactory] = {
    "short": lambda: make("Hello world\n", alternatives=[(HTML, "text/html")]),
    "long-non-ascii": lambda: make("Grüße " * 400 + "\n", alternatives=[(HTML_LONG, "text/html")]),
    "html-no-newline": lambda: make("text", alternatives=[("<p>é</p>", "text/html")]),
    "html-awkward": lambda: make(
        awkward_text(300, 3), alternatives=[(awkward_text(3000, 4), "text/html")]
    ),
    "html-dots-cr": lambda: make(
        ".a\r.b\n", alternatives=[(".\r\n..\r.\n\rFrom x\r", "text/html")]
    ),
    "empty-body": lambda: make("", alternatives=[(HTML, "text/html")]),
    "empty-alternative": lambda: make("text\n", alternatives=[("", "text/html")]),
    "two-alternatives": lambda: make(
        "text\n", alternatives=[(HTML, "text/html"), ("# Hi é\n", "text/markdown")]
    ),
    "big-html": lambda: make(
        "See the HTML part.\n",
        alternatives=[("<p>Zeile é 中 🎉 " + "x" * 90 + "</p>\n" * 3000, "text/html")],
    ),
}


@pytest.mark.parametrize("factory", list(ALTERNATIVES.values()), ids=list(ALTERNATIVES))
def test_alternatives(factory: MessageFactory) -> None:
    check(factory())


# -- attachments -----------------------------------------------------------------------------


def random_bytes(size: int, seed: int, *, newline: bool = False) -> bytes:
    data = random.Random(seed).randbytes(size)
    return data[:-1] + b"\n" if newline and data else data


BINARY_SIZES = (0, 1, 2, 3, 56, 57, 58, 114, 1000, 100_000)

ATTACHMENTS: dict[str, MessageFactory] = {
    **{
        f"binary-{size}-{mimetype.split('/')[1]}{'-nl' if newline else ''}": (
            lambda size=size, mimetype=mimetype, newline=newline: make(  # type: ignore[misc]
                "See attached.\n",
                attachments=[("data.bin", random_bytes(size, size, newline=newline), mimetype)],
            )
        )
        for size in BINARY_SIZES
        for mimetype in ("application/pdf", "application/octet-stream")
        for newline in (False, True)
    },
    "binary-all-newlines": lambda: make(
        "x\n", attachments=[("n.bin", b"\n" * 200 + b"\r\n\r" * 50, "application/octet-stream")]
    ),
    "text-str-plain": lambda: make(
        "x\n", attachments=[("notes.txt", "Hello é\nline 2\r\n.dot\n", "text/plain")]
    ),
    "text-str-csv": lambda: make("x\n", attachments=[("t.csv", "a,b\r\nc,é\r\n", "text/csv")]),
    "text-str-awkward": lambda: make(
        "x\n", attachments=[("a.txt", awkward_text(4000, 5), "text/plain")]
    ),
    "text-str-long-lines": lambda: make(
        "x\n", attachments=[("l.txt", "y" * 3000 + "\n" + "é" * 1500, "text/plain")]
    ),
    "text-str-big": lambda: make(
        "x\n", attachments=[("big.txt", "Zeile é 中 🎉 Ende.\n" * 10_000, "text/plain")]
    ),
    "text-str-empty": lambda: make("x\n", attachments=[("e.txt", "", "text/plain")]),
    "text-bytes-utf8": lambda: make(
        "x\n", attachments=[("u.txt", "héllo wörld\n中\n".encode(), "text/plain")]
    ),
    "text-bytes-ascii-csv": lambda: make(
        "x\n", attachments=[("u.csv", b"a,b\r\n1,2\r\n", "text/csv")]
    ),
    "text-bytes-invalid-utf8": lambda: make(
        "x\n", attachments=[("bad.txt", b"\xff\xfe", "text/plain")]
    ),
    "text-bytes-invalid-utf8-big": lambda: make(
        "x\n", attachments=[("bad.txt", b"\xff" + random_bytes(5000, 7), "text/plain")]
    ),
    "non-ascii-filename": lambda: make(
        "x\n", attachments=[("résumé 中文 🎉.pdf", random_bytes(300, 8), "application/pdf")]
    ),
    "long-non-ascii-filename": lambda: make(
        "x\n", attachments=[("ä" * 120 + ".txt", "content\n", "text/plain")]
    ),
    "empty-body-with-attachments": lambda: make(
        "",
        attachments=[
            ("a.pdf", random_bytes(1000, 9), "application/pdf"),
            ("b.txt", "text é\n", "text/plain"),
        ],
    ),
    "empty-body-one-attachment": lambda: make(
        "", attachments=[("a.bin", random_bytes(57, 10), "application/octet-stream")]
    ),
    "html-body-with-attachment": lambda: make(
        "<p>é</p>", subtype="html", attachments=[("a.bin", b"\x00\x01", "application/pdf")]
    ),
    "everything": lambda: make(
        "Grüße,\n.dot\r\nFrom here\n" + "x" * 1200 + "\n",
        alternatives=[(HTML_LONG, "text/html")],
        attachments=[
            ("a.pdf", random_bytes(100_000, 11), "application/pdf"),
            ("b.csv", "a,b\r\nc,é\r\n", "text/csv"),
            ("c.txt", b"\xff\xfe", "text/plain"),
            ("d.txt", "é".encode(), "text/plain"),
            ("résumé.bin", random_bytes(58, 12, newline=True), "application/octet-stream"),
        ],
    ),
    "everything-empty-body": lambda: make(
        "",
        alternatives=[(HTML, "text/html")],
        attachments=[("a.bin", random_bytes(114, 13), "application/octet-stream")],
    ),
}


@pytest.mark.parametrize("factory", list(ATTACHMENTS.values()), ids=list(ATTACHMENTS))
def test_attachments(factory: MessageFactory) -> None:
    check(factory())


# -- other charsets --------------------------------------------------------------------------

LATIN1_BODY = "Grüße aus Köln, naïve café ½ £ ÿ\n.dot\r\nFrom x\r" + "é" * 100 + " \n= \n"


def latin1_messages() -> dict[str, MessageFactory]:
    latin1 = functools.partial(make, subject="Grüße ½")  # "✓" has no latin-1 byte
    return {
        "body": lambda: latin1(LATIN1_BODY),
        "html": lambda: latin1(LATIN1_BODY, subtype="html"),
        "long-lines": lambda: latin1(("ü" * 90 + "x" * 1000 + " \n") * 3),
        "big": lambda: latin1(LATIN1_BODY * 2000),
        "alternative-and-attachments": lambda: latin1(
            LATIN1_BODY,
            alternatives=[("<p>" + LATIN1_BODY + "</p>", "text/html")],
            attachments=[
                ("t.txt", LATIN1_BODY, "text/plain"),
                ("c.csv", "a;ä\r\n", "text/csv"),
                ("b.bin", random_bytes(1000, 14), "application/octet-stream"),
            ],
        ),
    }


LATIN1 = latin1_messages()


@pytest.mark.parametrize("name", list(LATIN1))
def test_default_charset_latin1(name: str) -> None:
    with override_settings(DEFAULT_CHARSET="iso-8859-1"):
        expected = check(LATIN1[name]())
    assert b"iso-8859-1" in expected.lower()


@pytest.mark.parametrize("name", list(LATIN1))
def test_message_encoding_latin1(name: str) -> None:
    message = LATIN1[name]()
    message.encoding = "iso-8859-1"
    expected = check(message)
    assert b"iso-8859-1" in expected.lower()


# -- where a streamed payload is cut, and what decides its encoding ---------------------------

WINDOW = 65_536
"""Payloads are encoded a slice of about this many characters at a time (64 KiB, the
module's slice size; most chunk sizes divide it)."""

PROBES = [
    *STR_LINE_BREAKS,
    "\r\n",
    "\r",
    "\n\r",
    "\r\r\n",
    "\n\n",
    ".",
    "..",
    ".\r\n",
    "From ",
    " \n",
    "\t\n",
    "=\n",
    "=",
    " ",
    "é",
    "中",
    "🎉",
    "\x00",
]


def segmented(head: str = "", tail: str = "", probes: Sequence[str] = PROBES) -> str:
    """``head``, then one segment of exactly ``WINDOW`` characters per probe, each starting
    with its probe, then ``tail``.  Segments end in LF, or in CR before a segment that
    starts with LF (a CR LF, or LF CR, straddling the window's end)."""
    out = [head]
    used = len(head)
    for index, probe in enumerate(probes):
        following = probes[index + 1] if index + 1 < len(probes) else ""
        end = "\r" if following.startswith(("\n", "\r")) else "\n"
        room = WINDOW - used - len(probe) - len(end)
        filler = ("y" * 63 + "\n") * (room // 64) + "y" * (room % 64)
        out += [probe, filler, end]
        used = 0
    out.append(tail)
    return "".join(out)


CJK_HEAD = ("中文字符" * 10 + "\n") * 10
"""Ten long lines of three-byte characters: Django 6 chooses base64 over quoted-printable
from the first ten lines."""
LONG_TAIL = "q" * 1000 + "\n"
"""Over 78 bytes (Django 6: not 7bit/8bit) and over 998 (Django 5.2: quoted-printable)."""
FILLER = ("y" * 63 + "\n") * 2000


SLICES: dict[str, MessageFactory] = {
    "7bit": lambda: make(segmented(probes=[probe for probe in PROBES if probe.isascii()])),
    "8bit": lambda: make(segmented()),
    "quoted-printable": lambda: make(segmented(tail=LONG_TAIL)),
    "base64": lambda: make(segmented(CJK_HEAD, LONG_TAIL)),
    "alternative-and-attachment": lambda: make(
        "Body.\n",
        alternatives=[(segmented(tail=LONG_TAIL), "text/html")],
        attachments=[("s.txt", segmented(CJK_HEAD, LONG_TAIL), "text/plain")],
    ),
    "latin1": lambda: make(
        segmented(tail="ÿ" * 1000)
        .replace("中", "¤")
        .replace("🎉", "½")
        .replace("\u2028", "")
        .replace("\u2029", ""),
        encoding="iso-8859-1",
        subject="latin-1",
    ),
    # lines longer than the window: cut after the next line break, wherever it is
    "long-line-crlf": lambda: make("x" * (WINDOW - 1) + "\r\n" + FILLER),
    "long-line-cr": lambda: make("x" * (WINDOW - 1) + "\r" + FILLER),
    "long-line-lf-cr": lambda: make("x" * (WINDOW - 1) + "\n\r" + FILLER),
    "long-line-crlf-earlier": lambda: make("x" * (WINDOW - 2) + "\r\n" + FILLER),
    "long-line-no-break": lambda: make(FILLER + "x" * (WINDOW * 2 + 5)),
    "long-line-non-ascii": lambda: make(FILLER + "é" * (WINDOW + 3) + "\r" + FILLER),
    # the decisions (7bit / 8bit / quoted-printable / base64) hang on the last line
    "non-ascii-last": lambda: make(FILLER * 20 + "é"),
    "79-bytes-last": lambda: make(FILLER * 20 + "x" * 79),
    "78-bytes-last": lambda: make(FILLER * 20 + "x" * 78),
    "80-bytes-40-chars-last": lambda: make(FILLER * 20 + "é" * 40 + "\n"),
    "999-bytes-last": lambda: make(FILLER * 20 + "x" * 999),
    "998-bytes-last": lambda: make(FILLER * 20 + "x" * 998 + "\n"),
    "999-bytes-500-chars-last": lambda: make(FILLER * 20 + "é" * 499 + "x"),
    "str-line-breaks-in-long-line": lambda: make(FILLER * 20 + ("abc" * 33 + "\u2028") * 15),
    "nel-in-long-line": lambda: make(FILLER * 20 + ("é" * 40 + "\x85") * 30 + "\n"),
    # ... or on the first ten lines (Django 6 sniffs them for quoted-printable vs base64)
    "cjk-after-ten-lines": lambda: make(("a\n" * 10) + CJK_HEAD * 200 + LONG_TAIL),
    "cjk-tenth-line": lambda: make(("a\n" * 9) + "中" * 400 + "\n" + FILLER + LONG_TAIL),
    "cjk-eleventh-line": lambda: make(("a\n" * 10) + "中" * 400 + "\n" + FILLER + LONG_TAIL),
    "cjk-after-ten-lf-cr": lambda: make(("a\n\r" * 5) + "中" * 400 + "\n" + FILLER + LONG_TAIL),
    "cjk-after-ten-crlf": lambda: make(("a\r\n" * 10) + "中" * 400 + "\n" + FILLER + LONG_TAIL),
    "cjk-after-nine-crlf": lambda: make(("a\r\n" * 9) + "中" * 400 + "\n" + FILLER + LONG_TAIL),
    "cjk-after-ten-str-breaks": lambda: make(
        ("a\u2028" * 10) + "中" * 400 + "\n" + FILLER + LONG_TAIL
    ),
    # exactly ten lines (Django 6 then keeps its sniffed quoted-printable), and eleven
    "ten-long-lines": lambda: make(("é" + "x" * 200 + "\n") * 10),
    "ten-long-lines-no-newline": lambda: make(("é" + "x" * 200 + "\n") * 9 + "x" * 200),
    "eleven-long-lines": lambda: make(("é" + "x" * 200 + "\n") * 11),
    "ten-long-lines-trailing-space": lambda: make(("é" + "x" * 200 + " \n") * 10),
    "ten-cjk-lines": lambda: make(("中" * 100 + "\n") * 10),
    "nine-long-lines": lambda: make(("é" + "x" * 200 + "\n") * 9),
    # binary attachments around the base64 slices (multiples of 57 bytes)
    **{
        f"binary-{size}": (
            lambda size=size: make(  # type: ignore[misc]
                "x\n", attachments=[("b.bin", random_bytes(size, size), "application/pdf")]
            )
        )
        for size in (57 * 1149 - 1, 57 * 1149, 57 * 1149 + 1, WINDOW, 2 * 57 * 1149 + 56)
    },
}


@pytest.mark.parametrize("factory", list(SLICES.values()), ids=list(SLICES))
def test_slices_and_decisions(factory: MessageFactory) -> None:
    check(factory())


def test_segments_are_as_designed() -> None:
    body = segmented(CJK_HEAD, LONG_TAIL)
    starts = range(0, len(PROBES) * WINDOW, WINDOW)
    assert [body[start] for start in starts][1:] == [probe[0] for probe in PROBES][1:]
    assert body.startswith(CJK_HEAD + PROBES[0])
    assert len(body) == len(PROBES) * WINDOW + len(LONG_TAIL)


# -- attachments that attach() would not make, and boundaries in the content ----------------


def direct_attachments() -> dict[str, MessageFactory]:
    def with_attachment(item: object) -> EmailMessage:
        message = make(FILLER)
        message.attachments.append(item)
        return message

    def forwarded(body: str) -> bytes:
        inner = (
            f"Subject: inner\r\nFrom: a@example.com\r\nMessage-ID: <i@example.test>\r\n\r\n{body}"
        )
        return inner.encode()

    return {
        # not through attach(): no decoding of text bytes, no guessing
        "str-as-octet-stream": lambda: with_attachment(
            ("s.bin", "é text\n" * 20_000, "application/octet-stream")
        ),
        "forwarded-message": lambda: make(
            FILLER, attachments=[("fwd.eml", forwarded(FILLER), "message/rfc822")]
        ),
        "forwarded-django-message": lambda: make(
            FILLER, attachments=[("fwd.eml", make("inner é\n" * 10_000), "message/rfc822")]
        ),
        "mime-part": lambda: with_attachment(mime_attachment("inner é\n" * 10_000)),
        "boundary-like-text": lambda: make(
            FILLER + "--===============0123456789012345678==\n" * 3,
            alternatives=[("--===============0123456789012345678==--\n" * 3, "text/html")],
        ),
    }


def mime_attachment(text: str) -> object:
    """A MIME part attached as it is (Django 6: a MIMEPart; 5.2: a MIMEBase)."""
    if django.VERSION >= (6, 0):
        part = email.message.MIMEPart()
        part.set_content(text, filename="part.txt")
        return part
    return MIMEText(text, "plain", "utf-8")


DIRECT = direct_attachments()


@pytest.mark.parametrize("factory", list(DIRECT.values()), ids=list(DIRECT))
def test_direct_attachments(factory: MessageFactory) -> None:
    check(factory())


def first_boundary(seed: int) -> str:
    """The first MIME boundary the stdlib's generator draws after ``random.seed(seed)``."""
    state = random.getstate()
    random.seed(seed)
    token = random.randrange(sys.maxsize)
    random.setstate(state)
    return "=" * 15 + f"{token:0{len(repr(sys.maxsize - 1))}d}" + "=="


@pytest.mark.parametrize("where", ["own-line", "inline"])
def test_content_holding_the_boundary(where: str) -> None:
    """The body holds the very boundary the generator is about to draw.  Over CRLF the
    stdlib does not notice (its check wants LF line ends), so Django sends it as is, and
    on its own line it ends the body part early.  serialize_parts() finds it in the
    payload and serializes the message again, which draws a new boundary."""
    boundary = first_boundary(SEED)
    line = f"--{boundary}\n" if where == "own-line" else f"see --{boundary} here\n"
    body = FILLER + line + FILLER
    message = make(body, alternatives=[(HTML, "text/html")])
    random.seed(SEED)
    assert f'boundary="{boundary}"'.encode() in serialize(message)  # Django's own bytes
    random.seed(SEED)
    joined = b"".join(serialize_parts(message, lazy_threshold=0))
    assert f'boundary="{boundary}"'.encode() not in joined
    parsed = email.message_from_bytes(joined, policy=email.policy.default)
    leaves = [part for part in parsed.walk() if not part.is_multipart()]
    assert [part.get_content_type() for part in leaves] == ["text/plain", "text/html"]
    text = cast(email.message.EmailMessage, leaves[0]).get_content()
    assert text.replace("\r\n", "\n") == body


class SignedMessage(EmailMessage):
    """A subclass that builds on the body in message(): a digest header, as a DKIM
    signer would.  A sample standing in for the body would falsify it."""

    def message(self, **kwargs: Any) -> Any:
        mime = super().message(**kwargs)
        mime["X-Body-Digest"] = hashlib.sha256(self.body.encode()).hexdigest()
        return mime


def test_a_class_building_its_own_message_is_serialized_whole() -> None:
    body = BODIES["big-ascii"]()
    message = SignedMessage("s", body, "a@example.com", ["b@example.com"], headers=HEADERS)
    parts = serialize_parts(message, lazy_threshold=0)
    assert parts == [serialize(message)]
    digest = hashlib.sha256(body.encode()).hexdigest().encode()
    assert b"X-Body-Digest:" in parts[0]
    assert digest in parts[0]


# -- the parts are usable --------------------------------------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda: make(BODIES["big-ascii"]()), id="300 KB body"),
        pytest.param(
            lambda: make(
                "x\n", attachments=[("a.bin", random_bytes(300_000, 15), "application/pdf")]
            ),
            id="300 KB attachment",
        ),
    ],
)
def test_big_payload_is_streamed_in_non_empty_parts(build: Callable[[], EmailMessage]) -> None:
    message = build()
    random.seed(SEED)
    parts = serialize_parts(message, lazy_threshold=0)
    assert len(parts) > 1
    assert all(type(part) is bytes and part for part in parts)
    random.seed(SEED)
    assert b"".join(parts) == serialize(message)


# -- any message -----------------------------------------------------------------------------

LINE_ENDS = ["\n", "\r\n", "\r", "\n\r"]
LINE_STARTS = ["\n.", "\n..", "\r\n.", "\r.", "\n\r.", "\nFrom ", "\r\nFrom ", "."]
AWKWARD = [*STR_LINE_BREAKS, "\x00", "\x01", "\x1b", "\x7f", "é", "ÿ", "中", "🎉", "=", " ", "\t"]

pieces = st.one_of(
    st.text(alphabet=string.ascii_letters + string.digits + " ,;", max_size=40),
    st.text(alphabet=string.ascii_letters + string.digits + " ,;", max_size=40),
    st.sampled_from(LINE_ENDS),
    st.sampled_from(LINE_ENDS),
    st.sampled_from(LINE_STARTS),
    st.sampled_from(AWKWARD),
    st.sampled_from(AWKWARD),
    # runs long enough for soft line breaks (76, 78) and the 998 limit
    st.builds(
        operator.mul, st.sampled_from(["x", " ", "=", "é", "x ", ". ", "\t"]), st.integers(1, 1100)
    ),
)
bodies = st.one_of(st.lists(pieces, max_size=10), st.lists(pieces, min_size=10, max_size=80)).map(
    lambda found: "".join(found)[:3000]
)
"""Empty to about 3,000 characters; hypothesis favours short lists, hence the long ones."""

attachment = st.one_of(
    st.tuples(
        st.sampled_from(["data.bin", "résumé.pdf"]),
        st.binary(max_size=400),
        st.sampled_from(["application/octet-stream", "application/pdf"]),
    ),
    st.tuples(st.just("notes.txt"), bodies, st.sampled_from(["text/plain", "text/csv"])),
    # valid UTF-8 or not: Django decodes it or makes it application/octet-stream
    st.tuples(
        st.just("raw.txt"),
        st.one_of(st.binary(max_size=200), bodies.map(str.encode)),
        st.just("text/plain"),
    ),
)


@st.composite
def messages(draw: st.DrawFn) -> EmailMessage:
    html = draw(st.one_of(st.none(), bodies))
    return make(
        draw(bodies),
        subtype=draw(st.sampled_from(["plain", "html"])),
        alternatives=[(html, "text/html")] if html is not None else [],
        attachments=draw(st.lists(attachment, max_size=2)),
    )


@SETTINGS
@given(messages(), st.sampled_from([0, 1, 64]), st.integers(0, 2**32))
def test_any_message(message: EmailMessage, threshold: int, seed: int) -> None:
    check(message, thresholds=(threshold,), seed=seed)


# -- private internals: a Python or Django where they differ --------------------------------
#
# The serializer leans on internals of the standard library and of Django.  Each test below
# makes a coherent "other version" (one whose own public paths still work, so Django's
# bytes are still the reference), imports the serializer again as a new process would, and
# checks that every message still serializes to Django's bytes, with no error at send time.

DRIFT_MESSAGES: dict[str, Callable[[], EmailMessage]] = {
    "8bit body": lambda: make(BODIES["big-non-ascii"]()),
    "quoted-printable body": lambda: make(BODIES["big-long-lines"]()),
    "ascii body with a long line": lambda: make(BODIES["big-ascii"]() + "x" * 100 + "\n"),
    "html alternative and attachment": lambda: make(
        BODIES["big-non-ascii"](),
        alternatives=[("<p>" + BODIES["big-ascii"]() + "</p>", "text/html")],
        attachments=[("a.bin", random_bytes(200_000, 3), "application/pdf")],
    ),
}


@pytest.fixture
def drift() -> Iterator[pytest.MonkeyPatch]:
    """Alter internals with the MonkeyPatch it yields; afterwards everything is restored and
    the serializer imported again as it was."""
    with pytest.MonkeyPatch.context() as patch:
        yield patch
    importlib.reload(serializer_module)


def reimported() -> ModuleType:
    """The serializer imported again, probing the internals as a new process would."""
    return importlib.reload(serializer_module)


def assert_djangos_bytes(module: ModuleType) -> None:
    """Every drift message, streamed or not, is Django's own bytes."""
    for name, build in DRIFT_MESSAGES.items():
        message = build()
        random.seed(SEED)
        expected = reference(message)
        random.seed(SEED)
        assert module.serialize(message) == expected, name
        for threshold in (0, 1000):
            random.seed(SEED)
            joined = b"".join(module.serialize_parts(message, lazy_threshold=threshold))
            assert joined == expected, f"{name}, {threshold}: " + first_difference(joined, expected)


def future_set_content(patch: pytest.MonkeyPatch, encode_text: Any) -> None:
    """A standard library whose ``_encode_text`` is ``encode_text`` (or gone, for None),
    while ``set_content()`` (Django 6's path) still works as today's."""
    stock_handler = email.contentmanager.raw_data_manager.set_handlers[str]
    stock_encode = email.contentmanager._encode_text  # type: ignore[attr-defined]

    def set_text_content(msg: Any, string: str, *args: Any, **kwargs: Any) -> Any:
        with pytest.MonkeyPatch.context() as inner:
            inner.setattr(email.contentmanager, "_encode_text", stock_encode, raising=False)
            return stock_handler(msg, string, *args, **kwargs)

    patch.setitem(email.contentmanager.raw_data_manager.set_handlers, str, set_text_content)
    if encode_text is None:
        patch.delattr(email.contentmanager, "_encode_text")
    else:
        patch.setattr(email.contentmanager, "_encode_text", encode_text)


def test_the_internals_are_found_on_the_versions_checked() -> None:
    internals = serializer_module.INTERNALS
    assert internals.builders, "Django's builder methods are the ones checked"
    assert internals.header_classes
    assert internals.fast_fold
    assert internals.encode_text is email.contentmanager._encode_text  # type: ignore[attr-defined]


def test_encode_text_missing(drift: pytest.MonkeyPatch) -> None:
    future_set_content(drift, None)
    module = reimported()
    assert_djangos_bytes(module)
    assert module.INTERNALS.encode_text is None


def test_encode_text_with_another_signature(drift: pytest.MonkeyPatch) -> None:
    stock = email.contentmanager._encode_text  # type: ignore[attr-defined]

    def encode_text(string: str, charset: str, cte: str, policy: Any, linesep: str) -> Any:
        return stock(string, charset, cte, policy)

    future_set_content(drift, encode_text)
    module = reimported()
    assert_djangos_bytes(module)
    assert module.INTERNALS.encode_text is None


def test_encode_text_returning_something_else(drift: pytest.MonkeyPatch) -> None:
    stock = email.contentmanager._encode_text  # type: ignore[attr-defined]
    future_set_content(drift, lambda *args: stock(*args)[1])  # the data only
    module = reimported()
    assert_djangos_bytes(module)
    assert module.INTERNALS.encode_text is None


def test_encode_text_changed_after_the_probe(drift: pytest.MonkeyPatch) -> None:
    # The probe passed, the call fails at send time: Django's whole path, no TypeError.
    def encode_text(string: str, charset: str) -> Any:
        raise AssertionError("not called with this signature")

    internals = serializer_module.INTERNALS
    drift.setattr(
        serializer_module,
        "INTERNALS",
        type(internals)(
            encode_text, internals.header_classes, internals.builders, internals.fast_fold
        ),
    )
    assert_djangos_bytes(serializer_module)


def future_header_registry(patch: pytest.MonkeyPatch) -> None:
    """A standard library whose HeaderRegistry keeps its map under another name (and no
    ``registry`` attribute), its own instances working as today's."""
    stock_init = email.headerregistry.HeaderRegistry.__init__
    stock_getitem = email.headerregistry.HeaderRegistry.__getitem__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        stock_init(self, *args, **kwargs)
        self._kinds = self.__dict__.pop("registry")

    def __getitem__(self: Any, name: str) -> type:
        if "_kinds" not in self.__dict__:  # made before the patch (email.policy's)
            return stock_getitem(self, name)
        with pytest.MonkeyPatch.context() as inner:
            inner.setattr(self, "registry", self._kinds, raising=False)
            return stock_getitem(self, name)

    patch.setattr(email.headerregistry.HeaderRegistry, "__init__", __init__)
    patch.setattr(email.headerregistry.HeaderRegistry, "__getitem__", __getitem__)


def test_header_registry_without_its_registry(drift: pytest.MonkeyPatch) -> None:
    future_header_registry(drift)
    module = reimported()
    assert_djangos_bytes(module)
    assert module.INTERNALS.header_classes is False


def test_header_registry_changed_after_the_probe(drift: pytest.MonkeyPatch) -> None:
    factory = serializer_module._SMTP_POLICY.header_factory
    drift.delattr(factory, "registry")
    assert_djangos_bytes(serializer_module)


def test_a_builder_of_another_django(drift: pytest.MonkeyPatch) -> None:
    """A Django whose message() calls a private method this module does not know: a
    subclass may override it to compute a header from the body (a signature), which a
    streamed sample would falsify.  Not streamed, so the digest is the real body's."""
    stock_message = EmailMessage.message

    def message(self: Any, *args: Any, **kwargs: Any) -> Any:
        mime = stock_message(self, *args, **kwargs)
        self._finish(mime)
        return mime

    def _finish(self: Any, mime: Any) -> None:
        pass

    for function in (message, _finish):
        function.__module__ = "django.core.mail.message"
        drift.setattr(EmailMessage, function.__name__, function, raising=False)
    module = reimported()

    class Signed(EmailMessage):
        def _finish(self, mime: Any) -> None:
            mime["X-Body-Digest"] = hashlib.sha256(self.body.encode()).hexdigest()

    body = BODIES["big-ascii"]()
    signed = Signed("s", body, "a@example.com", ["b@example.com"], headers=HEADERS)
    random.seed(SEED)
    expected = reference(signed)
    assert hashlib.sha256(body.encode()).hexdigest().encode() in expected
    random.seed(SEED)
    assert b"".join(module.serialize_parts(signed, lazy_threshold=0)) == expected
    assert_djangos_bytes(module)
    assert module.INTERNALS.builders is None


def test_a_builder_missing(drift: pytest.MonkeyPatch) -> None:
    name = "_add_attachment" if django.VERSION >= (6, 0) else "_create_attachment"
    drift.delattr(EmailMessage, name)  # renamed, in a Django this module does not know
    module = reimported()
    assert module.INTERNALS.builders is None
    message = make(BODIES["big-non-ascii"]())
    random.seed(SEED)
    expected = reference(message)
    random.seed(SEED)
    assert b"".join(module.serialize_parts(message, lazy_threshold=0)) == expected


# -- compat32 headers written directly (Django 5.2) ---------------------------------------

HEADER_TEXT = st.lists(
    st.sampled_from([*string.printable, " ", " ", " ", "word", "\t", "é", "=?", "\r\n"]),
    max_size=90,
).map("".join)


def fold(policy: email.policy.Policy, name: str, value: str) -> bytes | str:
    """The folded header, or the name of the error folding it raised."""
    try:
        return policy.clone(linesep="\r\n").fold_binary(name, value)
    except Exception as error:  # the stock policy refuses some values: so must ours
        return type(error).__name__


FOLD_NAMES = ("Subject", "To", "Message-ID", "X-Mailer", "X-A-Rather-Long-Name")


@SETTINGS
@given(name=st.sampled_from(FOLD_NAMES), value=HEADER_TEXT)
def test_fast_fold_writes_what_compat32_writes(name: str, value: str) -> None:
    fast = serializer_module._FastFold()
    assert fold(fast, name, value) == fold(email.policy.compat32, name, value)


@pytest.mark.parametrize("name", FOLD_NAMES)
def test_fast_fold_at_the_line_length(name: str) -> None:
    # Every length around where compat32 starts folding (78 characters with the name).
    fast = serializer_module._FastFold()
    for length in range(50, 90):
        for value in ("w" * length, ("w " * length)[:length]):
            assert fold(fast, name, value) == fold(email.policy.compat32, name, value), length


def test_fast_fold_writes_the_plain_headers_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    # The fast path is taken (else the test above would compare the stock fold with itself).
    calls: list[str] = []
    stock = email.policy.Compat32.fold_binary

    def counted(self: Any, name: str, value: Any) -> bytes:
        calls.append(name)
        return stock(self, name, value)

    monkeypatch.setattr(email.policy.Compat32, "fold_binary", counted)
    policy = serializer_module._FastFold(linesep="\r\n")
    assert policy.fold_binary("Subject", "Your order") == b"Subject: Your order\r\n"
    assert policy.fold_binary("X-Tab", "a\tb") == b"X-Tab: a\tb\r\n"
    assert calls == ["X-Tab"]


@pytest.mark.skipif(django.VERSION >= (6, 0), reason="Django 6 builds with email.policy.SMTP")
def test_a_compat32_folding_differently_turns_the_fast_fold_off(
    drift: pytest.MonkeyPatch,
) -> None:
    # A future standard library that writes "Name:value" (no space): the probe sees the
    # difference, and every header is written by the stock policy again.
    stock = email.policy.Compat32.fold_binary

    def future(self: Any, name: str, value: Any) -> bytes:
        return stock(self, name, value).replace(b": ", b":", 1)

    drift.setattr(email.policy.Compat32, "fold_binary", future)
    module = reimported()
    assert module.INTERNALS.fast_fold is False
    message = EmailMessage(
        "Your order", "Hello", "a@example.com", ["b@example.com"], headers=HEADERS
    )
    data = module.serialize(message)
    assert b"Subject:Your order\r\n" in data
    assert data == reference(message)


# -- Django 5.2's plain text messages, written directly --------------------------------------

ADDRESS = st.from_regex(r"[a-z]{1,8}@[a-z]{1,8}\.example", fullmatch=True)
NAMED = st.builds("{} <{}>".format, st.from_regex(r"[A-Z][a-z]{1,8}", fullmatch=True), ADDRESS)
ASCII_LINE = st.one_of(
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30),
    st.builds(lambda n: "l" * n, st.integers(990, 1000)),  # around the 998 limit
    st.sampled_from(["\t tab", "\x0c form feed", "trailing  "]),
)


@st.composite
def plain_messages(draw: st.DrawFn) -> EmailMessage:
    """Messages of (and around) the shape :func:`serializer._plain_text` writes: ASCII
    bodies with every line ending, subjects and addresses that fit their line or not,
    extra headers, Date and Message-ID given as in :data:`HEADERS`."""
    lines = draw(st.lists(ASCII_LINE, max_size=6))
    breaks = draw(st.lists(st.sampled_from(["\n", "\r\n", "\r"]), min_size=len(lines)))
    body = "".join(line + brk for line, brk in zip(lines, breaks, strict=False))
    if draw(st.booleans()):
        body += draw(ASCII_LINE)  # no line break at the end
    subject = draw(
        st.one_of(
            st.from_regex(r"[!-~]{1,12}( [!-~]{1,12}){0,5}", fullmatch=True),
            st.sampled_from(["two  spaces", " leading", "", "x" * 70]),
        )
    )
    extra = draw(
        st.dictionaries(
            st.sampled_from(["X-Tag", "List-Id", "X-Priority"]),
            st.from_regex(r"[!-~]{1,20}( [!-~]{1,20}){0,3}", fullmatch=True),
            max_size=2,
        )
    )
    cls = draw(st.sampled_from([EmailMessage, EmailMultiAlternatives]))
    return cls(
        subject,
        body,
        draw(st.one_of(ADDRESS, NAMED)),
        draw(st.lists(st.one_of(ADDRESS, NAMED), min_size=1, max_size=3)),
        cc=draw(st.lists(ADDRESS, max_size=2)),
        reply_to=draw(st.lists(ADDRESS, max_size=1)),
        headers={**HEADERS, **extra},
    )


@pytest.mark.skipif(django.VERSION >= (6, 0), reason="Django 5.2's compat32 messages only")
@SETTINGS
@given(plain_messages())
def test_plain_text_messages_are_djangos_bytes(message: EmailMessage) -> None:
    expected = reference(message)
    assert serialize(message) == expected
    assert b"".join(serialize_parts(message)) == expected
    written = serializer_module._plain_text(message)
    assert written is None or written == expected


@pytest.mark.skipif(django.VERSION >= (6, 0), reason="Django 5.2's compat32 messages only")
def test_a_plain_text_message_is_written_directly() -> None:
    message = EmailMessage(
        "Your order",
        "Hello,\n\nthanks.\n",
        "Shop <shop@example.com>",
        ["a@example.com"],
        headers=HEADERS,
    )
    assert serializer_module._plain_text_checked() is True
    written = serializer_module._plain_text(message)
    assert written is not None and written == reference(message)
    # Outside the shape: Django's path.
    for other in (
        EmailMessage("Your order ✓", "x", "a@example.com", ["b@example.com"]),
        EmailMessage("s", "é", "a@example.com", ["b@example.com"]),
        EmailMessage("s", "x" * 999, "a@example.com", ["b@example.com"]),
        EmailMessage("s", "x", "a@example.com", ["b@example.com"], headers={"To": "c@x.y"}),
    ):
        assert serializer_module._plain_text(other) is None


@pytest.mark.skipif(django.VERSION >= (6, 0), reason="Django 5.2's compat32 messages only")
def test_a_django_writing_plain_text_otherwise_turns_the_direct_path_off(
    drift: pytest.MonkeyPatch,
) -> None:
    # A future Django that adds a header to every text part: the check at the first
    # message sees the difference, and Django's path writes every message again.
    from django.core.mail import message as django_message

    stock = django_message.SafeMIMEText.__init__

    def future(self: Any, *args: Any, **kwargs: Any) -> None:
        stock(self, *args, **kwargs)
        self["X-Future"] = "1"

    drift.setattr(django_message.SafeMIMEText, "__init__", future)
    module = reimported()
    assert module._plain_text_checked() is False
    message = EmailMessage(
        "Your order", "Hello", "a@example.com", ["b@example.com"], headers=HEADERS
    )
    data = module.serialize(message)
    assert b"X-Future: 1\r\n" in data
    assert data == reference(message)
