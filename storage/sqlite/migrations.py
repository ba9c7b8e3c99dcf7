"""The SQLite store's schema: numbered steps, applied in order, recorded in `user_version`."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable

import aiosqlite

from storage.base import StoreConfigError

Migration = Callable[[aiosqlite.Connection], Awaitable[None]]


async def _migration_1(db: aiosqlite.Connection) -> None:
    statements = [
        # Untyped `value`: the epoch is text, the counters stay integers.
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value NOT NULL) WITHOUT ROWID",
        """CREATE TABLE rooms (
            calendar_id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            firebase_tokens TEXT NOT NULL,  -- JSON list, order kept
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL)""",
        """CREATE TABLE tombstones (
            calendar_id TEXT NOT NULL,
            token TEXT NOT NULL,
            until REAL NOT NULL,
            PRIMARY KEY (calendar_id, token)) WITHOUT ROWID""",
        "CREATE TABLE sync_tokens (calendar_id TEXT PRIMARY KEY, sync_token TEXT NOT NULL)",
        """CREATE TABLE channels (
            id TEXT PRIMARY KEY,
            calendar_id TEXT NOT NULL,
            resource_id TEXT NOT NULL,
            token TEXT NOT NULL,
            expiration REAL,
            state TEXT NOT NULL,
            confirmed INTEGER NOT NULL,
            last_message_number INTEGER NOT NULL,
            last_error TEXT,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            attempts INTEGER NOT NULL,
            next_attempt_at REAL)""",
        "CREATE INDEX channels_calendar ON channels (calendar_id, created_at)",
        """CREATE TABLE channel_stops (
            channel_id TEXT PRIMARY KEY,
            resource_id TEXT NOT NULL,
            calendar_id TEXT,
            attempts INTEGER NOT NULL,
            next_attempt_at REAL NOT NULL,
            last_error TEXT,
            created_at REAL NOT NULL)""",
        "CREATE INDEX channel_stops_due ON channel_stops (next_attempt_at)",
        # AUTOINCREMENT: an id is never handed out twice, even after the newest row is purged.
        """CREATE TABLE notifications (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            calendar_id TEXT NOT NULL,
            source TEXT NOT NULL,
            channel_id TEXT,
            message_number INTEGER,
            resource_state TEXT NOT NULL,
            received_at REAL NOT NULL,
            state TEXT NOT NULL,
            changes TEXT NOT NULL,  -- JSON list
            full_resync INTEGER NOT NULL,
            seq INTEGER UNIQUE,
            published_at REAL)""",
        # NULLs are distinct in a unique index, so poll notifications never collide.
        "CREATE UNIQUE INDEX notifications_message ON notifications (channel_id, message_number)",
        "CREATE INDEX notifications_calendar_seq ON notifications (calendar_id, seq)",
        "CREATE INDEX notifications_state ON notifications (state, id)",
        """CREATE TABLE deliveries (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            notification_id INTEGER NOT NULL,
            calendar_id TEXT NOT NULL,
            target_kind TEXT NOT NULL,
            target_token TEXT,
            state TEXT NOT NULL,
            attempts INTEGER NOT NULL,
            next_attempt_at REAL NOT NULL,
            last_error TEXT,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            lease_until REAL)""",
        "CREATE INDEX deliveries_notification ON deliveries (notification_id)",
        "CREATE INDEX deliveries_due ON deliveries (state, next_attempt_at)",
        "CREATE INDEX deliveries_calendar ON deliveries (calendar_id, state)",
    ]
    for statement in statements:
        await db.execute(statement)
    await db.executemany(
        "INSERT INTO meta (key, value) VALUES (?, ?)",
        [("store_epoch", uuid.uuid4().hex), ("seq", 0), ("purged_through_seq", 0)],
    )


async def _migration_2(db: aiosqlite.Connection) -> None:
    """Stopped channel ids remembered for a while, and the counts of both stop tables kept by
    triggers, so that a webhook for an unknown channel never counts rows."""
    statements = [
        """CREATE TABLE stopped_channels (
            channel_id TEXT PRIMARY KEY,
            until REAL NOT NULL) WITHOUT ROWID""",
        "CREATE INDEX stopped_channels_until ON stopped_channels (until)",
        "INSERT INTO meta (key, value) SELECT 'stops_queued', COUNT(*) FROM channel_stops",
        "INSERT INTO meta (key, value) VALUES ('stops_remembered', 0)",
        # An upsert that updates fires no INSERT trigger; ON CONFLICT DO NOTHING fires none.
        """CREATE TRIGGER channel_stops_insert AFTER INSERT ON channel_stops BEGIN
            UPDATE meta SET value = value + 1 WHERE key = 'stops_queued'; END""",
        """CREATE TRIGGER channel_stops_delete AFTER DELETE ON channel_stops BEGIN
            UPDATE meta SET value = value - 1 WHERE key = 'stops_queued'; END""",
        """CREATE TRIGGER stopped_channels_insert AFTER INSERT ON stopped_channels BEGIN
            UPDATE meta SET value = value + 1 WHERE key = 'stops_remembered'; END""",
        """CREATE TRIGGER stopped_channels_delete AFTER DELETE ON stopped_channels BEGIN
            UPDATE meta SET value = value - 1 WHERE key = 'stops_remembered'; END""",
    ]
    for statement in statements:
        await db.execute(statement)


async def _migration_3(db: aiosqlite.Connection) -> None:
    """The `leases` table, one row per held lease."""
    await db.execute(
        """CREATE TABLE leases (
            name TEXT PRIMARY KEY,
            holder TEXT NOT NULL,
            host TEXT NOT NULL,
            pid INTEGER NOT NULL,
            since REAL NOT NULL,
            until REAL NOT NULL) WITHOUT ROWID"""
    )


async def _migration_4(db: aiosqlite.Connection) -> None:
    """An index that covers the outbox's count by state and target kind (without
    it the count reads every delivery row: some 400 ms for a million, 56 ms with it)."""
    await db.execute("CREATE INDEX deliveries_state_kind ON deliveries (state, target_kind)")


# Applied in order, each in its own transaction; later changes append steps, never edit one.
MIGRATIONS: list[Migration] = [
    _migration_1,
    _migration_2,
    _migration_3,
    _migration_4,
]


async def migrate(db: aiosqlite.Connection, path: str) -> None:
    """Bring the file to the newest schema; StoreConfigError when it is newer than this code."""
    for version, step in enumerate(MIGRATIONS, start=1):
        # Read inside the transaction: another process may be migrating the same file.
        try:
            await db.execute("BEGIN IMMEDIATE")
            rows = list(await db.execute_fetchall("PRAGMA user_version"))
            current = int(rows[0][0]) if rows else 0
            if current > len(MIGRATIONS):
                raise StoreConfigError(
                    f"storage: {path} has schema version {current}, newer than this"
                    f" mrm-push knows ({len(MIGRATIONS)})"
                )
            if current < version:
                await step(db)
                # PRAGMA takes no parameters; `version` is our own int.
                await db.execute(f"PRAGMA user_version = {int(version)}")
            await db.execute("COMMIT")
        except BaseException:
            await db.rollback()
            raise
