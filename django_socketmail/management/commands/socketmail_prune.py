"""``manage.py socketmail_prune``: delete audit rows older than the retention period, in batches.

Safe from cron on a large table: each batch is its own short transaction of at most
``--batch-size`` sessions (their messages and recipients go with them), so locks stay
short and an interrupted run loses nothing but time.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import router, transaction
from django.utils import timezone

from django_socketmail.conf import socketmail_setting
from django_socketmail.models import MessageLog, SessionLog


class Command(BaseCommand):
    help = "Delete django-socketmail audit log rows older than the retention period."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--days",
            type=int,
            help="Keep this many days (default: SOCKETMAIL['audit_retention_days']).",
        )
        parser.add_argument("--batch-size", type=int, default=1000)
        parser.add_argument("--dry-run", action="store_true", help="Only count.")
        parser.add_argument("--database", help="Database alias (default: the router's).")

    def handle(self, *args: Any, **options: Any) -> None:
        days = (
            options["days"]
            if options["days"] is not None
            else socketmail_setting("audit_retention_days")
        )
        if days is None:
            self.stdout.write("Retention is off (audit_retention_days is None): nothing to do.")
            return
        if not isinstance(days, int) or days < 1:
            raise CommandError(f"--days must be a whole number >= 1, got {days!r}")
        if options["batch_size"] < 1:
            raise CommandError("--batch-size must be >= 1")
        alias = (
            options["database"]
            or socketmail_setting("audit_database")
            or (router.db_for_write(SessionLog))
        )
        cutoff = timezone.now() - timedelta(days=days)
        sessions = SessionLog.objects.using(alias).filter(created__lt=cutoff)
        orphans = MessageLog.objects.using(alias).filter(session=None, created__lt=cutoff)
        if options["dry_run"]:
            self.stdout.write(
                f"Would delete {sessions.count()} sessions and "
                f"{MessageLog.objects.using(alias).filter(session__in=sessions).count()} "
                f"of their messages, plus {orphans.count()} messages without a session, "
                f"older than {cutoff:%Y-%m-%d %H:%M} ({days} days)."
            )
            return
        batch_size = options["batch_size"]
        deleted_sessions, session_rows = _delete_in_batches(SessionLog, sessions, alias, batch_size)
        _, orphan_rows = _delete_in_batches(MessageLog, orphans, alias, batch_size)
        deleted_rows = session_rows + orphan_rows
        self.stdout.write(
            f"Deleted {deleted_sessions} sessions ({deleted_rows} rows in all) older than "
            f"{cutoff:%Y-%m-%d %H:%M} ({days} days)."
        )


def _delete_in_batches(model: Any, matching: Any, alias: str, batch_size: int) -> tuple[int, int]:
    """Delete ``matching`` rows of ``model`` (and what cascades from them) in short
    transactions of at most ``batch_size`` rows; return (rows matched, rows deleted)."""
    matched = deleted = 0
    while True:
        with transaction.atomic(using=alias):
            batch = list(matching.order_by("pk").values_list("pk", flat=True)[:batch_size])
            if not batch:
                return matched, deleted
            rows, _ = model.objects.using(alias).filter(pk__in=batch).delete()
        matched += len(batch)
        deleted += rows
