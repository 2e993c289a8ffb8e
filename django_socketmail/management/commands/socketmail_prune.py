"""``manage.py socketmail_prune``: delete audit rows older than the retention period, in batches.

Each mailer keeps its own: the rows of a ``MAILERS`` alias (``SessionLog.mailer``) whose
``OPTIONS`` set ``audit_retention_days`` are pruned by that value (``None`` keeps them), in
that mailer's ``audit_database``; every other row (``EMAIL_BACKEND`` projects, mailers
without their own retention, aliases since removed, messages without a session) by the
project's ``SOCKETMAIL['audit_retention_days']`` (default 90).  ``--days`` overrides all.

Safe from cron on a large table: each batch is its own short transaction of at most
``--batch-size`` sessions (their messages and recipients go with them), so locks stay
short and an interrupted run loses nothing but time.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import router, transaction
from django.db.models import QuerySet
from django.utils import timezone

from django_socketmail.conf import audit_database, audit_retention, socketmail_mailers
from django_socketmail.models import MessageLog, SessionLog


@dataclass(frozen=True, slots=True)
class _Scope:
    """Rows pruned by one retention: a mailer's, or the rest (``mailer`` None)."""

    days: int | None
    database: str
    mailer: str | None = None
    excluded: tuple[str, ...] = ()
    """The rest: the mailers pruned in a scope of their own on the same database."""

    @property
    def label(self) -> str:
        if self.mailer is not None:
            return f"mailer {self.mailer!r}"
        return "the other mailers" if self.excluded else "all mailers"


class Command(BaseCommand):
    help = "Delete django-socketmail audit log rows older than the retention period."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--days",
            type=int,
            help="Keep this many days, for every mailer (default: each mailer's "
            "audit_retention_days, else SOCKETMAIL['audit_retention_days']).",
        )
        parser.add_argument("--batch-size", type=int, default=1000)
        parser.add_argument("--dry-run", action="store_true", help="Only count.")
        parser.add_argument("--database", help="Database alias (default: the router's).")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["days"] is not None and options["days"] < 1:
            raise CommandError(f"--days must be a whole number >= 1, got {options['days']!r}")
        if options["batch_size"] < 1:
            raise CommandError("--batch-size must be >= 1")
        try:
            scopes = _scopes(options["days"], options["database"])
        except ImproperlyConfigured as error:
            raise CommandError(str(error)) from None
        if all(scope.days is None for scope in scopes) and len(scopes) == 1:
            self.stdout.write("Retention is off (audit_retention_days is None): nothing to do.")
            return
        for scope in scopes:
            self._prune(scope, dry_run=options["dry_run"], batch_size=options["batch_size"])

    def _prune(self, scope: _Scope, *, dry_run: bool, batch_size: int) -> None:
        if scope.days is None:
            self.stdout.write(
                f"Retention is off for {scope.label} (audit_retention_days is None): kept."
            )
            return
        alias = scope.database
        cutoff = timezone.now() - timedelta(days=scope.days)
        sessions = SessionLog.objects.using(alias).filter(created__lt=cutoff)
        if scope.mailer is not None:
            sessions = sessions.filter(mailer=scope.mailer)
        else:
            sessions = sessions.exclude(mailer__in=scope.excluded)
        orphans = MessageLog.objects.using(alias).filter(session=None, created__lt=cutoff)
        if scope.mailer is not None:
            orphans = orphans.none()  # a message without a session has no mailer
        when = f"older than {cutoff:%Y-%m-%d %H:%M} ({scope.days} days), {scope.label}"
        if dry_run:
            self.stdout.write(
                f"Would delete {sessions.count()} sessions and "
                f"{MessageLog.objects.using(alias).filter(session__in=sessions).count()} "
                f"of their messages, plus {orphans.count()} messages without a session, "
                f"{when}."
            )
            return
        deleted_sessions, session_rows = _delete_in_batches(sessions, alias, batch_size)
        _, orphan_rows = _delete_in_batches(orphans, alias, batch_size)
        self.stdout.write(
            f"Deleted {deleted_sessions} sessions ({session_rows + orphan_rows} rows in all) "
            f"{when}."
        )


def _scopes(days: int | None, database: str | None) -> list[_Scope]:
    """What to prune by which retention: with ``--days``, everything by it; otherwise one
    scope per mailer with a retention or an audit database of its own, then the rest by
    the project's."""
    default_database = (
        database or audit_database({}, source="SOCKETMAIL") or router.db_for_write(SessionLog)
    )
    if days is not None:
        return [_Scope(days, default_database)]
    own: list[_Scope] = []
    for alias, options in socketmail_mailers().items():
        source = f"MAILERS[{alias!r}]['OPTIONS']"
        mailer_database = (
            database or audit_database(options, source=source) or router.db_for_write(SessionLog)
        )
        if "audit_retention_days" in options or mailer_database != default_database:
            own.append(_Scope(audit_retention(options, source=source), mailer_database, alias))
    excluded = tuple(s.mailer for s in own if s.database == default_database and s.mailer)
    rest = _Scope(audit_retention({}, source="SOCKETMAIL"), default_database, None, excluded)
    return [*own, rest]


def _delete_in_batches(matching: QuerySet[Any], alias: str, batch_size: int) -> tuple[int, int]:
    """Delete the ``matching`` rows (and what cascades from them) in short transactions of
    at most ``batch_size`` rows; return (rows matched, rows deleted)."""
    matched = deleted = 0
    model = matching.model
    while True:
        with transaction.atomic(using=alias):
            batch = list(matching.order_by("pk").values_list("pk", flat=True)[:batch_size])
            if not batch:
                return matched, deleted
            rows, _ = model._default_manager.using(alias).filter(pk__in=batch).delete()
        matched += len(batch)
        deleted += rows
