"""The MongoDB store's meta: the store epoch and the leases.

The epoch is a document of `meta`; `leases` holds one document per lease (_id = its name).

Every lease decision is one find_one_and_update whose filter is the rule (the holder, or an
expired lease), so two processes racing for a lease cannot both get it: the loser's upsert
collides with the winner's document on _id.
"""

from __future__ import annotations

import uuid
from typing import Any

from pymongo import ReturnDocument
from pymongo.errors import DuplicateKeyError

from storage.base import Lease, StoreError
from storage.mongo.connection import MongoConnection

Doc = dict[str, Any]
_TRIES = 3


def _fields(lease: Lease) -> Doc:
    return {
        "holder": lease.holder,
        "host": lease.host,
        "pid": lease.pid,
        "since": lease.since,
        "until": lease.until,
    }


def _lease(doc: Doc) -> Lease:
    return Lease(
        name=str(doc["_id"]),
        holder=str(doc["holder"]),
        host=str(doc["host"]),
        pid=int(doc["pid"]),
        since=float(doc["since"]),
        until=float(doc["until"]),
    )


async def _get(db: Any, name: str) -> Lease | None:
    doc = await db.leases.find_one({"_id": name})
    return None if doc is None else _lease(doc)


async def _acquire(db: Any, lease: Lease, now: float) -> Lease:
    for _ in range(_TRIES):
        # Ours already: only until, host and pid change (since is kept).
        doc = await db.leases.find_one_and_update(
            {"_id": lease.name, "holder": lease.holder},
            {"$set": {"host": lease.host, "pid": lease.pid, "until": lease.until}},
            return_document=ReturnDocument.AFTER,
        )
        if doc is not None:
            return _lease(doc)
        try:
            # Free (the upsert inserts) or expired (the filter matches): ours from now on.
            doc = await db.leases.find_one_and_update(
                {"_id": lease.name, "until": {"$lte": now}},
                {"$set": _fields(lease)},
                upsert=True,
                return_document=ReturnDocument.AFTER,
            )
        except DuplicateKeyError:
            doc = None  # held by another and not expired: its document stopped the insert
        if doc is not None:
            return _lease(doc)
        held = await _get(db, lease.name)
        if held is not None:
            return held
        # Released between the two calls: free now, so the next round takes it.
    raise StoreError(f"lease {lease.name!r}: kept changing under an acquire")


class MongoMeta:
    """`MetaRepository` on the `meta` and `leases` collections."""

    def __init__(self, conn: MongoConnection) -> None:
        self._conn = conn
        self._epoch: str | None = None

    async def store_epoch(self) -> str:
        if self._epoch is None:
            async with self._conn.op() as db:
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

    async def acquire_lease(self, lease: Lease, now: float) -> Lease:
        async with self._conn.op() as db:
            return await _acquire(db, lease, now)

    async def renew_lease(self, name: str, holder: str, until: float) -> Lease | None:
        async with self._conn.op() as db:
            doc = await db.leases.find_one_and_update(
                {"_id": name, "holder": holder},
                {"$set": {"until": until}},
                return_document=ReturnDocument.AFTER,
            )
            return _lease(doc) if doc is not None else await _get(db, name)

    async def release_lease(self, name: str, holder: str) -> bool:
        async with self._conn.op() as db:
            result = await db.leases.delete_one({"_id": name, "holder": holder})
        return int(result.deleted_count) > 0

    async def get_lease(self, name: str) -> Lease | None:
        async with self._conn.op() as db:
            return await _get(db, name)
