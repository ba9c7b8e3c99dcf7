"""The MongoDB store's database handle, shared by its repositories.

Errors mapped, the schema brought up to date on the first successful round trip, the id
counters (and blocks of ids held in memory), the publication lock.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from pymongo import ReturnDocument
from pymongo.errors import DuplicateKeyError

from storage.base import StoreError
from storage.mongo.driver import mapped_errors
from storage.mongo.migrations import migrate

log = logging.getLogger(__name__)

Doc = dict[str, Any]


class MongoConnection:
    """One database. No sessions, transactions, bulk writes or change streams: each write is
    one atomic single-document operation (or an update_many whose documents stand alone),
    which also keeps mongomock-motor usable in tests."""

    def __init__(self, db: Any) -> None:
        self.db = db
        self._migrated = False
        self._schema_lock = asyncio.Lock()
        # One process per site uses the store (the instance lease, daemon/lease.py): what must
        # not interleave within it (publications, see MongoNotifications.publish) takes this.
        self.publish_lock = asyncio.Lock()

    @property
    def migrated(self) -> bool:
        """Whether the schema is known to be current (made on the first successful call)."""
        return self._migrated

    @asynccontextmanager
    async def op(self) -> AsyncIterator[Any]:
        """The database, with pymongo's errors mapped and the schema migrated on first success."""
        with mapped_errors():
            if not self._migrated:
                await self._migrate()
            yield self.db

    async def _migrate(self) -> None:
        async with self._schema_lock:
            if self._migrated:
                return
            await migrate(self.db)
            self._migrated = True
            log.info("mongodb schema ready", extra={"database": self.db.name})

    async def next_id(self, name: str, count: int = 1) -> int:
        """Reserve `count` ids of a counter; returns the highest. Never reused, even after a
        purge, since the counter only grows."""
        for _ in range(3):
            try:
                doc = await self.db.counters.find_one_and_update(
                    {"_id": name},
                    {"$inc": {"value": count}},
                    upsert=True,
                    return_document=ReturnDocument.AFTER,
                )
            except DuplicateKeyError:
                continue  # two first upserts raced (old servers do not retry that themselves)
            return int(doc["value"])
        raise StoreError(f"counter {name!r}: upsert kept colliding")

    async def meta_value(self, key: str) -> Any:
        doc = await self.db.meta.find_one({"_id": key})
        return None if doc is None else doc.get("value")


class IdBlock:
    """Ids of one counter handed out from a block reserved at once (`size` per round trip).

    Safe because one process uses the store (the instance lease): a block is never shared,
    so ids never repeat; they increase in the order handed out. What is left of a block when
    the process ends is never used (ids may be skipped, never reused)."""

    def __init__(self, conn: MongoConnection, counter: str, size: int) -> None:
        self._conn = conn
        self._counter = counter
        self._size = size
        self._next = 0  # the next id to hand out
        self._end = 0  # the first id past the block
        self._lock = asyncio.Lock()

    async def take(self) -> int:
        if self._next >= self._end:
            async with self._lock:
                if self._next >= self._end:
                    top = await self._conn.next_id(self._counter, self._size)
                    self._next, self._end = top - self._size + 1, top + 1
        taken = self._next
        self._next += 1
        return taken

    def give_back(self, taken: int) -> None:
        """`taken` was not used (nothing was stored with it): hand it out again, unless a later
        one has been handed out since (ids must keep increasing)."""
        if taken == self._next - 1 and taken < self._end:
            self._next = taken
