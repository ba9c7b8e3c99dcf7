"""Leases in the MongoDB store: the `leases` collection (_id = lease name), one document each.

Every decision is one find_one_and_update whose filter is the rule (the holder, or an expired
lease), so two processes racing for a lease cannot both get it: the loser's upsert collides
with the winner's document on _id.
"""

from __future__ import annotations

from typing import Any

from pymongo import ReturnDocument
from pymongo.errors import DuplicateKeyError

from storage.base import Lease, StoreError

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


async def get(db: Any, name: str) -> Lease | None:
    doc = await db.leases.find_one({"_id": name})
    return None if doc is None else _lease(doc)


async def acquire(db: Any, lease: Lease, now: float) -> Lease:
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
        held = await get(db, lease.name)
        if held is not None:
            return held
        # Released between the two calls: free now, so the next round takes it.
    raise StoreError(f"lease {lease.name!r}: kept changing under an acquire")


async def renew(db: Any, name: str, holder: str, until: float) -> Lease | None:
    doc = await db.leases.find_one_and_update(
        {"_id": name, "holder": holder},
        {"$set": {"until": until}},
        return_document=ReturnDocument.AFTER,
    )
    return _lease(doc) if doc is not None else await get(db, name)


async def release(db: Any, name: str, holder: str) -> bool:
    result = await db.leases.delete_one({"_id": name, "holder": holder})
    return int(result.deleted_count) > 0
