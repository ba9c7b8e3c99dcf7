"""The `Store` contract, part one: lifecycle, rooms and tokens, channels, stops, sync tokens.

Every test runs against each backend (see conftest.py); what is checked is what
storage/protocols.py promises, so both backends behave the same for the code above them.
"""

from __future__ import annotations

import asyncio

import pytest

from storage.base import DuplicateChannel, Target
from tests.storage.helpers import T0, make_channel, publish_new

# -- lifecycle -------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=10)
async def test_ping_answers_and_epoch_is_stable(store, backend):
    await store.ping()
    epoch = await store.meta.store_epoch()
    assert isinstance(epoch, str) and epoch
    assert await store.meta.store_epoch() == epoch

    again = backend.make()
    await again.open()
    try:
        assert await again.meta.store_epoch() == epoch  # made once, when the store was created
    finally:
        await again.close()


@pytest.mark.gen_test(timeout=10)
async def test_maintain_keeps_everything(store):
    await store.rooms.put("cal-1", "Kampala", ["t1"], T0)
    await publish_new(store, "cal-1", [Target("fcm", "t1")], T0)
    await store.maintain()  # SQLite: the WAL checkpointed and truncated; MongoDB: nothing
    await store.ping()
    assert (await store.rooms.get("cal-1")).firebase_tokens == ("t1",)
    assert await store.notifications.last_seq() == 1
    await store.rooms.put("cal-2", "Jinja", [], T0)
    assert len(await store.rooms.list()) == 2


# -- rooms and tokens ------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=10)
async def test_put_room_creates_then_updates(store):
    assert await store.rooms.get("cal-1") is None

    room, created = await store.rooms.put("cal-1", None, ["t1", "t2", "t1", "t3"], T0)
    assert created
    assert room.calendar_id == "cal-1"
    assert room.name == ""  # a new room without a name
    assert room.firebase_tokens == ("t1", "t2", "t3")  # order kept, duplicates dropped
    assert (room.created_at, room.updated_at) == (T0, T0)
    assert await store.rooms.get("cal-1") == room

    room, created = await store.rooms.put("cal-1", "Kampala", None, T0 + 5)
    assert not created
    assert room.name == "Kampala"
    assert room.firebase_tokens == ("t1", "t2", "t3")  # None keeps the set
    assert (room.created_at, room.updated_at) == (T0, T0 + 5)

    room, _ = await store.rooms.put("cal-1", None, ["t9", "t2"], T0 + 6)
    assert room.name == "Kampala"  # None keeps the name
    assert room.firebase_tokens == ("t9", "t2")  # a list replaces the set

    room, _ = await store.rooms.put("cal-1", None, [], T0 + 7)
    assert room.firebase_tokens == ()
    assert await store.rooms.get("cal-1") == room


@pytest.mark.gen_test(timeout=10)
async def test_list_rooms_is_ordered_by_calendar_id(store):
    for calendar_id in ["c@x", "a@x", "b@x"]:
        await store.rooms.put(calendar_id, calendar_id.upper(), [], T0)
    rooms = await store.rooms.list()
    assert [r.calendar_id for r in rooms] == ["a@x", "b@x", "c@x"]
    assert [r.name for r in rooms] == ["A@X", "B@X", "C@X"]


@pytest.mark.gen_test(timeout=10)
async def test_add_tokens(store):
    assert await store.rooms.add_tokens("nope", ["t1"], T0, respect_tombstones=False) is None

    await store.rooms.put("cal-1", "R", ["t1"], T0)
    result = await store.rooms.add_tokens(
        "cal-1", ["t2", "t1", "t3", "t2"], T0 + 1, respect_tombstones=True
    )
    assert result is not None
    room, added = result
    assert added == ["t2", "t3"]  # t1 was there; the second t2 is a duplicate
    assert room.firebase_tokens == ("t1", "t2", "t3")
    assert await store.rooms.get("cal-1") == room

    room, added = await store.rooms.add_tokens("cal-1", ["t1"], T0 + 2, respect_tombstones=False)
    assert added == []
    assert room.firebase_tokens == ("t1", "t2", "t3")


@pytest.mark.gen_test(timeout=10)
async def test_remove_token(store):
    await store.rooms.put("cal-1", "R", ["t1", "t2", "t3"], T0)
    assert await store.rooms.remove_token("cal-1", "t2", T0 + 1)
    assert (await store.rooms.get("cal-1")).firebase_tokens == ("t1", "t3")
    assert not await store.rooms.remove_token("cal-1", "t2", T0 + 2)
    assert not await store.rooms.remove_token("nope", "t1", T0 + 2)
    assert await store.rooms.tombstoned_tokens("cal-1", T0 + 2) == set()  # removing is not refusing


@pytest.mark.gen_test(timeout=10)
async def test_tombstone_drops_the_token_and_keeps_it_out(store):
    await store.rooms.put("cal-1", "R", ["t1", "t2"], T0)
    until = T0 + 100

    assert await store.rooms.tombstone_token("cal-1", "t1", until, T0)
    assert (await store.rooms.get("cal-1")).firebase_tokens == ("t2",)
    assert await store.rooms.tombstoned_tokens("cal-1", T0 + 1) == {"t1"}
    assert await store.rooms.tombstoned_tokens("cal-2", T0 + 1) == set()
    assert not await store.rooms.tombstone_token("nope", "t1", until, T0)

    # A refresh (respecting tombstones) does not bring it back...
    room, added = await store.rooms.add_tokens(
        "cal-1", ["t1", "t3"], T0 + 1, respect_tombstones=True
    )
    assert added == ["t3"]
    assert room.firebase_tokens == ("t2", "t3")
    assert await store.rooms.tombstoned_tokens("cal-1", T0 + 1) == {"t1"}

    # ...until the tombstone has expired.
    assert await store.rooms.tombstoned_tokens("cal-1", until + 1) == set()
    room, added = await store.rooms.add_tokens("cal-1", ["t1"], until + 1, respect_tombstones=True)
    assert added == ["t1"]
    assert room.firebase_tokens == ("t2", "t3", "t1")


@pytest.mark.gen_test(timeout=10)
async def test_explicit_adds_clear_tombstones(store):
    await store.rooms.put("cal-1", "R", ["t1", "t2", "t3"], T0)
    for token in ["t1", "t2", "t3"]:
        assert await store.rooms.tombstone_token("cal-1", token, T0 + 100, T0)

    # POST .../tokens/ (without respecting tombstones) adds it and clears its tombstone.
    room, added = await store.rooms.add_tokens("cal-1", ["t1"], T0 + 1, respect_tombstones=False)
    assert added == ["t1"]
    assert room.firebase_tokens == ("t1",)
    assert await store.rooms.tombstoned_tokens("cal-1", T0 + 1) == {"t2", "t3"}

    # PUT with a token list clears the tombstones of the tokens it names, only those.
    room, _ = await store.rooms.put("cal-1", None, ["t2"], T0 + 2)
    assert room.firebase_tokens == ("t2",)
    assert await store.rooms.tombstoned_tokens("cal-1", T0 + 2) == {"t3"}
    room, added = await store.rooms.add_tokens(
        "cal-1", ["t2", "t3"], T0 + 3, respect_tombstones=True
    )
    assert added == []


@pytest.mark.gen_test(timeout=10)
async def test_tombstone_cancels_that_tokens_pending_deliveries(store):
    await store.rooms.put("cal-1", "R", ["t1", "t2"], T0)
    targets = [Target("fcm", "t1"), Target("fcm", "t2"), Target("backend")]
    n1 = await publish_new(store, "cal-1", targets, T0)
    n2 = await publish_new(store, "cal-1", targets, T0)
    await store.outbox.finish(n1.deliveries[0].id, "sent", T0 + 1)
    claimed = await store.outbox.claim(T0 + 1, T0 + 60, limit=100)
    assert any(d.id == n2.deliveries[0].id for d in claimed)  # in_flight is cancelled too

    assert await store.rooms.tombstone_token("cal-1", "t1", T0 + 100, T0 + 2)

    states = {}
    for n in (n1, n2):
        for d in (await store.notifications.get(n.id, with_deliveries=True)).deliveries:
            states[(n.id, d.target)] = d.state
    assert states[(n1.id, Target("fcm", "t1"))] == "sent"  # final states stay
    assert states[(n2.id, Target("fcm", "t1"))] == "cancelled"
    assert states[(n1.id, Target("fcm", "t2"))] != "cancelled"
    assert states[(n2.id, Target("backend"))] != "cancelled"


async def delivery_states(store, *notifications):
    """{(notification id, target): (state, updated_at)} of the given notifications."""
    found = {}
    for n in notifications:
        for d in (await store.notifications.get(n.id, with_deliveries=True)).deliveries:
            found[(n.id, d.target)] = (d.state, d.updated_at)
    return found


@pytest.mark.gen_test(timeout=10)
async def test_removing_a_token_cancels_its_non_final_deliveries(store):
    await store.rooms.put("cal-1", "R", ["t1", "t2"], T0)
    await store.rooms.put("cal-2", "S", ["t1"], T0)
    targets = [Target("fcm", "t1"), Target("fcm", "t2"), Target("backend")]
    n1 = await publish_new(store, "cal-1", targets, T0)
    n2 = await publish_new(store, "cal-1", targets, T0)
    elsewhere = await publish_new(store, "cal-2", [Target("fcm", "t1")], T0)
    await store.outbox.finish(n1.deliveries[0].id, "sent", T0 + 1)
    claimed = await store.outbox.claim(T0 + 1, T0 + 60, limit=1, kind="fcm")
    assert [d.id for d in claimed] == [n1.deliveries[1].id]  # in_flight is cancelled too

    assert await store.rooms.remove_token("cal-1", "t1", T0 + 2)

    states = await delivery_states(store, n1, n2, elsewhere)
    assert states[(n1.id, Target("fcm", "t1"))] == ("sent", T0 + 1)  # final states stay
    assert states[(n2.id, Target("fcm", "t1"))] == ("cancelled", T0 + 2)
    assert states[(n1.id, Target("fcm", "t2"))][0] == "in_flight"
    assert states[(n2.id, Target("fcm", "t2"))][0] == "pending"
    assert states[(n2.id, Target("backend"))][0] == "pending"
    assert states[(elsewhere.id, Target("fcm", "t1"))][0] == "pending"  # another room's

    # Removing it again (not in the set any more) still leaves nothing behind for it.
    n3 = await publish_new(store, "cal-1", [Target("fcm", "t1")], T0 + 3)
    assert not await store.rooms.remove_token("cal-1", "t1", T0 + 4)
    assert (await delivery_states(store, n3))[(n3.id, Target("fcm", "t1"))] == (
        "cancelled",
        T0 + 4,
    )


@pytest.mark.gen_test(timeout=10)
async def test_a_put_that_replaces_the_set_cancels_the_deliveries_of_the_tokens_it_drops(store):
    await store.rooms.put("cal-1", "R", ["t1", "t2", "t3"], T0)
    await store.rooms.put("cal-2", "S", ["t1"], T0)
    targets = [Target("fcm", "t1"), Target("fcm", "t2"), Target("fcm", "t3"), Target("backend")]
    n = await publish_new(store, "cal-1", targets, T0)
    elsewhere = await publish_new(store, "cal-2", [Target("fcm", "t1")], T0)
    await store.outbox.claim(T0, T0 + 60, limit=1, kind="fcm")  # t1's, in_flight

    # A name change, or a list naming the same tokens, cancels nothing.
    await store.rooms.put("cal-1", "New name", None, T0 + 1)
    await store.rooms.put("cal-1", None, ["t3", "t2", "t1"], T0 + 1)
    assert {s for s, _ in (await delivery_states(store, n)).values()} == {"in_flight", "pending"}

    room, created = await store.rooms.put("cal-1", None, ["t2", "t4"], T0 + 2)
    assert not created and room.firebase_tokens == ("t2", "t4")
    states = await delivery_states(store, n, elsewhere)
    assert states[(n.id, Target("fcm", "t1"))] == ("cancelled", T0 + 2)
    assert states[(n.id, Target("fcm", "t3"))] == ("cancelled", T0 + 2)
    assert states[(n.id, Target("fcm", "t2"))][0] == "pending"
    assert states[(n.id, Target("backend"))][0] == "pending"
    assert states[(elsewhere.id, Target("fcm", "t1"))][0] == "pending"

    # An empty list drops every token, and with them every FCM delivery of the room.
    await store.rooms.put("cal-1", None, [], T0 + 3)
    states = await delivery_states(store, n)
    assert states[(n.id, Target("fcm", "t2"))] == ("cancelled", T0 + 3)
    assert states[(n.id, Target("backend"))][0] == "pending"


@pytest.mark.gen_test(timeout=10)
async def test_delete_room_forgets_it_and_cancels_its_deliveries(store):
    await store.rooms.put("cal-1", "R", ["t1", "t2"], T0)
    await store.rooms.put("cal-2", "S", ["u1"], T0)
    await store.rooms.tombstone_token("cal-1", "t2", T0 + 1000, T0)
    await store.channels.set_sync_token("cal-1", "sync-1")
    await store.channels.set_sync_token("cal-2", "sync-2")
    await store.channels.insert(make_channel("ch-1", "cal-1"))
    n1 = await publish_new(store, "cal-1", [Target("fcm", "t1"), Target("backend")], T0)
    n2 = await publish_new(store, "cal-2", [Target("fcm", "u1")], T0)
    await store.outbox.finish(n1.deliveries[1].id, "sent", T0 + 1)

    assert await store.rooms.delete("cal-1")

    assert await store.rooms.get("cal-1") is None
    assert [r.calendar_id for r in await store.rooms.list()] == ["cal-2"]
    assert await store.rooms.tombstoned_tokens("cal-1", T0 + 1) == set()
    assert await store.channels.get_sync_token("cal-1") is None
    assert await store.channels.get_sync_token("cal-2") == "sync-2"
    assert await store.channels.get("ch-1") is not None  # the caller stops channels
    d1 = (await store.notifications.get(n1.id, with_deliveries=True)).deliveries
    assert [d.state for d in d1] == ["cancelled", "sent"]
    assert [
        d.state for d in (await store.notifications.get(n2.id, with_deliveries=True)).deliveries
    ] == ["pending"]

    assert not await store.rooms.delete("cal-1")
    room, created = await store.rooms.put("cal-1", None, None, T0 + 2)
    assert created and room.firebase_tokens == () and room.name == ""
    # The forgotten tombstone no longer keeps t2 out.
    _, added = await store.rooms.add_tokens("cal-1", ["t2"], T0 + 3, respect_tombstones=True)
    assert added == ["t2"]


# -- channels --------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=10)
async def test_insert_and_get_channel(store):
    channel = make_channel("ch-1", "cal-1", expiration=T0 + 3600, attempts=2, next_attempt_at=T0)
    await store.channels.insert(channel)
    assert await store.channels.get("ch-1") == channel
    assert await store.channels.get("nope") is None
    with pytest.raises(DuplicateChannel):
        await store.channels.insert(make_channel("ch-1", "cal-2"))
    assert await store.channels.get("ch-1") == channel


@pytest.mark.gen_test(timeout=10)
async def test_list_channels_filters_and_order(store):
    channels = [
        make_channel("b", "cal-1", state="active", expiration=T0 + 100, created_at=T0 + 1),
        make_channel("a", "cal-1", state="retiring", expiration=T0 + 50, created_at=T0 + 1),
        make_channel("c", "cal-2", state="active", expiration=T0 + 300, created_at=T0),
        make_channel("d", "cal-2", state="pending", expiration=None, created_at=T0 + 2),
        make_channel("e", "cal-3", state="failed", expiration=T0 + 10, created_at=T0 + 3),
    ]
    for channel in channels:
        await store.channels.insert(channel)

    async def ids(**filters):
        return [c.id for c in await store.channels.list(**filters)]

    assert await ids() == ["c", "a", "b", "d", "e"]  # created_at, then id
    assert await ids(calendar_id="cal-1") == ["a", "b"]
    assert await ids(states=("active",)) == ["c", "b"]
    assert await ids(states=("pending", "failed")) == ["d", "e"]
    assert await ids(states=()) == []
    assert await ids(expiring_before=T0 + 100) == ["a", "e"]  # below it; None is left out
    assert await ids(expiring_before=T0 + 1000) == ["c", "a", "b", "e"]
    assert await ids(calendar_id="cal-2", states=("active", "pending")) == ["c", "d"]
    assert await ids(calendar_id="cal-2", expiring_before=T0 + 1000) == ["c"]
    assert (await store.channels.list(calendar_id="cal-3"))[0] == channels[4]


@pytest.mark.gen_test(timeout=10)
async def test_update_channel(store):
    await store.channels.insert(make_channel("ch-1", "cal-1"))
    updated = await store.channels.update(
        "ch-1",
        T0 + 5,
        state="active",
        resource_id="res-1",
        expiration=T0 + 3600,
        last_error="watch: 503",
        attempts=3,
        next_attempt_at=T0 + 60,
        confirmed=True,
        token="tok-new",
    )
    assert updated is not None
    assert updated.state == "active"
    assert updated.resource_id == "res-1"
    assert updated.expiration == T0 + 3600
    assert updated.last_error == "watch: 503"
    assert (updated.attempts, updated.next_attempt_at) == (3, T0 + 60)
    assert updated.confirmed and updated.token == "tok-new"
    assert (updated.id, updated.calendar_id, updated.created_at) == ("ch-1", "cal-1", T0)
    assert updated.updated_at == T0 + 5
    assert await store.channels.get("ch-1") == updated

    again = await store.channels.update("ch-1", T0 + 6, last_error=None, next_attempt_at=None)
    assert again.last_error is None and again.next_attempt_at is None
    assert again.state == "active" and again.updated_at == T0 + 6
    assert await store.channels.update("nope", T0, state="failed") is None


@pytest.mark.gen_test(timeout=10)
async def test_confirm_fills_an_empty_resource_id_only(store):
    await store.channels.insert(make_channel("ch-1", resource_id=""))
    await store.channels.insert(make_channel("ch-2", resource_id="res-from-watch"))

    confirmed = await store.channels.confirm("ch-1", "res-from-sync", T0 + 1)
    assert confirmed.confirmed and confirmed.resource_id == "res-from-sync"
    assert confirmed.updated_at == T0 + 1
    confirmed = await store.channels.confirm("ch-2", "res-other", T0 + 1)
    assert confirmed.confirmed and confirmed.resource_id == "res-from-watch"
    assert await store.channels.get("ch-2") == confirmed
    assert await store.channels.confirm("nope", "res", T0) is None


@pytest.mark.gen_test(timeout=10)
async def test_advance_message_number_only_goes_up(store, backend):
    await store.channels.insert(make_channel("ch-1"))
    assert await store.channels.advance_message_number("ch-1", 5)
    assert not await store.channels.advance_message_number("ch-1", 5)  # a duplicate
    assert not await store.channels.advance_message_number("ch-1", 3)  # older
    assert await store.channels.advance_message_number("ch-1", 9)  # numbers need not be consecutive
    assert (await store.channels.get("ch-1")).last_message_number == 9
    assert not await store.channels.advance_message_number("nope", 1)

    # Google sending the same message twice at once: exactly one wins.
    won = await asyncio.gather(
        *(store.channels.advance_message_number("ch-1", 12) for _ in range(8))
    )
    assert won.count(True) == 1
    assert (await store.channels.get("ch-1")).last_message_number == 12


@pytest.mark.gen_test(timeout=10)
async def test_delete_channel(store):
    await store.channels.insert(make_channel("ch-1"))
    assert await store.channels.delete("ch-1")
    assert await store.channels.get("ch-1") is None
    assert not await store.channels.delete("ch-1")
    await store.channels.insert(make_channel("ch-1"))  # the id is free again


# -- channel stops ---------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=10)
async def test_stops_are_queued_once_per_channel(store):
    assert await store.channels.enqueue_stop("ch-1", "res-1", "cal-1", T0)
    assert not await store.channels.enqueue_stop("ch-1", "res-other", None, T0 + 1)
    assert await store.channels.enqueue_stop("ch-2", "res-2", None, T0 + 1)
    stops = await store.channels.list_stops()
    assert sorted((s.channel_id, s.resource_id, s.calendar_id) for s in stops) == [
        ("ch-1", "res-1", "cal-1"),
        ("ch-2", "res-2", None),
    ]
    first = next(s for s in stops if s.channel_id == "ch-1")
    assert (first.attempts, first.next_attempt_at, first.last_error) == (0, T0, None)
    assert first.created_at == T0


@pytest.mark.gen_test(timeout=10)
async def test_due_stops_reschedule_and_remove(store):
    await store.channels.enqueue_stop("ch-b", "res-b", "cal-1", T0 + 2)
    await store.channels.enqueue_stop("ch-a", "res-a", "cal-1", T0 + 1)
    await store.channels.enqueue_stop("ch-c", "res-c", "cal-1", T0 + 3)

    assert await store.channels.due_stops(T0) == []
    assert [s.channel_id for s in await store.channels.due_stops(T0 + 2)] == ["ch-a", "ch-b"]
    assert [s.channel_id for s in await store.channels.due_stops(T0 + 3)] == [
        "ch-a",
        "ch-b",
        "ch-c",
    ]
    assert [s.channel_id for s in await store.channels.due_stops(T0 + 3, limit=2)] == [
        "ch-a",
        "ch-b",
    ]

    await store.channels.reschedule_stop("ch-a", T0 + 60, "stop: 503")
    await store.channels.reschedule_stop("ch-a", T0 + 120, "stop: timeout")
    assert [s.channel_id for s in await store.channels.due_stops(T0 + 3)] == ["ch-b", "ch-c"]
    (stop_a,) = [s for s in await store.channels.list_stops() if s.channel_id == "ch-a"]
    assert (stop_a.attempts, stop_a.next_attempt_at) == (2, T0 + 120)
    assert stop_a.last_error == "stop: timeout"
    assert [s.channel_id for s in await store.channels.due_stops(T0 + 120)] == [
        "ch-b",
        "ch-c",
        "ch-a",
    ]

    await store.channels.remove_stop("ch-b")
    await store.channels.remove_stop("ch-unknown")  # harmless
    assert sorted(s.channel_id for s in await store.channels.list_stops()) == ["ch-a", "ch-c"]
    assert await store.channels.enqueue_stop(
        "ch-b", "res-b", None, T0 + 200
    )  # queued again after removal


# -- sync tokens -----------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=10)
async def test_sync_tokens(store):
    assert await store.channels.get_sync_token("cal-1") is None
    await store.channels.set_sync_token("cal-1", "s1")
    await store.channels.set_sync_token("cal-2", "x1")
    await store.channels.set_sync_token("cal-1", "s2")
    assert await store.channels.get_sync_token("cal-1") == "s2"
    assert await store.channels.get_sync_token("cal-2") == "x1"
    await store.channels.set_sync_token("cal-1", None)
    assert await store.channels.get_sync_token("cal-1") is None
    await store.channels.set_sync_token("cal-1", None)  # clearing twice is harmless
    assert await store.channels.get_sync_token("cal-2") == "x1"
