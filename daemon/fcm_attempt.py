"""One FCM attempt: its notification's data, the send, and what FCM's answer makes of the delivery.

Choices where contract 4 leaves room (for the README):
- A token FCM refuses (UNREGISTERED, INVALID_ARGUMENT naming the token, SENDER_ID_MISMATCH)
  leaves the room with a tombstone; the delivery is `failed` with FCM's code and message plus
  "; token dropped" as last_error, and the token's other deliveries are cancelled.
- While the FCM hold is open (daemon/fcm_hold.py) those answers drop nothing: the delivery goes
  back to `pending` until the next probe, its attempts not counted.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict

from daemon.clock import Clock
from daemon.config import Fcm
from daemon.delivery_record import Recorder
from daemon.fcm import FcmSender
from daemon.fcm_hold import FcmHold
from daemon.fcm_message import TTL_SECONDS, fcm_data
from daemon.fcm_outcome import SendOutcome, describe, shorten
from daemon.logs import short_token
from storage.base import Delivery
from storage.protocols import NotificationReader, TokenTombstones

log = logging.getLogger(__name__)

DATA_CACHE_SIZE = 1024  # notifications whose FCM data is kept (one per notification, many tokens)


def attempt_limit(config: Fcm) -> float:
    """The longest one FCM attempt may take, all of it: the senders bound each part by
    attempt_timeout (pyfcm: a wait for a thread behind a token refresh, the refresh, the
    connect, the answer); this bounds them together, in case a library ignores its timeout."""
    return 4 * config.attempt_timeout + 10.0


class FcmAttempts:
    """Makes one FCM attempt of a claimed delivery and records its outcome."""

    def __init__(
        self,
        sender: FcmSender,
        notifications: NotificationReader,
        rooms: TokenTombstones,
        hold: FcmHold,
        recorder: Recorder,
        clock: Clock,
        config: Fcm,
    ) -> None:
        self.sender = sender
        self.notifications = notifications
        self.rooms = rooms  # a token FCM refuses leaves its room
        self.hold = hold
        self.recorder = recorder
        self.clock = clock
        self.config = config
        self.guard = attempt_limit(config)
        self._data: OrderedDict[int, dict[str, str]] = OrderedDict()

    async def run(self, delivery: Delivery, probe: bool) -> None:
        """The attempt; whatever happens, the worker's claim on the delivery ends with it."""
        try:
            await self._attempt(delivery, probe=probe)
        finally:
            self.recorder.claims.release(delivery.id)
            if probe:
                self.hold.probe_abandoned(delivery.id)

    async def _attempt(self, delivery: Delivery, *, probe: bool) -> None:
        token = delivery.target.token
        if not token:
            await self.recorder.finish(
                delivery, "failed", last_error="FCM delivery without a token"
            )
            return
        data = await self._data_for(delivery.notification_id)
        if data is None:
            error = f"notification {delivery.notification_id} is no longer stored"
            await self.recorder.finish(delivery, "failed", last_error=error)
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
        try:
            return await asyncio.wait_for(
                self.sender.send(token, data, calendar_id, TTL_SECONDS), self.guard
            )
        except TimeoutError:
            return SendOutcome("retry", error=f"no answer from FCM within {self.guard:g} s")
        except Exception as exc:  # a sender bug must not lose the delivery: retried, logged
            log.exception("fcm_sender_raised", extra={"token": short_token(token)})
            return SendOutcome("retry", error=shorten(f"{type(exc).__name__}: {exc}", token))

    async def _held(self, delivery: Delivery, error: str) -> None:
        """Back to pending until the next probe; attempts not counted, token kept. Its time is
        the probe's, after every delivery already waiting: the next probe tries another one."""
        await self.recorder.finish(
            delivery,
            "pending",
            count="held",
            next_attempt_at=self.hold.next_probe_at,
            last_error=f"{self.hold.held_error}; {error}",
        )

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
        kind = outcome.kind
        if probe:
            self.hold.probe_ended(kind == "sent", now, error, ids)
            if kind == "sent":
                await self.recorder.finish(delivery, "sent", attempts=attempts)
            else:
                await self._held(delivery, f"probe: {error}")
            return
        if self.hold.report(kind, token, now, error, ids):
            await self._held(delivery, error)
        elif kind == "sent":
            log.debug("fcm_sent", extra=ids)
            await self.recorder.finish(delivery, "sent", attempts=attempts)
        elif kind in ("unregistered", "sender_mismatch"):
            await self.recorder.finish(
                delivery, "failed", attempts=attempts, last_error=f"{error}; token dropped"
            )
            until = now + self.config.tombstone_days * 86400.0
            if await self.rooms.tombstone_token(delivery.calendar_id, token, until, now):
                self.recorder.tally.dropped_tokens += 1
            log.warning("fcm_token_dropped", extra={**ids, "error": error})
        elif kind == "retry":
            await self.recorder.retry(
                [delivery], error, outcome.retry_after, self.config.max_attempts
            )
        else:
            log.warning("fcm_failed", extra={**ids, "error": error})
            await self.recorder.finish(delivery, "failed", attempts=attempts, last_error=error)
