"""The SQLite store's notifications: ids, seq, publication (with its deliveries), retention.

Table `notifications`; the seq counter and the purge mark in `meta`; publication writes the
deliveries in the same transaction.
"""

from __future__ import annotations

import builtins
import json
import sqlite3
from typing import Any

import aiosqlite

from storage import rules
from storage.base import (
    Delivery,
    DuplicateNotification,
    Notification,
    NotificationSource,
    ResourceState,
    StoreError,
    Target,
)
from storage.sqlite.connection import (
    Connection,
    as_time,
    fetch_all,
    fetch_one,
    in_transaction,
)
from storage.sqlite.group_commit import GroupCommit
from storage.sqlite.outbox import delivery_from_row


def _notification(row: sqlite3.Row, deliveries: tuple[Delivery, ...] = ()) -> Notification:
    return Notification(
        id=row["id"],
        calendar_id=row["calendar_id"],
        source=row["source"],
        channel_id=row["channel_id"],
        message_number=row["message_number"],
        resource_state=row["resource_state"],
        received_at=float(row["received_at"]),
        state=row["state"],
        changes=tuple(json.loads(row["changes"])),
        full_resync=bool(row["full_resync"]),
        seq=row["seq"],
        published_at=as_time(row["published_at"]),
        deliveries=deliveries,
    )


async def _with_deliveries(
    db: aiosqlite.Connection, rows: builtins.list[sqlite3.Row]
) -> builtins.list[Notification]:
    """The notifications with their deliveries, in one query for the page."""
    if not rows:
        return []
    ids = [row["id"] for row in rows]
    found: dict[int, builtins.list[Delivery]] = {i: [] for i in ids}
    for drow in await fetch_all(
        db,
        "SELECT * FROM deliveries WHERE notification_id IN (SELECT value FROM json_each(?))"
        " ORDER BY id",
        (json.dumps(ids),),
    ):
        found[drow["notification_id"]].append(delivery_from_row(drow))
    return [_notification(row, tuple(found[row["id"]])) for row in rows]


async def _read(
    db: aiosqlite.Connection, rows: builtins.list[sqlite3.Row], with_deliveries: bool
) -> builtins.list[Notification]:
    if with_deliveries:
        return await _with_deliveries(db, rows)
    return [_notification(row) for row in rows]


def _publish(
    db: sqlite3.Connection,
    notification_id: int,
    changes: builtins.list[dict[str, Any]],
    full_resync: bool,
    targets: builtins.list[Target],
    now: float,
) -> tuple[sqlite3.Row, builtins.list[sqlite3.Row]]:
    """On aiosqlite's thread, inside the transaction: the notification as published, and its
    deliveries (already published: as it is, unchanged)."""

    def read() -> sqlite3.Row:
        rows = db.execute("SELECT * FROM notifications WHERE id = ?", (notification_id,))
        found = rows.fetchall()
        if not found:
            raise StoreError(f"notification {notification_id} is not stored")
        row: sqlite3.Row = found[0]
        return row

    row = read()
    if row["state"] == "received":
        (seq,) = db.execute(
            "UPDATE meta SET value = value + 1 WHERE key = 'seq' RETURNING value"
        ).fetchall()
        db.execute(
            "UPDATE notifications SET state = 'published', seq = ?, changes = ?,"
            " full_resync = ?, published_at = ? WHERE id = ?",
            (seq[0], json.dumps(changes), int(full_resync), now, notification_id),
        )
        db.executemany(
            "INSERT INTO deliveries (notification_id, calendar_id, target_kind,"
            " target_token, state, attempts, next_attempt_at, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, 'pending', 0, ?, ?, ?)",
            [
                (notification_id, row["calendar_id"], t.kind, t.token, now, now, now)
                for t in targets
            ],
        )
        row = read()
    deliveries = db.execute(
        "SELECT * FROM deliveries WHERE notification_id = ? ORDER BY id", (notification_id,)
    ).fetchall()
    return row, deliveries


class SqliteNotifications:
    """`NotificationRepository` on the `notifications` table."""

    def __init__(self, conn: Connection, *, ingest: Connection | None = None) -> None:
        self._conn = conn
        self._group = GroupCommit(ingest or conn)

    async def add(
        self,
        calendar_id: str,
        source: NotificationSource,
        resource_state: ResourceState,
        received_at: float,
        channel_id: str | None = None,
        message_number: int | None = None,
    ) -> Notification:
        # AUTOINCREMENT ids: never handed out twice, even after the newest row is purged.
        # Written with the rows of concurrent callers in one transaction (group_commit).
        row = await self._group.add(
            (calendar_id, source, channel_id, message_number, resource_state, received_at)
        )
        if row is None:
            raise DuplicateNotification(
                f"notification {message_number} of channel {channel_id} is stored already"
            )
        return _notification(row)

    async def get(
        self, notification_id: int, *, with_deliveries: bool = False
    ) -> Notification | None:
        async with self._conn.session() as db:
            rows = await fetch_all(
                db, "SELECT * FROM notifications WHERE id = ?", (notification_id,)
            )
            found = await _read(db, rows, with_deliveries)
        return found[0] if found else None

    async def received(
        self, limit: int = 1000, calendar_id: str | None = None
    ) -> builtins.list[Notification]:
        where = "state = 'received'"
        args: tuple[str, ...] = ()
        if calendar_id is not None:
            where, args = "state = 'received' AND calendar_id = ?", (calendar_id,)
        async with self._conn.session() as db:
            rows = await fetch_all(
                db,
                f"SELECT * FROM notifications WHERE {where} ORDER BY id LIMIT ?",  # noqa: S608
                (*args, rules.clamp(limit)),
            )
        return [_notification(row) for row in rows]

    async def publish(
        self,
        notification_id: int,
        changes: builtins.list[dict[str, Any]],
        full_resync: bool,
        targets: builtins.list[Target],
        now: float,
    ) -> Notification:
        # One transaction: the counter, the seq and the deliveries commit together, and commits
        # are serialised, so seq N is never visible before seq N-1. One hop to aiosqlite's
        # thread for all of it.
        row, deliveries = await self._conn.in_thread(
            in_transaction, _publish, notification_id, changes, full_resync, targets, now
        )
        published = _notification(row, tuple(delivery_from_row(d) for d in deliveries))
        return published

    async def skip(self, notification_ids: builtins.list[int], now: float) -> None:
        if not notification_ids:
            return
        async with self._conn.session() as db:
            await db.execute(
                "UPDATE notifications SET state = 'skipped'"
                " WHERE id IN (SELECT value FROM json_each(?)) AND state = 'received'",
                (json.dumps(notification_ids),),
            )

    async def list(
        self,
        calendar_id: str | None = None,
        calendar_ids: builtins.list[str] | None = None,
        after: int | None = None,
        up_to: int | None = None,
        limit: int = 100,
        include_unpublished: bool = False,
        *,
        with_deliveries: bool = False,
    ) -> builtins.list[Notification]:
        key = "id" if include_unpublished else "seq"
        where = ["1"] if include_unpublished else ["state = 'published'"]
        params: builtins.list[Any] = []
        wanted = rules.calendars(calendar_id, calendar_ids)
        if wanted is not None and len(wanted) == 1:
            where.append("calendar_id = ?")
            params.append(wanted[0])
        elif wanted is not None:
            where.append("calendar_id IN (SELECT value FROM json_each(?))")
            params.append(json.dumps(wanted))
        if after is not None:
            where.append(f"{key} > ?")
            params.append(after)
        if up_to is not None:
            where.append(f"{key} <= ?")
            params.append(up_to)
        params.append(rules.clamp(limit))
        # Only our own fixed fragments are pasted; every value is a parameter.
        sql = f"SELECT * FROM notifications WHERE {' AND '.join(where)} ORDER BY {key} LIMIT ?"  # noqa: S608
        async with self._conn.session() as db:
            rows = await fetch_all(db, sql, params)
            return await _read(db, rows, with_deliveries)

    async def last_seq(self) -> int:
        # Not the counter: the highest seq a reader can see, or the purge mark past it.
        async with self._conn.session() as db:
            row = await fetch_one(
                db,
                "SELECT max(coalesce((SELECT max(seq) FROM notifications), 0),"
                " (SELECT value FROM meta WHERE key = 'purged_through_seq'))",
            )
        return int(row[0]) if row is not None else 0

    async def purge(self, published_before: float, received_before: float) -> int:
        async with self._conn.transaction() as db:
            # Narrowed by the rule's own terms (indexed); rules.purge_plan decides.
            rows = await fetch_all(
                db,
                "SELECT id, state, seq, published_at, received_at FROM notifications"
                " WHERE (state = 'published' AND published_at < ?) OR"
                " (state = 'skipped' AND received_at < ?)",
                (published_before, received_before),
            )
            if not rows:
                return 0
            candidates = [
                rules.PurgeCandidate(
                    r["id"], r["state"], r["seq"], as_time(r["published_at"]), r["received_at"]
                )
                for r in rows
            ]
            found = await fetch_all(
                db,
                "SELECT notification_id, state, updated_at FROM deliveries"
                " WHERE notification_id IN (SELECT value FROM json_each(?))",
                (json.dumps([c.id for c in candidates]),),
            )
            going, top = rules.purge_plan(
                candidates,
                [(int(r[0]), r[1], float(r[2])) for r in found],
                published_before,
                received_before,
            )
            if not going:
                return 0
            ids = json.dumps(going)
            await db.execute(
                "DELETE FROM deliveries WHERE notification_id IN (SELECT value FROM json_each(?))",
                (ids,),
            )
            await db.execute(
                "DELETE FROM notifications WHERE id IN (SELECT value FROM json_each(?))", (ids,)
            )
            await db.execute(
                "UPDATE meta SET value = max(value, ?) WHERE key = 'purged_through_seq'", (top,)
            )
        return len(going)

    async def purged_through_seq(self) -> int:
        async with self._conn.session() as db:
            row = await fetch_one(db, "SELECT value FROM meta WHERE key = 'purged_through_seq'")
        return int(row[0]) if row is not None else 0

    async def count_unsynced(self) -> int:
        async with self._conn.session() as db:
            row = await fetch_one(db, "SELECT count(*) FROM notifications WHERE state = 'received'")
        return int(row[0]) if row is not None else 0
