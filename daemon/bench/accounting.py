"""What must not be lost: 200s stored, changes published once, FCM messages arriving once.

Every webhook answered 200 is a stored notification, every change the bench made is in
exactly one published notification, every FCM message expected (one per published
notification and tablet token) arrives once, and so does every WebSocket frame.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

LOST = ("unstored", "unpublished", "fcm_missing", "ws_missing")
DUPLICATED = ("republished", "fcm_duplicate", "fcm_unexpected", "ws_duplicate")


def account(
    *,
    answered_200: int,
    stored: list[dict[str, Any]],
    published: list[dict[str, Any]],
    changes: Iterable[str] | None,
    room_tokens: dict[str, list[str]],
    fcm_rows: list[list[Any]] | None,
    ws_seqs: list[int] | None = None,
) -> dict[str, Any]:
    """The counts of one part. `stored`: every notification the service holds (published or
    not); `published`: the published ones; `changes`: the event ids the part made (None: not
    checked); `fcm_rows`: what the FCM emulator accepted during the part (None: not checked);
    `ws_seqs`: the seqs a WebSocket client subscribed to "*" received (None: no client)."""
    webhooks = sum(
        1 for n in stored if n["source"] == "webhook" and n["resource_state"] == "exists"
    )
    lost: dict[str, int] = {"unstored": max(0, answered_200 - webhooks)}
    counts: dict[str, Any] = {
        "answered_200": answered_200,
        "stored_webhook_notifications": webhooks,
        "stored_without_200": max(0, webhooks - answered_200),  # timed out here, kept there
        "published": len(published),
    }
    if changes is not None:
        made = list(changes)
        seen = Counter(
            change["event_id"] for notification in published for change in notification["changes"]
        )
        lost["unpublished"] = sum(1 for event_id in made if seen[event_id] == 0)
        lost["republished"] = sum(max(0, seen[event_id] - 1) for event_id in made)
        counts["changes"] = len(made)
        counts["full_resyncs"] = sum(1 for n in published if n["full_resync"])
    if fcm_rows is not None:
        expected = {
            (str(n["id"]), token)
            for n in published
            for token in room_tokens.get(n["calendar_id"], [])
        }
        arrived = Counter((str(row[1]), str(row[0])) for row in fcm_rows)
        lost["fcm_missing"] = len(expected - set(arrived))
        lost["fcm_duplicate"] = sum(n - 1 for pair, n in arrived.items() if pair in expected)
        lost["fcm_unexpected"] = sum(n for pair, n in arrived.items() if pair not in expected)
        counts["fcm_expected"] = len(expected)
        counts["fcm_arrived"] = len(fcm_rows)
    if ws_seqs is not None:
        wanted = {int(n["seq"]) for n in published}
        got = Counter(ws_seqs)
        lost["ws_missing"] = len(wanted - set(got))
        lost["ws_duplicate"] = sum(n - 1 for n in got.values())
        counts["ws_frames"] = len(ws_seqs)
    return {
        "lost": lost,
        "lost_total": sum(lost.get(key, 0) for key in LOST),
        "duplicated_total": sum(lost.get(key, 0) for key in DUPLICATED),
        "counts": counts,
    }


def change_latencies(
    sent_at: dict[str, float],
    published: list[dict[str, Any]],
    arrivals: dict[str, list[float]],
) -> list[float]:
    """Per change (event id → when its webhook was sent), the time until the notification
    that published it arrived (notification id → arrival times, one per tablet: the last
    counts, when every tablet has it). Changes with no arrival are left out (counted lost)."""
    latencies = []
    for notification in published:
        times = arrivals.get(str(notification["id"]))
        if not times:
            continue
        arrived = max(times)
        for change in notification["changes"]:
            sent = sent_at.get(change["event_id"])
            if sent is not None:
                latencies.append(arrived - sent)
    return latencies
