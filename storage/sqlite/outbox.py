"""The SQLite store's delivery outbox, for the worker and for operators.

Claims and outcomes for the worker; pages, counts and retries for operators; and the
cancellations other repositories make in their own transactions.
"""

from __future__ import annotations

import builtins
import json
import sqlite3
from typing import Any, cast

import aiosqlite

from storage import rules
from storage.base import (
    RETRYABLE_STATES,
    Delivery,
    DeliveryState,
    RetryableState,
    RetryOutcome,
    Target,
    TargetKind,
)
from storage.sqlite.connection import (
    Connection,
    as_time,
    fetch_all,
    fetch_one,
    in_transaction,
)


def delivery_from_row(row: sqlite3.Row) -> Delivery:
    return Delivery(
        id=row["id"],
        notification_id=row["notification_id"],
        calendar_id=row["calendar_id"],
        target=Target(kind=row["target_kind"], token=row["target_token"]),
        state=row["state"],
        attempts=row["attempts"],
        next_attempt_at=float(row["next_attempt_at"]),
        last_error=row["last_error"],
        created_at=float(row["created_at"]),
        updated_at=float(row["updated_at"]),
        lease_until=as_time(row["lease_until"]),
    )


async def cancel_tokens(
    db: aiosqlite.Connection, calendar_id: str, tokens: builtins.list[str], now: float
) -> None:
    """A token that left a room takes its non-final deliveries to it along (contract 2); run in
    the room write's transaction."""
    if tokens:
        await db.execute(
            "UPDATE deliveries SET state = 'cancelled', lease_until = NULL, updated_at = ?"
            " WHERE calendar_id = ? AND state IN ('pending', 'in_flight')"
            " AND target_token IN (SELECT value FROM json_each(?))",
            (now, calendar_id, json.dumps(tokens)),
        )


async def cancel_calendar(db: aiosqlite.Connection, calendar_id: str, token: str | None) -> int:
    """Cancel the calendar's non-final deliveries (only those to `token` when given)."""
    sql = (
        "UPDATE deliveries SET state = 'cancelled', lease_until = NULL"
        " WHERE calendar_id = ? AND state IN ('pending', 'in_flight')"
    )
    params: builtins.list[Any] = [calendar_id]
    if token is not None:
        sql += " AND target_token = ?"
        params.append(token)
    cursor = await db.execute(sql, params)
    return cursor.rowcount


async def _room_tokens(
    db: aiosqlite.Connection, calendar_ids: set[str], now: float
) -> dict[str, rules.RoomTokens | None]:
    wanted = json.dumps(sorted(calendar_ids))
    rooms: dict[str, rules.RoomTokens | None] = dict.fromkeys(calendar_ids)
    buried: dict[str, set[str]] = {}
    for row in await fetch_all(
        db,
        "SELECT calendar_id, token FROM tombstones WHERE until > ?"
        " AND calendar_id IN (SELECT value FROM json_each(?))",
        [now, wanted],
    ):
        buried.setdefault(row["calendar_id"], set()).add(row["token"])
    for row in await fetch_all(
        db,
        "SELECT calendar_id, firebase_tokens FROM rooms"
        " WHERE calendar_id IN (SELECT value FROM json_each(?))",
        [wanted],
    ):
        calendar_id = row["calendar_id"]
        rooms[calendar_id] = rules.RoomTokens(
            frozenset(json.loads(row["firebase_tokens"])),
            frozenset(buried.get(calendar_id, ())),
        )
    return rooms


_STICKY = json.dumps(rules.STICKY_STATES)


def _finish(db: sqlite3.Connection, params: tuple[Any, ...]) -> sqlite3.Row | None:
    db.execute(
        "UPDATE deliveries SET state = ?, updated_at = ?, lease_until = NULL,"
        " attempts = coalesce(?, attempts),"
        " next_attempt_at = coalesce(?, next_attempt_at),"
        " last_error = coalesce(?, last_error)"
        " WHERE id = ? AND state NOT IN (SELECT value FROM json_each(?))",
        params,
    )
    found: list[sqlite3.Row] = db.execute(
        "SELECT * FROM deliveries WHERE id = ?", (params[5],)
    ).fetchall()
    return found[0] if found else None


class SqliteOutbox:
    """`OutboxRepository` on the `deliveries` table."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    async def claim(
        self, now: float, lease_until: float, limit: int = 100, kind: TargetKind | None = None
    ) -> builtins.list[Delivery]:
        # One statement, hence atomic even against another process on the same file.
        async with self._conn.session() as db:
            rows = await fetch_all(
                db,
                "UPDATE deliveries SET state = 'in_flight', lease_until = ?, updated_at = ?"
                " WHERE id IN (SELECT id FROM deliveries"
                " WHERE ((state = 'pending' AND next_attempt_at <= ?)"
                " OR (state = 'in_flight' AND lease_until <= ?))"
                " AND (? IS NULL OR target_kind = ?)"
                " ORDER BY next_attempt_at, id LIMIT ?) RETURNING *",
                (lease_until, now, now, now, kind, kind, rules.clamp(limit)),
            )
        # RETURNING gives no order; next_attempt_at is untouched by the claim, so sort again.
        claimed = [delivery_from_row(row) for row in rows]
        claimed.sort(key=lambda d: (d.next_attempt_at, d.id))
        return claimed

    async def release_claims(self) -> int:
        async with self._conn.session() as db:
            cursor = await db.execute(
                "UPDATE deliveries SET state = 'pending', lease_until = NULL"
                " WHERE state = 'in_flight'"
            )
            return cursor.rowcount

    async def finish(
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
        # One hop to aiosqlite's thread for the whole transaction (each attempt ends here).
        row = await self._conn.in_thread(
            in_transaction,
            _finish,
            (state, now, attempts, next_attempt_at, last_error, delivery_id, _STICKY),
        )
        return delivery_from_row(row) if row is not None else None

    async def cancel(self, calendar_id: str, token: str | None = None) -> int:
        async with self._conn.session() as db:
            return await cancel_calendar(db, calendar_id, token)

    async def expire(self, created_before: float, now: float) -> int:
        async with self._conn.session() as db:
            cursor = await db.execute(
                "UPDATE deliveries SET state = 'expired', lease_until = NULL, updated_at = ?"
                " WHERE created_at < ? AND (state = 'pending'"
                " OR (state = 'in_flight' AND lease_until <= ?))",
                (now, created_before, now),
            )
            return cursor.rowcount

    async def next_due(self, kind: TargetKind | None = None) -> float | None:
        async with self._conn.session() as db:
            # min() as an aggregate skips NULLs: either side may have nothing waiting.
            row = await fetch_one(
                db,
                "SELECT min(due) FROM (SELECT min(next_attempt_at) AS due FROM deliveries"
                " WHERE state = 'pending' AND (?1 IS NULL OR target_kind = ?1)"
                " UNION ALL SELECT min(lease_until) FROM deliveries"
                " WHERE state = 'in_flight' AND (?1 IS NULL OR target_kind = ?1))",
                (kind,),
            )
        return float(row[0]) if row is not None and row[0] is not None else None

    async def count(self, state: DeliveryState | None = None) -> int:
        async with self._conn.session() as db:
            if state is None:
                row = await fetch_one(db, "SELECT count(*) FROM deliveries")
            else:
                row = await fetch_one(
                    db, "SELECT count(*) FROM deliveries WHERE state = ?", (state,)
                )
        return int(row[0]) if row is not None else 0

    # -- for operators ---------------------------------------------------------------------------
    async def list(
        self,
        state: DeliveryState | None = None,
        calendar_id: str | None = None,
        before: int | None = None,
        limit: int = 100,
    ) -> builtins.list[Delivery]:
        where = ["1"]
        params: builtins.list[Any] = []
        if state is not None:
            where.append("state = ?")
            params.append(state)
        if calendar_id is not None:
            where.append("calendar_id = ?")
            params.append(calendar_id)
        if before is not None:
            where.append("id < ?")
            params.append(before)
        params.append(rules.clamp(limit))
        # Only our own fixed fragments are pasted; every value is a parameter.
        sql = f"SELECT * FROM deliveries WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT ?"  # noqa: S608
        async with self._conn.session() as db:
            rows = await fetch_all(db, sql, params)
        return [delivery_from_row(row) for row in rows]

    async def counts(
        self, calendar_id: str | None = None
    ) -> dict[tuple[DeliveryState, TargetKind], int]:
        # The metrics' count (every calendar) reads the covering index deliveries_state_kind
        # alone (migration 4); a calendar's reads deliveries_calendar.
        sql = "SELECT state, target_kind, count(*) FROM deliveries"
        params: tuple[str, ...] = ()
        if calendar_id is not None:
            sql, params = sql + " WHERE calendar_id = ?", (calendar_id,)
        async with self._conn.session() as db:
            rows = await fetch_all(db, sql + " GROUP BY state, target_kind", params)
        return {
            (cast(DeliveryState, state), cast(TargetKind, kind)): int(count)
            for state, kind, count in rows
        }

    async def retry(
        self,
        now: float,
        *,
        ids: builtins.list[int] | None = None,
        state: RetryableState | None = None,
    ) -> RetryOutcome:
        rules.check_retry(ids, state)
        # One transaction: the rooms read and the update see the same token sets, so a token
        # leaving its room cannot slip between them.
        async with self._conn.transaction() as db:
            if ids is not None:
                found = await fetch_all(
                    db,
                    "SELECT * FROM deliveries WHERE id IN (SELECT value FROM json_each(?))"
                    " ORDER BY id",
                    [json.dumps(ids)],
                )
            else:
                found = await fetch_all(
                    db, "SELECT * FROM deliveries WHERE state = ? ORDER BY id", [state]
                )
            deliveries = [delivery_from_row(row) for row in found]
            rooms = await _room_tokens(db, {d.calendar_id for d in deliveries}, now)
            outcome = rules.retry_plan(deliveries, rooms, ids)
            if outcome.retried:
                await db.execute(
                    "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = ?,"
                    " last_error = NULL, lease_until = NULL, created_at = ?, updated_at = ?"
                    " WHERE id IN (SELECT value FROM json_each(?))"
                    " AND state IN (SELECT value FROM json_each(?))",
                    (now, now, now, json.dumps(outcome.retried), json.dumps(RETRYABLE_STATES)),
                )
        return outcome
