"""The FCM data message of contract 4, built from a published notification."""

from __future__ import annotations

import json

from storage.base import Notification

# FCM refuses data over 4 KB, and its real overhead is larger than documented: the data map,
# measured as compact JSON (non-ASCII escaped, never smaller than the UTF-8 bytes FCM counts),
# stays strictly under this many bytes.
DATA_LIMIT = 3500
TTL_SECONDS = 3600  # an hour-old "calendar changed" is stale: the app refetches on start anyway
MESSAGE_TYPE = "calendar_changed"


def encoded_size(data: dict[str, str]) -> int:
    """Bytes of the data map as compact JSON: what DATA_LIMIT bounds."""
    return len(json.dumps(data, separators=(",", ":")).encode())


def event_ids(notification: Notification) -> list[str]:
    """The changed events' ids, in the order the sync found them, each once."""
    seen: dict[str, None] = {}
    for change in notification.changes:
        event_id = change.get("event_id")
        if isinstance(event_id, str) and event_id:
            seen.setdefault(event_id, None)
    return list(seen)


def fcm_data(notification: Notification) -> dict[str, str]:
    """Contract 4's `data`: every value a string. When the ids would take the map to
    DATA_LIMIT or past it, they are all left out (`event_ids` "[]") and `full_resync` is "1":
    a partial list would read as "only these changed"."""
    data = {
        "type": MESSAGE_TYPE,
        "calendar_id": notification.calendar_id,
        "notification_id": str(notification.id),
        "seq": "" if notification.seq is None else str(notification.seq),
        "resource_state": notification.resource_state,
        "event_ids": "[]",
        "full_resync": "1" if notification.full_resync else "0",
    }
    if notification.full_resync:
        return data
    with_ids = {**data, "event_ids": json.dumps(event_ids(notification), separators=(",", ":"))}
    if encoded_size(with_ids) < DATA_LIMIT:
        return with_ids
    return {**data, "full_resync": "1"}
