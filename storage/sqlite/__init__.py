"""The SQLite backend of the `Store`: one file, WAL journal, a versioned schema (migrations.py).

One module per repository (rooms, channels, notifications, outbox, meta), all on one
`Connection` (connection.py), which also watches the file's health; the webhook's own traffic
(its channel lookup and the group commit of new notifications) on a second one beside it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from storage.sqlite.channels import SqliteChannels
from storage.sqlite.connection import Connection
from storage.sqlite.meta import SqliteMeta
from storage.sqlite.migrations import MIGRATIONS
from storage.sqlite.notifications import SqliteNotifications
from storage.sqlite.outbox import SqliteOutbox
from storage.sqlite.rooms import SqliteRooms

if TYPE_CHECKING:
    from storage.protocols import Store

__all__ = ["MIGRATIONS", "SqliteStore"]


class SqliteStore:
    """`Store` on one SQLite file."""

    def __init__(self, path: str, *, busy_timeout: float = 5.0) -> None:
        self.path = path
        self._conn = Connection(path, busy_timeout)
        # Webhooks wait for nothing of the pipeline's (syncs, publications, deliveries), whose
        # calls queue on the first connection: only SQLite's own write lock is shared, and it
        # is held for one transaction at a time.
        self._ingest = Connection(path, busy_timeout, beside=self._conn)
        self._rooms = SqliteRooms(self._conn)
        self._channels = SqliteChannels(self._conn, reads=self._ingest)
        self._notifications = SqliteNotifications(self._conn, ingest=self._ingest)
        self._outbox = SqliteOutbox(self._conn)
        self._meta = SqliteMeta(self._conn)

    @property
    def rooms(self) -> SqliteRooms:
        return self._rooms

    @property
    def channels(self) -> SqliteChannels:
        return self._channels

    @property
    def notifications(self) -> SqliteNotifications:
        return self._notifications

    @property
    def outbox(self) -> SqliteOutbox:
        return self._outbox

    @property
    def meta(self) -> SqliteMeta:
        return self._meta

    @property
    def connection(self) -> Connection:
        """The connection the repositories share (for tests and tools that look inside)."""
        return self._conn

    async def open(self) -> None:
        await self._conn.open()
        try:
            await self._ingest.open()
        except BaseException:
            await self._conn.close()
            raise

    async def close(self) -> None:
        await self._ingest.close()
        await self._conn.close()

    async def ping(self) -> None:
        await self._conn.ping()

    async def maintain(self) -> None:
        await self._conn.maintain()


if TYPE_CHECKING:  # mypy proves the class satisfies the protocol
    _store: Store = SqliteStore("")
