"""The SQLite store's meta: the store epoch (in `meta`) and the `leases` table."""

from __future__ import annotations

import sqlite3

import aiosqlite

from storage.base import Lease, StoreError
from storage.sqlite.connection import Connection, fetch_one


def _lease(row: sqlite3.Row) -> Lease:
    return Lease(
        name=row["name"],
        holder=row["holder"],
        host=row["host"],
        pid=int(row["pid"]),
        since=float(row["since"]),
        until=float(row["until"]),
    )


async def _get(db: aiosqlite.Connection, name: str) -> Lease | None:
    row = await fetch_one(db, "SELECT * FROM leases WHERE name = ?", (name,))
    return _lease(row) if row is not None else None


class SqliteMeta:
    """`MetaRepository` on the `meta` and `leases` tables."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._epoch: str | None = None

    async def store_epoch(self) -> str:
        # Made by migration 1 and never changed: read once.
        if self._epoch is None:
            async with self._conn.session() as db:
                row = await fetch_one(db, "SELECT value FROM meta WHERE key = 'store_epoch'")
            if row is None:
                raise StoreError("sqlite: the store has no epoch")
            self._epoch = str(row[0])
        self._conn.connection()  # a closed store says so
        return self._epoch

    async def acquire_lease(self, lease: Lease, now: float) -> Lease:
        # One upsert whose WHERE is the rule (free, expired, or ours already), then the row as
        # it is, in one BEGIN IMMEDIATE transaction: no other process can write between.
        async with self._conn.transaction() as db:
            await db.execute(
                "INSERT INTO leases (name, holder, host, pid, since, until)"
                " VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET host = excluded.host, pid = excluded.pid,"
                " until = excluded.until,"
                " since = CASE WHEN holder = excluded.holder THEN since ELSE excluded.since END,"
                " holder = excluded.holder"
                " WHERE until <= ? OR holder = excluded.holder",
                (lease.name, lease.holder, lease.host, lease.pid, lease.since, lease.until, now),
            )
            stored = await _get(db, lease.name)
        assert stored is not None
        return stored

    async def renew_lease(self, name: str, holder: str, until: float) -> Lease | None:
        async with self._conn.transaction() as db:
            await db.execute(
                "UPDATE leases SET until = ? WHERE name = ? AND holder = ?", (until, name, holder)
            )
            return await _get(db, name)

    async def release_lease(self, name: str, holder: str) -> bool:
        async with self._conn.session() as db:
            cursor = await db.execute(
                "DELETE FROM leases WHERE name = ? AND holder = ?", (name, holder)
            )
            return cursor.rowcount > 0

    async def get_lease(self, name: str) -> Lease | None:
        async with self._conn.session() as db:
            return await _get(db, name)
