"""Limits that every worker of a mailer shares through the database, on any machine.

- ``max_connections``: a worker holds one :class:`~.outbox.MailerSlot` row (under a lease it
  renews) while its session is open; with all slots held, it sends nothing.
- ``rate_limit`` (``"30/min"``): paced evenly by one "next message allowed at" time in
  :class:`~.outbox.MailerState`, moved forward by a conditional UPDATE, so two workers never
  take the same turn.  Turns are given at :data:`PACE` of the rate, at most :data:`BURST`'s
  worth at once, and a worker that comes late for its turn (by up to :data:`BURST`) does
  not lose it; the margin lets messages reach the server up to 0.2 s after their turn
  without any window of 10 s seeing more than the limit.
- A server that refuses connections, fails TLS or AUTH, or answers ``421`` is passed over
  for the mailer's ``failover`` mailers for ``failover_retry`` seconds.
- Throttle replies (``421``, ``432``, ``454``, ``450 4.2.1``: "slow down" from Microsoft 365,
  Gmail, SES) pause the whole mailer: 60 s, doubling while they repeat (at most 15 min),
  reset by the next success.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from typing import Final

from django.db import IntegrityError, router, transaction
from django.db.models import F, Q
from django.utils import timezone

from .outbox import MailerSlot, MailerState
from .smtp.reply import Reply

__all__ = ["Limits", "is_throttle"]

THROTTLE_PAUSE: Final = 60.0
MAX_PAUSE: Final = 900.0
BURST: Final = timedelta(seconds=0.1)
"""A worker takes at most this much time's worth of rate-limit turns at once (at least one),
and turns missed by up to this much are still given."""
PACE: Final = 0.96
"""Turns are given at this fraction of ``rate_limit``: the margin (0.4 s in 10 s) absorbs a
burst, a late turn and messages that reach the server a little after their turn."""


def is_throttle(reply: Reply | None) -> bool:
    """A reply that asks the whole client to slow down (not about one message)."""
    if reply is None:
        return False
    if reply.code in (421, 432, 454):
        return True
    return reply.code == 450 and reply.enhanced_status == "4.2.1"


class Limits:
    """One worker's view of its mailer's shared limits."""

    def __init__(
        self,
        mailer: str,
        token: str,
        *,
        max_connections: int | None,
        rate: tuple[int, float] | None,
        lease: timedelta,
    ) -> None:
        self.mailer, self.token, self.lease = mailer, token, lease
        self.max_connections, self.rate = max_connections, rate
        self.alias = router.db_for_write(MailerState)
        self.slot: int | None = None
        self._throttles: int | None = None

    # -- connections ------------------------------------------------------------------

    def acquire_slot(self) -> bool:
        """Hold one of ``max_connections`` slots (True), or none is free (False)."""
        if self.max_connections is None:
            return True
        slots = MailerSlot.objects.using(self.alias)
        now = timezone.now()
        for number in range(self.max_connections):
            try:
                with transaction.atomic(using=self.alias):
                    slots.get_or_create(mailer=self.mailer, number=number)
            except IntegrityError:  # another worker made it at the same moment
                pass
            free = Q(holder="") | Q(expires__lt=now) | Q(holder=self.token)
            taken = (
                slots.filter(mailer=self.mailer, number=number)
                .filter(free)
                .update(holder=self.token, expires=now + self.lease)
            )
            if taken:
                self.slot = number
                return True
        return False

    def renew(self) -> None:
        if self.slot is not None:
            MailerSlot.objects.using(self.alias).filter(
                mailer=self.mailer, number=self.slot, holder=self.token
            ).update(expires=timezone.now() + self.lease)

    def release_slot(self) -> None:
        if self.slot is not None:
            MailerSlot.objects.using(self.alias).filter(
                mailer=self.mailer, number=self.slot, holder=self.token
            ).update(holder="", expires=None)
            self.slot = None

    # -- pace ---------------------------------------------------------------------------

    def take(self, wanted: int) -> tuple[int, float]:
        """Up to ``wanted`` turns to send now, and, when none is free, the seconds to wait."""
        if self.rate is None or wanted <= 0:
            return wanted, 0.0
        count, period = self.rate
        interval = timedelta(seconds=period / (count * PACE))
        burst = max(1, math.floor(BURST / interval))
        states = MailerState.objects.using(self.alias)
        for _ in range(20):  # another worker moved the turn: look again
            state = self._state()
            now = timezone.now()
            if state.next_send is not None and state.next_send > now:
                return 0, (state.next_send - now).total_seconds()
            turns = min(wanted, burst)
            base = state.next_send
            if base is None or base < now - BURST:  # idle: the schedule starts again now
                base = now
            moved = states.filter(mailer=self.mailer, next_send=state.next_send)
            if state.next_send is None:
                moved = states.filter(mailer=self.mailer, next_send__isnull=True)
            if moved.update(next_send=base + turns * interval):
                return turns, 0.0
        return 0, interval.total_seconds()

    # -- pauses -------------------------------------------------------------------------

    def paused_until(self) -> datetime | None:
        """When the mailer may send again after a throttle reply (None: now)."""
        until = self._state().paused_until
        return until if until is not None and until > timezone.now() else None

    def throttled(self, reply: Reply) -> None:
        """A throttle reply: pause the mailer, longer each time in a row."""
        state = self._state()
        pause = min(MAX_PAUSE, THROTTLE_PAUSE * 2**state.throttles)
        self._throttles = None
        MailerState.objects.using(self.alias).filter(mailer=self.mailer).update(
            throttles=F("throttles") + 1,
            paused_until=timezone.now() + timedelta(seconds=pause),
            last_throttle_reply=reply.one_line()[:1000],
        )

    def pause(self, seconds: float) -> None:
        """Hold every worker of the mailer for ``seconds`` (its server was not reached)."""
        self._state()
        until = timezone.now() + timedelta(seconds=seconds)
        MailerState.objects.using(self.alias).filter(mailer=self.mailer).update(paused_until=until)

    def relieved(self) -> None:
        """A success: the next throttle reply pauses from the start again (no write when the
        state last read had no throttles)."""
        if self._throttles == 0:
            return
        MailerState.objects.using(self.alias).filter(mailer=self.mailer, throttles__gt=0).update(
            throttles=0
        )
        self._throttles = 0

    def down(self, seconds: float) -> None:
        """The mailer's server failed: pass it over for its failover for ``seconds``."""
        self._state()
        MailerState.objects.using(self.alias).filter(mailer=self.mailer).update(
            down_until=timezone.now() + timedelta(seconds=seconds)
        )

    def down_until(self) -> datetime | None:
        """Until when the mailer's server is passed over (None: it is tried)."""
        until = self._state().down_until
        return until if until is not None and until > timezone.now() else None

    def _state(self) -> MailerState:
        try:
            with transaction.atomic(using=self.alias):
                state, _ = MailerState.objects.using(self.alias).get_or_create(mailer=self.mailer)
        except IntegrityError:
            state = MailerState.objects.using(self.alias).get(mailer=self.mailer)
        self._throttles = state.throttles
        return state  # type: ignore[no-any-return,unused-ignore]
