"""GET /v1/notifications: published notifications in seq order, for catching up and operators."""

from __future__ import annotations

from typing import Any

from daemon.clock import rfc3339
from handlers.base import BaseHandler
from handlers.rooms import check_calendar_id
from storage.base import Delivery, Notification

PAGE_MAX = 500
PAGE_DEFAULT = 100


def delivery_json(delivery: Delivery) -> dict[str, Any]:
    """A delivery as a notification lists it; only a pending one has a next attempt."""
    token = delivery.target.token
    return {
        "target": delivery.target.kind,
        "token": token[-8:] if token else None,  # never a whole FCM token
        "state": delivery.state,
        "attempts": delivery.attempts,
        "next_attempt_at": rfc3339(delivery.next_attempt_at)
        if delivery.state == "pending"
        else None,
        "last_error": delivery.last_error,
    }


def notification_json(notification: Notification, *, deliveries: bool = True) -> dict[str, Any]:
    """The notification record of contract 3 (`deliveries` summarised per target)."""
    body: dict[str, Any] = {
        "id": notification.id,
        "seq": notification.seq,
        "calendar_id": notification.calendar_id,
        "source": notification.source,
        "channel_id": notification.channel_id,
        "message_number": notification.message_number,
        "resource_state": notification.resource_state,
        "received_at": rfc3339(notification.received_at),
        "changes": list(notification.changes),
        "full_resync": notification.full_resync,
    }
    if deliveries:
        body["state"] = notification.state
        body["deliveries"] = [delivery_json(d) for d in notification.deliveries]
    return body


class NotificationListHandler(BaseHandler):
    """GET /v1/notifications?calendar_id=&after=&limit=&include_unpublished=1"""

    auth = "api_key"

    async def get(self) -> None:
        calendar_id = self.str_arg("calendar_id")
        if calendar_id is not None:
            check_calendar_id(calendar_id)
        after = self.int_arg("after", 0, 0, 2**62)
        limit = self.int_arg("limit", PAGE_DEFAULT, 1, PAGE_MAX)
        unpublished = self.flag_arg("include_unpublished")
        store = self.service.store
        found = await store.notifications.list(
            calendar_id=calendar_id,
            after=after,
            limit=limit or PAGE_DEFAULT,
            include_unpublished=unpublished,
            with_deliveries=True,  # the operators' view: the one reader that shows them
        )
        # With include_unpublished the page is in id order and `after`/`next_after` are ids.
        last = [(n.id if unpublished else n.seq) or 0 for n in found]
        self.write_json(
            {
                "notifications": [notification_json(n) for n in found],
                "store_epoch": await store.meta.store_epoch(),
                "next_after": last[-1] if last else after,
            }
        )


routes = [(r"/v1/notifications", NotificationListHandler)]
