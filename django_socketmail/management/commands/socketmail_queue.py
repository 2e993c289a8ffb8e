"""``manage.py socketmail_queue``: the outbox's state, and its upkeep from cron.

::

    manage.py socketmail_queue                 # counts by mailer and status, oldest due
    manage.py socketmail_queue --recover       # expired leases -> unknown / queued
    manage.py socketmail_queue --deliver [--mailer ALIAS]   # run the delivery task here
    manage.py socketmail_queue --purge-days N  # delete terminal rows older than N days
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandParser
from django.db.models import Count, Min
from django.utils import timezone

from django_socketmail.outbox import DUE, TERMINAL, OutboxMessage

PURGE_BATCH = 1000
"""Messages deleted per statement (and per transaction) by ``--purge-days``."""


class Command(BaseCommand):
    help = "Show the outbox of queued mail; recover abandoned leases, deliver, purge."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--recover", action="store_true", help="Recover expired leases.")
        parser.add_argument("--deliver", action="store_true", help="Run delivery in-process.")
        parser.add_argument("--mailer", default=None, help="Only this mailer alias.")
        parser.add_argument(
            "--purge-days", type=int, default=None, help="Delete terminal rows older than N days."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        from django_socketmail.queue import recover
        from django_socketmail.worker import Worker

        mailer = options["mailer"]
        if options["recover"]:
            counts = recover(mailer)
            self.stdout.write(f"recovered: {counts['unknown']} unknown, {counts['queued']} queued")
        if options["deliver"]:
            mailers = [mailer] if mailer is not None else self._due_mailers()
            for name in mailers:
                counts = Worker(name).run()
                done = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "nothing due"
                self.stdout.write(f"mailer {name!r}: {done}")
        if options["purge_days"] is not None:
            cutoff = timezone.now() - timedelta(days=options["purge_days"])
            old = OutboxMessage.objects.filter(status__in=TERMINAL, created__lt=cutoff)
            if mailer is not None:
                old = old.filter(mailer=mailer)
            self.stdout.write(f"purged {self._purge(old)} messages")
        self._status(mailer)

    @staticmethod
    def _purge(old: Any) -> int:
        """Delete the rows of ``old`` with their contents, :data:`PURGE_BATCH` at a time,
        each batch in a transaction of its own (audit rows keep their history, their link
        set to NULL); return how many messages went."""
        purged = 0
        while batch := list(old.order_by().values_list("pk", flat=True)[:PURGE_BATCH]):
            OutboxMessage.objects.filter(pk__in=batch).delete()
            purged += len(batch)
        return purged

    def _due_mailers(self) -> list[str]:
        due = OutboxMessage.objects.filter(status__in=DUE, next_attempt__lte=timezone.now())
        return sorted(set(due.values_list("mailer", flat=True)))

    def _status(self, mailer: str | None) -> None:
        rows = OutboxMessage.objects.all()
        if mailer is not None:
            rows = rows.filter(mailer=mailer)
        summary = rows.values("mailer", "status").annotate(n=Count("pk")).order_by("mailer")
        if not summary:
            self.stdout.write("the outbox is empty")
            return
        for line in summary:
            self.stdout.write(f"{line['mailer'] or '(default)'}\t{line['status']}\t{line['n']}")
        oldest = rows.filter(status__in=DUE).aggregate(first=Min("next_attempt"))["first"]
        if oldest is not None:
            self.stdout.write(f"next attempt due: {oldest.isoformat()}")
