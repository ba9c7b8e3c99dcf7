"""The SQLite store's rooms: the `rooms` table (token sets as JSON lists) and `tombstones`."""

from __future__ import annotations

import builtins
import json
import sqlite3

import aiosqlite

from storage import rules
from storage.base import Room
from storage.sqlite.connection import Connection, fetch_all, fetch_one
from storage.sqlite.outbox import cancel_calendar, cancel_tokens


def _room(row: sqlite3.Row) -> Room:
    return Room(
        calendar_id=row["calendar_id"],
        name=row["name"],
        firebase_tokens=tuple(json.loads(row["firebase_tokens"])),
        created_at=float(row["created_at"]),
        updated_at=float(row["updated_at"]),
    )


async def _read(db: aiosqlite.Connection, calendar_id: str) -> sqlite3.Row | None:
    return await fetch_one(db, "SELECT * FROM rooms WHERE calendar_id = ?", (calendar_id,))


async def _apply(
    db: aiosqlite.Connection, calendar_id: str, change: rules.TokenChange, now: float
) -> None:
    """The tombstones a token change clears and the deliveries it cancels, in its transaction."""
    if change.clear_tombstones:
        await db.execute(
            "DELETE FROM tombstones WHERE calendar_id = ?"
            " AND token IN (SELECT value FROM json_each(?))",
            (calendar_id, json.dumps(change.clear_tombstones)),
        )
    await cancel_tokens(db, calendar_id, change.cancel, now)


class SqliteRooms:
    """`RoomRepository` on the `rooms` and `tombstones` tables."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    async def get(self, calendar_id: str) -> Room | None:
        async with self._conn.session() as db:
            row = await _read(db, calendar_id)
        return _room(row) if row is not None else None

    async def list(self) -> builtins.list[Room]:
        async with self._conn.session() as db:
            rows = await fetch_all(db, "SELECT * FROM rooms ORDER BY calendar_id")
        return [_room(row) for row in rows]

    async def put(
        self,
        calendar_id: str,
        name: str | None,
        firebase_tokens: builtins.list[str] | None,
        now: float,
    ) -> tuple[Room, bool]:
        async with self._conn.transaction() as db:
            old = await _read(db, calendar_id)
            current = None if old is None else json.loads(old["firebase_tokens"])
            change = None
            if firebase_tokens is not None:
                change = rules.replace_tokens(current, firebase_tokens)
            tokens = change.tokens if change is not None else current or []
            if old is None:
                await db.execute(
                    "INSERT INTO rooms (calendar_id, name, firebase_tokens, created_at,"
                    " updated_at) VALUES (?, ?, ?, ?, ?)",
                    (calendar_id, name or "", json.dumps(tokens), now, now),
                )
            else:
                await db.execute(
                    "UPDATE rooms SET name = ?, firebase_tokens = ?, updated_at = ?"
                    " WHERE calendar_id = ?",
                    (old["name"] if name is None else name, json.dumps(tokens), now, calendar_id),
                )
            if change is not None:
                await _apply(db, calendar_id, change, now)
            row = await _read(db, calendar_id)
        assert row is not None
        return _room(row), old is None

    async def add_tokens(
        self,
        calendar_id: str,
        tokens: builtins.list[str],
        now: float,
        *,
        respect_tombstones: bool,
    ) -> tuple[Room, builtins.list[str]] | None:
        async with self._conn.transaction() as db:
            row = await _read(db, calendar_id)
            if row is None:
                return None
            await db.execute(
                "DELETE FROM tombstones WHERE calendar_id = ? AND until <= ?", (calendar_id, now)
            )
            buried = {
                r["token"]
                for r in await fetch_all(
                    db, "SELECT token FROM tombstones WHERE calendar_id = ?", (calendar_id,)
                )
            }
            change = rules.add_tokens(
                json.loads(row["firebase_tokens"]),
                tokens,
                buried,
                respect_tombstones=respect_tombstones,
            )
            await _apply(db, calendar_id, change, now)
            if change.changed:
                await db.execute(
                    "UPDATE rooms SET firebase_tokens = ?, updated_at = ? WHERE calendar_id = ?",
                    (json.dumps(change.tokens), now, calendar_id),
                )
                row = await _read(db, calendar_id)
                assert row is not None
        return _room(row), change.added

    async def _drop_token(
        self, db: aiosqlite.Connection, calendar_id: str, token: str, now: float
    ) -> tuple[bool, bool]:
        """Take the token out of the room's set and cancel its deliveries; returns (whether
        the room exists, whether the token was in its set)."""
        row = await fetch_one(
            db, "SELECT firebase_tokens FROM rooms WHERE calendar_id = ?", (calendar_id,)
        )
        current = [] if row is None else json.loads(row["firebase_tokens"])
        change = rules.remove_token(current, token)
        if change.changed:
            await db.execute(
                "UPDATE rooms SET firebase_tokens = ?, updated_at = ? WHERE calendar_id = ?",
                (json.dumps(change.tokens), now, calendar_id),
            )
        await _apply(db, calendar_id, change, now)
        return row is not None, change.changed

    async def remove_token(self, calendar_id: str, token: str, now: float) -> bool:
        async with self._conn.transaction() as db:
            _, removed = await self._drop_token(db, calendar_id, token, now)
            return removed

    async def tombstone_token(self, calendar_id: str, token: str, until: float, now: float) -> bool:
        async with self._conn.transaction() as db:
            exists, was_there = await self._drop_token(db, calendar_id, token, now)
            if exists:
                await db.execute(
                    "INSERT INTO tombstones (calendar_id, token, until) VALUES (?, ?, ?)"
                    " ON CONFLICT (calendar_id, token) DO UPDATE SET until = excluded.until",
                    (calendar_id, token, until),
                )
        return was_there

    async def tombstoned_tokens(self, calendar_id: str, now: float) -> set[str]:
        async with self._conn.session() as db:
            rows = await fetch_all(
                db,
                "SELECT token FROM tombstones WHERE calendar_id = ? AND until > ?",
                (calendar_id, now),
            )
        return {row["token"] for row in rows}

    async def delete(self, calendar_id: str) -> bool:
        async with self._conn.transaction() as db:
            cursor = await db.execute("DELETE FROM rooms WHERE calendar_id = ?", (calendar_id,))
            existed = cursor.rowcount > 0
            await db.execute("DELETE FROM tombstones WHERE calendar_id = ?", (calendar_id,))
            await db.execute("DELETE FROM sync_tokens WHERE calendar_id = ?", (calendar_id,))
            await cancel_calendar(db, calendar_id, None)
        return existed

    async def count_without_channel(self, now: float) -> int:
        async with self._conn.session() as db:
            row = await fetch_one(
                db,
                # A channel that still listens: Google sends on it until it expires or stops.
                "SELECT count(*) FROM rooms WHERE NOT EXISTS (SELECT 1 FROM channels"
                " WHERE channels.calendar_id = rooms.calendar_id AND channels.confirmed"
                " AND channels.state IN ('active', 'retiring') AND channels.expiration > ?)",
                (now,),
            )
        return int(row[0]) if row is not None else 0
