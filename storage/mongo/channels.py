"""The MongoDB store's channels, their stop queue and the calendars' sync tokens.

Collections: `channels` (_id = channel id), the stop queue `stops` (_id = channel id) and
`stopped` (the ids of finished stops, remembered until `until`), and `sync_tokens`.
"""

from __future__ import annotations

import asyncio
import builtins
from dataclasses import fields as dataclass_fields
from typing import Any, cast

from pymongo import ReturnDocument
from pymongo.errors import DuplicateKeyError

from storage import rules
from storage.base import (
    CHANNEL_STATES,
    Channel,
    ChannelState,
    ChannelStop,
    DuplicateChannel,
    StopOutcome,
)
from storage.mongo.connection import MongoConnection

Doc = dict[str, Any]


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


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


class MongoChannels:
    """`ChannelRepository` on the `channels`, `stops`, `stopped` and `sync_tokens` collections."""

    def __init__(self, conn: MongoConnection) -> None:
        self._conn = conn

    async def insert(self, channel: Channel) -> None:
        async with self._conn.op() as db:
            try:
                await db.channels.insert_one(_channel_doc(channel))
            except DuplicateKeyError as exc:
                raise DuplicateChannel(f"channel {channel.id!r} exists") from exc

    async def get(self, channel_id: str) -> Channel | None:
        async with self._conn.op() as db:
            doc = await db.channels.find_one({"_id": channel_id})
        return None if doc is None else _channel(doc)

    async def list(
        self,
        calendar_id: str | None = None,
        states: tuple[ChannelState, ...] | None = None,
        expiring_before: float | None = None,
    ) -> builtins.list[Channel]:
        filt: Doc = {}
        if calendar_id is not None:
            filt["calendar_id"] = calendar_id
        if states is not None:
            filt["state"] = {"$in": list(states)}
        if expiring_before is not None:
            filt["expiration"] = {"$ne": None, "$lt": expiring_before}
        async with self._conn.op() as db:
            cursor = db.channels.find(filt).sort([("created_at", 1), ("_id", 1)])
            docs = await cursor.to_list(None)
        return [_channel(doc) for doc in docs]

    async def update(self, channel_id: str, now: float, **fields: Any) -> Channel | None:
        values = rules.channel_update(fields)
        async with self._conn.op() as db:
            doc = await db.channels.find_one_and_update(
                {"_id": channel_id},
                {"$set": {**values, "updated_at": now}},
                return_document=ReturnDocument.AFTER,
            )
        return None if doc is None else _channel(doc)

    async def confirm(self, channel_id: str, resource_id: str, now: float) -> Channel | None:
        async with self._conn.op() as db:
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
        async with self._conn.op() as db:
            result = await db.channels.update_one(
                {"_id": channel_id, "last_message_number": {"$lt": message_number}},
                {"$set": {"last_message_number": message_number}},
            )
        return bool(result.modified_count)

    async def delete(self, channel_id: str) -> bool:
        async with self._conn.op() as db:
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
        async with self._conn.op() as db:
            try:
                await db.stops.insert_one(doc)
            except DuplicateKeyError:
                return False
        return True

    async def enqueue_unknown_stop(
        self, channel_id: str, resource_id: str, now: float, max_queued: int
    ) -> StopOutcome:
        # _id lookups and the collection's metadata count: the same cost whatever is queued.
        async with self._conn.op() as db:
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
        async with self._conn.op() as db:
            return int(await db.stops.estimated_document_count())

    async def finish_stop(
        self, channel_id: str, remember_until: float, now: float, max_remembered: int
    ) -> None:
        async with self._conn.op() as db:
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

    async def due_stops(self, now: float, limit: int = 100) -> builtins.list[ChannelStop]:
        if limit <= 0:
            return []
        async with self._conn.op() as db:
            cursor = db.stops.find({"next_attempt_at": {"$lte": now}})
            cursor = cursor.sort([("next_attempt_at", 1), ("created_at", 1), ("_id", 1)])
            docs = await cursor.limit(limit).to_list(None)
        return [_stop(doc) for doc in docs]

    async def list_stops(self) -> builtins.list[ChannelStop]:
        async with self._conn.op() as db:
            docs = await db.stops.find().sort([("created_at", 1), ("_id", 1)]).to_list(None)
        return [_stop(doc) for doc in docs]

    async def reschedule_stop(
        self, channel_id: str, next_attempt_at: float, last_error: str
    ) -> None:
        async with self._conn.op() as db:
            await db.stops.update_one(
                {"_id": channel_id},
                {
                    "$inc": {"attempts": 1},
                    "$set": {"next_attempt_at": next_attempt_at, "last_error": last_error},
                },
            )

    async def remove_stop(self, channel_id: str) -> None:
        async with self._conn.op() as db:
            await db.stops.delete_one({"_id": channel_id})

    # -- sync tokens ---------------------------------------------------------------------------
    async def get_sync_token(self, calendar_id: str) -> str | None:
        async with self._conn.op() as db:
            doc = await db.sync_tokens.find_one({"_id": calendar_id})
        return None if doc is None else cast(str | None, doc.get("sync_token"))

    async def set_sync_token(self, calendar_id: str, sync_token: str | None) -> None:
        async with self._conn.op() as db:
            if sync_token is None:
                await db.sync_tokens.delete_one({"_id": calendar_id})
            else:
                await db.sync_tokens.update_one(
                    {"_id": calendar_id}, {"$set": {"sync_token": sync_token}}, upsert=True
                )

    async def count_by_state(self) -> dict[ChannelState, int]:
        async with self._conn.op() as db:
            counts = await asyncio.gather(
                *(db.channels.count_documents({"state": state}) for state in CHANNEL_STATES)
            )
        return {s: int(n) for s, n in zip(CHANNEL_STATES, counts, strict=True) if n}

    async def soonest_expiry(self) -> float | None:
        async with self._conn.op() as db:
            cursor = db.channels.find(
                {"state": "active", "expiration": {"$ne": None}}, {"expiration": 1}
            )
            docs = await cursor.sort([("expiration", 1)]).limit(1).to_list(None)
        return float(docs[0]["expiration"]) if docs else None
