"""The `Store` contract where the backends once answered differently: the rules of
storage/rules.py (finish states, channel updates, token sets) and what `last_seq` means.

Every test runs against each backend (see conftest.py).
"""

from __future__ import annotations

import pytest

from storage.base import Target
from tests.storage.helpers import T0, make_channel, publish_new, reserve_seq

FCM1 = Target("fcm", "t1")


@pytest.mark.gen_test(timeout=10)
async def test_last_seq_is_the_highest_seq_a_reader_can_see(store):
    """Not a counter: a seq taken by a publication that never became visible (MongoDB, cut
    half-way) is not one a reader can wait for. Purged seqs still count (purged_through)."""
    assert await store.notifications.last_seq() == 0
    await publish_new(store, "cal-1", [], T0)
    await publish_new(store, "cal-1", [], T0)
    assert await store.notifications.last_seq() == 2
    await reserve_seq(store)  # seq 3: taken, never shown
    assert await store.notifications.last_seq() == 2
    third = await publish_new(store, "cal-1", [], T0 + 1)
    assert third.seq == 4  # a gap, never a seq given twice
    assert await store.notifications.last_seq() == 4
    # The newest one purged: still the highest a reader could have seen.
    assert await store.notifications.purge(T0 + 2, T0 + 2) == 3
    assert await store.notifications.list() == []
    assert await store.notifications.purged_through_seq() == 4
    assert await store.notifications.last_seq() == 4


@pytest.mark.gen_test(timeout=10)
@pytest.mark.parametrize("state", ["in_flight", "expired", "bogus"])
async def test_finish_refuses_what_is_not_an_outcome(store, state):
    n = await publish_new(store, "cal-1", [FCM1], T0)
    (claimed,) = await store.outbox.claim(T0, T0 + 30)
    with pytest.raises(ValueError, match="cannot finish"):
        await store.outbox.finish(claimed.id, state, T0 + 1, attempts=1)
    (stored,) = (await store.notifications.get(n.id, with_deliveries=True)).deliveries
    assert stored == claimed  # unchanged


@pytest.mark.gen_test(timeout=10)
async def test_update_channel_refuses_unknown_fields_and_states_alike(store):
    channel = make_channel("ch-1", "cal-1")
    await store.channels.insert(channel)
    for field in ("id", "calendar_id", "created_at", "updated_at", "colour"):
        with pytest.raises(TypeError, match=field):
            await store.channels.update("ch-1", T0 + 1, **{field: "x"})
    with pytest.raises(ValueError, match="unknown state"):
        await store.channels.update("ch-1", T0 + 1, state="gone")
    assert await store.channels.get("ch-1") == channel  # nothing changed


@pytest.mark.gen_test(timeout=10)
async def test_a_tombstone_dates_the_cancellations_it_makes(store):
    await store.rooms.put("cal-1", "R", ["t1"], T0)
    n = await publish_new(store, "cal-1", [FCM1], T0)
    assert await store.rooms.tombstone_token("cal-1", "t1", T0 + 100, T0 + 5)
    (cancelled,) = (await store.notifications.get(n.id, with_deliveries=True)).deliveries
    assert (cancelled.state, cancelled.updated_at) == ("cancelled", T0 + 5)


@pytest.mark.gen_test(timeout=10)
async def test_a_room_changes_only_when_its_token_set_does(store):
    await store.rooms.put("cal-1", "R", ["t1", "t2"], T0)
    assert await store.rooms.tombstone_token("cal-1", "t2", T0 + 10, T0 + 1)
    room, added = await store.rooms.add_tokens("cal-1", ["t2"], T0 + 20, respect_tombstones=True)
    assert added == ["t2"] and room.updated_at == T0 + 20  # the tombstone had expired
    # Named again (clearing whatever tombstone is left) but in the set already: no change.
    room, added = await store.rooms.add_tokens(
        "cal-1", ["t2", "t1"], T0 + 30, respect_tombstones=False
    )
    assert added == [] and room.updated_at == T0 + 20
    assert await store.rooms.get("cal-1") == room


@pytest.mark.gen_test(timeout=10)
async def test_reads_carry_deliveries_only_when_asked(store):
    """Replay, gap filling, the FCM data and resume never use them: only the operators'
    listing asks. `received` ones have none to carry."""
    published = await publish_new(store, "cal-1", [FCM1, Target("backend")], T0)
    assert len(published.deliveries) == 2  # publish returns what it made
    waiting = await store.notifications.add("cal-1", "poll", "exists", T0 + 1)

    got = await store.notifications.get(published.id)
    assert got.deliveries == () and got.seq == published.seq
    assert await store.notifications.get(published.id, with_deliveries=True) == published
    assert [n.deliveries for n in await store.notifications.list()] == [()]
    assert await store.notifications.list(with_deliveries=True) == [published]
    listed = await store.notifications.list(include_unpublished=True)
    assert [(n.id, n.deliveries) for n in listed] == [(published.id, ()), (waiting.id, ())]
    assert [(n.id, n.deliveries) for n in await store.notifications.received()] == [
        (waiting.id, ())
    ]
