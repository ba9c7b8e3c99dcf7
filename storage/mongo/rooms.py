"""The MongoDB store's rooms, their token sets and tombstones.

Collection `rooms`: _id = calendar id, tokens and tombstones embedded, `rev` for optimistic
writes.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable
from typing import Any, TypeVar

from pymongo.errors import DuplicateKeyError

from storage import rules
from storage.base import Room, StoreError
from storage.mongo.connection import MongoConnection
from storage.mongo.outbox import cancel_calendar, cancel_tokens

Doc = dict[str, Any]
T = TypeVar("T")

_ROOM_WRITE_TRIES = 100  # optimistic retries of a room write before giving up
# A channel that still listens: Google sends on it until it expires or is stopped.
_LISTENING = ["active", "retiring"]


def _room(doc: Doc) -> Room:
    return Room(
        calendar_id=str(doc["_id"]),
        name=str(doc["name"]),
        firebase_tokens=tuple(str(t) for t in doc["tokens"]),
        created_at=float(doc["created_at"]),
        updated_at=float(doc["updated_at"]),
    )


def _tombstones(doc: Doc, cleared: builtins.list[str], now: float) -> builtins.list[Doc]:
    """The room's tombstones less the `cleared` ones; expired ones go too, so that the list
    does not grow for ever."""
    gone = set(cleared)
    return [t for t in doc["tombstones"] if t["token"] not in gone and t["until"] > now]


async def _change_room(
    db: Any, calendar_id: str, change: Callable[[Doc | None], tuple[Doc | None, T]]
) -> tuple[Doc | None, Doc | None, T]:
    """Read-modify-write of one room document, optimistic on its `rev`: `change` gets the
    current document (None when there is none) and returns the new one (None: write nothing)
    and what it decided. Returns (before, after, decision); `change` may run again on a
    conflict, and the decision returned is the one written."""
    for _ in range(_ROOM_WRITE_TRIES):
        before = await db.rooms.find_one({"_id": calendar_id})
        after, decided = change(before)
        if after is None:
            return before, before, decided
        if before is None:
            after["rev"] = 1
            try:
                await db.rooms.insert_one(after)
            except DuplicateKeyError:
                continue
            return None, after, decided
        after["rev"] = int(before.get("rev", 0)) + 1
        filt = {"_id": calendar_id, "rev": before.get("rev")}
        result = await db.rooms.replace_one(filt, after)
        if result.matched_count == 1:
            return before, after, decided
    raise StoreError(f"room {calendar_id!r} kept changing under a write")


class MongoRooms:
    """`RoomRepository` on the `rooms` collection."""

    def __init__(self, conn: MongoConnection) -> None:
        self._conn = conn

    async def get(self, calendar_id: str) -> Room | None:
        async with self._conn.op() as db:
            doc = await db.rooms.find_one({"_id": calendar_id})
        return None if doc is None else _room(doc)

    async def list(self) -> builtins.list[Room]:
        async with self._conn.op() as db:
            docs = await db.rooms.find().sort([("_id", 1)]).to_list(None)
        return [_room(doc) for doc in docs]

    async def put(
        self,
        calendar_id: str,
        name: str | None,
        firebase_tokens: builtins.list[str] | None,
        now: float,
    ) -> tuple[Room, bool]:
        def change(doc: Doc | None) -> tuple[Doc, rules.TokenChange | None]:
            current = None if doc is None else doc["tokens"]
            if doc is None:
                doc = {"_id": calendar_id, "name": "", "tokens": [], "tombstones": []}
                doc["created_at"] = now
            new = dict(doc, updated_at=now)
            if name is not None:
                new["name"] = name
            if firebase_tokens is None:
                return new, None
            tokens = rules.replace_tokens(current, firebase_tokens)
            new["tokens"] = tokens.tokens
            new["tombstones"] = _tombstones(doc, tokens.clear_tombstones, now)
            return new, tokens

        async with self._conn.op() as db:
            before, after, tokens = await _change_room(db, calendar_id, change)
            if tokens is not None:
                await cancel_tokens(db, calendar_id, tokens.cancel, now)
        assert after is not None  # change() always writes
        return _room(after), before is None

    async def add_tokens(
        self,
        calendar_id: str,
        tokens: builtins.list[str],
        now: float,
        *,
        respect_tombstones: bool,
    ) -> tuple[Room, builtins.list[str]] | None:
        def change(doc: Doc | None) -> tuple[Doc | None, rules.TokenChange | None]:
            if doc is None:
                return None, None
            live = {t["token"] for t in doc["tombstones"] if t["until"] > now}
            added = rules.add_tokens(
                doc["tokens"], tokens, live, respect_tombstones=respect_tombstones
            )
            tombstones = _tombstones(doc, added.clear_tombstones, now)
            if not added.changed and tombstones == doc["tombstones"]:
                return None, added
            new = dict(doc, tokens=added.tokens, tombstones=tombstones)
            if added.changed:
                new["updated_at"] = now
            return new, added

        async with self._conn.op() as db:
            _, after, added = await _change_room(db, calendar_id, change)
        return None if after is None or added is None else (_room(after), added.added)

    async def _drop(
        self, calendar_id: str, token: str, now: float, tombstone_until: float | None
    ) -> bool:
        """Take the token out of the set (and tombstone it until `tombstone_until` when given),
        then cancel its deliveries; whether it was in the set."""

        def change(doc: Doc | None) -> tuple[Doc | None, rules.TokenChange]:
            removed = rules.remove_token([] if doc is None else doc["tokens"], token)
            if doc is None:
                return None, removed
            new = dict(doc)
            if removed.changed:
                new.update(tokens=removed.tokens, updated_at=now)
            if tombstone_until is not None:
                new["tombstones"] = _tombstones(doc, [token], now)
                new["tombstones"].append({"token": token, "until": tombstone_until})
            return (new if new != doc else None), removed

        async with self._conn.op() as db:
            _, _, removed = await _change_room(db, calendar_id, change)
            await cancel_tokens(db, calendar_id, removed.cancel, now)
        return removed.changed

    async def remove_token(self, calendar_id: str, token: str, now: float) -> bool:
        return await self._drop(calendar_id, token, now, None)

    async def tombstone_token(self, calendar_id: str, token: str, until: float, now: float) -> bool:
        return await self._drop(calendar_id, token, now, until)

    async def tombstoned_tokens(self, calendar_id: str, now: float) -> set[str]:
        async with self._conn.op() as db:
            doc = await db.rooms.find_one({"_id": calendar_id}, {"tombstones": 1})
        if doc is None:
            return set()
        return {str(t["token"]) for t in doc["tombstones"] if t["until"] > now}

    async def delete(self, calendar_id: str) -> bool:
        async with self._conn.op() as db:
            result = await db.rooms.delete_one({"_id": calendar_id})
            await db.sync_tokens.delete_one({"_id": calendar_id})
            await cancel_calendar(db, calendar_id, None)
        return bool(result.deleted_count)

    async def count_without_channel(self, now: float) -> int:
        async with self._conn.op() as db:
            # The calendars that have one (about one per room), then the rooms not among them.
            listening = await db.channels.distinct(
                "calendar_id",
                {"state": {"$in": _LISTENING}, "confirmed": True, "expiration": {"$gt": now}},
            )
            return int(await db.rooms.count_documents({"_id": {"$nin": listening}}))
