"""The `channels.stop` queue: stops owed to Google, sent in the background.

Retried with backoff up to google.max_retries times, and remembered once done (for
google.channel_ttl)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from daemon.backoff import backoff_delay
from daemon.clock import Clock
from daemon.config import Config
from daemon.google_calendar import GoogleCalendar, GoogleError
from storage.base import ChannelStop
from storage.protocols import ChannelStops

log = logging.getLogger(__name__)

RETRY_BASE = 5.0  # seconds before the first retry of a stop
RETRY_CAP = 3600.0
# Stops owed to Google at most; past it, webhook calls for unknown channels queue none (logged).
MAX_STOP_QUEUE = 10_000
# Ids of finished stops remembered at most (anyone can post made-up channel ids, and each one
# that was stopped is remembered); past it the ones closest to being forgotten go first, and
# such an id, posted again, costs one more stop (which Google answers 404).
MAX_REMEMBERED_STOPS = 50_000
FULL_WARNING_INTERVAL = 60.0  # seconds between "stop queue full" warnings

Spawn = Callable[[Coroutine[Any, Any, Any]], "asyncio.Task[Any]"]


class StopQueue:
    """Queues stops in the store and sends them; `spawn` runs background work (the channel
    manager's, so that shutdown waits for it)."""

    def __init__(
        self,
        stop_store: ChannelStops,
        google: GoogleCalendar | None,
        clock: Clock,
        config: Config,
        spawn: Spawn,
    ) -> None:
        self.stop_store = stop_store
        self.google = google
        self.clock = clock
        self.config = config
        self.spawn = spawn
        self.max_queued = MAX_STOP_QUEUE
        self.max_remembered = MAX_REMEMBERED_STOPS
        self._lock = asyncio.Lock()
        self._kicked = False
        self._refused = 0  # unknown-channel stops refused since the last warning
        self._warned_at = float("-inf")

    async def queue(self, channel_id: str, resource_id: str, calendar_id: str | None) -> bool:
        """Queue the channel's stop (once per id) and send it soon."""
        queued = await self.stop_store.enqueue_stop(
            channel_id, resource_id, calendar_id, self.clock.now()
        )
        if queued:
            self.kick()
        return queued

    async def queue_unknown(self, channel_id: str, resource_id: str) -> bool:
        """A webhook call for a channel we do not know: stop it once (an id queued or stopped
        already queues nothing), unless the queue is full: anyone can post made-up channel ids,
        and the bound keeps them from filling the disk. The check reads no queue."""
        outcome = await self.stop_store.enqueue_unknown_stop(
            channel_id, resource_id, self.clock.now(), self.max_queued
        )
        if outcome == "queued":
            self.kick()
        elif outcome == "full":
            self._refused_one()
        return outcome == "queued"

    def _refused_one(self) -> None:
        """One warning a minute at most: a flood must not become a flood of log lines."""
        self._refused += 1
        now = self.clock.now()
        if now - self._warned_at >= FULL_WARNING_INTERVAL:
            log.warning(
                "stop_queue_full", extra={"bound": self.max_queued, "refused": self._refused}
            )
            self._warned_at, self._refused = now, 0

    def kick(self) -> None:
        """Process the queue soon; at most one run waits behind the one under way."""
        if not self._kicked:
            self._kicked = True
            self.spawn(self.process())

    async def process(self) -> int:
        """Send the due stops; a 404 counts as stopped; other failures are retried later."""
        async with self._lock:
            self._kicked = False
            return await self._process()

    async def _process(self) -> int:
        if self.google is None:
            return 0
        done = 0
        for stop in await self.stop_store.due_stops(self.clock.now()):
            try:
                await self.google.stop(stop.channel_id, stop.resource_id)
            except GoogleError as error:
                if error.status != 404:
                    await self._failed(stop, error)
                    continue
            await self._finish(stop)
            log.info("channel_stopped", extra={"channel_id": stop.channel_id})
            done += 1
        return done

    async def _failed(self, stop: ChannelStop, error: GoogleError) -> None:
        attempts = stop.attempts + 1
        if attempts > self.config.google.max_retries:
            log.warning(
                "channel_stop_dropped",
                extra={"channel_id": stop.channel_id, "attempts": attempts, "reason": str(error)},
            )
            await self._finish(stop)
            return
        delay = backoff_delay(attempts, base=RETRY_BASE, cap=RETRY_CAP)
        await self.stop_store.reschedule_stop(stop.channel_id, self.clock.now() + delay, str(error))

    async def _finish(self, stop: ChannelStop) -> None:
        """Off the queue; the id remembered as long as Google could still send on it."""
        now = self.clock.now()
        await self.stop_store.finish_stop(
            stop.channel_id, now + self.config.google.channel_ttl, now, self.max_remembered
        )
