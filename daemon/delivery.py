"""The delivery worker: takes due deliveries from the outbox and sends them to FCM or the backend.

Every claimed delivery ends in a final state (`sent`, `failed`) or goes back to `pending` with
its next attempt time; one that is cancelled meanwhile stays cancelled (the store sees to it).
A worker that dies leaves its claims `in_flight`: they come back when their lease ends, or at the
next start (`release_claims`). That is what makes delivery at least once.

Choices where contract 4 leaves room (for the README):
- A token FCM refuses (UNREGISTERED, INVALID_ARGUMENT naming the token, SENDER_ID_MISMATCH)
  leaves the room with a tombstone; the delivery is `failed` with FCM's code and message plus
  "; token dropped" as last_error, and the token's other deliveries are cancelled.
- Retries wait the larger of the backoff (equal jitter, from RETRY_BASE) and Retry-After, so
  Retry-After is never cut short and a short one does not undo the backoff.
- The SENDER_ID_MISMATCH breaker, and FCM answering 403/404 without an errorCode, open the FCM
  hold (daemon/fcm_hold.py): no token is dropped, FCM deliveries wait `pending` untouched (none
  is claimed, attempts not counted) and one probe every PROBE_INTERVAL tries again.
- Without FCM configured (no sender) no FCM delivery is claimed at all: the syncer makes none,
  and those an older version left stay as they are until retention expires them.
- Retention: a delivery still not final `storage.retention_days` after it was made becomes
  `expired` (`expire`, run by the service's purge), so that its notification can go.
- Backend notifies are coalesced per calendar: the backend deliveries of a calendar claimed
  together make one call, and all of them are `sent` when it succeeds. Those claimed while a
  call for the calendar is in flight wait (claimed, in memory) and make the next call; when the
  call in flight fails, they join its retry.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import OrderedDict
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Literal

from daemon.backend import BackendError, graphql_errors, post_graphql
from daemon.backoff import backoff_delay
from daemon.clock import Clock, rfc3339
from daemon.config import Config
from daemon.fcm import FcmSender
from daemon.fcm_hold import FcmHold
from daemon.fcm_message import TTL_SECONDS, fcm_data
from daemon.fcm_outcome import SendOutcome, describe, shorten
from daemon.logs import short_token
from daemon.readiness import NotReady
from storage.base import Delivery, DeliveryState
from storage.protocols import NotificationReader, OutboxRepository, TokenTombstones

__all__ = ["NOTIFY_MUTATION", "DeliveryWorker", "fcm_data"]

log = logging.getLogger(__name__)

# At most this many FCM attempts at once (fewer when the sender can run fewer, see
# FcmSender.max_in_flight): enough to keep a room of tablets moving while one slow answer waits
# out its timeout, few enough not to trip FCM's per-project quota.
MAX_FCM_IN_FLIGHT = 64
# Backend deliveries claimed at once (in a call or waiting behind their calendar's call).
MAX_BACKEND_HELD = 64
# Backend calls at once: under Tornado's default max_clients (10), whose queueing time would
# count against backend.timeout.
BACKEND_CONCURRENCY = 8
LEASE_MARGIN = 30.0  # seconds past the longest attempt before another worker may take a claim
RETRY_BASE = 10.0  # first retry after 5-10 s; FCM asks for no less than that after a 5xx
RETRY_CAP = 3600.0
IDLE_CHECK = 60.0  # longest sleep: catches work published without wake()
ERROR_PAUSE = 5.0  # after the store failed in the loop
DATA_CACHE_SIZE = 1024  # notifications whose FCM data is kept (one per notification, many tokens)
NOTIFY_MUTATION = (
    "mutation($calendarId: String!) { mrmNotification(calendarId: $calendarId) { message } }"
)


@dataclass(frozen=True)
class NotifyResult:
    """One backend call: ok, or why not (and how long the backend asked us to wait)."""

    ok: bool
    error: str | None = None
    retry_after: float | None = None


class DeliveryWorker:
    """Claims due deliveries, makes one attempt each, records the outcome."""

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
        self.notifications = notifications
        self.rooms = rooms  # a token FCM refuses leaves its room
        self.sender = sender
        self.clock = clock
        self.config = config
        self.backend_token = backend_token
        self.rng = random.Random()  # noqa: S311 - jitter, not a secret
        # Counters, exported as metrics by the service (deliveries, not requests).
        self.sent = 0
        self.failed = 0
        self.retried = 0
        self.dropped_tokens = 0
        self.held = 0
        self.expired = 0
        self.hold = FcmHold(config.fcm.mismatch_breaker)
        self._fcm_slots = 0 if sender is None else min(MAX_FCM_IN_FLIGHT, sender.max_in_flight)
        # The senders bound each part of an attempt by attempt_timeout (pyfcm: a wait for a
        # thread behind a token refresh, the refresh, the connect, the answer); this bounds
        # them together, in case a library ignores its timeout.
        self._fcm_guard = 4 * config.fcm.attempt_timeout + 10.0
        # A backend delivery may wait for its calendar's call, then make its own.
        self._lease_span = 2 * max(self._fcm_guard, config.backend.timeout) + LEASE_MARGIN
        self._wake = asyncio.Event()
        self._stopping = False
        self._run_task: asyncio.Task[Any] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # Deliveries this worker holds: a claim that comes back after its lease ended (a long
        # wait) is not processed twice.
        self._owned_fcm: set[int] = set()
        self._owned_backend: set[int] = set()
        self._data: OrderedDict[int, dict[str, str]] = OrderedDict()
        self._notify_busy: set[str] = set()
        self._notify_waiting: dict[str, list[Delivery]] = {}
        self._notify_slots = asyncio.Semaphore(BACKEND_CONCURRENCY)

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
        free, probe = self.hold.capacity(now, self._fcm_slots - len(self._owned_fcm))
        if free > 0:
            for delivery in await self.outbox.claim(now, lease_until, free, "fcm"):
                if delivery.id in self._owned_fcm:
                    continue
                self._owned_fcm.add(delivery.id)
                count += 1
                if probe:
                    self.hold.probe_started()
                tasks.append(self._spawn(self._fcm(delivery, probe)))
                probe = False
        free = MAX_BACKEND_HELD - len(self._owned_backend)
        if free > 0:
            groups: dict[str, list[Delivery]] = {}
            for delivery in await self.outbox.claim(now, lease_until, free, "backend"):
                if delivery.id in self._owned_backend:
                    continue
                self._owned_backend.add(delivery.id)
                count += 1
                groups.setdefault(delivery.calendar_id, []).append(delivery)
            for calendar_id, group in groups.items():
                tasks.append(self._spawn(self._notify(calendar_id, group)))
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

    async def _finish(
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
            self._owned_fcm.discard(delivery.id)
            self._owned_backend.discard(delivery.id)
        if stored is None or stored.state != state:
            return
        if state == "sent":
            self.sent += 1
        elif state == "failed":
            self.failed += 1
        elif count == "retried":
            self.retried += 1
        elif count == "held":
            self.held += 1

    # -- FCM ---------------------------------------------------------------------------------
    async def _fcm(self, delivery: Delivery, probe: bool) -> None:
        try:
            await self._attempt(delivery, probe=probe)
        finally:
            self._owned_fcm.discard(delivery.id)
            if probe and self.hold.probing:
                self.hold.probe_abandoned()

    async def _hold(self, delivery: Delivery, error: str) -> None:
        """Back to pending until the next probe; attempts not counted, token kept. Its time is
        the probe's, after every delivery already waiting: the next probe tries another one."""
        at = self.hold.next_probe_at
        await self._finish(delivery, "pending", count="held", next_attempt_at=at, last_error=error)

    async def _attempt(self, delivery: Delivery, *, probe: bool) -> None:
        token = delivery.target.token
        if not token:
            await self._finish(delivery, "failed", last_error="FCM delivery without a token")
            return
        data = await self._data_for(delivery.notification_id)
        if data is None:
            error = f"notification {delivery.notification_id} is no longer stored"
            await self._finish(delivery, "failed", last_error=error)
            return
        outcome = await self._send(token, data, delivery.calendar_id)
        await self._record(delivery, token, outcome, probe)

    async def _data_for(self, notification_id: int) -> dict[str, str] | None:
        data = self._data.get(notification_id)
        if data is None:
            notification = await self.notifications.get(notification_id)
            if notification is None:
                return None
            data = self._data[notification_id] = fcm_data(notification)
            if len(self._data) > DATA_CACHE_SIZE:
                self._data.popitem(last=False)
        return data

    async def _send(self, token: str, data: dict[str, str], calendar_id: str) -> SendOutcome:
        assert self.sender is not None
        try:
            return await asyncio.wait_for(
                self.sender.send(token, data, calendar_id, TTL_SECONDS), self._fcm_guard
            )
        except TimeoutError:
            return SendOutcome("retry", error=f"no answer from FCM within {self._fcm_guard:g} s")
        except Exception as exc:  # a sender bug must not lose the delivery: retried, logged
            log.exception("fcm_sender_raised", extra={"token": short_token(token)})
            return SendOutcome("retry", error=shorten(f"{type(exc).__name__}: {exc}", token))

    async def _record(
        self, delivery: Delivery, token: str, outcome: SendOutcome, probe: bool
    ) -> None:
        now = self.clock.now()
        attempts = delivery.attempts + 1
        error = describe(outcome)
        ids = {
            "delivery_id": delivery.id,
            "notification_id": delivery.notification_id,
            "calendar_id": delivery.calendar_id,
            "token": short_token(token),
        }
        if probe:
            sent = outcome.kind == "sent"
            self.hold.probe_ended(sent, now, error, ids)
            if sent:
                await self._finish(delivery, "sent", attempts=attempts)
            else:
                await self._hold(delivery, f"{self.hold.held_error}; probe: {error}")
            return
        kind = outcome.kind
        if kind == "sender_mismatch":
            self.hold.note_mismatch(token, now, ids)
        elif kind == "project_refused":
            self.hold.project_refused(now, error, ids)
        if kind in ("unregistered", "sender_mismatch", "project_refused") and self.hold.is_open:
            await self._hold(delivery, f"{self.hold.held_error}; {error}")
        elif kind == "sent":
            log.debug("fcm_sent", extra=ids)
            await self._finish(delivery, "sent", attempts=attempts)
        elif kind in ("unregistered", "sender_mismatch"):
            await self._finish(
                delivery, "failed", attempts=attempts, last_error=f"{error}; token dropped"
            )
            until = now + self.config.fcm.tombstone_days * 86400.0
            if await self.rooms.tombstone_token(delivery.calendar_id, token, until, now):
                self.dropped_tokens += 1
            log.warning("fcm_token_dropped", extra={**ids, "error": error})
        elif kind == "retry":
            await self._retry([delivery], error, outcome.retry_after, self.config.fcm.max_attempts)
        else:
            log.warning("fcm_failed", extra={**ids, "error": error})
            await self._finish(delivery, "failed", attempts=attempts, last_error=error)

    # -- the FCM hold, readiness, retention ---------------------------------------------------
    @property
    def breaker_open(self) -> bool:
        """FCM deliveries are held (the mismatch breaker, or FCM refusing the project)."""
        return self.hold.is_open

    async def check(self) -> None:
        """For /readyz "fcm": raises with the reason when FCM cannot be used now."""
        if self.sender is None:
            raise NotReady("not configured: fcm.service_account_file is not set")
        problem = self.hold.problem()
        if problem is not None:
            raise NotReady(problem)
        await self.sender.check()

    async def expire(self, created_before: float) -> int:
        """Retention: deliveries made before `created_before` and still not final become
        `expired` (an attempt going on now ends on its own). Returns how many."""
        count = await self.outbox.expire(created_before, self.clock.now())
        if count:
            self.expired += count
            log.warning(
                "deliveries_expired",
                extra={"count": count, "created_before": rfc3339(created_before)},
            )
        return count

    # -- retries (FCM and backend) -----------------------------------------------------------
    async def _retry(
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
                await self._finish(
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
            await self._finish(
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

    # -- backend notify ----------------------------------------------------------------------
    async def _notify(self, calendar_id: str, group: list[Delivery]) -> None:
        """One call for the group; later deliveries of the calendar wait for it and then make
        the next call together (at most one in flight and one waiting)."""
        if calendar_id in self._notify_busy:
            self._notify_waiting.setdefault(calendar_id, []).extend(group)
            return
        self._notify_busy.add(calendar_id)
        try:
            while group and not self._stopping:
                retry_at = await self._notify_call(calendar_id, group)
                group = self._notify_waiting.pop(calendar_id, [])
                if retry_at is not None and group:
                    for delivery in group:  # not tried: attempts unchanged
                        await self._finish(delivery, "pending", next_attempt_at=retry_at)
                    group = []
        finally:
            self._notify_busy.discard(calendar_id)
            # Left by stop() or an error: they stay in_flight until their lease or a restart.
            for delivery in group + self._notify_waiting.pop(calendar_id, []):
                self._owned_backend.discard(delivery.id)

    async def _notify_call(self, calendar_id: str, group: list[Delivery]) -> float | None:
        async with self._notify_slots:
            result = await self._post_notify(calendar_id)
        if result.ok:
            log.info(
                "backend_notified", extra={"calendar_id": calendar_id, "deliveries": len(group)}
            )
            for delivery in group:
                await self._finish(delivery, "sent", attempts=delivery.attempts + 1)
            return None
        error = result.error or "backend notify failed"
        return await self._retry(group, error, result.retry_after, self.config.backend.max_attempts)

    async def _post_notify(self, calendar_id: str) -> NotifyResult:
        body = {"query": NOTIFY_MUTATION, "variables": {"calendarId": calendar_id}}
        try:
            answer = await post_graphql(self.config.backend, self.backend_token, body, self.clock)
        except BackendError as error:
            return NotifyResult(False, str(error), error.retry_after)
        errors = graphql_errors(answer)
        if errors:
            return NotifyResult(False, f"the backend answered GraphQL errors: {'; '.join(errors)}")
        return NotifyResult(True)
