"""The audit log's admin: bounded pages, transcripts that cannot be forged, inert server text.

Rows are made directly in the test database (the way :mod:`.audit` stores them), so each
test states exactly what is stored, including rows stored before the transcript escaped
control characters at the source.  ``tests/browser/`` checks the same pages in Chromium.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Final

import pytest
from django.contrib.auth.models import Permission, User
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from django_socketmail.admin import (
    INLINE_MESSAGES,
    MessageLogAdmin,
    format_duration,
    render_transcript,
)
from django_socketmail.models import MessageLog, RecipientLog, SessionLog

pytestmark = pytest.mark.django_db

BASE: Final = "/admin/django_socketmail/"

LINE_BREAKS: Final = {
    "CR": "\r",
    "VT": "\x0b",
    "FF": "\x0c",
    "NEL": "\x85",
    "LS": "\u2028",
    "PS": "\u2029",
}
"""Every character that ``str.splitlines()`` splits on besides LF (and FS/GS/RS, below)."""

OTHER_SPLITLINES: Final = {"FS": "\x1c", "GS": "\x1d", "RS": "\x1e"}
"""The other ones.  LF itself cannot be inside a stored server line: the client reads
replies line by line, up to each LF."""

HOSTILE_HTML: Final = (
    "<script>window.socketmailPwned = 1; document.title = 'pwned';</script>"
    "<img src=x onerror=\"window.socketmailPwned = 2; document.title = 'pwned'\">"
)


def forged_transcript(separator: str) -> str:
    """A stored transcript whose one server line hides a forged client command behind
    ``separator``: rendered with ``splitlines()`` it reads as a client ``MAIL FROM``."""
    return (
        "+0.000 *: connected to 127.0.0.1:25\n"
        f"+0.010 S: 250 2.0.0 Ok{separator}+0.011 C: MAIL FROM:<ceo@bank.example>\n"
        "+0.012 C: QUIT"
    )


def make_session(messages: int = 0, **fields: Any) -> SessionLog:
    """A stored session with ``messages`` stored messages, bulk-created (newest has the
    highest number)."""
    values: dict[str, Any] = {
        "host": "mail.example",
        "port": 587,
        "outcome": "ok",
        "transcript": "+0.000 *: connected\n+0.010 S: 220 mail.example ESMTP",
    }
    session = SessionLog.objects.create(**(values | fields))
    start = timezone.now() - timedelta(days=1)
    MessageLog.objects.bulk_create(
        (
            MessageLog(
                session=session,
                created=start + timedelta(seconds=number),
                status="sent",
                sender="app@example.com",
                recipients=f"user{number}@example.com",
                subject=f"Message number {number}",
                final_reply="250 2.0.0 Ok: queued",
                final_reply_code=250,
                duration=0.012,
            )
            for number in range(messages)
        ),
        batch_size=2000,
    )
    return session


def make_message(**fields: Any) -> MessageLog:
    """A stored message of a new session."""
    values: dict[str, Any] = {
        "session": make_session(),
        "status": "sent",
        "sender": "app@example.com",
        "recipients": "user@example.com",
        "subject": "Hello",
        "final_reply": "250 2.0.0 Ok: queued as 4F3B2",
        "final_reply_code": 250,
        "duration": 0.04541532500002177,
    }
    return MessageLog.objects.create(**(values | fields))


@pytest.fixture
def admin_client() -> Client:
    """A client logged in as a superuser."""
    client = Client()
    client.force_login(User.objects.create_superuser("admin", "admin@example.com", "pw"))
    return client


def rows(html: str) -> list[tuple[str, str]]:
    """The transcript rows of a rendered page: ``(kind, content)`` each."""
    return re.findall(
        r'<tr class="socketmail-(\w+)">.*?<td><code>(.*?)</code></td></tr>', html, re.DOTALL
    )


def subjects(html: str) -> list[str]:
    """The numbers of the messages in the inline rows of a session page, in order."""
    return re.findall(r'<td class="field-subject">\s*<p>Message number (\d+)</p>', html)


# --- the session page: a bounded inline, a link to all messages ---------------------------


def test_session_page_with_20000_messages_is_bounded(
    admin_client: Client, django_assert_max_num_queries: Callable[..., Any]
) -> None:
    small = make_session(INLINE_MESSAGES + 10)
    admin_client.get(f"{BASE}sessionlog/{small.pk}/change/")  # warm caches (content types)
    with CaptureQueriesContext(connection) as small_queries:
        admin_client.get(f"{BASE}sessionlog/{small.pk}/change/")
    session = make_session(20_000)
    url = f"{BASE}sessionlog/{session.pk}/change/"
    # 5 on Django 5.2: login session, user, the session row, the latest messages, COUNT.
    with django_assert_max_num_queries(7) as queries:
        page = admin_client.get(url)
    assert len(queries) == len(small_queries)
    assert page.status_code == 200
    html = page.content.decode()
    shown = subjects(html)
    assert len(shown) == INLINE_MESSAGES
    # The latest ones, newest first.
    assert shown == [str(n) for n in range(19_999, 19_999 - INLINE_MESSAGES, -1)]
    link = f'href="{BASE}messagelog/?session__id__exact={session.pk}"'
    assert link in html
    assert "all 20,000 messages" in html
    listing = admin_client.get(f"{BASE}messagelog/", {"session__id__exact": session.pk})
    assert listing.status_code == 200
    assert listing.context["cl"].result_count == 20_000


def test_session_page_with_few_messages_shows_them_all(admin_client: Client) -> None:
    session = make_session(3)
    other = make_session(2)
    html = admin_client.get(f"{BASE}sessionlog/{session.pk}/change/").content.decode()
    assert subjects(html) == ["2", "1", "0"]
    assert "all 3 messages" in html
    listing = admin_client.get(f"{BASE}messagelog/", {"session__id__exact": other.pk})
    assert listing.context["cl"].result_count == 2


# --- transcripts: split on "\n" only, direction from each row's own prefix ----------------


@pytest.mark.parametrize("name", [*LINE_BREAKS, *OTHER_SPLITLINES])
def test_forged_row_renders_as_one_server_row(name: str) -> None:
    separator = (LINE_BREAKS | OTHER_SPLITLINES)[name]
    found = rows(render_transcript(forged_transcript(separator)))
    assert [kind for kind, _content in found] == ["info", "server", "client"]
    server = found[1][1]
    assert server.startswith("250 2.0.0 Ok")
    assert "MAIL FROM:&lt;ceo@bank.example&gt;" in server
    assert found[2][1] == "QUIT"
    # The separator is shown as a visible escape, not as a raw (line-breaking) character.
    assert separator not in server
    assert "\\" in server


@pytest.mark.parametrize("name", list(LINE_BREAKS))
def test_forged_row_on_the_pages(admin_client: Client, name: str) -> None:
    transcript = forged_transcript(LINE_BREAKS[name])
    message = make_message(transcript=transcript, session=make_session(transcript=transcript))
    for url in (
        f"{BASE}messagelog/{message.pk}/change/",
        f"{BASE}sessionlog/{message.session_id}/change/",
    ):
        found = rows(admin_client.get(url).content.decode())
        assert [kind for kind, _content in found] == ["info", "server", "client"], url


def test_direction_comes_only_from_the_rows_own_prefix() -> None:
    stored = "\n".join(
        [
            "+0.001 S: 250-PIPELINING",
            "C: MAIL FROM:<a@example>",  # no elapsed time: not a row of ours
            "+0.002 X: nonsense",
            "+0.003 C:MAIL FROM:<b@example>",  # no space after the colon
            "  +0.004 C: RCPT TO:<c@example>",
            "+0.005 C: RCPT TO:<d@example>",
            "",
        ]
    )
    found = rows(render_transcript(stored))
    assert [kind for kind, _content in found] == [
        "server",
        "unparsed",
        "unparsed",
        "unparsed",
        "unparsed",
        "client",
        "unparsed",
    ]
    assert found[1][1] == "C: MAIL FROM:&lt;a@example&gt;"
    assert found[5][1] == "RCPT TO:&lt;d@example&gt;"


def test_empty_transcript() -> None:
    assert "(empty)" in render_transcript("")
    assert rows(render_transcript("")) == []


# --- server text is inert ------------------------------------------------------------------


def test_html_in_server_text_is_escaped(admin_client: Client) -> None:
    session = make_session(
        greeting="220 " + HOSTILE_HTML,
        error="421 " + HOSTILE_HTML,
        transcript="+0.010 S: 220 " + HOSTILE_HTML,
    )
    message = make_message(
        session=session,
        final_reply="554 " + HOSTILE_HTML,
        error=HOSTILE_HTML,
        subject=HOSTILE_HTML[:200],
        transcript="+0.020 S: 554 " + HOSTILE_HTML,
    )
    RecipientLog.objects.create(
        message=message, address="x@example.com", status="refused", reply="550 " + HOSTILE_HTML
    )
    escaped = "&lt;script&gt;window.socketmailPwned = 1;"
    for url in (
        f"{BASE}messagelog/{message.pk}/change/",
        f"{BASE}sessionlog/{session.pk}/change/",
        f"{BASE}messagelog/",
    ):
        html = admin_client.get(url).content.decode()
        assert "<script>window.socketmailPwned" not in html, url
        assert "<img src=x" not in html, url
        assert escaped in html, url
    detail = admin_client.get(f"{BASE}messagelog/{message.pk}/change/").content.decode()
    # final reply, error, recipient reply and transcript: each shown once, escaped.
    assert detail.count(escaped) >= 4


def test_server_text_fields_escape_controls_but_keep_lines(admin_client: Client) -> None:
    message = make_message(
        final_reply="250-first line\n250 second\rline",
        session=make_session(greeting="220 hello\x1b]52;c;cHduZWQ=\x07"),
    )
    detail = admin_client.get(f"{BASE}messagelog/{message.pk}/change/").content.decode()
    assert "250-first line\n250 second\\rline" in detail
    session = admin_client.get(f"{BASE}sessionlog/{message.session_id}/change/").content.decode()
    assert "220 hello\\x1b]52;c;cHduZWQ=\\x07" in session
    assert "\x1b" not in session


# --- duration -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (0.0, "0 ms"),
        (0.0004, "0.4 ms"),
        (0.04541532500002177, "45.4 ms"),
        (0.9994, "999.4 ms"),
        (0.99996, "1.00 s"),
        (1.234, "1.23 s"),
        (59.9, "59.90 s"),
        (75.5, "1 min 15.5 s"),
        (3725.0, "62 min 5.0 s"),
        (-0.001, "-1.0 ms"),
    ],
)
def test_format_duration(seconds: float, shown: str) -> None:
    assert format_duration(seconds) == shown


def test_duration_formatted_in_list_and_detail(admin_client: Client) -> None:
    message = make_message()
    listing = admin_client.get(f"{BASE}messagelog/").content.decode()
    detail = admin_client.get(f"{BASE}messagelog/{message.pk}/change/").content.decode()
    for html in (listing, detail):
        assert "45.4 ms" in html
        assert "0.0454" not in html
    assert "elapsed" in MessageLogAdmin.list_display


def test_pages_load_the_wrapping_stylesheet(admin_client: Client) -> None:
    message = make_message(final_reply="250 " + "A" * 5000)
    for url in (f"{BASE}messagelog/{message.pk}/change/", f"{BASE}sessionlog/"):
        assert "django_socketmail/admin.css" in admin_client.get(url).content.decode()


# --- deleting: the confirmation page is bounded too ----------------------------------------


def with_recipients(session: SessionLog, per_message: int = 1) -> int:
    """Give each of the session's messages ``per_message`` recipient rows; return the count."""
    rows = [
        RecipientLog(message_id=pk, address=f"r{n}@example.com", status="delivered")
        for pk in session.messages.values_list("pk", flat=True)
        for n in range(per_message)
    ]
    RecipientLog.objects.bulk_create(rows, batch_size=2000)
    return len(rows)


def test_delete_confirmation_of_a_large_session_is_bounded(
    admin_client: Client, django_assert_max_num_queries: Callable[..., Any]
) -> None:
    session = make_session(20_000)
    with_recipients(session)
    url = f"{BASE}sessionlog/{session.pk}/delete/"
    with django_assert_max_num_queries(12):
        page = admin_client.get(url)
    assert page.status_code == 200
    html = page.content.decode()
    assert html.count("<li>") < 70
    assert dict(page.context["model_count"]) == {
        "SMTP sessions": 1,
        "messages": 20_000,
        "recipients": 20_000,
    }
    assert "20,000 messages" in html
    assert f'href="{BASE}messagelog/?session__id__exact={session.pk}"' in html
    # Confirming deletes everything, as before.
    assert admin_client.post(url, {"post": "yes"}).status_code == 302
    assert not SessionLog.objects.exists()
    assert not MessageLog.objects.exists()
    assert not RecipientLog.objects.exists()


def test_delete_selected_messages_is_bounded(admin_client: Client) -> None:
    session = make_session(500)
    with_recipients(session, per_message=2)
    pks = list(session.messages.values_list("pk", flat=True))
    page = admin_client.post(
        f"{BASE}messagelog/", {"action": "delete_selected", "_selected_action": pks}
    )
    assert page.status_code == 200
    assert page.content.decode().count("<li>") < 70
    assert dict(page.context["model_count"]) == {"messages": 500, "recipients": 1000}
    done = admin_client.post(
        f"{BASE}messagelog/",
        {"action": "delete_selected", "_selected_action": pks, "post": "yes"},
    )
    assert done.status_code == 302
    assert not MessageLog.objects.exists()
    assert not RecipientLog.objects.exists()
    assert SessionLog.objects.filter(pk=session.pk).exists()


def test_small_deletions_list_every_object(admin_client: Client) -> None:
    session = make_session(3)
    with_recipients(session)
    html = admin_client.get(f"{BASE}sessionlog/{session.pk}/delete/").content.decode()
    assert html.count("Message number") == 3
    assert html.count("Recipient: r0@example.com") == 3


def test_deleting_a_session_needs_permission_for_its_messages() -> None:
    session = make_session(200)
    staff = User.objects.create_user("staff", password="pw", is_staff=True)
    staff.user_permissions.add(
        *Permission.objects.filter(codename__in=["view_sessionlog", "delete_sessionlog"])
    )
    client = Client()
    client.force_login(staff)
    url = f"{BASE}sessionlog/{session.pk}/delete/"
    page = client.get(url)
    assert page.status_code == 200
    assert page.context["perms_lacking"] == {"message"}
    assert client.post(url, {"post": "yes"}).status_code == 403
    assert SessionLog.objects.filter(pk=session.pk).exists()
    assert session.messages.count() == 200


def test_message_list_of_one_session_says_which(admin_client: Client) -> None:
    session = make_session(3, host="smtp.one.example")
    make_session(2, host="smtp.two.example")
    listing = admin_client.get(f"{BASE}messagelog/", {"session__id__exact": session.pk})
    assert listing.context["cl"].result_count == 3
    html = listing.content.decode()
    # The filter is shown (and can be cleared), naming the session.
    assert "By session" in html
    assert f"smtp.one.example:587 at {session.created:%Y-%m-%d %H:%M:%S}" in html
    assert "smtp.two.example:587 at" not in html
    unfiltered = admin_client.get(f"{BASE}messagelog/").content.decode()
    assert "By session" not in unfiltered
    bogus = admin_client.get(f"{BASE}messagelog/", {"session__id__exact": "x'--"})
    assert bogus.status_code == 302
    assert bogus["Location"].endswith("?e=1")
