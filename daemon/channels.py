"""Watch channels: one current channel per room calendar, made, retried, renewed and stopped."""

from __future__ import annotations

import asyncio
import logging
import secrets
import uuid
from collections.abc import Coroutine
from contextlib import AbstractAsyncContextManager
from typing import Any

from daemon.backoff import backoff_delay
from daemon.clock import Clock
from daemon.config import Config
from daemon.configfile import public_url
from daemon.google_calendar import (
    GoogleCalendar,
    GoogleError,
    GoogleTimeout,
    PermanentGoogleError,
    WatchResult,
)
from daemon.keyed_locks import KeyedLocks
from daemon.renewal import LIVE_STATES, Renewer, RenewSummary
from daemon.stops import StopQueue
from storage.base import Channel
from storage.protocols import ChannelRepository, RoomReader

log = logging.getLogger(__name__)

NO_CREDENTIALS = PermanentGoogleError(0, "noCredentials", "google.service_account_file is not set")
RETRY_BASE = 5.0  # seconds before the first background retry of a channel
RETRY_CAP = 3600.0


def current_of(channels: list[Channel]) -> Channel | None:
    """A calendar's current channel among its channels (oldest first): the newest pending or
    active one; the newest failed one when that is all there is."""
    live = [c for c in channels if c.state in LIVE_STATES]
    if live:
        return live[-1]
    failed = [c for c in channels if c.state == "failed"]
    return failed[-1] if failed else None


class ChannelManager:
    """Owns the channel lifecycle; handlers and periodic callbacks call its methods."""

    def __init__(
        self,
        channel_store: ChannelRepository,
        room_store: RoomReader,
        google: GoogleCalendar | None,
        clock: Clock,
        config: Config,
    ) -> None:
        self.channel_store = channel_store
        self.room_store = room_store
        self.google = google
        self.clock = clock
        self.config = config
        # The service sets the port it actually bound (server.port 0) once it listens.
        self.public_url = public_url(config.server)
        # One holder at a time decides a calendar's channels (make, watch, retire, renew, fail,
        # forget); Google's `sync` webhook never waits for it (it may come mid-watch).
        self._calendars = KeyedLocks()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._last_created = 0.0
        self.stops = StopQueue(channel_store, google, clock, config, self.spawn)
        self.renewals = Renewer(self)

    @property
    def address(self) -> str:
        return self.public_url + self.config.google.webhook_path

    def _creation_time(self) -> float:
        """Now, but strictly after the previous channel's creation: `created_at` orders a
        calendar's channels, and a clock that stands still (tests) must not tie them."""
        self._last_created = max(self.clock.now(), self._last_created + 1e-6)
        return self._last_created

    def calendar_lock(self, calendar_id: str) -> AbstractAsyncContextManager[None]:
        """Held while a calendar's channels change (not reentrant)."""
        return self._calendars.hold(calendar_id)

    def calendar_busy(self, calendar_id: str) -> bool:
        return self._calendars.busy(calendar_id)

    def spawn(self, coroutine: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run in the background, kept referenced until done (and awaited at shutdown)."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def drain(self, limit: float) -> None:
        """Wait for background work (late watches, stops) at shutdown, up to `limit` seconds."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=limit)

    # -- which channel is current ------------------------------------------------------------
    async def current_channel(self, calendar_id: str) -> Channel | None:
        return current_of(await self.channel_store.list(calendar_id))

    # -- making channels ---------------------------------------------------------------------
    async def ensure_channel(self, calendar_id: str, wait: float | None = None) -> Channel | None:
        """Make sure the calendar has a current channel; wait at most `wait` seconds for Google
        (default google.request_timeout), after which the channel stays pending and the work
        goes on in the background. A failed channel is left alone (refresh or renew retry)."""
        current = await self.current_channel(calendar_id)
        if current is not None:
            return current
        return await self._bounded(self._ensure(calendar_id), calendar_id, wait)

    async def _ensure(self, calendar_id: str) -> Channel | None:
        async with self.calendar_lock(calendar_id):
            current = await self.current_channel(calendar_id)  # a renewal may have made one
            if current is not None:
                return current
            return await self.create_channel(calendar_id)

    async def _bounded(
        self, work: Coroutine[Any, Any, Channel | None], calendar_id: str, wait: float | None
    ) -> Channel | None:
        task = self.spawn(work)
        limit = self.config.google.request_timeout if wait is None else wait
        try:
            return await asyncio.wait_for(asyncio.shield(task), limit)
        except TimeoutError:
            return await self.current_channel(calendar_id)

    async def create_channel(self, calendar_id: str) -> Channel | None:
        """A new channel: the first full list (when no sync token yet), stored as pending,
        then watched. Returns it in whatever state Google's answer left it. The caller holds
        the calendar's lock."""
        if await self.room_store.get(calendar_id) is None:
            return None  # deleted meanwhile
        now = self._creation_time()
        channel = Channel(
            id=str(uuid.uuid4()),
            calendar_id=calendar_id,
            resource_id="",
            token=secrets.token_urlsafe(48),
            expiration=None,
            state="pending",
            confirmed=False,
            last_message_number=0,
            last_error=None,
            created_at=now,
            updated_at=now,
        )
        error = await self._first_sync_token(calendar_id)
        await self.channel_store.insert(channel)
        if error is not None:
            return await self._failed_attempt(channel, error)
        return await self._watch(channel)

    async def _first_sync_token(self, calendar_id: str) -> GoogleError | None:
        """The first sync token comes from a full list made before the first watch; that list
        pushes nothing. Changes between it and the watch come with the first incremental sync."""
        if self.google is None:
            return NO_CREDENTIALS
        if await self.channel_store.get_sync_token(calendar_id) is not None:
            return None
        try:
            token = await self.google.full_sync_token(calendar_id)
        except GoogleError as error:
            return error
        await self.channel_store.set_sync_token(calendar_id, token)
        return None

    async def _watch(self, channel: Channel) -> Channel | None:
        if self.google is None:
            return await self._failed_attempt(channel, NO_CREDENTIALS)
        # A retry after a failed first list lists again; otherwise this only reads the token.
        problem = await self._first_sync_token(channel.calendar_id)
        if problem is not None:
            return await self._failed_attempt(channel, problem)
        try:
            result = await self.google.watch(
                channel.calendar_id,
                channel.id,
                channel.token,
                self.address,
                self.config.google.channel_ttl,
            )
        except GoogleTimeout as timeout:
            if timeout.late is None:  # nothing left running: an ordinary transient failure
                return await self._failed_attempt(channel, timeout)
            # The call may still reach Google: park the channel (no retry time) until the late
            # answer settles it either way.
            updated = await self.channel_store.update(
                channel.id,
                self.clock.now(),
                last_error=f"watch timed out: {timeout}",
                next_attempt_at=None,
                attempts=channel.attempts + 1,
            )
            self.spawn(self._late_watch(channel, timeout.late))
            return updated
        except GoogleError as error:
            return await self._failed_attempt(channel, error)
        return await self._watched(channel, result)

    async def _late_watch(self, channel: Channel, late: asyncio.Future[WatchResult]) -> None:
        try:
            result = await late
        except GoogleError as error:
            async with self.calendar_lock(channel.calendar_id):
                stored = await self.channel_store.get(channel.id)
                if stored is not None and stored.state == "pending":
                    await self._failed_attempt(stored, error)
            return
        log.info("watch_answered_late", extra={"channel_id": channel.id})
        async with self.calendar_lock(channel.calendar_id):
            await self._watched(channel, result)

    async def _watched(self, channel: Channel, result: WatchResult) -> Channel | None:
        """Record Google's answer; stop the channel if it is no longer the current one."""
        stored = await self.channel_store.get(channel.id)
        if stored is None:
            # Forgotten meanwhile (room deleted): Google's channel must not live on.
            await self.queue_stop(channel.id, result.resource_id, channel.calendar_id)
            return None
        if stored.state in LIVE_STATES:
            current = await self.current_channel(channel.calendar_id)
            if current is not None and current.id != channel.id:
                # A newer channel took over while this watch was under way.
                await self.queue_stop(channel.id, result.resource_id, channel.calendar_id)
                return None
        updated = await self.channel_store.update(
            channel.id,
            self.clock.now(),
            state="active" if stored.state in LIVE_STATES else stored.state,
            resource_id=stored.resource_id or result.resource_id,
            expiration=result.expiration,
            last_error=None,
            next_attempt_at=None,
        )
        log.info(
            "channel_active",
            extra={"channel_id": channel.id, "calendar_id": channel.calendar_id},
        )
        return updated

    async def _failed_attempt(self, channel: Channel, error: GoogleError) -> Channel | None:
        attempts = channel.attempts + 1
        now = self.clock.now()
        if isinstance(error, PermanentGoogleError) or attempts > self.config.google.max_retries:
            log.warning(
                "channel_failed",
                extra={
                    "channel_id": channel.id,
                    "calendar_id": channel.calendar_id,
                    "reason": str(error),
                },
            )
            failed = await self.channel_store.update(
                channel.id,
                now,
                state="failed",
                last_error=str(error),
                attempts=attempts,
                next_attempt_at=None,
            )
            await self.reinstate(channel.calendar_id)
            return failed
        delay = backoff_delay(attempts, base=RETRY_BASE, cap=RETRY_CAP)
        log.info(
            "channel_retry_scheduled",
            extra={"channel_id": channel.id, "reason": str(error), "in_seconds": round(delay)},
        )
        return await self.channel_store.update(
            channel.id, now, last_error=str(error), attempts=attempts, next_attempt_at=now + delay
        )

    async def retry_pending(self) -> int:
        """Background retry: watch again every pending channel whose retry time has come."""
        now = self.clock.now()
        due = [
            c
            for c in await self.channel_store.list(states=("pending",))
            if c.next_attempt_at is not None and c.next_attempt_at <= now
        ]
        retried = 0
        for channel in due:
            async with self.calendar_lock(channel.calendar_id):
                # Read again under the lock: a renewal may have replaced it meanwhile.
                stored = await self.channel_store.get(channel.id)
                if stored is None or stored.state != "pending" or stored.next_attempt_at is None:
                    continue
                if stored.next_attempt_at > self.clock.now():
                    continue
                await self._watch(stored)
                retried += 1
        return retried

    async def recover_after_restart(self) -> None:
        """Pending channels left without a retry time were in flight when the process died;
        their watch may or may not have reached Google, so retry them now."""
        now = self.clock.now()
        for channel in await self.channel_store.list(states=("pending",)):
            if channel.next_attempt_at is None:
                await self.channel_store.update(channel.id, now, next_attempt_at=now)

    async def reinstate(self, calendar_id: str) -> Channel | None:
        """A calendar left without a live channel (its successor failed for good, or a renewal
        was cut short) gets its newest retiring channel back as `active`: it still listens,
        and the next renewal check renews it (at once when it has expired). Lock held."""
        channels = await self.channel_store.list(calendar_id)
        retiring = [c for c in channels if c.state == "retiring"]
        if not retiring or any(c.state in LIVE_STATES for c in channels):
            return None
        back = await self.channel_store.update(retiring[-1].id, self.clock.now(), state="active")
        if back is None:
            return None
        log.warning(
            "channel_reinstated",
            extra={"channel_id": back.id, "calendar_id": calendar_id},
        )
        if back.confirmed:  # Google sends on it: any older retiring ones can go
            await self.confirmed(back)
        return back

    # -- Google's sync message ---------------------------------------------------------------
    async def confirmed(self, channel: Channel) -> None:
        """A channel's `sync` arrived: channels it replaces can now be stopped (no gap). Never
        takes the calendar's lock: the sync may arrive while a watch holds it."""
        for older in await self.channel_store.list(channel.calendar_id, states=("retiring",)):
            if older.created_at <= channel.created_at and older.id != channel.id:
                await self.queue_stop(older.id, older.resource_id, older.calendar_id)

    # -- renewal (daemon/renewal.py) --------------------------------------------------------
    async def renew_due(self) -> RenewSummary:
        """The periodic renewal check (see Renewer.due)."""
        return await self.renewals.due()

    async def renew_now(self, calendar_id: str | None = None) -> RenewSummary:
        """Every room's calendar (or one) gets a new channel now, failed ones included."""
        return await self.renewals.now(calendar_id)

    # -- stopping ----------------------------------------------------------------------------
    async def discard(self, channel: Channel) -> None:
        """Forget a channel; stop it at Google unless Google never gave it a resource id (a
        watch still in flight is stopped by its late answer, which finds no channel)."""
        if channel.resource_id:
            await self.queue_stop(channel.id, channel.resource_id, channel.calendar_id)
        else:
            await self.channel_store.delete(channel.id)

    async def queue_stop(self, channel_id: str, resource_id: str, calendar_id: str | None) -> bool:
        """Forget the channel and queue its `channels.stop` (retried until done)."""
        await self.channel_store.delete(channel_id)
        return await self.stops.queue(channel_id, resource_id, calendar_id)

    async def queue_unknown_stop(self, channel_id: str, resource_id: str) -> bool:
        """A webhook call for a channel we do not know: queue its stop (see StopQueue)."""
        return await self.stops.queue_unknown(channel_id, resource_id)

    async def forget_calendar(self, calendar_id: str) -> int:
        """The room went: every channel of its calendar is stopped through the stop queue
        (after any channel work under way: a watch it started is then stored, and stopped)."""
        async with self.calendar_lock(calendar_id):
            channels = await self.channel_store.list(calendar_id)
            for channel in channels:
                await self.discard(channel)
        return len(channels)

    def kick_stops(self) -> None:
        self.stops.kick()

    async def process_stops(self) -> int:
        return await self.stops.process()
