"""A notification's `changes`: one entry per event that changed, in its last state."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def event_change(event: dict[str, Any]) -> dict[str, Any]:
    """One entry of a notification's `changes`; a cancelled event may carry only id and status,
    the missing fields stay null."""
    return {
        "event_id": event.get("id"),
        # Google documents `confirmed` as the default when the field is left out.
        "status": event.get("status") or "confirmed",
        "updated": event.get("updated"),
        "start": event.get("start"),
        "end": event.get("end"),
        "summary": event.get("summary"),
    }


def changes_of(items: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One change per event, its last state, in the order events were last seen: an event that
    changes while the pages are read may be listed twice."""
    latest: dict[str, dict[str, Any]] = {}
    for item in items:
        change = event_change(item)
        if not change["event_id"]:
            continue
        latest.pop(change["event_id"], None)
        latest[change["event_id"]] = change
    return list(latest.values())
