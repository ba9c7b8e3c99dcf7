"""Google Calendar stand-in: events.watch, channels.stop, events.list and the webhook calls."""

from __future__ import annotations

import asyncio
import base64
import collections
import email.utils
import json
import random
import re
import secrets
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import tornado.web
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from daemon.clock import Clock, rfc3339
from daemon.emulator.oauth import OAuthEmulator

# Any of these lets a token read events (readonly is what the service asks for).
CALENDAR_SCOPES = (
    "https://www.googleapis.com/auth/calendar.readonly",
    "https://www.googleapis.com/auth/calendar",
    "https://www.googleapis.com/auth/calendar.events.readonly",
    "https://www.googleapis.com/auth/calendar.events",
)
MAX_CHANNEL_TTL = 604800  # Google caps Calendar event channels at about a week
# Sync tokens kept per calendar; an older one answers 410, as Google's expired tokens do.
MAX_SYNC_TOKENS_PER_CALENDAR = 100
DEFAULT_PAGE = 250
MAX_PAGE = 2500
RETRY_STATUSES = frozenset({500, 502, 503, 504})  # the only answers Google sends again on
METHODS = ("watch", "stop", "list")
_CHANNEL_ID = re.compile(r"^[A-Za-z0-9\-_+/=]{1,64}$")
_EVENT_ID_CHARS = "abcdefghijklmnopqrstuv0123456789"  # base32hex, as Google's event ids
# Parameters Google refuses next to a syncToken.
_NOT_WITH_SYNC = ("orderBy", "q", "timeMin", "timeMax", "updatedMin", "iCalUID")

_REASONS: dict[str, tuple[int, str, str]] = {
    # reason: (status, domain, message)
    "invalid": (400, "global", "Invalid Value"),
    "required": (400, "global", "Required"),
    "channelIdNotUnique": (400, "global", "Channel id not unique"),
    "authError": (401, "global", "Invalid Credentials"),
    "forbidden": (403, "global", "Forbidden"),
    "insufficientPermissions": (403, "global", "Insufficient Permission"),
    "rateLimitExceeded": (403, "usageLimits", "Rate Limit Exceeded"),
    "userRateLimitExceeded": (403, "usageLimits", "User Rate Limit Exceeded"),
    "quotaExceeded": (403, "usageLimits", "Calendar usage limits exceeded."),
    "notFound": (404, "global", "Not Found"),
    "fullSyncRequired": (
        410,
        "global",
        "Sync token is no longer valid, a full sync is required.",
    ),
    "backendError": (500, "global", "Backend Error"),
}
_DEFAULT_REASON = {
    400: "invalid",
    401: "authError",
    403: "forbidden",
    404: "notFound",
    410: "fullSyncRequired",
    429: "rateLimitExceeded",
}
_STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}


class GoogleApiError(Exception):
    """An error answer, rendered as Google's JSON error body."""

    def __init__(self, status: int, reason: str | None = None, message: str | None = None) -> None:
        reason = reason or _DEFAULT_REASON.get(status, "backendError")
        _, domain, default_message = _REASONS.get(reason, (status, "global", "Error"))
        super().__init__(message or default_message)
        self.status = status
        self.reason = reason
        self.domain = domain
        self.message = message or default_message

    def body(self) -> dict[str, Any]:
        detail: dict[str, Any] = {
            "domain": self.domain,
            "reason": self.reason,
            "message": self.message,
        }
        if self.reason == "fullSyncRequired":
            detail.update(locationType="parameter", location="syncToken")
        if self.reason == "authError":
            detail.update(locationType="header", location="Authorization")
        error: dict[str, Any] = {"code": self.status, "message": self.message, "errors": [detail]}
        if self.status in _STATUS_NAMES:
            error["status"] = _STATUS_NAMES[self.status]
        return {"error": error}


def error_for(
    status: int | None = None, reason: str | None = None, message: str | None = None
) -> GoogleApiError:
    """A Google error from a status, a reason, or both (the other is filled in)."""
    if status is None:
        status = _REASONS[reason][0] if reason in _REASONS else 500
    return GoogleApiError(status, reason, message)


@runtime_checkable
class MovableClock(Protocol):
    """A clock tests and demos can move forward (ManualClock, the emulator's OffsetClock)."""

    def now(self) -> float: ...

    def advance(self, seconds: float) -> None: ...


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


@dataclass
class Failure:
    method: str
    count: int
    status: int | None
    reason: str | None
    message: str | None
    delay: float
    calendar_id: str | None
    hold: asyncio.Event | None = None  # the call waits until the test sets it
    taken: asyncio.Event = field(default_factory=asyncio.Event)  # set when a call takes it


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


@dataclass
class _SyncPoint:
    calendar_id: str
    change: int
    generation: int


@dataclass
class _Listing:
    calendar_id: str
    event_ids: list[str]
    offset: int
    change: int  # where the next sync token starts
    generation: int


def _encode_time(value: float | dict[str, Any]) -> dict[str, Any]:
    return dict(value) if isinstance(value, dict) else {"dateTime": rfc3339(value)}


def _opaque() -> str:
    return base64.b64encode(secrets.token_bytes(18)).decode("ascii")


class GoogleCalendarEmulator:
    """Calendars, events, channels and webhook deliveries, on an injected clock.

    Calendars: with `auto_create` (the default) every calendar id exists the
    first time it is used, so a demo works without set-up; `create_calendar`
    and `delete_calendar` make the set explicit (a deleted id stays missing).
    """

    def __init__(
        self,
        clock: Clock,
        oauth: OAuthEmulator,
        http_client_factory: Callable[[], AsyncHTTPClient] | None = None,
        *,
        auto_create: bool = True,
        sync_before_answer: bool = True,
        page_size: int | None = None,
        retry_delays: Sequence[float] = (0.01, 0.02, 0.04),
        webhook_timeout: float = 5.0,
        max_number_gap: int = 3,
        seed: int = 0,
        resource_uri_base: str = "https://www.googleapis.com/calendar/v3",
    ) -> None:
        self.clock = clock
        self.oauth = oauth
        self.auto_create = auto_create
        # Google's sync message may reach the service before the watch answer does.
        self.sync_before_answer = sync_before_answer
        self.page_size = page_size  # a server-side page limit below maxResults, for tests
        self.retry_delays = tuple(retry_delays)
        self.webhook_timeout = webhook_timeout
        self.max_number_gap = max_number_gap
        self.resource_uri_base = resource_uri_base
        self.webhooks: list[WebhookAttempt] = []
        self.calls: list[tuple[str, str | None, int]] = []  # (method, calendar, status)
        self.in_flight = 0
        self.max_in_flight = 0
        self._factory = http_client_factory
        self._client: AsyncHTTPClient | None = None
        self._rng = random.Random(seed)  # noqa: S311 - reproducible gaps, not secrets
        self._offset = 0.0
        self._calendars: dict[str, Calendar] = {}
        self._deleted: set[str] = set()
        self._channels: dict[str, Channel] = {}
        self._sync_tokens: dict[str, _SyncPoint] = {}
        self._issued: dict[str, collections.deque[str]] = {}  # calendar → its tokens, oldest first
        self._page_tokens: dict[str, _Listing] = {}
        self._failures: list[Failure] = []
        self._tasks: set[asyncio.Task[None]] = set()
        # Called after every change of what the emulator keeps (state.py saves it soon).
        self.on_change: Callable[[], None] | None = None

    def _touch(self) -> None:
        if self.on_change is not None:
            self.on_change()

    # -- time -----------------------------------------------------------------

    def now(self) -> float:
        return self.clock.now() + self._offset

    def advance_clock(self, seconds: float) -> float:
        """Move the emulator's time: the clock itself when it can move, else an offset."""
        if isinstance(self.clock, MovableClock):
            self.clock.advance(seconds)
        else:
            self._offset += seconds
        self._touch()
        return self.now()

    # -- calendars and events (control) -------------------------------------

    def create_calendar(self, calendar_id: str) -> Calendar:
        self._deleted.discard(calendar_id)
        if calendar_id not in self._calendars:
            self._calendars[calendar_id] = Calendar(calendar_id, resource_id=_opaque()[:27])
            self._touch()
        return self._calendars[calendar_id]

    def delete_calendar(self, calendar_id: str) -> None:
        """Forget a calendar: its channels hear `not_exists`, its API calls answer 404."""
        calendar = self._calendar(calendar_id)
        for channel in self._live_channels(calendar_id):
            self._send(channel, "not_exists")
        del self._calendars[calendar.id]
        self._deleted.add(calendar_id)
        for token in self._issued.pop(calendar_id, ()):
            self._sync_tokens.pop(token, None)
        self._touch()

    def _calendar(self, calendar_id: str) -> Calendar:
        if calendar_id in self._calendars:
            return self._calendars[calendar_id]
        if self.auto_create and calendar_id not in self._deleted:
            return self.create_calendar(calendar_id)
        raise GoogleApiError(404, "notFound")

    def insert_event(
        self,
        calendar_id: str,
        *,
        summary: str = "",
        start: float | dict[str, Any] | None = None,
        end: float | dict[str, Any] | None = None,
        event_id: str | None = None,
        status: str = "confirmed",
    ) -> dict[str, Any]:
        """Add an event; every live channel on the calendar hears `exists`."""
        calendar = self._calendar(calendar_id)
        now = self.now()
        event_id = event_id or "".join(secrets.choice(_EVENT_ID_CHARS) for _ in range(26))
        if event_id in calendar.events:
            raise GoogleApiError(409, "duplicate", "The requested identifier already exists.")
        begins = now + 3600 if start is None else start
        if end is None:
            end = (begins + 1800) if isinstance(begins, float | int) else begins
        calendar.change += 1
        event = Event(
            id=event_id,
            summary=summary,
            start=_encode_time(begins),
            end=_encode_time(end),
            status=status,
            created=now,
            updated=now,
            change=calendar.change,
        )
        calendar.events[event_id] = event
        self._changed(calendar)
        return event.resource()

    def update_event(
        self,
        calendar_id: str,
        event_id: str,
        *,
        summary: str | None = None,
        start: float | dict[str, Any] | None = None,
        end: float | dict[str, Any] | None = None,
        status: str | None = None,
    ) -> dict[str, Any]:
        calendar = self._calendar(calendar_id)
        event = calendar.events.get(event_id)
        if event is None:
            raise GoogleApiError(404, "notFound")
        if summary is not None:
            event.summary = summary
        if start is not None:
            event.start = _encode_time(start)
        if end is not None:
            event.end = _encode_time(end)
        if status is not None:
            event.status = status
        calendar.change += 1
        event.change = calendar.change
        event.updated = self.now()
        event.sequence += 1
        self._changed(calendar)
        return event.resource()

    def cancel_event(self, calendar_id: str, event_id: str) -> dict[str, Any]:
        """Delete an event as Google does: it stays, `cancelled`, for incremental syncs."""
        return self.update_event(calendar_id, event_id, status="cancelled")

    def expire_sync_tokens(self, calendar_id: str) -> None:
        """Every sync token of the calendar answers 410 from now on."""
        self._calendar(calendar_id).generation += 1
        self._touch()

    def events(self, calendar_id: str) -> list[dict[str, Any]]:
        return [e.resource() for e in self._calendar(calendar_id).events.values()]

    # -- channels (control) -----------------------------------------------------

    def channel_state(self, channel: Channel) -> str:
        if channel.stopped:
            return "stopped"
        return "live" if channel.expiration > self.now() else "expired"

    def channels(self, calendar_id: str | None = None) -> list[dict[str, Any]]:
        return [
            {
                "id": c.id,
                "calendar_id": c.calendar_id,
                "resource_id": c.resource_id,
                "resource_uri": c.resource_uri,
                "address": c.address,
                "token": c.token,
                "expiration": rfc3339(c.expiration),
                "state": self.channel_state(c),
                "last_message_number": c.last_number,
            }
            for c in self._channels.values()
            if calendar_id is None or c.calendar_id == calendar_id
        ]

    def _live_channels(self, calendar_id: str) -> list[Channel]:
        return [
            c
            for c in self._channels.values()
            if c.calendar_id == calendar_id and self.channel_state(c) == "live"
        ]

    # -- failure injection ----------------------------------------------------------

    def inject(
        self,
        method: str,
        *,
        count: int = 1,
        status: int | None = None,
        reason: str | None = None,
        message: str | None = None,
        delay: float = 0.0,
        calendar_id: str | None = None,
        hold: asyncio.Event | None = None,
    ) -> Failure:
        """The next `count` calls of `method` wait `delay` real seconds (and, with `hold`, until
        it is set), then answer the error (status and/or reason) or, with neither, go on as
        usual (a late answer). The returned Failure's `taken` is set when a call takes it."""
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}")
        if status is None and reason is not None and reason not in _REASONS:
            raise ValueError(f"unknown reason {reason!r}: give a status too")
        failure = Failure(method, count, status, reason, message, delay, calendar_id, hold)
        self._failures.append(failure)
        return failure

    def clear_failures(self) -> None:
        self._failures.clear()

    def _take_failure(self, method: str, calendar_id: str | None) -> Failure | None:
        for failure in self._failures:
            if failure.method == method and failure.calendar_id in (None, calendar_id):
                failure.count -= 1
                if failure.count <= 0:
                    self._failures.remove(failure)
                return failure
        return None

    # -- the API ----------------------------------------------------------------

    async def call(
        self,
        method: str,
        calendar_id: str | None,
        authorization: str | None,
        action: Callable[[], Any],
    ) -> Any:
        """Authorise, apply any injected failure, run the action; record the call."""
        status = 200
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            self._authorise(authorization)
            failure = self._take_failure(method, calendar_id)
            if failure is not None:
                failure.taken.set()
                if failure.delay > 0:
                    await asyncio.sleep(failure.delay)
                if failure.hold is not None:
                    await failure.hold.wait()
                if failure.status is not None or failure.reason is not None:
                    raise error_for(failure.status, failure.reason, failure.message)
            result = action()
            if asyncio.iscoroutine(result):
                result = await result
            return result
        except GoogleApiError as exc:
            status = exc.status
            raise
        finally:
            self.in_flight -= 1
            self.calls.append((method, calendar_id, status))

    def _authorise(self, authorization: str | None) -> None:
        if self.oauth.grant(authorization) is None:
            raise GoogleApiError(
                401,
                "authError",
                "Request had invalid authentication credentials. Expected OAuth 2 access "
                "token, login cookie or other valid authentication credential.",
            )
        if not any(self.oauth.verify(authorization, scope) for scope in CALENDAR_SCOPES):
            raise GoogleApiError(
                403, "insufficientPermissions", "Request had insufficient authentication scopes."
            )

    async def watch(
        self, calendar_id: str, body: dict[str, Any], query: str = "alt=json"
    ) -> tuple[dict[str, Any], Channel]:
        """Google's events.watch; `query` is the request's query string, which Google echoes in
        the channel's resource URI after the percent-encoded calendar id."""
        calendar = self._calendar(calendar_id)
        channel_id = body.get("id")
        if not isinstance(channel_id, str) or not channel_id:
            raise GoogleApiError(400, "required", "Required channel id")
        if not _CHANNEL_ID.match(channel_id):
            raise GoogleApiError(400, "invalid", f"Invalid channel id {channel_id}")
        if channel_id in self._channels:
            raise GoogleApiError(400, "channelIdNotUnique", f"Channel id {channel_id} not unique")
        if body.get("type") not in ("web_hook", "webhook"):
            raise GoogleApiError(400, "invalid", "Invalid channel type")
        address = body.get("address")
        parsed = urllib.parse.urlsplit(address if isinstance(address, str) else "")
        # Google insists on https with a valid certificate; the emulator takes http too.
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise GoogleApiError(400, "invalid", "Invalid channel address")
        token = body.get("token")
        if token is not None and (not isinstance(token, str) or len(token) > 256):
            raise GoogleApiError(400, "invalid", "Channel token too long")
        now = self.now()
        ttl = float(MAX_CHANNEL_TTL)
        params = body.get("params") or {}
        if "ttl" in params:
            try:
                ttl = min(float(int(str(params["ttl"]))), ttl)
            except ValueError:
                raise GoogleApiError(400, "invalid", "Invalid ttl") from None
        expires = now + ttl
        if body.get("expiration") is not None:
            try:
                expires = min(expires, int(str(body["expiration"])) / 1000.0)
            except ValueError:
                raise GoogleApiError(400, "invalid", "Invalid expiration") from None
        channel = Channel(
            id=channel_id,
            calendar_id=calendar.id,
            resource_id=calendar.resource_id,
            resource_uri=(
                f"{self.resource_uri_base}/calendars/"
                f"{urllib.parse.quote(calendar.id, safe='')}/events?{query or 'alt=json'}"
            ),
            address=str(address),
            token=token,
            expiration=expires,
        )
        self._channels[channel_id] = channel
        self._touch()
        answer: dict[str, Any] = {
            "kind": "api#channel",
            "id": channel.id,
            "resourceId": channel.resource_id,
            "resourceUri": channel.resource_uri,
            "expiration": str(int(expires * 1000)),
        }
        if token is not None:
            answer["token"] = token
        if self.sync_before_answer:
            self._send(channel, "sync")
            await channel.sync_done.wait()
        return answer, channel

    def stop(self, body: dict[str, Any]) -> None:
        channel = self._channels.get(str(body.get("id")))
        if channel is None or channel.resource_id != body.get("resourceId"):
            raise GoogleApiError(
                404, "notFound", f"Channel '{body.get('id')}' not found for project"
            )
        channel.stopped = True
        self._touch()

    def list_events(self, calendar_id: str, args: dict[str, str]) -> dict[str, Any]:
        calendar = self._calendar(calendar_id)
        try:
            max_results = int(args.get("maxResults", DEFAULT_PAGE))
        except ValueError:
            raise GoogleApiError(400, "invalid", "Invalid value for maxResults") from None
        if max_results < 1:
            raise GoogleApiError(400, "invalid", "Invalid value for maxResults")
        limit = min(max_results, MAX_PAGE, self.page_size or MAX_PAGE)
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
            "updated": rfc3339(self.now()),
            "timeZone": "UTC",
            "accessRole": "reader",
            "defaultReminders": [],
            "items": [calendar.events[i].resource() for i in ids if i in calendar.events],
        }
        if listing.offset < len(listing.event_ids):
            token = _opaque()
            self._page_tokens[token] = listing
            answer["nextPageToken"] = token
        else:
            token = _opaque()
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
        issued = self._issued.setdefault(calendar_id, collections.deque())
        issued.append(token)
        self._sync_tokens[token] = _SyncPoint(calendar_id, change, generation)
        while len(issued) > MAX_SYNC_TOKENS_PER_CALENDAR:
            self._sync_tokens.pop(issued.popleft(), None)
        self._touch()

    def _start_listing(
        self, calendar: Calendar, args: dict[str, str], sync_token: str | None
    ) -> _Listing:
        if sync_token is None:
            show_deleted = args.get("showDeleted", "false").lower() == "true"
            ids = [
                e.id for e in calendar.events.values() if show_deleted or e.status != "cancelled"
            ]
        else:
            clash = [name for name in _NOT_WITH_SYNC if name in args]
            if clash:
                raise GoogleApiError(400, "invalid", f"{clash[0]} cannot be used with syncToken")
            point = self._sync_tokens.get(sync_token)
            if (
                point is None
                or point.calendar_id != calendar.id
                or point.generation != calendar.generation
            ):
                raise GoogleApiError(410, "fullSyncRequired")
            # Deleted events always come with an incremental sync, whatever showDeleted says.
            changed = [e for e in calendar.events.values() if e.change > point.change]
            ids = [e.id for e in sorted(changed, key=lambda e: e.change)]
        return _Listing(calendar.id, ids, 0, calendar.change, calendar.generation)

    # -- webhook calls -------------------------------------------------------------

    def _changed(self, calendar: Calendar) -> None:
        for channel in self._live_channels(calendar.id):
            self._send(channel, "exists")
        self._touch()

    def start_sync(self, channel: Channel) -> None:
        """Send the channel's `sync` message (the watch handler calls this after answering)."""
        if not channel.sync_started:
            self._send(channel, "sync")

    def _send(self, channel: Channel, state: str) -> None:
        if state == "sync":
            channel.sync_started = True
            number = 1
        else:
            number = max(channel.last_number, 1) + self._rng.randint(1, 1 + self.max_number_gap)
        channel.last_number = max(channel.last_number, number)
        self._touch()
        task = asyncio.get_running_loop().create_task(self._deliver(channel, number, state))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, channel: Channel, number: int, state: str) -> None:
        # Tasks take the lock in creation order, so the sync (always made first) goes first.
        async with channel.sending:
            await self._attempts(channel, number, state)

    async def _attempts(self, channel: Channel, number: int, state: str) -> None:
        headers = {
            "Content-Type": "application/json; utf-8",
            "User-Agent": "APIs-Google; (+https://developers.google.com/webmasters/APIs-Google.html)",
            "X-Goog-Channel-ID": channel.id,
            "X-Goog-Message-Number": str(number),
            "X-Goog-Resource-ID": channel.resource_id,
            "X-Goog-Resource-State": state,
            "X-Goog-Resource-URI": channel.resource_uri,
            "X-Goog-Channel-Expiration": email.utils.formatdate(channel.expiration, usegmt=True),
        }
        if channel.token is not None:
            headers["X-Goog-Channel-Token"] = channel.token
        attempt = 0
        try:
            while True:
                attempt += 1
                status, error = await self._post(channel.address, headers)
                self.webhooks.append(
                    WebhookAttempt(
                        channel.id,
                        channel.calendar_id,
                        number,
                        state,
                        attempt,
                        status,
                        error,
                        self.now(),
                    )
                )
                if state == "sync":
                    channel.sync_done.set()
                retry = status is None or status in RETRY_STATUSES
                if not retry or attempt > len(self.retry_delays):
                    return
                await asyncio.sleep(self.retry_delays[attempt - 1])
                if self.channel_state(channel) != "live":
                    return
        finally:
            if state == "sync":
                channel.sync_done.set()

    async def _post(self, address: str, headers: dict[str, str]) -> tuple[int | None, str | None]:
        if self._client is None:
            factory = self._factory or (
                lambda: AsyncHTTPClient(force_instance=True, max_clients=64)
            )
            self._client = factory()
        request = HTTPRequest(
            address,
            method="POST",
            headers=headers,
            body=b"",
            request_timeout=self.webhook_timeout,
            connect_timeout=self.webhook_timeout,
            follow_redirects=False,
        )
        try:
            response = await self._client.fetch(request, raise_error=False)
        except (TimeoutError, OSError) as exc:
            return None, f"{type(exc).__name__}: {exc}"
        if response.code == 599:  # tornado's "no HTTP answer" (timeout, connection closed)
            return None, str(response.error)
        return response.code, None

    async def drain(self) -> None:
        """Wait until every webhook call, retries included, has finished."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    wait_idle = drain

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._client is not None:
            self._client.close()
            self._client = None

    def routes(self) -> list[tuple[str, type[tornado.web.RequestHandler], dict[str, Any]]]:
        api = {"google": self}
        return [
            (r"/calendar/v3/calendars/([^/]+)/events/watch", WatchHandler, api),
            (r"/calendar/v3/calendars/([^/]+)/events", EventsHandler, api),
            (r"/calendar/v3/channels/stop", StopHandler, api),
            (r"/emulator/google/calendars", ControlCalendarsHandler, api),
            (r"/emulator/google/calendars/([^/]+)", ControlCalendarHandler, api),
            (r"/emulator/google/calendars/([^/]+)/events", ControlEventsHandler, api),
            (r"/emulator/google/calendars/([^/]+)/events/([^/]+)", ControlEventHandler, api),
            (r"/emulator/google/calendars/([^/]+)/expire-sync-tokens", ControlExpireHandler, api),
            (r"/emulator/google/channels", ControlChannelsHandler, api),
            (r"/emulator/google/failures", ControlFailuresHandler, api),
            (r"/emulator/google/webhooks", ControlWebhooksHandler, api),
            (r"/emulator/google/settings", ControlSettingsHandler, api),
        ]


class _Base(tornado.web.RequestHandler):
    def initialize(self, google: GoogleCalendarEmulator) -> None:
        self.google = google

    def check_xsrf_cookie(self) -> None:  # an API, not a browser form
        pass

    def json_body(self) -> dict[str, Any]:
        if not self.request.body:
            return {}
        try:
            body = json.loads(self.request.body)
        except ValueError:
            raise GoogleApiError(400, "parseError", "Parse Error") from None
        if not isinstance(body, dict):
            raise GoogleApiError(400, "parseError", "Parse Error")
        return body

    def fail(self, exc: GoogleApiError) -> None:
        self.set_status(exc.status)
        if exc.status == 401:
            self.set_header("WWW-Authenticate", 'Bearer realm="https://accounts.google.com/"')
        self.finish(exc.body())


class WatchHandler(_Base):
    async def post(self, calendar_id: str) -> None:
        try:
            body = self.json_body()
            answer, channel = await self.google.call(
                "watch",
                calendar_id,
                self.request.headers.get("Authorization"),
                lambda: self.google.watch(calendar_id, body, self.request.query),
            )
        except GoogleApiError as exc:
            self.fail(exc)
            return
        written = self.finish(answer)
        # Without sync_before_answer the sync goes out now, after the answer.
        self.google.start_sync(channel)
        await written


class StopHandler(_Base):
    async def post(self) -> None:
        try:
            body = self.json_body()
            known = self.google._channels.get(str(body.get("id")))
            await self.google.call(
                "stop",
                known.calendar_id if known else None,
                self.request.headers.get("Authorization"),
                lambda: self.google.stop(body),
            )
        except GoogleApiError as exc:
            self.fail(exc)
            return
        self.set_status(204)
        self.finish()


class EventsHandler(_Base):
    async def get(self, calendar_id: str) -> None:
        args = {name: self.get_query_argument(name) for name in self.request.query_arguments}
        await self._list(calendar_id, args)

    async def post(self, calendar_id: str) -> None:
        """A GET whose URI is too long (over 2,048 characters, e.g. a long percent-encoded
        calendar id) comes as a POST with X-HTTP-Method-Override and the query as a form body,
        as google-api-python-client sends it and Google takes it."""
        if self.request.headers.get("X-HTTP-Method-Override", "").upper() != "GET":
            raise tornado.web.HTTPError(405)
        args = {name: self.get_body_argument(name) for name in self.request.body_arguments}
        await self._list(calendar_id, args)

    async def _list(self, calendar_id: str, args: dict[str, str]) -> None:
        try:
            answer = await self.google.call(
                "list",
                calendar_id,
                self.request.headers.get("Authorization"),
                lambda: self.google.list_events(calendar_id, args),
            )
        except GoogleApiError as exc:
            self.fail(exc)
            return
        self.finish(answer)


# -- control API: JSON, no auth; every call mirrors a Python method ---------------


class _Control(_Base):
    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self.finish({"error": {"code": status_code, "message": self._reason}})

    def _handle(self, action: Callable[[], Any], status: int = 200) -> None:
        try:
            result = action()
        except GoogleApiError as exc:
            self.fail(exc)
            return
        except (TypeError, ValueError, KeyError) as exc:
            self.set_status(400)
            self.finish({"error": {"code": 400, "message": str(exc)}})
            return
        self.set_status(status)
        if result is None:
            self.set_status(204)
            self.finish()
        else:
            self.finish(result)


def _event_fields(body: dict[str, Any]) -> dict[str, Any]:
    allowed = ("summary", "start", "end", "status")
    return {k: v for k, v in body.items() if k in allowed}


class ControlCalendarsHandler(_Control):
    def get(self) -> None:
        self.finish({"calendars": sorted(self.google._calendars)})

    def post(self) -> None:
        body = self.json_body()
        self._handle(lambda: {"id": self.google.create_calendar(str(body["id"])).id}, 201)


class ControlCalendarHandler(_Control):
    def delete(self, calendar_id: str) -> None:
        self._handle(lambda: self.google.delete_calendar(calendar_id))


class ControlEventsHandler(_Control):
    def get(self, calendar_id: str) -> None:
        self._handle(lambda: {"items": self.google.events(calendar_id)})

    def post(self, calendar_id: str) -> None:
        body = self.json_body()
        self._handle(
            lambda: self.google.insert_event(
                calendar_id, event_id=body.get("id"), **_event_fields(body)
            ),
            201,
        )


class ControlEventHandler(_Control):
    def patch(self, calendar_id: str, event_id: str) -> None:
        body = self.json_body()
        self._handle(lambda: self.google.update_event(calendar_id, event_id, **_event_fields(body)))

    def delete(self, calendar_id: str, event_id: str) -> None:
        self._handle(lambda: self.google.cancel_event(calendar_id, event_id))


class ControlExpireHandler(_Control):
    def post(self, calendar_id: str) -> None:
        self._handle(lambda: self.google.expire_sync_tokens(calendar_id))


class ControlChannelsHandler(_Control):
    def get(self) -> None:
        calendar_id = self.get_query_argument("calendar_id", None)
        self.finish({"channels": self.google.channels(calendar_id)})


class ControlFailuresHandler(_Control):
    def post(self) -> None:
        body = self.json_body()

        def inject() -> None:
            self.google.inject(
                str(body["method"]),
                count=int(body.get("count", 1)),
                status=body.get("status"),
                reason=body.get("reason"),
                message=body.get("message"),
                delay=float(body.get("delay", 0.0)),
                calendar_id=body.get("calendar_id"),
            )

        self._handle(inject)

    def delete(self) -> None:
        self._handle(self.google.clear_failures)


class ControlWebhooksHandler(_Control):
    def get(self) -> None:
        self.finish({"attempts": [a.as_json() for a in self.google.webhooks]})


class ControlSettingsHandler(_Control):
    _SETTINGS = ("auto_create", "sync_before_answer", "page_size", "webhook_timeout")

    def get(self) -> None:
        self.finish({name: getattr(self.google, name) for name in self._SETTINGS})

    def patch(self) -> None:
        body = self.json_body()
        unknown = sorted(set(body) - set(self._SETTINGS))
        if unknown:
            self.set_status(400)
            self.finish({"error": {"code": 400, "message": f"unknown settings {unknown}"}})
            return
        for name, value in body.items():
            setattr(self.google, name, value)
        self.get()
