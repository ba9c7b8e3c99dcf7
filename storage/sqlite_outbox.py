"""The delivery outbox as operators see it, in the SQLite store: the page newest first, the counts
by state, and the retry of deliveries that gave up (SqliteStore runs these statements)."""

from __future__ import annotations

import json
import sqlite3
from typing import Any, cast

import aiosqlite

from storage.base import (
    RETRYABLE_STATES,
    Delivery,
    DeliveryState,
    RetryableState,
    RetryOutcome,
    Target,
    TargetKind,
)
from storage.rules import RoomTokens, retry_plan


def delivery_from_row(row: sqlite3.Row) -> Delivery:
    lease_until = row["lease_until"]
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
        # RETURNING hands back whole REAL values as ints (SQLite stores them so); keep floats.
        lease_until=None if lease_until is None else float(lease_until),
    )


async def _rows(db: aiosqlite.Connection, sql: str, params: list[Any]) -> list[sqlite3.Row]:
    return list(await db.execute_fetchall(sql, params))


async def page(
    db: aiosqlite.Connection,
    state: DeliveryState | None,
    calendar_id: str | None,
    before: int | None,
    limit: int,
) -> list[Delivery]:
    where = ["1"]
    params: list[Any] = []
    if state is not None:
        where.append("state = ?")
        params.append(state)
    if calendar_id is not None:
        where.append("calendar_id = ?")
        params.append(calendar_id)
    if before is not None:
        where.append("id < ?")
        params.append(before)
    params.append(max(limit, 0))
    # Only our own fixed fragments are pasted; every value is a parameter.
    sql = f"SELECT * FROM deliveries WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT ?"  # noqa: S608
    return [delivery_from_row(row) for row in await _rows(db, sql, params)]


async def counts(
    db: aiosqlite.Connection, calendar_id: str | None
) -> dict[tuple[DeliveryState, TargetKind], int]:
    rows = await _rows(
        db,
        "SELECT state, target_kind, count(*) AS n FROM deliveries"
        " WHERE ?1 IS NULL OR calendar_id = ?1 GROUP BY state, target_kind",
        [calendar_id],
    )
    return {
        (cast(DeliveryState, row["state"]), cast(TargetKind, row["target_kind"])): int(row["n"])
        for row in rows
    }


async def _rooms(
    db: aiosqlite.Connection, calendar_ids: set[str], now: float
) -> dict[str, RoomTokens | None]:
    wanted = json.dumps(sorted(calendar_ids))
    rooms: dict[str, RoomTokens | None] = dict.fromkeys(calendar_ids)
    buried: dict[str, set[str]] = {}
    for row in await _rows(
        db,
        "SELECT calendar_id, token FROM tombstones WHERE until > ?"
        " AND calendar_id IN (SELECT value FROM json_each(?))",
        [now, wanted],
    ):
        buried.setdefault(row["calendar_id"], set()).add(row["token"])
    for row in await _rows(
        db,
        "SELECT calendar_id, firebase_tokens FROM rooms"
        " WHERE calendar_id IN (SELECT value FROM json_each(?))",
        [wanted],
    ):
        calendar_id = row["calendar_id"]
        rooms[calendar_id] = RoomTokens(
            frozenset(json.loads(row["firebase_tokens"])),
            frozenset(buried.get(calendar_id, ())),
        )
    return rooms


async def retry(
    db: aiosqlite.Connection,
    now: float,
    ids: list[int] | None,
    state: RetryableState | None,
) -> RetryOutcome:
    """Run inside one BEGIN IMMEDIATE transaction: the rooms read and the update see the same
    token sets, so a token leaving its room cannot slip between them."""
    if ids is not None:
        found = await _rows(
            db,
            "SELECT * FROM deliveries WHERE id IN (SELECT value FROM json_each(?)) ORDER BY id",
            [json.dumps(ids)],
        )
    else:
        found = await _rows(db, "SELECT * FROM deliveries WHERE state = ? ORDER BY id", [state])
    deliveries = [delivery_from_row(row) for row in found]
    rooms = await _rooms(db, {d.calendar_id for d in deliveries}, now)
    outcome = retry_plan(deliveries, rooms, ids)
    if outcome.retried:
        await db.execute(
            "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = ?,"
            " last_error = NULL, lease_until = NULL, created_at = ?, updated_at = ?"
            " WHERE id IN (SELECT value FROM json_each(?))"
            " AND state IN (SELECT value FROM json_each(?))",
            (now, now, now, json.dumps(outcome.retried), json.dumps(RETRYABLE_STATES)),
        )
    return outcome
