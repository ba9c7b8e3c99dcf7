"""The `channels.stop` queue: stops owed to Google, sent in the background and retried."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from daemon.backoff import backoff_delay
from daemon.clock import Clock
from daemon.config import Config
from daemon.google_calendar import GoogleCalendar, GoogleError
from storage.base import Store

log = logging.getLogger(__name__)

RETRY_BASE = 5.0  # seconds before the first retry of a stop
RETRY_CAP = 3600.0
# Stops owed to Google at most; past it, webhook calls for unknown channels queue none (logged).
MAX_STOP_QUEUE = 10_000

Spawn = Callable[[Coroutine[Any, Any, Any]], "asyncio.Task[Any]"]


class StopQueue:
    """Queues stops in the store and sends them; `spawn` runs background work (the channel
    manager's, so that shutdown waits for it)."""

    def __init__(
        self,
        store: Store,
        google: GoogleCalendar | None,
        clock: Clock,
        config: Config,
        spawn: Spawn,
    ) -> None:
        self.store = store
        self.google = google
        self.clock = clock
        self.config = config
        self.spawn = spawn
        self.max_queued = MAX_STOP_QUEUE
        self._lock = asyncio.Lock()
        self._kicked = False

    async def queue(self, channel_id: str, resource_id: str, calendar_id: str | None) -> bool:
        """Queue the channel's stop (once per id) and send it soon."""
        queued = await self.store.enqueue_stop(
            channel_id, resource_id, calendar_id, self.clock.now()
        )
        if queued:
            self.kick()
        return queued

    async def queue_unknown(self, channel_id: str, resource_id: str) -> bool:
        """A webhook call for a channel we do not know: stop it, unless the queue is full
        (anyone can post made-up channel ids; the bound keeps them from filling the disk)."""
        if len(await self.store.due_stops(float("inf"), limit=self.max_queued)) >= self.max_queued:
            log.warning("stop_queue_full", extra={"channel_id": channel_id})
            return False
        return await self.queue(channel_id, resource_id, None)

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
        for stop in await self.store.due_stops(self.clock.now()):
            try:
                await self.google.stop(stop.channel_id, stop.resource_id)
            except GoogleError as error:
                if error.status != 404:
                    delay = backoff_delay(stop.attempts + 1, base=RETRY_BASE, cap=RETRY_CAP)
                    await self.store.reschedule_stop(
                        stop.channel_id, self.clock.now() + delay, str(error)
                    )
                    continue
            await self.store.remove_stop(stop.channel_id)
            log.info("channel_stopped", extra={"channel_id": stop.channel_id})
            done += 1
        return done
