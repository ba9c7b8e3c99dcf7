"""Google's webhook: check the headers, confirm channels, count duplicates, store notifications."""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass

from tornado.httputil import HTTPHeaders

from daemon.ids import CALENDAR_ID_MAX
from handlers.base import ApiError, BaseHandler
from storage.base import Channel, DuplicateNotification, ResourceState, StoreError

log = logging.getLogger(__name__)

HEADER_MAX = 1024
# X-Goog-Resource-URI holds the percent-encoded calendar id: at least 8 KB (the contract), and
# enough for the longest id PUT accepts (each character at most 4 UTF-8 bytes, 12 encoded)
# plus Google's prefix and query, so that no room PUT accepts is ever deaf.
RESOURCE_URI_MAX = max(8192, 12 * CALENDAR_ID_MAX + 1024)
# Both stores keep message numbers as signed 64-bit integers; a larger one could not be stored
# and would fail as a 500, which Google sends again for ever.
MESSAGE_NUMBER_MAX = 2**63 - 1
RESOURCE_STATES: frozenset[str] = frozenset({"sync", "exists", "not_exists"})
REJECTED_OUTCOMES = {400: "invalid", 403: "forbidden"}


@dataclass(frozen=True)
class GoogleHeaders:
    channel_id: str
    message_number: int
    resource_id: str
    resource_state: ResourceState
    token: str | None


def _invalid_number() -> ApiError:
    return ApiError(400, "invalid_header", "X-Goog-Message-Number is not a positive integer")


def parse_headers(headers: HTTPHeaders) -> GoogleHeaders:
    """The X-Goog-* headers (looked up case-insensitively), checked; ApiError 400 naming the
    first bad one."""
    for name, value in headers.get_all():
        lowered = name.lower()
        if lowered.startswith("x-goog-"):
            limit = RESOURCE_URI_MAX if lowered == "x-goog-resource-uri" else HEADER_MAX
            if len(value.encode()) > limit:
                raise ApiError(400, "invalid_header", f"{name} is over {limit} bytes")

    def required(name: str) -> str:
        values = headers.get_list(name)
        if len(values) > 1:
            # Tornado would join them with commas into one value that looks almost right.
            raise ApiError(400, "invalid_header", f"{name} is given more than once")
        value = values[0].strip() if values else ""
        if not value:
            raise ApiError(400, "missing_header", f"{name} is required")
        # Google's ids, numbers and states are printable ASCII; anything else is not Google.
        if not (value.isascii() and value.isprintable()):
            raise ApiError(400, "invalid_header", f"{name} holds characters Google never sends")
        return value

    channel_id = required("X-Goog-Channel-ID")
    number_text = required("X-Goog-Message-Number")
    if not number_text.isdigit() or len(number_text) > 19:
        raise _invalid_number()
    number = int(number_text)
    if not 1 <= number <= MESSAGE_NUMBER_MAX:
        raise _invalid_number()
    resource_id = required("X-Goog-Resource-ID")
    state = required("X-Goog-Resource-State")
    if state not in RESOURCE_STATES:
        raise ApiError(400, "invalid_header", "X-Goog-Resource-State is not sync/exists/not_exists")
    token = headers.get("X-Goog-Channel-Token")
    return GoogleHeaders(channel_id, number, resource_id, state, token)  # type: ignore[arg-type]


class WebhookHandler(BaseHandler):
    """POST google.webhook_path: Google's push notifications (no body, headers only)."""

    # Google sends no credentials: each call is checked against the channel's own random
    # token and resource id, compared in constant time.
    auth = "webhook"

    async def post(self) -> None:
        service = self.service
        try:
            google = parse_headers(self.request.headers)
            outcome = await self._handle(google)
        except ApiError as error:
            service.metrics.webhook.labels(REJECTED_OUTCOMES.get(error.status_code, "error")).inc()
            raise
        except StoreError as error:
            # Google retries 5xx: answer it only when the notification could not be kept.
            log.error("webhook_store_failed", extra={"reason": str(error)})
            service.metrics.webhook.labels("store_failed").inc()
            raise ApiError(
                503, "storage_unavailable", "the notification could not be stored"
            ) from None
        service.metrics.webhook.labels(outcome).inc()
        self.set_status(200)
        self.finish()

    async def _handle(self, google: GoogleHeaders) -> str:
        service = self.service
        channel = await service.store.channels.get(google.channel_id)
        if channel is None:
            queued = await service.channels.queue_unknown_stop(
                google.channel_id, google.resource_id
            )
            log.info(
                "webhook_unknown_channel",
                extra={"channel_id": google.channel_id, "stop_queued": queued},
            )
            return "unknown_channel"
        if not hmac.compare_digest((google.token or "").encode(), channel.token.encode()):
            raise ApiError(403, "bad_channel_token", "the channel token is missing or wrong")
        if channel.resource_id and not hmac.compare_digest(
            google.resource_id.encode(), channel.resource_id.encode()
        ):
            raise ApiError(403, "bad_resource_id", "the resource id is not the channel's")
        if google.resource_state == "sync":
            await service.store.channels.advance_message_number(channel.id, google.message_number)
            confirmed = await service.store.channels.confirm(
                channel.id, google.resource_id, service.clock.now()
            )
            if confirmed is not None:
                await service.channels.confirmed(confirmed)
            return "sync"
        if google.message_number <= channel.last_message_number:
            return "duplicate"
        return await self._store(channel, google)

    async def _store(self, channel: Channel, google: GoogleHeaders) -> str:
        service = self.service
        # Stored before the answer, raising the channel's last number in the same step; the
        # unique (channel, number) pair makes a retry from Google a duplicate in any case.
        try:
            notification = await service.store.notifications.add(
                channel.calendar_id,
                "webhook",
                google.resource_state,
                service.clock.now(),
                channel_id=channel.id,
                message_number=google.message_number,
            )
        except DuplicateNotification:
            return "duplicate"
        # From here on the notification is durable, so the answer is 200 whatever happens:
        # a 503 would only bring Google's retry, a duplicate, while this one waited unseen.
        try:
            service.notification_stored(notification)
        except Exception:
            # The stored notification is picked up again from the store (at the latest after a
            # restart); Google must not be told to send it again.
            log.exception("webhook_handoff_failed", extra={"notification_id": notification.id})
        return "stored"
