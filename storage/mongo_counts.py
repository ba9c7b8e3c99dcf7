"""The MongoDB store's counts for the metrics: server-side counts on indexed fields.

The outbox is counted one (state, target kind) pair at a time, each count an index-only scan of
`state_kind` (a $group would read every delivery document).
"""

from __future__ import annotations

import asyncio
from typing import Any, get_args

from storage.base import CHANNEL_STATES, ChannelState, DeliveryState, TargetKind

Doc = dict[str, Any]

INDEX: tuple[str, list[tuple[str, int]], Doc] = (
    "deliveries",
    [("state", 1), ("target_kind", 1)],
    {"name": "state_kind"},
)
_PAIRS: list[tuple[DeliveryState, TargetKind]] = [
    (state, kind) for state in get_args(DeliveryState) for kind in get_args(TargetKind)
]
# A channel that still listens: Google sends on it until it expires or is stopped.
_LISTENING = ["active", "retiring"]


async def delivery_counts(db: Any) -> dict[tuple[DeliveryState, TargetKind], int]:
    counts, held = await asyncio.gather(
        asyncio.gather(
            *(db.deliveries.count_documents({"state": s, "target_kind": k}) for s, k in _PAIRS)
        ),
        _held_counts(db),
    )
    found = {
        pair: int(count) - held.get(pair, 0) for pair, count in zip(_PAIRS, counts, strict=True)
    }
    return {pair: count for pair, count in found.items() if count > 0}


async def _held_counts(db: Any) -> dict[tuple[DeliveryState, TargetKind], int]:
    """The deliveries of a publication still being written (or cut by a crash): not in the
    outbox yet. Few, and found through the sparse `held` index, so they are subtracted rather
    than filtered out (a filter on `held` would make every count read the documents)."""
    cursor = db.deliveries.aggregate(
        [
            {"$match": {"held": True}},
            {"$group": {"_id": {"s": "$state", "k": "$target_kind"}, "n": {"$sum": 1}}},
        ]
    )
    return {(doc["_id"]["s"], doc["_id"]["k"]): int(doc["n"]) for doc in await cursor.to_list(None)}


async def count_unsynced_notifications(db: Any) -> int:
    return int(await db.notifications.count_documents({"state": "received"}))


async def channel_counts(db: Any) -> dict[ChannelState, int]:
    counts = await asyncio.gather(
        *(db.channels.count_documents({"state": state}) for state in CHANNEL_STATES)
    )
    return {state: int(count) for state, count in zip(CHANNEL_STATES, counts, strict=True) if count}


async def count_rooms_without_channel(db: Any, now: float) -> int:
    # The calendars that have one (about one per room), then the rooms not among them.
    listening = await db.channels.distinct(
        "calendar_id",
        {"state": {"$in": _LISTENING}, "confirmed": True, "expiration": {"$gt": now}},
    )
    return int(await db.rooms.count_documents({"_id": {"$nin": listening}}))


async def soonest_channel_expiry(db: Any) -> float | None:
    cursor = db.channels.find({"state": "active", "expiration": {"$ne": None}}, {"expiration": 1})
    docs = await cursor.sort([("expiration", 1)]).limit(1).to_list(None)
    return float(docs[0]["expiration"]) if docs else None
