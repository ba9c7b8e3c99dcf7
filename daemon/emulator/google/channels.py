"""Watch channels (events.watch, channels.stop) and the webhook calls Google makes on them."""

from __future__ import annotations

import asyncio
import email.utils
import random
import re
import urllib.parse
from collections.abc import Callable, Sequence
from typing import Any

from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from daemon.emulator.google.errors import GoogleApiError
from daemon.emulator.google.model import Calendar, Channel, Settings, WebhookAttempt

MAX_CHANNEL_TTL = 604800  # Google caps Calendar event channels at about a week
RETRY_STATUSES = frozenset({500, 502, 503, 504})  # the only answers Google sends again on
_CHANNEL_ID = re.compile(r"^[A-Za-z0-9\-_+/=]{1,64}$")
_USER_AGENT = "APIs-Google; (+https://developers.google.com/webmasters/APIs-Google.html)"


class WebhookSender:
    """Google's webhook calls: one message at a time per channel, in number order, each sent
    again (retry_delays) while the answer is 500, 502, 503, 504 or none at all."""

    def __init__(
        self,
        now: Callable[[], float],
        touch: Callable[[], None],
        settings: Settings,
        http_client_factory: Callable[[], AsyncHTTPClient] | None,
        *,
        retry_delays: Sequence[float],
        max_number_gap: int,
        seed: int,
    ) -> None:
        self._now = now
        self._touch = touch
        self._settings = settings  # webhook_timeout is read at each call: it may change
        self.retry_delays = tuple(retry_delays)
        self.max_number_gap = max_number_gap
        self.attempts: list[WebhookAttempt] = []
        self._factory = http_client_factory
        self._client: AsyncHTTPClient | None = None
        self._rng = random.Random(seed)  # noqa: S311 - reproducible gaps, not secrets
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def idle(self) -> bool:
        """No webhook call under way or waiting for its turn (retries included)."""
        return not self._tasks

    def send(self, channel: Channel, state: str) -> None:
        """Number the message (`sync` is 1; later ones leave gaps of 1 to max_number_gap + 1,
        as Google's do) and queue it behind the channel's earlier ones."""
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
            "User-Agent": _USER_AGENT,
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
                self.attempts.append(
                    WebhookAttempt(
                        channel.id,
                        channel.calendar_id,
                        number,
                        state,
                        attempt,
                        status,
                        error,
                        self._now(),
                    )
                )
                if state == "sync":
                    channel.sync_done.set()
                retry = status is None or status in RETRY_STATUSES
                if not retry or attempt > len(self.retry_delays):
                    return
                await asyncio.sleep(self.retry_delays[attempt - 1])
                if channel.state(self._now()) != "live":
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
        timeout = self._settings.webhook_timeout
        request = HTTPRequest(
            address,
            method="POST",
            headers=headers,
            body=b"",
            request_timeout=timeout,
            connect_timeout=timeout,
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

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._client is not None:
            self._client.close()
            self._client = None


class Channels:
    """Every channel made (live, stopped or expired), by id."""

    def __init__(
        self,
        now: Callable[[], float],
        touch: Callable[[], None],
        sender: WebhookSender,
        resource_uri_base: str,
    ) -> None:
        self._now = now
        self._touch = touch
        self._sender = sender
        self.resource_uri_base = resource_uri_base
        self.by_id: dict[str, Channel] = {}

    def describe(self, calendar_id: str | None = None) -> list[dict[str, Any]]:
        now = self._now()
        return [
            c.as_json(now)
            for c in self.by_id.values()
            if calendar_id is None or c.calendar_id == calendar_id
        ]

    def live(self, calendar_id: str) -> list[Channel]:
        now = self._now()
        return [
            c
            for c in self.by_id.values()
            if c.calendar_id == calendar_id and c.state(now) == "live"
        ]

    def announce(self, calendar_id: str, state: str) -> None:
        """Every live channel on the calendar hears `state` (`exists`, `not_exists`)."""
        for channel in self.live(calendar_id):
            self._sender.send(channel, state)

    def start_sync(self, channel: Channel) -> None:
        """Send the channel's `sync` message, unless it went out already."""
        if not channel.sync_started:
            self._sender.send(channel, "sync")

    async def watch(
        self, calendar: Calendar, body: dict[str, Any], query: str, sync_before_answer: bool
    ) -> tuple[dict[str, Any], Channel]:
        """Google's events.watch on `calendar`; `query` is the request's query string, which
        Google echoes in the channel's resource URI after the percent-encoded calendar id."""
        channel_id = body.get("id")
        if not isinstance(channel_id, str) or not channel_id:
            raise GoogleApiError(400, "required", "Required channel id")
        if not _CHANNEL_ID.match(channel_id):
            raise GoogleApiError(400, "invalid", f"Invalid channel id {channel_id}")
        if channel_id in self.by_id:
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
        expires = _expiration(body, self._now())
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
        self.by_id[channel_id] = channel
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
        if sync_before_answer:
            self._sender.send(channel, "sync")
            await channel.sync_done.wait()
        return answer, channel

    def stop(self, body: dict[str, Any]) -> None:
        """Google's channels.stop: the id and the resource id must both match."""
        channel = self.by_id.get(str(body.get("id")))
        if channel is None or channel.resource_id != body.get("resourceId"):
            raise GoogleApiError(
                404, "notFound", f"Channel '{body.get('id')}' not found for project"
            )
        channel.stopped = True
        self._touch()


def _expiration(body: dict[str, Any], now: float) -> float:
    """`params.ttl` seconds (at most MAX_CHANNEL_TTL), or the body's `expiration` if sooner."""
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
    return expires
