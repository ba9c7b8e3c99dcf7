"""Backend notifies: the claimed backend deliveries of a calendar as one mrmNotification call.

Choices where contract 4 leaves room (for the README): backend notifies are coalesced per
calendar: the backend deliveries of a calendar claimed together make one call, and all of them
are `sent` when it succeeds. Those claimed while a call for the calendar is in flight wait
(claimed, in memory) and make the next call; when the call in flight fails, they join its retry.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from daemon.backend import BackendError, graphql_errors, post_graphql
from daemon.clock import Clock
from daemon.config import Backend
from daemon.delivery_record import Recorder
from storage.base import Delivery

log = logging.getLogger(__name__)

# Backend calls at once: under Tornado's default max_clients (10), whose queueing time would
# count against backend.timeout.
BACKEND_CONCURRENCY = 8
NOTIFY_MUTATION = (
    "mutation($calendarId: String!) { mrmNotification(calendarId: $calendarId) { message } }"
)


@dataclass(frozen=True)
class NotifyResult:
    """One backend call: ok, or why not (and how long the backend asked us to wait)."""

    ok: bool
    error: str | None = None
    retry_after: float | None = None


class BackendNotifier:
    """At most one call in flight per calendar, and one waiting behind it; recorded outcomes.

    What waits is bounded by the worker's backend claims (MAX_BACKEND_HELD in daemon/delivery.py).
    """

    def __init__(
        self, recorder: Recorder, clock: Clock, config: Backend, token: str | None
    ) -> None:
        self.recorder = recorder
        self.clock = clock
        self.config = config
        self.token = token
        self._stopping = False
        self._busy: set[str] = set()
        self._waiting: dict[str, list[Delivery]] = {}
        self._slots = asyncio.Semaphore(BACKEND_CONCURRENCY)

    def stop(self) -> None:
        """No further call: the call in flight ends, what waits stays claimed (in_flight)."""
        self._stopping = True

    async def notify(self, calendar_id: str, group: list[Delivery]) -> None:
        """One call for the group; later deliveries of the calendar wait for it and then make
        the next call together (at most one in flight and one waiting)."""
        if calendar_id in self._busy:
            self._waiting.setdefault(calendar_id, []).extend(group)
            return
        self._busy.add(calendar_id)
        try:
            while group and not self._stopping:
                retry_at = await self._call(calendar_id, group)
                group = self._waiting.pop(calendar_id, [])
                if retry_at is not None and group:
                    for delivery in group:  # not tried: attempts unchanged
                        await self.recorder.finish(delivery, "pending", next_attempt_at=retry_at)
                    group = []
        finally:
            self._busy.discard(calendar_id)
            # Left by stop() or an error: they stay in_flight until their lease or a restart.
            for delivery in group + self._waiting.pop(calendar_id, []):
                self.recorder.claims.release(delivery.id)

    async def _call(self, calendar_id: str, group: list[Delivery]) -> float | None:
        async with self._slots:
            result = await self._post(calendar_id)
        if result.ok:
            log.info(
                "backend_notified", extra={"calendar_id": calendar_id, "deliveries": len(group)}
            )
            for delivery in group:
                await self.recorder.finish(delivery, "sent", attempts=delivery.attempts + 1)
            return None
        error = result.error or "backend notify failed"
        return await self.recorder.retry(group, error, result.retry_after, self.config.max_attempts)

    async def _post(self, calendar_id: str) -> NotifyResult:
        body = {"query": NOTIFY_MUTATION, "variables": {"calendarId": calendar_id}}
        try:
            answer = await post_graphql(self.config, self.token, body, self.clock)
        except BackendError as error:
            return NotifyResult(False, str(error), error.retry_after)
        errors = graphql_errors(answer)
        if errors:
            return NotifyResult(False, f"the backend answered GraphQL errors: {'; '.join(errors)}")
        return NotifyResult(True)
