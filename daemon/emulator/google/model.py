"""The Calendar emulator's data: events, calendars, channels, webhook attempts and settings."""

from __future__ import annotations

import asyncio
import base64
import secrets
from dataclasses import dataclass, field
from typing import Any

from daemon.clock import rfc3339

_EVENT_ID_CHARS = "abcdefghijklmnopqrstuv0123456789"  # base32hex, as Google's event ids


@dataclass
class Settings:
    """What `/emulator/google/settings` changes while running (not kept across a restart)."""

    auto_create: bool = True  # an unknown calendar id exists once used
    # Google's sync message may reach the service before the watch answer does.
    sync_before_answer: bool = True
    page_size: int | None = None  # a server-side page limit below maxResults, for tests
    webhook_timeout: float = 5.0


@dataclass
class Event:
    id: str
    summary: str
    start: dict[str, Any]
    end: dict[str, Any]
    status: str
    created: float
    updated: float
    change: int  # the calendar's change counter when this event last changed
    sequence: int = 0

    def resource(self) -> dict[str, Any]:
        etag = f'"{int(self.updated * 1000)}{self.change:04d}"'
        if self.status == "cancelled":
            # Google may send a cancelled event as little more than its id.
            return {"kind": "calendar#event", "etag": etag, "id": self.id, "status": "cancelled"}
        return {
            "kind": "calendar#event",
            "etag": etag,
            "id": self.id,
            "status": self.status,
            "created": rfc3339(self.created),
            "updated": rfc3339(self.updated),
            "summary": self.summary,
            "start": dict(self.start),
            "end": dict(self.end),
            "iCalUID": self.id + "@google.com",
            "sequence": self.sequence,
        }


@dataclass
class Calendar:
    id: str
    resource_id: str  # one per watched resource, the same for every channel on it
    events: dict[str, Event] = field(default_factory=dict)
    change: int = 0
    generation: int = 0  # bumped to expire every sync token of the calendar


@dataclass
class Channel:
    id: str
    calendar_id: str
    resource_id: str
    resource_uri: str
    address: str
    token: str | None
    expiration: float  # emulator clock
    stopped: bool = False
    last_number: int = 0
    sync_started: bool = False
    sync_done: asyncio.Event = field(default_factory=asyncio.Event)  # first sync attempt made
    # One message at a time per channel, in number order, retries included.
    sending: asyncio.Lock = field(default_factory=asyncio.Lock)

    def state(self, now: float) -> str:
        if self.stopped:
            return "stopped"
        return "live" if self.expiration > now else "expired"

    def as_json(self, now: float) -> dict[str, Any]:
        return {
            "id": self.id,
            "calendar_id": self.calendar_id,
            "resource_id": self.resource_id,
            "resource_uri": self.resource_uri,
            "address": self.address,
            "token": self.token,
            "expiration": rfc3339(self.expiration),
            "state": self.state(now),
            "last_message_number": self.last_number,
        }


@dataclass
class WebhookAttempt:
    channel_id: str
    calendar_id: str
    message_number: int
    state: str
    attempt: int
    status: int | None  # None: no HTTP answer (connection refused, timeout)
    error: str | None
    at: float  # emulator clock

    def as_json(self) -> dict[str, Any]:
        return {
            "channel_id": self.channel_id,
            "calendar_id": self.calendar_id,
            "message_number": self.message_number,
            "state": self.state,
            "attempt": self.attempt,
            "status": self.status,
            "error": self.error,
            "at": rfc3339(self.at),
        }


def encode_time(value: float | dict[str, Any]) -> dict[str, Any]:
    """Seconds since the epoch, or a Google time object as given, as Google's time object."""
    return dict(value) if isinstance(value, dict) else {"dateTime": rfc3339(value)}


def opaque() -> str:
    """A token as opaque as Google's (resource ids, page and sync tokens)."""
    return base64.b64encode(secrets.token_bytes(18)).decode("ascii")


def new_event_id() -> str:
    return "".join(secrets.choice(_EVENT_ID_CHARS) for _ in range(26))
