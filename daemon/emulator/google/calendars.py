"""Calendars and their events, events.list cut into pages, and sync tokens (410 once expired)."""

from __future__ import annotations

import collections
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from daemon.clock import rfc3339
from daemon.emulator.google.errors import GoogleApiError
from daemon.emulator.google.model import Calendar, Event, encode_time, new_event_id, opaque

# Sync tokens kept per calendar; an older one answers 410, as Google's expired tokens do.
MAX_SYNC_TOKENS_PER_CALENDAR = 100
DEFAULT_PAGE = 250
MAX_PAGE = 2500
# Parameters Google refuses next to a syncToken.
_NOT_WITH_SYNC = ("orderBy", "q", "timeMin", "timeMax", "updatedMin", "iCalUID")


@dataclass
class SyncPoint:
    calendar_id: str
    change: int
    generation: int


@dataclass
class Listing:
    calendar_id: str
    event_ids: list[str]
    offset: int
    change: int  # where the next sync token starts
    generation: int


class Calendars:
    """Every calendar, the ids deleted on purpose, and the sync and page tokens handed out.

    It knows nothing of channels: the emulator tells the channels after a change here.
    """

    def __init__(self, now: Callable[[], float], touch: Callable[[], None]) -> None:
        self._now = now
        self._touch = touch  # after every change of what state.py keeps
        self.by_id: dict[str, Calendar] = {}
        self.deleted: set[str] = set()
        self.sync_tokens: dict[str, SyncPoint] = {}
        self.issued: dict[str, collections.deque[str]] = {}  # calendar → its tokens, oldest first
        self._page_tokens: dict[str, Listing] = {}

    # -- the set of calendars -------------------------------------------------------------------

    def create(self, calendar_id: str) -> Calendar:
        self.deleted.discard(calendar_id)
        if calendar_id not in self.by_id:
            self.by_id[calendar_id] = Calendar(calendar_id, resource_id=opaque()[:27])
            self._touch()
        return self.by_id[calendar_id]

    def get(self, calendar_id: str, auto_create: bool) -> Calendar:
        """The calendar; with `auto_create`, a new one for an id never deleted; else 404."""
        if calendar_id in self.by_id:
            return self.by_id[calendar_id]
        if auto_create and calendar_id not in self.deleted:
            return self.create(calendar_id)
        raise GoogleApiError(404, "notFound")

    def delete(self, calendar: Calendar) -> None:
        """Forget it (and its sync tokens); it stays missing until created again."""
        del self.by_id[calendar.id]
        self.deleted.add(calendar.id)
        for token in self.issued.pop(calendar.id, ()):
            self.sync_tokens.pop(token, None)
        self._touch()

    # -- events ---------------------------------------------------------------------------------

    def insert_event(
        self,
        calendar: Calendar,
        *,
        summary: str,
        start: float | dict[str, Any] | None,
        end: float | dict[str, Any] | None,
        event_id: str | None,
        status: str,
    ) -> Event:
        now = self._now()
        event_id = event_id or new_event_id()
        if event_id in calendar.events:
            raise GoogleApiError(409, "duplicate", "The requested identifier already exists.")
        begins = now + 3600 if start is None else start
        if end is None:
            end = (begins + 1800) if isinstance(begins, float | int) else begins
        calendar.change += 1
        event = Event(
            id=event_id,
            summary=summary,
            start=encode_time(begins),
            end=encode_time(end),
            status=status,
            created=now,
            updated=now,
            change=calendar.change,
        )
        calendar.events[event_id] = event
        return event

    def update_event(
        self,
        calendar: Calendar,
        event_id: str,
        *,
        summary: str | None,
        start: float | dict[str, Any] | None,
        end: float | dict[str, Any] | None,
        status: str | None,
    ) -> Event:
        event = calendar.events.get(event_id)
        if event is None:
            raise GoogleApiError(404, "notFound")
        if summary is not None:
            event.summary = summary
        if start is not None:
            event.start = encode_time(start)
        if end is not None:
            event.end = encode_time(end)
        if status is not None:
            event.status = status
        calendar.change += 1
        event.change = calendar.change
        event.updated = self._now()
        event.sequence += 1
        return event

    def expire_sync_tokens(self, calendar: Calendar) -> None:
        calendar.generation += 1
        self._touch()

    # -- events.list ----------------------------------------------------------------------------

    def list_events(
        self, calendar: Calendar, args: dict[str, str], page_size: int | None
    ) -> dict[str, Any]:
        """One page of a listing: the first (full, or incremental from `syncToken`) or the next
        (`pageToken`); the last page carries the next sync token."""
        try:
            max_results = int(args.get("maxResults", DEFAULT_PAGE))
        except ValueError:
            raise GoogleApiError(400, "invalid", "Invalid value for maxResults") from None
        if max_results < 1:
            raise GoogleApiError(400, "invalid", "Invalid value for maxResults")
        limit = min(max_results, MAX_PAGE, page_size or MAX_PAGE)
        page_token, sync_token = args.get("pageToken"), args.get("syncToken")
        if page_token:
            listing = self._page_tokens.pop(page_token, None)
            if listing is None or listing.calendar_id != calendar.id:
                raise GoogleApiError(400, "invalid", "Invalid page token")
        else:
            listing = self._start_listing(calendar, args, sync_token)
        ids = listing.event_ids[listing.offset : listing.offset + limit]
        listing.offset += len(ids)
        answer: dict[str, Any] = {
            "kind": "calendar#events",
            "etag": f'"{calendar.change}"',
            "summary": calendar.id,
            "updated": rfc3339(self._now()),
            "timeZone": "UTC",
            "accessRole": "reader",
            "defaultReminders": [],
            "items": [calendar.events[i].resource() for i in ids if i in calendar.events],
        }
        if listing.offset < len(listing.event_ids):
            token = opaque()
            self._page_tokens[token] = listing
            answer["nextPageToken"] = token
        else:
            token = opaque()
            self.remember_sync_token(token, calendar.id, listing.change, calendar.generation)
            answer["nextSyncToken"] = token
        if args.get("fields"):
            # Google's partial response, top-level names only: items(id,...) keeps whole items.
            names = {
                p.split("/")[0].strip() for p in re.sub(r"\(.*?\)", "", args["fields"]).split(",")
            }
            answer = {name: value for name, value in answer.items() if name in names}
        return answer

    def remember_sync_token(
        self, token: str, calendar_id: str, change: int, generation: int
    ) -> None:
        """Honour `token` from now on; the calendar's oldest beyond the bound answer 410."""
        issued = self.issued.setdefault(calendar_id, collections.deque())
        issued.append(token)
        self.sync_tokens[token] = SyncPoint(calendar_id, change, generation)
        while len(issued) > MAX_SYNC_TOKENS_PER_CALENDAR:
            self.sync_tokens.pop(issued.popleft(), None)
        self._touch()

    def _start_listing(
        self, calendar: Calendar, args: dict[str, str], sync_token: str | None
    ) -> Listing:
        if sync_token is None:
            show_deleted = args.get("showDeleted", "false").lower() == "true"
            ids = [
                e.id for e in calendar.events.values() if show_deleted or e.status != "cancelled"
            ]
        else:
            clash = [name for name in _NOT_WITH_SYNC if name in args]
            if clash:
                raise GoogleApiError(400, "invalid", f"{clash[0]} cannot be used with syncToken")
            point = self.sync_tokens.get(sync_token)
            if (
                point is None
                or point.calendar_id != calendar.id
                or point.generation != calendar.generation
            ):
                raise GoogleApiError(410, "fullSyncRequired")
            # Deleted events always come with an incremental sync, whatever showDeleted says.
            changed = [e for e in calendar.events.values() if e.change > point.change]
            ids = [e.id for e in sorted(changed, key=lambda e: e.change)]
        return Listing(calendar.id, ids, 0, calendar.change, calendar.generation)
