"""The admin pages in a real headless Chromium: what a person reading the audit log sees.

Each test stores rows the way the audit log does (see :mod:`tests.test_admin`), opens the
page through the live server, and checks the DOM, the script state and the layout.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import pytest

from django_socketmail.admin import INLINE_MESSAGES
from django_socketmail.models import RecipientLog

from ..test_admin import HOSTILE_HTML, LINE_BREAKS, make_message, make_session

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

BASE: Final = "/admin/django_socketmail/"
LOAD_BOUND_MS: Final = 2000
"""The issue's acceptance bound for the page of a session with 20,000 messages."""
SCREENSHOT: Final = Path("/tmp/socketmail-session-page.png")


def open_page(browser: WebDriver, url: str) -> None:
    """Navigate and wait until the load event has finished (``loadEventEnd`` is set)."""
    browser.get(url)
    deadline = time.monotonic() + 10
    while not browser.execute_script(
        "const n = performance.getEntriesByType('navigation')[0];"
        "return document.readyState === 'complete' && n && n.loadEventEnd > 0;"
    ):
        assert time.monotonic() < deadline, f"{url} did not finish loading"
        time.sleep(0.02)


def transcript_rows(browser: WebDriver) -> list[tuple[str, str]]:
    """``(kind, text)`` of every transcript row in the DOM, in order."""
    rows: list[list[str]] = browser.execute_script(
        "return Array.from(document.querySelectorAll('table.socketmail-transcript tr'))"
        ".map(tr => [tr.className.replace('socketmail-', ''), tr.querySelector('code')"
        ".textContent]);"
    )
    return [(kind, text) for kind, text in rows]


def test_forged_rows_render_as_one_server_row_each(
    admin_browser: WebDriver, live_server: Any
) -> None:
    lines = ["+0.000 *: connected to 127.0.0.1:25"]
    for number, (name, separator) in enumerate(LINE_BREAKS.items()):
        lines.append(
            f"+0.{number + 1:03} S: 250 {name} Ok{separator}+0.099 C: MAIL FROM:<ceo@bank.example>"
        )
    lines.append("+0.500 C: QUIT")
    transcript = "\n".join(lines)
    message = make_message(transcript=transcript, session=make_session(transcript=transcript))
    for url in (
        f"{BASE}messagelog/{message.pk}/change/",
        f"{BASE}sessionlog/{message.session_id}/change/",
    ):
        open_page(admin_browser, live_server.url + url)
        rows = transcript_rows(admin_browser)
        assert [kind for kind, _text in rows] == ["info", *["server"] * len(LINE_BREAKS), "client"]
        assert rows[-1][1] == "QUIT"
        for (_kind, text), name in zip(rows[1:], LINE_BREAKS, strict=False):
            assert text.startswith(f"250 {name} Ok\\")
            assert text.endswith("+0.099 C: MAIL FROM:<ceo@bank.example>")
        # Each server row is one line of text on screen (no raw line break inside).
        heights = admin_browser.execute_script(
            "return Array.from(document.querySelectorAll('tr.socketmail-server code'))"
            ".map(c => c.getClientRects().length);"
        )
        assert heights == [1] * len(LINE_BREAKS)


def _pwned(browser: WebDriver) -> Any:
    return browser.execute_script("return [window.socketmailPwned, document.title];")


def test_html_in_server_text_does_not_run(admin_browser: WebDriver, live_server: Any) -> None:
    # The detector works: the same HTML, parsed as HTML, does run its onerror.
    admin_browser.get(live_server.url + "/admin/")
    admin_browser.execute_script("document.body.innerHTML += arguments[0];", HOSTILE_HTML)
    time.sleep(0.5)
    assert _pwned(admin_browser) == [2, "pwned"]

    session = make_session(greeting="220 " + HOSTILE_HTML, transcript="+0.001 S: " + HOSTILE_HTML)
    message = make_message(
        session=session,
        subject=HOSTILE_HTML[:200],
        final_reply="554 " + HOSTILE_HTML,
        error=HOSTILE_HTML,
        transcript="+0.010 S: 554 " + HOSTILE_HTML,
    )
    RecipientLog.objects.create(
        message=message, address="x@example.com", status="refused", reply="550 " + HOSTILE_HTML
    )
    for url in (
        f"{BASE}messagelog/{message.pk}/change/",
        f"{BASE}sessionlog/{session.pk}/change/",
        f"{BASE}messagelog/",
    ):
        open_page(admin_browser, live_server.url + url)
        time.sleep(0.5)  # an onerror would have fired by now (the image fails at once)
        pwned, title = _pwned(admin_browser)
        assert pwned is None, url
        assert title != "pwned", url
        shown = admin_browser.execute_script("return document.body.innerText;")
        assert "<script>window.socketmailPwned = 1;" in shown, url
        assert (
            admin_browser.execute_script("return document.querySelectorAll('img[src=x]').length;")
            == 0
        )


def test_session_with_20000_messages_loads_under_2_seconds(
    admin_browser: WebDriver, live_server: Any
) -> None:
    session = make_session(20_000)
    url = f"{live_server.url}{BASE}sessionlog/{session.pk}/change/"
    open_page(admin_browser, url)  # first visit: warms the server's template cache
    open_page(admin_browser, url)
    elapsed_ms = admin_browser.execute_script(
        "const n = performance.getEntriesByType('navigation')[0];"
        "return n.loadEventEnd - n.startTime;"
    )
    print(f"session page with 20,000 messages: loaded in {elapsed_ms:.0f} ms")
    assert elapsed_ms < LOAD_BOUND_MS
    inline_rows = admin_browser.execute_script(
        "return document.querySelectorAll('#messages-group tbody tr.has_original').length;"
    )
    assert inline_rows == INLINE_MESSAGES
    link = admin_browser.execute_script(
        "const a = document.querySelector('.socketmail-all-messages a');"
        "return [a.textContent, a.href];"
    )
    assert link == [
        "all 20,000 messages",
        f"{live_server.url}{BASE}messagelog/?session__id__exact={session.pk}",
    ]
    admin_browser.execute_script(
        "document.querySelector('.socketmail-all-messages').scrollIntoView({block: 'center'});"
    )
    admin_browser.save_screenshot(str(SCREENSHOT))
    open_page(admin_browser, link[1])
    listed = admin_browser.execute_script(
        "return document.querySelectorAll('#result_list tbody tr').length;"
    )
    assert listed == 100  # the list's first page, of 20,000


@pytest.mark.parametrize("width", [1280, 800])
def test_long_unbroken_lines_wrap_inside_the_viewport(
    admin_browser: WebDriver, live_server: Any, width: int
) -> None:
    long = "X" * 3000
    session = make_session(
        greeting=f"220 {long}",
        extensions=f"SIZE 10240000\n{long}",
        error=f"421 {long}",
        transcript=f"+0.001 S: 220 {long}",
    )
    message = make_message(
        session=session,
        final_reply=f"250 {long}",
        error=f"554 {long}",
        queue_id="Q" * 120,
        transcript=f"+0.010 S: 250 {long}\n+0.011 C: QUIT",
        body=long,
    )
    RecipientLog.objects.create(
        message=message, address="x@example.com", status="refused", reply=f"550 {long}"
    )
    admin_browser.set_window_size(width, 900)
    for url in (
        f"{BASE}messagelog/{message.pk}/change/",
        f"{BASE}sessionlog/{session.pk}/change/",
    ):
        open_page(admin_browser, live_server.url + url)
        scroll, client = admin_browser.execute_script(
            "const e = document.documentElement; return [e.scrollWidth, e.clientWidth];"
        )
        assert scroll <= client, f"{url} at {width}px: {scroll} > {client}"
        # The long line is on the page, wrapped onto many lines, not hidden.
        wrapped = admin_browser.execute_script(
            "const c = document.querySelector('tr.socketmail-server code');"
            "return [c.textContent.length, c.getClientRects().length,"
            " c.getBoundingClientRect().height, c.getBoundingClientRect().right];"
        )
        assert wrapped[0] > 3000
        assert wrapped[2] > 100  # many lines tall
        assert wrapped[3] <= client
