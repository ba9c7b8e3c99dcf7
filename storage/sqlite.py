"""The SQLite backend of the `Store` protocol: one file, WAL journal, a versioned schema."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sqlite3
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import aiosqlite

from storage import rules, sqlite_counts, sqlite_health, sqlite_lease, sqlite_outbox
from storage.base import (
    Channel,
    ChannelState,
    ChannelStop,
    Delivery,
    DeliveryState,
    DuplicateChannel,
    DuplicateNotification,
    Lease,
    Notification,
    NotificationSource,
    ResourceState,
    RetryableState,
    RetryOutcome,
    Room,
    StopOutcome,
    Store,
    StoreConfigError,
    StoreError,
    StoreUnavailable,
    Target,
    TargetKind,
)
from storage.sqlite_health import FileIdentity, WriteHealth
from storage.sqlite_outbox import delivery_from_row as _delivery

Params = Sequence[Any]
Migration = Callable[[aiosqlite.Connection], Awaitable[None]]

# Error codes that mean "try again later" rather than "this call is wrong".
_TRANSIENT_ERRORS = (
    "SQLITE_BUSY",
    "SQLITE_LOCKED",
    "SQLITE_IOERR",
    "SQLITE_CANTOPEN",
    "SQLITE_FULL",
)


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


# Applied in order, each in its own transaction; later changes append steps, never edit one.
MIGRATIONS: list[Migration] = [
    _migration_1,
    _migration_2,
    sqlite_lease.migration,
    sqlite_counts.migration,
]


def _store_error(exc: sqlite3.Error) -> StoreError:
    name = getattr(exc, "sqlite_errorname", "") or ""
    if name.startswith(_TRANSIENT_ERRORS):
        return StoreUnavailable(f"sqlite: {exc}")
    return StoreError(f"sqlite: {exc}")


def _time(value: float | None) -> float | None:
    # RETURNING hands back whole REAL values as ints (SQLite stores them so); keep floats.
    return None if value is None else float(value)


def _room(row: sqlite3.Row) -> Room:
    return Room(
        calendar_id=row["calendar_id"],
        name=row["name"],
        firebase_tokens=tuple(json.loads(row["firebase_tokens"])),
        created_at=float(row["created_at"]),
        updated_at=float(row["updated_at"]),
    )


def _channel(row: sqlite3.Row) -> Channel:
    return Channel(
        id=row["id"],
        calendar_id=row["calendar_id"],
        resource_id=row["resource_id"],
        token=row["token"],
        expiration=_time(row["expiration"]),
        state=row["state"],
        confirmed=bool(row["confirmed"]),
        last_message_number=row["last_message_number"],
        last_error=row["last_error"],
        created_at=float(row["created_at"]),
        updated_at=float(row["updated_at"]),
        attempts=row["attempts"],
        next_attempt_at=_time(row["next_attempt_at"]),
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


def _notification(row: sqlite3.Row, deliveries: Iterable[Delivery] = ()) -> Notification:
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
        published_at=_time(row["published_at"]),
        deliveries=tuple(deliveries),
    )


async def _all(db: aiosqlite.Connection, sql: str, params: Params = ()) -> list[sqlite3.Row]:
    return list(await db.execute_fetchall(sql, params))


async def _one(db: aiosqlite.Connection, sql: str, params: Params = ()) -> sqlite3.Row | None:
    rows = await _all(db, sql, params)
    return rows[0] if rows else None


async def _apply_token_change(
    db: aiosqlite.Connection, calendar_id: str, change: rules.TokenChange, now: float
) -> None:
    """The tombstones a change clears, and the deliveries it cancels: a token that left a room
    takes its non-final deliveries with it (contract 2)."""
    if change.clear_tombstones:
        await db.execute(
            "DELETE FROM tombstones WHERE calendar_id = ?"
            " AND token IN (SELECT value FROM json_each(?))",
            (calendar_id, json.dumps(change.clear_tombstones)),
        )
    if change.cancel:
        await db.execute(
            "UPDATE deliveries SET state = 'cancelled', lease_until = NULL, updated_at = ?"
            " WHERE calendar_id = ? AND state IN ('pending', 'in_flight')"
            " AND target_token IN (SELECT value FROM json_each(?))",
            (now, calendar_id, json.dumps(change.cancel)),
        )


async def _meta_count(db: aiosqlite.Connection, key: str) -> int:
    """A count the triggers of _migration_2 keep in `meta`."""
    row = await _one(db, "SELECT value FROM meta WHERE key = ?", (key,))
    return int(row[0]) if row is not None else 0


async def _with_deliveries(db: aiosqlite.Connection, rows: list[sqlite3.Row]) -> list[Notification]:
    if not rows:
        return []
    ids = [row["id"] for row in rows]
    found: dict[int, list[Delivery]] = {i: [] for i in ids}
    for drow in await _all(
        db,
        "SELECT * FROM deliveries WHERE notification_id IN (SELECT value FROM json_each(?))"
        " ORDER BY id",
        (json.dumps(ids),),
    ):
        found[drow["notification_id"]].append(_delivery(drow))
    return [_notification(row, found[row["id"]]) for row in rows]


class SqliteStore:
    """`Store` on one SQLite file. One connection; an asyncio lock keeps each call's statements
    together (aiosqlite runs them on its thread one by one, so without it another task's
    statement could land inside our transaction). Writes that take several statements run in
    BEGIN IMMEDIATE transactions, so other processes on the same file cannot interleave either.
    """

    def __init__(self, path: str, *, busy_timeout: float = 5.0) -> None:
        self.path = path
        self._busy_timeout = busy_timeout
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()
        self._epoch: str | None = None
        self._file = FileIdentity(os.path.abspath(path))
        self._writes = WriteHealth(path)

    # -- plumbing ----------------------------------------------------------------------------
    def _connection(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StoreUnavailable("sqlite: the store is not open")
        return self._db

    @asynccontextmanager
    async def _session(self) -> AsyncIterator[aiosqlite.Connection]:
        """The connection to ourselves, for reads and single-statement (autocommit) writes."""
        async with self._lock:
            db = self._connection()
            self._file.check()
            try:
                yield db
            except sqlite3.Error as exc:
                self._writes.failed(exc)
                raise _store_error(exc) from exc

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """One BEGIN IMMEDIATE transaction: takes the write lock first, so a read inside it
        cannot go stale before its write."""
        async with self._lock:
            db = self._connection()
            self._file.check()
            try:
                await db.execute("BEGIN IMMEDIATE")
                yield db
                await db.execute("COMMIT")
            except BaseException as exc:
                # Also on cancellation, even of the BEGIN itself: aiosqlite still runs what was
                # queued, and the ROLLBACK is queued after it before the lock is released, so
                # the next caller never starts inside our transaction. (No-op when none began.)
                try:
                    await db.rollback()
                except sqlite3.Error:
                    pass
                if isinstance(exc, sqlite3.Error):
                    self._writes.failed(exc)
                    raise _store_error(exc) from exc
                raise

    # -- lifecycle ---------------------------------------------------------------------------
    def _prepare_file(self) -> None:
        """Create the directory and the file ourselves, to report the OS's reason on failure
        (SQLite only says "unable to open database file"). Owner-only: it holds tokens."""
        parent = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as exc:
            raise StoreConfigError(
                f"storage: cannot create {self.path}: directory {parent}: {exc.strerror or exc}"
            ) from exc
        try:
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        except OSError as exc:
            raise StoreConfigError(
                f"storage: cannot create or open {self.path}: {exc.strerror or exc}"
            ) from exc

    async def open(self) -> None:
        if self._db is not None:
            return
        await asyncio.to_thread(self._prepare_file)
        try:
            db = await aiosqlite.connect(
                self.path, isolation_level=None, timeout=self._busy_timeout
            )
        except sqlite3.Error as exc:
            raise StoreConfigError(f"storage: cannot open {self.path}: {exc}") from exc
        try:
            db.row_factory = sqlite3.Row
            mode = await _one(db, "PRAGMA journal_mode = WAL")
            if mode is None or str(mode[0]).lower() != "wal":
                raise StoreConfigError(f"storage: {self.path}: cannot switch to WAL journal")
            # FULL: in WAL mode NORMAL may lose the last commits on power loss, and a webhook
            # answered 200 must stay stored; one fsync per commit is cheap at our write rate.
            await db.execute("PRAGMA synchronous = FULL")
            await sqlite_health.bound_wal(db)
            await self._migrate(db)
            # Prove we can write (a read-only file or directory opens fine and fails later).
            await db.execute("BEGIN IMMEDIATE")
            await db.execute("UPDATE meta SET value = value WHERE key = 'seq'")
            await db.execute("COMMIT")
            epoch = await _one(db, "SELECT value FROM meta WHERE key = 'store_epoch'")
        except BaseException as exc:
            await db.close()
            if isinstance(exc, sqlite3.Error):
                raise StoreConfigError(f"storage: cannot use {self.path}: {exc}") from exc
            raise
        assert epoch is not None
        self._epoch = str(epoch[0])
        self._file.remember()
        self._db = db

    async def _migrate(self, db: aiosqlite.Connection) -> None:
        for version, step in enumerate(MIGRATIONS, start=1):
            # Read inside the transaction: another process may be migrating the same file.
            try:
                await db.execute("BEGIN IMMEDIATE")
                row = await _one(db, "PRAGMA user_version")
                current = int(row[0]) if row is not None else 0
                if current > len(MIGRATIONS):
                    raise StoreConfigError(
                        f"storage: {self.path} has schema version {current}, newer than this"
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

    async def close(self) -> None:
        async with self._lock:
            if self._db is not None:
                db, self._db = self._db, None
                await db.close()

    async def ping(self) -> None:
        try:
            async with self._session() as db:
                await db.execute_fetchall("SELECT 1")
                if self._writes.failure is not None:
                    await sqlite_health.probe_writes(db, self._writes)
        except StoreError as exc:
            raise StoreUnavailable(str(exc)) from exc
        if self._writes.failure is not None:
            raise StoreUnavailable(self._writes.reason())

    async def maintain(self) -> None:
        async with self._session() as db:
            if self._writes.failure is not None:
                await sqlite_health.probe_writes(db, self._writes)
            else:
                await sqlite_health.checkpoint(db)

    # -- leases ------------------------------------------------------------------------------
    async def acquire_lease(self, lease: Lease, now: float) -> Lease:
        async with self._transaction() as db:
            return await sqlite_lease.acquire(db, lease, now)

    async def renew_lease(self, name: str, holder: str, until: float) -> Lease | None:
        async with self._transaction() as db:
            return await sqlite_lease.renew(db, name, holder, until)

    async def release_lease(self, name: str, holder: str) -> bool:
        async with self._session() as db:
            return await sqlite_lease.release(db, name, holder)

    async def get_lease(self, name: str) -> Lease | None:
        async with self._session() as db:
            return await sqlite_lease.get(db, name)

    async def store_epoch(self) -> str:
        self._connection()
        assert self._epoch is not None
        return self._epoch

    # -- rooms and tokens --------------------------------------------------------------------
    async def get_room(self, calendar_id: str) -> Room | None:
        async with self._session() as db:
            row = await _one(db, "SELECT * FROM rooms WHERE calendar_id = ?", (calendar_id,))
        return _room(row) if row is not None else None

    async def list_rooms(self) -> list[Room]:
        async with self._session() as db:
            rows = await _all(db, "SELECT * FROM rooms ORDER BY calendar_id")
        return [_room(row) for row in rows]

    async def put_room(
        self, calendar_id: str, name: str | None, firebase_tokens: list[str] | None, now: float
    ) -> tuple[Room, bool]:
        async with self._transaction() as db:
            old = await _one(db, "SELECT * FROM rooms WHERE calendar_id = ?", (calendar_id,))
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
                await _apply_token_change(db, calendar_id, change, now)
            row = await _one(db, "SELECT * FROM rooms WHERE calendar_id = ?", (calendar_id,))
        assert row is not None
        return _room(row), old is None

    async def add_tokens(
        self, calendar_id: str, tokens: list[str], now: float, *, respect_tombstones: bool
    ) -> tuple[Room, list[str]] | None:
        async with self._transaction() as db:
            row = await _one(db, "SELECT * FROM rooms WHERE calendar_id = ?", (calendar_id,))
            if row is None:
                return None
            await db.execute(
                "DELETE FROM tombstones WHERE calendar_id = ? AND until <= ?", (calendar_id, now)
            )
            buried = {
                r["token"]
                for r in await _all(
                    db, "SELECT token FROM tombstones WHERE calendar_id = ?", (calendar_id,)
                )
            }
            change = rules.add_tokens(
                json.loads(row["firebase_tokens"]),
                tokens,
                buried,
                respect_tombstones=respect_tombstones,
            )
            await _apply_token_change(db, calendar_id, change, now)
            if change.changed:
                await db.execute(
                    "UPDATE rooms SET firebase_tokens = ?, updated_at = ? WHERE calendar_id = ?",
                    (json.dumps(change.tokens), now, calendar_id),
                )
                row = await _one(db, "SELECT * FROM rooms WHERE calendar_id = ?", (calendar_id,))
                assert row is not None
        return _room(row), change.added

    async def _drop_token(
        self, db: aiosqlite.Connection, calendar_id: str, token: str, now: float
    ) -> tuple[bool, bool]:
        """Take the token out of the room's set and cancel its deliveries; returns (whether
        the room exists, whether the token was in its set)."""
        row = await _one(
            db, "SELECT firebase_tokens FROM rooms WHERE calendar_id = ?", (calendar_id,)
        )
        change = rules.remove_token(
            [] if row is None else json.loads(row["firebase_tokens"]), token
        )
        if change.changed:
            await db.execute(
                "UPDATE rooms SET firebase_tokens = ?, updated_at = ? WHERE calendar_id = ?",
                (json.dumps(change.tokens), now, calendar_id),
            )
        await _apply_token_change(db, calendar_id, change, now)
        return row is not None, change.changed

    async def remove_token(self, calendar_id: str, token: str, now: float) -> bool:
        async with self._transaction() as db:
            _, removed = await self._drop_token(db, calendar_id, token, now)
            return removed

    async def tombstone_token(self, calendar_id: str, token: str, until: float, now: float) -> bool:
        async with self._transaction() as db:
            exists, was_there = await self._drop_token(db, calendar_id, token, now)
            if exists:
                await db.execute(
                    "INSERT INTO tombstones (calendar_id, token, until) VALUES (?, ?, ?)"
                    " ON CONFLICT (calendar_id, token) DO UPDATE SET until = excluded.until",
                    (calendar_id, token, until),
                )
        return was_there

    async def tombstoned_tokens(self, calendar_id: str, now: float) -> set[str]:
        async with self._session() as db:
            rows = await _all(
                db,
                "SELECT token FROM tombstones WHERE calendar_id = ? AND until > ?",
                (calendar_id, now),
            )
        return {row["token"] for row in rows}

    async def delete_room(self, calendar_id: str) -> bool:
        async with self._transaction() as db:
            cursor = await db.execute("DELETE FROM rooms WHERE calendar_id = ?", (calendar_id,))
            existed = cursor.rowcount > 0
            await db.execute("DELETE FROM tombstones WHERE calendar_id = ?", (calendar_id,))
            await db.execute("DELETE FROM sync_tokens WHERE calendar_id = ?", (calendar_id,))
            await db.execute(
                "UPDATE deliveries SET state = 'cancelled', lease_until = NULL"
                " WHERE calendar_id = ? AND state IN ('pending', 'in_flight')",
                (calendar_id,),
            )
        return existed

    # -- channels ----------------------------------------------------------------------------
    async def insert_channel(self, channel: Channel) -> None:
        values = dataclasses.asdict(channel)
        values["confirmed"] = int(channel.confirmed)
        columns = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        async with self._session() as db:
            try:
                # Column names come from the Channel dataclass, not from input.
                await db.execute(
                    f"INSERT INTO channels ({columns}) VALUES ({marks})",  # noqa: S608
                    list(values.values()),
                )
            except sqlite3.IntegrityError as exc:
                raise DuplicateChannel(f"channel {channel.id} is stored already") from exc

    async def get_channel(self, channel_id: str) -> Channel | None:
        async with self._session() as db:
            row = await _one(db, "SELECT * FROM channels WHERE id = ?", (channel_id,))
        return _channel(row) if row is not None else None

    async def list_channels(
        self,
        calendar_id: str | None = None,
        states: tuple[ChannelState, ...] | None = None,
        expiring_before: float | None = None,
    ) -> list[Channel]:
        where = ["1"]
        params: list[Any] = []
        if calendar_id is not None:
            where.append("calendar_id = ?")
            params.append(calendar_id)
        if states is not None:
            where.append("state IN (SELECT value FROM json_each(?))")
            params.append(json.dumps(list(states)))
        if expiring_before is not None:
            where.append("expiration IS NOT NULL AND expiration < ?")
            params.append(expiring_before)
        # Only our own fixed fragments are pasted; every value is a parameter.
        sql = f"SELECT * FROM channels WHERE {' AND '.join(where)} ORDER BY created_at, id"  # noqa: S608
        async with self._session() as db:
            rows = await _all(db, sql, params)
        return [_channel(row) for row in rows]

    async def update_channel(self, channel_id: str, now: float, **fields: Any) -> Channel | None:
        values = rules.channel_update(fields)
        if "confirmed" in values:
            values["confirmed"] = int(bool(values["confirmed"]))
        values["updated_at"] = now
        assignments = ", ".join(f"{name} = ?" for name in values)
        async with self._session() as db:
            # Column names are checked against the Channel fields above.
            rows = await _all(
                db,
                f"UPDATE channels SET {assignments} WHERE id = ? RETURNING *",  # noqa: S608
                [*values.values(), channel_id],
            )
        return _channel(rows[0]) if rows else None

    async def confirm_channel(
        self, channel_id: str, resource_id: str, now: float
    ) -> Channel | None:
        async with self._session() as db:
            row = await _one(
                db,
                "UPDATE channels SET confirmed = 1, updated_at = ?,"
                " resource_id = CASE WHEN resource_id = '' THEN ? ELSE resource_id END"
                " WHERE id = ? RETURNING *",
                (now, resource_id, channel_id),
            )
        return _channel(row) if row is not None else None

    async def advance_message_number(self, channel_id: str, message_number: int) -> bool:
        async with self._session() as db:
            cursor = await db.execute(
                "UPDATE channels SET last_message_number = ?"
                " WHERE id = ? AND last_message_number < ?",
                (message_number, channel_id, message_number),
            )
            return cursor.rowcount > 0

    async def delete_channel(self, channel_id: str) -> bool:
        async with self._session() as db:
            cursor = await db.execute("DELETE FROM channels WHERE id = ?", (channel_id,))
            return cursor.rowcount > 0

    # -- channel stops -----------------------------------------------------------------------
    async def enqueue_stop(
        self, channel_id: str, resource_id: str, calendar_id: str | None, now: float
    ) -> bool:
        async with self._session() as db:
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
        async with self._transaction() as db:
            remembered = await _one(
                db, "SELECT until FROM stopped_channels WHERE channel_id = ?", (channel_id,)
            )
            if remembered is not None and remembered["until"] > now:
                return "known"
            queued = await _one(
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
        return await self._meta_int("stops_queued")

    async def finish_stop(
        self, channel_id: str, remember_until: float, now: float, max_remembered: int
    ) -> None:
        async with self._transaction() as db:
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

    async def due_stops(self, now: float, limit: int = 100) -> list[ChannelStop]:
        async with self._session() as db:
            rows = await _all(
                db,
                "SELECT * FROM channel_stops WHERE next_attempt_at <= ?"
                " ORDER BY next_attempt_at, created_at, channel_id LIMIT ?",
                (now, max(limit, 0)),
            )
        return [_stop(row) for row in rows]

    async def list_stops(self) -> list[ChannelStop]:
        async with self._session() as db:
            rows = await _all(db, "SELECT * FROM channel_stops ORDER BY created_at, channel_id")
        return [_stop(row) for row in rows]

    async def reschedule_stop(
        self, channel_id: str, next_attempt_at: float, last_error: str
    ) -> None:
        async with self._session() as db:
            await db.execute(
                "UPDATE channel_stops SET attempts = attempts + 1, next_attempt_at = ?,"
                " last_error = ? WHERE channel_id = ?",
                (next_attempt_at, last_error, channel_id),
            )

    async def remove_stop(self, channel_id: str) -> None:
        async with self._session() as db:
            await db.execute("DELETE FROM channel_stops WHERE channel_id = ?", (channel_id,))

    # -- sync tokens -------------------------------------------------------------------------
    async def get_sync_token(self, calendar_id: str) -> str | None:
        async with self._session() as db:
            row = await _one(
                db, "SELECT sync_token FROM sync_tokens WHERE calendar_id = ?", (calendar_id,)
            )
        return row["sync_token"] if row is not None else None

    async def set_sync_token(self, calendar_id: str, sync_token: str | None) -> None:
        async with self._session() as db:
            if sync_token is None:
                await db.execute("DELETE FROM sync_tokens WHERE calendar_id = ?", (calendar_id,))
            else:
                await db.execute(
                    "INSERT INTO sync_tokens (calendar_id, sync_token) VALUES (?, ?)"
                    " ON CONFLICT (calendar_id) DO UPDATE SET sync_token = excluded.sync_token",
                    (calendar_id, sync_token),
                )

    # -- notifications -----------------------------------------------------------------------
    async def add_notification(
        self,
        calendar_id: str,
        source: NotificationSource,
        resource_state: ResourceState,
        received_at: float,
        channel_id: str | None = None,
        message_number: int | None = None,
    ) -> Notification:
        async with self._transaction() as db:
            try:
                row = await _one(
                    db,
                    "INSERT INTO notifications (calendar_id, source, channel_id, message_number,"
                    " resource_state, received_at, state, changes, full_resync)"
                    " VALUES (?, ?, ?, ?, ?, ?, 'received', '[]', 0) RETURNING *",
                    (calendar_id, source, channel_id, message_number, resource_state, received_at),
                )
            except sqlite3.IntegrityError as exc:
                raise DuplicateNotification(
                    f"notification {message_number} of channel {channel_id} is stored already"
                ) from exc
            if channel_id is not None and message_number is not None:
                await db.execute(
                    "UPDATE channels SET last_message_number = ?"
                    " WHERE id = ? AND last_message_number < ?",
                    (message_number, channel_id, message_number),
                )
        assert row is not None
        return _notification(row)

    async def get_notification(self, notification_id: int) -> Notification | None:
        async with self._session() as db:
            rows = await _all(db, "SELECT * FROM notifications WHERE id = ?", (notification_id,))
            found = await _with_deliveries(db, rows)
        return found[0] if found else None

    async def received_notifications(
        self, limit: int = 1000, calendar_id: str | None = None
    ) -> list[Notification]:
        where = "state = 'received'"
        args: tuple[str, ...] = ()
        if calendar_id is not None:
            where, args = "state = 'received' AND calendar_id = ?", (calendar_id,)
        async with self._session() as db:
            rows = await _all(
                db,
                f"SELECT * FROM notifications WHERE {where} ORDER BY id LIMIT ?",  # noqa: S608
                (*args, max(limit, 0)),
            )
            return await _with_deliveries(db, rows)

    async def publish_notification(
        self,
        notification_id: int,
        changes: list[dict[str, Any]],
        full_resync: bool,
        targets: list[Target],
        now: float,
    ) -> Notification:
        # One transaction: the counter, the seq and the deliveries commit together, and commits
        # are serialised, so seq N is never visible before seq N-1.
        async with self._transaction() as db:
            row = await _one(db, "SELECT * FROM notifications WHERE id = ?", (notification_id,))
            if row is None:
                raise StoreError(f"notification {notification_id} is not stored")
            if row["state"] == "received":
                seq_row = await _one(
                    db, "UPDATE meta SET value = value + 1 WHERE key = 'seq' RETURNING value"
                )
                assert seq_row is not None
                await db.execute(
                    "UPDATE notifications SET state = 'published', seq = ?, changes = ?,"
                    " full_resync = ?, published_at = ? WHERE id = ?",
                    (seq_row[0], json.dumps(changes), int(full_resync), now, notification_id),
                )
                await db.executemany(
                    "INSERT INTO deliveries (notification_id, calendar_id, target_kind,"
                    " target_token, state, attempts, next_attempt_at, created_at, updated_at)"
                    " VALUES (?, ?, ?, ?, 'pending', 0, ?, ?, ?)",
                    [
                        (notification_id, row["calendar_id"], t.kind, t.token, now, now, now)
                        for t in targets
                    ],
                )
                row = await _one(db, "SELECT * FROM notifications WHERE id = ?", (notification_id,))
                assert row is not None
            (published,) = await _with_deliveries(db, [row])
        return published

    async def skip_notification(self, notification_id: int, now: float) -> None:
        async with self._session() as db:
            await db.execute(
                "UPDATE notifications SET state = 'skipped' WHERE id = ? AND state = 'received'",
                (notification_id,),
            )

    async def list_notifications(
        self,
        calendar_id: str | None = None,
        calendar_ids: list[str] | None = None,
        after: int | None = None,
        up_to: int | None = None,
        limit: int = 100,
        include_unpublished: bool = False,
    ) -> list[Notification]:
        key = "id" if include_unpublished else "seq"
        where = ["1"] if include_unpublished else ["state = 'published'"]
        params: list[Any] = []
        if calendar_id is not None:
            where.append("calendar_id = ?")
            params.append(calendar_id)
        if calendar_ids is not None:
            where.append("calendar_id IN (SELECT value FROM json_each(?))")
            params.append(json.dumps(calendar_ids))
        if after is not None:
            where.append(f"{key} > ?")
            params.append(after)
        if up_to is not None:
            where.append(f"{key} <= ?")
            params.append(up_to)
        params.append(max(limit, 0))
        # Only our own fixed fragments are pasted; every value is a parameter.
        sql = f"SELECT * FROM notifications WHERE {' AND '.join(where)} ORDER BY {key} LIMIT ?"  # noqa: S608
        async with self._session() as db:
            rows = await _all(db, sql, params)
            return await _with_deliveries(db, rows)

    async def _meta_int(self, key: str) -> int:
        async with self._session() as db:
            row = await _one(db, "SELECT value FROM meta WHERE key = ?", (key,))
        return int(row[0]) if row is not None else 0

    async def last_seq(self) -> int:
        async with self._session() as db:
            row = await _one(
                db,
                "SELECT max(coalesce((SELECT max(seq) FROM notifications), 0),"
                " (SELECT value FROM meta WHERE key = 'purged_through_seq'))",
            )
        return int(row[0]) if row is not None else 0

    async def purge_notifications(self, published_before: float, received_before: float) -> int:
        async with self._transaction() as db:
            # Narrowed by the rule's own terms (indexed); rules.purge_plan decides.
            rows = await _all(
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
                    r["id"], r["state"], r["seq"], _time(r["published_at"]), r["received_at"]
                )
                for r in rows
            ]
            found = await _all(
                db,
                "SELECT notification_id, state, updated_at FROM deliveries"
                " WHERE notification_id IN (SELECT value FROM json_each(?))",
                (json.dumps([c.id for c in candidates]),),
            )
            going, top = rules.purge_plan(
                candidates, [tuple(r) for r in found], published_before, received_before
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
        return await self._meta_int("purged_through_seq")

    # -- delivery outbox ---------------------------------------------------------------------
    async def claim_deliveries(
        self, now: float, lease_until: float, limit: int = 100, kind: TargetKind | None = None
    ) -> list[Delivery]:
        # One statement, hence atomic even against another process on the same file.
        async with self._session() as db:
            rows = await _all(
                db,
                "UPDATE deliveries SET state = 'in_flight', lease_until = ?, updated_at = ?"
                " WHERE id IN (SELECT id FROM deliveries"
                " WHERE ((state = 'pending' AND next_attempt_at <= ?)"
                " OR (state = 'in_flight' AND lease_until <= ?))"
                " AND (? IS NULL OR target_kind = ?)"
                " ORDER BY next_attempt_at, id LIMIT ?) RETURNING *",
                (lease_until, now, now, now, kind, kind, max(limit, 0)),
            )
        # RETURNING gives no order; next_attempt_at is untouched by the claim, so sort again.
        claimed = [_delivery(row) for row in rows]
        claimed.sort(key=lambda d: (d.next_attempt_at, d.id))
        return claimed

    async def release_claims(self) -> int:
        async with self._session() as db:
            cursor = await db.execute(
                "UPDATE deliveries SET state = 'pending', lease_until = NULL"
                " WHERE state = 'in_flight'"
            )
            return cursor.rowcount

    async def finish_delivery(
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
        async with self._transaction() as db:
            await db.execute(
                "UPDATE deliveries SET state = ?, updated_at = ?, lease_until = NULL,"
                " attempts = coalesce(?, attempts),"
                " next_attempt_at = coalesce(?, next_attempt_at),"
                " last_error = coalesce(?, last_error)"
                " WHERE id = ? AND state NOT IN ('cancelled', 'expired')",
                (state, now, attempts, next_attempt_at, last_error, delivery_id),
            )
            row = await _one(db, "SELECT * FROM deliveries WHERE id = ?", (delivery_id,))
        return _delivery(row) if row is not None else None

    async def cancel_deliveries(self, calendar_id: str, token: str | None = None) -> int:
        sql = (
            "UPDATE deliveries SET state = 'cancelled', lease_until = NULL"
            " WHERE calendar_id = ? AND state IN ('pending', 'in_flight')"
        )
        params: list[Any] = [calendar_id]
        if token is not None:
            sql += " AND target_token = ?"
            params.append(token)
        async with self._session() as db:
            cursor = await db.execute(sql, params)
            return cursor.rowcount

    async def expire_deliveries(self, created_before: float, now: float) -> int:
        async with self._session() as db:
            cursor = await db.execute(
                "UPDATE deliveries SET state = 'expired', lease_until = NULL, updated_at = ?"
                " WHERE created_at < ? AND (state = 'pending'"
                " OR (state = 'in_flight' AND lease_until <= ?))",
                (now, created_before, now),
            )
            return cursor.rowcount

    async def next_delivery_due(self, kind: TargetKind | None = None) -> float | None:
        async with self._session() as db:
            # min() as an aggregate skips NULLs: either side may have nothing waiting.
            row = await _one(
                db,
                "SELECT min(due) FROM (SELECT min(next_attempt_at) AS due FROM deliveries"
                " WHERE state = 'pending' AND (?1 IS NULL OR target_kind = ?1)"
                " UNION ALL SELECT min(lease_until) FROM deliveries"
                " WHERE state = 'in_flight' AND (?1 IS NULL OR target_kind = ?1))",
                (kind,),
            )
        return float(row[0]) if row is not None and row[0] is not None else None

    async def count_deliveries(self, state: DeliveryState | None = None) -> int:
        async with self._session() as db:
            if state is None:
                row = await _one(db, "SELECT count(*) FROM deliveries")
            else:
                row = await _one(db, "SELECT count(*) FROM deliveries WHERE state = ?", (state,))
        return int(row[0]) if row is not None else 0

    # -- the outbox for operators (storage/sqlite_outbox.py) ---------------------------------
    async def list_deliveries(
        self,
        state: DeliveryState | None = None,
        calendar_id: str | None = None,
        before: int | None = None,
        limit: int = 100,
    ) -> list[Delivery]:
        async with self._session() as db:
            return await sqlite_outbox.page(db, state, calendar_id, before, limit)

    async def delivery_counts(
        self, calendar_id: str | None = None
    ) -> dict[tuple[DeliveryState, TargetKind], int]:
        async with self._session() as db:
            if calendar_id is None:  # the metrics' count: covered by deliveries_state_kind
                return await sqlite_counts.delivery_counts(db)
            return await sqlite_outbox.counts(db, calendar_id)

    async def retry_deliveries(
        self,
        now: float,
        *,
        ids: list[int] | None = None,
        state: RetryableState | None = None,
    ) -> RetryOutcome:
        rules.check_retry(ids, state)
        async with self._transaction() as db:
            return await sqlite_outbox.retry(db, now, ids, state)

    # -- counts for the metrics (storage/sqlite_counts.py) -----------------------------------
    async def count_unsynced_notifications(self) -> int:
        async with self._session() as db:
            return await sqlite_counts.count_unsynced_notifications(db)

    async def channel_counts(self) -> dict[ChannelState, int]:
        async with self._session() as db:
            return await sqlite_counts.channel_counts(db)

    async def count_rooms_without_channel(self, now: float) -> int:
        async with self._session() as db:
            return await sqlite_counts.count_rooms_without_channel(db, now)

    async def soonest_channel_expiry(self) -> float | None:
        async with self._session() as db:
            return await sqlite_counts.soonest_channel_expiry(db)


if TYPE_CHECKING:  # mypy proves the class satisfies the protocol
    _store: Store = SqliteStore("")
