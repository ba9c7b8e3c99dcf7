"""The MongoDB backend of the `Store` (motor or pymongo's async client).

A versioned schema (migrations.py) and one module per repository (rooms, channels,
notifications, outbox, meta), all on one `MongoConnection` (connection.py).

Collections: `rooms`, `sync_tokens`, `channels`, `stops`, `stopped`, `notifications`,
`deliveries`, `counters` (the id counters), `leases` and `meta` (the store epoch, the purge mark,
the schema version). Times are stored as the floats given, so they round-trip exactly.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from storage.base import StoreUnavailable
from storage.mongo.channels import MongoChannels
from storage.mongo.connection import MongoConnection
from storage.mongo.driver import close_client, database_name, make_client
from storage.mongo.meta import MongoMeta
from storage.mongo.notifications import MongoNotifications
from storage.mongo.outbox import MongoOutbox
from storage.mongo.rooms import MongoRooms

if TYPE_CHECKING:
    from storage.protocols import Store

__all__ = ["DEFAULT_DATABASE", "MongoStore"]

log = logging.getLogger(__name__)

DEFAULT_DATABASE = "mrm_push"


class MongoStore:
    """`Store` on MongoDB. One process per site uses it (the instance lease sees to it, see
    daemon/lease.py): what must not interleave is serialised in the process."""

    def __init__(
        self,
        url: str,
        driver: str = "motor",
        client: Any | None = None,
        database: str | None = None,
    ) -> None:
        # The client never connects here; a bad URL or driver is a StoreConfigError now.
        self._client: Any = client if client is not None else make_client(url, driver)
        self._owns_client = client is None
        db = self._client[database or database_name(url) or DEFAULT_DATABASE]
        self._conn = MongoConnection(db)
        self._rooms = MongoRooms(self._conn)
        self._channels = MongoChannels(self._conn)
        self._notifications = MongoNotifications(self._conn)
        self._outbox = MongoOutbox(self._conn)
        self._meta = MongoMeta(self._conn)

    @property
    def client(self) -> Any:
        """The driver's client (motor's, pymongo's or an injected one)."""
        return self._client

    @property
    def database(self) -> Any:
        """The driver's database object."""
        return self._conn.db

    @property
    def migrated(self) -> bool:
        """Whether the schema is known to be current (migrated on the first successful call)."""
        return self._conn.migrated

    @property
    def rooms(self) -> MongoRooms:
        return self._rooms

    @property
    def channels(self) -> MongoChannels:
        return self._channels

    @property
    def notifications(self) -> MongoNotifications:
        return self._notifications

    @property
    def outbox(self) -> MongoOutbox:
        return self._outbox

    @property
    def meta(self) -> MongoMeta:
        return self._meta

    async def open(self) -> None:
        try:
            async with self._conn.op():
                pass
        except StoreUnavailable as exc:
            # Start anyway: /readyz reports unready and the schema comes on the first success.
            log.warning("mongodb unreachable at start", extra={"reason": str(exc)})

    async def close(self) -> None:
        if self._owns_client:
            await close_client(self._client)

    async def ping(self) -> None:
        async with self._conn.op() as db:
            await db.command("ping")

    async def maintain(self) -> None:
        """MongoDB keeps its own files: nothing to do."""


if TYPE_CHECKING:  # mypy proves the class satisfies the protocol
    _store: Store = MongoStore("mongodb://localhost")
