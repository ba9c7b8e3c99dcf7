"""The `Store` promises that only races can break: gapless seq under concurrent publishers with
a reader paging alongside, and claims that never hand one delivery to two workers."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Sequence
from types import SimpleNamespace

import aiosqlite
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage.base import DuplicateNotification, Target
from storage.protocols import Store
from storage.sqlite import SqliteStore
from tests.storage.helpers import T0, claim_all, duplicates, publish_new

MOCK_REASON = "mongomock runs each call without yielding: a race cannot happen there"


async def publish_while_reading(
    publishers: Sequence[Store], reader: Store, count: int
) -> tuple[list[int], list[int]]:
    """Publish `count` notifications from concurrent tasks (spread over `publishers`) while
    `reader` pages with `after`; returns (seqs given, seqs the reader saw, in its order)."""
    done = asyncio.Event()
    in_flight = asyncio.Semaphore(4)
    seen: list[int] = []

    async def publish(i: int) -> int:
        store = publishers[i % len(publishers)]
        # A few in flight at a time: with all of them queued at once, the reader's calls
        # would only come after the last publish and prove nothing.
        async with in_flight:
            added = await store.notifications.add(f"cal-{i % 3}", "poll", "exists", T0)
            await asyncio.sleep(0)
            published = await store.notifications.publish(
                added.id, [{"event_id": f"ev{i}"}], False, [Target("backend")], T0
            )
        assert published.seq is not None
        return published.seq

    async def read() -> None:
        after = 0
        while True:
            finished = done.is_set()  # read once more after the last publish
            page = await reader.notifications.list(after=after, limit=3)
            seen.extend(n.seq for n in page if n.seq is not None)
            if page:
                after = page[-1].seq or after
            elif finished:
                return
            else:
                await asyncio.sleep(0)

    async def publish_all() -> list[int]:
        try:
            return list(await asyncio.gather(*(publish(i) for i in range(count))))
        finally:
            done.set()

    given_seqs, _ = await asyncio.gather(publish_all(), read())
    return given_seqs, seen


@pytest.mark.gen_test(timeout=20)
async def test_seq_has_no_gap_under_concurrent_publishers(store):
    count = 60
    given_seqs, seen = await publish_while_reading([store], store, count)
    assert sorted(given_seqs) == list(range(1, count + 1))
    # The reader never skipped one that became visible later, and saw none twice.
    assert seen == list(range(1, count + 1))
    assert await store.notifications.last_seq() == count
    listed = await store.notifications.list(limit=count)
    assert [n.seq for n in listed] == list(range(1, count + 1))
    assert await store.outbox.count("pending") == count


@pytest.mark.gen_test(timeout=20)
async def test_seq_has_no_gap_across_sqlite_connections(tmp_path):
    """Two connections on one file (as two processes would be), a third one reading."""
    path = str(tmp_path / "shared.sqlite3")
    stores = [SqliteStore(path) for _ in range(3)]
    for store in stores:
        await store.open()
    try:
        given_seqs, seen = await publish_while_reading(stores[:2], stores[2], 60)
    finally:
        for store in stores:
            await store.close()
    assert sorted(given_seqs) == list(range(1, 61))
    assert seen == list(range(1, 61))


async def _make_deliveries(store: Store, notifications: int, per: int) -> set[int]:
    targets = [Target("fcm", f"t{i}") for i in range(per)]
    ids: set[int] = set()
    for _ in range(notifications):
        published = await publish_new(store, "cal-1", targets, T0)
        ids.update(d.id for d in published.deliveries)
    return ids


@pytest.mark.gen_test(timeout=20)
async def test_concurrent_claimers_never_share_a_delivery(store, backend):
    if not backend.concurrent:
        pytest.skip(MOCK_REASON)
    every = await _make_deliveries(store, 20, 3)
    counts = await claim_all([store.outbox.claim] * 6, T0, T0 + 60, limit=4)
    assert duplicates(counts) == {}
    assert set(counts) == every  # every delivery claimed exactly once
    assert await store.outbox.count("in_flight") == len(every)


@pytest.mark.gen_test(timeout=20)
async def test_concurrent_claimers_never_share_a_delivery_on_mongodb_when_calls_interleave():
    """mongomock with every call yielding a few turns of the loop, as a server does: six
    claimers, each claim a look, a conditional take and a read back, interleaved."""
    from storage.mongo import MongoStore
    from tests.storage.test_mongo_specific import Faults, FlakyClient

    store = MongoStore("mongodb://h/site", client=FlakyClient(Faults()))
    await store.open()
    every = await _make_deliveries(store, 20, 3)
    counts = await claim_all([store.outbox.claim] * 6, T0, T0 + 60, limit=4)
    assert duplicates(counts) == {}
    assert set(counts) == every
    assert await store.outbox.count("in_flight") == len(every)


@pytest.mark.gen_test(timeout=20)
async def test_concurrent_claimers_on_two_sqlite_connections(tmp_path):
    path = str(tmp_path / "shared.sqlite3")
    first, second = SqliteStore(path), SqliteStore(path)
    await first.open()
    await second.open()
    try:
        every = await _make_deliveries(first, 20, 3)
        claims = [first.outbox.claim, second.outbox.claim] * 3
        counts = await claim_all(claims, T0, T0 + 60, limit=4)
    finally:
        await first.close()
        await second.close()
    assert duplicates(counts) == {}
    assert set(counts) == every


@pytest.mark.gen_test(timeout=20)
async def test_the_duplicate_check_catches_a_broken_claimer(tmp_path, monkeypatch):
    """The check above must be able to fail: a claimer that reads, yields, then writes without
    a condition hands the same deliveries to several workers, and `duplicates` says so."""
    store = SqliteStore(str(tmp_path / "broken.sqlite3"))
    await store.open()
    raw = await aiosqlite.connect(store.path, isolation_level=None)
    try:
        every = await _make_deliveries(store, 20, 3)

        async def broken_claim(now, lease_until, limit=100, kind=None):
            rows = await raw.execute_fetchall(
                "SELECT id FROM deliveries WHERE state = 'pending' AND next_attempt_at <= ?"
                " ORDER BY next_attempt_at, id LIMIT ?",
                (now, limit),
            )
            ids = [row[0] for row in rows]
            await asyncio.sleep(0)  # another claimer reads the same rows meanwhile
            await raw.executemany(
                "UPDATE deliveries SET state = 'in_flight', lease_until = ? WHERE id = ?",
                [(lease_until, i) for i in ids],
            )
            return [SimpleNamespace(id=i) for i in ids]

        monkeypatch.setattr(store.outbox, "claim", broken_claim)
        counts = await claim_all([store.outbox.claim] * 6, T0, T0 + 60, limit=4)
    finally:
        await raw.close()
        await store.close()
    assert set(counts) == every
    assert duplicates(counts) != {}


# -- a property: ids and seqs over any mix of adds, publishes, skips and purges ---------------

operations = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.sampled_from([None, "ch-1", "ch-2"]), st.integers(1, 4)),
        st.tuples(st.just("publish"), st.integers(0, 50)),
        st.tuples(st.just("skip"), st.integers(0, 50)),
        st.tuples(st.just("purge"), st.integers(0, 3)),
    ),
    max_size=30,
)


async def _check_ids_and_seqs(store: Store, ops: list[tuple]) -> None:
    now = T0
    last_id = 0
    seq = 0
    waiting: list[int] = []  # received, oldest first
    pairs: set[tuple[str, int]] = set()  # stored (channel, message number) pairs
    stored_pair: dict[int, tuple[str, int]] = {}
    received_at: dict[int, float] = {}
    settled: dict[int, float] = {}  # published or skipped: id -> the time a purge compares
    for op in ops:
        now += 1
        if op[0] == "add":
            _, channel, number = op
            source = "webhook" if channel else "poll"
            message_number = number if channel else None
            if channel and (channel, number) in pairs:
                with pytest.raises(DuplicateNotification):
                    await store.notifications.add("c", source, "exists", now, channel, number)
                continue
            added = await store.notifications.add(
                "c", source, "exists", now, channel, message_number
            )
            assert added.id > last_id  # strictly increasing, never reused
            last_id = added.id
            waiting.append(added.id)
            received_at[added.id] = now
            if channel:
                pairs.add((channel, number))
                stored_pair[added.id] = (channel, number)
        elif op[0] in ("publish", "skip") and waiting:
            nid = waiting.pop(op[1] % len(waiting))
            if op[0] == "publish":
                published = await store.notifications.publish(nid, [], True, [], now)
                seq += 1
                assert published.seq == seq  # the next value, in publication order
                settled[nid] = now
            else:
                await store.notifications.skip([nid], now)
                settled[nid] = received_at[nid]  # a skipped one goes by when it came
        elif op[0] == "purge":
            cutoff = now - op[1]
            gone = {nid for nid, when in settled.items() if when < cutoff}
            assert await store.notifications.purge(cutoff, cutoff) == len(gone)
            for nid in gone:
                del settled[nid]
                pairs.discard(stored_pair.pop(nid, ("", 0)))
    assert await store.notifications.last_seq() == seq
    assert [n.id for n in await store.notifications.received()] == waiting
    listed = await store.notifications.list(include_unpublished=True, limit=1000)
    assert [n.id for n in listed] == sorted(set(waiting) | set(settled))
    seqs = [n.seq for n in await store.notifications.list(limit=1000)]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


def _property_store(backend: str, directory: str) -> Store:
    if backend == "sqlite":
        return SqliteStore(f"{directory}/p.sqlite3")
    try:
        from storage.mongo import MongoStore
    except ImportError as exc:
        pytest.skip(f"storage.mongo cannot be imported yet: {exc}")
    from mongomock_motor import AsyncMongoMockClient

    return MongoStore("mongodb://127.0.0.1/p", client=AsyncMongoMockClient(), database="p")


@pytest.mark.parametrize("backend", ["sqlite", "mongomock"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=operations)
def test_ids_and_seqs_property(backend, ops):
    async def run() -> None:
        with tempfile.TemporaryDirectory() as directory:
            store = _property_store(backend, directory)
            await store.open()
            try:
                await _check_ids_and_seqs(store, ops)
            finally:
                await store.close()

    asyncio.run(run())
