"""Room changes shared by the v1 API, the legacy routes and refresh: store first, then channels."""

from __future__ import annotations

import logging

from daemon.channels import ChannelManager
from daemon.clock import Clock
from storage.base import Room
from storage.protocols import RoomRepository

log = logging.getLogger(__name__)


class Rooms:
    """Creates, changes and deletes rooms, keeping their channels in step."""

    def __init__(self, room_store: RoomRepository, channels: ChannelManager, clock: Clock) -> None:
        self.room_store = room_store
        self.channels = channels
        self.clock = clock

    async def put(
        self, calendar_id: str, name: str | None, tokens: list[str] | None
    ) -> tuple[Room, bool]:
        """Create or update (a token list replaces the set); make sure a channel exists. A name
        or token change never recreates the channel."""
        room, created = await self.room_store.put(calendar_id, name, tokens, self.clock.now())
        if created:
            log.info("room_added", extra={"calendar_id": calendar_id})
        await self.channels.ensure_channel(calendar_id)
        return room, created

    async def add_token(self, calendar_id: str, token: str) -> Room | None:
        """An explicit add clears the token's tombstone."""
        added = await self.room_store.add_tokens(
            calendar_id, [token], self.clock.now(), respect_tombstones=False
        )
        return added[0] if added else None

    async def delete(self, calendar_id: str) -> bool:
        """Forget the room, cancel its deliveries, stop its channels (queued, retried)."""
        if not await self.room_store.delete(calendar_id):
            return False
        stopped = await self.channels.forget_calendar(calendar_id)
        log.info("room_deleted", extra={"calendar_id": calendar_id, "channels": stopped})
        return True
