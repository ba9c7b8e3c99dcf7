"""Refresh: pull the room list from the backend (GraphQL) and reconcile it with ours."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from daemon.config import Config
from daemon.rooms import Rooms
from storage.base import Store

log = logging.getLogger(__name__)

CALENDAR_ID_MAX = 1024


class BackendError(Exception):
    """The backend could not be asked (not configured, unreachable, HTTP error, bad answer)."""


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


class Refresher:
    """Asks the backend for its rooms; adds rooms and tokens, prunes only when it is safe."""

    def __init__(self, store: Store, rooms: Rooms, config: Config, token: str | None) -> None:
        self.store = store
        self.rooms = rooms
        self.config = config
        self.token = token

    async def fetch(self) -> BackendRooms:
        backend = self.config.backend
        if not backend.url:
            raise BackendError("backend.url is not set")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = HTTPRequest(
            backend.url,
            method="POST",
            headers=headers,
            body=json.dumps({"query": backend.rooms_query}),
            request_timeout=backend.timeout,
            connect_timeout=backend.timeout,
        )
        try:
            response = await AsyncHTTPClient().fetch(request)
        except HTTPClientError as error:
            raise BackendError(f"the backend answered HTTP {error.code}") from None
        except OSError as error:
            raise BackendError(f"the backend cannot be reached: {error}") from None
        try:
            answer = json.loads(response.body)
        except ValueError:
            raise BackendError("the backend's answer is not JSON") from None
        if not isinstance(answer, dict):
            raise BackendError("the backend's answer is not a GraphQL response")
        result = BackendRooms()
        for problem in answer.get("errors") or []:
            message = problem.get("message") if isinstance(problem, dict) else None
            result.errors.append(str(message or problem))
        for item in find_rooms(answer.get("data")) or []:
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
        backend = await self.fetch()
        summary = RefreshSummary()
        summary.failed += [{"calendar_id": None, "reason": "calendarId is null"}] * backend.null_ids
        for calendar_id, tokens in backend.rooms.items():
            await self._reconcile_room(calendar_id, tokens, summary, dry_run)
        prune = allow_prune or self.config.backend.prune
        ours = [room.calendar_id for room in await self.store.list_rooms()]
        gone = [calendar_id for calendar_id in ours if calendar_id not in backend.rooms]
        if prune and gone:
            if backend.errors:
                log.warning("refresh_prune_refused", extra={"reason": "GraphQL errors"})
            elif not backend.rooms:
                log.warning("refresh_prune_refused", extra={"reason": "the backend listed none"})
            else:
                for calendar_id in gone:
                    if dry_run or await self.rooms.delete(calendar_id):
                        summary.removed += 1
        log.info("refresh_done", extra={"dry_run": dry_run, **summary.as_json()})
        return summary

    async def _reconcile_room(
        self, calendar_id: str, tokens: list[str], summary: RefreshSummary, dry_run: bool
    ) -> None:
        if not calendar_id or len(calendar_id) > CALENDAR_ID_MAX or not calendar_id.isprintable():
            summary.failed.append({"calendar_id": calendar_id, "reason": "invalid calendarId"})
            return
        room = await self.store.get_room(calendar_id)
        if room is None:
            summary.added += 1
            if not dry_run:
                now = self.rooms.clock.now()
                await self.store.put_room(calendar_id, None, None, now)
                await self.store.add_tokens(calendar_id, tokens, now, respect_tombstones=True)
                await self._channel(calendar_id, summary)
            return
        now = self.rooms.clock.now()
        tombstoned = await self.store.tombstoned_tokens(calendar_id, now)
        new = [t for t in tokens if t not in room.firebase_tokens and t not in tombstoned]
        if new:
            summary.updated += 1
        else:
            summary.unchanged += 1
        if dry_run:
            return
        if new:
            await self.store.add_tokens(calendar_id, new, now, respect_tombstones=True)
        await self._channel(calendar_id, summary)

    async def _channel(self, calendar_id: str, summary: RefreshSummary) -> None:
        """Refresh is one of the two ways a failed channel is tried again (renew is the other)."""
        channels = self.rooms.channels
        current = await channels.current_channel(calendar_id)
        if current is None:
            current = await channels.ensure_channel(calendar_id)
        elif current.state == "failed":
            await channels.renew_now(calendar_id)
            current = await channels.current_channel(calendar_id)
        if current is not None and current.state == "failed":
            reason = f"channel failed: {current.last_error}"
            summary.failed.append({"calendar_id": calendar_id, "reason": reason})
