"""What an attempt comes to in the outbox: the deliveries a worker holds, outcomes, retries, counts.

Choices where contract 4 leaves room (for the README):
- Retries wait the larger of the backoff (equal jitter, from RETRY_BASE) and Retry-After, so
  Retry-After is never cut short and a short one does not undo the backoff.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any, Literal

from daemon.backoff import backoff_delay
from daemon.clock import Clock, rfc3339
from storage.base import Delivery, DeliveryState, TargetKind
from storage.protocols import OutboxRepository

log = logging.getLogger(__name__)

RETRY_BASE = 10.0  # first retry after 5-10 s; FCM asks for no less than that after a 5xx
RETRY_CAP = 3600.0


@dataclass
class Tally:
    """The worker's counters, exported as metrics by the service (deliveries, not requests)."""

    sent: int = 0
    failed: int = 0
    retried: int = 0
    dropped_tokens: int = 0
    held: int = 0
    expired: int = 0


class Claims:
    """The deliveries this worker holds now, by kind: a claim that comes back after its lease
    ended (a long wait) is not processed twice. Bounded by the worker's slots of each kind."""

    def __init__(self) -> None:
        self._ids: dict[TargetKind, set[int]] = {"fcm": set(), "backend": set()}

    def take(self, delivery: Delivery) -> bool:
        """Hold a claimed delivery; False when this worker holds it already."""
        ids = self._ids[delivery.target.kind]
        if delivery.id in ids:
            return False
        ids.add(delivery.id)
        return True

    def release(self, delivery_id: int) -> None:
        for ids in self._ids.values():
            ids.discard(delivery_id)

    def count(self, kind: TargetKind) -> int:
        return len(self._ids[kind])


class Recorder:
    """Writes outcomes to the outbox, lets the claims go, and counts what was stored."""

    def __init__(self, outbox: OutboxRepository, clock: Clock, claims: Claims) -> None:
        self.outbox = outbox
        self.clock = clock
        self.claims = claims
        self.tally = Tally()
        self.rng = random.Random()  # noqa: S311 - jitter, not a secret

    async def finish(
        self,
        delivery: Delivery,
        state: DeliveryState,
        *,
        count: Literal["retried", "held"] | None = None,
        **fields: Any,
    ) -> None:
        """Record an outcome and count it, unless the delivery was cancelled meanwhile."""
        try:
            stored = await self.outbox.finish(delivery.id, state, self.clock.now(), **fields)
        finally:
            self.claims.release(delivery.id)
        if stored is None or stored.state != state:
            return
        if state == "sent":
            self.tally.sent += 1
        elif state == "failed":
            self.tally.failed += 1
        elif count == "retried":
            self.tally.retried += 1
        elif count == "held":
            self.tally.held += 1

    async def retry(
        self,
        deliveries: list[Delivery],
        error: str,
        retry_after: float | None,
        max_attempts: int,
    ) -> float | None:
        """Count one failed attempt for each; fail those out of attempts, reschedule the rest
        together. Returns when they come back (None when none will)."""
        now = self.clock.now()
        again = [d for d in deliveries if d.attempts + 1 < max_attempts]
        for delivery in deliveries:
            if delivery.attempts + 1 >= max_attempts:
                log.warning(
                    "delivery_failed",
                    extra={
                        "delivery_id": delivery.id,
                        "attempts": delivery.attempts + 1,
                        "error": error,
                    },
                )
                await self.finish(
                    delivery,
                    "failed",
                    attempts=delivery.attempts + 1,
                    last_error=f"{error} (gave up after {delivery.attempts + 1} attempts)",
                )
        if not again:
            return None
        attempts = min(d.attempts + 1 for d in again)
        delay = backoff_delay(attempts, base=RETRY_BASE, cap=RETRY_CAP, rng=self.rng)
        at = now + max(delay, retry_after or 0.0)
        for delivery in again:
            await self.finish(
                delivery,
                "pending",
                count="retried",
                attempts=delivery.attempts + 1,
                next_attempt_at=at,
                last_error=error,
            )
        log.info(
            "delivery_retry",
            extra={"deliveries": [d.id for d in again], "error": error, "at": rfc3339(at)},
        )
        return at
