"""Channel renewal: each calendar's channel replaced before it expires, never leaving it deaf."""

from __future__ import annotations

import logging
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from storage.base import Channel

if TYPE_CHECKING:
    from daemon.channels import ChannelManager

log = logging.getLogger(__name__)

LIVE_STATES = ("pending", "active")


@dataclass
class RenewSummary:
    renewed: int = 0
    failed: list[dict[str, str]] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {"renewed": self.renewed, "failed": self.failed}


def _due(channel: Channel, before: float) -> bool:
    return channel.expiration is not None and channel.expiration < before


def _needs_check(channels: list[Channel], now: float, horizon: float) -> bool:
    """Whether a room's channels (oldest first) need the renewal check to look closer."""
    if not channels:
        return True  # its last channel went without a successor
    live = [c for c in channels if c.state in LIVE_STATES]
    retiring = [c for c in channels if c.state == "retiring"]
    if not live:
        return bool(retiring)  # only failed ones: left to refresh and renew_now
    current = live[-1]
    if current.state == "active" and _due(current, horizon):
        return True
    return any(_due(old, now) for old in retiring)


class Renewer:
    """The periodic renewal check and `POST /v1/channels/renew`; both take the calendar's lock
    (ChannelManager.calendar_lock), so renewals of one calendar never interleave."""

    def __init__(self, channels: ChannelManager) -> None:
        self.channels = channels
        self.channel_store = channels.channel_store
        self.room_store = channels.room_store
        self.clock = channels.clock
        self.config = channels.config

    def _hold(self, calendar_id: str) -> AbstractAsyncContextManager[None]:
        if self.channels.calendar_busy(calendar_id):
            log.info("channel_renewal_waits", extra={"calendar_id": calendar_id})
        return self.channels.calendar_lock(calendar_id)

    async def due(self) -> RenewSummary:
        """Every room is looked at: an active current channel expiring within
        google.renew_before gets its successor; a room left without a live channel (its
        successor failed, its renewal was cut short, its channels were lost) gets one again;
        channels whose room is gone are stopped."""
        now = self.clock.now()
        horizon = now + self.config.google.renew_before
        summary = RenewSummary()
        rooms = {room.calendar_id for room in await self.room_store.list()}
        by_calendar: dict[str, list[Channel]] = {}
        for channel in await self.channel_store.list():
            by_calendar.setdefault(channel.calendar_id, []).append(channel)
        for calendar_id in sorted(rooms | by_calendar.keys()):
            channels = by_calendar.get(calendar_id, [])
            if calendar_id in rooms and not _needs_check(channels, now, horizon):
                continue
            async with self._hold(calendar_id):
                await self._check(calendar_id, horizon, summary)
        return summary

    async def now(self, calendar_id: str | None = None) -> RenewSummary:
        """Every room's calendar (or one) gets a new channel now, failed ones included."""
        summary = RenewSummary()
        if calendar_id is not None:
            calendars = [calendar_id]
        else:
            calendars = [room.calendar_id for room in await self.room_store.list()]
        for calendar in calendars:
            async with self._hold(calendar):
                await self._renew(calendar, summary)
        return summary

    async def _check(self, calendar_id: str, horizon: float, summary: RenewSummary) -> None:
        """One calendar, its lock held: everything read again, as another holder may have
        changed it since the unlocked look."""
        channels = self.channels
        if await self.room_store.get(calendar_id) is None:
            for orphan in await self.channel_store.list(calendar_id):
                await channels.discard(orphan)
            return
        await channels.reinstate(calendar_id)
        known = await self.channel_store.list(calendar_id)
        if not known:
            log.warning("channel_missing", extra={"calendar_id": calendar_id})
            await self._renew(calendar_id, summary)
            return
        live = [c for c in known if c.state in LIVE_STATES]
        if live and live[-1].state == "active" and _due(live[-1], horizon):
            await self._renew(calendar_id, summary)
            known = await self.channel_store.list(calendar_id)
        await self._stop_expired(known)

    async def _stop_expired(self, known: list[Channel]) -> None:
        """Expired retiring channels hear nothing more from Google: they are stopped once an
        active channel newer than they are exists. The newest of them is kept while its
        successor is still pending: if that one fails for good, it is the calendar's again
        (and renewed at the next check)."""
        now = self.clock.now()
        retiring = [c for c in known if c.state == "retiring"]
        active = [c for c in known if c.state == "active"]
        for old in retiring:
            if not _due(old, now):
                continue
            replaced = any(new.created_at > old.created_at for new in active)
            if replaced or old is not retiring[-1]:
                await self.channels.queue_stop(old.id, old.resource_id, old.calendar_id)

    async def _renew(self, calendar_id: str, summary: RenewSummary) -> None:
        """The old active channel retires first (it keeps listening until its successor's
        `sync` arrives), so that the successor is the only live one. A successor that fails
        for good, now or later, gives the old channel back (ChannelManager.reinstate)."""
        channels = self.channels
        for old in await self.channel_store.list(calendar_id):
            if old.state == "active":
                await self.channel_store.update(old.id, self.clock.now(), state="retiring")
            elif old.state in ("pending", "failed"):
                # Never watched successfully: nothing overlaps, so no need to keep it.
                await channels.discard(old)
        successor = await channels.create_channel(calendar_id)
        if successor is None or successor.state == "failed":
            reason = successor.last_error if successor else "room not found"
            summary.failed.append({"calendar_id": calendar_id, "reason": reason or "failed"})
            return
        summary.renewed += 1
        if successor.confirmed:  # its sync came first: the old ones can go now
            await channels.confirmed(successor)
