"""The `Store` contract, part two: notifications (ids, seq, publishing, listing, purging) and the
delivery outbox. Runs against each backend (see conftest.py)."""

from __future__ import annotations

import pytest

from storage.base import DuplicateNotification, Target
from tests.storage.helpers import T0, make_channel, publish_new

FCM1 = Target("fcm", "t1")
FCM2 = Target("fcm", "t2")
BACKEND = Target("backend")

# -- notifications ---------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=10)
async def test_add_notification_stores_it_as_received(store):
    n = await store.notifications.add("cal-1", "webhook", "exists", T0, "ch-1", 7)
    assert (n.calendar_id, n.source, n.resource_state) == ("cal-1", "webhook", "exists")
    assert (n.channel_id, n.message_number, n.received_at) == ("ch-1", 7, T0)
    assert n.state == "received"
    assert (n.seq, n.published_at, n.changes, n.full_resync, n.deliveries) == (
        None,
        None,
        (),
        False,
        (),
    )
    assert isinstance(n.id, int) and n.id > 0
    assert await store.notifications.get(n.id) == n
    assert await store.notifications.get(n.id + 1000) is None


@pytest.mark.gen_test(timeout=10)
async def test_a_webhook_notification_raises_its_channels_number(store):
    await store.channels.insert(make_channel("ch-1", "cal-1"))
    await store.notifications.add("cal-1", "webhook", "exists", T0, "ch-1", 7)
    assert (await store.channels.get("ch-1")).last_message_number == 7
    await store.notifications.add("cal-1", "webhook", "exists", T0, "ch-1", 5)  # late, lower
    assert (await store.channels.get("ch-1")).last_message_number == 7
    with pytest.raises(DuplicateNotification):
        await store.notifications.add("cal-1", "webhook", "exists", T0, "ch-1", 7)
    await store.notifications.add("cal-1", "poll", "exists", T0)
    assert (await store.channels.get("ch-1")).last_message_number == 7


@pytest.mark.gen_test(timeout=10)
async def test_received_notifications_of_one_calendar(store):
    a = await store.notifications.add("cal-1", "webhook", "exists", T0, "ch-1", 1)
    b = await store.notifications.add("cal-2", "webhook", "exists", T0, "ch-2", 1)
    c = await store.notifications.add("cal-1", "poll", "exists", T0)
    assert [n.id for n in await store.notifications.received(calendar_id="cal-1")] == [a.id, c.id]
    assert [n.id for n in await store.notifications.received(calendar_id="cal-2")] == [b.id]
    assert [n.id for n in await store.notifications.received(1, calendar_id="cal-1")] == [a.id]
    assert await store.notifications.received(calendar_id="cal-3") == []


@pytest.mark.gen_test(timeout=10)
async def test_ids_increase_and_duplicates_are_refused(store):
    a = await store.notifications.add("cal-1", "webhook", "exists", T0, "ch-1", 2)
    b = await store.notifications.add("cal-1", "webhook", "not_exists", T0, "ch-1", 3)
    c = await store.notifications.add("cal-1", "webhook", "exists", T0, "ch-2", 2)  # other channel
    # Poll notifications have no channel nor number: they never collide with each other.
    d = await store.notifications.add("cal-1", "poll", "exists", T0)
    e = await store.notifications.add("cal-1", "poll", "exists", T0)
    assert a.id < b.id < c.id < d.id < e.id
    assert (d.channel_id, d.message_number) == (None, None)

    with pytest.raises(DuplicateNotification):
        await store.notifications.add("cal-1", "webhook", "exists", T0 + 1, "ch-1", 2)
    f = await store.notifications.add("cal-1", "webhook", "exists", T0, "ch-1", 4)
    assert f.id > e.id
    assert [n.id for n in await store.notifications.received()] == [
        a.id,
        b.id,
        c.id,
        d.id,
        e.id,
        f.id,
    ]


@pytest.mark.gen_test(timeout=10)
async def test_ids_are_never_reused_after_a_purge(store):
    first = await publish_new(store, "cal-1", [], T0)
    newest = await store.notifications.add("cal-1", "poll", "exists", T0)
    await store.notifications.skip([newest.id], T0)
    assert await store.notifications.purge(T0 + 1, T0 + 1) == 2
    assert await store.notifications.get(newest.id) is None

    again = await store.notifications.add("cal-1", "poll", "exists", T0 + 2)
    assert again.id > newest.id > first.id


@pytest.mark.gen_test(timeout=10)
async def test_received_notifications_are_the_waiting_ones_oldest_first(store):
    ids = [(await store.notifications.add("cal-1", "poll", "exists", T0)).id for _ in range(5)]
    await store.notifications.publish(ids[1], [], True, [], T0)
    await store.notifications.skip([ids[3]], T0)
    assert [n.id for n in await store.notifications.received()] == [ids[0], ids[2], ids[4]]
    assert [n.id for n in await store.notifications.received(limit=2)] == [ids[0], ids[2]]
    assert all(n.state == "received" for n in await store.notifications.received())


@pytest.mark.gen_test(timeout=10)
async def test_publish_gives_seq_and_deliveries(store):
    assert await store.notifications.last_seq() == 0
    n = await store.notifications.add("cal-1", "webhook", "exists", T0, "ch-1", 5)
    changes = [
        {"event_id": "ev1", "status": "confirmed", "updated": "2027-01-15T08:00:00.000Z"},
        {"event_id": "ev2", "status": "cancelled"},
    ]
    published = await store.notifications.publish(n.id, changes, False, [FCM1, BACKEND], T0 + 1)
    assert published.id == n.id and published.state == "published"
    assert published.seq == 1 and published.published_at == T0 + 1
    assert published.changes == tuple(changes) and published.full_resync is False
    assert (published.received_at, published.channel_id, published.message_number) == (
        T0,
        "ch-1",
        5,
    )
    assert [d.target for d in published.deliveries] == [FCM1, BACKEND]
    for d in published.deliveries:
        assert d.notification_id == n.id and d.calendar_id == "cal-1"
        assert (d.state, d.attempts, d.next_attempt_at, d.last_error) == (
            "pending",
            0,
            T0 + 1,
            None,
        )
        assert (d.created_at, d.lease_until) == (T0 + 1, None)
    assert await store.notifications.get(n.id, with_deliveries=True) == published
    assert await store.notifications.last_seq() == 1
    assert await store.notifications.received() == []

    resync = await store.notifications.add("cal-1", "poll", "exists", T0 + 2)
    resync = await store.notifications.publish(resync.id, [], True, [], T0 + 3)
    assert resync.seq == 2 and resync.full_resync is True and resync.deliveries == ()


@pytest.mark.gen_test(timeout=10)
async def test_seq_follows_publication_order_not_id_order(store):
    a = await store.notifications.add("cal-1", "webhook", "exists", T0, "ch-1", 1)
    b = await store.notifications.add("cal-2", "webhook", "exists", T0, "ch-2", 1)
    c = await store.notifications.add("cal-1", "poll", "exists", T0)
    assert (await store.notifications.publish(b.id, [], True, [], T0)).seq == 1
    assert (await store.notifications.publish(c.id, [], True, [], T0)).seq == 2
    assert (await store.notifications.publish(a.id, [], True, [], T0)).seq == 3
    listed = await store.notifications.list()
    assert [(n.id, n.seq) for n in listed] == [(b.id, 1), (c.id, 2), (a.id, 3)]


@pytest.mark.gen_test(timeout=10)
async def test_publishing_twice_returns_the_stored_notification(store):
    n = await store.notifications.add("cal-1", "webhook", "exists", T0, "ch-1", 1)
    first = await store.notifications.publish(n.id, [{"event_id": "a"}], False, [FCM1], T0)
    second = await store.notifications.publish(
        n.id, [{"event_id": "b"}], True, [FCM1, FCM2, BACKEND], T0 + 9
    )
    assert second == first
    assert await store.notifications.last_seq() == 1
    assert await store.outbox.count() == 1


@pytest.mark.gen_test(timeout=10)
async def test_skip_keeps_it_for_operators_only(store):
    n = await store.notifications.add("cal-1", "webhook", "exists", T0, "ch-1", 1)
    await store.notifications.skip([n.id], T0 + 1)
    skipped = await store.notifications.get(n.id)
    assert skipped.state == "skipped" and skipped.seq is None and skipped.deliveries == ()
    assert await store.notifications.last_seq() == 0
    assert await store.notifications.list() == []
    assert [x.id for x in await store.notifications.list(include_unpublished=True)] == [n.id]
    assert await store.notifications.received() == []


@pytest.mark.gen_test(timeout=10)
async def test_skip_takes_a_whole_batch_and_changes_only_the_received_ones(store):
    waiting = [await store.notifications.add("cal-1", "poll", "exists", T0) for _ in range(4)]
    other = await store.notifications.add("cal-2", "poll", "exists", T0)
    published = await store.notifications.publish(waiting[1].id, [], True, [FCM1], T0 + 1)
    await store.notifications.skip([], T0 + 2)  # nothing to skip: nothing changes
    assert len(await store.notifications.received()) == 4
    unknown = other.id + 1000
    await store.notifications.skip([n.id for n in waiting] + [unknown], T0 + 2)
    states = [(await store.notifications.get(n.id)).state for n in waiting]
    assert states == ["skipped", "published", "skipped", "skipped"]
    assert await store.notifications.get(published.id, with_deliveries=True) == published
    assert await store.notifications.get(unknown) is None
    assert [n.id for n in await store.notifications.received()] == [other.id]
    assert await store.notifications.count_unsynced() == 1


@pytest.mark.gen_test(timeout=10)
async def test_list_notifications_filters(store):
    # seq 1..6 over three calendars, plus one received and one skipped (ids interleaved).
    made = {}
    for i, calendar_id in enumerate(["a", "b", "a", "c", "a", "b"], start=1):
        made[i] = await publish_new(store, calendar_id, [Target("fcm", f"t{i}")], T0 + i)
    waiting = await store.notifications.add("a", "poll", "exists", T0 + 10)
    skipped = await store.notifications.add("b", "poll", "exists", T0 + 11)
    await store.notifications.skip([skipped.id], T0 + 11)

    async def seqs(**filters):
        return [n.seq for n in await store.notifications.list(**filters)]

    assert await seqs() == [1, 2, 3, 4, 5, 6]
    assert await seqs(calendar_id="a") == [1, 3, 5]
    assert await seqs(calendar_ids=["b", "c"]) == [2, 4, 6]
    assert await seqs(calendar_ids=[]) == []
    assert await seqs(calendar_id="a", calendar_ids=["a", "b"]) == [1, 3, 5]
    assert await seqs(after=2) == [3, 4, 5, 6]
    assert await seqs(after=2, up_to=5) == [3, 4, 5]
    assert await seqs(up_to=2) == [1, 2]
    assert await seqs(after=6) == []
    assert await seqs(after=1, limit=2) == [2, 3]
    assert await seqs(calendar_id="a", after=1, limit=1) == [3]

    listed = await store.notifications.list(calendar_id="c", with_deliveries=True)
    assert listed == [made[4]]  # with its deliveries
    assert [d.target for d in listed[0].deliveries] == [Target("fcm", "t4")]

    everything = await store.notifications.list(include_unpublished=True)
    ids = [n.id for n in everything]
    assert ids == sorted(ids) and len(ids) == 8
    assert {n.state for n in everything} == {"published", "received", "skipped"}
    on_a = await store.notifications.list(calendar_id="a", include_unpublished=True)
    assert [n.id for n in on_a] == [made[1].id, made[3].id, made[5].id, waiting.id]
    bounded = await store.notifications.list(
        include_unpublished=True, after=made[2].id, up_to=waiting.id, limit=3
    )
    assert [n.id for n in bounded] == [made[3].id, made[4].id, made[5].id]  # bounds are ids


@pytest.mark.gen_test(timeout=10)
async def test_purge_rules(store):
    old, recent = T0, T0 + 1000
    cutoff = T0 + 500
    done = await publish_new(store, "cal-1", [FCM1, BACKEND], old)  # seq 1
    await store.outbox.finish(done.deliveries[0].id, "sent", old)
    await store.outbox.finish(done.deliveries[1].id, "failed", old, last_error="gave up")
    claimed_busy = await publish_new(store, "cal-1", [FCM1], old)  # seq 2, in flight
    assert len(await store.outbox.claim(old, old + 30)) == 1
    busy = await publish_new(store, "cal-1", [FCM1, FCM2], old)  # seq 3, one still pending
    await store.outbox.finish(busy.deliveries[0].id, "cancelled", old)
    no_targets = await publish_new(store, "cal-1", [], old)  # seq 4
    fresh = await publish_new(store, "cal-1", [FCM1], recent)  # seq 5
    await store.outbox.finish(fresh.deliveries[0].id, "sent", recent)
    skipped_old = await store.notifications.add("cal-1", "poll", "exists", old)
    await store.notifications.skip([skipped_old.id], old)
    skipped_new = await store.notifications.add("cal-1", "poll", "exists", recent)
    await store.notifications.skip([skipped_new.id], recent)
    waiting = await store.notifications.add("cal-1", "poll", "exists", old)  # never purged

    assert await store.notifications.purged_through_seq() == 0
    assert await store.notifications.purge(cutoff, cutoff) == 3

    gone = {done.id, no_targets.id, skipped_old.id}
    kept = {busy.id, claimed_busy.id, fresh.id, skipped_new.id, waiting.id}
    for nid in gone:
        assert await store.notifications.get(nid) is None
    for nid in kept:
        assert await store.notifications.get(nid) is not None
    assert await store.notifications.purged_through_seq() == 4
    assert await store.notifications.last_seq() == 5
    assert [n.seq for n in await store.notifications.list()] == [2, 3, 5]
    assert await store.outbox.count() == 4  # done's two deliveries went with it

    # Everything received before far in the future: still never a `received` one.
    await store.outbox.finish(busy.deliveries[1].id, "sent", recent)
    assert await store.notifications.purge(recent + 1, recent + 1) == 3  # busy, fresh, skipped_new
    assert (
        await store.notifications.purged_through_seq() == 5
    )  # claimed_busy (seq 2) is still in flight
    assert [n.id for n in await store.notifications.received()] == [waiting.id]
    assert await store.notifications.purge(recent + 1, recent + 1) == 0

    # A later purge of a lower seq does not move the mark back.
    for d in (await store.notifications.get(claimed_busy.id, with_deliveries=True)).deliveries:
        await store.outbox.finish(d.id, "sent", recent)
    assert await store.notifications.purge(recent + 1, recent + 1) == 1
    assert await store.notifications.purged_through_seq() == 5


@pytest.mark.gen_test(timeout=10)
async def test_purge_keeps_published_within_retention(store):
    n = await publish_new(store, "cal-1", [], T0)
    assert await store.notifications.purge(T0, T0 + 10_000) == 0  # published at T0, not before
    assert await store.notifications.get(n.id) is not None


# -- delivery outbox -------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=10)
async def test_claim_takes_due_deliveries_oldest_first(store):
    n = await publish_new(store, "cal-1", [Target("fcm", f"t{i}") for i in range(5)], T0)
    d = [x.id for x in n.deliveries]
    # Spread their due times: d3 earliest, then d1, d0; d2 and d4 not due until later.
    for delivery_id, due in [(d[3], T0 + 1), (d[1], T0 + 2), (d[0], T0 + 3)]:
        await store.outbox.finish(delivery_id, "pending", T0, attempts=1, next_attempt_at=due)
    for delivery_id in (d[2], d[4]):
        await store.outbox.finish(delivery_id, "pending", T0, attempts=1, next_attempt_at=T0 + 50)

    assert await store.outbox.claim(T0 + 0.5, T0 + 100) == []
    first = await store.outbox.claim(T0 + 10, T0 + 40, limit=2)
    assert [x.id for x in first] == [d[3], d[1]]
    for x in first:
        assert x.state == "in_flight" and x.lease_until == T0 + 40
        assert x.attempts == 1  # claiming is not an attempt; the worker counts them
    second = await store.outbox.claim(T0 + 10, T0 + 40, limit=10)
    assert [x.id for x in second] == [d[0]]
    assert await store.outbox.claim(T0 + 10, T0 + 40, limit=10) == []
    assert await store.outbox.count("in_flight") == 3
    assert await store.outbox.count("pending") == 2


@pytest.mark.gen_test(timeout=10)
async def test_claim_by_kind(store):
    n = await publish_new(store, "cal-1", [FCM1, BACKEND, FCM2], T0)
    backend_only = await store.outbox.claim(T0, T0 + 30, kind="backend")
    assert [x.target for x in backend_only] == [BACKEND]
    fcm = await store.outbox.claim(T0, T0 + 30, kind="fcm")
    assert [x.target for x in fcm] == [FCM1, FCM2]
    assert {x.id for x in backend_only + fcm} == {x.id for x in n.deliveries}


@pytest.mark.gen_test(timeout=10)
async def test_expired_lease_makes_a_delivery_claimable_again(store):
    await publish_new(store, "cal-1", [FCM1], T0)
    (claimed,) = await store.outbox.claim(T0, T0 + 30)
    assert await store.outbox.claim(T0 + 29, T0 + 60) == []
    (again,) = await store.outbox.claim(T0 + 31, T0 + 90)
    assert again.id == claimed.id and again.lease_until == T0 + 90
    assert again.state == "in_flight"


@pytest.mark.gen_test(timeout=10)
async def test_release_claims(store):
    await publish_new(store, "cal-1", [FCM1, FCM2, BACKEND], T0)
    assert await store.outbox.release_claims() == 0
    claimed = await store.outbox.claim(T0, T0 + 300, limit=2)
    assert await store.outbox.release_claims() == 2
    assert await store.outbox.count("in_flight") == 0
    assert await store.outbox.count("pending") == 3
    again = await store.outbox.claim(T0 + 1, T0 + 300)  # long before the old lease ends
    assert {x.id for x in claimed} <= {x.id for x in again}
    assert len(again) == 3


@pytest.mark.gen_test(timeout=10)
async def test_finish_delivery_outcomes(store):
    n = await publish_new(store, "cal-1", [FCM1, FCM2, BACKEND], T0)
    d_sent, d_failed, d_retry = (x.id for x in n.deliveries)
    await store.outbox.claim(T0, T0 + 30)

    sent = await store.outbox.finish(d_sent, "sent", T0 + 1, attempts=1)
    assert (sent.state, sent.attempts, sent.updated_at, sent.lease_until) == (
        "sent",
        1,
        T0 + 1,
        None,
    )

    failed = await store.outbox.finish(
        d_failed, "failed", T0 + 2, attempts=1, last_error="INVALID_ARGUMENT: bad payload"
    )
    assert failed.state == "failed" and failed.last_error == "INVALID_ARGUMENT: bad payload"

    retry = await store.outbox.finish(
        d_retry, "pending", T0 + 3, attempts=1, next_attempt_at=T0 + 60, last_error="503"
    )
    assert (retry.state, retry.attempts, retry.next_attempt_at) == ("pending", 1, T0 + 60)
    assert retry.last_error == "503" and retry.lease_until is None
    assert await store.outbox.next_due() == T0 + 60
    assert await store.outbox.claim(T0 + 59, T0 + 90) == []
    assert [x.id for x in await store.outbox.claim(T0 + 60, T0 + 90)] == [d_retry]

    assert (await store.notifications.get(n.id, with_deliveries=True)).deliveries == (
        sent,
        failed,
        await _delivery(store, n.id, d_retry),
    )
    assert await store.outbox.finish(10_000_000, "sent", T0) is None


async def _delivery(store, notification_id, delivery_id):
    notification = await store.notifications.get(notification_id, with_deliveries=True)
    return next(d for d in notification.deliveries if d.id == delivery_id)


@pytest.mark.gen_test(timeout=10)
async def test_a_cancelled_delivery_stays_cancelled(store):
    n = await publish_new(store, "cal-1", [FCM1], T0)
    (claimed,) = await store.outbox.claim(T0, T0 + 30)
    assert await store.outbox.cancel("cal-1") == 1  # the room went while FCM was answering
    finished = await store.outbox.finish(claimed.id, "sent", T0 + 1, attempts=1)
    assert finished.state == "cancelled"
    retried = await store.outbox.finish(claimed.id, "pending", T0 + 2, next_attempt_at=T0 + 5)
    assert retried.state == "cancelled"
    assert (await store.notifications.get(n.id, with_deliveries=True)).deliveries[
        0
    ].state == "cancelled"
    assert await store.outbox.claim(T0 + 100, T0 + 200) == []


@pytest.mark.gen_test(timeout=10)
async def test_cancel_deliveries_by_calendar_and_token(store):
    a1 = await publish_new(store, "cal-a", [FCM1, FCM2, BACKEND], T0)
    a2 = await publish_new(store, "cal-a", [FCM1, FCM2], T0)
    b1 = await publish_new(store, "cal-b", [FCM1], T0)
    await store.outbox.finish(a2.deliveries[0].id, "sent", T0)

    assert await store.outbox.cancel("cal-a", "t1") == 1  # a1's; a2's t1 was sent already
    assert await store.outbox.cancel("cal-a", "t1") == 0
    states = [
        d.state for d in (await store.notifications.get(a1.id, with_deliveries=True)).deliveries
    ]
    assert states == ["cancelled", "pending", "pending"]
    assert (await store.notifications.get(b1.id, with_deliveries=True)).deliveries[
        0
    ].state == "pending"

    await store.outbox.claim(T0, T0 + 30, limit=1)  # in_flight ones are cancelled too
    assert await store.outbox.cancel("cal-a") == 3
    assert await store.outbox.count("cancelled") == 4
    assert await store.outbox.count("sent") == 1
    assert await store.outbox.count("pending") == 1  # cal-b's
    assert await store.outbox.cancel("cal-unknown") == 0


@pytest.mark.gen_test(timeout=10)
async def test_next_delivery_due(store):
    assert await store.outbox.next_due() is None
    n = await publish_new(store, "cal-1", [FCM1, FCM2], T0)
    d1, d2 = (x.id for x in n.deliveries)
    assert await store.outbox.next_due() == T0
    await store.outbox.finish(d1, "pending", T0, attempts=1, next_attempt_at=T0 + 20)
    await store.outbox.finish(d2, "pending", T0, attempts=1, next_attempt_at=T0 + 10)
    assert await store.outbox.next_due() == T0 + 10
    await store.outbox.claim(T0 + 10, T0 + 15)  # d2 in flight until T0 + 15
    assert await store.outbox.next_due() == T0 + 15
    await store.outbox.finish(d2, "sent", T0 + 12)
    assert await store.outbox.next_due() == T0 + 20
    await store.outbox.finish(d1, "failed", T0 + 13)
    assert await store.outbox.next_due() is None


@pytest.mark.gen_test(timeout=10)
async def test_count_deliveries(store):
    assert await store.outbox.count() == 0
    n = await publish_new(store, "cal-1", [FCM1, FCM2, BACKEND], T0)
    await store.outbox.finish(n.deliveries[0].id, "sent", T0)
    await store.outbox.finish(n.deliveries[1].id, "failed", T0)
    assert await store.outbox.count() == 3
    assert await store.outbox.count("pending") == 1
    assert await store.outbox.count("sent") == 1
    assert await store.outbox.count("failed") == 1
    assert await store.outbox.count("in_flight") == 0
    assert await store.outbox.count("cancelled") == 0


@pytest.mark.gen_test(timeout=10)
async def test_next_delivery_due_by_kind(store):
    n = await publish_new(store, "cal-1", [FCM1, BACKEND], T0)
    d_fcm, d_backend = (x.id for x in n.deliveries)
    await store.outbox.finish(d_fcm, "pending", T0, attempts=1, next_attempt_at=T0 + 20)
    await store.outbox.finish(d_backend, "pending", T0, attempts=1, next_attempt_at=T0 + 10)
    assert await store.outbox.next_due() == T0 + 10
    assert await store.outbox.next_due("backend") == T0 + 10
    assert await store.outbox.next_due("fcm") == T0 + 20
    await store.outbox.claim(T0 + 20, T0 + 25, kind="fcm")  # in flight until T0 + 25
    assert await store.outbox.next_due("fcm") == T0 + 25
    await store.outbox.finish(d_backend, "sent", T0 + 21)
    assert await store.outbox.next_due("backend") is None
    assert await store.outbox.next_due() == T0 + 25


@pytest.mark.gen_test(timeout=10)
async def test_deliveries_not_final_after_retention_expire_and_their_notification_can_go(store):
    day = 86400.0
    old = await publish_new(store, "cal-1", [FCM1, FCM2, Target("fcm", "t3"), BACKEND], T0)
    d_pending, d_lease_over, d_live, d_sent = (x.id for x in old.deliveries)
    recent = await publish_new(store, "cal-1", [FCM1], T0 + 10 * day)
    (d_recent,) = (x.id for x in recent.deliveries)
    await store.outbox.finish(d_sent, "sent", T0 + 1, attempts=1)
    now = T0 + 14 * day + 1
    cutoff = now - 14 * day
    for delivery_id, due in [(d_pending, now + day), (d_lease_over, T0 + 3), (d_live, T0 + 2)]:
        await store.outbox.finish(delivery_id, "pending", T0, next_attempt_at=due)
    # FCM2's claim was left by a dead worker long ago; t3's is an attempt going on now.
    assert [x.id for x in await store.outbox.claim(T0 + 2, T0 + 62, limit=1)] == [d_live]
    assert [x.id for x in await store.outbox.claim(T0 + 3, T0 + 64, limit=1)] == [d_lease_over]
    (live,) = await store.outbox.claim(now, now + 60, limit=1)
    assert live.id == d_live

    assert await store.outbox.expire(cutoff, now) == 2  # d_pending, d_lease_over
    by_id = {
        d.id: d for d in (await store.notifications.get(old.id, with_deliveries=True)).deliveries
    }
    assert (by_id[d_pending].state, by_id[d_pending].updated_at) == ("expired", now)
    assert (by_id[d_lease_over].state, by_id[d_lease_over].lease_until) == ("expired", None)
    assert by_id[d_live].state == "in_flight"  # its attempt ends on its own
    assert by_id[d_sent].state == "sent"
    assert (await store.notifications.get(recent.id, with_deliveries=True)).deliveries[
        0
    ].state == "pending"
    assert await store.outbox.count("expired") == 2
    assert await store.outbox.next_due("fcm") == T0 + 10 * day  # recent's
    assert await store.outbox.expire(cutoff, now) == 0
    # An expired delivery stays expired, like a cancelled one, and is never claimed again.
    again = await store.outbox.finish(d_pending, "pending", now + 1, next_attempt_at=now + 2)
    assert again.state == "expired"
    claimed = await store.outbox.claim(now + day, now + day + 60, limit=10)
    assert sorted(x.id for x in claimed) == sorted([d_live, d_recent])
    assert await store.notifications.purge(cutoff, cutoff) == 0  # t3 is still not final

    await store.outbox.finish(d_live, "failed", now + 2, attempts=1, last_error="x")
    # Every delivery is final now; the expired ones stay visible until a purge whose cutoff
    # is past their expiry (the next retention period).
    assert await store.notifications.purge(cutoff, cutoff) == 0
    assert await store.notifications.purge(now + 2, now + 2) == 0  # t3 failed at now + 2
    assert await store.notifications.purge(now + 3, now + 3) == 1
    assert await store.notifications.get(old.id) is None
    assert await store.notifications.get(recent.id) is not None
