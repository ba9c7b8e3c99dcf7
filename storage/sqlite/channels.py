"""The SQLite store's channels, their stop queue and the calendars' sync tokens.

Tables: `channels`, the stop queue `channel_stops` and `stopped_channels` (their counts kept in
`meta` by triggers), and `sync_tokens`.
"""

from __future__ import annotations

import builtins
import dataclasses
import json
import sqlite3
from typing import Any, cast

import aiosqlite

from storage import rules
from storage.base import Channel, ChannelState, ChannelStop, DuplicateChannel, StopOutcome
from storage.sqlite.connection import Connection, as_time, fetch_all, fetch_one


def _channel(row: sqlite3.Row) -> Channel:
    return Channel(
        id=row["id"],
        calendar_id=row["calendar_id"],
        resource_id=row["resource_id"],
        token=row["token"],
        expiration=as_time(row["expiration"]),
        state=row["state"],
        confirmed=bool(row["confirmed"]),
        last_message_number=row["last_message_number"],
        last_error=row["last_error"],
        created_at=float(row["created_at"]),
        updated_at=float(row["updated_at"]),
        attempts=row["attempts"],
        next_attempt_at=as_time(row["next_attempt_at"]),
    )


def _stop(row: sqlite3.Row) -> ChannelStop:
    return ChannelStop(
        channel_id=row["channel_id"],
        resource_id=row["resource_id"],
        calendar_id=row["calendar_id"],
        attempts=row["attempts"],
        next_attempt_at=float(row["next_attempt_at"]),
        last_error=row["last_error"],
        created_at=float(row["created_at"]),
    )


async def _meta_count(db: aiosqlite.Connection, key: str) -> int:
    """A count the triggers of migration 2 keep in `meta`."""
    row = await fetch_one(db, "SELECT value FROM meta WHERE key = ?", (key,))
    return int(row[0]) if row is not None else 0


class SqliteChannels:
    """`ChannelRepository` on the `channels`, stop and `sync_tokens` tables."""

    def __init__(self, conn: Connection, *, reads: Connection | None = None) -> None:
        self._conn = conn
        # `get` (each webhook's lookup) on the webhook's connection: every write here commits
        # before it returns, so any connection reads what it wrote.
        self._reads = reads or conn

    async def insert(self, channel: Channel) -> None:
        values = dataclasses.asdict(channel)
        values["confirmed"] = int(channel.confirmed)
        columns = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        async with self._conn.session() as db:
            try:
                # Column names come from the Channel dataclass, not from input.
                await db.execute(
                    f"INSERT INTO channels ({columns}) VALUES ({marks})",  # noqa: S608
                    builtins.list(values.values()),
                )
            except sqlite3.IntegrityError as exc:
                raise DuplicateChannel(f"channel {channel.id} is stored already") from exc

    async def get(self, channel_id: str) -> Channel | None:
        async with self._reads.session() as db:
            row = await fetch_one(db, "SELECT * FROM channels WHERE id = ?", (channel_id,))
        return _channel(row) if row is not None else None

    async def list(
        self,
        calendar_id: str | None = None,
        states: tuple[ChannelState, ...] | None = None,
        expiring_before: float | None = None,
    ) -> builtins.list[Channel]:
        where = ["1"]
        params: builtins.list[Any] = []
        if calendar_id is not None:
            where.append("calendar_id = ?")
            params.append(calendar_id)
        if states is not None:
            where.append("state IN (SELECT value FROM json_each(?))")
            params.append(json.dumps(builtins.list(states)))
        if expiring_before is not None:
            where.append("expiration IS NOT NULL AND expiration < ?")
            params.append(expiring_before)
        # Only our own fixed fragments are pasted; every value is a parameter.
        sql = f"SELECT * FROM channels WHERE {' AND '.join(where)} ORDER BY created_at, id"  # noqa: S608
        async with self._conn.session() as db:
            rows = await fetch_all(db, sql, params)
        return [_channel(row) for row in rows]

    async def update(self, channel_id: str, now: float, **fields: Any) -> Channel | None:
        values = rules.channel_update(fields)
        if "confirmed" in values:
            values["confirmed"] = int(values["confirmed"])
        values["updated_at"] = now
        assignments = ", ".join(f"{name} = ?" for name in values)
        async with self._conn.session() as db:
            # Column names are checked against the Channel fields (rules.channel_update).
            rows = await fetch_all(
                db,
                f"UPDATE channels SET {assignments} WHERE id = ? RETURNING *",  # noqa: S608
                [*values.values(), channel_id],
            )
        return _channel(rows[0]) if rows else None

    async def confirm(self, channel_id: str, resource_id: str, now: float) -> Channel | None:
        async with self._conn.session() as db:
            row = await fetch_one(
                db,
                "UPDATE channels SET confirmed = 1, updated_at = ?,"
                " resource_id = CASE WHEN resource_id = '' THEN ? ELSE resource_id END"
                " WHERE id = ? RETURNING *",
                (now, resource_id, channel_id),
            )
        return _channel(row) if row is not None else None

    async def advance_message_number(self, channel_id: str, message_number: int) -> bool:
        async with self._conn.session() as db:
            cursor = await db.execute(
                "UPDATE channels SET last_message_number = ?"
                " WHERE id = ? AND last_message_number < ?",
                (message_number, channel_id, message_number),
            )
            return cursor.rowcount > 0

    async def delete(self, channel_id: str) -> bool:
        async with self._conn.session() as db:
            cursor = await db.execute("DELETE FROM channels WHERE id = ?", (channel_id,))
            return cursor.rowcount > 0

    async def count_by_state(self) -> dict[ChannelState, int]:
        async with self._conn.session() as db:
            rows = await fetch_all(db, "SELECT state, count(*) FROM channels GROUP BY state")
        return {cast(ChannelState, state): int(count) for state, count in rows}

    async def soonest_expiry(self) -> float | None:
        async with self._conn.session() as db:
            row = await fetch_one(db, "SELECT min(expiration) FROM channels WHERE state = 'active'")
        return None if row is None else as_time(row[0])

    # -- sync tokens -----------------------------------------------------------------------------
    async def get_sync_token(self, calendar_id: str) -> str | None:
        async with self._conn.session() as db:
            row = await fetch_one(
                db, "SELECT sync_token FROM sync_tokens WHERE calendar_id = ?", (calendar_id,)
            )
        return row["sync_token"] if row is not None else None

    async def set_sync_token(self, calendar_id: str, sync_token: str | None) -> None:
        async with self._conn.session() as db:
            if sync_token is None:
                await db.execute("DELETE FROM sync_tokens WHERE calendar_id = ?", (calendar_id,))
            else:
                await db.execute(
                    "INSERT INTO sync_tokens (calendar_id, sync_token) VALUES (?, ?)"
                    " ON CONFLICT (calendar_id) DO UPDATE SET sync_token = excluded.sync_token",
                    (calendar_id, sync_token),
                )

    # -- stops -----------------------------------------------------------------------------------
    async def enqueue_stop(
        self, channel_id: str, resource_id: str, calendar_id: str | None, now: float
    ) -> bool:
        async with self._conn.session() as db:
            cursor = await db.execute(
                "INSERT INTO channel_stops (channel_id, resource_id, calendar_id, attempts,"
                " next_attempt_at, last_error, created_at) VALUES (?, ?, ?, 0, ?, NULL, ?)"
                " ON CONFLICT (channel_id) DO NOTHING",
                (channel_id, resource_id, calendar_id, now, now),
            )
            return cursor.rowcount > 0

    async def enqueue_unknown_stop(
        self, channel_id: str, resource_id: str, now: float, max_queued: int
    ) -> StopOutcome:
        # Primary-key lookups and the trigger-kept count: the same cost whatever is queued.
        async with self._conn.transaction() as db:
            remembered = await fetch_one(
                db, "SELECT until FROM stopped_channels WHERE channel_id = ?", (channel_id,)
            )
            if remembered is not None and remembered["until"] > now:
                return "known"
            queued = await fetch_one(
                db, "SELECT 1 FROM channel_stops WHERE channel_id = ?", (channel_id,)
            )
            if queued is not None:
                return "known"
            if await _meta_count(db, "stops_queued") >= max_queued:
                return "full"
            await db.execute(
                "INSERT INTO channel_stops (channel_id, resource_id, calendar_id, attempts,"
                " next_attempt_at, last_error, created_at) VALUES (?, ?, NULL, 0, ?, NULL, ?)",
                (channel_id, resource_id, now, now),
            )
        return "queued"

    async def count_stops(self) -> int:
        async with self._conn.session() as db:
            return await _meta_count(db, "stops_queued")

    async def finish_stop(
        self, channel_id: str, remember_until: float, now: float, max_remembered: int
    ) -> None:
        async with self._conn.transaction() as db:
            await db.execute("DELETE FROM channel_stops WHERE channel_id = ?", (channel_id,))
            await db.execute("DELETE FROM stopped_channels WHERE until <= ?", (now,))
            await db.execute(
                "INSERT INTO stopped_channels (channel_id, until) VALUES (?, ?)"
                " ON CONFLICT (channel_id) DO UPDATE SET until = max(until, excluded.until)",
                (channel_id, remember_until),
            )
            over = await _meta_count(db, "stops_remembered") - max(max_remembered, 0)
            if over > 0:
                await db.execute(
                    "DELETE FROM stopped_channels WHERE channel_id IN (SELECT channel_id FROM"
                    " stopped_channels ORDER BY until, channel_id LIMIT ?)",
                    (over,),
                )

    async def due_stops(self, now: float, limit: int = 100) -> builtins.list[ChannelStop]:
        async with self._conn.session() as db:
            rows = await fetch_all(
                db,
                "SELECT * FROM channel_stops WHERE next_attempt_at <= ?"
                " ORDER BY next_attempt_at, created_at, channel_id LIMIT ?",
                (now, rules.clamp(limit)),
            )
        return [_stop(row) for row in rows]

    async def list_stops(self) -> builtins.list[ChannelStop]:
        async with self._conn.session() as db:
            rows = await fetch_all(
                db, "SELECT * FROM channel_stops ORDER BY created_at, channel_id"
            )
        return [_stop(row) for row in rows]

    async def reschedule_stop(
        self, channel_id: str, next_attempt_at: float, last_error: str
    ) -> None:
        async with self._conn.session() as db:
            await db.execute(
                "UPDATE channel_stops SET attempts = attempts + 1, next_attempt_at = ?,"
                " last_error = ? WHERE channel_id = ?",
                (next_attempt_at, last_error, channel_id),
            )

    async def remove_stop(self, channel_id: str) -> None:
        async with self._conn.session() as db:
            await db.execute("DELETE FROM channel_stops WHERE channel_id = ?", (channel_id,))
