"""Incremental sync: stored notifications become published lists of changed events."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from daemon.backoff import backoff_delay
from daemon.changes import changes_of
from daemon.clock import Clock
from daemon.config import Config
from daemon.google_calendar import (
    EventList,
    GoogleCalendar,
    GoogleError,
    PermanentGoogleError,
    SyncTokenExpired,
)
from storage.base import Notification, Room, StoreError, Target
from storage.protocols import NotificationRepository, RoomReader, SyncTokens

log = logging.getLogger(__name__)

RETRY_BASE = 5.0  # seconds before the first retry of a calendar whose sync failed
RETRY_CAP = 600.0  # the poll (900 s by default) must not be the only thing that retries
BATCH_LIMIT = 10_000  # received notifications taken by one sync (or one resume) at most
# During a burst the syncs of one calendar start at most this often (seconds, the loop's
# clock): the first of a burst at once, the next one takes all that came meanwhile. Measured
# with mrm-push bench (ingest ceiling 1,173-1,239 answers/s at 0.2 s, 1,494 at 0.1, 1,650-1,840
# at 0.05; webhook to FCM the same): under load a sync takes longer than this anyway, and a
# longer wait only lines the calendars' syncs up into bursts.
SYNC_SPACING = 0.05


class RetryLater(Exception):
    """The sync could not finish now (Google or the store failing): its notifications stay
    `received` and the calendar is synced again after a backoff."""


class Syncer:
    """Per calendar, one sync at a time; bursts coalesced; publishes what changed.

    A kick starts the calendar's worker, or only marks the calendar dirty while its worker is
    busy: when the running sync ends, one more sync takes every notification received
    meanwhile. Direct calls (`sync_calendar`, `poll_all`) share the same per-calendar lock.
    """

    def __init__(
        self,
        notifications: NotificationRepository,
        rooms: RoomReader,
        sync_tokens: SyncTokens,
        google: GoogleCalendar | None,
        clock: Clock,
        config: Config,
        on_published: Callable[[Notification], None],
        *,
        fcm: bool = True,
    ) -> None:
        self.notifications = notifications
        self.rooms = rooms
        self.sync_tokens = sync_tokens
        self.google = google
        self.clock = clock
        self.config = config
        self.on_published = on_published
        # Without an FCM sender (fcm.service_account_file unset) no FCM delivery is made: it
        # could never be sent, and would only wait in the outbox until retention expired it.
        self.fcm = fcm
        self._locks: dict[str, asyncio.Lock] = {}
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._dirty: set[str] = set()
        self._parked: dict[str, float] = {}  # calendar -> when its backoff ends (clock time)
        self._changed = asyncio.Event()  # a worker parked or ended: drain looks again
        self._closed = False
        self._commits: set[asyncio.Task[Notification]] = set()  # publications under way

    # -- entry points ------------------------------------------------------------------------
    def kick(self, calendar_id: str) -> None:
        """A notification for this calendar was stored; returns at once."""
        if self._closed:
            return
        if calendar_id in self._workers:
            self._dirty.add(calendar_id)
        else:
            self._start_worker(calendar_id, attempt=0)

    async def resume(self) -> None:
        """At start: kick every calendar with `received` notifications (left by a crash)."""
        waiting = await self.notifications.received(BATCH_LIMIT)
        calendars = list(dict.fromkeys(n.calendar_id for n in waiting))
        for calendar_id in calendars:
            self.kick(calendar_id)
        if waiting:
            log.info(
                "sync_resumed",
                extra={"calendars": len(calendars), "notifications": len(waiting)},
            )

    async def sync_calendar(self, calendar_id: str) -> Notification | None:
        """Sync now; returns the notification it published, if any. A failure that may pass
        leaves the notifications `received` and schedules a retry with backoff."""
        try:
            return await self._locked_sync(calendar_id, poll=False)
        except RetryLater:
            self._retry_later(calendar_id)
            return None

    async def poll_all(self) -> int:
        """The safety-net poll: an incremental sync of every room's calendar that is not
        syncing already; returns how many notifications it published."""
        if self.google is None:
            log.warning("poll_unconfigured", extra={"reason": "no Google credentials"})
            return 0
        rooms = await self.rooms.list()
        limit = asyncio.Semaphore(max(1, self.config.google.max_concurrency))
        published = 0

        async def poll(room: Room) -> None:
            nonlocal published
            async with limit:
                lock = self._lock(room.calendar_id)
                if self._closed or lock.locked():
                    return  # the sync under way reads the same changes
                try:
                    async with lock:
                        notification = await self._sync_once(room.calendar_id, poll=True)
                except RetryLater as failure:
                    if failure.args and failure.args[0]:  # webhook notifications wait too
                        self._retry_later(room.calendar_id)
                    return
                if notification is not None:
                    published += 1

        await asyncio.gather(*(poll(room) for room in rooms))
        log.info("poll_done", extra={"calendars": len(rooms), "published": published})
        return published

    async def drain(self, limit: float) -> None:
        """Wait up to `limit` seconds until no sync runs or is queued. A calendar parked in
        its backoff does not count until its backoff ends (move a ManualClock to end it)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        while self._busy():
            self._changed.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                return

    def close(self) -> None:
        """Stop: no new work; running syncs are cancelled, except a publication under way,
        which stores its sync token first (`committed` waits for it)."""
        self._closed = True
        for task in list(self._workers.values()):
            task.cancel()

    # -- workers -----------------------------------------------------------------------------
    def _lock(self, calendar_id: str) -> asyncio.Lock:
        return self._locks.setdefault(calendar_id, asyncio.Lock())

    def _busy(self) -> bool:
        now = self.clock.now()
        return any(c not in self._parked or self._parked[c] <= now for c in self._workers)

    def _start_worker(self, calendar_id: str, attempt: int) -> None:
        task = asyncio.get_running_loop().create_task(self._work(calendar_id, attempt))
        self._workers[calendar_id] = task

    def _retry_later(self, calendar_id: str) -> None:
        if self._closed:
            return
        if calendar_id in self._workers:
            self._dirty.add(calendar_id)  # its worker syncs again, and backs off if it fails
        else:
            self._start_worker(calendar_id, attempt=1)

    async def _work(self, calendar_id: str, attempt: int) -> None:
        try:
            if attempt:
                await self._back_off(calendar_id, attempt)
            loop = asyncio.get_running_loop()
            while True:
                started = loop.time()
                self._dirty.discard(calendar_id)
                try:
                    await self._locked_sync(calendar_id, poll=False)
                    attempt = 0
                except RetryLater:
                    attempt += 1
                    self._dirty.add(calendar_id)
                    await self._back_off(calendar_id, attempt)
                if calendar_id not in self._dirty:
                    return
                if not attempt:
                    await asyncio.sleep(max(0.0, started + SYNC_SPACING - loop.time()))
        finally:
            if self._workers.get(calendar_id) is asyncio.current_task():
                del self._workers[calendar_id]
            self._changed.set()

    async def _back_off(self, calendar_id: str, attempt: int) -> None:
        delay = backoff_delay(attempt, base=RETRY_BASE, cap=RETRY_CAP)
        log.info("sync_retry_scheduled", extra={"calendar_id": calendar_id, "attempt": attempt})
        self._parked[calendar_id] = self.clock.now() + delay
        self._changed.set()
        try:
            await self.clock.sleep(delay)
        finally:
            self._parked.pop(calendar_id, None)

    # -- one sync ----------------------------------------------------------------------------
    async def _locked_sync(self, calendar_id: str, *, poll: bool) -> Notification | None:
        async with self._lock(calendar_id):
            return await self._sync_once(calendar_id, poll=poll)

    async def _sync_once(self, calendar_id: str, *, poll: bool) -> Notification | None:
        """Raises RetryLater (its argument: how many webhook notifications wait) when Google
        or the store fails in a way that may pass."""
        batch: list[Notification] = []
        try:
            batch = await self._batch(calendar_id)
            return await self._sync_batch(calendar_id, batch, poll=poll)
        except (GoogleError, StoreError) as error:
            log.warning(
                "sync_failed",
                extra={
                    "calendar_id": calendar_id,
                    "error": str(error),
                    "kind": type(error).__name__,
                    "waiting": len(batch),
                },
            )
            raise RetryLater(len(batch)) from error
        except Exception as error:  # a bug must not drop the notifications: retry, loudly
            log.exception("sync_crashed", extra={"calendar_id": calendar_id})
            raise RetryLater(len(batch)) from error

    async def _batch(self, calendar_id: str) -> list[Notification]:
        return await self.notifications.received(BATCH_LIMIT, calendar_id=calendar_id)

    async def _sync_batch(
        self, calendar_id: str, batch: list[Notification], *, poll: bool
    ) -> Notification | None:
        """The room is read once, after the list: its tokens as they are when the publication
        is made. rooms.delete forgets the calendar's sync token with the room, so a calendar
        that has one had its room when this sync began; only without one (a full list, the
        costly kind) is the room looked up before listing too, so that a gone one is skipped
        without a call to Google."""
        if not batch and not poll:
            return None  # an earlier sync took them: nothing to list for
        if self.google is None:
            if await self._room(calendar_id, batch) is not None:
                # Left received: a restart with credentials picks them up.
                log.warning("sync_unconfigured", extra={"calendar_id": calendar_id})
            return None
        sync_token = await self.sync_tokens.get_sync_token(calendar_id)
        if sync_token is None and await self._room(calendar_id, batch) is None:
            return None
        try:
            listing, full_resync = await self._list(self.google, calendar_id, sync_token)
        except PermanentGoogleError as error:
            # The channel's own lifecycle deals with a calendar that is gone or forbidden.
            log.warning(
                "sync_refused",
                extra={
                    "calendar_id": calendar_id,
                    "status": error.status,
                    "reason": error.reason,
                    "skipped": len(batch),
                },
            )
            await self._skip(calendar_id, batch, "google_refused")
            return None
        # Deleted during the list (its sync token went with it): no publication, no token.
        room = await self._room(calendar_id, batch)
        if room is None:
            return None
        changes = [] if full_resync else changes_of(listing.items)
        published: Notification | None = None
        if changes or full_resync:
            chosen = batch.pop() if batch else await self._poll_notification(calendar_id)
            # Publishing and storing the sync token run on even when a stop cancels this sync
            # (shielded; the stop waits for them: `committed`): cut in between, the next run
            # would publish the same changes again.
            commit = asyncio.ensure_future(
                self._publish(chosen, changes, full_resync, room, listing.next_sync_token)
            )
            self._commits.add(commit)
            commit.add_done_callback(self._commit_done)
            published = await asyncio.shield(commit)
        else:
            await self.sync_tokens.set_sync_token(calendar_id, listing.next_sync_token)
        await self._skip(calendar_id, batch, "coalesced" if published else "nothing_new")
        return published

    async def _publish(
        self,
        chosen: Notification,
        changes: list[dict[str, Any]],
        full_resync: bool,
        room: Room,
        sync_token: str | None,
    ) -> Notification:
        calendar_id = chosen.calendar_id
        published = await self.notifications.publish(
            chosen.id, changes, full_resync, self._targets(room), self.clock.now()
        )
        log.info(
            "published",
            extra={
                "calendar_id": calendar_id,
                "notification_id": published.id,
                "seq": published.seq,
                "source": published.source,
                "changes": len(changes),
                "full_resync": full_resync,
            },
        )
        self._announce(published)
        # Stored after publishing: a crash in between syncs the same changes again (at least
        # once, never lost); before skipping: a failed skip then costs only an empty re-sync.
        await self.sync_tokens.set_sync_token(calendar_id, sync_token)
        return published

    def _commit_done(self, commit: asyncio.Task[Notification]) -> None:
        self._commits.discard(commit)
        if not commit.cancelled() and commit.exception() is not None:
            # The sync awaiting it reports the failure; when a stop cancelled that sync, say it.
            log.debug("publication_failed", extra={"error": str(commit.exception())})

    async def committed(self) -> None:
        """Wait for the publications under way to store their sync tokens (a stop does this
        after `close`, before the store closes)."""
        while self._commits:
            await asyncio.gather(*list(self._commits), return_exceptions=True)

    async def _list(
        self, google: GoogleCalendar, calendar_id: str, token: str | None
    ) -> tuple[EventList, bool]:
        """Every page since the stored sync token; a full list (full_resync) when there is no
        token or Google says it expired (410)."""
        if token is not None:
            try:
                return await google.list_events(calendar_id, token), False
            except SyncTokenExpired:
                log.info("sync_token_expired", extra={"calendar_id": calendar_id})
        # A full resync publishes no changes: its events stay at Google, only the token comes.
        return EventList(items=[], next_sync_token=await google.full_sync_token(calendar_id)), True

    async def _poll_notification(self, calendar_id: str) -> Notification:
        return await self.notifications.add(
            calendar_id, "poll", "exists", received_at=self.clock.now()
        )

    def _targets(self, room: Room) -> list[Target]:
        targets = [Target("fcm", token) for token in room.firebase_tokens] if self.fcm else []
        backend = self.config.backend
        if backend.notify and backend.url:
            targets.append(Target("backend"))
        return targets

    async def _room(self, calendar_id: str, batch: list[Notification]) -> Room | None:
        """The room, or None with the batch skipped when it is gone."""
        room = await self.rooms.get(calendar_id)
        if room is None:
            await self._skip(calendar_id, batch, "room_gone")
        return room

    async def _skip(self, calendar_id: str, batch: list[Notification], reason: str) -> None:
        if batch:
            await self.notifications.skip([n.id for n in batch], self.clock.now())
            log.debug(
                "skipped",
                extra={
                    "calendar_id": calendar_id,
                    "notification_ids": [n.id for n in batch],
                    "reason": reason,
                },
            )

    def _announce(self, notification: Notification) -> None:
        try:
            self.on_published(notification)
        except Exception:  # a listener's bug must not undo or repeat the publication
            log.exception(
                "on_published_failed",
                extra={"calendar_id": notification.calendar_id, "notification_id": notification.id},
            )
