"""Builders and checkers shared by the storage tests."""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from storage.base import Channel, Notification, Target
from storage.protocols import Store

T0 = 1_800_000_000.0

Claim = Callable[..., Awaitable[Sequence[Any]]]


def make_channel(channel_id: str = "ch-1", calendar_id: str = "cal-1", **fields: Any) -> Channel:
    channel = Channel(
        id=channel_id,
        calendar_id=calendar_id,
        resource_id="",
        token="tok-" + channel_id,
        expiration=None,
        state="pending",
        confirmed=False,
        last_message_number=0,
        last_error=None,
        created_at=T0,
        updated_at=T0,
    )
    return dataclasses.replace(channel, **fields)


async def publish_new(
    store: Store,
    calendar_id: str = "cal-1",
    targets: Sequence[Target] = (),
    now: float = T0,
    changes: list[dict[str, Any]] | None = None,
    *,
    channel_id: str | None = None,
    message_number: int | None = None,
) -> Notification:
    """Store a notification and publish it at `now`."""
    source = "webhook" if channel_id is not None else "poll"
    added = await store.notifications.add(
        calendar_id, source, "exists", now, channel_id=channel_id, message_number=message_number
    )
    return await store.notifications.publish(
        added.id,
        changes if changes is not None else [{"event_id": f"ev-{added.id}"}],
        False,
        list(targets),
        now,
    )


async def claim_all(
    claims: Sequence[Claim], now: float, lease_until: float, limit: int
) -> Counter[int]:
    """Run one loop per claim function, all at once, each claiming until it gets nothing; count
    how many times each delivery id was handed out."""
    counts: Counter[int] = Counter()

    async def loop(claim: Claim) -> None:
        while True:
            batch = await claim(now, lease_until, limit=limit)
            if not batch:
                return
            counts.update(d.id for d in batch)
            await asyncio.sleep(0)  # let the other claimers in between batches

    await asyncio.gather(*(loop(claim) for claim in claims))
    return counts


def duplicates(counts: Counter[int]) -> dict[int, int]:
    """The delivery ids handed out more than once, with how often."""
    return {delivery_id: n for delivery_id, n in counts.items() if n > 1}


async def reserve_seq(store: Any) -> None:
    """Take the next seq the way a publication does first, and show nothing (what a MongoDB
    publication cut half-way leaves)."""
    if type(store).__name__ == "SqliteStore":
        await store.connection.connection().execute(
            "UPDATE meta SET value = value + 1 WHERE key = 'seq'"
        )
    else:
        await store.database.counters.update_one(
            {"_id": "seq"}, {"$inc": {"value": 1}}, upsert=True
        )
