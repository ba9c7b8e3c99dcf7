"""Watching a running SQLite store: the path still names the file we opened, writes still work.

Two failures SQLite itself never reports: the file deleted or replaced under a running service
(the open connection goes on writing to an unlinked inode, which a restart will not find), and a
full disk (each write fails, reads and `SELECT 1` still work). The store asks `FileIdentity`
before every call and tells `WriteHealth` of each failed write; `ping` reports both, and
while writes fail it tries a real one (`probe_writes`).
"""

from __future__ import annotations

import logging
import os
import sqlite3

import aiosqlite

from storage.base import StoreUnavailable

log = logging.getLogger(__name__)

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


async def bound_wal(db: aiosqlite.Connection) -> None:
    """At open: checkpoint every WAL_AUTOCHECKPOINT_PAGES, cut the WAL back to WAL_SIZE_LIMIT."""
    # PRAGMA takes no parameters; both values are our own ints.
    await db.execute(f"PRAGMA wal_autocheckpoint = {int(WAL_AUTOCHECKPOINT_PAGES)}")
    await db.execute(f"PRAGMA journal_size_limit = {int(WAL_SIZE_LIMIT)}")


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
