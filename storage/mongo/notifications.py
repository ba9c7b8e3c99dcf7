"""The MongoDB store's notifications: ids, seq, publication (with its deliveries), retention.

Collection `notifications` (_id from the `notification_id` counter, in blocks); the `seq`
counter; the purge mark in `meta`.
"""

from __future__ import annotations

import builtins
from typing import Any, cast

from pymongo import ReturnDocument
from pymongo.errors import DuplicateKeyError

from storage import rules
from storage.base import (
    Delivery,
    DuplicateNotification,
    Notification,
    NotificationSource,
    ResourceState,
    StoreError,
    Target,
)
from storage.mongo.connection import IdBlock, MongoConnection
from storage.mongo.outbox import delivery_from_doc

Doc = dict[str, Any]

# Notification ids reserved per round trip to the counter: one webhook call then costs the
# insert and the channel's number only (an id block is held in memory: one process per store).
ID_BLOCK = 64


def _pair_collision(exc: DuplicateKeyError) -> bool:
    """Whether the insert collided on (channel_id, message_number), not on its _id."""
    pattern = (exc.details or {}).get("keyPattern")
    if pattern is not None:
        return "message_number" in pattern
    return "channel_message_unique" in str(exc)  # servers that name only the index


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _notification(doc: Doc, deliveries: tuple[Delivery, ...] = ()) -> Notification:
    seq = doc.get("seq")
    message_number = doc.get("message_number")
    return Notification(
        id=int(doc["_id"]),
        calendar_id=str(doc["calendar_id"]),
        source=cast(NotificationSource, doc["source"]),
        channel_id=doc.get("channel_id"),
        message_number=None if message_number is None else int(message_number),
        resource_state=cast(ResourceState, doc["resource_state"]),
        received_at=float(doc["received_at"]),
        state=doc["state"],
        changes=tuple(doc.get("changes") or ()),
        full_resync=bool(doc.get("full_resync", False)),
        seq=None if seq is None else int(seq),
        published_at=_opt_float(doc.get("published_at")),
        deliveries=deliveries,
    )


async def _with_deliveries(db: Any, docs: builtins.list[Doc]) -> builtins.list[Notification]:
    """Notifications with their deliveries, in one query for the page. Only published ones
    have deliveries (a `received` one may hold the half-made ones of a publication under
    way or interrupted, never to be shown)."""
    published = [doc["_id"] for doc in docs if doc["state"] == "published"]
    by_notification: dict[int, list[Delivery]] = {}
    if published:
        cursor = db.deliveries.find({"notification_id": {"$in": published}})
        for ddoc in await cursor.sort([("_id", 1)]).to_list(None):
            delivery = delivery_from_doc(ddoc)
            by_notification.setdefault(delivery.notification_id, []).append(delivery)
    return [_notification(doc, tuple(by_notification.get(int(doc["_id"]), ()))) for doc in docs]


class MongoNotifications:
    """`NotificationRepository` on the `notifications` collection. Publication is serialised by
    the connection's in-process lock (one process per site: the instance lease), see
    `publish`."""

    def __init__(self, conn: MongoConnection) -> None:
        self._conn = conn
        self._ids = IdBlock(conn, "notification_id", ID_BLOCK)

    async def add(
        self,
        calendar_id: str,
        source: NotificationSource,
        resource_state: ResourceState,
        received_at: float,
        channel_id: str | None = None,
        message_number: int | None = None,
    ) -> Notification:
        doc: Doc = {
            "calendar_id": calendar_id,
            "source": source,
            "resource_state": resource_state,
            "received_at": received_at,
            "state": "received",
            "changes": [],
            "full_resync": False,
            "published_at": None,
        }
        # Absent rather than null: the partial unique index then leaves poll notifications out.
        if channel_id is not None:
            doc["channel_id"] = channel_id
        if message_number is not None:
            doc["message_number"] = message_number
        async with self._conn.op() as db:
            # No look first: the unique (channel_id, message_number) index decides a duplicate.
            doc["_id"] = await self._ids.take()
            try:
                await db.notifications.insert_one(doc)
            except DuplicateKeyError as exc:
                if not _pair_collision(exc):
                    raise StoreError(
                        f"notification id {doc['_id']} is taken: the notification_id counter"
                        " is behind the stored notifications"
                    ) from exc
                self._ids.give_back(doc["_id"])
                raise DuplicateNotification(
                    f"notification ({channel_id!r}, {message_number}) is stored already"
                ) from exc
            if channel_id is not None and message_number is not None:
                # Not atomic with the insert (no transactions here); a crash in between leaves
                # the number low, and Google's resend is still caught by the unique index.
                await db.channels.update_one(
                    {"_id": channel_id, "last_message_number": {"$lt": message_number}},
                    {"$set": {"last_message_number": message_number}},
                )
        return _notification(doc)

    async def get(
        self, notification_id: int, *, with_deliveries: bool = False
    ) -> Notification | None:
        async with self._conn.op() as db:
            doc = await db.notifications.find_one({"_id": notification_id})
            if doc is None:
                return None
            if not with_deliveries:
                return _notification(doc)
            return (await _with_deliveries(db, [doc]))[0]

    async def received(
        self, limit: int = 1000, calendar_id: str | None = None
    ) -> builtins.list[Notification]:
        if limit <= 0:
            return []
        query: Doc = {"state": "received"}
        if calendar_id is not None:
            query["calendar_id"] = calendar_id
        async with self._conn.op() as db:
            cursor = db.notifications.find(query).sort([("_id", 1)])
            docs = await cursor.limit(limit).to_list(None)
        return [_notification(doc) for doc in docs]

    async def publish(
        self,
        notification_id: int,
        changes: builtins.list[dict[str, Any]],
        full_resync: bool,
        targets: builtins.list[Target],
        now: float,
    ) -> Notification:
        """Without a transaction, "next seq + deliveries + visible" takes several writes. Readers
        page by seq, so seq N+1 must never become visible before N: the lock, held from taking
        the seq until the notification is visible, makes publications one at a time (one
        process per site, so an in-process lock is enough). The deliveries are written first,
        `held` (not claimable), then the notification gets its seq and state in one update,
        then the hold is lifted: a reader never sees a published notification without its
        deliveries, and a worker never sends for one not yet published.

        After a crash half-way: a seq taken but never shown stays a gap that never becomes
        visible (allowed: readers need order, not density); held deliveries of a notification
        still `received` are dropped when it is published again (or by outbox.release_claims),
        and those of a published one are released by outbox.release_claims at the next
        start."""
        async with self._conn.publish_lock, self._conn.op() as db:
            doc = await db.notifications.find_one({"_id": notification_id})
            if doc is None:
                raise StoreError(f"no notification {notification_id}")
            if doc["state"] != "received":
                return (await _with_deliveries(db, [doc]))[0]
            await db.deliveries.delete_many({"notification_id": notification_id})
            seq = await self._conn.next_id("seq")
            made: builtins.list[Doc] = []
            if targets:
                last_id = await self._conn.next_id("delivery_id", len(targets))
                first_id = last_id - len(targets) + 1
                made = [
                    {
                        "_id": first_id + i,
                        "notification_id": notification_id,
                        "calendar_id": doc["calendar_id"],
                        "target_kind": target.kind,
                        "target_token": target.token,
                        "state": "pending",
                        "attempts": 0,
                        "next_attempt_at": now,
                        "due": now,
                        "last_error": None,
                        "created_at": now,
                        "updated_at": now,
                        "lease_until": None,
                        "held": True,
                    }
                    for i, target in enumerate(targets)
                ]
                await db.deliveries.insert_many(made)
            published = await db.notifications.find_one_and_update(
                {"_id": notification_id, "state": "received"},
                {
                    "$set": {
                        "state": "published",
                        "seq": seq,
                        "published_at": now,
                        "changes": list(changes),
                        "full_resync": full_resync,
                    }
                },
                return_document=ReturnDocument.AFTER,
            )
            if published is None:
                # Changed or purged by someone else meanwhile (another process): undo ours.
                await db.deliveries.delete_many({"notification_id": notification_id, "held": True})
                current = await db.notifications.find_one({"_id": notification_id})
                if current is None:
                    raise StoreError(f"no notification {notification_id}")
                return (await _with_deliveries(db, [current]))[0]
            await db.deliveries.update_many(
                {"notification_id": notification_id, "held": True}, {"$unset": {"held": ""}}
            )
        # Its deliveries are the ones just written (no read back).
        return _notification(published, tuple(delivery_from_doc(d) for d in made))

    async def skip(self, notification_ids: builtins.list[int], now: float) -> None:
        if not notification_ids:
            return
        # Under the publication lock so a skip cannot slip between a publication's steps.
        async with self._conn.publish_lock, self._conn.op() as db:
            await db.notifications.update_many(
                {"_id": {"$in": builtins.list(notification_ids)}, "state": "received"},
                {"$set": {"state": "skipped"}},
            )

    async def list(
        self,
        calendar_id: str | None = None,
        calendar_ids: builtins.list[str] | None = None,
        after: int | None = None,
        up_to: int | None = None,
        limit: int = 100,
        include_unpublished: bool = False,
        *,
        with_deliveries: bool = False,
    ) -> builtins.list[Notification]:
        if limit <= 0:
            return []
        filt: Doc = {}
        wanted = rules.calendars(calendar_id, calendar_ids)
        if wanted is not None:
            filt["calendar_id"] = wanted[0] if len(wanted) == 1 else {"$in": wanted}
        key = "_id" if include_unpublished else "seq"
        if not include_unpublished:
            filt["state"] = "published"
        bounds: Doc = {}
        if after is not None:
            bounds["$gt"] = after
        if up_to is not None:
            bounds["$lte"] = up_to
        if bounds:
            filt[key] = bounds
        async with self._conn.op() as db:
            cursor = db.notifications.find(filt).sort([(key, 1)]).limit(limit)
            docs = await cursor.to_list(None)
            if not with_deliveries:
                return [_notification(doc) for doc in docs]
            return await _with_deliveries(db, docs)

    async def last_seq(self) -> int:
        # The highest visible seq (a purge may have dropped it: purged_through_seq keeps it).
        # Not the counter: a seq taken by a publication under way is not visible yet.
        async with self._conn.op() as db:
            cursor = db.notifications.find({"seq": {"$exists": True}}, {"seq": 1})
            docs = await cursor.sort([("seq", -1)]).limit(1).to_list(None)
            purged = await self._conn.meta_value("purged_through_seq")
        visible = int(docs[0]["seq"]) if docs else 0
        return max(visible, int(purged or 0))

    async def purge(self, published_before: float, received_before: float) -> int:
        async with self._conn.op() as db:
            # Narrowed by the rule's own terms (indexed); rules.purge_plan decides.
            cursor = db.notifications.find(
                {
                    "$or": [
                        {"state": "published", "published_at": {"$lt": published_before}},
                        {"state": "skipped", "received_at": {"$lt": received_before}},
                    ]
                },
                {"_id": 1, "state": 1, "seq": 1, "published_at": 1, "received_at": 1},
            )
            candidates = [
                rules.PurgeCandidate(
                    int(d["_id"]),
                    d["state"],
                    None if d.get("seq") is None else int(d["seq"]),
                    _opt_float(d.get("published_at")),
                    float(d["received_at"]),
                )
                for d in await cursor.to_list(None)
            ]
            if not candidates:
                return 0
            cursor = db.deliveries.find(
                {"notification_id": {"$in": [c.id for c in candidates]}},
                {"notification_id": 1, "state": 1, "updated_at": 1},
            )
            found = [
                (int(d["notification_id"]), d["state"], float(d["updated_at"]))
                for d in await cursor.to_list(None)
            ]
            going, top = rules.purge_plan(candidates, found, published_before, received_before)
            if not going:
                return 0
            if top:
                # Remembered before the deletion: a reader that finds a seq missing also finds
                # that the replay is incomplete.
                await db.meta.update_one(
                    {"_id": "purged_through_seq"}, {"$max": {"value": top}}, upsert=True
                )
            # A notification that changed meanwhile (another process) stays.
            result = await db.notifications.delete_many(
                {"_id": {"$in": going}, "state": {"$in": ["published", "skipped"]}}
            )
            await db.deliveries.delete_many({"notification_id": {"$in": going}})
        return int(result.deleted_count)

    async def purged_through_seq(self) -> int:
        async with self._conn.op():
            value = await self._conn.meta_value("purged_through_seq")
        return int(value or 0)

    async def count_unsynced(self) -> int:
        async with self._conn.op() as db:
            return int(await db.notifications.count_documents({"state": "received"}))
