"""The SQLite store's one connection: sessions and transactions, opening the file, its health.

Two failures SQLite itself never reports are watched here: the file deleted or replaced under a
running service (the open connection goes on writing to an unlinked inode, which a restart will
not find), and a full disk (each write fails, reads and `SELECT 1` still work). `FileIdentity`
is asked before every call and `WriteHealth` told of each failed write; `ping` reports both, and
while writes fail it tries a real one (`probe_writes`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar, cast

import aiosqlite

from storage.base import StoreConfigError, StoreError, StoreUnavailable
from storage.sqlite.migrations import migrate

log = logging.getLogger(__name__)

Params = Sequence[Any]
T = TypeVar("T")

# Error codes that mean "try again later" rather than "this call is wrong".
_TRANSIENT_ERRORS = (
    "SQLITE_BUSY",
    "SQLITE_LOCKED",
    "SQLITE_IOERR",
    "SQLITE_CANTOPEN",
    "SQLITE_FULL",
)
# What a failed write looks like: the disk (full, I/O error), the file (read-only, cannot be
# opened, corrupt). Contention (SQLITE_BUSY, SQLITE_LOCKED) and constraint errors are not it.
_WRITE_FAILURES = (
    "SQLITE_FULL",
    "SQLITE_IOERR",
    "SQLITE_READONLY",
    "SQLITE_CANTOPEN",
    "SQLITE_CORRUPT",
)

# The WAL is kept small: a checkpoint after this many pages (SQLite's default is 1000, ~4 MB,
# which a small disk may never reach: the WAL then grows until the disk is full), and the file
# cut back to WAL_SIZE_LIMIT after one. A checkpoint costs about two fsyncs per this many
# commits, each of which costs one already.
WAL_AUTOCHECKPOINT_PAGES = 256
WAL_SIZE_LIMIT = 1024 * 1024  # bytes
# What a probe writes while writes fail: the room a few notifications need, not just one page.
PROBE_BYTES = 64 * 1024


def store_error(exc: sqlite3.Error) -> StoreError:
    name = getattr(exc, "sqlite_errorname", "") or ""
    if name.startswith(_TRANSIENT_ERRORS):
        return StoreUnavailable(f"sqlite: {exc}")
    return StoreError(f"sqlite: {exc}")


def as_time(value: float | None) -> float | None:
    # RETURNING hands back whole REAL values as ints (SQLite stores them so); keep floats.
    return None if value is None else float(value)


async def fetch_all(db: aiosqlite.Connection, sql: str, params: Params = ()) -> list[sqlite3.Row]:
    return list(await db.execute_fetchall(sql, params))


async def fetch_one(db: aiosqlite.Connection, sql: str, params: Params = ()) -> sqlite3.Row | None:
    rows = await fetch_all(db, sql, params)
    return rows[0] if rows else None


def in_transaction(db: sqlite3.Connection, body: Callable[..., T], *args: Any) -> T:
    """On aiosqlite's thread (`Connection.in_thread`): `body(db, *args)` in one BEGIN IMMEDIATE
    transaction, committed when it returns and rolled back when it raises."""
    db.execute("BEGIN IMMEDIATE")
    try:
        result = body(db, *args)
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.rollback()
        raise
    return result


def _identity(path: str) -> tuple[int, int]:
    found = os.stat(path)
    return found.st_dev, found.st_ino


class FileIdentity:
    """The device and inode of the file opened at start, compared with what the path names."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._opened: tuple[int, int] | None = None
        self.problem: str | None = None

    def remember(self) -> None:
        """Called once the connection is open: this is the file the store writes to."""
        self._opened = _identity(self.path)
        self.problem = None

    def check(self) -> None:
        """Raise StoreUnavailable while the path no longer names the opened file; log an ERROR
        once when that starts and an INFO line if it ends (the file moved back)."""
        if self._opened is None:
            return
        problem: str | None
        try:
            now = _identity(self.path)
        except FileNotFoundError:
            problem = "was deleted"
        except OSError as exc:
            problem = f"cannot be looked at ({exc.strerror or exc})"
        else:
            problem = None if now == self._opened else "was replaced by another file"
        if problem is None:
            if self.problem is not None:
                log.info("storage_file_back", extra={"path": self.path})
                self.problem = None
            return
        reason = (
            f"sqlite: {self.path} {problem} while in use; the store refuses every call"
            " until that file is back at its path, or the service is restarted"
        )
        if problem != self.problem:
            log.error("storage_file_gone", extra={"path": self.path, "reason": reason})
            self.problem = problem
        raise StoreUnavailable(reason)


class WriteHealth:
    """A write failure, remembered until a probe write with room to spare works again.

    Ordinary writes that happen to fit meanwhile (SQLite reuses what the WAL holds already) do
    not end it: on a disk at its edge readiness would flap with each one."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.failure: str | None = None

    def failed(self, exc: sqlite3.Error) -> None:
        name = getattr(exc, "sqlite_errorname", "") or ""
        if not name.startswith(_WRITE_FAILURES):
            return
        if self.failure is None:
            log.error("storage_writes_failing", extra={"path": self.path, "reason": str(exc)})
        self.failure = str(exc)

    def recovered(self) -> None:
        log.warning("storage_writes_recovered", extra={"path": self.path})
        self.failure = None

    def reason(self) -> str:
        return f"sqlite: the last write to {self.path} failed: {self.failure}"


async def checkpoint(db: aiosqlite.Connection) -> None:
    """Copy the WAL into the database and truncate it to nothing. When a reader (a backup)
    holds an older snapshot SQLite does what it can; the next call does the rest."""
    await db.execute_fetchall("PRAGMA wal_checkpoint(TRUNCATE)")


async def probe_writes(db: aiosqlite.Connection, writes: WriteHealth) -> None:
    """While writes fail: a checkpoint (it may give the WAL's space back), then one real write
    of PROBE_BYTES in its own transaction. If it commits, the failure is over, and the WAL is
    truncated at once: it would otherwise go on growing from where the failure left it until
    the disk is full again. Never raises; `writes` learns how it went."""
    try:
        await checkpoint(db)
    except sqlite3.Error:
        pass  # the write below says whether the disk takes writes
    try:
        await db.execute("BEGIN IMMEDIATE")
        await db.execute(
            "INSERT INTO meta (key, value) VALUES ('write_probe', zeroblob(?))"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (PROBE_BYTES,),
        )
        await db.execute("COMMIT")
    except sqlite3.Error as exc:
        writes.failed(exc)
        try:
            await db.rollback()
        except sqlite3.Error:
            pass
        return
    writes.recovered()
    try:
        await checkpoint(db)
    except sqlite3.Error as exc:  # the periodic one tries again
        log.warning("storage_checkpoint_failed", extra={"path": writes.path, "reason": str(exc)})


class Connection:
    """One connection to one file, shared by the store's repositories. An asyncio lock keeps
    each call's statements together (aiosqlite runs them on its thread one by one, so without
    it another task's statement could land inside our transaction). Writes that take several
    statements run in BEGIN IMMEDIATE transactions, so other processes on the same file cannot
    interleave either; a repository may write another aggregate's tables in its transaction
    (a token leaving a room cancels its deliveries in the same step)."""

    def __init__(self, path: str, busy_timeout: float, *, beside: Connection | None = None) -> None:
        """`beside`: a second connection to the file that `beside` opens (and migrates) first,
        sharing its watch on the file and on failed writes."""
        self.path = path
        self._busy_timeout = busy_timeout
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()
        self._primary = beside is None
        self._file: FileIdentity = (
            FileIdentity(os.path.abspath(path)) if beside is None else beside._file
        )
        self._writes: WriteHealth = WriteHealth(path) if beside is None else beside._writes

    def connection(self) -> aiosqlite.Connection:
        """The open connection; StoreUnavailable while the store is not open."""
        if self._db is None:
            raise StoreUnavailable("sqlite: the store is not open")
        return self._db

    @asynccontextmanager
    async def session(self) -> AsyncIterator[aiosqlite.Connection]:
        """The connection to ourselves, for reads and single-statement (autocommit) writes."""
        async with self._lock:
            db = self.connection()
            self._file.check()
            try:
                yield db
            except sqlite3.Error as exc:
                self._writes.failed(exc)
                raise store_error(exc) from exc

    async def in_thread(self, function: Callable[..., T], *args: Any) -> T:
        """`function(connection, *args)` run on aiosqlite's thread as one call: one hop there
        and back instead of one per statement. It must finish its own transaction (commit or
        roll back) before it returns or raises: if the caller is cancelled, the lock is free
        while it still runs, and the next call's statements queue behind it."""
        async with self._lock:
            db = self.connection()
            self._file.check()
            try:
                # aiosqlite's own queue-a-function entry (Connection._execute, present through
                # 0.22): the statement methods are built on it.
                result: T = await cast(Any, db)._execute(function, cast(Any, db)._conn, *args)
            except sqlite3.Error as exc:
                self._writes.failed(exc)
                raise store_error(exc) from exc
            return result

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """One BEGIN IMMEDIATE transaction: takes the write lock first, so a read inside it
        cannot go stale before its write."""
        async with self._lock:
            db = self.connection()
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
                    raise store_error(exc) from exc
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
        if self._primary:
            # Never beside an open connection: closing any descriptor of the file drops every
            # POSIX lock this process holds on it, and another process closing its last
            # connection would then take ours for gone and delete the WAL under us.
            await asyncio.to_thread(self._prepare_file)
        try:
            db = await aiosqlite.connect(
                self.path, isolation_level=None, timeout=self._busy_timeout
            )
        except sqlite3.Error as exc:
            raise StoreConfigError(f"storage: cannot open {self.path}: {exc}") from exc
        try:
            db.row_factory = sqlite3.Row
            mode = await fetch_one(db, "PRAGMA journal_mode = WAL")
            if mode is None or str(mode[0]).lower() != "wal":
                raise StoreConfigError(f"storage: {self.path}: cannot switch to WAL journal")
            # FULL: in WAL mode NORMAL may lose the last commits on power loss, and a webhook
            # answered 200 must stay stored; one fsync per commit is cheap at our write rate.
            await db.execute("PRAGMA synchronous = FULL")
            # PRAGMA takes no parameters; both values are our own ints.
            await db.execute(f"PRAGMA wal_autocheckpoint = {int(WAL_AUTOCHECKPOINT_PAGES)}")
            await db.execute(f"PRAGMA journal_size_limit = {int(WAL_SIZE_LIMIT)}")
            if self._primary:
                await migrate(db, self.path)
                # Prove we can write (a read-only file or directory opens fine, fails later).
                await db.execute("BEGIN IMMEDIATE")
                await db.execute("UPDATE meta SET value = value WHERE key = 'seq'")
                await db.execute("COMMIT")
        except BaseException as exc:
            await db.close()
            if isinstance(exc, sqlite3.Error):
                raise StoreConfigError(f"storage: cannot use {self.path}: {exc}") from exc
            raise
        self._file.remember()
        self._db = db

    async def close(self) -> None:
        async with self._lock:
            if self._db is not None:
                db, self._db = self._db, None
                await db.close()

    async def ping(self) -> None:
        try:
            async with self.session() as db:
                await db.execute_fetchall("SELECT 1")
                if self._writes.failure is not None:
                    await probe_writes(db, self._writes)
        except StoreError as exc:
            raise StoreUnavailable(str(exc)) from exc
        if self._writes.failure is not None:
            raise StoreUnavailable(self._writes.reason())

    async def maintain(self) -> None:
        async with self.session() as db:
            if self._writes.failure is not None:
                await probe_writes(db, self._writes)
            else:
                await checkpoint(db)
