"""A real headless Chromium (Debian's ``chromium`` + ``chromium-driver``) on the admin.

Selenium drives ``/usr/bin/chromium`` through ``/usr/bin/chromedriver``, both given
explicitly, so Selenium Manager is not run and nothing is downloaded.  Where either is
missing the tests skip, except under ``CI=true``, where a missing browser fails them.
The live server serves the admin's static files (and ours) from a directory laid out the
way ``collectstatic`` would, so the pages are styled as in production.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import django.contrib.admin
import pytest
from django.test import override_settings

import django_socketmail

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

CHROMIUM: Final = Path("/usr/bin/chromium")
CHROMEDRIVER: Final = Path("/usr/bin/chromedriver")
WINDOW: Final = (1280, 900)
PASSWORD: Final = "browser-test-password"


def _unavailable(reason: str) -> None:
    """Skip, or fail under CI (where .ci/run installs the browser)."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session", autouse=True)
def _static_files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """``STATIC_URL``/``STATIC_ROOT`` set before the (session-scoped) live server starts,
    which reads them once, with the admin's and our static files copied in (the test
    settings have no staticfiles app).  Session-scoped like the live server, so the
    settings stay for the rest of the run (nothing else reads them)."""
    root = tmp_path_factory.mktemp("static")
    for app in (django.contrib.admin, django_socketmail):
        source = Path(app.__file__ or "").parent / "static"
        shutil.copytree(source, root, dirs_exist_ok=True)
    with override_settings(STATIC_URL="/static/", STATIC_ROOT=str(root)):
        yield


@pytest.fixture(scope="session")
def browser(live_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    """One headless Chromium for the session, with a fresh profile; it quits before the
    live server stops, so no kept-alive connection is left open on the server."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _unavailable("selenium is not installed (pip install -e '.[browser]')")
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            _unavailable(f"{path} is missing (apt-get install chromium chromium-driver)")
    # Selenium Manager is not used when the driver's path is given; offline in any case.
    os.environ["SE_OFFLINE"] = "true"
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def admin_browser(browser: WebDriver, live_server: Any) -> WebDriver:
    """The browser logged in to the live server's admin as a new superuser, through the
    login form."""
    from django.contrib.auth.models import User
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    User.objects.create_superuser("admin", "admin@example.com", PASSWORD)
    browser.delete_all_cookies()
    browser.set_window_size(*WINDOW)
    browser.get(f"{live_server.url}/admin/login/?next=/admin/")
    browser.find_element(By.NAME, "username").send_keys("admin")
    browser.find_element(By.NAME, "password").send_keys(PASSWORD)
    browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    # The click only starts the navigation: wait for the admin's page (a loaded machine, as
    # CI running two legs at once, took longer than an immediate look).
    tools = WebDriverWait(browser, 30).until(
        expected_conditions.presence_of_element_located((By.ID, "user-tools"))
    )
    assert tools.text.upper().startswith("WELCOME")
    return browser
