"""The MongoDB store's schema: numbered steps, applied in order, the version in `meta`.

The version is the `schema` document of `meta` ({"_id": "schema", "version": n}); a database
without one is at 0 (made before versions, or new). Each step must be safe to run twice (a
crash before its version is written, or two processes starting at once): index creation with
explicit names is. Later changes append steps, never edit one.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from pymongo.errors import DuplicateKeyError

from storage.base import StoreConfigError

log = logging.getLogger(__name__)

Doc = dict[str, Any]
Migration = Callable[[Any], Awaitable[None]]
SCHEMA_ID = "schema"

# (collection, keys, options). Explicit names keep create_index idempotent across versions.
# The partial unique indexes only cover documents holding the fields: poll notifications carry
# no channel_id/message_number and unpublished ones no seq, so those never collide.
INDEXES_1: list[tuple[str, list[tuple[str, int]], Doc]] = [
    (
        "notifications",
        [("channel_id", 1), ("message_number", 1)],
        {
            "name": "channel_message_unique",
            "unique": True,
            "partialFilterExpression": {
                "channel_id": {"$exists": True},
                "message_number": {"$exists": True},
            },
        },
    ),
    (
        "notifications",
        [("seq", 1)],
        {
            "name": "seq_unique",
            "unique": True,
            "partialFilterExpression": {"seq": {"$exists": True}},
        },
    ),
    ("notifications", [("calendar_id", 1), ("seq", 1)], {"name": "calendar_seq"}),
    ("notifications", [("state", 1), ("_id", 1)], {"name": "state_id"}),
    ("notifications", [("state", 1), ("published_at", 1)], {"name": "state_published_at"}),
    ("notifications", [("state", 1), ("received_at", 1)], {"name": "state_received_at"}),
    ("deliveries", [("notification_id", 1)], {"name": "notification"}),
    ("deliveries", [("state", 1), ("due", 1), ("_id", 1)], {"name": "state_due"}),
    ("deliveries", [("calendar_id", 1), ("state", 1)], {"name": "calendar_state"}),
    ("deliveries", [("held", 1)], {"name": "held", "sparse": True}),
    ("channels", [("calendar_id", 1)], {"name": "calendar"}),
    ("channels", [("created_at", 1), ("_id", 1)], {"name": "created_at"}),
    ("stops", [("next_attempt_at", 1)], {"name": "next_attempt_at"}),
    ("stopped", [("until", 1), ("_id", 1)], {"name": "until"}),
    ("deliveries", [("state", 1), ("target_kind", 1)], {"name": "state_kind"}),
]


async def _migration_1(db: Any) -> None:
    """The indexes (what the store made before it had versions)."""
    for collection, keys, options in INDEXES_1:
        await db[collection].create_index(keys, **options)


MIGRATIONS: list[Migration] = [_migration_1]


async def schema_version(db: Any) -> int:
    doc = await db.meta.find_one({"_id": SCHEMA_ID})
    return 0 if doc is None else int(doc.get("version", 0))


async def _record(db: Any, version: int) -> None:
    for _ in range(2):
        try:
            await db.meta.update_one(
                {"_id": SCHEMA_ID}, {"$max": {"version": version}}, upsert=True
            )
            return
        except DuplicateKeyError:
            continue  # two first upserts raced (old servers do not retry that themselves)


async def migrate(db: Any) -> None:
    """Bring the database to the newest schema; StoreConfigError when it is newer than this
    code knows (a newer mrm-push ran on it: roll forward, or restore a backup)."""
    current = await schema_version(db)
    if current > len(MIGRATIONS):
        raise StoreConfigError(
            f"storage: mongodb database {db.name!r} has schema version {current}, newer than"
            f" this mrm-push knows ({len(MIGRATIONS)})"
        )
    for version, step in enumerate(MIGRATIONS, start=1):
        if current < version:
            await step(db)
            await _record(db, version)
            log.info("mongodb_migrated", extra={"database": db.name, "version": version})
