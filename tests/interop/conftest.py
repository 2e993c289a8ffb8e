"""Fixtures for the interop tests: one real Postfix + Dovecot rig per test session.

A second rig, which also runs Dovecot's submission server in front of its Postfix, is
started only for the tests that ask for ``dovecot_submission_rig``/``dovecot_submission``.

Every test collected from ``tests/interop/`` gets the ``interop`` marker, so
``pytest -m "not interop"`` leaves them out. Without the daemons installed (or,
for the second rig, without ``dovecot-submissiond``) the rig's fixtures skip,
except under CI (``CI`` set), where that is an error.
Set ``SOCKETMAIL_RIG_KEEP=1`` to keep the rig's directory (configs and logs).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.interop.rig import PostfixRig, missing_binaries, missing_submission_binaries

INTEROP_DIR = Path(__file__).resolve().parent
NOT_INSTALLED = "Postfix/Dovecot not installed: apt-get install postfix dovecot-core"
SUBMISSION_NOT_INSTALLED = (
    "Dovecot's submission server not installed: apt-get install dovecot-submissiond"
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test under ``tests/interop/`` with ``interop`` (others are left alone)."""
    for item in items:
        if INTEROP_DIR in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.interop)


def _unavailable_reason() -> str | None:
    """Return why the rig cannot run on this machine, or None if it can."""
    missing = missing_binaries()
    if missing:
        return f"{NOT_INSTALLED} (missing: {', '.join(missing)})"
    if os.geteuid() != 0:
        return "the Postfix/Dovecot rig must run as root (Postfix's master needs it)"
    return None


def require_rig() -> None:
    """Skip the calling test if the rig cannot run here; fail instead when ``CI`` is set."""
    reason = _unavailable_reason()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI is set, so the interop tests must run", pytrace=False)
    pytest.skip(NOT_INSTALLED if reason.startswith(NOT_INSTALLED) else reason)


def require_dovecot_submission() -> None:
    """Like :func:`require_rig`, and also needs Dovecot's submission server installed."""
    require_rig()
    missing = missing_submission_binaries()
    if not missing:
        return
    if os.environ.get("CI"):
        pytest.fail(
            f"{SUBMISSION_NOT_INSTALLED} (missing: {', '.join(missing)}); "
            "CI is set, so the interop tests must run",
            pytrace=False,
        )
    pytest.skip(SUBMISSION_NOT_INSTALLED)


@pytest.fixture(scope="session")
def postfix_rig() -> Iterator[PostfixRig]:
    """A running :class:`PostfixRig`, started once per session and always stopped."""
    require_rig()
    rig = PostfixRig(keep_dir=bool(os.environ.get("SOCKETMAIL_RIG_KEEP")))
    rig.start()
    try:
        yield rig
    finally:
        rig.stop()


@pytest.fixture
def maildir_clean(postfix_rig: PostfixRig) -> PostfixRig:
    """The session's rig with its queue drained and every Maildir emptied first."""
    postfix_rig.clear_messages()
    return postfix_rig


@pytest.fixture(scope="session")
def dovecot_submission_rig() -> Iterator[PostfixRig]:
    """A second running rig that also runs Dovecot's submission server, relaying to its own
    Postfix (``dovecot_submission_port``); started once per session and always stopped."""
    require_dovecot_submission()
    rig = PostfixRig(keep_dir=bool(os.environ.get("SOCKETMAIL_RIG_KEEP")), dovecot_submission=True)
    rig.start()
    try:
        yield rig
    finally:
        rig.stop()


@pytest.fixture
def dovecot_submission(dovecot_submission_rig: PostfixRig) -> PostfixRig:
    """The Dovecot submission endpoint (``host``, ``dovecot_submission_port``, ``users``,
    ``ca_cert_path``) on a rig whose queue is drained and Maildir emptied first."""
    dovecot_submission_rig.clear_messages()
    return dovecot_submission_rig
