"""The delivery outbox as operators see it, in the MongoDB store: the page newest first, the
counts by state, and the retry of deliveries that gave up (MongoStore runs these).

Deliveries still `held` (a publication under way, see MongoStore.publish_notification) are
never shown, counted or retried: they are not part of the outbox yet.
"""

from __future__ import annotations

import dataclasses
from typing import Any, cast

from storage.base import (
    RETRYABLE_STATES,
    Delivery,
    DeliveryState,
    RetryableState,
    RetryOutcome,
    RetrySkip,
    Target,
    TargetKind,
)
from storage.rules import RoomTokens, retry_plan, target_refusal

Doc = dict[str, Any]
_VISIBLE: Doc = {"held": {"$exists": False}}


def delivery_from_doc(doc: Doc) -> Delivery:
    lease_until = doc.get("lease_until")
    return Delivery(
        id=int(doc["_id"]),
        notification_id=int(doc["notification_id"]),
        calendar_id=str(doc["calendar_id"]),
        target=Target(kind=cast(TargetKind, doc["target_kind"]), token=doc.get("target_token")),
        state=cast(DeliveryState, doc["state"]),
        attempts=int(doc["attempts"]),
        next_attempt_at=float(doc["next_attempt_at"]),
        last_error=doc.get("last_error"),
        created_at=float(doc["created_at"]),
        updated_at=float(doc["updated_at"]),
        lease_until=None if lease_until is None else float(lease_until),
    )


async def page(
    db: Any,
    state: DeliveryState | None,
    calendar_id: str | None,
    before: int | None,
    limit: int,
) -> list[Delivery]:
    if limit <= 0:
        return []
    filt: Doc = dict(_VISIBLE)
    if state is not None:
        filt["state"] = state
    if calendar_id is not None:
        filt["calendar_id"] = calendar_id
    if before is not None:
        filt["_id"] = {"$lt": before}
    cursor = db.deliveries.find(filt).sort([("_id", -1)]).limit(limit)
    return [delivery_from_doc(doc) for doc in await cursor.to_list(None)]


async def counts(db: Any, calendar_id: str | None) -> dict[tuple[DeliveryState, TargetKind], int]:
    match: Doc = dict(_VISIBLE)
    if calendar_id is not None:
        match["calendar_id"] = calendar_id
    cursor = db.deliveries.aggregate(
        [
            {"$match": match},
            {"$group": {"_id": {"s": "$state", "k": "$target_kind"}, "n": {"$sum": 1}}},
        ]
    )
    found: dict[tuple[DeliveryState, TargetKind], int] = {}
    for doc in await cursor.to_list(None):
        key = (cast(DeliveryState, doc["_id"]["s"]), cast(TargetKind, doc["_id"]["k"]))
        found[key] = int(doc["n"])
    return found


async def _rooms(db: Any, calendar_ids: set[str], now: float) -> dict[str, RoomTokens | None]:
    rooms: dict[str, RoomTokens | None] = dict.fromkeys(calendar_ids)
    cursor = db.rooms.find({"_id": {"$in": sorted(calendar_ids)}}, {"tokens": 1, "tombstones": 1})
    for doc in await cursor.to_list(None):
        buried = (t["token"] for t in doc.get("tombstones", ()) if t["until"] > now)
        rooms[str(doc["_id"])] = RoomTokens(frozenset(doc["tokens"]), frozenset(buried))
    return rooms


async def retry(
    db: Any, now: float, ids: list[int] | None, state: RetryableState | None
) -> RetryOutcome:
    filt: Doc = dict(_VISIBLE)
    if ids is not None:
        filt["_id"] = {"$in": ids}
    else:
        filt["state"] = state
    docs = await db.deliveries.find(filt).sort([("_id", 1)]).to_list(None)
    deliveries = [delivery_from_doc(doc) for doc in docs]
    outcome = retry_plan(
        deliveries, await _rooms(db, {d.calendar_id for d in deliveries}, now), ids
    )
    if not outcome.retried:
        return outcome
    await db.deliveries.update_many(
        {"_id": {"$in": list(outcome.retried)}, "state": {"$in": list(RETRYABLE_STATES)}},
        {
            "$set": {
                "state": "pending",
                "attempts": 0,
                "next_attempt_at": now,
                "due": now,
                "last_error": None,
                "lease_until": None,
                "created_at": now,
                "updated_at": now,
            }
        },
    )
    # No transaction joins the rooms read to the update: a token (or room) that left in
    # between is caught by this second look. Its own cancellation runs after its room write,
    # so whichever comes second, one of the two sees the other and the delivery is cancelled.
    retried = [d for d in deliveries if d.id in set(outcome.retried)]
    again = await _rooms(db, {d.calendar_id for d in retried}, now)
    late = {d.id: r for d in retried if (r := target_refusal(d, again[d.calendar_id]))}
    if not late:
        return outcome
    await db.deliveries.update_many(
        {"_id": {"$in": list(late)}, "state": "pending"},
        {
            "$set": {"state": "cancelled", "lease_until": None, "updated_at": now},
            "$unset": {"due": ""},
        },
    )
    skipped = [*outcome.skipped, *(RetrySkip(i, r, "cancelled") for i, r in late.items())]
    return dataclasses.replace(
        outcome,
        retried=tuple(i for i in outcome.retried if i not in late),
        skipped=tuple(sorted(skipped, key=lambda s: s.id)),
    )
