"""GoogleCalendarEmulator: the one object tests and the emulator app use, over its parts."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from tornado.httpclient import AsyncHTTPClient

from daemon.clock import Clock
from daemon.emulator.google.api import Route, api_routes, authorise
from daemon.emulator.google.calendars import Calendars
from daemon.emulator.google.channels import Channels, WebhookSender
from daemon.emulator.google.control import control_routes
from daemon.emulator.google.errors import GoogleApiError
from daemon.emulator.google.failures import Failure, Failures
from daemon.emulator.google.model import Calendar, Channel, Settings, WebhookAttempt
from daemon.emulator.oauth import OAuthEmulator


@runtime_checkable
class MovableClock(Protocol):
    """A clock tests and demos can move forward (ManualClock, the emulator's OffsetClock)."""

    def now(self) -> float: ...

    def advance(self, seconds: float) -> None: ...


class GoogleCalendarEmulator:
    """Calendars, events, channels and webhook deliveries, on an injected clock.

    Calendars: with `auto_create` (the default) every calendar id exists the
    first time it is used, so a demo works without set-up; `create_calendar`
    and `delete_calendar` make the set explicit (a deleted id stays missing).
    The work is done by its parts: `calendar_set` (events, listings, sync tokens),
    `channel_set` and `sender` (channels and their webhook calls), `failures`.
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
        self.settings = Settings(auto_create, sync_before_answer, page_size, webhook_timeout)
        self.offset = 0.0  # time moved on a clock that cannot move itself (kept by state.py)
        self.calls: list[tuple[str, str | None, int]] = []  # (method, calendar, status)
        self.in_flight = 0
        self.max_in_flight = 0
        # Called after every change of what the emulator keeps (state.py saves it soon).
        self.on_change: Callable[[], None] | None = None
        self.calendar_set = Calendars(self.now, self._touch)
        self.sender = WebhookSender(
            self.now,
            self._touch,
            self.settings,
            http_client_factory,
            retry_delays=retry_delays,
            max_number_gap=max_number_gap,
            seed=seed,
        )
        self.channel_set = Channels(self.now, self._touch, self.sender, resource_uri_base)
        self.failures = Failures()

    def _touch(self) -> None:
        if self.on_change is not None:
            self.on_change()

    # -- settings (the control API sets them by name) -------------------------------------------

    @property
    def auto_create(self) -> bool:
        return self.settings.auto_create

    @auto_create.setter
    def auto_create(self, value: bool) -> None:
        self.settings.auto_create = value

    @property
    def sync_before_answer(self) -> bool:
        return self.settings.sync_before_answer

    @sync_before_answer.setter
    def sync_before_answer(self, value: bool) -> None:
        self.settings.sync_before_answer = value

    @property
    def page_size(self) -> int | None:
        return self.settings.page_size

    @page_size.setter
    def page_size(self, value: int | None) -> None:
        self.settings.page_size = value

    @property
    def webhook_timeout(self) -> float:
        return self.settings.webhook_timeout

    @webhook_timeout.setter
    def webhook_timeout(self, value: float) -> None:
        self.settings.webhook_timeout = value

    @property
    def retry_delays(self) -> tuple[float, ...]:
        return self.sender.retry_delays

    @property
    def webhooks(self) -> list[WebhookAttempt]:
        """Every webhook call made, retries included, oldest first."""
        return self.sender.attempts

    # -- time -----------------------------------------------------------------------------------

    def now(self) -> float:
        return self.clock.now() + self.offset

    def advance_clock(self, seconds: float) -> float:
        """Move the emulator's time: the clock itself when it can move, else an offset."""
        if isinstance(self.clock, MovableClock):
            self.clock.advance(seconds)
        else:
            self.offset += seconds
        self._touch()
        return self.now()

    # -- calendars and events (control) ---------------------------------------------------------

    def calendar(self, calendar_id: str) -> Calendar:
        """The calendar (made now under `auto_create`), or GoogleApiError 404."""
        return self.calendar_set.get(calendar_id, self.settings.auto_create)

    def calendar_ids(self) -> list[str]:
        return sorted(self.calendar_set.by_id)

    def create_calendar(self, calendar_id: str) -> Calendar:
        return self.calendar_set.create(calendar_id)

    def delete_calendar(self, calendar_id: str) -> None:
        """Forget a calendar: its channels hear `not_exists`, its API calls answer 404."""
        calendar = self.calendar(calendar_id)
        self.channel_set.announce(calendar.id, "not_exists")
        self.calendar_set.delete(calendar)

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
        calendar = self.calendar(calendar_id)
        event = self.calendar_set.insert_event(
            calendar, summary=summary, start=start, end=end, event_id=event_id, status=status
        )
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
        calendar = self.calendar(calendar_id)
        event = self.calendar_set.update_event(
            calendar, event_id, summary=summary, start=start, end=end, status=status
        )
        self._changed(calendar)
        return event.resource()

    def cancel_event(self, calendar_id: str, event_id: str) -> dict[str, Any]:
        """Delete an event as Google does: it stays, `cancelled`, for incremental syncs."""
        return self.update_event(calendar_id, event_id, status="cancelled")

    def expire_sync_tokens(self, calendar_id: str) -> None:
        """Every sync token of the calendar answers 410 from now on."""
        self.calendar_set.expire_sync_tokens(self.calendar(calendar_id))

    def events(self, calendar_id: str) -> list[dict[str, Any]]:
        return [e.resource() for e in self.calendar(calendar_id).events.values()]

    def _changed(self, calendar: Calendar) -> None:
        self.channel_set.announce(calendar.id, "exists")
        self._touch()

    # -- channels (control) ---------------------------------------------------------------------

    def channel(self, channel_id: str) -> Channel | None:
        return self.channel_set.by_id.get(channel_id)

    def channel_state(self, channel: Channel) -> str:
        return channel.state(self.now())

    def channels(self, calendar_id: str | None = None) -> list[dict[str, Any]]:
        return self.channel_set.describe(calendar_id)

    # -- failure injection ----------------------------------------------------------------------

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
        return self.failures.inject(
            method,
            count=count,
            status=status,
            reason=reason,
            message=message,
            delay=delay,
            calendar_id=calendar_id,
            hold=hold,
        )

    def clear_failures(self) -> None:
        self.failures.clear()

    # -- the API --------------------------------------------------------------------------------

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
            authorise(self.oauth, authorization)
            failure = self.failures.take(method, calendar_id)
            if failure is not None:
                await failure.undergo()
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

    async def watch(
        self, calendar_id: str, body: dict[str, Any], query: str = "alt=json"
    ) -> tuple[dict[str, Any], Channel]:
        """Google's events.watch (see Channels.watch)."""
        calendar = self.calendar(calendar_id)
        return await self.channel_set.watch(calendar, body, query, self.settings.sync_before_answer)

    def stop(self, body: dict[str, Any]) -> None:
        self.channel_set.stop(body)

    def start_sync(self, channel: Channel) -> None:
        """Send the channel's `sync` message (the watch handler calls this after answering)."""
        self.channel_set.start_sync(channel)

    def list_events(self, calendar_id: str, args: dict[str, str]) -> dict[str, Any]:
        return self.calendar_set.list_events(
            self.calendar(calendar_id), args, self.settings.page_size
        )

    def remember_sync_token(
        self, token: str, calendar_id: str, change: int, generation: int
    ) -> None:
        """Honour `token` from now on; the calendar's oldest beyond the bound answer 410."""
        self.calendar_set.remember_sync_token(token, calendar_id, change, generation)

    # -- webhook calls, the routes, the end ----------------------------------------------------

    @property
    def idle(self) -> bool:
        """No webhook call under way or waiting (retries included)."""
        return self.sender.idle

    async def drain(self) -> None:
        """Wait until every webhook call, retries included, has finished."""
        await self.sender.drain()

    wait_idle = drain

    def close(self) -> None:
        self.sender.close()

    def routes(self) -> list[Route]:
        return [*api_routes(self), *control_routes(self)]
