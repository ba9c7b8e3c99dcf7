"""The MongoDB store's delivery outbox (`deliveries`, _id from the `delivery_id` counter).

A delivery's `due` is when it may be claimed: next_attempt_at while pending, lease_until while
in_flight, absent once final. One indexed field gives both the claim order ("oldest due first")
and next_due. Deliveries still `held` (a publication under way, see MongoNotifications.publish)
are not part of the outbox yet: never claimed, shown, counted or retried. `claim` is the random
id of the claim that last took a delivery (how a claim reads back what it took).
"""

from __future__ import annotations

import asyncio
import builtins
import dataclasses
import uuid
from typing import Any, cast, get_args

from pymongo import ReturnDocument

from storage import rules
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
from storage.mongo.connection import MongoConnection

Doc = dict[str, Any]
NON_FINAL = builtins.list(rules.NON_FINAL_STATES)
VISIBLE: Doc = {"held": {"$exists": False}}
_PAIRS: builtins.list[tuple[DeliveryState, TargetKind]] = [
    (state, kind) for state in get_args(DeliveryState) for kind in get_args(TargetKind)
]
_CANCEL: Doc = {"$set": {"state": "cancelled", "lease_until": None}, "$unset": {"due": ""}}


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


async def cancel_tokens(db: Any, calendar_id: str, tokens: builtins.list[str], now: float) -> None:
    """A token that left a room takes its non-final deliveries to it along (contract 2). Not
    atomic with the room write (no transactions here): a crash in between leaves them to be
    sent, as if the token had left a moment later."""
    if tokens:
        await db.deliveries.update_many(
            {
                "calendar_id": calendar_id,
                "target_token": {"$in": tokens},
                "state": {"$in": NON_FINAL},
            },
            {
                "$set": {"state": "cancelled", "lease_until": None, "updated_at": now},
                "$unset": {"due": ""},
            },
        )


async def cancel_calendar(db: Any, calendar_id: str, token: str | None) -> int:
    filt: Doc = {"calendar_id": calendar_id, "state": {"$in": NON_FINAL}}
    if token is not None:
        filt["target_token"] = token
    result = await db.deliveries.update_many(filt, _CANCEL)
    return int(result.modified_count)


async def _room_tokens(
    db: Any, calendar_ids: set[str], now: float
) -> dict[str, rules.RoomTokens | None]:
    rooms: dict[str, rules.RoomTokens | None] = dict.fromkeys(calendar_ids)
    cursor = db.rooms.find({"_id": {"$in": sorted(calendar_ids)}}, {"tokens": 1, "tombstones": 1})
    for doc in await cursor.to_list(None):
        buried = (t["token"] for t in doc.get("tombstones", ()) if t["until"] > now)
        rooms[str(doc["_id"])] = rules.RoomTokens(frozenset(doc["tokens"]), frozenset(buried))
    return rooms


class MongoOutbox:
    """`OutboxRepository` on the `deliveries` collection."""

    def __init__(self, conn: MongoConnection) -> None:
        self._conn = conn

    async def claim(
        self, now: float, lease_until: float, limit: int = 100, kind: TargetKind | None = None
    ) -> builtins.list[Delivery]:
        if limit <= 0:
            return []
        due: Doc = {"state": {"$in": NON_FINAL}, "due": {"$lte": now}, **VISIBLE}
        if kind is not None:
            due["target_kind"] = kind
        claim = uuid.uuid4().hex
        async with self._conn.op() as db:
            # Three round trips, whatever the batch: the due ids, then each one taken if it is
            # still due (one atomic update per document: a delivery another claimer took
            # meanwhile is no longer due), then what this claim took.
            cursor = db.deliveries.find(due, {"_id": 1}).sort([("due", 1), ("_id", 1)])
            ids = [doc["_id"] for doc in await cursor.limit(limit).to_list(None)]
            if not ids:
                return []
            await db.deliveries.update_many(
                {**due, "_id": {"$in": ids}},
                {
                    "$set": {
                        "state": "in_flight",
                        "lease_until": lease_until,
                        "due": lease_until,
                        "updated_at": now,
                        "claim": claim,
                    }
                },
            )
            taken = await db.deliveries.find({"_id": {"$in": ids}, "claim": claim}).to_list(None)
        order = {delivery_id: n for n, delivery_id in enumerate(ids)}
        return sorted((delivery_from_doc(doc) for doc in taken), key=lambda d: order[d.id])

    async def release_claims(self) -> int:
        """Also finishes publications a crash interrupted (see MongoNotifications.publish)."""
        async with self._conn.publish_lock, self._conn.op() as db:
            held = await db.deliveries.distinct("notification_id", {"held": True})
            if held:
                published = await db.notifications.distinct(
                    "_id", {"_id": {"$in": held}, "state": "published"}
                )
                await db.deliveries.update_many(
                    {"held": True, "notification_id": {"$in": published}},
                    {"$unset": {"held": ""}},
                )
                await db.deliveries.delete_many(
                    {"held": True, "notification_id": {"$nin": published}}
                )
            released = 0
            # One by one: `due` takes each delivery's own next_attempt_at (no pipeline updates
            # in mongomock); only ever the few claims a crash left behind.
            cursor = db.deliveries.find({"state": "in_flight"}, {"_id": 1, "next_attempt_at": 1})
            for doc in await cursor.to_list(None):
                result = await db.deliveries.update_one(
                    {"_id": doc["_id"], "state": "in_flight"},
                    {
                        "$set": {
                            "state": "pending",
                            "lease_until": None,
                            "due": doc["next_attempt_at"],
                        }
                    },
                )
                released += int(result.modified_count)
        return released

    async def finish(
        self,
        delivery_id: int,
        state: DeliveryState,
        now: float,
        *,
        attempts: int | None = None,
        next_attempt_at: float | None = None,
        last_error: str | None = None,
    ) -> Delivery | None:
        rules.check_finish(state)
        changes: Doc = {"state": state, "updated_at": now, "lease_until": None}
        if attempts is not None:
            changes["attempts"] = attempts
        if next_attempt_at is not None:
            changes["next_attempt_at"] = next_attempt_at
        if last_error is not None:
            changes["last_error"] = last_error
        update: Doc = {"$set": changes}
        async with self._conn.op() as db:
            if state == "pending":
                if next_attempt_at is None:
                    current = await db.deliveries.find_one({"_id": delivery_id})
                    if current is None:
                        return None
                    next_attempt_at = float(current["next_attempt_at"])
                changes["due"] = next_attempt_at
            else:
                update["$unset"] = {"due": ""}
            # A delivery cancelled or expired meanwhile stays so.
            doc = await db.deliveries.find_one_and_update(
                {"_id": delivery_id, "state": {"$nin": builtins.list(rules.STICKY_STATES)}},
                update,
                return_document=ReturnDocument.AFTER,
            )
            if doc is None:
                doc = await db.deliveries.find_one({"_id": delivery_id})
        return None if doc is None else delivery_from_doc(doc)

    async def cancel(self, calendar_id: str, token: str | None = None) -> int:
        async with self._conn.op() as db:
            return await cancel_calendar(db, calendar_id, token)

    async def expire(self, created_before: float, now: float) -> int:
        async with self._conn.op() as db:
            result = await db.deliveries.update_many(
                {
                    "created_at": {"$lt": created_before},
                    **VISIBLE,
                    "$or": [
                        {"state": "pending"},
                        {"state": "in_flight", "lease_until": {"$lte": now}},
                    ],
                },
                {
                    "$set": {"state": "expired", "lease_until": None, "updated_at": now},
                    "$unset": {"due": ""},
                },
            )
        return int(result.modified_count)

    async def next_due(self, kind: TargetKind | None = None) -> float | None:
        filt: Doc = {"state": {"$in": NON_FINAL}, **VISIBLE}
        if kind is not None:
            filt["target_kind"] = kind
        async with self._conn.op() as db:
            cursor = db.deliveries.find(filt, {"due": 1})
            docs = await cursor.sort([("due", 1)]).limit(1).to_list(None)
        return float(docs[0]["due"]) if docs else None

    async def count(self, state: DeliveryState | None = None) -> int:
        async with self._conn.op() as db:
            count = await db.deliveries.count_documents({} if state is None else {"state": state})
        return int(count)

    # -- for operators ---------------------------------------------------------------------------
    async def list(
        self,
        state: DeliveryState | None = None,
        calendar_id: str | None = None,
        before: int | None = None,
        limit: int = 100,
    ) -> builtins.list[Delivery]:
        if limit <= 0:
            return []
        filt: Doc = dict(VISIBLE)
        if state is not None:
            filt["state"] = state
        if calendar_id is not None:
            filt["calendar_id"] = calendar_id
        if before is not None:
            filt["_id"] = {"$lt": before}
        async with self._conn.op() as db:
            cursor = db.deliveries.find(filt).sort([("_id", -1)]).limit(limit)
            docs = await cursor.to_list(None)
        return [delivery_from_doc(doc) for doc in docs]

    async def counts(
        self, calendar_id: str | None = None
    ) -> dict[tuple[DeliveryState, TargetKind], int]:
        async with self._conn.op() as db:
            if calendar_id is None:
                return await self._all_counts(db)
            return await _grouped(db, {**VISIBLE, "calendar_id": calendar_id})

    @staticmethod
    async def _all_counts(db: Any) -> dict[tuple[DeliveryState, TargetKind], int]:
        """The metrics' count: one (state, kind) pair at a time, each an index-only count of
        `state_kind` (a $group would read every document). Held deliveries are few, found
        through the sparse `held` index and subtracted (a filter on `held` would make every
        count read the documents)."""
        counts, held = await asyncio.gather(
            asyncio.gather(
                *(db.deliveries.count_documents({"state": s, "target_kind": k}) for s, k in _PAIRS)
            ),
            _grouped(db, {"held": True}),
        )
        found = {
            pair: int(count) - held.get(pair, 0) for pair, count in zip(_PAIRS, counts, strict=True)
        }
        return {pair: count for pair, count in found.items() if count > 0}

    async def retry(
        self,
        now: float,
        *,
        ids: builtins.list[int] | None = None,
        state: RetryableState | None = None,
    ) -> RetryOutcome:
        rules.check_retry(ids, state)
        filt: Doc = dict(VISIBLE)
        if ids is not None:
            filt["_id"] = {"$in": ids}
        else:
            filt["state"] = state
        async with self._conn.op() as db:
            docs = await db.deliveries.find(filt).sort([("_id", 1)]).to_list(None)
            deliveries = [delivery_from_doc(doc) for doc in docs]
            rooms = await _room_tokens(db, {d.calendar_id for d in deliveries}, now)
            outcome = rules.retry_plan(deliveries, rooms, ids)
            if not outcome.retried:
                return outcome
            await db.deliveries.update_many(
                {
                    "_id": {"$in": builtins.list(outcome.retried)},
                    "state": {"$in": builtins.list(RETRYABLE_STATES)},
                },
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
            return await _second_look(db, outcome, deliveries, now)


async def _second_look(
    db: Any, outcome: RetryOutcome, deliveries: builtins.list[Delivery], now: float
) -> RetryOutcome:
    """No transaction joins the rooms read to the update: a token (or room) that left in
    between is caught by this second look. Its own cancellation runs after its room write,
    so whichever comes second, one of the two sees the other and the delivery is cancelled."""
    retried = [d for d in deliveries if d.id in set(outcome.retried)]
    again = await _room_tokens(db, {d.calendar_id for d in retried}, now)
    late = {d.id: r for d in retried if (r := rules.target_refusal(d, again[d.calendar_id]))}
    if not late:
        return outcome
    await db.deliveries.update_many(
        {"_id": {"$in": builtins.list(late)}, "state": "pending"},
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


async def _grouped(db: Any, match: Doc) -> dict[tuple[DeliveryState, TargetKind], int]:
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
