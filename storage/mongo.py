"""MongoDB backend of the `Store` protocol (motor or pymongo's async client).

Collections: `rooms` (_id = calendar id; tokens and tombstones embedded), `sync_tokens`,
`channels` (_id = channel id), `stops` (_id = channel id), `stopped` (_id = channel id, the ids
of finished stops, remembered until `until`), `notifications` and `deliveries`
(_id = an integer from `counters`), `counters` and `meta`. No sessions, transactions, bulk
writes or change streams: each write is one atomic single-document operation (or an
update_many whose documents stand alone), which also keeps mongomock-motor usable in tests.
Times are stored as the floats given, so they round-trip exactly.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import fields as dataclass_fields
from typing import Any, cast

from pymongo import ReturnDocument
from pymongo.errors import DuplicateKeyError

from storage import mongo_counts, mongo_lease, mongo_outbox, rules
from storage.base import (
    Channel,
    ChannelState,
    ChannelStop,
    Delivery,
    DeliveryState,
    DuplicateChannel,
    DuplicateNotification,
    Lease,
    Notification,
    NotificationSource,
    ResourceState,
    RetryableState,
    RetryOutcome,
    Room,
    StopOutcome,
    StoreError,
    StoreUnavailable,
    Target,
    TargetKind,
)
from storage.mongo_driver import close_client, database_name, make_client, mapped_errors
from storage.mongo_outbox import delivery_from_doc as _delivery

log = logging.getLogger(__name__)

DEFAULT_DATABASE = "mrm_push"
Doc = dict[str, Any]

_NON_FINAL = list(rules.NON_FINAL_STATES)
_ROOM_WRITE_TRIES = 100  # optimistic retries of a room write before giving up

# (collection, keys, options). Explicit names keep create_index idempotent across versions.
# The partial unique indexes only cover documents holding the fields: poll notifications carry
# no channel_id/message_number and unpublished ones no seq, so those never collide.
_INDEXES: list[tuple[str, list[tuple[str, int]], Doc]] = [
    (
        "notifications",
        [("channel_id", 1), ("message_number", 1)],
        {
            "name": "channel_message_unique",
            "unique": True,
            "partialFilterExpression": {
                "channel_id": {"$exists": True},
                "message_number": {"$exists": True},
            },
        },
    ),
    (
        "notifications",
        [("seq", 1)],
        {
            "name": "seq_unique",
            "unique": True,
            "partialFilterExpression": {"seq": {"$exists": True}},
        },
    ),
    ("notifications", [("calendar_id", 1), ("seq", 1)], {"name": "calendar_seq"}),
    ("notifications", [("state", 1), ("_id", 1)], {"name": "state_id"}),
    ("notifications", [("state", 1), ("published_at", 1)], {"name": "state_published_at"}),
    ("notifications", [("state", 1), ("received_at", 1)], {"name": "state_received_at"}),
    ("deliveries", [("notification_id", 1)], {"name": "notification"}),
    ("deliveries", [("state", 1), ("due", 1), ("_id", 1)], {"name": "state_due"}),
    ("deliveries", [("calendar_id", 1), ("state", 1)], {"name": "calendar_state"}),
    ("deliveries", [("held", 1)], {"name": "held", "sparse": True}),
    ("channels", [("calendar_id", 1)], {"name": "calendar"}),
    ("channels", [("created_at", 1), ("_id", 1)], {"name": "created_at"}),
    ("stops", [("next_attempt_at", 1)], {"name": "next_attempt_at"}),
    ("stopped", [("until", 1), ("_id", 1)], {"name": "until"}),
    mongo_counts.INDEX,
]


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _room(doc: Doc) -> Room:
    return Room(
        calendar_id=str(doc["_id"]),
        name=str(doc["name"]),
        firebase_tokens=tuple(str(t) for t in doc["tokens"]),
        created_at=float(doc["created_at"]),
        updated_at=float(doc["updated_at"]),
    )


def _channel(doc: Doc) -> Channel:
    return Channel(
        id=str(doc["_id"]),
        calendar_id=str(doc["calendar_id"]),
        resource_id=str(doc["resource_id"]),
        token=str(doc["token"]),
        expiration=_opt_float(doc.get("expiration")),
        state=cast(ChannelState, doc["state"]),
        confirmed=bool(doc["confirmed"]),
        last_message_number=int(doc["last_message_number"]),
        last_error=doc.get("last_error"),
        created_at=float(doc["created_at"]),
        updated_at=float(doc["updated_at"]),
        attempts=int(doc.get("attempts", 0)),
        next_attempt_at=_opt_float(doc.get("next_attempt_at")),
    )


def _channel_doc(channel: Channel) -> Doc:
    doc: Doc = {f.name: getattr(channel, f.name) for f in dataclass_fields(Channel)}
    doc["_id"] = doc.pop("id")
    return doc


def _stop(doc: Doc) -> ChannelStop:
    return ChannelStop(
        channel_id=str(doc["_id"]),
        resource_id=str(doc["resource_id"]),
        calendar_id=doc.get("calendar_id"),
        attempts=int(doc["attempts"]),
        next_attempt_at=float(doc["next_attempt_at"]),
        last_error=doc.get("last_error"),
        created_at=float(doc["created_at"]),
    )


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


def _without_tombstones(
    tombstones: list[Doc], change: rules.TokenChange | None, now: float, also: str | None = None
) -> list[Doc]:
    """The room's tombstones less those a change clears (and `also`); expired ones go too, so
    that the list does not grow for ever."""
    cleared = set(change.clear_tombstones) if change is not None else set()
    if also is not None:
        cleared.add(also)
    return [t for t in tombstones if t["token"] not in cleared and t["until"] > now]


class MongoStore:
    """The `Store` on MongoDB. One process per site uses it (the instance lease sees to it, see
    daemon/lease.py): publication is serialised by an in-process lock, see
    `publish_notification`."""

    def __init__(
        self,
        url: str,
        driver: str = "motor",
        client: Any | None = None,
        database: str | None = None,
    ) -> None:
        # The client never connects here; a bad URL or driver is a StoreConfigError now.
        self._client: Any = client if client is not None else make_client(url, driver)
        self._owns_client = client is None
        self._db: Any = self._client[database or database_name(url) or DEFAULT_DATABASE]
        self._indexed = False
        self._index_lock = asyncio.Lock()
        self._publish_lock = asyncio.Lock()
        self._epoch: str | None = None

    @property
    def client(self) -> Any:
        """The driver's client (motor's, pymongo's or an injected one)."""
        return self._client

    @property
    def indexed(self) -> bool:
        """Whether the indexes are known to exist (made on the first successful round trip)."""
        return self._indexed

    # -- plumbing ------------------------------------------------------------------------------
    @asynccontextmanager
    async def _op(self) -> AsyncIterator[Any]:
        """The database, with pymongo's errors mapped and the indexes made on first success."""
        with mapped_errors():
            if not self._indexed:
                await self._ensure_indexes()
            yield self._db

    async def _ensure_indexes(self) -> None:
        async with self._index_lock:
            if self._indexed:
                return
            for collection, keys, options in _INDEXES:
                await self._db[collection].create_index(keys, **options)
            self._indexed = True
            log.info("mongodb indexes ready", extra={"database": self._db.name})

    async def _next_id(self, db: Any, name: str, count: int = 1) -> int:
        """Reserve `count` ids of a counter; returns the highest. Never reused, even after a
        purge, since the counter only grows."""
        for _ in range(3):
            try:
                doc = await db.counters.find_one_and_update(
                    {"_id": name},
                    {"$inc": {"value": count}},
                    upsert=True,
                    return_document=ReturnDocument.AFTER,
                )
            except DuplicateKeyError:
                continue  # two first upserts raced (old servers do not retry that themselves)
            return int(doc["value"])
        raise StoreError(f"counter {name!r}: upsert kept colliding")

    async def _meta_value(self, db: Any, key: str) -> Any:
        doc = await db.meta.find_one({"_id": key})
        return None if doc is None else doc.get("value")

    # -- lifecycle -----------------------------------------------------------------------------
    async def open(self) -> None:
        try:
            async with self._op():
                pass
        except StoreUnavailable as exc:
            # Start anyway: /readyz reports unready and the indexes come on the first success.
            log.warning("mongodb unreachable at start", extra={"reason": str(exc)})

    async def close(self) -> None:
        if self._owns_client:
            await close_client(self._client)

    async def ping(self) -> None:
        async with self._op() as db:
            await db.command("ping")

    async def maintain(self) -> None:
        """MongoDB keeps its own files: nothing to do."""

    # -- leases --------------------------------------------------------------------------------
    async def acquire_lease(self, lease: Lease, now: float) -> Lease:
        async with self._op() as db:
            return await mongo_lease.acquire(db, lease, now)

    async def renew_lease(self, name: str, holder: str, until: float) -> Lease | None:
        async with self._op() as db:
            return await mongo_lease.renew(db, name, holder, until)

    async def release_lease(self, name: str, holder: str) -> bool:
        async with self._op() as db:
            return await mongo_lease.release(db, name, holder)

    async def get_lease(self, name: str) -> Lease | None:
        async with self._op() as db:
            return await mongo_lease.get(db, name)

    async def store_epoch(self) -> str:
        if self._epoch is None:
            async with self._op() as db:
                for _ in range(3):
                    try:
                        doc = await db.meta.find_one_and_update(
                            {"_id": "store_epoch"},
                            {"$setOnInsert": {"value": uuid.uuid4().hex}},
                            upsert=True,
                            return_document=ReturnDocument.AFTER,
                        )
                    except DuplicateKeyError:
                        continue  # a concurrent upsert made it: read it on the next try
                    self._epoch = str(doc["value"])
                    break
                else:
                    raise StoreError("could not read the store epoch")
        return self._epoch

    # -- rooms and tokens ----------------------------------------------------------------------
    async def _change_room(
        self, db: Any, calendar_id: str, change: Callable[[Doc | None], Doc | None]
    ) -> tuple[Doc | None, Doc | None, bool]:
        """Read-modify-write of one room document, optimistic on its `rev`: `change` gets the
        current document (None when there is none) and returns the new one, or None to write
        nothing. Returns (before, after, written); `change` may run again on a conflict."""
        for _ in range(_ROOM_WRITE_TRIES):
            before = await db.rooms.find_one({"_id": calendar_id})
            after = change(before)
            if after is None:
                return before, before, False
            if before is None:
                after["rev"] = 1
                try:
                    await db.rooms.insert_one(after)
                except DuplicateKeyError:
                    continue
                return None, after, True
            after["rev"] = int(before.get("rev", 0)) + 1
            filt = {"_id": calendar_id, "rev": before.get("rev")}
            result = await db.rooms.replace_one(filt, after)
            if result.matched_count == 1:
                return before, after, True
        raise StoreError(f"room {calendar_id!r} kept changing under a write")

    async def get_room(self, calendar_id: str) -> Room | None:
        async with self._op() as db:
            doc = await db.rooms.find_one({"_id": calendar_id})
        return None if doc is None else _room(doc)

    async def list_rooms(self) -> list[Room]:
        async with self._op() as db:
            docs = await db.rooms.find().sort([("_id", 1)]).to_list(None)
        return [_room(doc) for doc in docs]

    async def put_room(
        self, calendar_id: str, name: str | None, firebase_tokens: list[str] | None, now: float
    ) -> tuple[Room, bool]:
        made: list[rules.TokenChange] = []

        def change(doc: Doc | None) -> Doc:
            made.clear()
            current = None if doc is None else doc["tokens"]
            if doc is None:
                doc = {
                    "_id": calendar_id,
                    "name": "",
                    "tokens": [],
                    "tombstones": [],
                    "created_at": now,
                }
            new = dict(doc, updated_at=now)
            if name is not None:
                new["name"] = name
            if firebase_tokens is not None:
                tokens = rules.replace_tokens(current, firebase_tokens)
                made.append(tokens)
                new["tokens"] = tokens.tokens
                new["tombstones"] = _without_tombstones(doc["tombstones"], tokens, now)
            return new

        async with self._op() as db:
            before, after, _ = await self._change_room(db, calendar_id, change)
            for tokens in made:
                await self._cancel_token_deliveries(db, calendar_id, tokens.cancel, now)
        assert after is not None  # change() always writes
        return _room(after), before is None

    async def add_tokens(
        self, calendar_id: str, tokens: list[str], now: float, *, respect_tombstones: bool
    ) -> tuple[Room, list[str]] | None:
        made: list[rules.TokenChange] = []

        def change(doc: Doc | None) -> Doc | None:
            made.clear()
            if doc is None:
                return None
            live = {t["token"] for t in doc["tombstones"] if t["until"] > now}
            added = rules.add_tokens(
                doc["tokens"], tokens, live, respect_tombstones=respect_tombstones
            )
            made.append(added)
            tombstones = _without_tombstones(doc["tombstones"], added, now)
            if not added.changed and tombstones == doc["tombstones"]:
                return None
            new = dict(doc, tokens=added.tokens, tombstones=tombstones)
            if added.changed:
                new["updated_at"] = now
            return new

        async with self._op() as db:
            _, after, _ = await self._change_room(db, calendar_id, change)
        return None if after is None else (_room(after), made[0].added)

    async def remove_token(self, calendar_id: str, token: str, now: float) -> bool:
        removed = rules.remove_token([], token)

        def change(doc: Doc | None) -> Doc | None:
            nonlocal removed
            removed = rules.remove_token([] if doc is None else doc["tokens"], token)
            if doc is None or not removed.changed:
                return None
            return dict(doc, tokens=removed.tokens, updated_at=now)

        async with self._op() as db:
            await self._change_room(db, calendar_id, change)
            await self._cancel_token_deliveries(db, calendar_id, removed.cancel, now)
        return removed.changed

    @staticmethod
    async def _cancel_token_deliveries(
        db: Any, calendar_id: str, tokens: list[str], now: float
    ) -> None:
        """A token that left a room takes its non-final deliveries with it (contract 2). Not
        atomic with the room write (no transactions here): a crash in between leaves them to
        be sent, as if the token had left a moment later."""
        if tokens:
            await db.deliveries.update_many(
                {
                    "calendar_id": calendar_id,
                    "target_token": {"$in": tokens},
                    "state": {"$in": _NON_FINAL},
                },
                {
                    "$set": {"state": "cancelled", "lease_until": None, "updated_at": now},
                    "$unset": {"due": ""},
                },
            )

    async def tombstone_token(self, calendar_id: str, token: str, until: float, now: float) -> bool:
        removed = rules.remove_token([], token)

        def change(doc: Doc | None) -> Doc | None:
            nonlocal removed
            removed = rules.remove_token([] if doc is None else doc["tokens"], token)
            if doc is None:
                return None
            tombstones = _without_tombstones(doc["tombstones"], None, now, also=token)
            tombstones.append({"token": token, "until": until})
            new = dict(doc, tombstones=tombstones)
            if removed.changed:
                new["tokens"] = removed.tokens
                new["updated_at"] = now
            return new

        async with self._op() as db:
            await self._change_room(db, calendar_id, change)
            await self._cancel_token_deliveries(db, calendar_id, removed.cancel, now)
        return removed.changed

    async def tombstoned_tokens(self, calendar_id: str, now: float) -> set[str]:
        async with self._op() as db:
            doc = await db.rooms.find_one({"_id": calendar_id}, {"tombstones": 1})
        if doc is None:
            return set()
        return {str(t["token"]) for t in doc["tombstones"] if t["until"] > now}

    async def delete_room(self, calendar_id: str) -> bool:
        async with self._op() as db:
            result = await db.rooms.delete_one({"_id": calendar_id})
            await db.sync_tokens.delete_one({"_id": calendar_id})
        await self.cancel_deliveries(calendar_id)
        return bool(result.deleted_count)

    # -- channels ------------------------------------------------------------------------------
    async def insert_channel(self, channel: Channel) -> None:
        async with self._op() as db:
            try:
                await db.channels.insert_one(_channel_doc(channel))
            except DuplicateKeyError as exc:
                raise DuplicateChannel(f"channel {channel.id!r} exists") from exc

    async def get_channel(self, channel_id: str) -> Channel | None:
        async with self._op() as db:
            doc = await db.channels.find_one({"_id": channel_id})
        return None if doc is None else _channel(doc)

    async def list_channels(
        self,
        calendar_id: str | None = None,
        states: tuple[ChannelState, ...] | None = None,
        expiring_before: float | None = None,
    ) -> list[Channel]:
        filt: Doc = {}
        if calendar_id is not None:
            filt["calendar_id"] = calendar_id
        if states is not None:
            filt["state"] = {"$in": list(states)}
        if expiring_before is not None:
            filt["expiration"] = {"$ne": None, "$lt": expiring_before}
        async with self._op() as db:
            cursor = db.channels.find(filt).sort([("created_at", 1), ("_id", 1)])
            docs = await cursor.to_list(None)
        return [_channel(doc) for doc in docs]

    async def update_channel(self, channel_id: str, now: float, **fields: Any) -> Channel | None:
        values = rules.channel_update(fields)
        async with self._op() as db:
            doc = await db.channels.find_one_and_update(
                {"_id": channel_id},
                {"$set": {**values, "updated_at": now}},
                return_document=ReturnDocument.AFTER,
            )
        return None if doc is None else _channel(doc)

    async def confirm_channel(
        self, channel_id: str, resource_id: str, now: float
    ) -> Channel | None:
        async with self._op() as db:
            # Two single-document steps, each atomic: take the resource id only where it is
            # still empty, else just confirm.
            doc = await db.channels.find_one_and_update(
                {"_id": channel_id, "resource_id": ""},
                {"$set": {"confirmed": True, "resource_id": resource_id, "updated_at": now}},
                return_document=ReturnDocument.AFTER,
            )
            if doc is None:
                doc = await db.channels.find_one_and_update(
                    {"_id": channel_id},
                    {"$set": {"confirmed": True, "updated_at": now}},
                    return_document=ReturnDocument.AFTER,
                )
        return None if doc is None else _channel(doc)

    async def advance_message_number(self, channel_id: str, message_number: int) -> bool:
        async with self._op() as db:
            result = await db.channels.update_one(
                {"_id": channel_id, "last_message_number": {"$lt": message_number}},
                {"$set": {"last_message_number": message_number}},
            )
        return bool(result.modified_count)

    async def delete_channel(self, channel_id: str) -> bool:
        async with self._op() as db:
            result = await db.channels.delete_one({"_id": channel_id})
        return bool(result.deleted_count)

    # -- channel stops -------------------------------------------------------------------------
    async def enqueue_stop(
        self, channel_id: str, resource_id: str, calendar_id: str | None, now: float
    ) -> bool:
        doc: Doc = {
            "_id": channel_id,
            "resource_id": resource_id,
            "calendar_id": calendar_id,
            "attempts": 0,
            "next_attempt_at": now,
            "last_error": None,
            "created_at": now,
        }
        async with self._op() as db:
            try:
                await db.stops.insert_one(doc)
            except DuplicateKeyError:
                return False
        return True

    async def enqueue_unknown_stop(
        self, channel_id: str, resource_id: str, now: float, max_queued: int
    ) -> StopOutcome:
        # _id lookups and the collection's metadata count: the same cost whatever is queued.
        async with self._op() as db:
            if await db.stopped.find_one({"_id": channel_id, "until": {"$gt": now}}) is not None:
                return "known"
            if await db.stops.find_one({"_id": channel_id}, {"_id": 1}) is not None:
                return "known"
            if await db.stops.estimated_document_count() >= max_queued:
                return "full"
        if await self.enqueue_stop(channel_id, resource_id, None, now):
            return "queued"
        return "known"  # queued meanwhile by another caller

    async def count_stops(self) -> int:
        # Collection metadata, not a scan (after an unclean shutdown it may be off a little).
        async with self._op() as db:
            return int(await db.stops.estimated_document_count())

    async def finish_stop(
        self, channel_id: str, remember_until: float, now: float, max_remembered: int
    ) -> None:
        async with self._op() as db:
            await db.stops.delete_one({"_id": channel_id})
            await db.stopped.delete_many({"until": {"$lte": now}})
            await db.stopped.update_one(
                {"_id": channel_id}, {"$max": {"until": remember_until}}, upsert=True
            )
            over = int(await db.stopped.estimated_document_count()) - max(max_remembered, 0)
            if over > 0:
                cursor = db.stopped.find({}, {"_id": 1}).sort([("until", 1), ("_id", 1)])
                oldest = [doc["_id"] for doc in await cursor.limit(over).to_list(None)]
                await db.stopped.delete_many({"_id": {"$in": oldest}})

    async def due_stops(self, now: float, limit: int = 100) -> list[ChannelStop]:
        if limit <= 0:
            return []
        async with self._op() as db:
            cursor = db.stops.find({"next_attempt_at": {"$lte": now}})
            cursor = cursor.sort([("next_attempt_at", 1), ("created_at", 1), ("_id", 1)])
            docs = await cursor.limit(limit).to_list(None)
        return [_stop(doc) for doc in docs]

    async def list_stops(self) -> list[ChannelStop]:
        async with self._op() as db:
            docs = await db.stops.find().sort([("created_at", 1), ("_id", 1)]).to_list(None)
        return [_stop(doc) for doc in docs]

    async def reschedule_stop(
        self, channel_id: str, next_attempt_at: float, last_error: str
    ) -> None:
        async with self._op() as db:
            await db.stops.update_one(
                {"_id": channel_id},
                {
                    "$inc": {"attempts": 1},
                    "$set": {"next_attempt_at": next_attempt_at, "last_error": last_error},
                },
            )

    async def remove_stop(self, channel_id: str) -> None:
        async with self._op() as db:
            await db.stops.delete_one({"_id": channel_id})

    # -- sync tokens ---------------------------------------------------------------------------
    async def get_sync_token(self, calendar_id: str) -> str | None:
        async with self._op() as db:
            doc = await db.sync_tokens.find_one({"_id": calendar_id})
        return None if doc is None else cast(str | None, doc.get("sync_token"))

    async def set_sync_token(self, calendar_id: str, sync_token: str | None) -> None:
        async with self._op() as db:
            if sync_token is None:
                await db.sync_tokens.delete_one({"_id": calendar_id})
            else:
                await db.sync_tokens.update_one(
                    {"_id": calendar_id}, {"$set": {"sync_token": sync_token}}, upsert=True
                )

    # -- notifications -------------------------------------------------------------------------
    async def _with_deliveries(self, db: Any, docs: list[Doc]) -> list[Notification]:
        """Notifications with their deliveries, in one query for the page. Only published ones
        have deliveries (a `received` one may hold the half-made ones of a publication under
        way or interrupted, never to be shown)."""
        published = [doc["_id"] for doc in docs if doc["state"] == "published"]
        by_notification: dict[int, list[Delivery]] = {}
        if published:
            cursor = db.deliveries.find({"notification_id": {"$in": published}})
            for ddoc in await cursor.sort([("_id", 1)]).to_list(None):
                delivery = _delivery(ddoc)
                by_notification.setdefault(delivery.notification_id, []).append(delivery)
        return [_notification(doc, tuple(by_notification.get(int(doc["_id"]), ()))) for doc in docs]

    async def add_notification(
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
        async with self._op() as db:
            if channel_id is not None and message_number is not None:
                # Checked first so that the usual duplicate (Google sending again) spends no id;
                # the unique index still decides a race.
                pair = {"channel_id": channel_id, "message_number": message_number}
                if await db.notifications.find_one(pair, {"_id": 1}) is not None:
                    raise DuplicateNotification(f"notification {pair} is stored already")
            doc["_id"] = await self._next_id(db, "notification_id")
            try:
                await db.notifications.insert_one(doc)
            except DuplicateKeyError as exc:
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

    async def get_notification(self, notification_id: int) -> Notification | None:
        async with self._op() as db:
            doc = await db.notifications.find_one({"_id": notification_id})
            if doc is None:
                return None
            return (await self._with_deliveries(db, [doc]))[0]

    async def received_notifications(
        self, limit: int = 1000, calendar_id: str | None = None
    ) -> list[Notification]:
        if limit <= 0:
            return []
        query: Doc = {"state": "received"}
        if calendar_id is not None:
            query["calendar_id"] = calendar_id
        async with self._op() as db:
            cursor = db.notifications.find(query).sort([("_id", 1)])
            docs = await cursor.limit(limit).to_list(None)
        return [_notification(doc) for doc in docs]

    async def publish_notification(
        self,
        notification_id: int,
        changes: list[dict[str, Any]],
        full_resync: bool,
        targets: list[Target],
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
        still `received` are dropped when it is published again (or by release_claims), and
        those of a published one are released by release_claims at the next start."""
        async with self._publish_lock, self._op() as db:
            doc = await db.notifications.find_one({"_id": notification_id})
            if doc is None:
                raise StoreError(f"no notification {notification_id}")
            if doc["state"] != "received":
                return (await self._with_deliveries(db, [doc]))[0]
            await db.deliveries.delete_many({"notification_id": notification_id})
            seq = await self._next_id(db, "seq")
            if targets:
                last_id = await self._next_id(db, "delivery_id", len(targets))
                first_id = last_id - len(targets) + 1
                await db.deliveries.insert_many(
                    [
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
                )
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
                return (await self._with_deliveries(db, [current]))[0]
            await db.deliveries.update_many(
                {"notification_id": notification_id, "held": True}, {"$unset": {"held": ""}}
            )
            return (await self._with_deliveries(db, [published]))[0]

    async def skip_notification(self, notification_id: int, now: float) -> None:
        # Under the publication lock so a skip cannot slip between a publication's steps.
        async with self._publish_lock, self._op() as db:
            await db.notifications.update_one(
                {"_id": notification_id, "state": "received"}, {"$set": {"state": "skipped"}}
            )

    async def list_notifications(
        self,
        calendar_id: str | None = None,
        calendar_ids: list[str] | None = None,
        after: int | None = None,
        up_to: int | None = None,
        limit: int = 100,
        include_unpublished: bool = False,
    ) -> list[Notification]:
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
        async with self._op() as db:
            cursor = db.notifications.find(filt).sort([(key, 1)]).limit(limit)
            docs = await cursor.to_list(None)
            return await self._with_deliveries(db, docs)

    async def last_seq(self) -> int:
        # The highest visible seq (a purge may have dropped it: purged_through_seq keeps it).
        # Not the counter: a seq taken by a publication under way is not visible yet.
        async with self._op() as db:
            cursor = db.notifications.find({"seq": {"$exists": True}}, {"seq": 1})
            docs = await cursor.sort([("seq", -1)]).limit(1).to_list(None)
            purged = await self._meta_value(db, "purged_through_seq")
        visible = int(docs[0]["seq"]) if docs else 0
        return max(visible, int(purged or 0))

    async def purge_notifications(self, published_before: float, received_before: float) -> int:
        async with self._op() as db:
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
        async with self._op() as db:
            value = await self._meta_value(db, "purged_through_seq")
        return int(value or 0)

    # -- delivery outbox -----------------------------------------------------------------------
    # A delivery's `due` is when it may be claimed: next_attempt_at while pending, lease_until
    # while in_flight, absent once final. One indexed field gives both the claim order ("oldest
    # due first") and next_delivery_due.
    async def claim_deliveries(
        self, now: float, lease_until: float, limit: int = 100, kind: TargetKind | None = None
    ) -> list[Delivery]:
        claimed: list[Delivery] = []
        filt: Doc = {
            "state": {"$in": _NON_FINAL},
            "due": {"$lte": now},
            "held": {"$exists": False},
        }
        if kind is not None:
            filt["target_kind"] = kind
        async with self._op() as db:
            # One atomic find_one_and_update per delivery: two claimers never take the same.
            for _ in range(max(0, limit)):
                if claimed:  # a lease already over (lease_until <= now) must not claim twice
                    filt["_id"] = {"$nin": [d.id for d in claimed]}
                doc = await db.deliveries.find_one_and_update(
                    filt,
                    {
                        "$set": {
                            "state": "in_flight",
                            "lease_until": lease_until,
                            "due": lease_until,
                            "updated_at": now,
                        }
                    },
                    sort=[("due", 1), ("_id", 1)],
                    return_document=ReturnDocument.AFTER,
                )
                if doc is None:
                    break
                claimed.append(_delivery(doc))
        return claimed

    async def release_claims(self) -> int:
        """Also finishes publications a crash interrupted (see publish_notification)."""
        async with self._publish_lock, self._op() as db:
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

    async def finish_delivery(
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
        async with self._op() as db:
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
                {"_id": delivery_id, "state": {"$nin": list(rules.STICKY_STATES)}},
                update,
                return_document=ReturnDocument.AFTER,
            )
            if doc is None:
                doc = await db.deliveries.find_one({"_id": delivery_id})
        return None if doc is None else _delivery(doc)

    async def cancel_deliveries(self, calendar_id: str, token: str | None = None) -> int:
        filt: Doc = {"calendar_id": calendar_id, "state": {"$in": _NON_FINAL}}
        if token is not None:
            filt["target_token"] = token
        async with self._op() as db:
            result = await db.deliveries.update_many(
                filt, {"$set": {"state": "cancelled", "lease_until": None}, "$unset": {"due": ""}}
            )
        return int(result.modified_count)

    async def expire_deliveries(self, created_before: float, now: float) -> int:
        async with self._op() as db:
            result = await db.deliveries.update_many(
                {
                    "created_at": {"$lt": created_before},
                    "held": {"$exists": False},
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

    async def next_delivery_due(self, kind: TargetKind | None = None) -> float | None:
        filt: Doc = {"state": {"$in": _NON_FINAL}, "held": {"$exists": False}}
        if kind is not None:
            filt["target_kind"] = kind
        async with self._op() as db:
            cursor = db.deliveries.find(filt, {"due": 1})
            docs = await cursor.sort([("due", 1)]).limit(1).to_list(None)
        return float(docs[0]["due"]) if docs else None

    async def count_deliveries(self, state: DeliveryState | None = None) -> int:
        async with self._op() as db:
            count = await db.deliveries.count_documents({} if state is None else {"state": state})
        return int(count)

    # -- the outbox for operators (storage/mongo_outbox.py) ----------------------------------
    async def list_deliveries(
        self,
        state: DeliveryState | None = None,
        calendar_id: str | None = None,
        before: int | None = None,
        limit: int = 100,
    ) -> list[Delivery]:
        async with self._op() as db:
            return await mongo_outbox.page(db, state, calendar_id, before, limit)

    async def delivery_counts(
        self, calendar_id: str | None = None
    ) -> dict[tuple[DeliveryState, TargetKind], int]:
        async with self._op() as db:
            if calendar_id is None:  # the metrics' count: index-only counts of state_kind
                return await mongo_counts.delivery_counts(db)
            return await mongo_outbox.counts(db, calendar_id)

    async def retry_deliveries(
        self,
        now: float,
        *,
        ids: list[int] | None = None,
        state: RetryableState | None = None,
    ) -> RetryOutcome:
        rules.check_retry(ids, state)
        async with self._op() as db:
            return await mongo_outbox.retry(db, now, ids, state)

    # -- counts for the metrics (storage/mongo_counts.py) ------------------------------------
    async def count_unsynced_notifications(self) -> int:
        async with self._op() as db:
            return await mongo_counts.count_unsynced_notifications(db)

    async def channel_counts(self) -> dict[ChannelState, int]:
        async with self._op() as db:
            return await mongo_counts.channel_counts(db)

    async def count_rooms_without_channel(self, now: float) -> int:
        async with self._op() as db:
            return await mongo_counts.count_rooms_without_channel(db, now)

    async def soonest_channel_expiry(self) -> float | None:
        async with self._op() as db:
            return await mongo_counts.soonest_channel_expiry(db)
