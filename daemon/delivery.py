"""The delivery worker: takes due deliveries from the outbox and sends them to FCM or the backend.

Every claimed delivery ends in a final state (`sent`, `failed`) or goes back to `pending` with
its next attempt time; one that is cancelled meanwhile stays cancelled (the store sees to it).
A worker that dies leaves its claims `in_flight`: they come back when their lease ends, or at the
next start (`release_claims`). That is what makes delivery at least once. The worker claims and
dispatches; an FCM attempt is daemon/fcm_attempt.py's, the FCM hold daemon/fcm_hold.py's, a
backend call daemon/backend_notify.py's, and recording an outcome daemon/delivery_record.py's.

Choices where contract 4 leaves room (for the README):
- Without FCM configured (no sender) no FCM delivery is claimed at all: the syncer makes none,
  and those an older version left stay as they are until retention expires them.
- Retention: a delivery still not final `storage.retention_days` after it was made becomes
  `expired` (`expire`, run by the service's purge), so that its notification can go.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from daemon.backend_notify import NOTIFY_MUTATION, BackendNotifier
from daemon.clock import Clock, rfc3339
from daemon.config import Config
from daemon.delivery_record import Claims, Recorder
from daemon.fcm import FcmSender
from daemon.fcm_attempt import FcmAttempts, attempt_limit
from daemon.fcm_hold import FcmHold
from daemon.fcm_message import fcm_data
from daemon.readiness import NotReady
from storage.base import Delivery
from storage.protocols import NotificationReader, OutboxRepository, TokenTombstones

__all__ = ["NOTIFY_MUTATION", "DeliveryWorker", "fcm_data"]

log = logging.getLogger(__name__)

# At most this many FCM attempts at once (fewer when the sender can run fewer, see
# FcmSender.max_in_flight): enough to keep a room of tablets moving while one slow answer waits
# out its timeout, few enough not to trip FCM's per-project quota.
MAX_FCM_IN_FLIGHT = 64
# Backend deliveries claimed at once (in a call or waiting behind their calendar's call).
MAX_BACKEND_HELD = 64
LEASE_MARGIN = 30.0  # seconds past the longest attempt before another worker may take a claim
IDLE_CHECK = 60.0  # longest sleep: catches work published without wake()
ERROR_PAUSE = 5.0  # after the store failed in the loop


class DeliveryWorker:
    """Claims due deliveries, hands each to its attempt, sleeps until the next is due."""

    def __init__(
        self,
        outbox: OutboxRepository,
        notifications: NotificationReader,
        rooms: TokenTombstones,
        sender: FcmSender | None,
        clock: Clock,
        config: Config,
        backend_token: str | None,
    ) -> None:
        self.outbox = outbox
        self.sender = sender
        self.clock = clock
        self.config = config
        self.claims = Claims()
        self.recorder = Recorder(outbox, clock, self.claims)
        self.hold = FcmHold(config.fcm.mismatch_breaker)
        self.fcm = (
            None
            if sender is None
            else FcmAttempts(
                sender, notifications, rooms, self.hold, self.recorder, clock, config.fcm
            )
        )
        self.backend = BackendNotifier(self.recorder, clock, config.backend, backend_token)
        self._fcm_slots = 0 if sender is None else min(MAX_FCM_IN_FLIGHT, sender.max_in_flight)
        # A backend delivery may wait for its calendar's call, then make its own.
        limit = max(attempt_limit(config.fcm), config.backend.timeout)
        self._lease_span = 2 * limit + LEASE_MARGIN
        self._wake = asyncio.Event()
        self._stopping = False
        self._run_task: asyncio.Task[Any] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # -- counts (exported as metrics by the service) -----------------------------------------
    @property
    def sent(self) -> int:
        return self.recorder.tally.sent

    @property
    def failed(self) -> int:
        return self.recorder.tally.failed

    @property
    def retried(self) -> int:
        return self.recorder.tally.retried

    @property
    def dropped_tokens(self) -> int:
        return self.recorder.tally.dropped_tokens

    @property
    def held(self) -> int:
        return self.recorder.tally.held

    @property
    def expired(self) -> int:
        return self.recorder.tally.expired

    @property
    def breaker_open(self) -> bool:
        """FCM deliveries are held (the mismatch breaker, or FCM refusing the project)."""
        return self.hold.is_open

    # -- the loop ----------------------------------------------------------------------------
    def wake(self) -> None:
        """Something was published (or an attempt ended): look at the outbox now."""
        self._wake.set()

    async def run_once(self) -> int:
        """Claim what is due, process it, wait for those attempts; how many were claimed."""
        count, tasks = await self._dispatch(self.clock.now())
        if tasks:
            await asyncio.gather(*tasks)
        return count

    async def run(self) -> None:
        """Claim and process until stop(); sleep on the clock until the next delivery is due."""
        self._run_task = asyncio.current_task()
        while not self._stopping:
            self._wake.clear()
            claim_now = self.clock.now()
            try:
                await self._dispatch(claim_now)
                due = await self.next_due()
            except Exception:
                log.exception("delivery_loop_failed")
                due = claim_now + ERROR_PAUSE
            if due is None or due <= claim_now:
                # Nothing waits, or what is due could not be taken (every slot busy): an ending
                # attempt or a publication wakes us.
                delay = IDLE_CHECK
            else:
                delay = due - self.clock.now()
            if delay > 0 and not self._stopping:
                await self._sleep(delay)

    async def next_due(self) -> float | None:
        """When there is next something to claim: the earliest due delivery of a kind this
        worker claims now. Held FCM deliveries count only from the next probe (none while a
        probe is answering, whose end wakes the loop), so the loop sleeps instead of spinning
        on them; without a sender FCM deliveries do not count at all."""
        due = await self.outbox.next_due("backend")
        if self.sender is not None:
            fcm = self.hold.wake_at(await self.outbox.next_due("fcm"))
            if fcm is not None:
                due = fcm if due is None else min(due, fcm)
        return due

    async def _sleep(self, seconds: float) -> None:
        waker = asyncio.ensure_future(self._wake.wait())
        sleeper = asyncio.ensure_future(self.clock.sleep(seconds))
        try:
            await asyncio.wait({waker, sleeper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waker.cancel()
            sleeper.cancel()

    async def stop(self, limit: float) -> None:
        """Stop claiming; give attempts in flight up to `limit` real seconds, then cancel them.
        What they leave stays in_flight in the store and is released at the next start."""
        self._stopping = True
        self.backend.stop()
        self.wake()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        if self._run_task is not None and not self._run_task.done():
            await asyncio.wait({self._run_task}, timeout=limit)
        tasks = {task for task in self._tasks if not task.done()}
        if tasks:
            _, left = await asyncio.wait(tasks, timeout=max(0.0, deadline - loop.time()))
            for task in left:
                task.cancel()
            await asyncio.gather(*left, return_exceptions=True)
            if left:
                log.warning("deliveries_left_in_flight", extra={"attempts": len(left)})

    async def drain(self, limit: float | None = None) -> None:
        """Wait (real seconds, None: no limit) for the attempts in flight now to end."""
        tasks = {task for task in self._tasks if not task.done()}
        if tasks:
            await asyncio.wait(tasks, timeout=limit)

    async def _dispatch(self, now: float) -> tuple[int, list[asyncio.Task[None]]]:
        if self._stopping:
            return 0, []
        lease_until = now + self._lease_span
        tasks: list[asyncio.Task[None]] = []
        count = 0
        # While held: only the probe (and nothing without a sender): the others stay untouched.
        free, probe = self.hold.capacity(now, self._fcm_slots - self.claims.count("fcm"))
        if free > 0 and self.fcm is not None:
            for delivery in await self.outbox.claim(now, lease_until, free, "fcm"):
                if not self.claims.take(delivery):
                    continue
                count += 1
                if probe:
                    self.hold.probe_started(delivery.id)
                tasks.append(self._spawn(self.fcm.run(delivery, probe)))
                probe = False
        free = MAX_BACKEND_HELD - self.claims.count("backend")
        if free > 0:
            groups: dict[str, list[Delivery]] = {}
            for delivery in await self.outbox.claim(now, lease_until, free, "backend"):
                if not self.claims.take(delivery):
                    continue
                count += 1
                groups.setdefault(delivery.calendar_id, []).append(delivery)
            for calendar_id, group in groups.items():
                tasks.append(self._spawn(self.backend.notify(calendar_id, group)))
        return count, tasks

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(self._guarded(work))
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self.wake()  # a slot is free, and the next due time may have changed

    @staticmethod
    async def _guarded(work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        except Exception:
            # Most likely the store: the claim stays in_flight and its lease brings it back.
            log.exception("delivery_attempt_failed")

    # -- readiness, retention ----------------------------------------------------------------
    async def check(self) -> None:
        """For /readyz "fcm": raises with the reason when FCM cannot be used now."""
        if self.sender is None:
            raise NotReady("not configured: fcm.service_account_file is not set")
        self.hold.check()
        await self.sender.check()

    async def expire(self, created_before: float) -> int:
        """Retention: deliveries made before `created_before` and still not final become
        `expired` (an attempt going on now ends on its own). Returns how many."""
        count = await self.outbox.expire(created_before, self.clock.now())
        if count:
            self.recorder.tally.expired += count
            log.warning(
                "deliveries_expired",
                extra={"count": count, "created_before": rfc3339(created_before)},
            )
        return count
