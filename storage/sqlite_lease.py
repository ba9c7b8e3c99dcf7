"""Leases in the SQLite store: the `leases` table and its statements (SqliteStore runs them)."""

from __future__ import annotations

import sqlite3

import aiosqlite

from storage.base import Lease


async def migration(db: aiosqlite.Connection) -> None:
    """Schema step: the `leases` table, one row per held lease."""
    await db.execute(
        """CREATE TABLE leases (
            name TEXT PRIMARY KEY,
            holder TEXT NOT NULL,
            host TEXT NOT NULL,
            pid INTEGER NOT NULL,
            since REAL NOT NULL,
            until REAL NOT NULL) WITHOUT ROWID"""
    )


def _lease(row: sqlite3.Row) -> Lease:
    return Lease(
        name=row["name"],
        holder=row["holder"],
        host=row["host"],
        pid=int(row["pid"]),
        since=float(row["since"]),
        until=float(row["until"]),
    )


async def get(db: aiosqlite.Connection, name: str) -> Lease | None:
    rows = list(await db.execute_fetchall("SELECT * FROM leases WHERE name = ?", (name,)))
    return _lease(rows[0]) if rows else None


async def acquire(db: aiosqlite.Connection, lease: Lease, now: float) -> Lease:
    """One upsert whose WHERE is the rule (free, expired, or ours already), then the row as it
    is; run inside one BEGIN IMMEDIATE transaction, so no other process can write between."""
    await db.execute(
        "INSERT INTO leases (name, holder, host, pid, since, until) VALUES (?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (name) DO UPDATE SET host = excluded.host, pid = excluded.pid,"
        " until = excluded.until,"
        " since = CASE WHEN holder = excluded.holder THEN since ELSE excluded.since END,"
        " holder = excluded.holder"
        " WHERE until <= ? OR holder = excluded.holder",
        (lease.name, lease.holder, lease.host, lease.pid, lease.since, lease.until, now),
    )
    stored = await get(db, lease.name)
    assert stored is not None
    return stored


async def renew(db: aiosqlite.Connection, name: str, holder: str, until: float) -> Lease | None:
    await db.execute(
        "UPDATE leases SET until = ? WHERE name = ? AND holder = ?", (until, name, holder)
    )
    return await get(db, name)


async def release(db: aiosqlite.Connection, name: str, holder: str) -> bool:
    cursor = await db.execute("DELETE FROM leases WHERE name = ? AND holder = ?", (name, holder))
    return cursor.rowcount > 0
