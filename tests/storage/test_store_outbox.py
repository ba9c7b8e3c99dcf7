"""The `Store` contract, the outbox as operators see it: outbox.list (newest first, filters,
paging), outbox.counts, and outbox.retry (only what gave up; a token that left its room is
never brought back; retention counts from the retry). Runs against each backend."""

from __future__ import annotations

import pytest

from storage.base import DELIVERY_STATES, RetrySkip, Target
from tests.storage.helpers import T0, publish_new

T1, T2, T3 = Target("fcm", "t1"), Target("fcm", "t2"), Target("fcm", "t3")
BACKEND = Target("backend")
DAY = 86400.0


async def one_of_each_state(store, calendar_id="cal-1"):
    """One FCM delivery in each state, each to its own token of the room; returns {state: id}."""
    await store.rooms.put(calendar_id, "", [f"s-{state}" for state in DELIVERY_STATES], T0)
    old = await publish_new(store, calendar_id, [Target("fcm", "s-expired")], T0 - 10)
    assert await store.outbox.expire(T0 - 5, T0) == 1  # made before the others
    rest = [state for state in DELIVERY_STATES if state != "expired"]
    n = await publish_new(store, calendar_id, [Target("fcm", f"s-{s}") for s in rest], T0)
    ids = {state: d.id for state, d in zip(rest, n.deliveries, strict=True)}
    ids["expired"] = old.deliveries[0].id
    await store.outbox.finish(ids["sent"], "sent", T0 + 1, attempts=1)
    await store.outbox.finish(ids["failed"], "failed", T0 + 1, attempts=8, last_error="gave up")
    await store.outbox.finish(ids["cancelled"], "cancelled", T0 + 1)
    await store.outbox.finish(ids["pending"], "pending", T0 + 1, next_attempt_at=T0 + 999)
    (claimed,) = await store.outbox.claim(T0 + 2, T0 + 100, limit=10)
    assert claimed.id == ids["in_flight"]
    return ids


@pytest.mark.gen_test(timeout=10)
async def test_list_deliveries_newest_first_with_filters_and_pages(store):
    a = await publish_new(store, "cal-1", [T1, BACKEND], T0)
    b = await publish_new(store, "cal-2", [T2], T0 + 1)
    c = await publish_new(store, "cal-1", [T3], T0 + 2)
    ids = [d.id for n in (a, b, c) for d in n.deliveries]
    assert ids == sorted(ids)
    await store.outbox.finish(a.deliveries[0].id, "failed", T0 + 5, attempts=1, last_error="x")

    listed = await store.outbox.list()
    assert [d.id for d in listed] == ids[::-1]
    assert listed[-1].target == T1 and listed[-1].state == "failed"
    assert listed[-1].last_error == "x" and listed[-1].updated_at == T0 + 5
    assert [d.id for d in await store.outbox.list(calendar_id="cal-1")] == [
        ids[3],
        ids[1],
        ids[0],
    ]
    assert [d.id for d in await store.outbox.list(state="failed")] == [ids[0]]
    assert [d.id for d in await store.outbox.list(state="pending", calendar_id="cal-1")] == [
        ids[3],
        ids[1],
    ]
    assert await store.outbox.list(state="sent") == []
    assert await store.outbox.list(calendar_id="cal-9") == []
    # Pages: `limit` newest, then the next ones before the last id shown.
    first = await store.outbox.list(limit=2)
    assert [d.id for d in first] == [ids[3], ids[2]]
    second = await store.outbox.list(limit=2, before=first[-1].id)
    assert [d.id for d in second] == [ids[1], ids[0]]
    assert await store.outbox.list(limit=2, before=second[-1].id) == []
    assert await store.outbox.list(limit=0) == []


@pytest.mark.gen_test(timeout=10)
async def test_delivery_counts_by_state_and_target(store):
    assert await store.outbox.counts() == {}
    a = await publish_new(store, "cal-1", [T1, T2, BACKEND], T0)
    await publish_new(store, "cal-2", [T3, BACKEND], T0)
    await store.outbox.finish(a.deliveries[0].id, "sent", T0, attempts=1)
    await store.outbox.finish(a.deliveries[2].id, "failed", T0, attempts=1)
    assert await store.outbox.counts() == {
        ("sent", "fcm"): 1,
        ("pending", "fcm"): 2,
        ("failed", "backend"): 1,
        ("pending", "backend"): 1,
    }
    assert await store.outbox.counts("cal-2") == {
        ("pending", "fcm"): 1,
        ("pending", "backend"): 1,
    }
    assert await store.outbox.counts("cal-9") == {}


@pytest.mark.gen_test(timeout=10)
async def test_retry_by_ids_takes_only_failed_and_expired(store):
    ids = await one_of_each_state(store)
    before = {d.id: d for d in await store.outbox.list()}

    now = T0 + 50
    outcome = await store.outbox.retry(now, ids=[*ids.values(), 424242])
    assert outcome.retried == tuple(sorted([ids["failed"], ids["expired"]]))
    assert sorted(outcome.skipped, key=lambda s: s.id) == list(outcome.skipped)
    assert set(outcome.skipped) == {
        RetrySkip(ids["pending"], "not_retryable", "pending"),
        RetrySkip(ids["in_flight"], "not_retryable", "in_flight"),
        RetrySkip(ids["sent"], "not_retryable", "sent"),
        RetrySkip(ids["cancelled"], "not_retryable", "cancelled"),
        RetrySkip(424242, "not_found", None),
    }
    after = {d.id: d for d in await store.outbox.list()}
    for state in ("failed", "expired"):
        d = after[ids[state]]
        assert (d.state, d.attempts, d.next_attempt_at, d.last_error) == ("pending", 0, now, None)
        assert (d.created_at, d.updated_at, d.lease_until) == (now, now, None)
        assert d.target == before[d.id].target and d.notification_id == before[d.id].notification_id
    for state in ("pending", "in_flight", "sent", "cancelled"):
        assert after[ids[state]] == before[ids[state]]  # untouched
    # Due now: the worker's next claim takes them.
    claimed = await store.outbox.claim(now, now + 60, limit=10)
    assert sorted(d.id for d in claimed) == sorted([ids["failed"], ids["expired"]])
    # A second retry of the same ids finds them in flight: nothing more.
    again = await store.outbox.retry(now, ids=[ids["failed"]])
    assert again.retried == () and again.skipped == (
        RetrySkip(ids["failed"], "not_retryable", "in_flight"),
    )


@pytest.mark.gen_test(timeout=10)
async def test_retry_by_state(store):
    await store.rooms.put("cal-1", "", ["t1", "t2", "t3"], T0)
    n = await publish_new(store, "cal-1", [T1, T2, T3, BACKEND], T0)
    d1, d2, d3, d_backend = (d.id for d in n.deliveries)
    await store.outbox.finish(d1, "failed", T0 + 1, attempts=3, last_error="e")
    await store.outbox.finish(d_backend, "failed", T0 + 1, attempts=8, last_error="e")
    await store.outbox.finish(d2, "sent", T0 + 1, attempts=1)
    assert await store.outbox.expire(T0 + 1, T0 + 2) == 1  # d3
    assert (await store.outbox.retry(T0 + 3, state="expired")).retried == (d3,)
    outcome = await store.outbox.retry(T0 + 3, state="failed")
    assert outcome.retried == (d1, d_backend) and outcome.skipped == ()
    states = {d.id: d.state for d in await store.outbox.list()}
    assert states == {d1: "pending", d2: "sent", d3: "pending", d_backend: "pending"}
    assert (await store.outbox.retry(T0 + 4, state="failed")).retried == ()
    with pytest.raises(ValueError):
        await store.outbox.retry(T0, ids=[d1], state="failed")
    with pytest.raises(ValueError):
        await store.outbox.retry(T0)


@pytest.mark.gen_test(timeout=10)
async def test_retry_never_brings_back_a_token_that_left_the_room(store):
    await store.rooms.put("cal-1", "", ["t1", "t2", "t3", "t4"], T0)
    await store.rooms.put("cal-2", "", ["t1"], T0)
    n = await publish_new(
        store, "cal-1", [T1, T2, T3, Target("fcm", "t4"), Target("fcm", "t9"), BACKEND], T0
    )
    gone = await publish_new(store, "cal-2", [T1, BACKEND], T0)
    every = [d.id for d in (*n.deliveries, *gone.deliveries)]
    for delivery_id in every:
        await store.outbox.finish(delivery_id, "failed", T0 + 1, attempts=8, last_error="e")
    d1, d2, d3, d4, d9, d_backend, g1, g_backend = every
    await store.rooms.remove_token("cal-1", "t2", T0 + 2)  # removed
    await store.rooms.tombstone_token("cal-1", "t3", T0 + 30 * DAY, T0 + 2)  # FCM refused it
    await store.rooms.put("cal-1", None, ["t1", "t3-new", "t4"], T0 + 2)  # the set replaced
    await store.rooms.remove_token("cal-1", "t4", T0 + 2)
    await store.rooms.add_tokens("cal-1", ["t4"], T0 + 3, respect_tombstones=True)  # back again
    await store.rooms.delete("cal-2")
    before = {d.id: d for d in await store.outbox.list()}

    outcome = await store.outbox.retry(T0 + 5, state="failed")
    assert outcome.retried == (d1, d4, d_backend)
    assert outcome.skipped == (
        RetrySkip(d2, "token_dropped", "failed"),
        RetrySkip(d3, "token_tombstoned", "failed"),
        RetrySkip(d9, "token_dropped", "failed"),  # never in the room
        RetrySkip(g1, "room_gone", "failed"),
        RetrySkip(g_backend, "room_gone", "failed"),
    )
    after = {d.id: d for d in await store.outbox.list()}
    for skipped in outcome.skipped:
        assert after[skipped.id] == before[skipped.id]
    assert {after[i].state for i in outcome.retried} == {"pending"}
    # Named by id, the same rules hold.
    again = await store.outbox.retry(T0 + 6, ids=[d2, d3, g1])
    assert again.retried == () and [s.reason for s in again.skipped] == [
        "token_dropped",
        "token_tombstoned",
        "room_gone",
    ]
    # An explicit add clears the tombstone: the token is the room's again, and may be retried.
    await store.rooms.add_tokens("cal-1", ["t3"], T0 + 7, respect_tombstones=False)
    assert (await store.outbox.retry(T0 + 8, ids=[d3])).retried == (d3,)


@pytest.mark.gen_test(timeout=10)
async def test_a_retried_delivery_counts_its_retention_from_the_retry(store):
    await store.rooms.put("cal-1", "", ["t1"], T0)
    n = await publish_new(store, "cal-1", [T1], T0)
    (d1,) = (d.id for d in n.deliveries)
    retention = 14 * DAY
    now = T0 + 15 * DAY
    assert await store.outbox.expire(now - retention, now) == 1  # made at T0: expired
    assert (await store.outbox.retry(now, ids=[d1])).retried == (d1,)
    # The next hourly purge, its cutoff past the first try: the retried delivery stays.
    later = now + 3600
    assert await store.outbox.expire(later - retention, later) == 0
    assert await store.notifications.purge(later - retention, later - retention) == 0
    assert (await store.notifications.get(n.id, with_deliveries=True)).deliveries[
        0
    ].state == "pending"
    # Retention counts from the retry: expired again only once that has passed.
    assert await store.outbox.expire(now, now + retention) == 0
    assert await store.outbox.expire(now + 1, now + retention + 1) == 1
