"""Tables for people: the API's answers as aligned columns, times readable, long text cut."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

CELL_MAX = 60  # characters of a free-text cell (an error) in a table; --json has it whole
NONE = "-"


def when(value: Any) -> str:
    """An RFC 3339 UTC time as "2027-01-15 08:00:00Z" (seconds are enough to read)."""
    if not isinstance(value, str) or not value:
        return NONE
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC)
    except ValueError:
        return value
    return moment.strftime("%Y-%m-%d %H:%M:%SZ")


def cell(value: Any, limit: int = CELL_MAX) -> str:
    if value is None or value == "":
        return NONE
    if isinstance(value, bool):
        return "yes" if value else "no"
    text = " ".join(str(value).split())  # one line, whatever the text holds
    return text if len(text) <= limit else text[: limit - 1] + "…"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Columns padded to their widest cell; the last column is not padded."""
    cells = [[cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = []
    for row in [list(headers), *cells]:
        padded = [text.ljust(width) for text, width in zip(row[:-1], widths, strict=False)]
        lines.append("  ".join([*padded, row[-1]]).rstrip())
    return "\n".join(lines)


def pairs(rows: Sequence[tuple[str, Any]]) -> str:
    """Key and value per line, the values aligned."""
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"{key.ljust(width)}  {cell(value, 200)}".rstrip() for key, value in rows)


def by_state(counts: dict[str, int]) -> str:
    """{"active": 3, "failed": 0} as "3 active" (states with none left out), or "none"."""
    shown = [f"{n} {state}" for state, n in counts.items() if n]
    return ", ".join(shown) if shown else "none"


def channel_summary(channel: dict[str, Any] | None) -> str:
    if not channel:
        return NONE
    return str(channel["state"]) + ("" if channel.get("confirmed") else " (unconfirmed)")


def rooms_table(rooms: list[dict[str, Any]]) -> str:
    rows = [
        (
            r["calendar_id"],
            r["name"],
            ",".join(r["firebase_tokens"]),
            channel_summary(r.get("channel")),
            when((r.get("channel") or {}).get("expiration")),
        )
        for r in rooms
    ]
    return table(["CALENDAR ID", "NAME", "TOKENS", "CHANNEL", "EXPIRES"], rows)


def room_details(room: dict[str, Any]) -> str:
    channel = room.get("channel") or {}
    return pairs(
        [
            ("calendar id", room["calendar_id"]),
            ("name", room["name"]),
            ("tokens", ", ".join(room["firebase_tokens"])),
            ("created", when(room["created_at"])),
            ("updated", when(room["updated_at"])),
            ("channel", channel.get("id")),
            ("channel state", channel_summary(room.get("channel"))),
            ("expires", when(channel.get("expiration"))),
            ("last error", channel.get("last_error")),
        ]
    )


def channels_table(channels: list[dict[str, Any]]) -> str:
    rows = [
        (
            c["id"],
            c["calendar_id"],
            c["state"],
            c["confirmed"],
            when(c["expiration"]),
            when(c["created_at"]),
            c["last_error"],
        )
        for c in channels
    ]
    headers = ["ID", "CALENDAR ID", "STATE", "CONFIRMED", "EXPIRES", "CREATED", "LAST ERROR"]
    return table(headers, rows)


def failures_table(failed: list[dict[str, Any]]) -> str:
    return table(
        ["CALENDAR ID", "REASON"], [(f.get("calendar_id"), f.get("reason")) for f in failed]
    )


def change_summary(notification: dict[str, Any]) -> str:
    if notification.get("full_resync"):
        return "full resync (refetch)"
    changes = notification.get("changes") or []
    words = [f"{c.get('status', '?')} {c.get('summary') or c.get('event_id')}" for c in changes]
    return f"{len(changes)}: " + "; ".join(words) if changes else "0"


def delivery_summary(deliveries: list[dict[str, Any]]) -> str:
    counts: dict[str, int] = {}
    for d in deliveries:
        key = f"{d['target']} {d['state']}"
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{n} {key}" for key, n in counts.items())


def notifications_table(notifications: list[dict[str, Any]]) -> str:
    rows = [
        (
            n["seq"],
            n["id"],
            when(n["received_at"]),
            n["calendar_id"],
            f"{n['source']} {n['resource_state']}",
            delivery_summary(n.get("deliveries") or []),
            change_summary(n),
        )
        for n in notifications
    ]
    headers = ["SEQ", "ID", "RECEIVED", "CALENDAR ID", "SOURCE", "DELIVERIES", "CHANGES"]
    return table(headers, rows)


def notification_line(n: dict[str, Any]) -> str:
    """One notification of `tail`, on one line (a stream has no columns to align)."""
    return "  ".join(
        [
            when(n.get("received_at")),
            f"seq {n.get('seq')}",
            str(n.get("calendar_id")),
            f"{n.get('source')} {n.get('resource_state')}",
            cell(change_summary(n), 200),
        ]
    )


def deliveries_table(deliveries: list[dict[str, Any]]) -> str:
    rows = [
        (
            d["id"],
            d["notification_id"],
            d["calendar_id"],
            d["target"],
            d["token"],
            d["state"],
            d["attempts"],
            when(d["next_attempt_at"]),
            when(d["updated_at"]),
            d["last_error"],
        )
        for d in deliveries
    ]
    headers = [
        "ID",
        "NOTIFICATION",
        "CALENDAR ID",
        "TARGET",
        "TOKEN",
        "STATE",
        "ATTEMPTS",
        "NEXT ATTEMPT",
        "UPDATED",
        "LAST ERROR",
    ]
    return table(headers, rows)


def skipped_table(skipped: list[dict[str, Any]]) -> str:
    return table(
        ["ID", "STATE", "REASON"], [(s["id"], s.get("state"), s["reason"]) for s in skipped]
    )
