"""A Django ``EmailMessage`` as the bytes Django's own SMTP backend sends, streamed in parts.

:func:`serialize` is the reference: ``message.message()`` serialized with CRLF line endings,
exactly as ``django.core.mail.backends.smtp.EmailBackend`` does it.  For a 1 MB body that
path holds the payload four to six times over at its peak (the stdlib's MIME classes
encode, decode and re-check the whole text several times, and the generator copies it
through nested buffers).

:func:`serialize_parts` returns the same bytes as a list of parts without ever holding a
large payload more than once.  Each large payload (the body, an alternative or an
attachment of at least ``lazy_threshold`` characters or bytes) is replaced, in a shallow
copy of the message, by a small *sample* that leads Django and the stdlib to the same
decisions (content type, charset, transfer encoding) as the real payload; ``message()`` of
that copy gives the exact headers and MIME structure.  Each sample's part then gets a token
as its payload, the small tree is serialized the normal way, and each token is replaced by
the real payload, encoded with the same stdlib encoder as Django's path uses, applied to
slices of about 64 KiB (cut after a line break for the line-oriented encodings, at a
multiple of the base64 line for base64).  The stdlib encoders are line-local, so the slices
concatenate to exactly what the whole payload would have given.

Anything this cannot reproduce exactly (a charset whose encoding is not line-local, a
subclass that overrides one of Django's builder methods) is serialized by :func:`serialize`
instead, and so is every message when the private internals the streaming relies on are
not as checked (see :func:`probe_internals`), or when using them fails at send time.  So
is a message one of whose payloads holds a MIME boundary drawn for it: serialized again,
it gets new boundaries (Django's own path would send the colliding one, which the stdlib's
check misses over CRLF).  ``tests/test_serializer.py`` checks the bytes against Django's
for each of these cases.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import copy
import email.charset
import email.contentmanager
import email.headerregistry
import email.message
import email.policy
import functools
import itertools
import logging
import random
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.utils import formatdate, make_msgid
from typing import TYPE_CHECKING, Any, Final, cast

import django
from django.conf import settings
from django.core.mail import message as django_mail
from django.core.mail.utils import DNS_NAME

from .smtp.content import crlf_line_breaks

if TYPE_CHECKING:
    from django.core.mail import EmailMessage

__all__ = [
    "INTERNALS",
    "LAZY_PAYLOAD_CHARS",
    "SLICE_CHARS",
    "Internals",
    "probe_internals",
    "serialize",
    "serialize_parts",
]

logger = logging.getLogger("django_socketmail")

LAZY_PAYLOAD_CHARS: Final = 64 * 1024
"""Payloads from this many characters (or bytes) up are streamed; smaller ones are not
worth the extra ``message()`` call."""
SLICE_CHARS: Final = 64 * 1024
"""About this many characters (or bytes) of a payload are encoded at a time."""

_MODERN_MESSAGE: Final = django.VERSION >= (6, 0)
"""Django 6.0 builds messages with the stdlib's modern API (``set_content()``)."""

_LINE_BREAK: Final = re.compile(r"\r\n|\r|\n")
_NON_ASCII: Final = re.compile(r"[^\x00-\x7f]")
_SNIFFED_LINES: Final = 10
"""The stdlib chooses between quoted-printable and base64 from the first ten lines."""
_LONG_LINE_BYTES: Final = 998
"""Django 5.2 quoted-printable-encodes a UTF-8 text with a line longer than this."""


def serialize(message: EmailMessage) -> bytes:
    """The message as bytes with CRLF line endings, as Django's own SMTP backend makes it."""
    if not _MODERN_MESSAGE and _plain_text_checked():
        written = _plain_text(message)
        if written is not None:
            return written
    if _SMTP_POLICY is email.policy.SMTP:
        return _as_bytes(_build(message, email.policy.SMTP))
    try:
        return _as_bytes(_build(message, _SMTP_POLICY))
    except _DRIFT_ERRORS as error:
        # The header classes are made as headers are set, while the tree is built: before
        # the generator draws any boundary, in the cases tested.
        return _djangos_whole_path(message, error, None)


def serialize_parts(
    message: EmailMessage, *, lazy_threshold: int = LAZY_PAYLOAD_CHARS
) -> list[bytes]:
    """The bytes of :func:`serialize` (byte for byte, given the same ``Date``,
    ``Message-ID`` and random MIME boundaries) as a list of non-empty parts, holding no
    payload of ``lazy_threshold`` characters or more twice: such payloads are encoded
    slice by slice into parts of their own."""
    try:
        plan = _Plan.for_message(message, lazy_threshold)
    except _DRIFT_ERRORS as error:
        return [_djangos_whole_path(message, error, None)]
    if plan is None:
        return [serialize(message)]  # the common case: nothing to stream
    state = random.getstate()  # about 20 us, for a payload of 64 KB or more
    try:
        parts = plan.serialize()
    except _DRIFT_ERRORS as error:
        return [_djangos_whole_path(message, error, state)]
    if parts is None:
        # Serialized again, the message gets new MIME boundaries (drawn from ``random``):
        # after a boundary found in a payload, that is what it needs.
        return [serialize(message)]
    return parts


def _plain_text(
    message: EmailMessage, *, date: str | None = None, message_id: str | None = None
) -> bytes | None:
    """Django 5.2's bytes for the commonest message, written directly; None when the
    message is not of that shape (then Django builds it).

    The shape: a Django ``EmailMessage`` or ``EmailMultiAlternatives`` itself (no
    subclass), no attachment or alternative, ``text/plain`` in ``utf-8``, an ASCII body
    with no line over 998 characters (Django writes it as ``7bit``), and every header one
    that ``compat32`` writes unchanged on one line (:data:`_PLAIN_VALUE`, at most 78
    characters with its name; a subject with single spaces only), none of the headers
    Django builds itself given again in ``extra_headers`` (``Date`` and ``Message-ID``
    may be).  Django's ``message()`` and the stdlib's generator take about half of a
    queued call's CPU for such a message.  ``date`` and ``message_id`` replace the ones
    made here (for :func:`_check_plain_text`); :func:`_check_plain_text` compares the
    bytes with Django's once per process, and ``tests/test_serializer.py`` on random
    messages."""
    if type(message) not in _PLAIN_CLASSES or message.attachments:
        return None
    if getattr(message, "alternatives", None) or message.content_subtype != "plain":
        return None
    if (message.encoding or settings.DEFAULT_CHARSET) != "utf-8":
        return None
    body = message.body
    if type(body) is not str or not body.isascii():
        return None
    if any(len(line) > _LONG_LINE_BYTES for line in body.splitlines()):
        return None
    extra = message.extra_headers
    given = set()
    for name in extra:
        if type(name) is not str or not _HEADER_NAME.match(name):
            return None
        given.add(name.lower())
    if given & _BUILT_HEADERS:
        return None
    subject = str(message.subject)
    if not _PLAIN_SUBJECT.match(subject):
        return None
    headers = [("Subject", subject), ("From", str(message.from_email))]
    for name, values in (("To", message.to), ("Cc", message.cc), ("Reply-To", message.reply_to)):
        if values:
            headers.append((name, ", ".join(str(v) for v in values)))
    if "date" not in given:
        headers.append(("Date", date or formatdate(localtime=settings.EMAIL_USE_LOCALTIME)))
    if "message-id" not in given:
        headers.append(("Message-ID", message_id or make_msgid(domain=DNS_NAME)))
    headers.extend((name, str(value)) for name, value in extra.items())
    lines = [*_PLAIN_TEXT_HEAD]
    for name, value in headers:
        if len(name) + len(value) + 2 > _LINE_LIMIT or not _PLAIN_VALUE.match(value):
            return None
        lines.append(f"{name}: {value}\r\n")
    lines.append("\r\n")
    # The generator's line breaks: CRLF for each, none added at the end.
    return "".join(lines).encode("ascii") + crlf_line_breaks(body.encode("ascii"))


_PLAIN_CLASSES: Final = (django_mail.EmailMessage, django_mail.EmailMultiAlternatives)
_PLAIN_TEXT_HEAD: Final = (
    'Content-Type: text/plain; charset="utf-8"\r\n',
    "MIME-Version: 1.0\r\n",
    "Content-Transfer-Encoding: 7bit\r\n",
)
_BUILT_HEADERS: Final = frozenset(
    {
        "from",
        "to",
        "cc",
        "reply-to",
        "subject",
        "content-type",
        "mime-version",
        "content-transfer-encoding",
    }
)
"""Headers Django builds itself: given again in ``extra_headers``, they take Django's path."""
_HEADER_NAME: Final = re.compile(r"[\x21-\x39\x3b-\x7e]+\Z")
_PLAIN_SUBJECT: Final = re.compile(r"[\x21-\x7e]+(?: [\x21-\x7e]+)*\Z")
_LINE_LIMIT: Final = cast(int, email.policy.compat32.max_line_length)


@functools.cache
def _plain_text_checked() -> bool:
    """Whether :func:`_plain_text` writes what Django's path writes, on samples: checked
    once per process, at the first message (it needs the settings)."""
    try:
        return _check_plain_text()
    except Exception:  # any failure means: not the internals checked
        return False


def _check_plain_text() -> bool:
    date, message_id = "Tue, 01 Jul 2025 12:00:00 -0000", "<1.2.3@plain.example>"
    samples = [
        django_mail.EmailMessage(
            "Your order", "Hello,\n\nthanks.\n", "Shop <shop@example.com>", ["a@example.com"]
        ),
        django_mail.EmailMessage(
            "Re: x",
            "a\r\nb\rc\n\nlast line, no break",
            "shop@example.com",
            ["a@example.com", "B <b@example.com>"],
            cc=["c@example.com"],
            reply_to=["r@example.com"],
            headers={"X-Tag": "one two", "List-Id": "<list.example.com>"},
        ),
        django_mail.EmailMultiAlternatives("s", "", "shop@example.com", ["a@example.com"]),
    ]
    for sample in samples:
        sample.encoding = "utf-8"
        written = _plain_text(sample, date=date, message_id=message_id)
        sample.extra_headers = {"Date": date, "Message-ID": message_id, **sample.extra_headers}
        if written is None or written != _as_bytes(
            _build(sample, email.policy.SMTP), fast_fold=False
        ):
            return False
    return True


_DRIFT_ERRORS: Final = (TypeError, AttributeError, LookupError, ValueError)
"""What a private internal whose name, signature or result changed after the probe
raises: such a failure falls back to Django's whole path."""


def _djangos_whole_path(message: EmailMessage, error: Exception, state: object) -> bytes:
    """Django's own serialization, after ``error`` on the other path.  ``state``, the
    ``random`` state from before that path drew any MIME boundary (None: it drew none), is
    restored first, so the boundaries are those Django's path would have drawn.  When the
    message itself is at fault, Django's path raises Django's own error here; when it does
    not, the internals changed after the probe (or this module has a bug): logged once."""
    if state is not None:
        random.setstate(cast(Any, state))
    data = _as_bytes(_build(message, email.policy.SMTP), fast_fold=False)
    global _drift_logged
    if not _drift_logged:
        _drift_logged = True
        logger.warning(
            "django_socketmail.serializer: serializing failed (%s: %s); messages that fail "
            "so are serialized by Django's own path.  Please report this with your Python "
            "and Django versions.",
            type(error).__name__,
            error,
        )
    return data


_drift_logged = False


class _HeaderClasses(email.headerregistry.HeaderRegistry):
    """The stdlib's header registry, making each kind of header's class once.

    The stock registry makes a new class (``type(...)``) for every header of every message:
    about a third of the time Django 6 takes to build a small message, and cyclic garbage
    (some 45 KB a message) until the collector runs.  The class depends only on the kind
    of header (the registry entry), so at most one per kind is kept.  Headers behave and
    serialize exactly as with the stock registry.
    """

    def __init__(self) -> None:
        super().__init__()
        self._made: dict[type, type] = {}

    def __getitem__(self, name: str) -> type:
        kind = self.registry.get(name.lower(), self.default_class)
        made = self._made.get(kind)
        if made is None:
            made = self._made.setdefault(kind, super().__getitem__(name))
        return made


def _build(message: EmailMessage, policy: email.policy.Policy) -> email.message.Message:
    """``message.message()``, with ``policy`` on Django 6 (which builds with it)."""
    build: Any = message.message
    if _MODERN_MESSAGE:
        return cast(email.message.Message, build(policy=policy))
    return cast(email.message.Message, build())


def _as_bytes(mime: email.message.Message, *, fast_fold: bool = True) -> bytes:
    """``mime`` as Django's backend writes it.  On Django 5.2 (``compat32`` messages) with
    ``fast_fold``, plain one-line headers are written by :class:`_FastFold` (same bytes)."""
    if _MODERN_MESSAGE:
        return mime.as_bytes()
    if fast_fold and INTERNALS.fast_fold and type(mime.policy) is email.policy.Compat32:
        mime.policy = _FAST_FOLD  # our own tree, made for this call: the generator reads it
    legacy: Any = mime  # Django 5.2's MIMEMixin.as_bytes() takes the line separator
    return cast(bytes, legacy.as_bytes(linesep="\r\n"))


_PLAIN_VALUE: Final = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?\Z")
"""A header value ``compat32`` writes unchanged when it fits on the line: printable ASCII,
single spaces or runs of them inside, no tab, no line break, nothing leading or trailing."""


class _FastFold(email.policy.Compat32):
    """``compat32`` (Django 5.2's messages), writing a plain header that fits on one line
    (:data:`_PLAIN_VALUE`, at most ``max_line_length`` with its name) directly: the stock
    fold feeds it word by word through ``email.header.Header``, about a third of the time
    Django 5.2 takes to serialize a small message, and returns the same ``name: value``.
    Every other header goes the stock way.  :func:`_probe_fast_fold` checks the sameness
    at import; ``tests/test_serializer.py`` checks it on random headers."""

    def fold_binary(self, name: str, value: Any) -> bytes:
        limit = self.max_line_length
        if (
            type(value) is str
            and (limit is None or len(name) + len(value) + 2 <= limit)
            and _PLAIN_VALUE.match(value)
        ):
            return f"{name}: {value}{self.linesep}".encode("ascii")
        return super().fold_binary(name, value)


_FAST_FOLD: Final = _FastFold()


# -- slicing ---------------------------------------------------------------------------------


def _line_slices(text: str, size: int) -> Iterator[str]:
    """``text`` in slices of about ``size`` characters, each but the last ending right
    after a line break (CR LF, CR or LF; never between a CR and its LF).  A line longer
    than ``size`` makes a longer slice."""
    start, length = 0, len(text)
    while start < length:
        end = start + size
        if end >= length:
            yield text[start:]
            return
        cut = text.rfind("\n", start, end) + 1
        if not cut:
            # A CR before the window's last character: the next one is not LF (else the
            # LF would have been found), so the CR ends a line.
            cut = text.rfind("\r", start, end - 1) + 1
        if not cut:
            found = _LINE_BREAK.search(text, end - 1)
            cut = found.end() if found else length
        yield text[start:cut]
        start = cut


def _crlf(text: str) -> bytes:
    """What the stdlib's generator writes for a payload: the text as bytes (surrogate
    escapes back to the bytes they stand for), every line break as CRLF."""
    return crlf_line_breaks(text.encode("ascii", "surrogateescape"))


def _line_safe(charset: str) -> bool:
    """Whether text in ``charset`` can be encoded slice by slice, cut at line breaks:
    a stateless codec in which CR and LF are single bytes never part of another
    character (ASCII and its 8-bit extensions, UTF-8)."""
    try:
        name = codecs.lookup(charset).name
    except LookupError:
        return False
    return name in {"utf-8", "ascii", "latin-1"} or name.startswith(("iso8859-", "cp125"))


# -- the plan --------------------------------------------------------------------------------


@dataclass(slots=True)
class _Payload:
    """A large payload taken out of the message, and the sample standing in for it."""

    content: str | bytes
    marker: str
    sample: str | bytes = ""
    charset: str = "utf-8"
    part: email.message.Message | None = None
    """The leaf of the light message's MIME tree that stands for this payload."""
    encode: _Encoder | None = None
    """How to encode the payload as the stdlib did its sample (see :func:`_encoder`)."""

    @property
    def token(self) -> str:
        return f"\x00{self.marker}\x00"

    def make_sample(self) -> bool:
        """Build the stand-in; False when this payload cannot be streamed."""
        if isinstance(self.content, bytes):
            self.sample = self.marker.encode("ascii")
            return True
        return self._make_text_sample(self.content)

    def _make_text_sample(self, text: str) -> bool:
        # The decisions to reproduce.  Django 5.2 (SafeMIMEText, charset "utf-8"):
        # quoted-printable when a line (str.splitlines) is over 998 bytes, else 7bit or 8bit
        # by whether the text is ASCII.  Django 6 (set_content): 7bit or 8bit when no line
        # (bytes.splitlines of the encoded text) is over 78 bytes, else quoted-printable or
        # base64, whichever is shorter for the first ten lines.  So the sample is the first
        # ten lines, a line as long as the longest, a non-ASCII character if the text has
        # one, and the marker (a short ASCII line, after the sniffed ones).
        if not _line_safe(self.charset):
            return False
        breaks = list(itertools.islice(_LINE_BREAK.finditer(text), _SNIFFED_LINES))
        if len(breaks) < _SNIFFED_LINES:
            return False  # so few lines that the sample's own would be sniffed
        longest = 0
        non_ascii = ""
        for piece in _line_slices(text, SLICE_CHARS):
            try:
                encoded = piece.encode(self.charset)
            except UnicodeEncodeError:
                return False  # Django's own path raises its error
            longest = max(longest, max(map(len, encoded.splitlines()), default=0))
            if not non_ascii and not piece.isascii():
                found = _NON_ASCII.search(piece)
                non_ascii = found.group() if found else ""
        if not _MODERN_MESSAGE and longest > _LONG_LINE_BYTES:
            # Django 5.2 splits with str.splitlines, which also breaks at \x0b, \x85...
            longest = max(
                len(line.encode("utf-8", "surrogateescape"))
                for piece in _line_slices(text, SLICE_CHARS)
                for line in piece.splitlines()
            )
        self.sample = "".join(
            (
                text[: breaks[-1].end()],
                "x" * longest + "\n",
                non_ascii + "\n" if non_ascii else "",
                self.marker + "\n",
            )
        )
        return True


@dataclass(slots=True)
class _Plan:
    """A message with its large payloads taken out, and how to put them back."""

    light: EmailMessage
    payloads: list[_Payload] = field(default_factory=list)

    @classmethod
    def for_message(cls, message: EmailMessage, threshold: int) -> _Plan | None:
        """The plan, or None when no payload is large enough (or none can be streamed)."""
        if not _builds_like_django(message):
            return None
        encoding = str(message.encoding or settings.DEFAULT_CHARSET)
        payloads: list[_Payload] = []
        prefix = ""

        def take(content: object, *, text: bool) -> object:
            nonlocal prefix
            if not isinstance(content, str if text else bytes) or len(content) < threshold:
                return content
            prefix = prefix or uuid.uuid4().hex[:16]
            payload = _Payload(content, f"sm{prefix}{len(payloads)}", charset=encoding)
            if not payload.make_sample():
                return content
            payloads.append(payload)
            return payload.sample

        body = take(message.body, text=True)
        alternatives = [
            _replaced(alternative, 0, take(alternative[0], text=_is_text(alternative[1])))
            for alternative in getattr(message, "alternatives", None) or ()
        ]
        attachments = [
            _replaced(attachment, 1, take(attachment[1], text=_is_text(attachment[2])))
            if isinstance(attachment, tuple) and len(attachment) == 3
            else attachment
            for attachment in message.attachments or ()
        ]
        if not payloads:
            return None  # the common case: nothing copied
        light: Any = copy.copy(message)
        light.body = body
        if alternatives:
            light.alternatives = alternatives
        if attachments:
            light.attachments = attachments
        return cls(light, payloads)

    def serialize(self) -> list[bytes] | None:
        """The message's parts, or None when the light message does not reproduce the
        original exactly (then the caller serializes it whole)."""
        mime = _build(self.light, _SMTP_POLICY)
        for payload in self.payloads:
            payload.part = _find_part(mime, payload.marker)
            if payload.part is None:
                return None
            payload.encode = _encoder(payload)
            if payload.encode is None:
                return None
            payload.part.set_payload(payload.token)
        skeleton = _as_bytes(mime)
        boundaries = [
            b"--" + boundary.encode("ascii", "surrogateescape")
            for part in mime.walk()
            if part.is_multipart() and (boundary := part.get_boundary()) is not None
        ]
        parts: list[bytes] = []
        rest = skeleton
        for payload in self.payloads:
            token = payload.token.encode("ascii")
            before, found, rest = rest.partition(token)
            if not found or token in rest:
                return None
            if before:
                parts.append(before)
            assert payload.encode is not None
            for chunk in payload.encode(payload):
                if any(boundary in chunk for boundary in boundaries):
                    # The payload holds a boundary drawn for the skeleton (whose check
                    # saw only the token; the stdlib's own misses it over CRLF anyway).
                    return None
                if chunk:
                    parts.append(chunk)
        if rest:
            parts.append(rest)
        return parts


def _builds_like_django(message: EmailMessage) -> bool:
    """Whether the message's class builds its MIME tree with Django's own code.  A class
    that overrides that may use a payload for more than its part (a header holding a
    hash of the body, a DKIM signature...), which a sample would falsify.  False for
    every message when Django's builder methods are not the ones checked."""
    builders = INTERNALS.builders
    if builders is None:
        return False
    cls = type(message)
    return all(
        getattr(getattr(cls, name, None), "__module__", _DJANGO_MAIL) == _DJANGO_MAIL
        for name in builders
    )


_DJANGO_MAIL: Final = "django.core.mail.message"


def _is_text(mimetype: object) -> bool:
    return isinstance(mimetype, str) and mimetype.split("/", 1)[0] == "text"


def _replaced(item: tuple[Any, ...], index: int, value: object) -> tuple[Any, ...]:
    """``item`` (a tuple or a named tuple, such as EmailAttachment) with one field changed."""
    if value is item[index]:
        return item
    fields = list(item)
    fields[index] = value
    return type(item)(*fields) if hasattr(item, "_fields") else tuple(fields)


def _find_part(mime: email.message.Message, marker: str) -> email.message.Message | None:
    """The one leaf whose decoded payload holds ``marker``, or None (none, or several)."""
    needle = marker.encode("ascii")
    found = None
    for part in mime.walk():
        if part.is_multipart():
            continue
        decoded = part.get_payload(decode=True)
        if isinstance(decoded, bytes) and needle in decoded:
            if found is not None:
                return None
            found = part
    return found


# -- encoders: the stdlib's own, slice by slice -------------------------------------------

_Encoder = Callable[[_Payload], Iterator[bytes]]


_TEXT_ENCODINGS: Final = frozenset({"7bit", "8bit", "quoted-printable", "base64"})


def _encoder(payload: _Payload) -> _Encoder | None:
    """How to encode ``payload`` exactly as the stdlib did for its sample, or None."""
    part = payload.part
    assert part is not None
    cte = str(part.get("Content-Transfer-Encoding", "")).lower()
    if isinstance(payload.content, bytes):
        if cte != "base64":
            return None
        return _base64_lines
    if _MODERN_MESSAGE:
        if INTERNALS.encode_text is None or cte not in {
            "7bit",
            "8bit",
            "quoted-printable",
            "base64",
        }:
            return None
        return _text_base64 if cte == "base64" else _text_modern
    charset = part.get_charset()
    if (
        not isinstance(charset, email.charset.Charset)
        or charset.get_output_charset() != charset.input_charset
        or charset.body_encoding not in (None, email.charset.QP)
    ):
        return None
    return _text_compat


def _base64_width(part: email.message.Message | None) -> int:
    """Bytes per base64 line under the part's policy (57 for 76-character lines)."""
    length = getattr(getattr(part, "policy", None), "max_line_length", None) or 78
    return max(1, length // 4 * 3)


def _base64_of(data: bytes | memoryview, width: int) -> bytes:
    """``data`` in base64, ``width`` bytes a line, each line ending in CRLF."""
    if width == 57:
        encoded = base64.encodebytes(data)
    else:
        encoded = b"".join(
            binascii.b2a_base64(data[start : start + width]) for start in range(0, len(data), width)
        )
    return encoded.replace(b"\n", b"\r\n")


def _base64_lines(payload: _Payload) -> Iterator[bytes]:
    """Bytes as ``set_bytes_content()`` (Django 6) and ``email.encoders.encode_base64()``
    (Django 5.2) encode them: base64 lines of 76 characters."""
    data = memoryview(cast(bytes, payload.content))
    width = _base64_width(payload.part)
    step = width * max(1, SLICE_CHARS // width)
    for start in range(0, len(data), step):
        yield _base64_of(data[start : start + step], width)


def _text_modern(payload: _Payload) -> Iterator[bytes]:
    """Text as ``set_content()`` encodes it in 7bit, 8bit or quoted-printable (Django 6)."""
    encode_text = INTERNALS.encode_text
    assert encode_text is not None
    assert payload.part is not None
    cte = str(payload.part["Content-Transfer-Encoding"]).lower()
    policy = payload.part.policy
    for piece in _line_slices(cast(str, payload.content), SLICE_CHARS):
        yield _crlf(encode_text(piece, payload.charset, cte, policy)[1])


def _text_base64(payload: _Payload) -> Iterator[bytes]:
    """Text as ``set_content()`` encodes it in base64 (Django 6): the encoded lines joined
    with the policy's line separator, in base64 lines."""
    assert payload.part is not None
    linesep = payload.part.policy.linesep.encode("ascii")
    width = _base64_width(payload.part)
    carry = b""
    for piece in _line_slices(cast(str, payload.content), SLICE_CHARS):
        lines = piece.encode(payload.charset).splitlines()
        block = carry + linesep.join(lines) + linesep
        whole = len(block) - len(block) % width
        if whole:
            yield _base64_of(memoryview(block)[:whole], width)
        carry = block[whole:]
    if carry:
        yield _base64_of(carry, width)


def _text_compat(payload: _Payload) -> Iterator[bytes]:
    """Text as ``Message.set_payload(text, charset)`` leaves it (Django 5.2's
    SafeMIMEText): encoded in the charset, then quoted-printable if the charset says so."""
    assert payload.part is not None
    charset = cast(email.charset.Charset, payload.part.get_charset())
    output = str(charset.get_output_charset())
    for piece in _line_slices(cast(str, payload.content), SLICE_CHARS):
        encoded = piece.encode(output)
        if charset.body_encoding == email.charset.QP:
            yield _crlf(charset.body_encode(encoded) or "")
        else:
            yield _crlf(encoded.decode("ascii", "surrogateescape"))


# -- the private internals relied on, probed once ------------------------------------------

_DJANGO_METHODS: Final = (
    # Django 5.2
    frozenset(
        {
            "message",
            "_create_message",
            "_create_alternatives",
            "_create_attachments",
            "_create_attachment",
            "_create_mime_attachment",
            "_set_list_header_if_not_empty",
        }
    ),
    # Django 6.0 and 6.1
    frozenset(
        {
            "message",
            "_add_bodies",
            "_add_attachments",
            "_add_attachment",
            "_idna_encode_address_header_domains",
            "_set_list_header_if_not_empty",
        }
    ),
)
"""``message()`` and the private methods of Django's ``EmailMessage`` and
``EmailMultiAlternatives`` in the Django versions checked: what builds the MIME tree."""


@dataclass(frozen=True, slots=True)
class Internals:
    """The private standard-library and Django internals this module relies on, as
    :func:`probe_internals` found them.  One that is missing or not as checked turns off
    what relies on it: those messages take Django's whole path instead."""

    encode_text: Callable[[str, str, str, email.policy.Policy], tuple[str, str]] | None
    """``email.contentmanager._encode_text(string, charset, cte, policy) -> (cte, data)``,
    with which ``set_content()`` (Django 6's path) encodes text.  None: on Django 6 no
    text payload is streamed."""
    header_classes: bool
    """Whether :class:`_HeaderClasses` (which reads the undocumented ``registry`` and
    ``default_class`` of ``email.headerregistry.HeaderRegistry``) makes the same header
    classes as the stock registry.  False: messages are built with the stock
    ``email.policy.SMTP``, as Django's backend does."""
    builders: frozenset[str] | None
    """The names of Django's methods that build the MIME tree; a message whose class
    overrides one is serialized whole.  None when Django's classes have a private method
    not in a checked list, or lack one of it: then no message is streamed."""
    fast_fold: bool
    """Whether :class:`_FastFold` writes the sample headers as the stock ``compat32``
    policy does (Django 5.2).  False: the stock policy writes every header."""


def probe_internals() -> Internals:
    """Find the internals :class:`Internals` lists, each checked against the public
    behaviour that uses it.  Run once, at import (:data:`INTERNALS`).

    Checked on CPython 3.10.13 and 3.11.7 with Django 5.2.19, 3.12.1 with Django 6.0.10 and
    3.13.0 with Django 6.1.3: there every internal is found and used.  On any other
    version, whatever does not pass these checks is simply not used.
    """
    return Internals(
        _probe_encode_text(), _probe_header_classes(), _probe_builders(), _probe_fast_fold()
    )


FOLD_SAMPLES: Final = (
    ("Subject", "Your order"),
    ("To", "a@example.com, B <b@example.com>"),
    ("Message-ID", "<179631148479.19786.7887122321531656200@localhost>"),
    ("X-Spaced", "a  b   c"),
    ("X-Full", "x" * 70),
    ("X-Long", "y" * 71),
    ("X-Long-Words", "z " * 36 + "zz"),
    ("X-Folded", "word " * 30 + "end"),
    ("X-Trailing", "trailing "),
    ("X-Tab", "a\tb"),
)
"""Headers on both sides of what :class:`_FastFold` writes itself."""


def _probe_fast_fold() -> bool:
    try:
        stock = email.policy.compat32.clone(linesep="\r\n")
        fast = _FastFold(linesep="\r\n")
        return all(
            fast.fold_binary(name, value) == stock.fold_binary(name, value)
            for name, value in FOLD_SAMPLES
        )
    except Exception:  # any failure means: not the policy checked
        return False


def _probe_encode_text() -> Callable[[str, str, str, email.policy.Policy], tuple[str, str]] | None:
    found = getattr(email.contentmanager, "_encode_text", None)
    if not callable(found):
        return None
    policy = email.policy.SMTP
    samples = (("7bit", "a.\n"), ("8bit", "é\n"), ("quoted-printable", "é=\n"), ("base64", "é\n"))
    try:
        for cte, text in samples:
            part = email.message.EmailMessage(policy=policy)
            part.set_content(text, charset="utf-8", cte=cte)
            body = part.as_bytes().partition(b"\r\n\r\n")[2]
            got_cte, data = found(text, "utf-8", cte, policy)
            if got_cte != cte or _crlf(data) != body:
                return None
    except Exception:  # any failure means: not the function checked
        return None
    return cast(Callable[[str, str, str, email.policy.Policy], tuple[str, str]], found)


def _probe_header_classes() -> bool:
    try:
        ours, stock = _HeaderClasses(), email.headerregistry.HeaderRegistry()
        for name in ("subject", "to", "message-id", "content-type", "x-anything"):
            made = ours[name]
            if ours[name] is not made or made.__bases__ != stock[name].__bases__:
                return False
    except Exception:  # any failure means: not the registry checked
        return False
    return True


def _probe_builders() -> frozenset[str] | None:
    from django.core.mail import message as django_message

    found = frozenset(
        name
        for cls in (django_message.EmailMessage, django_message.EmailMultiAlternatives)
        for name, value in vars(cls).items()
        if callable(value)
        and (name == "message" or (name.startswith("_") and not name.startswith("__")))
    )
    return found if found in _DJANGO_METHODS else None


INTERNALS: Final = probe_internals()
"""The internals found at import."""

_SMTP_POLICY: Final = (
    email.policy.SMTP.clone(header_factory=_HeaderClasses())
    if INTERNALS.header_classes
    else email.policy.SMTP
)
"""Django's SMTP backend serializes with ``email.policy.SMTP``: the same, with
:class:`_HeaderClasses` when it passed its probe."""
