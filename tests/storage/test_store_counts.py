"""The `Store` contract for the counts behind the metrics' store gauges: the outbox by state and
target, notifications not yet synced, channels by state, rooms without a live confirmed
channel, the soonest expiry of an active channel. Grouped counts, each pair once.

Every test runs against each backend (see conftest.py).
"""

from __future__ import annotations

import pytest

from storage.base import Target
from tests.storage.helpers import T0, make_channel, publish_new

FCM_A = Target("fcm", "token-a")
FCM_B = Target("fcm", "token-b")
BACKEND = Target("backend")


@pytest.mark.gen_test(timeout=10)
async def test_deliveries_are_counted_by_state_and_target(store):
    assert await store.outbox.counts() == {}
    await store.rooms.put("cal-1", "R", ["token-a", "token-b"], T0)
    first = await publish_new(store, "cal-1", [FCM_A, FCM_B, BACKEND])
    await publish_new(store, "cal-1", [FCM_A, BACKEND])
    assert await store.outbox.counts() == {("pending", "fcm"): 3, ("pending", "backend"): 2}
    by_target = {(d.target.kind, d.target.token): d for d in first.deliveries}
    await store.outbox.finish(by_target["fcm", "token-a"].id, "sent", T0 + 1, attempts=1)
    await store.outbox.finish(by_target["backend", None].id, "failed", T0 + 1, last_error="x")
    [claimed] = await store.outbox.claim(T0 + 2, T0 + 60, limit=1, kind="backend")
    assert await store.outbox.counts() == {
        ("pending", "fcm"): 2,
        ("sent", "fcm"): 1,
        ("failed", "backend"): 1,
        ("in_flight", "backend"): 1,
    }
    await store.rooms.remove_token("cal-1", "token-b", T0 + 3)  # its pending deliveries: cancelled
    await store.outbox.expire(T0 + 10, T0 + 100)  # the rest not final: expired
    assert await store.outbox.counts() == {
        ("cancelled", "fcm"): 1,
        ("expired", "fcm"): 1,
        ("expired", "backend"): 1,
        ("sent", "fcm"): 1,
        ("failed", "backend"): 1,
    }
    assert claimed.state == "in_flight"


@pytest.mark.gen_test(timeout=10)
async def test_unsynced_notifications_are_the_received_ones(store):
    assert await store.notifications.count_unsynced() == 0
    waiting = await store.notifications.add("cal-1", "webhook", "exists", T0, "ch-1", 2)
    skipped = await store.notifications.add("cal-1", "webhook", "exists", T0, "ch-1", 3)
    await store.notifications.add("cal-2", "poll", "exists", T0)
    await publish_new(store, "cal-1")
    assert await store.notifications.count_unsynced() == 3
    await store.notifications.skip([skipped.id], T0 + 1)
    await store.notifications.publish(waiting.id, [], False, [], T0 + 1)
    assert await store.notifications.count_unsynced() == 1


@pytest.mark.gen_test(timeout=10)
async def test_channels_are_counted_by_state(store):
    assert await store.channels.count_by_state() == {}
    await store.channels.insert(make_channel("ch-1", state="active"))
    await store.channels.insert(make_channel("ch-2", state="active", calendar_id="cal-2"))
    await store.channels.insert(make_channel("ch-3", state="retiring"))
    await store.channels.insert(make_channel("ch-4", state="pending", calendar_id="cal-3"))
    assert await store.channels.count_by_state() == {"active": 2, "retiring": 1, "pending": 1}
    await store.channels.update("ch-4", T0 + 1, state="failed", last_error="404 notFound")
    await store.channels.delete("ch-3")
    assert await store.channels.count_by_state() == {"active": 2, "failed": 1}


@pytest.mark.gen_test(timeout=10)
async def test_rooms_without_a_live_confirmed_channel(store):
    now = T0 + 100
    assert await store.rooms.count_without_channel(now) == 0
    live = {"state": "active", "confirmed": True, "expiration": now + 3600, "resource_id": "r"}
    rooms = {
        "cal-live": [make_channel("ch-live", "cal-live", **live)],
        # Replaced while its successor waits for Google's sync: it still listens.
        "cal-renewing": [
            make_channel(
                "ch-old", "cal-renewing", **dict(live, state="retiring", expiration=now + 7200)
            ),
            make_channel("ch-new", "cal-renewing", state="active", expiration=now + 7200),
        ],
        "cal-unconfirmed": [make_channel("ch-u", "cal-unconfirmed", **dict(live, confirmed=False))],
        "cal-expired": [make_channel("ch-e", "cal-expired", **dict(live, expiration=now))],
        "cal-pending": [make_channel("ch-p", "cal-pending")],
        "cal-failed": [make_channel("ch-f", "cal-failed", **dict(live, state="failed"))],
        "cal-none": [],
    }
    for calendar_id, channels in rooms.items():
        await store.rooms.put(calendar_id, "R", [], T0)
        for channel in channels:
            await store.channels.insert(channel)
    # A live channel of a calendar that is no longer a room counts for nothing.
    await store.channels.insert(make_channel("ch-gone", "cal-gone", **live))
    assert await store.rooms.count_without_channel(now) == 5
    assert await store.rooms.count_without_channel(now + 3600) == 6  # ch-live expired too
    await store.channels.confirm("ch-u", "r", now)
    await store.rooms.delete("cal-none")
    assert await store.rooms.count_without_channel(now) == 3


@pytest.mark.gen_test(timeout=10)
async def test_soonest_expiry_is_the_earliest_active_channel_s(store):
    assert await store.channels.soonest_expiry() is None
    await store.channels.insert(make_channel("ch-pending", state="pending"))  # no expiration yet
    await store.channels.insert(make_channel("ch-retiring", state="retiring", expiration=T0 + 5))
    await store.channels.insert(make_channel("ch-failed", state="failed", expiration=T0 + 6))
    assert await store.channels.soonest_expiry() is None
    await store.channels.insert(make_channel("ch-late", state="active", expiration=T0 + 900))
    await store.channels.insert(make_channel("ch-soon", state="active", expiration=T0 + 300))
    await store.channels.insert(make_channel("ch-none", state="active"))  # watch not answered
    assert await store.channels.soonest_expiry() == T0 + 300
    await store.channels.update("ch-soon", T0 + 1, state="retiring")
    assert await store.channels.soonest_expiry() == T0 + 900
