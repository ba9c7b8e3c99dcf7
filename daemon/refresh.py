"""Refresh: pull the room list from the backend (GraphQL) and reconcile it with ours."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from daemon.backend import BackendError, graphql_errors, post_graphql
from daemon.config import Config
from daemon.ids import calendar_id_problem, valid_token
from daemon.rooms import Rooms
from storage.protocols import ChannelReader, RoomRepository

log = logging.getLogger(__name__)

# The same limits the management API puts on calendar ids and tokens (handlers/rooms.py), so
# that refresh never stores what a PUT would refuse.


@dataclass
class BackendRooms:
    """What the backend answered: calendar id → tokens (None ids kept apart)."""

    rooms: dict[str, list[str]] = field(default_factory=dict)
    null_ids: int = 0
    errors: list[str] = field(default_factory=list)  # GraphQL `errors`, even beside data


@dataclass
class RefreshSummary:
    added: int = 0
    updated: int = 0
    removed: int = 0
    unchanged: int = 0
    failed: list[dict[str, Any]] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "added": self.added,
            "updated": self.updated,
            "removed": self.removed,
            "unchanged": self.unchanged,
            "failed": self.failed,
        }


def find_rooms(data: Any) -> list[dict[str, Any]] | None:
    """The first list of objects carrying `calendarId` in a GraphQL `data` (any query shape)."""
    if isinstance(data, list):
        if all(isinstance(item, dict) for item in data) and any("calendarId" in i for i in data):
            return data
        for item in data:
            found = find_rooms(item)
            if found is not None:
                return found
    elif isinstance(data, dict):
        for value in data.values():
            found = find_rooms(value)
            if found is not None:
                return found
    return None


def valid_calendar_id(calendar_id: str) -> bool:
    return calendar_id_problem(calendar_id) is None


class Refresher:
    """Asks the backend for its rooms; adds rooms and tokens, prunes only when it is safe."""

    def __init__(
        self,
        room_store: RoomRepository,
        channel_store: ChannelReader,
        rooms: Rooms,
        config: Config,
        token: str | None,
    ) -> None:
        self.room_store = room_store
        self.channel_store = channel_store
        self.rooms = rooms
        self.config = config
        self.token = token
        # One refresh at a time: a periodic one and a requested one must not both create
        # the same room's channel.
        self._lock = asyncio.Lock()

    async def fetch(self) -> BackendRooms:
        backend = self.config.backend
        query = {"query": backend.rooms_query}
        answer = await post_graphql(backend, self.token, query, self.rooms.clock)
        result = BackendRooms(errors=graphql_errors(answer))
        listed = find_rooms(answer.get("data"))
        if result.errors and not listed:
            # Errors and no rooms: the query failed; saying "0 rooms" would hide it.
            raise BackendError(f"the backend answered GraphQL errors: {'; '.join(result.errors)}")
        for item in listed or []:
            calendar_id = item.get("calendarId")
            if calendar_id is None:
                result.null_ids += 1
                continue
            tokens = result.rooms.setdefault(str(calendar_id), [])
            token = item.get("firebaseToken")
            if isinstance(token, str) and token and token not in tokens:
                tokens.append(token)
        return result

    async def refresh(self, *, dry_run: bool = False, allow_prune: bool = False) -> RefreshSummary:
        """Reconcile with the backend; raises BackendError when it could not be asked."""
        async with self._lock:
            return await self._refresh(dry_run, allow_prune)

    async def _refresh(self, dry_run: bool, allow_prune: bool) -> RefreshSummary:
        backend = await self.fetch()
        summary = RefreshSummary()
        summary.failed += [{"calendar_id": None, "reason": "calendarId is null"}] * backend.null_ids
        summary.failed += [
            {"calendar_id": None, "reason": f"backend GraphQL error: {message}"}
            for message in backend.errors
        ]
        for calendar_id, tokens in backend.rooms.items():
            await self._reconcile_room(calendar_id, tokens, summary, dry_run)
        prune = allow_prune or self.config.backend.prune
        ours = [room.calendar_id for room in await self.room_store.list()]
        gone = [calendar_id for calendar_id in ours if calendar_id not in backend.rooms]
        if prune and gone:
            if backend.errors:
                refused = "the backend answered GraphQL errors"
            elif not any(valid_calendar_id(c) for c in backend.rooms):
                refused = "the backend listed no rooms"
            else:
                refused = None
                for calendar_id in gone:
                    if dry_run or await self.rooms.delete(calendar_id):
                        summary.removed += 1
            if refused is not None:
                log.warning("refresh_prune_refused", extra={"reason": refused, "rooms": len(gone)})
        log.info("refresh_done", extra={"dry_run": dry_run, **summary.as_json()})
        return summary

    async def _reconcile_room(
        self, calendar_id: str, tokens: list[str], summary: RefreshSummary, dry_run: bool
    ) -> None:
        if not valid_calendar_id(calendar_id):
            summary.failed.append({"calendar_id": calendar_id, "reason": "invalid calendarId"})
            return
        valid = [t for t in tokens if valid_token(t)]
        if len(valid) < len(tokens):
            reason = f"{len(tokens) - len(valid)} invalid firebaseToken(s) left out"
            summary.failed.append({"calendar_id": calendar_id, "reason": reason})
        room = await self.room_store.get(calendar_id)
        now = self.rooms.clock.now()
        if room is None:
            summary.added += 1
            if not dry_run:
                await self.room_store.put(calendar_id, None, None, now)
                await self.room_store.add_tokens(calendar_id, valid, now, respect_tombstones=True)
                await self._channel(calendar_id, summary)
            return
        tombstoned = await self.room_store.tombstoned_tokens(calendar_id, now)
        new = [t for t in valid if t not in room.firebase_tokens and t not in tombstoned]
        if new:
            summary.updated += 1
        else:
            summary.unchanged += 1
        if dry_run:
            return
        if new:
            await self.room_store.add_tokens(calendar_id, new, now, respect_tombstones=True)
        await self._channel(calendar_id, summary)

    async def _channel(self, calendar_id: str, summary: RefreshSummary) -> None:
        """Make sure the room has a current channel. Refresh is one of the two ways a failed
        channel is tried again (renew is the other)."""
        channels = self.rooms.channels
        current = await channels.current_channel(calendar_id)
        if current is not None and current.state == "failed":
            # No live channel is left: forget the failed ones (nothing runs at Google for
            # them) so that a calendar failing at every refresh does not pile them up.
            for failed in await self.channel_store.list(calendar_id, states=("failed",)):
                await channels.discard(failed)
            current = None
        if current is None:
            current = await channels.ensure_channel(calendar_id)
        if current is not None and current.state == "failed":
            reason = f"channel failed: {current.last_error}"
            summary.failed.append({"calendar_id": calendar_id, "reason": reason})
