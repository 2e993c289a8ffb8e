"""``socketmail_prune``: each mailer's rows by its own retention, on real rows in the test
databases."""

from __future__ import annotations

import io
from datetime import timedelta

import pytest
from django.core.management import CommandError, call_command
from django.test import override_settings
from django.utils import timezone

from django_socketmail.models import MessageLog, RecipientLog, SessionLog

AGES = (3, 10, 40, 400)
"""Days old of the rows made for each mailer."""

pytestmark = pytest.mark.django_db(databases=["default", "audit"])


def ours(**options: object) -> dict[str, object]:
    return {"BACKEND": "django_socketmail.backend", "OPTIONS": {"host": "h", **options}}


MAILERS = {
    "bulk": ours(audit_retention_days=7),
    "alerts": ours(audit_retention_days=None),  # keep them
    "plain": ours(),  # the project's retention
    "other": {"BACKEND": "django.core.mail.backends.locmem.EmailBackend"},
}


def make_rows(mailer: str, *, database: str = "default") -> None:
    """A session of each age in AGES for ``mailer``, each with a message and a recipient."""
    now = timezone.now()
    for days in AGES:
        created = now - timedelta(days=days, minutes=1)
        session = SessionLog.objects.using(database).create(
            created=created, mailer=mailer, host="h", port=25, outcome="ok"
        )
        message = MessageLog.objects.using(database).create(
            session=session, created=created, status="sent", sender="s@example.com"
        )
        RecipientLog.objects.using(database).create(message=message, address="r@example.com")


def ages_left(mailer: str, *, database: str = "default") -> list[int]:
    now = timezone.now()
    return sorted(
        (now - created).days
        for created in SessionLog.objects.using(database)
        .filter(mailer=mailer)
        .values_list("created", flat=True)
    )


def prune(*args: str) -> str:
    out = io.StringIO()
    call_command("socketmail_prune", *args, stdout=out)
    return out.getvalue()


def test_each_mailer_is_pruned_by_its_own_retention() -> None:
    for mailer in ("bulk", "alerts", "plain", "", "removed"):
        make_rows(mailer)
    orphan = MessageLog.objects.create(
        session=None, created=timezone.now() - timedelta(days=40), status="sent", sender="s@x"
    )
    with override_settings(MAILERS=MAILERS, SOCKETMAIL={"audit_retention_days": 30}):
        output = prune()
    assert ages_left("bulk") == [3]
    assert ages_left("alerts") == list(AGES)
    # The project's retention: mailers without their own, the EMAIL_BACKEND rows (alias
    # ""), and rows of a mailer no longer in MAILERS.
    assert ages_left("plain") == [3, 10]
    assert ages_left("") == [3, 10]
    assert ages_left("removed") == [3, 10]
    assert not MessageLog.objects.filter(pk=orphan.pk).exists()
    # Messages and recipients went with their sessions.
    assert MessageLog.objects.count() == SessionLog.objects.count() == 1 + 4 + 2 + 2 + 2
    assert RecipientLog.objects.count() == MessageLog.objects.count()
    assert "mailer 'bulk'" in output and "(7 days)" in output
    assert "mailer 'alerts'" in output and "kept" in output


def test_project_retention_none_keeps_only_what_has_no_retention_of_its_own() -> None:
    for mailer in ("bulk", "plain"):
        make_rows(mailer)
    with override_settings(MAILERS=MAILERS, SOCKETMAIL={"audit_retention_days": None}):
        prune()
    assert ages_left("bulk") == [3]
    assert ages_left("plain") == list(AGES)


def test_days_overrides_every_retention() -> None:
    for mailer in ("bulk", "alerts", "plain", ""):
        make_rows(mailer)
    with override_settings(MAILERS=MAILERS):
        output = prune("--days", "5")
    for mailer in ("bulk", "alerts", "plain", ""):
        assert ages_left(mailer) == [3], mailer
    assert "Deleted 12 sessions" in output


def test_dry_run_counts_per_mailer_and_deletes_nothing() -> None:
    for mailer in ("bulk", "alerts", ""):
        make_rows(mailer)
    with override_settings(MAILERS=MAILERS, SOCKETMAIL={"audit_retention_days": 30}):
        output = prune("--dry-run")
    assert SessionLog.objects.count() == 12
    assert "Would delete 3 sessions and 3 of their messages" in output  # bulk
    assert "Would delete 2 sessions and 2 of their messages" in output  # the rest


def test_a_mailer_with_its_own_audit_database_is_pruned_there() -> None:
    make_rows("archive", database="audit")
    make_rows("journal", database="audit")  # the project's retention, in its own database
    make_rows("", database="default")
    mailers = {
        "archive": ours(audit_database="audit", audit_retention_days=7),
        "journal": ours(audit_database="audit"),
    }
    with override_settings(MAILERS=mailers, SOCKETMAIL={"audit_retention_days": 30}):
        prune()
    assert ages_left("archive", database="audit") == [3]
    assert ages_left("journal", database="audit") == [3, 10]
    assert ages_left("", database="default") == [3, 10]


@pytest.mark.parametrize("value", [0, "7", 1.5, True])
def test_an_invalid_mailer_retention_is_a_command_error(value: object) -> None:
    make_rows("bulk")
    mailers = {"bulk": ours(audit_retention_days=value)}
    with (
        override_settings(MAILERS=mailers),
        pytest.raises(
            CommandError, match=r"MAILERS\['bulk'\]\['OPTIONS'\]\['audit_retention_days'\]"
        ),
    ):
        prune()
    assert SessionLog.objects.count() == len(AGES)
