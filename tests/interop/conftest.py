"""Fixtures for the interop tests: one real Postfix + Dovecot rig per test session.

Every test collected from ``tests/interop/`` gets the ``interop`` marker, so
``pytest -m "not interop"`` leaves them out. Without the daemons installed the
rig's fixtures skip, except under CI (``CI`` set), where that is an error.
Set ``SOCKETMAIL_RIG_KEEP=1`` to keep the rig's directory (configs and logs).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.interop.rig import PostfixRig, missing_binaries

INTEROP_DIR = Path(__file__).resolve().parent
NOT_INSTALLED = "Postfix/Dovecot not installed: apt-get install postfix dovecot-core"


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
